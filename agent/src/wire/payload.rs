//! The payload types that messages carry, shared by the control and the
//! migration messages: how a VM moves ([`Mode`], [`MigrationOptions`]), what
//! `pcft vm status` shows ([`VmStatus`]) and the migration report.

use serde::{Deserialize, Serialize};

/// How a VM moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Iterative rounds while the VM runs, then stop-and-copy.
    Precopy,
    /// Switch at once; the destination pulls pages on demand while the source pushes the rest.
    Postcopy,
    /// One full copy while the VM runs, then post-copy for the pages dirtied since.
    Hybrid,
    /// Post-copy with PostCopyFT: the destination streams reverse incremental
    /// checkpoints back to the source, which fails over to the last committed
    /// one if the destination or the network fails.
    #[serde(rename = "postcopy-ft")]
    PostcopyFt,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
            Mode::PostcopyFt => "postcopy-ft",
        }
    }

    /// Whether the destination checkpoints back to the source during post-copy.
    pub fn checkpoints(self) -> bool {
        self == Mode::PostcopyFt
    }

    /// Whether pages are copied while the VM still runs at the source.
    pub fn precopies(self) -> bool {
        matches!(self, Mode::Precopy | Mode::Hybrid)
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
    /// PostCopyFT: how often the destination checkpoints back to the source.
    pub checkpoint_interval_ms: u64,
    /// PostCopyFT: how often the destination sends a heartbeat (the source acks each one).
    pub heartbeat_interval_ms: u64,
    /// PostCopyFT: silence after which a side declares the other lost; also the
    /// destination's lease, counted from the heartbeat whose ack renewed it.
    pub heartbeat_timeout_ms: u64,
    /// PostCopyFT: how the destination tracks the pages the guest writes there.
    pub checkpoint_tracker: crate::vmm::dirty::DirtyTracking,
    /// PostCopyFT: how long the source waits for the destination's next
    /// checkpoint frame (once it has acked all it got) before it declares the
    /// destination failed even though its heartbeats go on.
    pub checkpoint_timeout_ms: u64,
}

impl MigrationOptions {
    /// See docs/architecture.md ("PostCopyFT") for why these defaults.
    pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 100;
    pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 20;
    pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 200;
    pub const DEFAULT_CHECKPOINT_TIMEOUT_MS: u64 = 3000;
    /// The shortest lease the fencing argument holds for: it must outlast a
    /// heartbeat's round trip and the source's restore, and the destination's
    /// scheduling delay must stay within a tenth of it plus 10 ms
    /// (docs/architecture.md, "Fencing: the lease argument").
    pub const MIN_HEARTBEAT_TIMEOUT_MS: u64 = 20;
    /// Heartbeats per lease at least: one late or lost heartbeat must not expire it.
    pub const MIN_HEARTBEATS_PER_LEASE: u64 = 3;

    /// Checks the PostCopyFT timings against each other (other modes use none
    /// of them). Every error names the options and what would work.
    pub fn validate(&self, mode: Mode) -> Result<(), OptionsError> {
        if !mode.checkpoints() {
            return Ok(());
        }
        let positive = [
            ("--heartbeat-interval", self.heartbeat_interval_ms),
            ("--heartbeat-timeout", self.heartbeat_timeout_ms),
            ("--checkpoint-interval", self.checkpoint_interval_ms),
            ("--checkpoint-timeout", self.checkpoint_timeout_ms),
        ];
        if let Some((option, _)) = positive.iter().find(|(_, ms)| *ms == 0) {
            return Err(OptionsError::Zero { option });
        }
        if self.heartbeat_timeout_ms < Self::MIN_HEARTBEAT_TIMEOUT_MS {
            return Err(OptionsError::LeaseTooShort { lease_ms: self.heartbeat_timeout_ms });
        }
        if self.heartbeat_interval_ms * Self::MIN_HEARTBEATS_PER_LEASE > self.heartbeat_timeout_ms {
            return Err(OptionsError::TooFewHeartbeats {
                interval_ms: self.heartbeat_interval_ms,
                lease_ms: self.heartbeat_timeout_ms,
            });
        }
        if self.checkpoint_timeout_ms < 2 * self.checkpoint_interval_ms {
            return Err(OptionsError::StallBeforeCheckpoint {
                timeout_ms: self.checkpoint_timeout_ms,
                interval_ms: self.checkpoint_interval_ms,
            });
        }
        Ok(())
    }
}

/// PostCopyFT timings that do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("{option} must be at least 1 ms")]
    Zero { option: &'static str },
    #[error(
        "--heartbeat-timeout {lease_ms} is shorter than {} ms, the shortest lease fencing is safe with: use {} ms or more (the default is {} ms)",
        MigrationOptions::MIN_HEARTBEAT_TIMEOUT_MS,
        MigrationOptions::MIN_HEARTBEAT_TIMEOUT_MS,
        MigrationOptions::DEFAULT_HEARTBEAT_TIMEOUT_MS
    )]
    LeaseTooShort { lease_ms: u64 },
    #[error(
        "--heartbeat-interval {interval_ms} leaves fewer than {} heartbeats in the {lease_ms} ms lease (--heartbeat-timeout): a single late heartbeat would fail the migration over; use --heartbeat-interval {} or less, or a longer --heartbeat-timeout",
        MigrationOptions::MIN_HEARTBEATS_PER_LEASE,
        lease_ms / MigrationOptions::MIN_HEARTBEATS_PER_LEASE
    )]
    TooFewHeartbeats { interval_ms: u64, lease_ms: u64 },
    #[error(
        "--checkpoint-timeout {timeout_ms} is shorter than two checkpoint intervals (--checkpoint-interval {interval_ms}): a healthy destination would be taken for stalled; use --checkpoint-timeout {} or more",
        2 * interval_ms
    )]
    StallBeforeCheckpoint { timeout_ms: u64, interval_ms: u64 },
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            max_rounds: 30,
            converge_pages: 256,
            reply_timeout_ms: 30_000,
            postcopy_pages_per_sec: 0,
            checkpoint_interval_ms: Self::DEFAULT_CHECKPOINT_INTERVAL_MS,
            heartbeat_interval_ms: Self::DEFAULT_HEARTBEAT_INTERVAL_MS,
            heartbeat_timeout_ms: Self::DEFAULT_HEARTBEAT_TIMEOUT_MS,
            checkpoint_tracker: crate::vmm::dirty::DirtyTracking::Bitmap,
            checkpoint_timeout_ms: Self::DEFAULT_CHECKPOINT_TIMEOUT_MS,
        }
    }
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
    /// Stopped by the operator (`pcft vm stop`): the guest no longer runs; its record stays.
    Stopped,
    /// Booting (`pcft vm start`): its name and memory are taken, its guest not yet running.
    Starting,
}

impl VmPhase {
    /// The phase in the operator's words, as JSON spells it (`migrated-away`).
    pub fn name(self) -> &'static str {
        match self {
            VmPhase::Starting => "starting",
            VmPhase::Running => "running",
            VmPhase::MigratingOut => "migrating-out",
            VmPhase::MigratingIn => "migrating-in",
            VmPhase::MigratedAway => "migrated-away",
            VmPhase::Finished => "finished",
            VmPhase::Failed => "failed",
            VmPhase::Stopped => "stopped",
        }
    }

    /// Whether a copy of the VM may still run here (or is arriving): such a
    /// VM's name is taken. The others are records of a guest that no longer
    /// runs here, which a new VM of the same name replaces.
    pub fn is_live(self) -> bool {
        matches!(self, VmPhase::Starting | VmPhase::Running | VmPhase::MigratingOut | VmPhase::MigratingIn)
    }
}

/// One VM as `pcft vm status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub phase: VmPhase,
    pub fixture: String,
    pub vcpus: u64,
    pub mem_bytes: u64,
    pub records: u64,
    pub error: Option<String>,
    /// PostCopyFT destination: the migration in failed after the VM ran here,
    /// and this copy was stopped for good (fenced); the source recovers the VM.
    pub fenced: bool,
    /// The latest dirty rate measured from the VM's tracker (None: never tracked here).
    pub dirty_rate_bytes_per_second: Option<f64>,
    /// The tracker that rate came from.
    pub dirty_tracker: Option<String>,
    /// How far the VM's outgoing migration has got, while it runs.
    pub migration: Option<MigrationProgress>,
    /// Its guest memory was given back to the host (`--release-after` after it
    /// stopped running, or never held: migrated away); the record stays until `pcft vm rm`.
    #[serde(default)]
    pub memory_released: bool,
}

/// Where an outgoing migration is, as `pcft migration status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    Running,
    /// A cancel was asked and accepted; the migration is ending.
    Cancelling,
    /// The VM runs at the destination.
    Completed,
    /// PostCopyFT: the destination was lost (or the migration cancelled after
    /// the switchover) and the VM was recovered here.
    Recovered,
    /// Cancelled before the switchover committed: the VM runs here.
    Cancelled,
    Failed,
}

impl MigrationState {
    pub fn name(self) -> &'static str {
        match self {
            MigrationState::Running => "running",
            MigrationState::Cancelling => "cancelling",
            MigrationState::Completed => "completed",
            MigrationState::Recovered => "recovered",
            MigrationState::Cancelled => "cancelled",
            MigrationState::Failed => "failed",
        }
    }

    /// Whether the migration has ended (its answer is known).
    pub fn ended(self) -> bool {
        !matches!(self, MigrationState::Running | MigrationState::Cancelling)
    }
}

/// The latest outgoing migration of a VM, as `pcft migration status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub vm: String,
    /// The agent it migrates (or migrated) to.
    pub to: String,
    pub mode: Mode,
    pub state: MigrationState,
    pub progress: MigrationProgress,
    /// Why it failed or what the cancel did, once it ended that way.
    pub reason: Option<String>,
}

impl VmStatus {
    /// The output records this agent knows of: None for a VM that moved to
    /// another agent (its records go on there, and `records` is 0 here).
    pub fn records_here(&self) -> Option<u64> {
        (self.phase != VmPhase::MigratedAway).then_some(self.records)
    }
}

/// An outgoing migration in progress, as the source sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// precopy, switchover or postcopy (the names of `pcft_migration_phase`).
    pub phase: String,
    /// Guest pages sent so far: pre-copy rounds, post-copy push and demand (a page may go more than once).
    pub pages_sent: u64,
    /// Pages of guest memory.
    pub pages_total: u64,
    /// PostCopyFT checkpoint epochs committed so far.
    pub checkpoints_committed: u64,
    pub elapsed_ms: u64,
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
    /// Microseconds from receiving `Go` to the vCPUs running.
    pub resume_us: u64,
    /// PostCopyFT: checkpoint epochs the source acked.
    pub checkpoints_acked: u64,
    /// PostCopyFT: the longest checkpoint pause, in microseconds.
    pub checkpoint_pause_max_us: u64,
}

/// How the source lost the destination during a PostCopyFT migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailureReport {
    /// `connection-closed` (the destination's socket closed: it crashed or fenced
    /// itself), `heartbeat-timeout` (silence: a partition, or a hung host),
    /// `checkpoint-stalled` (heartbeats but no checkpoints), or `protocol`.
    pub kind: String,
    /// Milliseconds from the start of the migration to the detection.
    pub detected_at_ms: f64,
    /// Milliseconds from the last word heard from the destination (for
    /// `checkpoint-stalled`: its last checkpoint progress) to the detection.
    pub detection_ms: f64,
    pub reason: String,
}

/// How the source recovered the VM after losing the destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The checkpoint epoch restored (0: no checkpoint had committed, and the
    /// VM was restored as it was at the switchover).
    pub restored_epoch: u64,
    /// Milliseconds from detection to the guest running again at the source
    /// (the wait for the destination's lease included).
    pub failover_ms: f64,
    /// Of that, milliseconds spent waiting for the destination's lease to expire.
    pub fence_wait_ms: f64,
    /// Output records in the restored state: every one of them may be released.
    pub committed_outputs: u64,
}

/// The migration report. docs/protocol.md ("The migration report") gives each
/// field's unit and its nearest QEMU `query-migrate` / KubeVirt counterpart.
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
    /// Requested pages went on a connection of their own, never behind the
    /// background push (QEMU's capability of the same name).
    #[serde(default)]
    pub postcopy_preempt: bool,
    /// The destination's fault-to-install times. None (JSON null) where none
    /// was measured: no page faulted there (pre-copy), or the destination was
    /// lost before it sent its measurements (they travel in `Complete`).
    pub fault_latency_us: Option<Percentiles>,
    /// Pages still dirty when the VM stopped (pre-copy: the stop-and-copy set; hybrid: left to post-copy).
    pub final_dirty_pages: u64,
    /// PostCopyFT: checkpoint epochs committed at the source.
    pub checkpoints_committed: u64,
    /// PostCopyFT: checkpoint bytes received (pages and state).
    pub checkpoint_bytes: u64,
    /// PostCopyFT: pages received in checkpoints.
    pub checkpoint_pages: u64,
    /// PostCopyFT: the destination was lost (None: it was not).
    pub failure: Option<Box<FailureReport>>,
    /// PostCopyFT: the VM was recovered at the source (None: no failover).
    pub failover: Option<Box<FailoverReport>>,
    /// PostCopyFT: the operator cancelled the migration after the commit, so
    /// the `failure` (kind `cancelled`) and the `failover` were deliberate.
    #[serde(default)]
    pub cancelled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_reads_the_same_in_text_and_in_json() {
        use VmPhase::*;
        for phase in [Running, MigratingOut, MigratingIn, MigratedAway, Finished, Failed, Stopped] {
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.name(), "{phase:?}");
        }
    }

    #[test]
    fn a_vm_that_moved_away_has_no_record_count_here() {
        let vm = |phase| VmStatus {
            name: "vm1".into(),
            phase,
            fixture: "ledger".into(),
            vcpus: 1,
            mem_bytes: 64 << 20,
            records: 0,
            error: None,
            fenced: false,
            dirty_rate_bytes_per_second: None,
            dirty_tracker: None,
            migration: None,
            memory_released: false,
        };
        assert_eq!(vm(VmPhase::MigratedAway).records_here(), None);
        assert_eq!(vm(VmPhase::Running).records_here(), Some(0));
        assert_eq!(vm(VmPhase::Finished).records_here(), Some(0));
    }

    #[test]
    fn an_unmeasured_fault_latency_is_null_not_zero() {
        let report = MigrationReport { fault_latency_us: None, ..MigrationReport::default() };
        assert_eq!(serde_json::to_value(&report).unwrap()["fault_latency_us"], serde_json::Value::Null);
    }

    #[test]
    fn timings_that_break_the_lease_argument_are_refused_with_the_fix() {
        let ok = MigrationOptions::default();
        assert_eq!(ok.validate(Mode::PostcopyFt), Ok(()));
        let with = |f: fn(&mut MigrationOptions)| {
            let mut o = MigrationOptions::default();
            f(&mut o);
            o.validate(Mode::PostcopyFt).unwrap_err().to_string()
        };
        let e = with(|o| (o.heartbeat_interval_ms, o.heartbeat_timeout_ms) = (500, 100));
        assert!(e.contains("--heartbeat-interval 500") && e.contains("--heartbeat-interval 33 or less"), "{e}");
        let e = with(|o| o.heartbeat_timeout_ms = 0);
        assert!(e.contains("--heartbeat-timeout must be at least 1 ms"), "{e}");
        let e = with(|o| o.heartbeat_timeout_ms = 10);
        assert!(e.contains("shortest lease"), "{e}");
        let e = with(|o| o.checkpoint_interval_ms = 0);
        assert!(e.contains("--checkpoint-interval must be at least 1 ms"), "{e}");
        let e = with(|o| o.checkpoint_timeout_ms = 150);
        assert!(e.contains("--checkpoint-timeout 200 or more"), "{e}");
        // Other modes take no PostCopyFT timings.
        let unused = MigrationOptions { heartbeat_timeout_ms: 0, ..MigrationOptions::default() };
        assert_eq!(unused.validate(Mode::Postcopy), Ok(()));
    }
}
