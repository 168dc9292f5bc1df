//! Fencing for PostCopyFT: the destination may run the VM only while it holds
//! a lease, and the source resumes its own copy only once that lease has
//! surely run out. So the two copies never run at once, whatever the network
//! does (the argument, with its assumptions in numbers, is in
//! docs/architecture.md, "Fencing: the lease argument").
//!
//! The destination sends `Heartbeat { seq, .. }` and the source answers each with
//! `HeartbeatAck { seq }`. An ack extends the lease to the *send* time of the
//! heartbeat it answers plus the lease length. The source sent the ack after
//! that send time, so if the source waits the lease length (plus a margin for
//! clock rate) from the last ack it sent, the destination's lease has expired
//! by then, however late the ack was delivered.

//! The destination keeps its lease on `CLOCK_BOOTTIME` ([`BootTime`]), which
//! goes on while its host is suspended; the source waits on its monotonic
//! clock, which can only make it wait longer.

use crate::clock::BootTime;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The destination's side: when its lease runs out.
#[derive(Debug)]
pub struct Lease {
    length: Duration,
    expires: BootTime,
    next_seq: u64,
    /// Heartbeats sent and not yet acked: sequence number and send time.
    unacked: VecDeque<(u64, BootTime)>,
}

impl Lease {
    /// A lease of `length` granted from `from`: a moment before the source could
    /// have committed the switchover (the destination sending `Restored`).
    pub fn new(length: Duration, from: BootTime) -> Self {
        Lease { length, expires: from + length, next_seq: 1, unacked: VecDeque::new() }
    }

    /// Records a heartbeat sent at `now`; returns its sequence number.
    pub fn sent(&mut self, now: BootTime) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back((seq, now));
        // Bounded: heartbeats older than a lease can renew nothing that is not already expired.
        while self.unacked.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) > self.length) {
            self.unacked.pop_front();
        }
        seq
    }

    /// The source acked heartbeat `seq`: the lease runs to its send time plus
    /// the length. Returns that send time (None: an unknown or old heartbeat).
    pub fn acked(&mut self, seq: u64) -> Option<BootTime> {
        while let Some(&(s, at)) = self.unacked.front() {
            if s > seq {
                break;
            }
            self.unacked.pop_front();
            if s == seq {
                self.expires = self.expires.max(at + self.length);
                return Some(at);
            }
        }
        None
    }

    pub fn expired(&self, now: BootTime) -> bool {
        now >= self.expires
    }

    pub fn expires(&self) -> BootTime {
        self.expires
    }
}

/// The clock-rate difference between the hosts that the source's wait covers:
/// the destination's clock may run this much slower than the source's.
pub const CLOCK_RATE_MARGIN: f64 = 0.10;
/// What the source's wait allows the destination, past its deadline, to have
/// every vCPU out of the guest (the timer's signal delivered and `KVM_RUN` left).
pub const STOP_MARGIN: Duration = Duration::from_millis(10);

/// The source's side: when the destination's lease has surely run out, given
/// the last moment the source renewed it (sent `Go` or a `HeartbeatAck`).
pub fn fenced_after(last_renewal: Instant, length: Duration) -> Instant {
    last_renewal + length.mul_f64(1.0 + CLOCK_RATE_MARGIN) + STOP_MARGIN
}

/// What the source knows of the destination's copy when it gives up on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationCopy {
    /// The destination said so itself, in an authenticated `Abort { paused: true }`:
    /// it tripped its fence and every vCPU acknowledged the pause.
    Stopped,
    /// Anything else (a crash, a reset from anywhere, silence, garbage, an
    /// `Abort` without that word): its vCPUs may run until its lease runs out.
    MayRun,
    /// `Finish` went out and no answer came: it may have taken the VM for good.
    MayOwnTheVm,
}

/// When the source may resume its own copy (None: never, an operator must look).
pub fn source_may_restore_at(
    copy: DestinationCopy,
    detected_at: Instant,
    last_renewal: Instant,
    length: Duration,
) -> Option<Instant> {
    match copy {
        DestinationCopy::Stopped => Some(detected_at),
        DestinationCopy::MayRun => Some(fenced_after(last_renewal, length).max(detected_at)),
        DestinationCopy::MayOwnTheVm => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(ms: u64) -> BootTime {
        BootTime::from_since_boot(Duration::from_millis(1_000 + ms))
    }

    #[test]
    fn an_ack_extends_the_lease_from_the_heartbeats_send_time() {
        let t0 = boot(0);
        let len = Duration::from_millis(200);
        let mut lease = Lease::new(len, t0);
        assert!(!lease.expired(t0 + Duration::from_millis(199)));
        assert!(lease.expired(t0 + len));
        let a = lease.sent(t0 + Duration::from_millis(50));
        let b = lease.sent(t0 + Duration::from_millis(70));
        // A late ack of `a` counts from when `a` was sent, not from its arrival.
        lease.acked(a);
        assert_eq!(lease.expires(), t0 + Duration::from_millis(250));
        lease.acked(b);
        assert_eq!(lease.expires(), t0 + Duration::from_millis(270));
        // An ack of an unknown or old heartbeat changes nothing.
        lease.acked(a);
        lease.acked(99);
        assert_eq!(lease.expires(), t0 + Duration::from_millis(270));
    }

    #[test]
    fn the_source_waits_out_any_lease_it_renewed() {
        // One host, both clocks read at once: boot(ms) and i0 + ms are the same moment.
        let i0 = Instant::now();
        let at = |ms: u64| i0 + Duration::from_millis(ms);
        let len = Duration::from_millis(200);
        let mut lease = Lease::new(len, boot(0));
        // The source acks at +80 a heartbeat sent at +60; the ack arrives whenever.
        let seq = lease.sent(boot(60));
        let source_acked_at = at(80);
        lease.acked(seq);
        let restore = source_may_restore_at(DestinationCopy::MayRun, at(90), source_acked_at, len).unwrap();
        let waited_ms = restore.duration_since(i0).as_millis() as u64;
        assert!(lease.expired(boot(waited_ms)), "restores at +{waited_ms} ms, lease until {:?}", lease.expires());
        // Only the destination's own word skips the wait; after Finish nothing does.
        assert_eq!(source_may_restore_at(DestinationCopy::Stopped, at(90), source_acked_at, len), Some(at(90)));
        assert_eq!(source_may_restore_at(DestinationCopy::MayOwnTheVm, at(90), source_acked_at, len), None);
    }
}
