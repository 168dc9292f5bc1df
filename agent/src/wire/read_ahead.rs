//! Reads a connection's frames ahead, on a task of its own: while its owner
//! handles one frame (installs a page batch), the next ones are received and
//! their tags checked on the other core. Handled page batches come back
//! ([`ReadAhead::recycle`]) so that no frame allocates once the buffers exist.

use crate::wire::frame::{Frame, FrameReader, PageBatch, ProtocolError};
use crate::wire::message_set::WireMessage;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

/// A connection's frames, read by a task of its own at most `depth` frames ahead.
pub struct ReadAhead<M> {
    frames: mpsc::Receiver<Result<Frame<M>, ProtocolError>>,
    handled: mpsc::UnboundedSender<PageBatch>,
}

impl<M: WireMessage + Send + 'static> ReadAhead<M> {
    /// Starts reading `reader` on a task that ends after the first error (the
    /// end of the stream included) or as soon as this is dropped (dropping the reader).
    pub fn spawn<R: AsyncRead + Unpin + Send + 'static>(mut reader: FrameReader<R>, depth: usize) -> Self {
        let (tx, frames) = mpsc::channel(depth);
        let (handled, mut handled_rx) = mpsc::unbounded_channel::<PageBatch>();
        tokio::spawn(async move {
            loop {
                while let Ok(batch) = handled_rx.try_recv() {
                    reader.recycle(batch);
                }
                // Once the owner is gone, stop at once (a frame cut off half-way does not matter then).
                let frame = tokio::select! {
                    frame = reader.read::<M>() => frame,
                    () = tx.closed() => return,
                };
                let end = frame.is_err();
                if tx.send(frame).await.is_err() || end {
                    return;
                }
            }
        });
        ReadAhead { frames, handled }
    }

    /// The next frame, as [`FrameReader::read`] gives it (cancel safe: a frame
    /// is never lost to a dropped call). After the first error, `Closed`.
    pub async fn read(&mut self) -> Result<Frame<M>, ProtocolError> {
        self.frames.recv().await.unwrap_or(Err(ProtocolError::Closed))
    }

    /// The next frame if one was read already (None: none yet).
    pub fn try_read(&mut self) -> Option<Result<Frame<M>, ProtocolError>> {
        match self.frames.try_recv() {
            Ok(frame) => Some(frame),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(ProtocolError::Closed)),
        }
    }

    /// Gives a handled batch's buffer back to read a later frame into.
    pub fn recycle(&self, batch: PageBatch) {
        let _ = self.handled.send(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{encode_message, FrameWriter, PageBatchWriter};
    use crate::wire::migration::MigrationMessage;

    #[tokio::test]
    async fn frames_come_in_order_then_the_end_and_handled_buffers_are_read_into_again() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut writer = FrameWriter::new(client);
        let mut batch = PageBatchWriter::new();
        for round in 0..8u8 {
            batch.push(u64::from(round) * 4096, &[round | 1; 4096]);
            writer.write_pages(&mut batch).await.unwrap();
        }
        writer.write(&encode_message(&MigrationMessage::Go)).await.unwrap();
        drop(writer);
        let mut ahead = ReadAhead::<MigrationMessage>::spawn(FrameReader::new(server), 2);
        let mut buffers = std::collections::HashSet::new();
        for round in 0..8u8 {
            let Ok(Frame::Pages(got)) = ahead.read().await else { panic!("batch {round}") };
            let pages: Vec<(u64, u8)> = got.pages().map(|(gpa, data)| (gpa, data.unwrap()[0])).collect();
            assert_eq!(pages, [(u64::from(round) * 4096, round | 1)]);
            buffers.insert(got.payload_ptr());
            ahead.recycle(got);
        }
        assert_eq!(ahead.read().await, Ok(Frame::Message(MigrationMessage::Go)));
        assert_eq!(ahead.read().await, Err(ProtocolError::Closed));
        assert_eq!(ahead.read().await, Err(ProtocolError::Closed), "and after the end, the end");
        // Two read ahead, the handled ones read into again: a few buffers, not one per frame.
        assert!(buffers.len() <= 4, "{} buffers for 8 frames", buffers.len());
    }

    #[tokio::test]
    async fn dropping_it_drops_the_reader_though_no_frame_comes() {
        let (client, server) = tokio::io::duplex(1024);
        let ahead = ReadAhead::<MigrationMessage>::spawn(FrameReader::new(server), 2);
        drop(ahead);
        // The reading task let go of its end: the other end sees the stream closed.
        let mut writer = FrameWriter::new(client);
        let write = async {
            loop {
                if writer.write(&encode_message(&MigrationMessage::Go)).await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), write).await.expect("the reader was dropped");
    }
}
