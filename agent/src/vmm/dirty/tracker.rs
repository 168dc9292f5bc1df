//! The one interface to a machine's dirty-page tracking, whichever tracker
//! backs it (`BitmapTracker` in bitmap.rs,
//! `RingTracker` in ring.rs or
//! `EbpfTracker` in ebpf.rs), and its error.

use super::bpf::EbpfError;
use crate::vmm::kvm::KvmError;

/// Why a tracker could not start, log, take or sample.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error("cannot start the dirty ring's harvester thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Which pages the guest wrote, per take, and how fast it writes. Writes
/// racing a take on a running machine land in the next take, never nowhere.
/// KVM logs a memslot's writes only while logging is on
/// ([`set_logging`](Self::set_logging)); every tracker starts with it off.
pub trait DirtyTracker: Send + Sync {
    /// Its name in logs, metrics and reports (`bitmap`, `ring`, `ebpf`).
    fn name(&self) -> &'static str;

    /// Turns KVM's dirty logging on or off for every memslot. Turning it on
    /// forgets whatever was collected before.
    fn set_logging(&self, enabled: bool) -> Result<(), DirtyError>;

    /// The pages written since the last take, sorted; they are forgotten.
    fn take(&self) -> Result<Vec<u64>, DirtyError>;

    /// The guest's write rate, in bytes per second, since the previous sample
    /// (or since the tracker started, or logging was turned on). `None`: this
    /// tracker cannot see writes now (the bitmap with logging off). Pages a
    /// sample harvests stay for the next [`take`](Self::take).
    fn sample_rate(&self) -> Result<Option<f64>, DirtyError>;

    /// Writes logged so far, the count [`sample_rate`](Self::sample_rate)
    /// differentiates: ring entries harvested, eBPF pushes, or bitmap pages
    /// harvested (a page counts once per harvest however often it was written).
    fn logged(&self) -> u64;

    /// A vCPU's dirty ring is full: harvest every ring now and return how many
    /// entries that handed back to KVM. `None`: this tracker has no ring.
    fn ring_full(&self) -> Result<Option<usize>, DirtyError>;

    /// Starts following vCPU thread `tid` (the eBPF program tells VMs apart by
    /// their vCPU threads); the other trackers need nothing.
    fn follow_vcpu_thread(&self, tid: u32) -> Result<(), DirtyError>;

    /// Ends the tracker's own thread, if it has one, and waits for it. The
    /// machine calls it once its vCPUs are gone; idempotent.
    fn stop(&self);
}
