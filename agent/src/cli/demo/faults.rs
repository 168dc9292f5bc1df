//! The failures the demo itself applies at a time (`--fail-at Nms`), N ms
//! after the switchover: it cuts or degrades the link between the hosts,
//! resets the migration connection, throttles the source's CPU, or kills
//! (freezes) the destination agent; and what it applied, to undo and report.
//! (Failures at a point of the destination's work the destination agent
//! applies itself: `pcft agent --crash-at`.)

use super::agent_calls::postcopy_started;
use crate::cli::cgroup::CpuThrottle;
use crate::cli::netns::{ResetRule, ResetSide, Testbed};
use crate::cli::FailKind;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the timer applied; once the migration is `over` nothing more is applied.
#[derive(Default)]
struct Injected {
    over: bool,
    /// lossy, reset: how the link between the hosts was degraded, or the reset rule.
    network: Option<String>,
    /// slow-source: the source agent's CPU throttle (released when the migration ends).
    throttle: Option<CpuThrottle>,
    /// slow-source: what the throttle was.
    source_throttle: Option<String>,
    /// reset: the nftables rule in place (removed when the migration ends, or dropped).
    reset: Option<ResetRule>,
}

/// The demo's timer for failures at a time, shared with the task that applies
/// them. What it holds (a throttle, a reset rule) is undone when dropped.
#[derive(Default)]
pub struct FaultTimer {
    injected: Arc<Mutex<Injected>>,
}

/// A failure to apply at a time, and what it needs to.
pub struct TimedFault {
    pub kind: FailKind,
    /// How long after the switchover.
    pub after: Duration,
    /// The source agent's address (to see when post-copy starts).
    pub source: String,
    /// partition, lossy: the hosts' network namespaces.
    pub testbed: Option<Arc<Testbed>>,
    /// lossy: loss in %, delay in ms, the queue's rate in Mbit/s.
    pub loss: u32,
    pub delay_ms: u64,
    pub link_mbit: u64,
    /// slow-source: the source agent's CPU quota, in % of one CPU.
    pub cpu_pct: u32,
    /// reset: whose packets are answered with resets, on the destination's port.
    pub reset_side: ResetSide,
    pub destination_port: u16,
    pub source_pid: u32,
    pub destination_pid: u32,
}

/// What the timer applied that the report tells.
pub struct Applied {
    /// How the link was degraded, or the reset rule.
    pub network: Option<String>,
    /// The source agent's CPU throttle.
    pub source_throttle: Option<String>,
}

impl FaultTimer {
    /// Spawns (on the current tokio runtime) the task that applies `fault`
    /// once post-copy has run for `fault.after`, unless the migration is over by then.
    pub fn arm(&self, fault: TimedFault) {
        let injected = Arc::clone(&self.injected);
        tokio::spawn(async move {
            // N ms after the switchover: the VM runs at the destination by then.
            if !postcopy_started(&fault.source).await {
                return;
            }
            tokio::time::sleep(fault.after).await;
            let mut injected = injected.lock().expect("injection lock");
            if injected.over {
                return;
            }
            apply(&fault, &mut injected);
        });
    }

    /// The migration is over: nothing more is applied from now on. Hands back
    /// the reset rule in place, if any (dropping it removes it).
    pub fn stop(&self) -> Option<ResetRule> {
        let mut injected = self.injected.lock().expect("injection lock");
        injected.over = true;
        injected.reset.take()
    }

    /// The source's CPU throttle in place, if any (to release).
    pub fn take_throttle(&self) -> Option<CpuThrottle> {
        self.injected.lock().expect("injection lock").throttle.take()
    }

    /// What was applied.
    pub fn applied(&self) -> Applied {
        let injected = self.injected.lock().expect("injection lock");
        Applied { network: injected.network.clone(), source_throttle: injected.source_throttle.clone() }
    }
}

/// Applies `fault` now, recording what it applied in `injected`. A failure
/// that cannot be applied is told on stderr (the run goes on without it).
fn apply(fault: &TimedFault, injected: &mut Injected) {
    match (fault.kind, &fault.testbed) {
        (FailKind::Partition, Some(bed)) => {
            if let Err(e) = bed.cut() {
                eprintln!("pcft demo: cannot cut the link: {e:#}");
            }
        }
        (FailKind::Lossy, Some(bed)) => match bed.degrade(fault.loss, fault.delay_ms, fault.link_mbit) {
            Ok(applied) => injected.network = Some(applied.to_string()),
            Err(e) => eprintln!("pcft demo: cannot degrade the link: {e:#}"),
        },
        (FailKind::Reset, bed) => match ResetRule::apply(fault.reset_side, fault.destination_port, bed.as_deref()) {
            Ok(rule) => {
                injected.network = Some(rule.description().to_string());
                injected.reset = Some(rule);
            }
            Err(e) => eprintln!("pcft demo: cannot reset the migration connection: {e:#}"),
        },
        (FailKind::SlowSource, _) => match CpuThrottle::apply(fault.source_pid, fault.cpu_pct) {
            Ok(throttle) => {
                injected.source_throttle = Some(throttle.description().to_string());
                injected.throttle = Some(throttle);
            }
            Err(e) => eprintln!("pcft demo: cannot throttle the source agent: {e:#}"),
        },
        _ => {
            let signal = if fault.kind == FailKind::Freeze { libc::SIGSTOP } else { libc::SIGKILL };
            // SAFETY: kill(2) of the destination agent we started (a child process) has no memory effects.
            unsafe { libc::kill(fault.destination_pid as libc::pid_t, signal) };
        }
    }
}
