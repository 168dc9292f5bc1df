//! What agents and the CLI say to each other (the payload of message frames).

use crate::machine::MachineConfig;
use serde::{Deserialize, Serialize};

/// How a VM moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Iterative rounds while the VM runs, then stop-and-copy.
    Precopy,
    /// Switch at once; the destination pulls pages on demand while the source pushes the rest.
    Postcopy,
    /// Pre-copy rounds, then post-copy for what is still dirty.
    Hybrid,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }

    pub fn uses_postcopy(self) -> bool {
        self != Mode::Precopy
    }
}

/// Tuning of one migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationOptions {
    /// Pre-copy: most rounds before stop-and-copy (hybrid: rounds before switching to post-copy).
    pub max_rounds: u32,
    /// Pre-copy: stop iterating once a round leaves at most this many dirty pages.
    pub converge_pages: u64,
    /// How long the source waits for each answer of the destination before the
    /// switchover commits; past it the migration fails and the VM keeps running at the source.
    pub reply_timeout_ms: u64,
    /// Post-copy: most pages per second the background push sends (0: no limit).
    /// Pages the destination asks for are never held back.
    pub postcopy_pages_per_sec: u64,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions { max_rounds: 30, converge_pages: 256, reply_timeout_ms: 30_000, postcopy_pages_per_sec: 0 }
    }
}

/// Who opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The `pcft` CLI, with requests.
    Control,
    /// Another agent, migrating a VM here.
    Migration,
}

/// Where a VM is in its life on one agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmPhase {
    Running,
    /// Being migrated away from this agent.
    MigratingOut,
    /// Being received by this agent (post-copy: running here while pages arrive).
    MigratingIn,
    /// Moved to another agent; nothing runs here.
    MigratedAway,
    /// The workload finished.
    Finished,
    Failed,
}

/// One VM as `pcft vm status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub phase: VmPhase,
    pub fixture: String,
    pub vcpus: u64,
    pub mem_bytes: u64,
    pub records: u64,
    pub error: Option<String>,
}

/// Median and 99th percentile, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
}

/// What the destination measured, sent back when it has every page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationStats {
    /// Distinct pages the guest (or the VMM) faulted on before they arrived.
    pub pages_faulted: u64,
    pub fault_latency_us: Percentiles,
    /// Microseconds from receiving the switchover to the vCPUs running.
    pub resume_us: u64,
}

/// The migration report (JSON field names follow QEMU's `query-migrate` where they fit).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub vm: String,
    pub mode: String,
    pub mem_bytes: u64,
    pub total_migration_ms: f64,
    /// Source pause to the destination's "resumed", as the source saw it.
    pub downtime_ms: f64,
    pub bytes_sent: u64,
    /// Every page record sent (pre-copy rounds, final copy, post-copy push and demand).
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Pre-copy rounds, round 0 (the full copy) included.
    pub rounds: u32,
    /// Pages sent by the post-copy background push.
    pub pages_pushed: u64,
    /// Pages sent because the destination asked for them.
    pub pages_faulted: u64,
    pub fault_latency_us: Percentiles,
    /// Pages still dirty when the VM stopped (pre-copy: the stop-and-copy set; hybrid: left to post-copy).
    pub final_dirty_pages: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Ping,
    Pong,
    /// First frame on every connection.
    Hello {
        role: Role,
        agent: String,
    },
    Welcome {
        agent: String,
    },
    /// The request cannot be served as asked (no such VM, no room, bad peer); says why.
    Refuse {
        reason: String,
    },
    /// The request was carried out and failed (a migration broke, a VM does not match its oracle).
    Failed {
        reason: String,
    },

    // CLI → agent, and the answers.
    StartVm {
        name: String,
        config: MachineConfig,
        tracking: crate::dirty::DirtyTracking,
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

    // Source agent → destination agent.
    Begin {
        name: String,
        config: MachineConfig,
        mode: Mode,
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
    /// Source → destination: every page has been sent.
    AllSent {
        pages: u64,
    },
    /// Destination → source: every page is in place.
    Complete(DestinationStats),
    Abort {
        reason: String,
    },
    /// Source → destination, hybrid, while the VM still runs at the source:
    /// drop these pages (they changed after they were sent); they will come in post-copy.
    Discard {
        gpas: Vec<u64>,
    },
    /// Destination → source: the pages of the last `Discard` are dropped.
    Discarded,
}
