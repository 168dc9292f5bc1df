//! KVM's dirty ring as a tracker: the vCPUs' rings, drained by a harvester
//! thread of the tracker's own while the vCPUs run (so that a ring does not
//! fill: under emulation its soft-full exit can come too late and lose
//! entries), the pages harvested from them, and their rate.

use super::rate::RateSampler;
use super::tracker::{DirtyError, DirtyTracker};
use crate::vmm::kvm::dirty_ring::DirtyRing;
use crate::vmm::kvm::vm::KvmVm;
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::vmm::page_set::PageSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the harvester drains the rings.
const HARVEST_INTERVAL: Duration = Duration::from_millis(1);

/// The dirty-ring tracker: the vCPUs' rings, the pages harvested from them,
/// and the harvester thread.
pub struct RingTracker {
    vm: Arc<KvmVm>,
    rings: Vec<Mutex<DirtyRing>>,
    /// Base guest-physical address of each memslot, by slot id.
    slot_base: Vec<u64>,
    dirty: Mutex<PageSet>,
    stop: AtomicBool,
    harvested: AtomicU64,
    /// Keep the harvested pages (false: only drain the ring, for the eBPF tracker).
    keep: bool,
    harvester: Mutex<Option<JoinHandle<()>>>,
    rate: RateSampler,
}

impl RingTracker {
    /// Tracks `vm`'s vCPUs through their `rings` and starts the harvester.
    /// With `keep` false the harvested pages are dropped (the eBPF tracker
    /// reads the ring's pushes, not its entries).
    pub fn start(
        vm: Arc<KvmVm>,
        rings: Vec<DirtyRing>,
        memory: &GuestMemory,
        keep: bool,
    ) -> Result<Arc<Self>, DirtyError> {
        let tracker = Arc::new(RingTracker {
            vm,
            keep,
            rings: rings.into_iter().map(Mutex::new).collect(),
            slot_base: memory.slots().iter().map(|s| s.gpa).collect(),
            dirty: Mutex::new(PageSet::empty(memory.size())),
            stop: AtomicBool::new(false),
            harvested: AtomicU64::new(0),
            harvester: Mutex::new(None),
            rate: RateSampler::new(0),
        });
        let harvesting = Arc::clone(&tracker);
        let thread = std::thread::Builder::new()
            .name("dirty-ring".into())
            .spawn(move || harvesting.harvest_until_stopped())
            .map_err(DirtyError::Thread)?;
        *tracker.harvester.lock().expect("harvester lock") = Some(thread);
        Ok(tracker)
    }

    fn harvest_until_stopped(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(e) = self.drain() {
                tracing::error!("dirty ring harvest failed: {e}");
                return;
            }
            std::thread::sleep(HARVEST_INTERVAL);
        }
    }

    /// Harvests every ring now and hands the entries back to KVM. Returns how many.
    pub fn drain(&self) -> Result<usize, DirtyError> {
        let mut entries = Vec::new();
        for ring in &self.rings {
            ring.lock().expect("dirty ring lock").harvest(&mut entries);
        }
        if entries.is_empty() {
            return Ok(0);
        }
        if self.keep {
            let mut dirty = self.dirty.lock().expect("dirty set lock");
            for &(slot, offset) in &entries {
                // Address space 0 only (slot = as_id << 16 | id).
                if let Some(base) = self.slot_base.get((slot & 0xffff) as usize) {
                    dirty.insert(base + offset * PAGE_SIZE);
                }
            }
        }
        self.vm.reset_dirty_rings()?;
        self.harvested.fetch_add(entries.len() as u64, Ordering::Relaxed);
        Ok(entries.len())
    }
}

impl DirtyTracker for RingTracker {
    fn name(&self) -> &'static str {
        "ring"
    }

    fn set_logging(&self, enabled: bool) -> Result<(), DirtyError> {
        self.vm.set_dirty_logging(enabled)?;
        if enabled {
            self.take()?;
        }
        Ok(())
    }

    /// Drains the rings first, so on a paused machine nothing is left behind;
    /// a write racing with a take on a running machine lands in the next take.
    fn take(&self) -> Result<Vec<u64>, DirtyError> {
        self.drain()?;
        let mut dirty = self.dirty.lock().expect("dirty set lock");
        let pages: Vec<u64> = dirty.iter().collect();
        for &gpa in &pages {
            dirty.remove(gpa);
        }
        Ok(pages)
    }

    /// Entries harvested a second (the harvester counts them continuously;
    /// with logging off none come, and the rate is 0).
    fn sample_rate(&self) -> Result<Option<f64>, DirtyError> {
        Ok(Some(self.rate.sample(self.logged())))
    }

    fn logged(&self) -> u64 {
        self.harvested.load(Ordering::Relaxed)
    }

    fn ring_full(&self) -> Result<Option<usize>, DirtyError> {
        self.drain().map(Some)
    }

    fn follow_vcpu_thread(&self, _tid: u32) -> Result<(), DirtyError> {
        Ok(())
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let harvester = self.harvester.lock().expect("harvester lock").take();
        if let Some(thread) = harvester {
            let _ = thread.join();
        }
    }
}
