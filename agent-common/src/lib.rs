//! Types shared between the PostCopyFT host agent and its eBPF programs
//! (`agent-ebpf`). Everything here is `no_std`, `#[repr(C)]` and plain data so
//! that the kernel side and user space read the same bytes.
//!
//! The eBPF dirty tracker (a later issue) adds its map keys and values here.
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
