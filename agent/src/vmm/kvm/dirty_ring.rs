//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): one ring of dirtied guest
//! frames per vCPU, shared with the kernel through an mmap of the vCPU fd.
//! kvm-ioctls does not wrap it, so this is the edge: the mapping and the harvest
//! (acquire/release on each entry's flags, as the kernel's ABI asks). The
//! VM-level reset that recycles harvested entries is `KvmVm::reset_dirty_rings`.

use super::error::KvmError;
use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;

/// One vCPU's ring, mapped.
pub struct DirtyRing {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// The next entry to harvest (free-running; the slot is `fetch % count`).
    fetch: u32,
}

// SAFETY: the mapping is shared memory that the kernel and any thread may
// access; every access to an entry goes through the atomic flags protocol
// in `harvest`, and `&mut self` serializes harvesters.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `count` entries (a power of two) of the vCPU `vcpu_fd`.
    pub(super) fn map(vcpu_fd: RawFd, count: u32) -> Result<Self, KvmError> {
        let len = count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * 4096;
        // SAFETY: a fresh shared mapping of the vCPU fd at the offset the KVM
        // API documents for the dirty ring; the result is checked below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, vcpu_fd, offset)
        };
        if ptr == libc::MAP_FAILED {
            return Err(KvmError::Unsupported(format!(
                "cannot map the vCPU's dirty ring: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(DirtyRing { entries: ptr.cast(), count, fetch: 0 })
    }

    /// Collects every entry the kernel has published since the last harvest as
    /// `(slot, page offset in the slot)` and hands the entries back to the kernel
    /// (call `KvmVm::reset_dirty_rings` afterwards to let it reuse them). Returns how many.
    pub fn harvest(&mut self, out: &mut Vec<(u32, u64)>) -> usize {
        let mut n = 0;
        loop {
            // SAFETY: the index is below `count`, inside the mapping.
            let entry = unsafe { self.entries.add((self.fetch % self.count) as usize) };
            // SAFETY: `flags` is an aligned u32 inside the live mapping; the
            // kernel publishes an entry with a release store of DIRTY.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return n;
            }
            // SAFETY: the acquire load above orders these reads after the
            // kernel's writes of the entry.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            out.push((slot, offset));
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.entries.cast(), len) };
    }
}
