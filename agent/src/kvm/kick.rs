//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal with an empty
//! handler, installed without `SA_RESTART`, makes the ioctl return `EINTR`.

use std::sync::Once;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the handler once per process. Must run before the first kick.
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        register_signal_handler(kick_signal(), on_kick).expect("registering the vCPU kick signal handler");
    });
}

/// Sends the kick signal to thread `tid` of this process (a thread that exited is not an error).
pub fn kick_tid(tid: u32) {
    // SAFETY: tgkill(2) on our own thread group with the kick signal, whose handler is empty.
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
