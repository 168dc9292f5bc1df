//! The source's checkpoint stager: a thread of its own that stages the
//! destination's checkpoint frames and commits whole epochs into guest memory
//! ([`CheckpointStore`]), so that a slow staging disk or a large commit never
//! holds up the source's migration loop (page requests, the post-copy push,
//! heartbeat acks). The loop hears back what was committed, and how much
//! checkpoint credit to give back to the destination.

use crate::metrics;
use crate::metrics::timeline::EventKind;
use crate::migration::ft::store::CheckpointStore;
use crate::wire::frame::PageBatch;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A checkpoint frame from the destination, with its payload bytes (its credit).
pub enum Input {
    Pages {
        batch: PageBatch,
        credit: u64,
    },
    Commit {
        epoch: u64,
        pages: u64,
        state: Vec<u8>,
        credit: u64,
    },
    /// Handle everything sent before this, then stop.
    Stop,
}

/// What the stager tells the migration loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Frames of this many payload bytes are handled: credit to give back.
    Credit(u64),
    /// Epoch `epoch` is current: ack it (its output may go out).
    Committed { epoch: u64, pages: u64 },
    /// The destination sent what the store refuses (it is faulty): no more
    /// frames are handled.
    Refused(String),
}

/// Where checkpoint frames go (the reply reader holds one; so does the loop, to stop it).
#[derive(Clone)]
pub struct Inbox {
    tx: mpsc::UnboundedSender<Input>,
    pending: Arc<AtomicUsize>,
}

impl Inbox {
    /// Hands over a frame; no wait: the destination's checkpoint credit bounds
    /// what can be in here (see `CHECKPOINT_WINDOW`).
    pub fn send(&self, input: Input) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(input).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The stager thread.
pub struct Stager {
    inbox: Inbox,
    thread: std::thread::JoinHandle<CheckpointStore>,
}

impl Stager {
    /// Starts staging into `store` for VM `vm`; returns the stager, its inbox, and its events.
    pub fn start(
        store: CheckpointStore,
        vm: String,
    ) -> std::io::Result<(Stager, Inbox, mpsc::UnboundedReceiver<Event>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let inbox = Inbox { tx, pending: Arc::new(AtomicUsize::new(0)) };
        let pending = Arc::clone(&inbox.pending);
        // Its lines carry the span it was started in (the migration's), and the VM.
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new().name("checkpoint-stager".into()).spawn(move || {
            let _span = span.entered();
            stage(store, &vm, rx, &pending, &events_tx)
        })?;
        Ok((Stager { inbox: inbox.clone(), thread }, inbox, events))
    }

    /// Whether every frame handed over so far has been handled.
    pub fn idle(&self) -> bool {
        self.inbox.pending.load(Ordering::SeqCst) == 0
    }

    /// Handles every frame handed over so far, then ends; returns the store.
    pub async fn stop(self) -> CheckpointStore {
        self.inbox.send(Input::Stop);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("the stager's joiner does not panic")
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

fn stage(
    mut store: CheckpointStore,
    vm: &str,
    mut rx: mpsc::UnboundedReceiver<Input>,
    pending: &AtomicUsize,
    events: &mpsc::UnboundedSender<Event>,
) -> CheckpointStore {
    let m = metrics::get();
    let mut refused = false;
    while let Some(input) = rx.blocking_recv() {
        let event = match input {
            Input::Stop => {
                pending.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            _ if refused => None,
            Input::Pages { batch, credit } => {
                let (bytes, in_file) = (batch.payload_len() as u64, store.staged_bytes().1);
                match store.stage(batch) {
                    Ok(()) => {
                        m.vm(&m.checkpoint_bytes, vm, bytes);
                        let spilled = store.staged_bytes().1.saturating_sub(in_file);
                        if spilled > 0 {
                            m.vm(&m.checkpoint_staged_file_bytes, vm, spilled);
                        }
                        Some(vec![Event::Credit(credit)])
                    }
                    Err(e) => Some(vec![Event::Refused(e.to_string())]),
                }
            }
            Input::Commit { epoch, pages, state, credit } => {
                let bytes_before = store.bytes_received;
                match store.commit(epoch, pages, &state) {
                    Ok(_) => {
                        m.vm(&m.checkpoints, vm, 1);
                        m.vm(&m.checkpoint_bytes, vm, store.bytes_received.saturating_sub(bytes_before));
                        m.timeline.event(vm, EventKind::CheckpointCommitted, format!("epoch {epoch}: {pages} pages"));
                        tracing::debug!(vm, epoch, pages, "checkpoint committed");
                        Some(vec![Event::Committed { epoch, pages }, Event::Credit(credit)])
                    }
                    Err(e) => Some(vec![Event::Refused(e.to_string())]),
                }
            }
        };
        pending.fetch_sub(1, Ordering::SeqCst);
        for event in event.into_iter().flatten() {
            refused |= matches!(event, Event::Refused(_));
            let _ = events.send(event);
        }
    }
    store
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::ft::staging::StagingLimits;
    use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
    use crate::wire::frame::PageData;

    fn store() -> CheckpointStore {
        let memory = Arc::new(GuestMemory::new(4 << 20, 4 << 20).unwrap());
        CheckpointStore::new(memory, crate::migration::ft::store::tests::state(0), StagingLimits::default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_are_staged_and_committed_in_order_and_stop_waits_for_them() {
        let (stager, inbox, mut events) = Stager::start(store(), "vm1".into()).unwrap();
        let page = PageBatch::from_pages(vec![(0x1000, PageData::Bytes(vec![5; PAGE_SIZE as usize]))]);
        inbox.send(Input::Pages { batch: page, credit: 4100 });
        let state = crate::migration::ft::store::tests::state(3).to_bytes();
        inbox.send(Input::Commit { epoch: 1, pages: 1, state: state.clone(), credit: 300 });
        // Epoch 2 is refused (wrong count): nothing after it is handled.
        inbox.send(Input::Commit { epoch: 2, pages: 7, state, credit: 300 });
        inbox.send(Input::Pages { batch: PageBatch::from_pages(vec![(0, PageData::Zero)]), credit: 13 });
        let store = stager.stop().await;
        assert_eq!(store.committed_epoch(), 1);
        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            seen.push(event);
        }
        assert_eq!(&seen[..3], &[Event::Credit(4100), Event::Committed { epoch: 1, pages: 1 }, Event::Credit(300)]);
        assert!(matches!(&seen[3..], [Event::Refused(why)] if why.contains("7 pages")), "{seen:?}");
    }
}
