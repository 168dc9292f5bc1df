//! The migration messages: what a source agent and a destination agent say
//! to each other (frame kind 4, `MIGRATION_VERSION`; the page batches of
//! frame kind 2 go with them), on a connection greeted with `Role::Migration`.

use crate::vmm::machine::MachineConfig;
use crate::wire::greeting::DemandToken;
use crate::wire::message_set::{MessageEnum, MessageSet};
use crate::wire::payload::{DestinationStats, MigrationOptions, Mode};
use serde::{Deserialize, Serialize};

/// Source agent ↔ destination agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MigrationMessage {
    /// The destination will not take the VM (no room, bad options); says why.
    Refuse {
        reason: String,
    },
    /// `demand_token`: the source will open a demand channel (`Role::DemandChannel`)
    /// with this token once the destination is `Ready`.
    Begin {
        name: String,
        config: Box<MachineConfig>,
        mode: Mode,
        options: MigrationOptions,
        demand_token: Option<DemandToken>,
    },
    Ready,
    /// The VM stopped at the source: its state (a postcard `MachineState`) and,
    /// for hybrid, the pages the destination must drop because they changed after they were sent.
    Switchover {
        state: Vec<u8>,
        stale: Vec<u64>,
    },
    /// Destination → source: the VM is rebuilt here, paused, and will run on `Go`.
    Restored,
    /// Source → destination: the switchover is committed; run the VM. Until the
    /// destination gets this it never runs the VM, so if the link breaks before
    /// it the source resumes its own copy and only one ever runs.
    Go,
    /// Destination → source: the VM runs here now.
    Resumed,
    /// Destination → source: pages the guest is waiting for.
    PageRequest {
        gpas: Vec<u64>,
    },
    /// Source → destination: every page has been sent. `demand_pages`: the
    /// demand channel carried this many and is closed (the destination reads
    /// it to its end before it checks that every page is here); None: there
    /// was no demand channel, requested pages came on this connection.
    AllSent {
        pages: u64,
        demand_pages: Option<u64>,
    },
    /// Destination → source: every page is in place.
    Complete(DestinationStats),
    /// Either side stops the migration. From the destination after the
    /// switchover, `paused` says it tripped its fence and every vCPU of its
    /// copy acknowledged a pause: only then may the source restore its copy
    /// without waiting out the lease (docs/architecture.md, "Fencing").
    Abort {
        reason: String,
        paused: bool,
    },
    /// Source → destination, hybrid, while the VM still runs at the source:
    /// drop these pages (they changed after they were sent); they will come in post-copy.
    Discard {
        gpas: Vec<u64>,
    },
    /// Destination → source: the pages of the last `Discard` are dropped.
    Discarded,
    /// Destination → source, PostCopyFT: the commit record of checkpoint
    /// `epoch`, after its `pages` page records (page frames from the destination
    /// are always checkpoint pages) and with the VM's state at the epoch's pause.
    CheckpointCommit {
        epoch: u64,
        pages: u64,
        state: Vec<u8>,
    },
    /// Source → destination: checkpoint `epoch` is current at the source; its output may go out.
    CheckpointAck {
        epoch: u64,
    },
    /// Destination → source, PostCopyFT: still here, and how far the
    /// destination has released the guest's output: `released` records of the
    /// output log have gone out (written to its output sink). After a failover
    /// the source re-releases only the committed records past it.
    Heartbeat {
        seq: u64,
        released: u64,
    },
    /// Source → destination: heartbeat `seq` arrived; renews the destination's lease.
    HeartbeatAck {
        seq: u64,
    },
    /// Source → destination, PostCopyFT, after `Complete`: the source will not
    /// restore its copy unless the destination says it did not take this
    /// (`Abort`); the VM is the destination's alone and its output may all go out.
    Finish,
    /// Destination → source, PostCopyFT: `Finish` arrived while the lease held;
    /// the VM runs here for good. Nothing follows it on the connection.
    Finished,
    /// Source → destination, PostCopyFT: the source has handled this many more
    /// payload bytes of checkpoint frames; the destination may send as many more
    /// (see `CHECKPOINT_WINDOW`).
    CheckpointCredit {
        bytes: u64,
    },
}

impl MessageEnum for MigrationMessage {
    const SET: MessageSet = MessageSet::Migration;
}
