//! The source's side of the connection after the switchover: a reader task
//! that sorts the destination's frames into lanes (heartbeats and page
//! requests ahead of everything, checkpoint frames to the stager, the rest in
//! a bounded queue), and keeps the time it has waited for the destination,
//! which is what "silence" means for failure detection.

use crate::migration::error::FailureKind;
use crate::migration::ft::stager;
use crate::wire::frame::{Frame, FrameReader, PageBatch, ProtocolError};
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::DestinationStats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Payload bytes read from the destination and not yet handled, at most:
/// past it the reader stops reading, and TCP slows the destination down.
pub(super) const REPLY_QUEUE_BYTES: u32 = 16 << 20;

/// Whether the destination is silent: how long the reply reader has been
/// waiting for its next frame. Time the reader spends on a frame or waiting
/// for room in the reply queue is the source's own, not the destination's
/// silence, so a slow source does not take a live destination for dead.
pub(super) struct Liveness {
    base: Instant,
    /// When the reader began waiting for the next frame (µs from `base`), or `NOT_WAITING`.
    waiting_since_us: AtomicU64,
    pub(super) timeout: Duration,
}

const NOT_WAITING: u64 = u64::MAX;

impl Liveness {
    pub(super) fn new(now: Instant, timeout: Duration) -> Self {
        Liveness { base: now, waiting_since_us: 0.into(), timeout }
    }

    fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64
    }

    /// The reader waits for the destination's next frame from `now` on.
    fn waiting(&self, now: Instant) {
        self.waiting_since_us.store(self.us(now), Ordering::Relaxed);
    }

    /// The reader has a frame to deliver (the destination is not silent).
    fn busy(&self) {
        self.waiting_since_us.store(NOT_WAITING, Ordering::Relaxed);
    }

    /// Since when the destination has been silent (None: the reader is not waiting for it).
    pub(super) fn silent_since(&self) -> Option<Instant> {
        match self.waiting_since_us.load(Ordering::Relaxed) {
            NOT_WAITING => None,
            us => Some(self.base + Duration::from_micros(us)),
        }
    }

    /// Past this the destination is lost (None: it is not silent now).
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.silent_since().map(|since| since + self.timeout)
    }
}

/// What the destination says after the switchover.
/// (Heartbeats and page requests, and with PostCopyFT checkpoint frames, skip
/// the queue: see [`Lanes`].)
pub(super) enum Reply {
    Resumed,
    Complete(DestinationStats),
    /// PostCopyFT: pages of the open checkpoint epoch.
    CheckpointPages(PageBatch),
    CheckpointCommit {
        epoch: u64,
        pages: u64,
        state: Vec<u8>,
    },
    /// PostCopyFT: the destination took `Finish`; the VM is its own.
    Finished,
    /// The destination aborted; `paused`: it says every vCPU of its copy is stopped.
    Aborted {
        reason: String,
        paused: bool,
    },
    /// The destination aborted (it stops its copy first) or closed the connection.
    Gone(FailureKind, String),
}

/// A reply waiting to be handled, holding its share of the reply queue's budget.
pub(super) struct Queued {
    pub(super) at: Instant,
    pub(super) reply: Reply,
    pub(super) _room: OwnedSemaphorePermit,
}

impl Reply {
    /// What the reply holds in memory, for the queue's budget.
    fn queued_bytes(&self) -> u32 {
        let bytes = match self {
            Reply::CheckpointPages(batch) => batch.payload_len(),
            Reply::CheckpointCommit { state, .. } => state.len(),
            _ => 0,
        };
        (bytes as u32).clamp(1, REPLY_QUEUE_BYTES)
    }
}

/// The latest heartbeat from the destination: its sequence number, and the
/// output records it said it had released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Heard {
    pub(super) seq: u64,
    pub(super) released: u64,
}

/// Where the reply reader puts what it reads.
struct Lanes {
    /// Everything else, in order, within the queue's byte budget.
    pub(super) queue: mpsc::UnboundedSender<Queued>,
    /// The latest heartbeat, acked before anything queued.
    pub(super) heartbeats: watch::Sender<Heard>,
    /// Page requests, served before anything queued.
    pub(super) requests: mpsc::UnboundedSender<Vec<u64>>,
    /// PostCopyFT: checkpoint frames, to the stager thread (None: not expected).
    pub(super) checkpoints: Option<stager::Inbox>,
}

/// The loop's ends of the reply reader's lanes.
pub(super) struct Inbound {
    /// Everything but heartbeats, page requests and checkpoint frames, in order.
    pub(super) replies: mpsc::UnboundedReceiver<Queued>,
    /// The latest heartbeat (acked before anything queued).
    pub(super) heartbeats: watch::Receiver<Heard>,
    /// Page requests, served before anything queued (bounded by the guest's
    /// pages: the destination asks for a page once).
    pub(super) requests: mpsc::UnboundedReceiver<Vec<u64>>,
}

/// Starts the reply reader on `rd` (checkpoint frames to `checkpoints`, if
/// PostCopyFT); returns the loop's ends of its lanes.
pub(super) fn spawn_reader(
    rd: FrameReader,
    checkpoints: Option<stager::Inbox>,
    liveness: Option<Arc<Liveness>>,
) -> Inbound {
    let (queue, replies) = mpsc::unbounded_channel();
    let (heartbeats_tx, heartbeats) = watch::channel(Heard::default());
    let (requests_tx, requests) = mpsc::unbounded_channel();
    tokio::spawn(read_replies(
        rd,
        Lanes { queue, heartbeats: heartbeats_tx, requests: requests_tx, checkpoints },
        liveness,
    ));
    Inbound { replies, heartbeats, requests }
}

/// Reads the destination's frames after the switchover and queues them with
/// their arrival time, within the queue's byte budget (waiting for room stops
/// the reading: back-pressure to the destination; with checkpoint credit it
/// does not come to that). Heartbeats and page requests skip the queue.
async fn read_replies(mut rd: FrameReader, lanes: Lanes, liveness: Option<Arc<Liveness>>) {
    let room = Arc::new(Semaphore::new(REPLY_QUEUE_BYTES as usize));
    loop {
        if let Some(liveness) = &liveness {
            liveness.waiting(Instant::now());
        }
        let frame = rd.read().await;
        let at = Instant::now();
        if let (Some(liveness), true) = (&liveness, frame.is_ok()) {
            // A frame came: the destination is not silent.
            liveness.busy();
        }
        let reply = match frame {
            Ok(Frame::Message(MigrationMessage::Heartbeat { seq, released })) => {
                lanes.heartbeats.send_replace(Heard { seq, released });
                continue;
            }
            Ok(Frame::Message(MigrationMessage::PageRequest { gpas })) => {
                let _ = lanes.requests.send(gpas);
                continue;
            }
            Ok(Frame::Pages(batch)) => match &lanes.checkpoints {
                Some(stager) => {
                    stager.send(stager::Input::Pages { batch, credit: rd.last_payload_len() as u64 });
                    continue;
                }
                None => Reply::CheckpointPages(batch),
            },
            Ok(Frame::Message(MigrationMessage::CheckpointCommit { epoch, pages, state })) => {
                match &lanes.checkpoints {
                    Some(stager) => {
                        let credit = rd.last_payload_len() as u64;
                        stager.send(stager::Input::Commit { epoch, pages, state, credit });
                        continue;
                    }
                    None => Reply::CheckpointCommit { epoch, pages, state },
                }
            }
            Ok(Frame::Message(MigrationMessage::Resumed)) => Reply::Resumed,
            Ok(Frame::Message(MigrationMessage::Complete(stats))) => Reply::Complete(stats),
            Ok(Frame::Message(MigrationMessage::Finished)) => Reply::Finished,
            Ok(Frame::Message(MigrationMessage::Abort { reason, paused })) => Reply::Aborted { reason, paused },
            Ok(other) => Reply::Gone(FailureKind::Protocol, format!("unexpected frame {other:?}")),
            Err(e @ ProtocolError::Closed) | Err(e @ ProtocolError::Truncated) => {
                Reply::Gone(FailureKind::ConnectionClosed, e.to_string())
            }
            // A reset (from the peer's kernel or from anything in between): reported
            // as a close. Neither proves the destination stopped its copy.
            Err(e @ ProtocolError::Io { .. }) if e.is_reset() => {
                Reply::Gone(FailureKind::ConnectionClosed, e.to_string())
            }
            Err(e @ ProtocolError::Io { .. }) => Reply::Gone(FailureKind::HeartbeatTimeout, e.to_string()),
            Err(e) => Reply::Gone(FailureKind::Protocol, e.to_string()),
        };
        let last = matches!(reply, Reply::Gone(..) | Reply::Aborted { .. });
        let Ok(room) = Arc::clone(&room).acquire_many_owned(reply.queued_bytes()).await else { return };
        if lanes.queue.send(Queued { at, reply, _room: room }).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_time_spent_waiting_for_the_destination_is_silence() {
        let start = Instant::now();
        let liveness = Liveness::new(start, Duration::from_millis(200));
        liveness.waiting(start + Duration::from_millis(10));
        assert_eq!(liveness.deadline(), Some(start + Duration::from_millis(210)));
        // A frame came: whatever the source then does with it (stage to a slow
        // disk, wait for room in its queue) is not the destination's silence.
        liveness.busy();
        assert_eq!((liveness.silent_since(), liveness.deadline()), (None, None));
        liveness.waiting(start + Duration::from_secs(5));
        assert_eq!(liveness.silent_since(), Some(start + Duration::from_secs(5)));
    }

    #[test]
    fn queued_replies_cost_what_they_hold() {
        let pages = PageBatch::from_pages(vec![(0, crate::wire::frame::PageData::Bytes(vec![1; 4096]))]);
        let cost = Reply::CheckpointPages(pages).queued_bytes();
        assert!((4096..4096 + 64).contains(&cost), "{cost}");
        assert_eq!(Reply::Resumed.queued_bytes(), 1, "nothing is free: every reply holds a permit");
        let huge = Reply::CheckpointCommit { epoch: 1, pages: 0, state: vec![0; REPLY_QUEUE_BYTES as usize * 2] };
        assert_eq!(huge.queued_bytes(), REPLY_QUEUE_BYTES, "one reply never needs more than the whole queue");
    }
}
