//! Writes the source's frames to the destination and counts what went out.

use crate::migration::error::MigrationError;
use crate::migration::source::replies::Liveness;
use crate::vmm::memory::GuestMemory;
use crate::wire::frame::{encode_message, FrameWriter, PageBatchWriter};
use crate::wire::migration::MigrationMessage;
use std::sync::Arc;
use std::time::Instant;

/// Writes frames and counts what it sent.
pub struct Outbox {
    wr: FrameWriter,
    pub bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    /// PostCopyFT: a write blocked while the destination is silent for too long means it is lost.
    pub liveness: Option<Arc<Liveness>>,
}

impl Outbox {
    /// An outbox on `wr`, nothing sent yet.
    pub fn new(wr: FrameWriter) -> Outbox {
        Outbox { wr, bytes: 0, pages: 0, zero_pages: 0, liveness: None }
    }

    /// Sends one message.
    pub async fn message(&mut self, message: &MigrationMessage) -> Result<(), MigrationError> {
        let frame = encode_message(message);
        self.bytes += frame.len() as u64;
        self.write(&frame).await
    }

    async fn write(&mut self, frame: &[u8]) -> Result<(), MigrationError> {
        let Some(liveness) = self.liveness.clone() else {
            return Ok(self.wr.write(frame).await?);
        };
        // A partition blocks writes rather than failing them: give up once the
        // destination has been silent too long, however long the write took.
        // (The reader never waits on this loop: checkpoint frames go to the
        // stager, heartbeats and page requests to lanes of their own.)
        let write = self.wr.write(frame);
        tokio::pin!(write);
        loop {
            let wake = liveness.deadline().unwrap_or_else(|| Instant::now() + liveness.timeout);
            tokio::select! {
                written = &mut write => return Ok(written?),
                _ = tokio::time::sleep_until(wake.into()) => {
                    if liveness.deadline().is_some_and(|deadline| Instant::now() >= deadline) {
                        return Err(MigrationError::Timeout { what: "heartbeats while a frame was blocked".into(), after: liveness.timeout });
                    }
                }
            }
        }
    }

    /// Sends the pages at `gpas` from `memory`, in batches of `per_batch`.
    pub async fn pages(&mut self, memory: &GuestMemory, gpas: &[u64], per_batch: usize) -> Result<(), MigrationError> {
        let mut batch = PageBatchWriter::new();
        for chunk in gpas.chunks(per_batch) {
            for &gpa in chunk {
                batch.push_with(gpa, |buf| memory.read(gpa, buf)).map_err(MigrationError::vm)?;
            }
            self.pages += batch.len() as u64;
            self.zero_pages += u64::from(batch.zero_pages());
            let frame = batch.finish();
            self.bytes += frame.len() as u64;
            self.write(&frame).await?;
        }
        Ok(())
    }
}
