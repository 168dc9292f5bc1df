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
