//! PostCopyFT at the source while post-copy runs: the checkpoint stager, the
//! credit owed back to the destination, which epoch is committed, when the
//! destination's lease was last renewed, and whether its checkpoints stalled.
//! The post-copy loop hands it the stager's events ([`FtSource::on_event`])
//! and sends what it answers; at the end [`FtSource::finish`] gives the store.

use crate::migration::error::{MigrationError, VmError};
use crate::migration::ft::lease::{self, DestinationCopy};
use crate::migration::ft::stager::{self, Stager};
use crate::migration::ft::staging::StagingLimits;
use crate::migration::ft::store::CheckpointStore;
use crate::vmm::machine::MachineState;
use crate::vmm::memory::GuestMemory;
use crate::wire::frame::CHECKPOINT_WINDOW;
use crate::wire::migration::MigrationMessage;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The timeouts PostCopyFT's source side works with.
#[derive(Clone, Copy, Debug)]
pub struct FtTimeouts {
    /// The destination's lease: how long it runs without a heartbeat ack.
    pub heartbeat: Duration,
    /// No checkpoint frame for this long, with every commit acked: the destination stalled.
    pub checkpoint: Duration,
}

/// The stager, started before `Go`: if it cannot be, nothing is committed.
pub struct StartedStager {
    stager: Stager,
    inbox: stager::Inbox,
    events: mpsc::UnboundedReceiver<stager::Event>,
}

/// Starts the checkpoint stager over a store whose epoch 0 is `switchover`
/// (the VM's state at the switchover, postcard `MachineState`).
pub fn start_stager(
    switchover: &[u8],
    memory: &Arc<GuestMemory>,
    staging: &StagingLimits,
    vm: &str,
) -> Result<StartedStager, MigrationError> {
    let switchover = MachineState::from_bytes(switchover).map_err(MigrationError::vm)?;
    let store = CheckpointStore::new(Arc::clone(memory), switchover, staging.clone());
    let (stager, inbox, events) = Stager::start(store, vm.to_string())
        .map_err(|source| MigrationError::vm(VmError::Thread { what: "checkpoint stager", source }))?;
    Ok(StartedStager { stager, inbox, events })
}

/// The destination sent a checkpoint the store refuses: it is faulty.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckpointRefused(String);

/// The destination's heartbeats go on but its checkpoints stopped (a gray failure).
#[derive(Debug, thiserror::Error)]
#[error("no checkpoint from the destination for {silent_ms} ms while its heartbeats go on (checkpoint {last_committed} was the last committed)")]
pub struct CheckpointStall {
    silent_ms: u128,
    last_committed: u64,
}

/// PostCopyFT at the source, from `Go` on.
pub struct FtSource {
    stager: Stager,
    events: mpsc::UnboundedReceiver<stager::Event>,
    timeouts: FtTimeouts,
    /// When the source last renewed the destination's lease (`Go` or a heartbeat ack).
    last_renewal: Instant,
    /// When the stager last handled a checkpoint frame or the source last acked a commit.
    checkpoint_progress: Instant,
    /// Checkpoint payload bytes handled and not yet returned as credit.
    credit_owed: u64,
    /// The last epoch the stager committed.
    committed_epoch: u64,
    /// The most output records the destination said (in a heartbeat) it had released.
    destination_released: u64,
}

impl FtSource {
    /// PostCopyFT from `go_at` (when `Go` went out, which grants the first
    /// lease); returns it and the inbox the reply reader hands checkpoint frames to.
    pub fn new(started: StartedStager, go_at: Instant, timeouts: FtTimeouts) -> (FtSource, stager::Inbox) {
        let StartedStager { stager, inbox, events } = started;
        let ft = FtSource {
            stager,
            events,
            timeouts,
            last_renewal: go_at,
            checkpoint_progress: go_at,
            credit_owed: 0,
            committed_epoch: 0,
            destination_released: 0,
        };
        (ft, inbox)
    }

    /// The stager's next event (waits for it; None once the stager is gone).
    pub async fn next_event(&mut self) -> Option<stager::Event> {
        self.events.recv().await
    }

    /// An event the stager already sent, if any.
    pub fn try_event(&mut self) -> Option<stager::Event> {
        self.events.try_recv().ok()
    }

    /// Acts on what the stager did; returns what to send the destination, in
    /// order: credit given back, and an ack for a commit.
    pub fn on_event(&mut self, event: stager::Event) -> Result<Vec<MigrationMessage>, CheckpointRefused> {
        self.checkpoint_progress = Instant::now();
        let mut send = Vec::new();
        match event {
            stager::Event::Credit(bytes) => {
                self.credit_owed += bytes;
                // In pieces of a window's eighth: few frames, and the destination never waits long.
                if self.credit_owed >= CHECKPOINT_WINDOW / 8 {
                    send.extend(self.give_credit());
                }
            }
            stager::Event::Committed { epoch, .. } => {
                self.committed_epoch = epoch;
                send.extend(self.give_credit());
                send.push(MigrationMessage::CheckpointAck { epoch });
            }
            stager::Event::Refused(reason) => return Err(CheckpointRefused(reason)),
        }
        Ok(send)
    }

    fn give_credit(&mut self) -> Option<MigrationMessage> {
        (self.credit_owed > 0)
            .then(|| MigrationMessage::CheckpointCredit { bytes: std::mem::take(&mut self.credit_owed) })
    }

    /// The last epoch committed here.
    pub fn committed_epoch(&self) -> u64 {
        self.committed_epoch
    }

    /// The destination's lease length.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.timeouts.heartbeat
    }

    /// A heartbeat said the destination had released `released` records of the output log.
    pub fn heard_released(&mut self, released: u64) {
        self.destination_released = self.destination_released.max(released);
    }

    /// The source renewed the destination's lease at `now` (a heartbeat ack went out).
    pub fn renewed(&mut self, now: Instant) {
        self.last_renewal = now;
    }

    /// Past this, without checkpoint progress, the destination may have stalled.
    pub fn stall_deadline(&self) -> Instant {
        self.checkpoint_progress + self.timeouts.checkpoint
    }

    /// A stall: the destination is heard (heartbeats) but sends no checkpoint,
    /// though nothing of it waits here to be handled and every commit was
    /// acked. `waiting_on_destination`: the reply reader waits for its next frame.
    pub fn stall(&self, now: Instant, waiting_on_destination: bool) -> Option<CheckpointStall> {
        (now >= self.stall_deadline() && self.stager.idle() && waiting_on_destination).then(|| CheckpointStall {
            silent_ms: self.checkpoint_progress.elapsed().as_millis(),
            last_committed: self.committed_epoch,
        })
    }

    /// Ends PostCopyFT's side: whatever arrived before the end is handled (a
    /// whole last epoch too), then the store is final.
    pub async fn finish(self) -> FtEnd {
        let FtSource { stager, timeouts, last_renewal, checkpoint_progress, destination_released, .. } = self;
        FtEnd {
            store: stager.stop().await,
            lease: timeouts.heartbeat,
            last_renewal,
            checkpoint_progress,
            destination_released,
        }
    }
}

/// PostCopyFT at the source after the migration loop: the final store.
pub struct FtEnd {
    pub store: CheckpointStore,
    lease: Duration,
    last_renewal: Instant,
    /// When the stager last handled a checkpoint frame or the source last acked a commit.
    pub checkpoint_progress: Instant,
    /// The most output records the destination said it had released: a
    /// failover need not release those again.
    pub destination_released: u64,
}

impl FtEnd {
    /// When the source may restore its copy, the destination lost at
    /// `detected_at` (None: never; see `lease::source_may_restore_at`).
    pub fn restore_at(&self, copy: DestinationCopy, detected_at: Instant) -> Option<Instant> {
        lease::source_may_restore_at(copy, detected_at, self.last_renewal, self.lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::ft::failover::release_from;
    use crate::migration::ft::stager::Input;
    use crate::migration::ft::store::tests::state;
    use crate::wire::frame::{PageBatch, PageData};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failover_starts_releasing_past_what_the_destination_reported() {
        let memory = Arc::new(GuestMemory::new(4 << 20, 4 << 20).unwrap());
        // The switchover's state: 5 records, all released by the source itself.
        let started = start_stager(&state(5).to_bytes(), &memory, &StagingLimits::default(), "vm1").unwrap();
        let timeouts = FtTimeouts { heartbeat: Duration::from_millis(200), checkpoint: Duration::from_secs(3) };
        let (mut ft, inbox) = FtSource::new(started, Instant::now(), timeouts);
        // Epoch 1 commits 40 records; the destination releases them on the ack
        // and says so in its heartbeats (out of order too: the most counts).
        inbox.send(Input::Pages { batch: PageBatch::from_pages(vec![(0x1000, PageData::Zero)]), credit: 10 });
        inbox.send(Input::Commit { epoch: 1, pages: 1, state: state(40).to_bytes(), credit: 10 });
        for released in [5, 30, 12] {
            ft.heard_released(released);
        }
        let end = ft.finish().await;
        assert_eq!(end.destination_released, 30);
        let committed = end.store.into_committed().unwrap();
        assert_eq!(committed.epoch, 1);
        let records = committed.state.devices.output_log.len() as u64;
        // The failover re-releases 30..40, not 5..40.
        assert_eq!(release_from(5, end.destination_released, records), 30);
    }
}
