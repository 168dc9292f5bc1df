//! Guest RAM: one anonymous mapping, laid out as one or more KVM memslots.
//!
//! The guest writes this memory from `KVM_RUN` on other threads, so it is
//! handed out as a Rust slice only while nothing writes it ([`PausedView`]:
//! the VM's vCPUs stopped, and the agent's own writers held off); every other
//! access copies through a raw pointer. Reads taken while vCPUs run may see a
//! write half done, exactly as another CPU would; callers that need a
//! consistent image pause the vCPUs first.
//!
//! While the memory is under userfaultfd (a post-copy destination), a page
//! may be missing: an access waits for it, and if the copy dies meanwhile the
//! page may be revoked (`PROT_NONE`, see [`GuestMemory::revoke_pages`]). A
//! plain copy into such a page would kill the whole agent with SIGSEGV, so
//! `read` and `write` then copy through the kernel (`process_vm_readv`/
//! `writev` on this process), which fails the access instead. `read_present`
//! stays a plain copy, for pages known to be there (pages the guest wrote).

use memmap2::{MmapOptions, MmapRaw};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

pub const PAGE_SIZE: u64 = vm_fixtures::abi::PAGE_SIZE;

/// A guest-physical range backed by part of the mapping, registered as one memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSlot {
    pub id: u32,
    pub gpa: u64,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} bytes is not a positive multiple of the 4 KiB page size")]
    Size(u64),
    #[error("memslot size {0} bytes is not a positive multiple of 2 MiB")]
    SlotSize(u64),
    #[error("cannot map {size} bytes of guest memory: {source}; lower --mem or free host memory")]
    Map { size: u64, source: std::io::Error },
    #[error("guest access of {len} bytes at {gpa:#x} is outside guest memory (0..{size:#x})")]
    OutOfRange { gpa: u64, len: u64, size: u64 },
    #[error("guest memory at {gpa:#x} was revoked (a dead post-copy copy's page that never came)")]
    Revoked { gpa: u64 },
    #[error("cannot revoke the guest page at {gpa:#x}: {source}")]
    Revoke { gpa: u64, source: std::io::Error },
    #[error("cannot copy guest memory at {gpa:#x} through the kernel: {source}")]
    Copy { gpa: u64, source: std::io::Error },
}

pub struct GuestMemory {
    map: MmapRaw,
    size: u64,
    slots: Vec<MemSlot>,
    /// Whether any page was revoked (the fast path of every access checks only this).
    any_revoked: AtomicBool,
    /// Revoked pages (sorted guest-physical addresses), inaccessible for good.
    revoked: Mutex<Vec<u64>>,
    /// Whether pages may be missing (under userfaultfd): accesses then copy through the kernel.
    may_be_missing: AtomicBool,
    /// Held shared by every [`PausedView`], exclusive by the agent's writes
    /// that may run while views live ([`hold_views`](GuestMemory::hold_views)).
    views: tokio::sync::RwLock<()>,
}

/// Guest memory handed out as slices, to send pages from without copying them
/// (post-copy at the source: `FrameWriter::write_page_parts`). Nothing writes
/// the memory while a view lives: the VM's vCPUs are stopped (the caller of
/// [`GuestMemory::paused_view`] promises it), and the agent's writers that may
/// run meanwhile wait in [`GuestMemory::hold_views`].
pub struct PausedView<'a> {
    memory: &'a GuestMemory,
    _writers_held_off: tokio::sync::RwLockReadGuard<'a, ()>,
}

impl PausedView<'_> {
    /// The `pages` pages at `gpa`, as they are in guest memory (for as long
    /// as the view lives: it is what holds writers off).
    pub fn pages(&self, gpa: u64, pages: usize) -> Result<&[u8], MemoryError> {
        let len = pages as u64 * PAGE_SIZE;
        let off = self.memory.accessible(gpa, len)?;
        // SAFETY: `accessible` keeps [off, off + len) inside the mapping, which
        // outlives the view (it borrows the memory), and none of it is revoked;
        // no page is missing (a view is only made while the memory is not under
        // userfaultfd); and nothing writes it while the view lives (see the type).
        Ok(unsafe { std::slice::from_raw_parts(self.memory.map.as_ptr().add(off), len as usize) })
    }
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory").field("size", &self.size).field("slots", &self.slots).finish()
    }
}

impl GuestMemory {
    /// Maps `size` bytes of zeroed guest RAM at guest-physical 0, split into
    /// memslots of at most `slot_size` bytes. Pages are allocated on first touch.
    pub fn new(size: u64, slot_size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Size(size));
        }
        if slot_size == 0 || !slot_size.is_multiple_of(2 << 20) {
            return Err(MemoryError::SlotSize(slot_size));
        }
        let map =
            MmapOptions::new().len(size as usize).map_anon().map_err(|source| MemoryError::Map { size, source })?;
        let slots = (0..size.div_ceil(slot_size))
            .map(|i| MemSlot { id: i as u32, gpa: i * slot_size, size: slot_size.min(size - i * slot_size) })
            .collect();
        Ok(GuestMemory {
            map: MmapRaw::from(map),
            size,
            slots,
            any_revoked: AtomicBool::new(false),
            revoked: Mutex::new(Vec::new()),
            may_be_missing: AtomicBool::new(false),
            views: tokio::sync::RwLock::new(()),
        })
    }

    /// A view of this memory as slices (see [`PausedView`]), once no writer
    /// holds views off; None while pages may be missing (they must then be
    /// read through the kernel: [`read`](Self::read)). Only while the VM's
    /// vCPUs are stopped.
    pub async fn paused_view(&self) -> Option<PausedView<'_>> {
        if self.may_be_missing.load(Ordering::SeqCst) {
            return None;
        }
        let held = self.views.read().await;
        Some(PausedView { memory: self, _writers_held_off: held })
    }

    /// Waits until no [`PausedView`] lives and holds new ones off until the
    /// guard drops: for a writer of this memory that may run while pages are
    /// sent from it (a PostCopyFT checkpoint's commit at the source). From a
    /// thread of its own (it blocks), never from an async task.
    pub fn hold_views(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.views.blocking_write()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn slots(&self) -> &[MemSlot] {
        &self.slots
    }

    /// The one guest-address range check: `[gpa, gpa + len)` lies inside guest
    /// memory (else [`MemoryError::OutOfRange`], also when the end overflows).
    /// Returns the range's offset in the mapping.
    pub fn check(&self, gpa: u64, len: u64) -> Result<usize, MemoryError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(gpa as usize),
            _ => Err(MemoryError::OutOfRange { gpa, len, size: self.size }),
        }
    }

    /// [`check`](Self::check), and none of the range's pages is revoked (else
    /// [`MemoryError::Revoked`]): what the agent's own accesses ask.
    fn accessible(&self, gpa: u64, len: u64) -> Result<usize, MemoryError> {
        let offset = self.check(gpa, len)?;
        if self.any_revoked.load(Ordering::Acquire) && len > 0 {
            let revoked = self.revoked.lock().expect("revoked pages lock");
            let first = revoked.partition_point(|&page| page + PAGE_SIZE <= gpa);
            if let Some(&page) = revoked.get(first).filter(|&&page| page < gpa + len) {
                return Err(MemoryError::Revoked { gpa: page });
            }
        }
        Ok(offset)
    }

    /// Makes the pages at `gpas` inaccessible for good (`PROT_NONE`). For a
    /// dead post-copy copy: a vCPU blocked on a page that will never come then
    /// faults out of `KVM_RUN` when the memory leaves userfaultfd, instead of
    /// completing its instruction on a zero page after the lease ran out. The
    /// agent's own accesses to these pages fail with [`MemoryError::Revoked`].
    /// Whether the page at `gpa` was revoked.
    pub fn is_revoked(&self, gpa: u64) -> bool {
        self.any_revoked.load(Ordering::Acquire)
            && self.revoked.lock().expect("revoked pages lock").binary_search(&(gpa & !(PAGE_SIZE - 1))).is_ok()
    }

    pub fn revoke_pages(&self, gpas: &[u64]) -> Result<(), MemoryError> {
        let mut revoked = self.revoked.lock().expect("revoked pages lock");
        for &gpa in gpas {
            let off = self.accessible(gpa & !(PAGE_SIZE - 1), PAGE_SIZE)?;
            // SAFETY: one whole page inside the live mapping; PROT_NONE changes only
            // its protection, and every access of the agent's checks `revoked` first.
            let rc =
                unsafe { libc::mprotect(self.map.as_mut_ptr().add(off).cast(), PAGE_SIZE as usize, libc::PROT_NONE) };
            if rc != 0 {
                return Err(MemoryError::Revoke { gpa, source: std::io::Error::last_os_error() });
            }
            if let Err(at) = revoked.binary_search(&(off as u64)) {
                revoked.insert(at, off as u64);
            }
        }
        self.any_revoked.store(!revoked.is_empty(), Ordering::Release);
        Ok(())
    }

    /// Host address of guest-physical `gpa` (for registering memslots).
    pub(crate) fn host_address(&self, gpa: u64) -> Result<u64, MemoryError> {
        let off = self.accessible(gpa, 0)?;
        Ok(self.map.as_mut_ptr() as u64 + off as u64)
    }

    /// Whether pages may be missing: set while the memory is registered with
    /// userfaultfd (by `uffd::FaultRegion`), so that accesses copy through the kernel.
    pub(crate) fn set_may_be_missing(&self, on: bool) {
        self.may_be_missing.store(on, Ordering::SeqCst);
    }

    /// Copies guest memory at `gpa` into `buf` (through the kernel while pages
    /// may be missing: a page revoked while this waited for it fails the read).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if !self.may_be_missing.load(Ordering::SeqCst) {
            return self.read_present(gpa, buf);
        }
        let off = self.accessible(gpa, buf.len() as u64)?;
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: the remote range is `accessible`'s, inside our own live mapping (process_vm_readv
        // only reads it, and fails on a page it cannot reach); `local` is `buf`, which it fills.
        let remote = libc::iovec { iov_base: unsafe { self.map.as_mut_ptr().add(off) }.cast(), iov_len: buf.len() };
        // SAFETY: both iovecs describe memory that lives across the call; the result is checked.
        let copied = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        kernel_copied(gpa, copied, buf.len())
    }

    /// Copies guest memory at `gpa` into `buf` directly: only for pages that
    /// are known to be there (the guest wrote them), such as a checkpoint's.
    pub fn read_present(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.accessible(gpa, buf.len() as u64)?;
        // SAFETY: `accessible` keeps [off, off + len) inside the live mapping, and
        // `buf` is a distinct Rust allocation, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa` (through the kernel while pages
    /// may be missing: a page revoked while this waited for it fails the write).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.accessible(gpa, data.len() as u64)?;
        if !self.may_be_missing.load(Ordering::SeqCst) {
            // SAFETY: `accessible` keeps the range inside the live, writable mapping;
            // `data` is a distinct allocation.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(off), data.len()) };
            return Ok(());
        }
        let local = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
        // SAFETY: the remote range is `accessible`'s, inside our own live mapping; process_vm_writev
        // fails on a page it cannot reach; `local` is `data`, which it only reads.
        let remote = libc::iovec { iov_base: unsafe { self.map.as_mut_ptr().add(off) }.cast(), iov_len: data.len() };
        // SAFETY: both iovecs describe memory that lives across the call; the result is checked.
        let copied = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
        kernel_copied(gpa, copied, data.len())
    }

    /// Drops the page at `gpa` (`MADV_DONTNEED`): it reads as zero again, and
    /// under userfaultfd its next access faults as missing.
    pub fn discard_page(&self, gpa: u64) -> Result<(), MemoryError> {
        self.discard(gpa, PAGE_SIZE)
    }

    /// Drops the whole pages of `[gpa, gpa + len)` in one call (see [`discard_page`](Self::discard_page)).
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let off = self.accessible(gpa, len)?;
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::OutOfRange { gpa, len, size: self.size });
        }
        // SAFETY: whole, page-aligned pages inside the live private anonymous
        // mapping; MADV_DONTNEED only drops their contents, never the mapping.
        let rc = unsafe { libc::madvise(self.map.as_mut_ptr().add(off).cast(), len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(MemoryError::Map { size: len, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Drops every page in `gpas` (sorted), one call per run of consecutive pages.
    pub fn discard_pages(&self, gpas: &[u64]) -> Result<(), MemoryError> {
        let mut i = 0;
        while i < gpas.len() {
            let mut j = i + 1;
            while j < gpas.len() && gpas[j] == gpas[j - 1] + PAGE_SIZE {
                j += 1;
            }
            self.discard(gpas[i], (j - i) as u64 * PAGE_SIZE)?;
            i = j;
        }
        Ok(())
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), MemoryError> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Visits `range` in chunks of up to `chunk` bytes (a multiple of the page
    /// size), each copied into one reused buffer: bounded memory for any size.
    pub fn for_each_chunk<E>(
        &self,
        range: Range<u64>,
        chunk: usize,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<MemoryError>,
    {
        self.accessible(range.start, range.end.saturating_sub(range.start))?;
        let mut buf = vec![0u8; chunk];
        let mut gpa = range.start;
        while gpa < range.end {
            let len = chunk.min((range.end - gpa) as usize);
            self.read(gpa, &mut buf[..len])?;
            f(gpa, &buf[..len])?;
            gpa += len as u64;
        }
        Ok(())
    }
}

/// The outcome of a kernel copy of `len` bytes at `gpa` that returned `copied`.
fn kernel_copied(gpa: u64, copied: isize, len: usize) -> Result<(), MemoryError> {
    if copied == len as isize {
        return Ok(());
    }
    let at = gpa + copied.max(0) as u64;
    let source = std::io::Error::last_os_error();
    if copied >= 0 || source.raw_os_error() == Some(libc::EFAULT) {
        // A page it could not reach: one revoked while the access waited for it.
        return Err(MemoryError::Revoked { gpa: at & !(PAGE_SIZE - 1) });
    }
    Err(MemoryError::Copy { gpa: at, source })
}

/// Whether `bytes` are all zero (vectorizes: no early exit inside a 64-byte block).
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    let zero_blocks = blocks.by_ref().all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    zero_blocks && blocks.remainder().iter().all(|&b| b == 0)
}

/// Appends the guest-physical address of every page set in a KVM dirty
/// `bitmap` (bit i of word w: page `64w + i`) of the memslot at `slot_gpa`.
pub fn dirty_bitmap_pages(slot_gpa: u64, bitmap: &[u64], out: &mut Vec<u64>) {
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            out.push(slot_gpa + (w as u64 * 64 + bit) * PAGE_SIZE);
            bits &= bits - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view shows memory as it is, refuses ranges outside it or revoked,
    /// and a writer that holds views off waits for the live one to end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_view_shows_memory_and_holds_writers_off_while_it_lives() {
        let mem = std::sync::Arc::new(GuestMemory::new(4 << 20, 2 << 20).unwrap());
        mem.write(PAGE_SIZE, &[7; PAGE_SIZE as usize]).unwrap();
        let view = mem.paused_view().await.expect("not under userfaultfd");
        let pages = view.pages(0, 2).unwrap();
        assert!(
            pages[..PAGE_SIZE as usize].iter().all(|&b| b == 0) && pages[PAGE_SIZE as usize..].iter().all(|&b| b == 7)
        );
        assert!(matches!(view.pages((4 << 20) - PAGE_SIZE, 2), Err(MemoryError::OutOfRange { .. })));

        let (held, writer) = (std::sync::Arc::new(AtomicBool::new(false)), std::sync::Arc::clone(&mem));
        let flag = std::sync::Arc::clone(&held);
        let writing = std::thread::spawn(move || {
            let _held = writer.hold_views();
            flag.store(true, Ordering::SeqCst);
            writer.write(PAGE_SIZE, &[8; PAGE_SIZE as usize]).unwrap();
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!held.load(Ordering::SeqCst), "a writer got in while a view lived");
        assert!(pages[PAGE_SIZE as usize..].iter().all(|&b| b == 7));
        drop(view);
        writing.join().unwrap();
        assert!(held.load(Ordering::SeqCst));
        assert_eq!(mem.paused_view().await.unwrap().pages(PAGE_SIZE, 1).unwrap()[0], 8);

        mem.revoke_pages(&[2 * PAGE_SIZE]).unwrap();
        let view = mem.paused_view().await.unwrap();
        assert!(matches!(view.pages(PAGE_SIZE, 2), Err(MemoryError::Revoked { gpa }) if gpa == 2 * PAGE_SIZE));
        drop(view);
        mem.set_may_be_missing(true);
        assert!(mem.paused_view().await.is_none(), "no view while pages may be missing");
    }

    #[test]
    fn splits_into_slots_and_bounds_accesses() {
        let mem = GuestMemory::new(10 << 20, 4 << 20).unwrap();
        let slots: Vec<_> = mem.slots().iter().map(|s| (s.gpa, s.size)).collect();
        assert_eq!(slots, vec![(0, 4 << 20), (4 << 20, 4 << 20), (8 << 20, 2 << 20)]);
        mem.write_u64((10 << 20) - 8, 42).unwrap();
        assert_eq!(mem.read_u64((10 << 20) - 8).unwrap(), 42);
        assert!(matches!(mem.write_u64((10 << 20) - 4, 1), Err(MemoryError::OutOfRange { .. })));
        assert!(matches!(mem.read_u64(u64::MAX - 2), Err(MemoryError::OutOfRange { .. })));
        assert!(matches!(GuestMemory::new(4097, 2 << 20), Err(MemoryError::Size(4097))));
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut page = vec![0u8; 4096 + 3];
        assert!(is_zero(&page));
        for i in [0, 63, 64, 4095, 4098] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
    }

    #[test]
    fn dirty_bitmaps_become_page_addresses() {
        let mut pages = Vec::new();
        dirty_bitmap_pages(1 << 30, &[0b101, 0, 1 << 63], &mut pages);
        assert_eq!(pages, vec![1 << 30, (1 << 30) + 2 * 4096, (1 << 30) + 191 * 4096]);
    }

    #[test]
    fn discarded_pages_read_as_zero() {
        let mem = GuestMemory::new(2 << 20, 2 << 20).unwrap();
        mem.write_u64(8192, 5).unwrap();
        mem.write_u64(12288, 6).unwrap();
        mem.discard_page(8192).unwrap();
        assert_eq!(mem.read_u64(8192).unwrap(), 0);
        assert_eq!(mem.read_u64(12288).unwrap(), 6);
        for page in [1u64, 2, 3, 7] {
            mem.write_u64(page * 4096, page).unwrap();
        }
        mem.discard_pages(&[4096, 8192, 28672]).unwrap();
        let left: Vec<u64> = [1u64, 2, 3, 7].iter().map(|p| mem.read_u64(p * 4096).unwrap()).collect();
        assert_eq!(left, vec![0, 0, 3, 0]);
    }

    #[test]
    fn chunks_cover_the_range_once() {
        let mem = GuestMemory::new(2 << 20, 2 << 20).unwrap();
        mem.write(4096 * 5, b"hello").unwrap();
        let mut seen = Vec::new();
        mem.for_each_chunk::<MemoryError>(4096..4096 * 7, 8192, |gpa, bytes| {
            seen.push((gpa, bytes.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(4096, 8192), (4096 * 3, 8192), (4096 * 5, 8192)]);
    }
}
