//! The userfaultfd edge: guest memory registered for missing-page faults,
//! the faults read, and pages installed atomically. Post-copy's logic sits
//! above this and never touches the fd.

use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use userfaultfd::{Error as RawError, Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: {0}; post-copy needs root (or vm.unprivileged_userfaultfd=1) and a kernel with userfaultfd")]
    Create(String),
    #[error("cannot register guest memory with userfaultfd: {0}")]
    Register(String),
    #[error("reading userfaultfd events failed: {0}")]
    Read(String),
    #[error("installing the page at {gpa:#x} failed: {reason}")]
    Install { gpa: u64, reason: String },
    #[error("page address {0:#x} is outside guest memory or not page aligned")]
    BadAddress(u64),
}

/// A missing-page fault: the page, and the thread blocked on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub gpa: u64,
    /// The faulting thread's kernel id (a vCPU thread, or the VMM's own).
    pub thread: u32,
}

/// What installing a page did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The page was missing and now holds the data; waiting faults were woken.
    Now,
    /// The page was already present; nothing changed.
    AlreadyPresent,
}

/// Guest memory under userfaultfd (MISSING mode): an access to a page that was
/// never installed blocks the accessing thread (a vCPU in `KVM_RUN`, or the
/// VMM itself) until the page is installed.
pub struct FaultRegion {
    uffd: Uffd,
    memory: Arc<GuestMemory>,
    base: u64,
    /// An eventfd that ends a [`FaultRegion::next_fault`] wait early (see [`FaultRegion::wake`]).
    waker: OwnedFd,
}

impl FaultRegion {
    /// Registers all of `memory`. Do it before anything touches the memory.
    pub fn register(memory: Arc<GuestMemory>) -> Result<Self, UffdError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // Faults raised inside the kernel (KVM's accesses for a vCPU) must reach us too.
            .user_mode_only(false)
            // Which thread is blocked on which page: a dead copy's vCPUs are cut off by it.
            .require_features(FeatureFlags::THREAD_ID)
            .create()
            .map_err(|e| UffdError::Create(e.to_string()))?;
        let base = memory.host_address(0).map_err(|_| UffdError::BadAddress(0))?;
        uffd.register_with_mode(base as *mut libc::c_void, memory.size() as usize, RegisterMode::MISSING)
            .map_err(|e| UffdError::Register(e.to_string()))?;
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let waker = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if waker < 0 {
            return Err(UffdError::Create(format!("eventfd: {}", std::io::Error::last_os_error())));
        }
        // SAFETY: `waker` is a fresh fd that nothing else owns.
        let waker = unsafe { OwnedFd::from_raw_fd(waker) };
        // From now on a page may be missing (and later revoked): the VMM's own accesses must not fault on one.
        memory.set_may_be_missing(true);
        Ok(FaultRegion { uffd, memory, base, waker })
    }

    /// Host address of `[gpa, gpa + len)`, which must be whole pages inside guest memory.
    fn host(&self, gpa: u64, len: u64) -> Result<*mut libc::c_void, UffdError> {
        let whole_pages = gpa.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE) && len > 0;
        if !whole_pages || self.memory.check(gpa, len).is_err() {
            return Err(UffdError::BadAddress(gpa));
        }
        Ok((self.base + gpa) as *mut libc::c_void)
    }

    /// Ends the wait of a [`next_fault`](Self::next_fault) now or the next
    /// one (it returns no fault): a fault thread told to stop stops at once.
    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd; a full
        // counter (EAGAIN) means a wake is pending anyway.
        unsafe { libc::write(self.waker.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Waits up to `timeout` for a missing-page fault, or until [`wake`](Self::wake).
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UffdError> {
        let mut pollfds = [
            libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.waker.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let ready = unsafe { libc::poll(pollfds.as_mut_ptr(), 2, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            return if err.kind() == std::io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(UffdError::Read(err.to_string()))
            };
        }
        if pollfds[0].revents == 0 {
            if pollfds[1].revents != 0 {
                let mut count = [0u8; 8];
                // SAFETY: reads 8 bytes into a live buffer from our eventfd (resetting it).
                unsafe { libc::read(self.waker.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
            }
            return Ok(None);
        }
        match self.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, thread_id, .. })) => {
                let offset = (addr as u64).wrapping_sub(self.base);
                Ok(Some(Fault { gpa: offset & !(PAGE_SIZE - 1), thread: thread_id.as_raw() as u32 }))
            }
            Ok(_) => Ok(None),
            Err(RawError::SystemError(e)) if e as i32 == libc::EAGAIN => Ok(None),
            Err(e) => Err(UffdError::Read(e.to_string())),
        }
    }

    /// The faults queued now (without waiting): pages that threads are blocked on.
    pub fn queued_faults(&self) -> Result<Vec<Fault>, UffdError> {
        let mut pages = Vec::new();
        while let Some(gpa) = self.next_fault(Duration::ZERO)? {
            pages.push(gpa);
        }
        Ok(pages)
    }

    /// Installs `data` (whole pages) at `gpa` in one call, if every page is missing.
    /// `AlreadyPresent`: some page of the range was there; nothing is promised
    /// about the others (install them one by one to know).
    pub fn copy(&self, gpa: u64, data: &[u8]) -> Result<Installed, UffdError> {
        let dst = self.host(gpa, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            // SAFETY: [dst, dst + len) is whole pages inside the registered range
            // (checked by `host`); `data` is a live buffer of that length.
            let result =
                unsafe { self.uffd.copy(data[done..].as_ptr().cast(), dst.byte_add(done), data.len() - done, true) };
            match result {
                Ok(n) => done += n,
                // The kernel copied part and asks to retry the rest.
                Err(RawError::PartiallyCopied(n)) => done += n,
                Err(e) => return self.outcome(gpa, data.len(), e),
            }
        }
        Ok(Installed::Now)
    }

    /// Installs zero pages over `[gpa, gpa + len)` in one call, if every page is missing.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<Installed, UffdError> {
        let dst = self.host(gpa, len)?;
        // SAFETY: [dst, dst + len) is whole pages inside the registered range (checked by `host`).
        match unsafe { self.uffd.zeropage(dst, len as usize, true) } {
            Ok(_) => Ok(Installed::Now),
            Err(e) => self.outcome(gpa, len as usize, e),
        }
    }

    /// Installs one page: `data`, or zeros.
    pub fn install_page(&self, gpa: u64, data: Option<&[u8]>) -> Result<Installed, UffdError> {
        match data {
            Some(page) => self.copy(gpa, page),
            None => self.zero(gpa, PAGE_SIZE),
        }
    }

    fn outcome(&self, gpa: u64, len: usize, error: RawError) -> Result<Installed, UffdError> {
        match error {
            RawError::CopyFailed(e) | RawError::ZeropageFailed(e) if e as i32 == libc::EEXIST => {
                // Present already: make sure nobody keeps waiting on the range.
                let _ = self.uffd.wake(self.host(gpa, len as u64)?, len);
                Ok(Installed::AlreadyPresent)
            }
            e => Err(UffdError::Install { gpa, reason: e.to_string() }),
        }
    }
}

impl Drop for FaultRegion {
    fn drop(&mut self) {
        let _ = self.uffd.unregister(self.base as *mut libc::c_void, self.memory.size() as usize);
        self.memory.set_may_be_missing(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory::MemoryError;

    #[test]
    fn a_missing_page_blocks_until_installed() {
        let memory = Arc::new(GuestMemory::new(2 << 20, 2 << 20).unwrap());
        let region = FaultRegion::register(Arc::clone(&memory)).unwrap();
        let reader = {
            let memory = Arc::clone(&memory);
            std::thread::spawn(move || memory.read_u64(0x5008).unwrap())
        };
        let fault = region.next_fault(Duration::from_secs(10)).unwrap().expect("a fault");
        assert_eq!(fault.gpa, 0x5000, "the read faults on its page");
        assert_ne!(fault.thread, std::process::id(), "the reader thread, not the main one");
        let mut page = vec![0u8; 4096];
        page[8..16].copy_from_slice(&0xfeed_u64.to_le_bytes());
        assert_eq!(region.install_page(0x5000, Some(&page)).unwrap(), Installed::Now);
        assert_eq!(reader.join().unwrap(), 0xfeed);
        assert_eq!(region.install_page(0x5000, Some(&page)).unwrap(), Installed::AlreadyPresent);
        assert_eq!(region.install_page(0x6000, None).unwrap(), Installed::Now);
        assert_eq!(memory.read_u64(0x6000).unwrap(), 0);
        assert!(matches!(region.copy(0x5001, &page), Err(UffdError::BadAddress(0x5001))));
        assert_eq!(region.next_fault(Duration::from_millis(10)).unwrap(), None);

        // Runs: three pages in one call; a run over a present page says so.
        let mut run = vec![0u8; 3 * 4096];
        run[2 * 4096] = 9;
        assert_eq!(region.copy(0x10000, &run).unwrap(), Installed::Now);
        assert_eq!(memory.read_u64(0x12000).unwrap(), 9);
        assert_eq!(region.zero(0x20000, 4 * 4096).unwrap(), Installed::Now);
        assert_eq!(region.copy(0x11000, &run[..2 * 4096]).unwrap(), Installed::AlreadyPresent);
    }

    #[test]
    fn a_vmm_access_waiting_for_a_page_that_is_revoked_fails_instead_of_killing_the_agent() {
        let memory = Arc::new(GuestMemory::new(2 << 20, 2 << 20).unwrap());
        let region = FaultRegion::register(Arc::clone(&memory)).unwrap();
        // A device writes a received frame into a guest buffer whose page never came.
        let writer = {
            let memory = Arc::clone(&memory);
            std::thread::spawn(move || memory.write(0x7010, b"a frame for a dead copy"))
        };
        let fault = region.next_fault(Duration::from_secs(10)).unwrap().expect("the write waits for its page");
        assert_eq!(fault.gpa, 0x7000);
        // The copy dies: the page is revoked, and the memory leaves userfaultfd.
        memory.revoke_pages(&[0x7000]).unwrap();
        drop(region);
        match writer.join().expect("the writing thread survives (a plain copy would be a SIGSEGV of the agent)") {
            Err(MemoryError::Revoked { gpa: 0x7000 }) => {}
            other => panic!("expected the write to fail on the revoked page: {other:?}"),
        }
        // Out of userfaultfd, other pages read as zero and the revoked one stays refused.
        assert_eq!(memory.read_u64(0x8000).unwrap(), 0);
        assert!(matches!(memory.read_u64(0x7000), Err(MemoryError::Revoked { gpa: 0x7000 })));
    }

    #[test]
    fn a_wake_ends_a_wait_and_leaves_faults_to_the_next_call() {
        let memory = Arc::new(GuestMemory::new(2 << 20, 2 << 20).unwrap());
        let region = Arc::new(FaultRegion::register(Arc::clone(&memory)).unwrap());
        let waiter = {
            let region = Arc::clone(&region);
            std::thread::spawn(move || {
                let at = std::time::Instant::now();
                (region.next_fault(Duration::from_secs(60)).unwrap(), at.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        region.wake();
        let (fault, waited) = waiter.join().unwrap();
        assert_eq!(fault, None);
        assert!(waited < Duration::from_secs(30), "the wait ran to its timeout: {waited:?}");
        // A fault queued with a wake pending is still read (by this call or the next).
        region.wake();
        let reader = {
            let memory = Arc::clone(&memory);
            std::thread::spawn(move || memory.read_u64(0x3000).unwrap())
        };
        let fault = match region.next_fault(Duration::from_secs(10)).unwrap() {
            Some(fault) => fault,
            None => region.next_fault(Duration::from_secs(10)).unwrap().expect("the fault after the wake"),
        };
        assert_eq!(fault.gpa, 0x3000);
        region.install_page(0x3000, None).unwrap();
        assert_eq!(reader.join().unwrap(), 0);
    }
}
