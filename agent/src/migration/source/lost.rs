//! How the destination was lost after the commit, as the source saw it: a
//! [`FailureKind`] for reports and metrics, and the typed [`Cause`] whose
//! text is the report's reason.

use crate::migration::error::{FailureKind, MigrationError};
use crate::migration::ft::lease::DestinationCopy;
use crate::migration::ft::source::{CheckpointRefused, CheckpointStall};

/// What the source saw when it gave up on the destination.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("the connection closed")]
    Closed,
    /// The reply reader's account of the connection's end (or of a frame not allowed).
    #[error("{0}")]
    Reader(String),
    /// A write failed, or was blocked while the destination was silent too long.
    #[error("{0}")]
    Write(MigrationError),
    /// The destination sent `Abort`; `paused`: it says every vCPU of its copy is stopped.
    #[error("destination aborted: {reason}")]
    Aborted { reason: String, paused: bool },
    #[error("no word from the destination for {silent_ms} ms")]
    Silent { silent_ms: u128 },
    #[error(transparent)]
    Stalled(#[from] CheckpointStall),
    #[error(transparent)]
    CheckpointRefused(#[from] CheckpointRefused),
    #[error("the destination completed before all pages were sent")]
    CompletedEarly,
    #[error("page frames from the destination")]
    PagesWithoutFt,
    #[error("a checkpoint (epoch {epoch}, {pages} pages) without PostCopyFT")]
    CheckpointWithoutFt { epoch: u64, pages: u64 },
    #[error("Finished before Finish")]
    FinishedEarly,
    #[error("no answer within {patience_ms} ms")]
    NoAnswer { patience_ms: u128 },
    /// After `Finish`: no `Finished` came (why).
    #[error("the destination did not confirm Finish ({0})")]
    FinishUnconfirmed(Box<Cause>),
    /// What the destination said (in the queue after a failed write), and what the source saw first.
    #[error("{said} ({seen})")]
    Explained { said: Box<Cause>, seen: Box<Cause> },
    /// Not a loss: the operator cancelled the migration after the commit (PostCopyFT).
    #[error("the operator cancelled the migration after the switchover: the source stopped renewing the destination's lease and restores its last committed checkpoint once the lease has run out (a deliberate failover)")]
    Cancelled,
}

impl Cause {
    /// Whether this comes from the destination's own `Abort`.
    pub fn aborted(&self) -> bool {
        match self {
            Cause::Aborted { .. } => true,
            Cause::Explained { said, .. } => said.aborted(),
            _ => false,
        }
    }

    /// Whether the destination said, in an `Abort`, that every vCPU of its copy is stopped.
    fn destination_paused(&self) -> bool {
        match self {
            Cause::Aborted { paused, .. } => *paused,
            Cause::Explained { said, .. } => said.destination_paused(),
            _ => false,
        }
    }
}

/// The destination was lost after the commit.
#[derive(Debug, thiserror::Error)]
#[error("{cause}")]
pub struct Lost {
    pub kind: FailureKind,
    pub cause: Cause,
}

impl Lost {
    pub fn new(kind: FailureKind, cause: Cause) -> Lost {
        Lost { kind, cause }
    }

    /// The operator cancelled after the commit (PostCopyFT): the source lets
    /// the destination go as if lost. Its copy may run until its lease is out.
    pub fn cancelled() -> Lost {
        Lost::new(FailureKind::Cancelled, Cause::Cancelled)
    }

    /// The destination broke the protocol.
    pub fn protocol(cause: impl Into<Cause>) -> Lost {
        Lost::new(FailureKind::Protocol, cause.into())
    }

    /// A write to the destination failed (or timed out: it is silent).
    pub fn from_write(e: MigrationError) -> Lost {
        let kind = match &e {
            MigrationError::Timeout { .. } => FailureKind::HeartbeatTimeout,
            _ => FailureKind::ConnectionClosed,
        };
        Lost::new(kind, Cause::Write(e))
    }

    /// What this loss tells of the destination's copy (see `lease::source_may_restore_at`).
    pub fn destination_copy(&self) -> DestinationCopy {
        match self.kind {
            FailureKind::FinishUnconfirmed => DestinationCopy::MayOwnTheVm,
            _ if self.cause.destination_paused() => DestinationCopy::Stopped,
            _ => DestinationCopy::MayRun,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_before() {
        let aborted = Cause::Aborted { reason: "lease expired".into(), paused: true };
        let explained = Lost::new(
            FailureKind::ConnectionClosed,
            Cause::Explained { said: Box::new(aborted), seen: Box::new(Cause::Closed) },
        );
        assert_eq!(explained.to_string(), "destination aborted: lease expired (the connection closed)");
        assert!(explained.cause.aborted());
        assert_eq!(explained.destination_copy(), DestinationCopy::Stopped);
        let unconfirmed = Lost::new(
            FailureKind::FinishUnconfirmed,
            Cause::FinishUnconfirmed(Box::new(Cause::NoAnswer { patience_ms: 500 })),
        );
        assert_eq!(unconfirmed.to_string(), "the destination did not confirm Finish (no answer within 500 ms)");
        assert_eq!(unconfirmed.destination_copy(), DestinationCopy::MayOwnTheVm);
        // A cancelled destination is alive: its copy runs until its lease is out.
        assert_eq!(Lost::cancelled().destination_copy(), DestinationCopy::MayRun);
        assert_eq!(Lost::cancelled().kind.name(), "cancelled");
    }
}
