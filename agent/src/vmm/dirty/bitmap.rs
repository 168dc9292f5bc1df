//! KVM's dirty bitmap as a tracker: `KVM_MEM_LOG_DIRTY_PAGES` on every memslot
//! while logging is on, `KVM_GET_DIRTY_LOG` (which reads and clears it) at
//! each take and each rate sample. A sample's pages are kept for the next take.

use super::rate::RateSampler;
use super::tracker::{DirtyError, DirtyTracker};
use crate::vmm::kvm::vm::KvmVm;
use crate::vmm::page_set::PageSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// KVM's dirty bitmap, off until asked for. It has no thread: its rate is
/// sampled when asked ([`DirtyTracker::sample_rate`], once a second by the
/// VM's runner), and only while logging is on.
pub struct BitmapTracker {
    vm: Arc<KvmVm>,
    logging: AtomicBool,
    /// Pages harvested by rate samples since the last take.
    pending: Mutex<PageSet>,
    /// Pages harvested so far (by takes and samples).
    harvested: AtomicU64,
    rate: RateSampler,
}

impl BitmapTracker {
    /// The bitmap of `vm`, whose guest memory is `mem_bytes` long; logging off.
    pub fn new(vm: Arc<KvmVm>, mem_bytes: u64) -> Self {
        BitmapTracker {
            vm,
            logging: AtomicBool::new(false),
            pending: Mutex::new(PageSet::empty(mem_bytes)),
            harvested: AtomicU64::new(0),
            rate: RateSampler::new(0),
        }
    }

    /// Reads and clears KVM's bitmap into `pending`.
    fn harvest(&self, pending: &mut PageSet) -> Result<(), DirtyError> {
        let pages = self.vm.take_dirty_pages()?;
        self.harvested.fetch_add(pages.len() as u64, Ordering::Relaxed);
        for gpa in pages {
            pending.insert(gpa);
        }
        Ok(())
    }
}

impl DirtyTracker for BitmapTracker {
    fn name(&self) -> &'static str {
        "bitmap"
    }

    fn set_logging(&self, enabled: bool) -> Result<(), DirtyError> {
        self.vm.set_dirty_logging(enabled)?;
        self.logging.store(enabled, Ordering::Relaxed);
        if enabled {
            self.take()?;
            self.rate.restart(self.logged());
        }
        Ok(())
    }

    fn take(&self) -> Result<Vec<u64>, DirtyError> {
        let mut pending = self.pending.lock().expect("pending pages lock");
        self.harvest(&mut pending)?;
        let pages: Vec<u64> = pending.iter().collect();
        for &gpa in &pages {
            pending.remove(gpa);
        }
        Ok(pages)
    }

    fn sample_rate(&self) -> Result<Option<f64>, DirtyError> {
        if !self.logging.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.harvest(&mut self.pending.lock().expect("pending pages lock"))?;
        Ok(Some(self.rate.sample(self.logged())))
    }

    fn logged(&self) -> u64 {
        self.harvested.load(Ordering::Relaxed)
    }

    fn ring_full(&self) -> Result<Option<usize>, DirtyError> {
        Ok(None)
    }

    fn follow_vcpu_thread(&self, _tid: u32) -> Result<(), DirtyError> {
        Ok(())
    }

    fn stop(&self) {}
}
