//! The daemon's VM table: one record per VM name, what each holds, and the
//! rules for taking a name and memory (a new VM replaces the record of one
//! that no longer runs here; the agent's VMs together stay within its limit).

use super::error::Refusal;
use super::migration_watch::{progress_of, MigrationWatch};
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::MachineConfig;
use crate::vmm::run_log::{RunLog, RunLogSnapshot};
use crate::vmm::runner::VmRunner;
use crate::wire::payload::{VmPhase, VmStatus};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// The VMs of an agent, by name.
pub type VmTable = HashMap<String, VmSlot>;

/// What a finished VM left when its memory was released: enough to answer `pcft vm wait`.
#[derive(Clone, Debug)]
pub struct Released {
    pub records: u64,
    /// A finished VM's check against its oracle, made just before its memory went: (records, memory digest) or why it failed.
    pub verified: Option<Result<(u64, u64), String>>,
}

/// One VM on this agent.
pub struct VmSlot {
    pub phase: VmPhase,
    pub config: MachineConfig,
    pub runner: Option<Arc<VmRunner>>,
    pub error: Option<String>,
    /// Its latest outgoing migration (running or ended), for `pcft migration status|wait|cancel`.
    pub migration: Option<Arc<MigrationWatch>>,
    /// Its copy here was stopped for good after a PostCopyFT migration in failed.
    pub fenced: bool,
    /// How the VM's writes are tracked here (a failover restores it with the same).
    pub tracking: DirtyTracking,
    /// When the vCPUs of each copy of the VM that ran here were in the guest.
    runs: Vec<Arc<RunLog>>,
    /// When its guest stopped running here (finished, failed, stopped), once the daemon noticed.
    pub ended_at: Option<Instant>,
    /// Its memory was given back (`--release-after`); what it left.
    pub released: Option<Released>,
}

impl VmSlot {
    /// A VM in `phase`, with no runner yet.
    pub fn new(phase: VmPhase, config: MachineConfig, tracking: DirtyTracking) -> Self {
        VmSlot {
            phase,
            config,
            runner: None,
            error: None,
            migration: None,
            fenced: false,
            tracking,
            runs: Vec::new(),
            ended_at: None,
            released: None,
        }
    }

    /// The VM now runs in `runner` (its first copy here, or the one a failover restored).
    pub fn attach(&mut self, runner: Arc<VmRunner>) {
        let log = runner.run_log();
        if !self.runs.iter().any(|known| Arc::ptr_eq(known, &log)) {
            self.runs.push(log);
        }
        self.runner = Some(runner);
    }

    pub fn run_log(&self) -> RunLogSnapshot {
        let mut all = RunLogSnapshot::default();
        for log in &self.runs {
            let snapshot = log.snapshot();
            all.intervals.extend(snapshot.intervals);
            all.dropped += snapshot.dropped;
            all.last_page_install_us = all.last_page_install_us.max(snapshot.last_page_install_us);
        }
        all
    }

    /// The phase with what the runner knows and the table not yet: a running
    /// VM whose workload finished is `Finished`, one whose vCPU failed is `Failed`.
    pub fn phase(&self) -> VmPhase {
        if self.error.is_some() {
            return VmPhase::Failed;
        }
        if self.phase != VmPhase::Running {
            return self.phase;
        }
        match self.runner.as_ref().map(|r| r.status()) {
            Some(status) if status.error.is_some() => VmPhase::Failed,
            Some(status) if status.finished => VmPhase::Finished,
            _ => VmPhase::Running,
        }
    }

    /// The guest memory this VM holds on the host (booting and arriving VMs count in full).
    pub fn held_bytes(&self) -> u64 {
        if self.runner.is_some() || matches!(self.phase, VmPhase::Starting | VmPhase::MigratingIn) {
            self.config.mem_bytes
        } else {
            0
        }
    }
}

/// What an agent may hold, for [`admit`].
pub struct Room<'a> {
    pub agent: &'a str,
    /// Guest memory for one VM.
    pub per_vm: u64,
    /// Guest memory for all of the agent's VMs together.
    pub total: u64,
}

/// Whether VM `name` of `config` may take its name and memory in `vms` (the
/// locked table): its name must be free (no record, or the record of a VM that
/// no longer runs here, which it will replace), and its memory must fit.
pub fn admit(vms: &VmTable, name: &str, config: &MachineConfig, room: &Room<'_>) -> Result<(), Refusal> {
    if let Some(slot) = vms.get(name) {
        let phase = slot.phase();
        if phase == VmPhase::MigratingOut {
            return Err(Refusal::MigrationToItself { vm: name.into(), agent: room.agent.into() });
        }
        if phase.is_live() {
            return Err(Refusal::AlreadyExists { vm: name.into(), agent: room.agent.into(), phase });
        }
    }
    let needs = config.mem_bytes;
    if needs > room.per_vm {
        return Err(Refusal::NoRoom { agent: room.agent.into(), vm: name.into(), room: room.per_vm, needs });
    }
    let others = vms.iter().filter(|(other, slot)| *other != name && slot.held_bytes() > 0);
    let (vms_holding, held) = others.fold((0, 0u64), |(n, sum), (_, slot)| (n + 1, sum + slot.held_bytes()));
    if held.saturating_add(needs) > room.total {
        return Err(Refusal::NoTotalRoom {
            agent: room.agent.into(),
            vm: name.into(),
            held,
            vms: vms_holding,
            needs,
            limit: room.total,
        });
    }
    crate::host::check_memory_available(needs)
        .map_err(|source| Refusal::HostMemory { agent: room.agent.into(), source })
}

/// Puts `slot` in the table as VM `name`, replacing the record of a VM that no
/// longer runs here; the replaced copy, if it held one, for [`retire`].
#[must_use = "a replaced copy must be retired before its successor is built (it may hold the VM's tap)"]
pub fn insert(vms: &mut VmTable, name: String, slot: VmSlot) -> Option<Arc<VmRunner>> {
    vms.insert(name, slot).and_then(|old| old.runner)
}

/// Tears a replaced copy down (its threads joined off the async workers) and
/// waits for it: what it held, its network tap above all, is free once this
/// returns, so the copy that replaces it can take the same tap. (Not waiting
/// let a VM migrating back to a host where its fenced copy still held the tap
/// fail with "tap … is in use", one time in 67 freezes of a soak.)
pub async fn retire(replaced: Option<Arc<VmRunner>>) {
    if let Some(runner) = replaced {
        let _ = tokio::task::spawn_blocking(move || drop(runner)).await;
    }
}

/// One VM as `pcft vm status` shows it.
pub fn vm_status(name: &str, slot: &VmSlot) -> VmStatus {
    let runner = slot.runner.as_ref().map(|r| r.status());
    let phase = slot.phase();
    let error = slot.error.clone().or_else(|| runner.as_ref().and_then(|s| s.error.clone()));
    let migration = slot
        .migration
        .as_deref()
        .filter(|_| phase == VmPhase::MigratingOut)
        .map(|watch| progress_of(&watch.progress, slot.config.mem_bytes));
    let records = match (&runner, &slot.released) {
        (Some(status), _) => status.records,
        (None, Some(released)) => released.records,
        (None, None) => 0,
    };
    VmStatus {
        name: name.to_string(),
        phase,
        fixture: slot.config.fixture.kind.name().to_string(),
        vcpus: slot.config.fixture.vcpus,
        mem_bytes: slot.config.mem_bytes,
        records,
        error,
        fenced: slot.fenced,
        dirty_rate_bytes_per_second: runner.as_ref().and_then(|s| s.dirty_rate_bytes_per_second),
        dirty_tracker: runner.map(|s| s.dirty_tracker.to_string()),
        migration,
        memory_released: slot.held_bytes() == 0,
    }
}
