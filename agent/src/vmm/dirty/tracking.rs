//! The choice of tracker ([`DirtyTracking`]) and how a machine builds it: the
//! dirty ring, if the tracker needs one, must be enabled before any vCPU
//! exists ([`DirtyTracking::prepare`]); the tracker itself needs the vCPUs
//! ([`TrackerPlan::start`]).

use super::bitmap::BitmapTracker;
use super::bpf::BpfVmBitmap;
use super::ebpf::EbpfTracker;
use super::ring::RingTracker;
use super::tracker::{DirtyError, DirtyTracker};
use crate::vmm::kvm::vcpu::KvmVcpu;
use crate::vmm::kvm::vm::KvmVm;
use crate::vmm::memory::GuestMemory;
use std::sync::Arc;

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
    /// The best tracker this host has: eBPF if it can be loaded here, else the
    /// ring (at most `entries`, as large as this KVM offers), else the bitmap,
    /// with a warning on each fallback.
    Auto { entries: u32 },
}

impl DirtyTracking {
    /// The largest ring KVM offers here (1 MiB: 65,536 entries), the default for `--dirty-tracker ring`.
    pub const DEFAULT_RING_ENTRIES: u32 = 65_536;

    /// Settles the choice on `vm` (`Auto` picks here) and enables the dirty
    /// ring if the tracker needs one: call it before the VM's first vCPU.
    pub fn prepare(self, vm: &KvmVm, memory: &GuestMemory) -> Result<TrackerPlan, DirtyError> {
        let plan = match self {
            DirtyTracking::Bitmap => TrackerPlan::Bitmap,
            DirtyTracking::Ring { entries } => TrackerPlan::Ring { entries },
            DirtyTracking::Ebpf { entries } => TrackerPlan::Ebpf { entries, bitmap: BpfVmBitmap::new(memory)? },
            DirtyTracking::Auto { entries } => Self::auto(vm, memory, entries),
        };
        if let TrackerPlan::Ring { entries } | TrackerPlan::Ebpf { entries, .. } = &plan {
            vm.enable_dirty_ring(*entries)?;
        }
        Ok(plan)
    }

    /// eBPF (exact, and it keeps every page even where the ring overflows),
    /// else the ring (drained concurrently), else the bitmap. eBPF and the ring
    /// both need `KVM_CAP_DIRTY_LOG_RING`.
    fn auto(vm: &KvmVm, memory: &GuestMemory, entries: u32) -> TrackerPlan {
        let max = vm.dirty_ring_max_entries();
        if max == 0 {
            tracing::warn!("dirty tracker auto: this KVM has no dirty ring; using the dirty bitmap");
            return TrackerPlan::Bitmap;
        }
        // The largest power of two this KVM offers, up to the one asked for.
        let entries = 1 << entries.min(max).max(1).ilog2();
        match BpfVmBitmap::new(memory) {
            Ok(bitmap) => TrackerPlan::Ebpf { entries, bitmap },
            Err(e) => {
                tracing::warn!("dirty tracker auto: {e}; using the dirty ring");
                TrackerPlan::Ring { entries }
            }
        }
    }
}

/// A settled tracker choice whose ring, if any, is enabled: what the vCPUs'
/// creation waits for.
pub enum TrackerPlan {
    Bitmap,
    Ring { entries: u32 },
    Ebpf { entries: u32, bitmap: BpfVmBitmap },
}

impl TrackerPlan {
    /// Builds the tracker over `vm`'s `vcpus` (mapping their rings and starting
    /// the ring's harvester, if it has one). Logging is off.
    pub fn start(
        self,
        vm: &Arc<KvmVm>,
        memory: &GuestMemory,
        vcpus: &[KvmVcpu],
    ) -> Result<Arc<dyn DirtyTracker>, DirtyError> {
        let rings = |entries: u32| vcpus.iter().map(|v| v.map_dirty_ring(entries)).collect::<Result<Vec<_>, _>>();
        Ok(match self {
            TrackerPlan::Bitmap => Arc::new(BitmapTracker::new(Arc::clone(vm), memory.size())),
            TrackerPlan::Ring { entries } => RingTracker::start(Arc::clone(vm), rings(entries)?, memory, true)?,
            TrackerPlan::Ebpf { entries, bitmap } => {
                // The ring is only drained: its pushes are what the program sees.
                let ring = RingTracker::start(Arc::clone(vm), rings(entries)?, memory, false)?;
                Arc::new(EbpfTracker::new(Arc::clone(vm), bitmap, ring))
            }
        })
    }
}
