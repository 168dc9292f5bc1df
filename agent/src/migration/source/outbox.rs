//! Writes the source's frames to the destination and counts what went out.

use crate::migration::error::MigrationError;
use crate::migration::source::replies::Liveness;
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::wire::frame::{encode_message, FrameWriter, PageBatchParts, PageBatchWriter, ProtocolError};
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
    /// A frame's write began and did not finish (it failed, or a cancel
    /// dropped it half-way): the stream is no longer framed.
    torn: bool,
    /// The page batch being built; its buffers serve batch after batch.
    batch: PageBatchWriter,
}

/// A frame to write: encoded bytes, the batch in the outbox's writer, or a
/// batch whose pages are still in guest memory.
enum Outgoing<'a> {
    Encoded(&'a [u8]),
    Pages,
    PagesInPlace(PageBatchParts<'a>),
}

impl Outbox {
    /// An outbox on `wr`, nothing sent yet.
    pub fn new(wr: FrameWriter) -> Outbox {
        Outbox { wr, bytes: 0, pages: 0, zero_pages: 0, liveness: None, torn: false, batch: PageBatchWriter::new() }
    }

    /// Whether a frame was cut off (see `torn`): nothing more may go out.
    pub fn torn(&self) -> bool {
        self.torn
    }

    /// Sends one message.
    pub async fn message(&mut self, message: &MigrationMessage) -> Result<(), MigrationError> {
        let frame = encode_message(message);
        self.bytes += frame.len() as u64;
        self.write(Outgoing::Encoded(&frame)).await
    }

    async fn write(&mut self, frame: Outgoing<'_>) -> Result<(), MigrationError> {
        // Set until the whole frame is out, so a write whose future is dropped stays marked.
        self.torn = true;
        let liveness = self.liveness.clone();
        let written = match frame {
            Outgoing::Encoded(frame) => within(liveness, self.wr.write(frame)).await,
            Outgoing::Pages => {
                within(liveness, self.wr.write_pages(&mut self.batch)).await.map(|bytes| self.bytes += bytes)
            }
            Outgoing::PagesInPlace(batch) => {
                within(liveness, self.wr.write_page_parts(batch)).await.map(|bytes| self.bytes += bytes)
            }
        };
        self.torn = written.is_err();
        written
    }

    /// Ends the stream (the peer reads to its end): nothing more goes out.
    pub async fn close(&mut self) -> Result<(), MigrationError> {
        let liveness = self.liveness.clone();
        within(liveness, self.wr.shutdown()).await
    }

    /// Sends the pages at `gpas` from `memory`, in batches of `per_batch`.
    pub async fn pages(&mut self, memory: &GuestMemory, gpas: &[u64], per_batch: usize) -> Result<(), MigrationError> {
        for chunk in gpas.chunks(per_batch) {
            self.batch.clear();
            for &gpa in chunk {
                self.batch.push_with(gpa, |buf| memory.read(gpa, buf)).map_err(MigrationError::vm)?;
            }
            self.pages += self.batch.len() as u64;
            self.zero_pages += u64::from(self.batch.zero_pages());
            self.write(Outgoing::Pages).await?;
        }
        Ok(())
    }

    /// Sends the pages at `gpas` in batches of `per_batch` as [`pages`](Self::pages)
    /// does, but straight from guest memory, without copying them into the
    /// frame: only while the VM's vCPUs are stopped (post-copy; see
    /// `GuestMemory::paused_view`). Copies where memory may have pages missing.
    pub async fn paused_pages(
        &mut self,
        memory: &GuestMemory,
        gpas: &[u64],
        per_batch: usize,
    ) -> Result<(), MigrationError> {
        for chunk in gpas.chunks(per_batch) {
            // A view per frame: a checkpoint's commit waits for one frame at most.
            let Some(view) = memory.paused_view().await else {
                self.pages(memory, chunk, per_batch).await?;
                continue;
            };
            let mut batch = PageBatchParts::new();
            for (gpa, pages) in consecutive(chunk) {
                batch.push_run(gpa, view.pages(gpa, pages).map_err(MigrationError::vm)?);
            }
            self.pages += batch.len() as u64;
            self.zero_pages += u64::from(batch.zero_pages());
            self.write(Outgoing::PagesInPlace(batch)).await?;
        }
        Ok(())
    }
}

/// `gpas` as runs of pages consecutive in guest memory: (first page, pages).
fn consecutive(gpas: &[u64]) -> impl Iterator<Item = (u64, usize)> + '_ {
    gpas.chunk_by(|&a, &b| a.checked_add(PAGE_SIZE) == Some(b)).map(|run| (run[0], run.len()))
}

/// Runs one frame's `write`; with `liveness` (PostCopyFT), gives up once the
/// destination has been silent too long.
async fn within<T>(
    liveness: Option<Arc<Liveness>>,
    write: impl std::future::Future<Output = Result<T, ProtocolError>>,
) -> Result<T, MigrationError> {
    let Some(liveness) = liveness else {
        return Ok(write.await?);
    };
    // A partition blocks writes rather than failing them: give up once the
    // destination has been silent too long, however long the write took.
    // (The reader never waits on this loop: checkpoint frames go to the
    // stager, heartbeats and page requests to lanes of their own.)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn a_frame_cut_off_half_way_leaves_the_outbox_torn() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        // The peer accepts and reads nothing: a large frame blocks half-way.
        let (_peer, _) = listener.accept().await.unwrap();
        let mut out = Outbox::new(FrameWriter::new(stream.into_split().1));
        out.message(&MigrationMessage::Ready).await.unwrap();
        assert!(!out.torn(), "a whole frame went out");
        let large = MigrationMessage::Switchover { state: vec![7; 16 << 20], stale: Vec::new() };
        let cut = tokio::time::timeout(Duration::from_millis(200), out.message(&large)).await;
        assert!(cut.is_err(), "the frame cannot all go out to a peer that does not read");
        assert!(out.torn(), "the stream is no longer framed: nothing more may be written");
    }
}
