//! The errors both ends of a migration share, and how a destination was lost.

use crate::vmm::machine::MachineError;
use crate::vmm::memory::MemoryError;
use crate::vmm::runner::RunnerError;
use crate::vmm::uffd::UffdError;
use crate::wire::frame::ProtocolError;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "cannot connect to the destination agent at {to}: {reason}; check that `pcft agent --listen {to}` runs there"
    )]
    Connect { to: String, reason: std::io::Error },
    #[error("the destination refused: {0}")]
    Refused(String),
    #[error("protocol error with the peer: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the peer sent {0} where the protocol expects something else")]
    Unexpected(String),
    #[error("the peer aborted the migration: {0}")]
    Aborted(String),
    #[error("VM error: {0}")]
    Vm(#[from] VmError),
    #[error("the destination did not answer ({what}) within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("the destination was lost after the switchover committed: {0}")]
    LostAfterCommit(String),
    #[error("fenced: {0}")]
    Fenced(String),
    /// At the source, before the commit point: the operator cancelled the
    /// migration (`Progress::request_cancel` answered `WillAbort`).
    #[error("the migration was cancelled before the switchover committed; the VM keeps running at the source")]
    Cancelled,
    /// At the destination, after the switchover: the source is gone, and the
    /// VM was stopped here (`checkpointed`: PostCopyFT, the source recovers it).
    #[error("the source was lost during post-copy ({cause}); {}", if *checkpointed {
        "the VM is stopped here (fenced); the source, if it is alive, recovers it from its last checkpoint (a dead source loses the VM: PostCopyFT covers the destination and the network, not the source)"
    } else {
        "the VM cannot complete here and is stopped"
    })]
    SourceLost { cause: Box<MigrationError>, checkpointed: bool },
}

/// What went wrong with the VM (not with the peer) during a migration.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Userfaultfd(#[from] UffdError),
    #[error("the VM state sent at the switchover does not decode: {0}")]
    StateDecode(#[from] postcard::Error),
    #[error("cannot start the {what} thread: {source}")]
    Thread { what: &'static str, source: std::io::Error },
    #[error("the VM was already restored")]
    AlreadyRestored,
    #[error("preparing the VM panicked: {0}")]
    Panicked(String),
}

impl MigrationError {
    /// At the destination: the VM ran here under PostCopyFT and this copy is
    /// stopped for good (fenced), for the source to recover the VM.
    pub fn fenced_here(&self) -> bool {
        matches!(self, MigrationError::SourceLost { checkpointed: true, .. })
    }

    /// A VM error, from anything that converts into one.
    pub fn vm(e: impl Into<VmError>) -> MigrationError {
        MigrationError::Vm(e.into())
    }
}

/// How the destination was lost after the commit (or, `Cancelled`, let go of
/// on purpose). None of these but an `Abort` that says so proves its copy
/// stopped (`Lost::destination_copy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The connection closed or was reset (by the destination's kernel, or by
    /// anything in between), or the destination aborted.
    ConnectionClosed,
    /// Silence past the heartbeat timeout, or a write that would not go out.
    HeartbeatTimeout,
    /// It sent something the protocol does not allow.
    Protocol,
    /// Its heartbeats went on but its checkpoints stopped (a gray failure).
    CheckpointStalled,
    /// After `Finish`: silence, so the source cannot know whether the
    /// destination took the VM. It must not restore its copy.
    FinishUnconfirmed,
    /// PostCopyFT: not a loss but the operator's cancel after the commit. The
    /// source lets the destination go on purpose (it stops renewing its lease
    /// and closes the connection) and fails over as for a lost one.
    Cancelled,
}

impl FailureKind {
    /// The name in reports and metrics (`failure.kind`).
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::ConnectionClosed => "connection-closed",
            FailureKind::HeartbeatTimeout => "heartbeat-timeout",
            FailureKind::Protocol => "protocol",
            FailureKind::CheckpointStalled => "checkpoint-stalled",
            FailureKind::FinishUnconfirmed => "finish-unconfirmed",
            FailureKind::Cancelled => "cancelled",
        }
    }
}
