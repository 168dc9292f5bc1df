//! The PostCopyFT destination's lease, enforced on the vCPU threads themselves.
//!
//! The fence is one state word ([`state`]): `Armed(deadline)`, then `Tripped`
//! or `Disarmed` for good. A vCPU enters the guest only after it has marked
//! itself "entering" and then found the fence armed before its deadline; the
//! watchdog trips the fence at the deadline and then kicks every vCPU that is
//! marked, until none is. Because a vCPU marks itself before it checks, and the
//! watchdog trips before it looks at the marks, one of the two always sees the
//! other (each side's second access is a read-modify-write, see
//! `state::FenceState::update`): either the vCPU sees the trip and stays out,
//! or the watchdog sees the mark and kicks it out. A kick that lands
//! between the check and `KVM_RUN` is not lost either: the kick handler sets
//! the vCPU's `immediate_exit`, so `KVM_RUN` returns at once. And each vCPU
//! thread arms a kernel timer of its own at the deadline, so a process that was
//! frozen (SIGSTOP, a stalled host) past its deadline takes the kick before it
//! runs another instruction of its own when it wakes, whichever thread the
//! scheduler wakes first. The deadline is on `CLOCK_BOOTTIME`, which goes on
//! while the host is suspended. See docs/architecture.md, "Fencing".

pub mod state;
mod sync;

use crate::clock::BootTime;
pub use state::FencePhase;
use state::{FenceState, VcpuMarks};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Fence {
    state: FenceState,
    /// Set from before each vCPU's fence check until it is out of `KVM_RUN`.
    marks: VcpuMarks,
}

impl Fence {
    pub fn new(deadline: BootTime) -> Arc<Fence> {
        Arc::new(Fence { state: FenceState::new(deadline.as_micros()), marks: VcpuMarks::default() })
    }

    /// Moves the deadline later (never earlier), unless the fence already tripped or was disarmed.
    pub fn extend(&self, deadline: BootTime) {
        self.state.extend(deadline.as_micros());
    }

    pub fn phase(&self) -> FencePhase {
        self.state.phase()
    }

    /// The deadline while armed.
    pub fn deadline(&self) -> Option<BootTime> {
        match self.phase() {
            FencePhase::Armed { deadline_us } => Some(BootTime::from_since_boot(Duration::from_micros(deadline_us))),
            _ => None,
        }
    }

    /// The VM is this host's alone now: no deadline any more. Refused (false)
    /// once the deadline has passed or the fence tripped: the lease ran out
    /// first, and the source may be restoring its copy.
    pub fn disarm(&self) -> bool {
        self.state.disarm_at(BootTime::now().as_micros())
    }

    /// Whether the VM may run now. Once the deadline has passed this stays false for good.
    pub fn allows_running(&self) -> bool {
        self.state.allows_running_at(BootTime::now().as_micros())
    }

    /// Stops the VM for good now (the migration failed here): true unless it was disarmed first.
    pub fn trip(&self) -> bool {
        self.state.trip()
    }

    pub fn tripped(&self) -> bool {
        self.phase() == FencePhase::Tripped
    }

    /// vCPU `id` is about to check the fence and enter the guest: it must call
    /// [`left`](Self::left) once it is out of `KVM_RUN` (or decided not to enter).
    pub fn entering(&self, id: u8) {
        self.marks.entering(id);
    }

    pub fn left(&self, id: u8) {
        self.marks.left(id);
    }
}

/// How often, at most, the watchdog looks at an armed fence's deadline (it
/// sleeps until the deadline if that comes sooner; the vCPUs' own timers
/// stop them on time in any case).
const WATCH_INTERVAL: Duration = Duration::from_millis(5);
/// How often the watchdog kicks vCPUs still marked inside after a trip.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// Trips the fence at its deadline and then kicks the vCPU threads (kernel
/// thread ids of this process, indexed by vCPU id) out of `KVM_RUN` until none
/// is marked inside. It watches until then, or until the fence is disarmed or
/// the machine stops; a deadline that moves later while it sleeps is simply
/// read again (it never gives up on an extended deadline).
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(fence: Arc<Fence>, vcpu_tids: Vec<u32>) -> std::io::Result<Watchdog> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // Its lines carry the span it was started in (the migration's: which VM).
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new().name("lease-watchdog".into()).spawn(move || {
            let _span = span.entered();
            let mut logged = false;
            while !flag.load(Ordering::SeqCst) {
                match fence.phase() {
                    FencePhase::Disarmed => return,
                    FencePhase::Armed { .. } if fence.allows_running() => {
                        crate::fault::watchdog_delay();
                        let left =
                            fence.deadline().map_or(Duration::ZERO, |d| d.saturating_duration_since(BootTime::now()));
                        std::thread::sleep(left.clamp(Duration::from_micros(100), WATCH_INTERVAL));
                        continue;
                    }
                    _ => {}
                }
                // Tripped: kick whoever may still be inside until nobody is.
                if !logged {
                    tracing::warn!("fence tripped (the lease ran out, or this copy was stopped for good): vCPUs kept out of the guest");
                    logged = true;
                }
                let mut anyone_inside = false;
                for (id, &tid) in vcpu_tids.iter().enumerate() {
                    if fence.marks.inside(id as u8) {
                        anyone_inside = true;
                        crate::vmm::kvm::kick::kick_tid(tid);
                    }
                }
                if !anyone_inside {
                    // Every vCPU that marks itself from now on checks the fence after the trip.
                    return;
                }
                std::thread::sleep(KICK_INTERVAL);
            }
        })?;
        Ok(Watchdog { stop, thread: Some(thread) })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_trips_at_its_deadline_and_stays_tripped() {
        let fence = Fence::new(BootTime::now() + Duration::from_millis(30));
        assert!(fence.allows_running());
        fence.extend(BootTime::now() + Duration::from_millis(60));
        fence.extend(BootTime::now()); // never earlier
        std::thread::sleep(Duration::from_millis(40));
        assert!(fence.allows_running(), "extended");
        std::thread::sleep(Duration::from_millis(30));
        assert!(!fence.allows_running());
        fence.extend(BootTime::now() + Duration::from_secs(10));
        assert!(!fence.allows_running(), "a tripped fence stays tripped");
        assert!(fence.tripped());
        assert!(!fence.disarm(), "too late to disarm");
        assert!(!fence.allows_running(), "too late to disarm");

        let fence = Fence::new(BootTime::now() + Duration::from_millis(10));
        assert!(fence.disarm());
        std::thread::sleep(Duration::from_millis(20));
        assert!(fence.allows_running(), "disarmed before its deadline: no deadline");
    }

    #[test]
    fn the_watchdog_outlives_extensions_and_trips_the_last_deadline() {
        // The old watchdog could return for good when an ack extended the
        // deadline just as it expired; this one reads the deadline again.
        let fence = Fence::new(BootTime::now() + Duration::from_millis(30));
        let _watchdog = Watchdog::start(Arc::clone(&fence), Vec::new()).unwrap();
        for _ in 0..20 {
            fence.extend(BootTime::now() + Duration::from_millis(30));
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_ne!(fence.phase(), FencePhase::Tripped, "extended in time, never tripped");
        let last = fence.deadline().expect("armed");
        let until = last + Duration::from_millis(500);
        while fence.phase() != FencePhase::Tripped && BootTime::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(fence.phase(), FencePhase::Tripped, "the watchdog tripped the fence (nobody else looked)");
        assert!(BootTime::now().saturating_duration_since(last) < Duration::from_millis(100));
    }

    use state::FenceState;

    #[test]
    fn the_state_word_moves_one_way() {
        let fence = FenceState::new(100);
        assert!(fence.allows_running_at(99));
        fence.extend(150);
        fence.extend(120); // never earlier
        assert_eq!(fence.phase(), FencePhase::Armed { deadline_us: 150 });
        assert!(fence.allows_running_at(149));
        assert!(!fence.allows_running_at(150));
        assert_eq!(fence.phase(), FencePhase::Tripped);
        fence.extend(1_000);
        assert!(!fence.allows_running_at(0), "a tripped fence stays tripped");
        assert!(!fence.disarm_at(0), "too late to disarm");

        let fence = FenceState::new(100);
        assert!(fence.disarm_at(99));
        assert!(fence.allows_running_at(u64::MAX >> 2), "disarmed: no deadline");
        assert!(!fence.trip(), "a disarmed fence is not tripped");
        assert!(fence.disarm_at(1_000), "disarm is idempotent");

        let fence = FenceState::new(100);
        assert!(!fence.disarm_at(100), "at the deadline it is too late");
        assert_eq!(fence.phase(), FencePhase::Tripped);

        let fence = FenceState::new(100);
        assert!(fence.trip());
        assert!(!fence.allows_running_at(0));
    }
}
