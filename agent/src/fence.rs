//! The PostCopyFT destination's lease, enforced on the vCPU threads themselves:
//! a vCPU never enters the guest once the deadline has passed, and a watchdog
//! thread kicks the vCPUs out of `KVM_RUN` at the deadline. So the guest stops
//! on time even if the agent's async side is starved or the whole process was
//! frozen (SIGSTOP, a stalled host) past the deadline: on waking, each vCPU
//! checks before it runs another instruction. See docs/architecture.md, "Fencing".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Fence {
    base: Instant,
    /// Microseconds after `base` past which the VM must not run.
    deadline_us: AtomicU64,
    tripped: AtomicBool,
    /// The lease is no longer needed (the migration completed): no deadline.
    disarmed: AtomicBool,
}

impl Fence {
    pub fn new(deadline: Instant) -> Arc<Fence> {
        let base = Instant::now();
        let fence = Fence {
            base,
            deadline_us: AtomicU64::new(0),
            tripped: AtomicBool::new(false),
            disarmed: AtomicBool::new(false),
        };
        fence.extend(deadline);
        Arc::new(fence)
    }

    /// Moves the deadline later (never earlier), unless the fence already tripped.
    pub fn extend(&self, deadline: Instant) {
        let us = deadline.saturating_duration_since(self.base).as_micros() as u64;
        self.deadline_us.fetch_max(us, Ordering::SeqCst);
    }

    pub fn deadline(&self) -> Instant {
        self.base + Duration::from_micros(self.deadline_us.load(Ordering::SeqCst))
    }

    /// The VM is this host's alone now: no deadline any more. Refused (false)
    /// once the deadline has passed: the lease ran out first, and the source
    /// may be restoring its copy.
    pub fn disarm(&self) -> bool {
        if !self.allows_running() {
            return false;
        }
        self.disarmed.store(true, Ordering::SeqCst);
        true
    }

    fn disarmed(&self) -> bool {
        self.disarmed.load(Ordering::SeqCst)
    }

    /// Whether the VM may run now. Once the deadline has passed this stays false for good.
    pub fn allows_running(&self) -> bool {
        if self.tripped.load(Ordering::SeqCst) {
            return false;
        }
        if self.disarmed() {
            return true;
        }
        if Instant::now() >= self.deadline() {
            self.tripped.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }
}

/// Kicks the given vCPU threads (kernel thread ids of this process) out of
/// `KVM_RUN` once the fence's deadline passes, so that they see it.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(fence: Arc<Fence>, vcpu_tids: Vec<u32>) -> std::io::Result<Watchdog> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("lease-watchdog".into()).spawn(move || {
            while !flag.load(Ordering::SeqCst) && !fence.disarmed() {
                let left = fence.deadline().saturating_duration_since(Instant::now());
                if left.is_zero() {
                    fence.allows_running(); // trips it
                    for &tid in &vcpu_tids {
                        crate::kvm::kick::kick_tid(tid);
                    }
                    tracing::warn!("lease expired: vCPUs stopped (fenced)");
                    return;
                }
                std::thread::sleep(left.min(Duration::from_millis(5)));
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
        let fence = Fence::new(Instant::now() + Duration::from_millis(30));
        assert!(fence.allows_running());
        fence.extend(Instant::now() + Duration::from_millis(60));
        fence.extend(Instant::now()); // never earlier
        std::thread::sleep(Duration::from_millis(40));
        assert!(fence.allows_running(), "extended");
        std::thread::sleep(Duration::from_millis(30));
        assert!(!fence.allows_running());
        fence.extend(Instant::now() + Duration::from_secs(10));
        assert!(!fence.allows_running(), "a tripped fence stays tripped");
        assert!(fence.tripped());
        assert!(!fence.disarm(), "too late to disarm");
        assert!(!fence.allows_running(), "too late to disarm");

        let fence = Fence::new(Instant::now() + Duration::from_millis(10));
        assert!(fence.disarm());
        std::thread::sleep(Duration::from_millis(20));
        assert!(fence.allows_running(), "disarmed before its deadline: no deadline");
    }
}
