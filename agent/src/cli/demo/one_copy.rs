//! The independent "one copy at a time" check: each agent records when the
//! vCPUs of every copy of the VM it ran were inside `KVM_RUN`
//! (`pcft_agent::vmm::run_log`, on `CLOCK_BOOTTIME`, which both agents share
//! on this one host); no interval of the source's copies may overlap one of
//! the destination's, and at the end the VM must run (or have finished) at
//! exactly one agent.

use super::agent_calls::VM;
use crate::cli::remote::runtime;
use crate::cli::stopwatch::{cut_at_stops, StoppedWindow};
use pcft_agent::agent::client::{AgentClient, ClientError};
use pcft_agent::vmm::run_log::{RunInterval, RunLogSnapshot};
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::VmPhase;
use std::time::Duration;

/// What one agent said about the demo's VM at the end of the run.
#[derive(Clone, Debug, Default)]
pub struct CopyAt {
    /// When the vCPUs of the VM's copies there were inside `KVM_RUN` (None:
    /// the agent could not be asked, e.g. it was killed: its intervals died with it).
    pub runs: Option<RunLogSnapshot>,
    /// The VM's phase there (None: no such VM there, or the agent could not be asked).
    phase: Option<VmPhase>,
}

impl CopyAt {
    /// Whether the VM runs there, or finished there (the copy that took the workload to its end).
    fn live(&self) -> bool {
        matches!(self.phase, Some(VmPhase::Running | VmPhase::MigratingIn | VmPhase::MigratingOut | VmPhase::Finished))
    }

    fn intervals(&self) -> &[RunInterval] {
        self.runs.as_ref().map_or(&[], |r| r.intervals.as_slice())
    }
}

/// Asks the agent at `addr` for the demo VM's run log and phase. An agent that
/// cannot be reached within a few seconds (killed, or frozen) counts as
/// having no copy and no intervals; a VM it does not know, as no intervals.
async fn copy_at(addr: &str) -> CopyAt {
    let ask = async {
        let mut client = AgentClient::connect(addr).await.ok()?;
        let runs = match client.request(&ControlMessage::RunLog { name: VM.into() }).await {
            Ok(ControlMessage::RunLogReport { runs, .. }) => runs,
            // `Refuse`: no such VM there.
            Err(ClientError::Refused(_)) => RunLogSnapshot::default(),
            _ => return None,
        };
        let phase = match client.request(&ControlMessage::Status).await {
            Ok(ControlMessage::StatusReport { vms, .. }) => vms.into_iter().find(|v| v.name == VM).map(|v| v.phase),
            _ => None,
        };
        Some(CopyAt { runs: Some(runs), phase })
    };
    tokio::time::timeout(Duration::from_secs(5), ask).await.ok().flatten().unwrap_or_default()
}

/// Asks both agents for their run logs (before they stop) and checks them:
/// the destination's intervals end where the demo saw its vCPUs `stopped`
/// (a frozen destination, see `StopWatch`).
pub fn check(source: &str, destination: &str, stopped: &[StoppedWindow]) -> OneCopy {
    runtime().block_on(async {
        let (source, mut destination) = tokio::join!(copy_at(source), copy_at(destination));
        if let Some(runs) = destination.runs.as_mut() {
            runs.intervals = cut_at_stops(&runs.intervals, stopped, runs.last_page_install_us);
        }
        OneCopy::new(source, destination)
    })
}

/// The independent "one copy at a time" check: whether the VM's copies at the
/// source and at the destination ever ran at once, and how many run at the end.
#[derive(Clone, Debug)]
pub struct OneCopy {
    pub source: CopyAt,
    pub destination: CopyAt,
    /// The time in which some vCPU of a source copy and some vCPU of a destination copy were both in the guest.
    pub overlap: Duration,
    /// The first (earliest) pair of intervals that overlap: (source's, destination's).
    pub first: Option<(RunInterval, RunInterval)>,
}

impl OneCopy {
    pub fn new(source: CopyAt, destination: CopyAt) -> OneCopy {
        let (overlap, first) = copies_overlap(source.intervals(), destination.intervals());
        OneCopy { source, destination, overlap, first }
    }

    /// Agents where the VM runs or finished at the end.
    pub fn copies_at_end(&self) -> usize {
        usize::from(self.source.live()) + usize::from(self.destination.live())
    }

    /// Older run intervals the agents dropped for room (not compared).
    pub fn dropped(&self) -> u64 {
        [&self.source, &self.destination].iter().filter_map(|c| c.runs.as_ref()).map(|r| r.dropped).sum()
    }

    /// How long the copies ran at once, in ms.
    pub fn overlap_ms(&self) -> f64 {
        self.overlap.as_secs_f64() * 1e3
    }

    /// The human report's line.
    pub fn line(&self) -> String {
        let count = |copy: &CopyAt, at: &str| match &copy.runs {
            Some(runs) => format!("{} run intervals at the {at}", runs.intervals.len()),
            None => format!("none from the {at}, whose agent is gone (its intervals with it)"),
        };
        let counts = format!("{}, {}", count(&self.source, "source"), count(&self.destination, "destination"));
        let dropped = match self.dropped() {
            0 => String::new(),
            n => format!("; {n} older intervals were dropped for room, so only the newest were compared"),
        };
        let running: Vec<&str> = [(&self.source, "the source"), (&self.destination, "the destination")]
            .into_iter()
            .filter(|(copy, _)| copy.live())
            .map(|(_, at)| at)
            .collect();
        let end = match running.as_slice() {
            [one] => format!("one copy at the end, at {one}"),
            [] => "NO copy at the end".to_string(),
            _ => "BOTH copies at the end".to_string(),
        };
        match self.first {
            None => format!("one copy at a time: the two copies never ran at once ({counts}{dropped}); {end}"),
            Some((s, d)) => format!(
                "one copy at a time: VIOLATED: the two copies ran at once for {:.3} ms in all; first: source vCPU {} \
                 in the guest {}..{} µs and destination vCPU {} {}..{} µs (CLOCK_BOOTTIME) ({counts}{dropped}); {end}",
                self.overlap_ms(),
                s.vcpu,
                s.start_us,
                s.end_us,
                d.vcpu,
                d.start_us,
                d.end_us
            ),
        }
    }
}

/// How long the two copies ran at once ([`pcft_agent::vmm::run_log::overlap`]), and
/// the earliest pair of intervals, one of each, that overlap (None: no overlap).
fn copies_overlap(
    source: &[RunInterval],
    destination: &[RunInterval],
) -> (Duration, Option<(RunInterval, RunInterval)>) {
    let overlap = pcft_agent::vmm::run_log::overlap(source, destination);
    if overlap.is_zero() {
        return (overlap, None);
    }
    let by_start = |intervals: &[RunInterval]| {
        let mut sorted = intervals.to_vec();
        sorted.sort_by_key(|i| (i.start_us, i.end_us));
        sorted
    };
    let (source, destination) = (by_start(source), by_start(destination));
    // The earliest moment both ran: the smallest max(start) over overlapping pairs.
    let mut first: Option<(RunInterval, RunInterval)> = None;
    for s in &source {
        for d in &destination {
            if d.start_us >= s.end_us {
                break;
            }
            if s.start_us < d.end_us {
                let at = s.start_us.max(d.start_us);
                if first.is_none_or(|(fs, fd)| at < fs.start_us.max(fd.start_us)) {
                    first = Some((*s, *d));
                }
            }
        }
    }
    (overlap, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(vcpu: u8, start_us: u64, end_us: u64) -> RunInterval {
        RunInterval { vcpu, start_us, end_us, ended_blocked: false }
    }

    fn at(intervals: &[RunInterval], phase: Option<VmPhase>) -> CopyAt {
        CopyAt { runs: Some(RunLogSnapshot { intervals: intervals.to_vec(), ..Default::default() }), phase }
    }

    #[test]
    fn copies_that_take_turns_pass_the_check() {
        // The source runs until the switchover; the destination from then until it is
        // fenced; the source's restored copy after the lease.
        let source = [span(0, 0, 1_000), span(1, 10, 990), span(0, 5_000, 9_000), span(1, 5_001, 8_000)];
        let destination = [span(0, 1_000, 3_000), span(1, 1_200, 2_900)];
        let check = OneCopy::new(at(&source, Some(VmPhase::Finished)), at(&destination, Some(VmPhase::Failed)));
        assert_eq!((check.overlap, check.first), (Duration::ZERO, None));
        assert_eq!(check.copies_at_end(), 1);
        assert_eq!(
            check.line(),
            "one copy at a time: the two copies never ran at once (4 run intervals at the source, 2 run intervals \
             at the destination); one copy at the end, at the source"
        );
    }

    #[test]
    fn copies_that_ran_at_once_fail_the_check_and_name_the_first_pair() {
        // A destination vCPU that entered the guest after its lease ran out, while the
        // source's restored copy already ran: what a broken fence looks like.
        let source = [span(0, 0, 1_000), span(0, 5_000, 9_000), span(1, 5_500, 9_000)];
        let destination = [span(0, 1_000, 3_000), span(1, 5_200, 5_700), span(0, 8_000, 8_100)];
        let check = OneCopy::new(at(&source, Some(VmPhase::Finished)), at(&destination, Some(VmPhase::Failed)));
        assert_eq!(check.overlap, Duration::from_micros(600));
        assert_eq!(check.overlap_ms(), 0.6);
        assert_eq!(check.first, Some((span(0, 5_000, 9_000), span(1, 5_200, 5_700))));
        let line = check.line();
        assert!(line.starts_with("one copy at a time: VIOLATED: the two copies ran at once for 0.600 ms"), "{line}");
        assert!(
            line.contains("source vCPU 0 in the guest 5000..9000 µs and destination vCPU 1 5200..5700 µs"),
            "{line}"
        );
    }

    #[test]
    fn the_copies_at_the_end_count_where_the_vm_runs_or_finished() {
        let none = CopyAt::default();
        let check = |s: Option<VmPhase>, d: Option<VmPhase>| OneCopy::new(at(&[], s), at(&[], d)).copies_at_end();
        assert_eq!(check(Some(VmPhase::MigratedAway), Some(VmPhase::Finished)), 1);
        assert_eq!(check(Some(VmPhase::Running), Some(VmPhase::Failed)), 1);
        assert_eq!(check(Some(VmPhase::Finished), Some(VmPhase::Running)), 2);
        assert_eq!(check(Some(VmPhase::Failed), None), 0);
        // A killed destination agent: no copy and no intervals there.
        let crashed = OneCopy::new(at(&[span(0, 0, 10)], Some(VmPhase::Finished)), none);
        assert_eq!(crashed.copies_at_end(), 1);
        assert!(crashed.line().contains("none from the destination, whose agent is gone"), "{}", crashed.line());
    }
}
