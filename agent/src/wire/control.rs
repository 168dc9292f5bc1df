//! The control messages: the `pcft` CLI's requests to an agent and its
//! answers (frame kind 3, `CONTROL_VERSION`), on a connection greeted with
//! `Role::Control`.

use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::MachineConfig;
use crate::vmm::run_log::RunLogSnapshot;
use crate::wire::message_set::{MessageEnum, MessageSet};
use crate::wire::payload::{MigrationOptions, MigrationReport, Mode, VmStatus};
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
    Migrate {
        name: String,
        to: String,
        mode: Mode,
        options: MigrationOptions,
    },
    Migrated(MigrationReport),
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
