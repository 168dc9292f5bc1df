//! Model checks of the PostCopyFT fence under every interleaving `loom`
//! explores (loom 0.7, its default preemption bound). The file under test,
//! agent/src/fence/state.rs, is compiled here with loom's atomics as its
//! `super::sync`, so what is checked is the agent's own code.
//!
//! 1. Disarm against trip: the destination taking the VM for good (`Finish`)
//!    races the watchdog and a vCPU finding the deadline passed. Exactly one
//!    wins, and nobody sees the other's outcome: if `disarm` said yes, no vCPU
//!    was ever told to stay out; if it said no, the fence is tripped for good.
//! 2. Marks against trip: a vCPU marks itself entering and then checks the
//!    fence; the watchdog trips it and then looks at the marks. A vCPU that
//!    enters the guest after the trip is always kicked.
//!
//! Each property is also checked against the broken version it replaced (the
//! old two-flag `disarm`, and a vCPU that checks before it marks itself): loom
//! must find the counterexample, so the checks can fail.

mod sync {
    pub use loom::sync::atomic::{AtomicU64, Ordering};
}

#[path = "../src/vmm/fence/state.rs"]
#[allow(dead_code)]
mod state;

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use state::{FencePhase, FenceState, VcpuMarks};

const DEADLINE: u64 = 100;
/// A moment before the deadline (when `Finish` arrives) and one after (when the watchdog or a vCPU looks).
const BEFORE: u64 = 99;
const AFTER: u64 = 100;

/// Runs `model` under loom; returns whether some interleaving failed an assertion.
fn finds_a_counterexample(model: impl Fn() + Sync + Send + 'static) -> bool {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loom::model(model))).is_err();
    std::panic::set_hook(previous);
    found
}

/// What the disarm-against-trip model needs of a fence.
trait Lease: Send + Sync + 'static {
    fn allows_running_at(&self, now: u64) -> bool;
    fn disarm_at(&self, now: u64) -> bool;
}

impl Lease for FenceState {
    fn allows_running_at(&self, now: u64) -> bool {
        FenceState::allows_running_at(self, now)
    }
    fn disarm_at(&self, now: u64) -> bool {
        FenceState::disarm_at(self, now)
    }
}

/// Disarm (`Finish`, before the deadline) races a vCPU check and the
/// watchdog, both past the deadline.
fn disarm_against_trip(fence: impl Lease) {
    let fence = Arc::new(fence);
    let vcpu_saw_fenced = Arc::new(AtomicBool::new(false));
    let vcpu = {
        let (fence, saw) = (Arc::clone(&fence), Arc::clone(&vcpu_saw_fenced));
        loom::thread::spawn(move || {
            if !fence.allows_running_at(AFTER) {
                saw.store(true, Ordering::SeqCst);
            }
        })
    };
    let watchdog = {
        let fence = Arc::clone(&fence);
        loom::thread::spawn(move || {
            fence.allows_running_at(AFTER);
        })
    };
    let disarmed = fence.disarm_at(BEFORE);
    vcpu.join().unwrap();
    watchdog.join().unwrap();
    if disarmed {
        assert!(!vcpu_saw_fenced.load(Ordering::SeqCst), "Finished went out, but a vCPU was fenced for good");
        assert!(fence.allows_running_at(u64::MAX >> 2), "disarmed: no deadline");
    } else {
        assert!(!fence.allows_running_at(0), "refused to disarm, yet the fence is not tripped for good");
    }
}

#[test]
fn disarm_and_trip_never_both_win() {
    loom::model(|| {
        disarm_against_trip(FenceState::new(DEADLINE));
    });
}

/// The old fence: `tripped` and `disarmed` flags, and a disarm that checks and then stores.
struct TwoFlagFence {
    tripped: AtomicBool,
    disarmed: AtomicBool,
}

impl Lease for TwoFlagFence {
    fn allows_running_at(&self, now: u64) -> bool {
        if self.tripped.load(Ordering::SeqCst) {
            return false;
        }
        if self.disarmed.load(Ordering::SeqCst) {
            return true;
        }
        if now >= DEADLINE {
            self.tripped.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn disarm_at(&self, now: u64) -> bool {
        if !self.allows_running_at(now) {
            return false;
        }
        self.disarmed.store(true, Ordering::SeqCst);
        true
    }
}

#[test]
fn the_old_check_then_store_disarm_is_caught() {
    let found = finds_a_counterexample(|| {
        disarm_against_trip(TwoFlagFence { tripped: AtomicBool::new(false), disarmed: AtomicBool::new(false) });
    });
    assert!(found, "loom must find the interleaving in which the old disarm loses the VM on both hosts");
}

/// One vCPU entering the guest against the watchdog tripping the fence and
/// kicking marked vCPUs. `mark_first`: the agent's order (mark, then check).
fn marks_against_trip(mark_first: bool) {
    let fence = Arc::new(FenceState::new(DEADLINE));
    let marks = Arc::new(VcpuMarks::default());
    let kicked = Arc::new(AtomicBool::new(false));
    let vcpu = {
        let (fence, marks, kicked) = (Arc::clone(&fence), Arc::clone(&marks), Arc::clone(&kicked));
        loom::thread::spawn(move || {
            // The vCPU's clock still reads before the deadline when it checks.
            if mark_first {
                marks.entering(0);
            }
            let allowed = fence.allows_running_at(BEFORE);
            if !mark_first {
                marks.entering(0);
            }
            if !allowed {
                marks.left(0);
                return None;
            }
            // In the guest: it stays until a kick comes (immediate_exit makes an
            // earlier kick count too). Report whether it entered after the trip.
            let entered_after_trip = fence.phase() == FencePhase::Tripped;
            Some((entered_after_trip, kicked))
        })
    };
    // The watchdog: the deadline passed; trip, then kick whoever is marked.
    fence.allows_running_at(AFTER);
    if marks.inside(0) {
        kicked.store(true, Ordering::SeqCst);
    }
    if let Some((entered_after_trip, kicked)) = vcpu.join().unwrap() {
        // Whether it entered before or after the trip, the guest runs on past the deadline unless kicked.
        let when = if entered_after_trip { "after" } else { "before" };
        assert!(kicked.load(Ordering::SeqCst), "a vCPU entered the guest {when} the trip and nobody kicks it out");
    }
}

#[test]
fn a_vcpu_in_the_guest_after_the_trip_is_always_kicked() {
    loom::model(|| marks_against_trip(true));
}

#[test]
fn checking_before_marking_is_caught() {
    assert!(
        finds_a_counterexample(|| marks_against_trip(false)),
        "loom must find the vCPU that checked, then the watchdog tripped and saw no mark, then the vCPU marked and entered"
    );
}
