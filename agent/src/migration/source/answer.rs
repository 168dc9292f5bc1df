//! The destination's answers before the commit: one at a time, each within the reply timeout.

use crate::migration::error::MigrationError;
use crate::wire::frame::{Frame, FrameReader};
use crate::wire::migration::MigrationMessage;
use std::time::Duration;

/// Reads the destination's next answer (before the switchover commits), waiting at most `timeout`.
pub async fn expect(rd: &mut FrameReader, what: &str, timeout: Duration) -> Result<MigrationMessage, MigrationError> {
    let frame = tokio::time::timeout(timeout, rd.read())
        .await
        .map_err(|_| MigrationError::Timeout { what: what.to_string(), after: timeout })??;
    match frame {
        Frame::Message(MigrationMessage::Refuse { reason }) => Err(MigrationError::Refused(reason)),
        Frame::Message(MigrationMessage::Abort { reason, .. }) => Err(MigrationError::Aborted(reason)),
        Frame::Message(m) => Ok(m),
        Frame::Pages(_) => Err(MigrationError::Unexpected(format!("pages (waiting for {what})"))),
    }
}

/// The destination answered `other` where the protocol expects something else.
pub fn unexpected(other: &MigrationMessage) -> MigrationError {
    MigrationError::Unexpected(format!("{other:?}"))
}
