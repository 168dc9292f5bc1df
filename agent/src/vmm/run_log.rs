//! When each vCPU of a machine was inside `KVM_RUN`: intervals on
//! `CLOCK_BOOTTIME`, for the independent "one copy at a time" check. Two
//! agents on one host read the same clock, so the intervals of a VM's copy at
//! the source and at the destination can be compared directly: after the
//! switchover no interval of one copy may overlap an interval of the other.
//!
//! Recording costs two clock reads and two uncontended lock takes per
//! `KVM_RUN` (one entering, one leaving). Intervals
//! closer than [`MERGE_GAP_US`] are merged (a conservative union: a gap that
//! short is counted as running), and each vCPU keeps its newest
//! [`INTERVALS_PER_VCPU`] (older ones are dropped and counted).

use crate::clock::BootTime;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Gaps shorter than this between two runs of one vCPU are merged.
pub const MERGE_GAP_US: u64 = 200;
/// Intervals kept per vCPU (the newest).
pub const INTERVALS_PER_VCPU: usize = 4096;

/// One stretch in which a vCPU may have executed guest instructions (µs since boot, `CLOCK_BOOTTIME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInterval {
    pub vcpu: u8,
    pub start_us: u64,
    pub end_us: u64,
    /// The vCPU left `KVM_RUN` still blocked in userfaultfd on a page that no
    /// install reached while it was in there: it retired nothing since it
    /// blocked (when that was, the agent knows only as late as it read the fault).
    #[serde(default)]
    pub ended_blocked: bool,
}

/// The intervals of one machine's vCPUs.
pub struct RunLog {
    /// Per vCPU, under one lock each (two uncontended lock takes per `KVM_RUN`).
    vcpus: Vec<Mutex<VcpuLog>>,
    /// When a page was last installed under userfaultfd (µs; 0: never).
    last_install_us: AtomicU64,
}

#[derive(Default)]
struct VcpuLog {
    /// Recorded runs: (start µs, end µs, ended blocked).
    intervals: VecDeque<(u64, u64, bool)>,
    dropped: u64,
    /// Inside `KVM_RUN` now (entered, not yet recorded).
    inside: bool,
    entered_us: u64,
    /// The page it last faulted on in userfaultfd, with when the first fault
    /// on it since `entered_us` was read (cleared when an install reaches it).
    blocked_on: Option<(u64, u64)>,
    /// An install reached a page this vCPU was blocked on since `entered_us`.
    unblocked: bool,
}

impl VcpuLog {
    /// Where a run that began at `start_us` and came back (or is read) at
    /// `end_us` ends: if the vCPU is blocked on a page nothing installed since
    /// a fault read after `start_us`, it retired nothing after that read. And
    /// whether it ended blocked with no install reaching it in that run.
    fn run_end(&self, start_us: u64, end_us: u64) -> (u64, bool) {
        match self.blocked_on {
            Some((_, read_us)) if read_us >= start_us => (end_us.min(read_us).max(start_us), !self.unblocked),
            _ => (end_us.max(start_us), false),
        }
    }

    fn push(&mut self, start: u64, end: u64, ended_blocked: bool) {
        self.inside = false;
        if let Some(last) = self.intervals.back_mut() {
            if start <= last.1.saturating_add(MERGE_GAP_US) {
                *last = (last.0, last.1.max(end), ended_blocked);
                return;
            }
        }
        if self.intervals.len() == INTERVALS_PER_VCPU {
            self.intervals.pop_front();
            self.dropped += 1;
        }
        self.intervals.push_back((start, end, ended_blocked));
    }
}

/// What a run log held when read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLogSnapshot {
    pub intervals: Vec<RunInterval>,
    /// Intervals dropped for room (the oldest); nonzero means the check saw only the newest.
    pub dropped: u64,
    /// When a page was last installed under userfaultfd into this VM here (µs;
    /// 0: never). A vCPU blocked on a missing page runs on only after one.
    #[serde(default)]
    pub last_page_install_us: u64,
}

impl RunLog {
    pub fn new(vcpus: usize) -> RunLog {
        RunLog { vcpus: (0..vcpus).map(|_| Mutex::default()).collect(), last_install_us: AtomicU64::new(0) }
    }

    fn vcpu(&self, vcpu: u8) -> Option<std::sync::MutexGuard<'_, VcpuLog>> {
        self.vcpus.get(usize::from(vcpu)).map(|log| log.lock().expect("run log lock"))
    }

    /// vCPU `vcpu` enters `KVM_RUN` at `at`.
    pub fn entering(&self, vcpu: u8, at: BootTime) {
        if let Some(mut log) = self.vcpu(vcpu) {
            log.inside = true;
            log.entered_us = at.as_micros();
            log.unblocked = false;
        }
    }

    /// vCPU `vcpu` came back from `KVM_RUN` without running the guest (a kick was already pending).
    pub fn did_not_run(&self, vcpu: u8) {
        if let Some(mut log) = self.vcpu(vcpu) {
            log.inside = false;
        }
    }

    /// A userfaultfd fault of vCPU `vcpu` on the page at `gpa` was read at `at`.
    pub fn fault_read(&self, vcpu: u8, gpa: u64, at: BootTime) {
        let Some(mut log) = self.vcpu(vcpu) else { return };
        let page = gpa & !(crate::vmm::memory::PAGE_SIZE - 1);
        let entered = log.entered_us;
        // The first read since this entry into the guest is kept: later ones are the same wait.
        if !log.blocked_on.is_some_and(|(p, first)| p == page && first >= entered) {
            log.blocked_on = Some((page, at.as_micros()));
        }
    }

    /// vCPU `vcpu` was inside `KVM_RUN` from `start` to `end` (tests; the vCPU
    /// thread uses [`entering`](Self::entering) and [`record_exit`](Self::record_exit)).
    #[cfg(test)]
    fn record(&self, vcpu: u8, start: BootTime, end: BootTime) {
        if let Some(mut log) = self.vcpu(vcpu) {
            log.push(start.as_micros(), end.as_micros().max(start.as_micros()), false);
        }
    }

    /// vCPU `vcpu` left `KVM_RUN`, which it entered at `start`. If it was
    /// blocked in userfaultfd on a page that was never installed, since a
    /// fault read after it entered, it retired nothing after that read: its
    /// run ends there. (Under emulation a blocked vCPU can sit inside
    /// `KVM_RUN` for long, faulting again and again, until a kick, or a
    /// revoked page, gets it out without completing its instruction.)
    pub fn record_exit(&self, vcpu: u8, start: BootTime, end: BootTime) {
        if let Some(mut log) = self.vcpu(vcpu) {
            let (end, ended_blocked) = log.run_end(start.as_micros(), end.as_micros());
            log.push(start.as_micros(), end, ended_blocked);
        }
    }

    /// The pages `[gpa, gpa + len)` are about to be installed: a vCPU blocked
    /// on one of them runs on once it is (called before the install, so that
    /// no run after it is taken for a blocked one).
    pub fn pages_installing(&self, gpa: u64, len: u64) {
        self.pages_installing_where(|page| page >= gpa && page < gpa.saturating_add(len));
    }

    /// As [`pages_installing`](Self::pages_installing), for every page `which` says.
    pub fn pages_installing_where(&self, which: impl Fn(u64) -> bool) {
        self.last_install_us.fetch_max(BootTime::now().as_micros(), Ordering::SeqCst);
        self.unblock_where(which);
    }

    /// Every missing page `which` says is about to read as zero (the memory
    /// leaves userfaultfd): a vCPU blocked on one runs on. Only vCPUs whose
    /// faults were all read can be blocked then (the caller revoked every page
    /// they wait for, and `which` excludes those), so no unknown vCPU wakes:
    /// this is not an install in the sense of [`RunLogSnapshot::last_page_install_us`].
    pub fn pages_zero_filling_where(&self, which: impl Fn(u64) -> bool) {
        self.unblock_where(which);
    }

    fn unblock_where(&self, which: impl Fn(u64) -> bool) {
        for log in &self.vcpus {
            let mut log = log.lock().expect("run log lock");
            if log.blocked_on.is_some_and(|(page, _)| which(page)) {
                log.blocked_on = None;
                log.unblocked = true;
            }
        }
    }

    /// A dead copy is being stopped: a vCPU that already left `KVM_RUN` may
    /// have left it blocked on a page whose fault was read only afterwards
    /// (the fault handler was slower, or frozen). If that page is still
    /// missing (`is_missing`), nothing installed it since the vCPU faulted
    /// on it in its last run, so that run ended blocked: say so.
    pub fn amend_blocked_exits(&self, is_missing: impl Fn(u64) -> bool) {
        for log in &self.vcpus {
            let mut log = log.lock().expect("run log lock");
            let Some((page, read_us)) = log.blocked_on else { continue };
            if log.inside || read_us < log.entered_us || log.unblocked || !is_missing(page) {
                continue;
            }
            let entered = log.entered_us;
            // Only the run already recorded for that entry.
            if let Some(last) = log.intervals.back_mut().filter(|last| last.1 >= entered) {
                last.2 = true;
            }
        }
    }

    pub fn snapshot(&self) -> RunLogSnapshot {
        let mut snapshot =
            RunLogSnapshot { last_page_install_us: self.last_install_us.load(Ordering::SeqCst), ..Default::default() };
        let now = BootTime::now().as_micros();
        for (vcpu, log) in self.vcpus.iter().enumerate() {
            let log = log.lock().expect("run log lock");
            let vcpu = vcpu as u8;
            snapshot.dropped += log.dropped;
            snapshot.intervals.extend(log.intervals.iter().map(|&(start_us, end_us, ended_blocked)| RunInterval {
                vcpu,
                start_us,
                end_us,
                ended_blocked,
            }));
            // A vCPU inside KVM_RUN now counts as in the guest until now (or, blocked, until it blocked).
            if log.inside {
                let (end_us, ended_blocked) = log.run_end(log.entered_us, now);
                snapshot.intervals.push(RunInterval { vcpu, start_us: log.entered_us, end_us, ended_blocked });
            }
        }
        snapshot
    }
}

/// The union of `intervals` (any vCPU), sorted and disjoint, as (start, end) µs.
fn union(intervals: &[RunInterval]) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = intervals.iter().map(|i| (i.start_us, i.end_us)).collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// How long two copies ran at once: the total time in which some vCPU of `a`
/// and some vCPU of `b` were both inside `KVM_RUN`.
pub fn overlap(a: &[RunInterval], b: &[RunInterval]) -> Duration {
    let (a, b) = (union(a), union(b));
    let (mut i, mut j, mut total) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        let (start, end) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        total += end.saturating_sub(start);
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    Duration::from_micros(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(us: u64) -> BootTime {
        BootTime::from_since_boot(Duration::from_micros(us))
    }

    fn span(vcpu: u8, start_us: u64, end_us: u64) -> RunInterval {
        RunInterval { vcpu, start_us, end_us, ended_blocked: false }
    }

    #[test]
    fn close_runs_merge_and_the_oldest_go_first() {
        let log = RunLog::new(2);
        log.record(0, at(1_000), at(1_010));
        log.record(0, at(1_100), at(1_200)); // 90 µs later: merged
        log.record(0, at(5_000), at(5_050));
        log.record(1, at(7), at(9));
        log.record(9, at(0), at(1)); // no such vCPU: ignored
        let snapshot = log.snapshot();
        assert_eq!(snapshot.intervals, vec![span(0, 1_000, 1_200), span(0, 5_000, 5_050), span(1, 7, 9)]);
        let log = RunLog::new(1);
        for k in 0..INTERVALS_PER_VCPU as u64 + 3 {
            log.record(0, at(k * 1_000), at(k * 1_000 + 1));
        }
        let snapshot = log.snapshot();
        assert_eq!((snapshot.intervals.len(), snapshot.dropped), (INTERVALS_PER_VCPU, 3));
        assert_eq!(snapshot.intervals[0].start_us, 3_000);
    }

    #[test]
    fn a_run_blocked_on_a_page_that_never_came_ends_at_its_fault_and_says_so() {
        let log = RunLog::new(2);
        // vCPU 0 blocks on 0x5000 (read at 150) and is kicked out at 900: it retired nothing after 150.
        log.entering(0, at(100));
        log.fault_read(0, 0x5123, at(150));
        log.fault_read(0, 0x5000, at(600)); // the same wait, read again
        log.record_exit(0, at(100), at(900));
        // vCPU 1's page came (an install) and it ran on to 900.
        log.entering(1, at(100));
        log.fault_read(1, 0x7000, at(150));
        log.pages_installing(0x7000, 0x1000);
        log.record_exit(1, at(100), at(900));
        let ends: Vec<_> = log.snapshot().intervals.iter().map(|i| (i.end_us, i.ended_blocked)).collect();
        assert_eq!(ends, vec![(150, true), (900, false)]);

        // A fault read only after the vCPU left: the run is marked once the page is known missing.
        let log = RunLog::new(1);
        log.entering(0, at(100));
        log.record_exit(0, at(100), at(900));
        log.fault_read(0, 0x9000, at(950));
        log.amend_blocked_exits(|page| page != 0x9000);
        assert!(!log.snapshot().intervals[0].ended_blocked, "the page arrived: not blocked");
        log.amend_blocked_exits(|page| page == 0x9000);
        assert!(log.snapshot().intervals[0].ended_blocked);
    }

    #[test]
    fn a_vcpu_inside_kvm_run_counts_until_now_and_one_that_did_not_run_not_at_all() {
        let log = RunLog::new(2);
        log.entering(0, at(100));
        log.entering(1, at(100));
        log.did_not_run(1);
        let open = log.snapshot().intervals;
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!((open[0].vcpu, open[0].start_us), (0, 100));
        assert!(open[0].end_us >= BootTime::now().as_micros() - 1_000_000, "until now: {open:?}");
        log.record_exit(0, at(100), at(200));
        assert_eq!(log.snapshot().intervals, vec![span(0, 100, 200)]);
    }

    #[test]
    fn overlap_counts_time_both_copies_ran() {
        let source = [span(0, 0, 100), span(1, 50, 150), span(0, 1_000, 2_000)];
        let destination = [span(0, 150, 900), span(1, 1_900, 2_100)];
        assert_eq!(overlap(&source, &destination), Duration::from_micros(100));
        assert_eq!(overlap(&source, &[span(0, 150, 1_000)]), Duration::ZERO, "touching is not overlapping");
        assert_eq!(overlap(&[], &destination), Duration::ZERO);
    }
}
