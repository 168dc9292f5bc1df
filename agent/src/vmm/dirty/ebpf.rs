//! The eBPF tracker: the program on `kvm:kvm_dirty_ring_push` marks each page
//! a vCPU of this VM pushes ([`BpfVmBitmap`]), over the dirty ring whose pushes
//! it sees (a [`RingTracker`] that drains the ring and keeps nothing).

use super::bpf::BpfVmBitmap;
use super::rate::RateSampler;
use super::ring::RingTracker;
use super::tracker::{DirtyError, DirtyTracker};
use crate::vmm::kvm::vm::KvmVm;
use std::sync::Arc;

/// The eBPF tracker over the dirty ring whose pushes its program sees. A take
/// swaps the program's bits out, then drains and resets the ring before it
/// returns. The reset matters on hardware KVM: a page whose ring entry has not
/// been reset stays writable and is not pushed again, so without it a write
/// that follows the reading of a taken page, before the harvester's next
/// reset, would reach neither this take nor the next. After the reset, every
/// write pushes (and sets its bit) again. (Under PVM every emulated write
/// pushes, so this host cannot show the difference.)
pub struct EbpfTracker {
    vm: Arc<KvmVm>,
    bitmap: BpfVmBitmap,
    ring: Arc<RingTracker>,
    rate: RateSampler,
}

impl EbpfTracker {
    /// The program's `bitmap` for this VM over the VM's draining `ring`.
    pub fn new(vm: Arc<KvmVm>, bitmap: BpfVmBitmap, ring: Arc<RingTracker>) -> Self {
        let rate = RateSampler::new(bitmap.pushes());
        EbpfTracker { vm, bitmap, ring, rate }
    }
}

impl DirtyTracker for EbpfTracker {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn set_logging(&self, enabled: bool) -> Result<(), DirtyError> {
        self.vm.set_dirty_logging(enabled)?;
        if enabled {
            self.take()?;
        }
        Ok(())
    }

    fn take(&self) -> Result<Vec<u64>, DirtyError> {
        let pages = self.bitmap.take();
        self.ring.drain()?;
        Ok(pages)
    }

    /// Pushes a second, from the program's per-VM counter (no harvest: it
    /// counts in the kernel; with logging off nothing is pushed, and the rate is 0).
    fn sample_rate(&self) -> Result<Option<f64>, DirtyError> {
        Ok(Some(self.rate.sample(self.logged())))
    }

    fn logged(&self) -> u64 {
        self.bitmap.pushes()
    }

    fn ring_full(&self) -> Result<Option<usize>, DirtyError> {
        self.ring.ring_full()
    }

    fn follow_vcpu_thread(&self, tid: u32) -> Result<(), DirtyError> {
        Ok(self.bitmap.follow_thread(tid)?)
    }

    fn stop(&self) {
        self.ring.stop();
    }
}
