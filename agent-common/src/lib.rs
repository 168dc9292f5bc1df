//! Types shared between the PostCopyFT host agent and its eBPF programs
//! (`agent-ebpf`). Everything here is `no_std`, `#[repr(C)]` and plain data so
//! that the kernel side and user space read the same bytes.
#![no_std]

/// Size of a guest page as the dirty trackers count it.
pub const PAGE_SIZE: u64 = 4096;

/// Identifies one guest page: the KVM memslot and the page's frame offset
/// inside it, as `kvm:kvm_dirty_ring_push` reports them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotPage {
    /// `as_id << 16 | slot id`, as KVM encodes it.
    pub slot: u32,
    pub _pad: u32,
    /// Guest frame number minus the memslot's base frame.
    pub offset: u64,
}

/// Field offsets in the `kvm:kvm_dirty_ring_push` record (its tracefs format
/// file; docs/host.md): the memslot and the page in it.
pub const PUSH_SLOT_OFFSET: usize = 20;
pub const PUSH_PAGE_OFFSET: usize = 24;

/// VMs the eBPF tracker follows at once, per agent.
pub const MAX_VMS: u32 = 32;
/// vCPU threads it follows at once (all VMs together).
pub const MAX_VCPU_THREADS: u32 = 1024;
/// Memslots it follows (all VMs together).
pub const MAX_SLOTS: u32 = 1024;
/// 64-bit words of the shared dirty bitmap: one bit per guest page, 2^22 words
/// = 256 Mi pages = 1 TiB of guest memory across all followed VMs (a 32 MiB map).
pub const BITMAP_WORDS: u32 = 1 << 22;

/// Key of the memslot map: which VM, and KVM's slot number (`as_id << 16 | id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    /// The VM's index in the tracker (see `VcpuThread`).
    pub vm: u32,
    pub slot: u32,
}

/// Where a memslot's pages live in the shared dirty bitmap.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotBits {
    /// Index of the slot's first 64-bit word in the bitmap (its page 0 is bit 0 of it).
    pub first_word: u32,
    /// Pages in the memslot: pushes at or past this are counted as misses.
    pub pages: u32,
}

/// Per-CPU counters, by index in the counter array.
pub mod counters {
    /// Pushes from followed vCPU threads (for dirty rates); index `vm`.
    pub const PUSHES_BASE: u32 = 0;
    /// Pushes of followed threads whose memslot or page the agent did not register.
    pub const MISSES: u32 = super::MAX_VMS;
    /// Entries in the counter array.
    pub const COUNT: u32 = super::MAX_VMS + 1;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding holes that matter; any bytes are valid.
    unsafe impl aya::Pod for super::SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotBits {}
}
