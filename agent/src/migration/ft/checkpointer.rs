//! PostCopyFT at the destination: reverse incremental checkpoints, one epoch
//! per interval, sent back to the source over the return path. Each epoch's
//! commit record goes out after its pages; the source commits the epoch
//! (ft/store.rs) and acks it, and only then is the epoch's output released.

use crate::fault::crash::{self, CrashPoint};
use crate::metrics;
use crate::metrics::timeline::EventKind;
use crate::migration::return_path::{ReturnPath, ReturnPathClosed};
use crate::vmm::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use crate::vmm::runner::{OutputMark, RunnerError, VmRunner};
use crate::wire::frame::{encode_message, PageBatchWriter};
use crate::wire::migration::MigrationMessage;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

/// Checkpoint epochs sent and not yet acked at most: the next epoch starts
/// only once the source has committed all but one of them.
const EPOCHS_IN_FLIGHT: u64 = 2;
/// Pages per checkpoint page frame.
const CHECKPOINT_BATCH_PAGES: usize = 64;

/// Epochs sent and not yet acked, with how far the guest's output (records
/// and network frames) reached at their pause.
pub type UnackedEpochs = Arc<Mutex<VecDeque<(u64, OutputMark)>>>;

/// Why an epoch could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Vm(#[from] RunnerError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Closed(#[from] ReturnPathClosed),
}

/// What the checkpointer task works with.
pub struct Checkpointer {
    pub runner: Arc<VmRunner>,
    pub memory: Arc<GuestMemory>,
    pub out: ReturnPath,
    pub interval: Duration,
    pub unacked: UnackedEpochs,
    /// The last epoch the source acked.
    pub acked: watch::Receiver<u64>,
    /// The longest pause so far (µs).
    pub pause_max_us: Arc<AtomicU64>,
}

impl Checkpointer {
    /// Reverse incremental checkpoints, one epoch per interval: the pages written
    /// since the last epoch are copied while the VM runs (speculative phase), then
    /// the VM pauses just long enough to take the pages written meanwhile and its
    /// state, and runs on while they and the commit record go out. An epoch starts
    /// only while fewer than `EPOCHS_IN_FLIGHT` are unacked: a source that falls
    /// behind slows the checkpoints (the guest runs on and its output waits), it
    /// does not make them pile up. Returns only when an epoch failed (or the
    /// connection is gone).
    pub async fn run(mut self) -> Result<(), (u64, CheckpointError)> {
        crash::checkpointer_at(CrashPoint::BeforeFirstCheckpoint).await;
        let mut epoch = 0;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            epoch += 1;
            if *self.acked.borrow() + EPOCHS_IN_FLIGHT < epoch {
                tracing::debug!(
                    epoch,
                    acked = *self.acked.borrow(),
                    "waiting for the source to commit before the next epoch"
                );
                if self.acked.wait_for(|&acked| acked + EPOCHS_IN_FLIGHT >= epoch).await.is_err() {
                    return Ok(());
                }
            }
            let span = tracing::info_span!("checkpoint", epoch);
            let pause = self.checkpoint(epoch).instrument(span).await.map_err(|e| (epoch, e))?;
            let detail = format!("epoch {epoch}: paused the guest {} µs", pause.as_micros());
            metrics::get().timeline.event(self.runner.name(), EventKind::CheckpointSent, detail);
            self.pause_max_us.fetch_max(pause.as_micros() as u64, Ordering::Relaxed);
            metrics::get().checkpoint_pause.observe(pause.as_secs_f64());
            crash::stall_at(CrashPoint::Committed(epoch)).await;
        }
    }

    /// One epoch; returns how long the pause took.
    async fn checkpoint(&self, epoch: u64) -> Result<Duration, CheckpointError> {
        let (runner, memory, out) = (&self.runner, &self.memory, &self.out);
        // Speculative: copy while the guest runs. A page written during the copy is
        // dirty again and goes again in the pause, so a torn copy never survives.
        let speculative = runner.take_dirty_pages().await?;
        let mut batch = PageBatchWriter::new();
        for (i, chunk) in speculative.chunks(CHECKPOINT_BATCH_PAGES).enumerate() {
            for &gpa in chunk {
                // Pages the guest wrote: they are there.
                batch.push_with(gpa, |buf| memory.read_present(gpa, buf))?;
            }
            out.checkpoint_frame(batch.finish()).await?;
            if i == 0 {
                crash::checkpointer_at(CrashPoint::Speculative(epoch)).await;
            }
        }
        let capture = runner.checkpoint(epoch).await?;
        for (chunk, data) in capture
            .dirty
            .chunks(CHECKPOINT_BATCH_PAGES)
            .zip(capture.data.chunks(CHECKPOINT_BATCH_PAGES * PAGE_SIZE as usize))
        {
            for (&gpa, page) in chunk.iter().zip(data.chunks_exact(PAGE_SIZE as usize)) {
                batch.push(gpa, page);
            }
            out.checkpoint_frame(batch.finish()).await?;
        }
        let pages = (speculative.len() + capture.dirty.len()) as u64;
        let outputs = OutputMark::of(&capture.state.devices);
        crate::fault::frame_trace::epoch(epoch, outputs.frames);
        let commit =
            encode_message(&MigrationMessage::CheckpointCommit { epoch, pages, state: capture.state.to_bytes() });
        // A crash at `committed:N` hits before the record is queued: the
        // return path's writer (a thread of its own) would otherwise race the
        // signal and often deliver it. A stall there comes after (the loop).
        crash::at(CrashPoint::Committed(epoch));
        queue_commit(epoch, outputs, commit, out, &self.unacked).await?;
        tracing::debug!(
            epoch,
            speculative = speculative.len(),
            paused = capture.dirty.len(),
            pause_us = capture.pause.as_micros() as u64,
            "checkpoint sent"
        );
        Ok(capture.pause)
    }
}

/// Queues an epoch's commit record, having first noted the epoch as unacked
/// with its output: the source's ack may arrive as soon as the record leaves,
/// and it must find the epoch whose output it releases.
async fn queue_commit(
    epoch: u64,
    outputs: OutputMark,
    commit: Vec<u8>,
    out: &ReturnPath,
    unacked: &UnackedEpochs,
) -> Result<(), ReturnPathClosed> {
    unacked.lock().expect("unacked epochs lock").push_back((epoch, outputs));
    out.checkpoint_frame(commit).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::return_path::tests::{return_path_for_test, take_credit};
    use crate::wire::frame::{CHECKPOINT_WINDOW, HEADER_BYTES};

    #[tokio::test]
    async fn an_epoch_is_unacked_before_its_commit_record_can_leave() {
        // The source may ack a commit as soon as its record leaves: the epoch
        // (and the output it releases) must already be waiting for that ack.
        // Here the record waits for credit, and the epoch is noted meanwhile.
        let (out, _control_rx, mut checkpoints_rx) = return_path_for_test();
        take_credit(&out, CHECKPOINT_WINDOW as usize).await;
        let unacked: UnackedEpochs = Arc::default();
        let queued = tokio::spawn({
            let (out, unacked) = (out.clone(), Arc::clone(&unacked));
            let mark = OutputMark { records: 42, frames: 9 };
            async move { queue_commit(7, mark, vec![0; HEADER_BYTES + 3], &out, &unacked).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(checkpoints_rx.try_recv().is_err(), "no credit: the record has not left");
        let waiting = VecDeque::from([(7, OutputMark { records: 42, frames: 9 })]);
        assert_eq!(*unacked.lock().unwrap(), waiting, "the epoch waits for its ack already");
        out.credit.give_back(CHECKPOINT_WINDOW);
        queued.await.unwrap().unwrap();
        assert_eq!(checkpoints_rx.recv().await.unwrap().len(), HEADER_BYTES + 3);
    }
}
