//! Fencing for PostCopyFT: the destination may run the VM only while it holds
//! a lease, and the source resumes its own copy only once that lease has
//! surely run out. So the two copies never run at once, whatever the network
//! does (the argument is in docs/architecture.md, "Fencing").
//!
//! The destination sends `Heartbeat { seq }` and the source answers each with
//! `HeartbeatAck { seq }`. An ack extends the lease to the *send* time of the
//! heartbeat it answers plus the lease length. The source sent the ack after
//! that send time, so if the source waits the lease length (plus a margin for
//! clock rate) from the last ack it sent, the destination's lease has expired
//! by then, however late the ack was delivered.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The destination's side: when its lease runs out.
#[derive(Debug)]
pub struct Lease {
    length: Duration,
    expires: Instant,
    next_seq: u64,
    /// Heartbeats sent and not yet acked: sequence number and send time.
    unacked: VecDeque<(u64, Instant)>,
}

impl Lease {
    /// A lease of `length` granted from `from`: a moment before the source could
    /// have committed the switchover (the destination sending `Restored`).
    pub fn new(length: Duration, from: Instant) -> Self {
        Lease { length, expires: from + length, next_seq: 1, unacked: VecDeque::new() }
    }

    /// Records a heartbeat sent at `now`; returns its sequence number.
    pub fn sent(&mut self, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.push_back((seq, now));
        // Bounded: heartbeats older than a lease can renew nothing that is not already expired.
        while self.unacked.front().is_some_and(|(_, at)| now.duration_since(*at) > self.length) {
            self.unacked.pop_front();
        }
        seq
    }

    /// The source acked heartbeat `seq`: the lease runs to its send time plus
    /// the length. Returns that send time (None: an unknown or old heartbeat).
    pub fn acked(&mut self, seq: u64) -> Option<Instant> {
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

    pub fn expired(&self, now: Instant) -> bool {
        now >= self.expires
    }

    pub fn expires(&self) -> Instant {
        self.expires
    }
}

/// The source's side: when the destination's lease has surely run out, given
/// the last moment the source renewed it (sent `Go` or a `HeartbeatAck`).
pub fn fenced_after(last_renewal: Instant, length: Duration) -> Instant {
    // 10% for clock rate differences between the hosts, plus 10 ms for the
    // destination's watchdog to kick its vCPUs out (they check the deadline
    // themselves before every entry into the guest).
    last_renewal + length + length / 10 + Duration::from_millis(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_extends_the_lease_from_the_heartbeats_send_time() {
        let t0 = Instant::now();
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
        let t0 = Instant::now();
        let len = Duration::from_millis(200);
        let mut lease = Lease::new(len, t0);
        // The source acks at t0+80 a heartbeat sent at t0+60; the ack arrives whenever.
        let seq = lease.sent(t0 + Duration::from_millis(60));
        let source_acked_at = t0 + Duration::from_millis(80);
        lease.acked(seq);
        assert!(lease.expires() <= fenced_after(source_acked_at, len));
        assert!(lease.expired(fenced_after(source_acked_at, len)));
    }
}
