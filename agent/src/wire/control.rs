//! The control messages: the `pcft` CLI's requests to an agent and its
//! answers (frame kind 3, `CONTROL_VERSION`), on a connection greeted with
//! `Role::Control`.

use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::MachineConfig;
use crate::vmm::run_log::RunLogSnapshot;
use crate::wire::message_set::{MessageEnum, MessageSet};
use crate::wire::payload::{MigrationOptions, MigrationReport, MigrationStatus, Mode, VmPhase, VmStatus};
use serde::{Deserialize, Serialize};

/// CLI → agent, and the answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlMessage {
    Ping,
    Pong,
    /// The request cannot be served as asked (no such VM, no room, bad peer); says why.
    Refuse {
        reason: String,
    },
    /// The request was carried out and failed (a migration broke, a VM does not match its oracle).
    Failed {
        reason: String,
        /// The VM still runs at this agent: the migration failed before its
        /// switchover, or was cancelled (a failure to tell by kind, not by text).
        vm_runs_here: bool,
    },
    StartVm {
        name: String,
        config: MachineConfig,
        tracking: DirtyTracking,
    },
    Status,
    StatusReport {
        agent: String,
        vms: Vec<VmStatus>,
    },
    /// Migrate VM `name` to agent `to`. The answer is `Migrated` when it
    /// ends, or, with `detach`, `MigrationStarted` at once (then
    /// `MigrationStatus`, `WaitMigration` and `CancelMigration` follow it).
    /// The migration goes on in the agent whether or not the asker waits.
    Migrate {
        name: String,
        to: String,
        mode: Mode,
        options: MigrationOptions,
        detach: bool,
    },
    Migrated(MigrationReport),
    MigrationStarted {
        vm: String,
        to: String,
        mode: Mode,
    },
    /// The latest outgoing migration of VM `name`: `MigrationStatusReport`.
    MigrationStatus {
        name: String,
    },
    MigrationStatusReport(MigrationStatus),
    /// Wait (at most `timeout_ms`) for VM `name`'s outgoing migration to end;
    /// the answer is the one `Migrate` would have given.
    WaitMigration {
        name: String,
        timeout_ms: u64,
    },
    /// Cancel VM `name`'s outgoing migration: `CancelAccepted`, or refused with the reason.
    CancelMigration {
        name: String,
    },
    CancelAccepted {
        vm: String,
        /// PostCopyFT after the switchover: the cancel is a deliberate failover
        /// (the destination is fenced and the last committed checkpoint restored here).
        failover: bool,
    },
    /// Stop VM `name`'s guest for good (its record stays): `Stopped`.
    StopVm {
        name: String,
    },
    Stopped {
        name: String,
        /// The phase it was in (`running`, or already not running: nothing was done).
        was: VmPhase,
    },
    /// Forget VM `name` and free what it holds (refused while it runs or migrates).
    RemoveVm {
        name: String,
    },
    Removed {
        name: String,
    },
    /// Wait until the VM's workload finishes here, then verify it against its oracle.
    WaitFinished {
        name: String,
        timeout_ms: u64,
    },
    Verified {
        name: String,
        records: u64,
        memory_digest: u64,
    },
    Ok,
    /// When the vCPUs of every copy of VM `name` this agent ran were in the
    /// guest (the "one copy at a time" check of the demo and chaos).
    RunLog {
        name: String,
    },
    /// The answer to `RunLog`, on `CLOCK_BOOTTIME`.
    RunLogReport {
        vm: String,
        runs: RunLogSnapshot,
    },
}

impl MessageEnum for ControlMessage {
    const SET: MessageSet = MessageSet::Control;
}
