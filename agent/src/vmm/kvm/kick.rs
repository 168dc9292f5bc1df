//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose handler
//! sets the thread's `kvm_run.immediate_exit` (as QEMU does), installed
//! without `SA_RESTART`. A kick that lands while the thread is in the guest
//! makes `KVM_RUN` return `EINTR`; one that lands just before the thread
//! enters makes the next `KVM_RUN` return at once without running the guest.
//! So no kick is ever lost between a check and the ioctl.
//!
//! [`DeadlineTimer`] sends the same kick to one thread from the kernel at an
//! absolute `CLOCK_BOOTTIME` deadline, so it arrives even while the process is
//! frozen (the signal is pending when it wakes, and handled before the thread
//! runs its own code again).

use crate::clock::BootTime;
use std::cell::Cell;
use std::sync::Once;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's vCPU `immediate_exit` byte (null: the thread runs no vCPU).
    /// Const-initialized with no destructor, so the signal handler may read it.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let byte = IMMEDIATE_EXIT.with(Cell::get);
    if !byte.is_null() {
        // SAFETY: `bind_immediate_exit` stored a pointer into this thread's
        // vCPU's mapped `kvm_run`, and `ImmediateExitBinding` clears it before
        // that mapping can go; a volatile byte store is async-signal-safe.
        unsafe { byte.write_volatile(1) };
    }
}

/// Installs the handler once per process. Must run before the first kick.
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        register_signal_handler(kick_signal(), on_kick).expect("registering the vCPU kick signal handler");
    });
}

/// While alive, kicks to this thread set `immediate_exit` at `byte`.
pub(crate) struct ImmediateExitBinding(());

/// Makes kicks to the calling thread set `*byte`.
///
/// # Safety
/// `byte` must point to the `immediate_exit` field of a `kvm_run` mapping that
/// outlives the returned binding, and the binding must be dropped on this thread.
pub(crate) unsafe fn bind_immediate_exit(byte: *mut u8) -> ImmediateExitBinding {
    IMMEDIATE_EXIT.with(|cell| cell.set(byte));
    ImmediateExitBinding(())
}

impl Drop for ImmediateExitBinding {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// Sends the kick signal to thread `tid` of this process (a thread that exited is not an error).
pub fn kick_tid(tid: u32) {
    // SAFETY: tgkill(2) on our own thread group with the kick signal, whose handler only sets a byte.
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid as libc::pid_t, kick_signal());
    }
}

/// Sends the kick signal to `thread`. A thread that already exited is not an error.
pub fn kick<T>(thread: &std::thread::JoinHandle<T>) {
    if !thread.is_finished() {
        // ESRCH races with the thread's exit and means there is nothing left to kick.
        let _ = thread.kill(kick_signal());
    }
}

/// A POSIX timer that kicks one thread at an absolute `CLOCK_BOOTTIME` deadline.
pub struct DeadlineTimer {
    id: libc::timer_t,
    armed_for: Option<BootTime>,
}

impl DeadlineTimer {
    /// A disarmed timer whose expiry kicks thread `tid` of this process.
    pub fn for_thread(tid: u32) -> std::io::Result<DeadlineTimer> {
        // SAFETY: an all-zero sigevent is a valid value of the plain C struct; the fields used are set below.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        event.sigev_notify_thread_id = tid as libc::c_int;
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: timer_create(2) reads `event` and writes the new timer's id into `id`.
        if unsafe { libc::timer_create(libc::CLOCK_BOOTTIME, &mut event, &mut id) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DeadlineTimer { id, armed_for: None })
    }

    /// Kicks at `deadline` (None: never). Re-arms only when the deadline changed.
    pub fn arm(&mut self, deadline: Option<BootTime>) -> std::io::Result<()> {
        if deadline == self.armed_for {
            return Ok(());
        }
        // A zero it_value disarms; a deadline in the past fires at once.
        let at = deadline.map_or(std::time::Duration::ZERO, |d| d.since_boot().max(std::time::Duration::from_nanos(1)));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: at.as_secs() as libc::time_t,
                tv_nsec: at.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: timer_settime(2) on our own timer with a valid itimerspec; no old value is asked for.
        if unsafe { libc::timer_settime(self.id, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.armed_for = deadline;
        Ok(())
    }
}

impl Drop for DeadlineTimer {
    fn drop(&mut self) {
        // SAFETY: the timer was created by timer_create and is deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}
