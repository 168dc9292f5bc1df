//! Fault injection, for tests, the demo and `cargo xtask chaos` (hidden agent
//! flags; nothing here runs unless armed): [`crash`] points where an agent
//! crashes, freezes or stalls, [`frame_trace`] of the frames a guest sends,
//! and below, the stall-fence hooks inside the VMM.
//!
//! `stall-fence`: the scheduling accidents that the fence must survive, made
//! to happen on purpose. Once triggered (at a crash point, see
//! [`crash`]), every vCPU thread that next passes its fence check
//! stops for the configured hold right between the check and `KVM_RUN` (as if
//! the thread were descheduled or the process stopped there), and the lease
//! watchdog stops for as long once. A fence that relied on the check alone or
//! on the watchdog's timing lets the guest run past the lease; the real one
//! (immediate_exit set by the kick handler, and a kernel timer per vCPU
//! thread) does not.

pub mod crash;
pub mod frame_trace;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

static HOLD_MS: AtomicU64 = AtomicU64::new(0);
static PARTIAL_RESUME: AtomicBool = AtomicBool::new(false);
static NO_OUTPUT_COMMIT: AtomicBool = AtomicBool::new(false);
static TRIGGERED: AtomicBool = AtomicBool::new(false);
static WATCHDOG_HELD: AtomicBool = AtomicBool::new(false);

thread_local! {
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// Arms `stall-fence` with this hold (it fires once [`trigger_stall_fence`] is called).
pub fn arm_stall_fence(hold: Duration) {
    HOLD_MS.store(hold.as_millis().max(1) as u64, Ordering::SeqCst);
}

/// The crash point was reached: the holds begin.
pub fn trigger_stall_fence() {
    if HOLD_MS.load(Ordering::SeqCst) > 0 {
        tracing::warn!(hold_ms = HOLD_MS.load(Ordering::SeqCst), "stall-fence: vCPUs and the lease watchdog stall");
        TRIGGERED.store(true, Ordering::SeqCst);
    }
}

fn hold() -> Option<Duration> {
    TRIGGERED.load(Ordering::SeqCst).then(|| Duration::from_millis(HOLD_MS.load(Ordering::SeqCst)))
}

/// A vCPU thread passed its fence check and is about to enter the guest.
pub fn between_fence_check_and_entry() {
    if let Some(hold) = hold() {
        if !HELD.with(|held| held.replace(true)) {
            std::thread::sleep(hold);
        }
    }
}

/// The lease watchdog is about to look at the deadline again.
pub fn watchdog_delay() {
    if let Some(hold) = hold() {
        if !WATCHDOG_HELD.swap(true, Ordering::SeqCst) {
            std::thread::sleep(hold);
        }
    }
}

/// `pcft agent --fail-resume` (hidden): the next resume of a machine with more
/// than one vCPU starts vCPU 0 and then fails, once: a destination whose VM
/// runs in part while the migration fails must still stop it before it says so.
pub fn arm_partial_resume() {
    PARTIAL_RESUME.store(true, Ordering::SeqCst);
}

/// Whether this resume fails half-way (true once, when armed).
pub fn resume_fails_half_way() -> bool {
    PARTIAL_RESUME.swap(false, Ordering::SeqCst)
}

/// `pcft agent --no-output-commit` (hidden): a PostCopyFT destination sends
/// its guest's network frames at once instead of holding them until their
/// checkpoint commits, so a test can show what output commit prevents
/// (acknowledgements of writes that a failover then undoes).
pub fn disable_output_commit() {
    NO_OUTPUT_COMMIT.store(true, Ordering::SeqCst);
}

/// Whether network output commit is off (see [`disable_output_commit`]).
pub fn output_commit_disabled() -> bool {
    NO_OUTPUT_COMMIT.load(Ordering::SeqCst)
}

/// Whether the destination has gone silent on purpose (stall-fence): it writes nothing more to the source.
pub fn silenced() -> bool {
    TRIGGERED.load(Ordering::SeqCst)
}
