//! What the agent's dashboard plots: its VMs' recent dirty-rate samples and
//! events (migration phases, checkpoints, failovers), bounded, timestamped in
//! wall-clock milliseconds so that the timelines of several agents line up.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One dirty-rate sample of a VM.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RateSample {
    /// Milliseconds since the Unix epoch.
    pub t_ms: f64,
    pub vm: String,
    /// The tracker the rate came from (bitmap, ring, ebpf).
    pub tracker: String,
    pub bytes_per_second: f64,
}

/// One sample of a network VM's traffic at this agent (the copy that runs here).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NetSample {
    pub t_ms: f64,
    pub vm: String,
    /// Frames from the wire placed in the guest, per second (the clients' requests and acks).
    pub received_per_second: f64,
    /// Frames sent to the wire, per second (the VM's replies, once released).
    pub sent_per_second: f64,
    /// The longest time in the interval in which nothing went out: the reply gap clients see.
    pub longest_quiet_ms: f64,
    /// Frames held for output commit at the sample.
    pub held_frames: u64,
}

/// What kind of thing happened to a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The VM entered a migration phase (`detail` names it).
    Phase,
    /// The destination sent a checkpoint epoch to the source.
    CheckpointSent,
    /// The source committed a checkpoint epoch.
    CheckpointCommitted,
}

/// Something that happened to a VM.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TimelineEvent {
    pub t_ms: f64,
    pub vm: String,
    pub kind: EventKind,
    pub detail: String,
}

/// The dashboard's answer to `/api/timeline?since=MS`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TimelineSlice {
    /// This agent's name.
    pub agent: String,
    /// The agent's clock now (ms since the Unix epoch): ask for `since=now_ms` next.
    pub now_ms: f64,
    pub samples: Vec<RateSample>,
    pub events: Vec<TimelineEvent>,
    pub net: Vec<NetSample>,
}

/// Entries kept of each kind; the oldest go first.
pub const TIMELINE_LIMIT: usize = 20_000;

/// The recent dirty rates and events of this agent's VMs.
#[derive(Default)]
pub struct Timeline {
    samples: Mutex<VecDeque<RateSample>>,
    events: Mutex<VecDeque<TimelineEvent>>,
    net: Mutex<VecDeque<NetSample>>,
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1e3
}

/// Appends the entry `make` builds from the time now. The time is read under
/// the lock, so entries are in time order and one added after a [`Timeline::since`]
/// read the clock is newer than that read: `since=now_ms` never misses one.
fn push_bounded<T>(queue: &Mutex<VecDeque<T>>, make: impl FnOnce(f64) -> T) {
    let mut queue = queue.lock().expect("timeline lock");
    if queue.len() == TIMELINE_LIMIT {
        queue.pop_front();
    }
    queue.push_back(make(now_ms()));
}

impl Timeline {
    pub fn sample(&self, vm: &str, tracker: &str, bytes_per_second: f64) {
        push_bounded(&self.samples, |t_ms| RateSample {
            t_ms,
            vm: vm.into(),
            tracker: tracker.into(),
            bytes_per_second,
        });
    }

    /// A network VM's traffic sample (see [`NetSample`]; `t_ms` is set here).
    pub fn net_sample(&self, sample: NetSample) {
        push_bounded(&self.net, |t_ms| NetSample { t_ms, ..sample });
    }

    pub fn event(&self, vm: &str, kind: EventKind, detail: String) {
        push_bounded(&self.events, |t_ms| TimelineEvent { t_ms, vm: vm.into(), kind, detail });
    }

    /// Everything after `since_ms` (ms since the Unix epoch).
    pub fn since(&self, agent: &str, since_ms: f64) -> TimelineSlice {
        // Read the clock before the queues: what is added after is newer than `now_ms`.
        let now_ms = now_ms();
        let samples =
            self.samples.lock().expect("timeline lock").iter().filter(|s| s.t_ms > since_ms).cloned().collect();
        let events = self.events.lock().expect("timeline lock").iter().filter(|e| e.t_ms > since_ms).cloned().collect();
        let net = self.net.lock().expect("timeline lock").iter().filter(|s| s.t_ms > since_ms).cloned().collect();
        TimelineSlice { agent: agent.to_string(), now_ms, samples, events, net }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_returns_only_newer_entries_and_the_timeline_stays_bounded() {
        let timeline = Timeline::default();
        timeline.sample("vm1", "ring", 1.0);
        timeline.event("vm1", EventKind::Phase, "postcopy".into());
        let first = timeline.since("a", 0.0);
        assert_eq!((first.samples.len(), first.events.len()), (1, 1));
        assert_eq!(first.events[0].kind, EventKind::Phase);
        std::thread::sleep(std::time::Duration::from_millis(2));
        timeline.sample("vm1", "ring", 2.0);
        let next = timeline.since("a", first.now_ms);
        assert_eq!(next.samples.iter().map(|s| s.bytes_per_second).collect::<Vec<_>>(), vec![2.0]);
        assert!(next.events.is_empty());
        for i in 0..TIMELINE_LIMIT + 5 {
            timeline.sample("vm2", "bitmap", i as f64);
        }
        let all = timeline.since("a", 0.0);
        assert_eq!(all.samples.len(), TIMELINE_LIMIT);
        assert_eq!(all.samples.last().map(|s| s.bytes_per_second), Some((TIMELINE_LIMIT + 4) as f64));
    }

    #[test]
    fn the_dashboard_json_names_event_kinds_in_kebab_case() {
        let timeline = Timeline::default();
        timeline.event("vm1", EventKind::CheckpointCommitted, "epoch 1".into());
        let json = serde_json::to_value(timeline.since("hostA", 0.0)).unwrap();
        assert_eq!(json["agent"], "hostA");
        assert_eq!(json["events"][0]["kind"], "checkpoint-committed");
    }
}
