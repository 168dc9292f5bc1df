//! Dirty-page tracking for a machine: which guest pages were written since the
//! last take, behind the [`DirtyTracker`] interface. Two trackers: KVM's dirty
//! bitmap (`KVM_GET_DIRTY_LOG`, on the VM fd, switched on per memslot) and
//! KVM's dirty ring, drained here by a harvester thread of its own while the
//! vCPUs run (so that the ring does not fill: under emulation its soft-full
//! exit can come too late and lose entries, see ../shared/notes/host-facts.md).
//! Pre-copy rounds and PostCopyFT checkpoints take from whichever the machine has.

pub mod ebpf;

use crate::page_set::PageSet;
use crate::vmm::dirty::ebpf::EbpfTracker;
use crate::vmm::kvm::dirty_ring::{reset_rings, DirtyRing};
use crate::vmm::kvm::vm::KvmVm;
use crate::vmm::kvm::KvmError;
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a machine tracks the pages its guest writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DirtyTracking {
    /// KVM's dirty bitmap, off until asked for.
    Bitmap,
    /// KVM's dirty ring of `entries` per vCPU (a power of two), on from boot.
    Ring { entries: u32 },
    /// The eBPF program on `kvm:kvm_dirty_ring_push` (which needs the ring of
    /// `entries` too, drained but not read); an error if it cannot be loaded.
    Ebpf { entries: u32 },
    /// eBPF if it can be loaded here, else the ring, with a warning.
    Auto { entries: u32 },
}

impl DirtyTracking {
    /// The largest ring KVM offers here (1 MiB: 65,536 entries), the default for `--dirty-tracker ring`.
    pub const DEFAULT_RING_ENTRIES: u32 = 65_536;
}

/// Which pages the guest wrote, per take. Writes racing a take on a running
/// machine land in the next take, never nowhere. Logging must be on for the
/// memslots (`Machine::set_dirty_logging`).
pub trait DirtyTracker: Send + Sync {
    /// Its name in logs and reports (`bitmap`, `ring`).
    fn name(&self) -> &'static str;
    /// The pages written since the last take, sorted; they are forgotten.
    fn take(&self) -> Result<Vec<u64>, KvmError>;
}

/// KVM's dirty bitmap: each take reads and clears it (`KVM_GET_DIRTY_LOG`).
pub struct BitmapTracker {
    vm: Arc<KvmVm>,
}

impl BitmapTracker {
    pub fn new(vm: Arc<KvmVm>) -> Self {
        BitmapTracker { vm }
    }
}

impl DirtyTracker for BitmapTracker {
    fn name(&self) -> &'static str {
        "bitmap"
    }

    fn take(&self) -> Result<Vec<u64>, KvmError> {
        self.vm.take_dirty_pages()
    }
}

impl DirtyTracker for RingTracker {
    fn name(&self) -> &'static str {
        "ring"
    }

    fn take(&self) -> Result<Vec<u64>, KvmError> {
        RingTracker::take(self)
    }
}

/// The eBPF tracker over the dirty ring whose pushes its program sees. A take
/// swaps the program's bits out, then drains and resets the ring before it
/// returns. The reset matters on hardware KVM: a page whose ring entry has not
/// been reset stays writable and is not pushed again, so without it a write
/// that follows the reading of a taken page, before the harvester's next
/// reset, would reach neither this take nor the next. After the reset, every
/// write pushes (and sets its bit) again. (Under PVM every emulated write
/// pushes, so this host cannot show the difference.)
pub struct EbpfRingTracker {
    pub ebpf: Arc<EbpfTracker>,
    pub ring: Arc<RingTracker>,
}

impl DirtyTracker for EbpfRingTracker {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn take(&self) -> Result<Vec<u64>, KvmError> {
        let pages = self.ebpf.take();
        self.ring.drain()?;
        Ok(pages)
    }
}

/// How often the harvester drains the rings.
const HARVEST_INTERVAL: Duration = Duration::from_millis(1);

/// The dirty-ring tracker: the vCPUs' rings, the pages harvested from them,
/// and the harvester thread.
pub struct RingTracker {
    rings: Vec<Mutex<DirtyRing>>,
    /// Base guest-physical address of each memslot, by slot id.
    slot_base: Vec<u64>,
    dirty: Mutex<PageSet>,
    vm_fd: RawFd,
    stop: AtomicBool,
    harvested: AtomicU64,
    /// Keep the harvested pages (false: only drain the ring, for the eBPF tracker).
    keep: bool,
}

impl RingTracker {
    /// `vm_fd` must stay open until [`stop`](Self::stop) has returned.
    pub fn new(rings: Vec<DirtyRing>, memory: &GuestMemory, vm_fd: RawFd, keep: bool) -> Arc<Self> {
        Arc::new(RingTracker {
            keep,
            rings: rings.into_iter().map(Mutex::new).collect(),
            slot_base: memory.slots().iter().map(|s| s.gpa).collect(),
            dirty: Mutex::new(PageSet::empty(memory.size())),
            vm_fd,
            stop: AtomicBool::new(false),
            harvested: AtomicU64::new(0),
        })
    }

    /// Entries harvested so far (duplicates of a page included).
    pub fn harvested(&self) -> u64 {
        self.harvested.load(Ordering::Relaxed)
    }

    /// Harvests every ring now and hands the entries back to KVM.
    pub fn drain(&self) -> Result<usize, KvmError> {
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
        reset_rings(self.vm_fd)?;
        self.harvested.fetch_add(entries.len() as u64, Ordering::Relaxed);
        Ok(entries.len())
    }

    /// The pages written since the last take, sorted. It drains the rings
    /// first, so on a paused machine nothing is left behind; a write racing
    /// with a take on a running machine lands in the next take.
    pub fn take(&self) -> Result<Vec<u64>, KvmError> {
        self.drain()?;
        let mut dirty = self.dirty.lock().expect("dirty set lock");
        let pages: Vec<u64> = dirty.iter().collect();
        for &gpa in &pages {
            dirty.remove(gpa);
        }
        Ok(pages)
    }

    /// Starts the harvester thread.
    pub fn start_harvester(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let tracker = Arc::clone(self);
        std::thread::Builder::new().name("dirty-ring".into()).spawn(move || {
            while !tracker.stop.load(Ordering::Relaxed) {
                if let Err(e) = tracker.drain() {
                    tracing::error!("dirty ring harvest failed: {e}");
                    return;
                }
                std::thread::sleep(HARVEST_INTERVAL);
            }
        })
    }

    /// Tells the harvester thread to end (join it afterwards).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
