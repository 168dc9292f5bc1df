//! The destination's end of the demand channel (see the source's
//! `migration/source/demand.rs`): the connection that carries the pages this
//! destination asked for, read ahead of the main connection's pushed pages.

use crate::wire::frame::{Frame, FrameReader, PageBatch, ProtocolError};
use crate::wire::migration::MigrationMessage;
use crate::wire::read_ahead::ReadAhead;
use tokio::sync::oneshot;

/// Page batches read ahead on the demand channel, at most.
const READ_AHEAD_FRAMES: usize = 2;

/// The demand channel, as far as the destination has it.
pub enum DemandChannel {
    /// There is none: the source named none, or it is closed (every page it
    /// carried is installed).
    None,
    /// The source named one in `Begin`; the agent hands it over once the source connects.
    Expected(oneshot::Receiver<FrameReader>),
    Open(ReadAhead<MigrationMessage>),
}

/// What happened on the demand channel.
pub enum DemandEvent {
    /// The source connected it.
    Opened,
    Pages(PageBatch),
    /// A message, where only page batches belong (its debug form).
    Message(String),
    /// The source closed it after its last page.
    Closed,
    Failed(ProtocolError),
    /// The agent let go of it without a connection (the migration is ending).
    Gone,
}

impl DemandChannel {
    /// The channel a source may open (None: it named none).
    pub fn expected(arrives: Option<oneshot::Receiver<FrameReader>>) -> Self {
        arrives.map_or(DemandChannel::None, DemandChannel::Expected)
    }

    /// The next event; never, once there is no channel (cancel safe).
    pub async fn next(&mut self) -> DemandEvent {
        match self {
            DemandChannel::None => std::future::pending().await,
            DemandChannel::Expected(arrives) => match arrives.await {
                Ok(reader) => {
                    *self = DemandChannel::Open(ReadAhead::spawn(reader, READ_AHEAD_FRAMES));
                    DemandEvent::Opened
                }
                Err(_) => {
                    *self = DemandChannel::None;
                    DemandEvent::Gone
                }
            },
            DemandChannel::Open(frames) => {
                let frame = frames.read().await;
                self.event(frame)
            }
        }
    }

    /// The next event if one is ready now (a frame read ahead, or the channel's end).
    pub fn ready(&mut self) -> Option<DemandEvent> {
        let DemandChannel::Open(frames) = self else { return None };
        let frame = frames.try_read()?;
        Some(self.event(frame))
    }

    /// What a frame read from the open channel means (after its end, there is no channel).
    fn event(&mut self, frame: Result<Frame<MigrationMessage>, ProtocolError>) -> DemandEvent {
        let event = match frame {
            Ok(Frame::Pages(batch)) => DemandEvent::Pages(batch),
            Ok(Frame::Message(message)) => DemandEvent::Message(format!("{message:?}")),
            Err(ProtocolError::Closed) => DemandEvent::Closed,
            Err(e) => DemandEvent::Failed(e),
        };
        if matches!(event, DemandEvent::Closed | DemandEvent::Failed(_)) {
            *self = DemandChannel::None;
        }
        event
    }

    /// Whether a channel is expected or open.
    pub fn is_some(&self) -> bool {
        !matches!(self, DemandChannel::None)
    }

    /// Gives an installed batch's buffer back to the channel's reader.
    pub fn recycle(&self, batch: PageBatch) {
        if let DemandChannel::Open(frames) = self {
            frames.recycle(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{encode_message, FrameWriter, PageBatchWriter};

    /// A connection over loopback: its reading end (the destination's) and writing end (the source's).
    async fn connection() -> (FrameReader, FrameWriter) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (FrameReader::new(server.into_split().0), FrameWriter::new(client.into_split().1))
    }

    #[tokio::test]
    async fn expected_then_open_then_pages_in_order_then_closed_then_none() {
        let (tx, rx) = oneshot::channel();
        let mut channel = DemandChannel::expected(Some(rx));
        assert!(channel.is_some());
        assert!(channel.ready().is_none(), "nothing before the source connects");
        let (reader, mut writer) = connection().await;
        tx.send(reader).map_err(drop).unwrap();
        assert!(matches!(channel.next().await, DemandEvent::Opened));
        let mut batch = PageBatchWriter::new();
        for page in [3u64, 9] {
            batch.push(page * 4096, &[page as u8; 4096]);
            writer.write_pages(&mut batch).await.unwrap();
        }
        writer.shutdown().await.unwrap();
        let mut got = Vec::new();
        loop {
            match channel.next().await {
                DemandEvent::Pages(batch) => {
                    got.extend(batch.pages().map(|(gpa, data)| (gpa, data.unwrap()[0])));
                    channel.recycle(batch);
                }
                DemandEvent::Closed => break,
                _ => panic!("only pages, then the end"),
            }
        }
        assert_eq!(got, [(3 * 4096, 3), (9 * 4096, 9)]);
        assert!(!channel.is_some(), "after its end there is no channel");
        assert!(channel.ready().is_none());
    }

    #[tokio::test]
    async fn a_message_on_the_channel_is_reported_and_a_channel_never_named_never_comes() {
        let (reader, mut writer) = connection().await;
        let (tx, rx) = oneshot::channel();
        let mut channel = DemandChannel::expected(Some(rx));
        tx.send(reader).map_err(drop).unwrap();
        assert!(matches!(channel.next().await, DemandEvent::Opened));
        writer.write(&encode_message(&MigrationMessage::Go)).await.unwrap();
        // Read ahead: once it is there, `ready` has it without waiting.
        let ready = async {
            loop {
                if let Some(event) = channel.ready() {
                    return event;
                }
                tokio::task::yield_now().await;
            }
        };
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), ready).await.expect("read ahead");
        assert!(matches!(event, DemandEvent::Message(m) if m.contains("Go")));
        // The agent let go of a channel without a connection.
        let (tx, rx) = oneshot::channel::<FrameReader>();
        let mut gone = DemandChannel::expected(Some(rx));
        drop(tx);
        assert!(matches!(gone.next().await, DemandEvent::Gone));
        assert!(!gone.is_some());
        // None named: nothing ever happens.
        let mut none = DemandChannel::expected(None);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), none.next()).await;
        assert!(waited.is_err());
    }
}
