//! `pcft agent`: the per-host daemon. It runs VMs, answers the CLI, and sends
//! and receives migrations, all on one TCP port. Every connection starts with
//! `Hello`, whose role says what follows.

use crate::host::{format_size, HostError};
use crate::metrics::MigrationLabels;
use crate::migration::destination::{migrate_in, IncomingMigration};
use crate::migration::ft::failover::{restore_at_source, Failover, FailoverError};
use crate::migration::ft::staging::StagingLimits;
use crate::migration::progress::Progress;
use crate::migration::source::{migrate_out, MigrateOut, MigrationError, MigrationOutcome};
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::{Machine, MachineConfig, MachineError};
use crate::vmm::output::OutputSink;
use crate::vmm::run_log::{RunLog, RunLogSnapshot};
use crate::vmm::runner::{OutputGate, RunnerError, VmRunner};
use crate::wire::auth::Psk;
use crate::wire::control::ControlMessage;
use crate::wire::frame::{encode_message, Frame, FrameReader, FrameWriter, ProtocolError};
use crate::wire::greeting::Role;
use crate::wire::handshake::{self, Greeted, HandshakeError};
use crate::wire::message_set::WireMessage;
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{
    FailoverReport, MigrationOptions, MigrationProgress, Mode, OptionsError, VmPhase, VmStatus,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;
use vm_fixtures::ParamsError;

struct VmSlot {
    phase: VmPhase,
    config: MachineConfig,
    runner: Option<Arc<VmRunner>>,
    error: Option<String>,
    /// While it migrates out: when it started and the VM's counts then.
    /// How far its outgoing migration has got, while it migrates out.
    migration: Option<Arc<Progress>>,
    /// Its copy here was stopped for good after a PostCopyFT migration in failed.
    fenced: bool,
    /// How the VM's writes are tracked here (a failover restores it with the same).
    tracking: DirtyTracking,
    /// When the vCPUs of each copy of the VM that ran here were in the guest.
    runs: Vec<Arc<RunLog>>,
}

impl VmSlot {
    /// A VM in `phase`, with no runner yet.
    fn new(phase: VmPhase, config: MachineConfig, tracking: DirtyTracking) -> Self {
        VmSlot { phase, config, runner: None, error: None, migration: None, fenced: false, tracking, runs: Vec::new() }
    }

    /// The VM now runs in `runner` (its first copy here, or the one a failover restored).
    fn attach(&mut self, runner: Arc<VmRunner>) {
        let log = runner.run_log();
        if !self.runs.iter().any(|known| Arc::ptr_eq(known, &log)) {
            self.runs.push(log);
        }
        self.runner = Some(runner);
    }

    fn run_log(&self) -> RunLogSnapshot {
        let mut all = RunLogSnapshot::default();
        for log in &self.runs {
            let snapshot = log.snapshot();
            all.intervals.extend(snapshot.intervals);
            all.dropped += snapshot.dropped;
            all.last_page_install_us = all.last_page_install_us.max(snapshot.last_page_install_us);
        }
        all
    }
}

/// How long a new connection may take to greet (`Hello`) before it is dropped.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// What an agent takes on at most.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Guest memory for one VM.
    pub max_guest_mem: u64,
    /// Migrations in or out at the same time.
    pub max_migrations: usize,
    /// Memory (and the file beyond it) for each outgoing migration's open checkpoint.
    pub staging: StagingLimits,
}

pub struct Daemon {
    name: String,
    limits: Limits,
    vms: Mutex<HashMap<String, VmSlot>>,
    /// Where released guest output goes (the outside world).
    sink: OutputSink,
    /// With a key, every peer (agents, the CLI) must authenticate with it.
    psk: Option<Psk>,
}

/// Why a request is not served as asked: sent as `Refuse` (exit 2 at the
/// CLI), or, on a connection, the reason it is refused and closed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no VM named {vm:?} on agent {agent} (VMs here: {known})")]
    NoSuchVm { vm: String, agent: String, known: String },
    #[error("no running VM named {vm:?} on agent {agent} (VMs here: {known})")]
    NotRunning { vm: String, agent: String, known: String },
    #[error("a VM named {vm:?} already exists on agent {agent} ({phase:?})")]
    AlreadyExists { vm: String, agent: String, phase: VmPhase },
    #[error(
        "agent {agent} has room for {} of guest memory per VM (--max-guest-mem) and VM {vm:?} needs {}",
        format_size(*room),
        format_size(*needs)
    )]
    NoRoom { agent: String, vm: String, room: u64, needs: u64 },
    /// The host has too little memory free for the VM.
    #[error("agent {agent}: {source}")]
    HostMemory { agent: String, source: HostError },
    /// The VM's fixture parameters do not hold together.
    #[error(transparent)]
    Fixture(#[from] ParamsError),
    /// An incoming migration's timings do not hold together.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// A requested migration's timings do not hold together.
    #[error("migration of {vm:?} refused: {source}")]
    MigrationOptions { vm: String, source: OptionsError },
    #[error(
        "agent {agent} already runs {running} migration(s), its limit (--max-migrations {limit}): try again when one ends"
    )]
    TooManyMigrations { agent: String, running: usize, limit: usize },
    #[error("VM {vm:?} has migrated away from agent {agent}")]
    MigratedAway { vm: String, agent: String },
    #[error("{request} is not a request an agent answers")]
    NotARequest { request: String },
    /// The destination could not be reached or refused: the operator's to fix.
    #[error("migration of {vm:?} to {to} failed, the VM keeps running here: {source}")]
    DestinationRefused { vm: String, to: String, source: Box<MigrationError> },
    #[error("the control connection carries no pages")]
    PagesOnControl,
    #[error("expected Begin, got {got}")]
    ExpectedBegin { got: String },
    /// A frame that broke the protocol (or failed its authentication).
    #[error(transparent)]
    Protocol(ProtocolError),
}

/// Why a request that was carried out failed: sent as `Failed` (exit 1 at the CLI).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A blocking task of the agent died.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot start VM {vm:?}: {source}")]
    Boot { vm: String, source: MachineError },
    /// A VM's threads could not start.
    #[error("{0}")]
    Spawn(#[from] std::io::Error),
    #[error("{0}")]
    Runner(#[from] RunnerError),
    #[error("migration of {vm:?} to {to} failed and so did the failover: {source}")]
    FailoverFailed { vm: String, to: String, source: FailoverFailure },
    /// The destination was lost after the switchover committed, without PostCopyFT.
    #[error("migration of {vm:?} to {to} failed: {source}")]
    LostAfterCommit { vm: String, to: String, source: MigrationError },
    #[error("migration of {vm:?} to {to} failed, the VM keeps running here: {source}")]
    Migration { vm: String, to: String, source: MigrationError },
    #[error("VM {vm:?} failed: {error}")]
    VmFailed { vm: String, error: String },
    #[error("VM {vm:?}: {source}")]
    Verify { vm: String, source: RunnerError },
    #[error("VM {vm:?} did not finish within {timeout_ms} ms")]
    NotFinished { vm: String, timeout_ms: u64 },
}

/// Why a failover at the source did not bring the VM back.
#[derive(Debug, thiserror::Error)]
pub enum FailoverFailure {
    #[error(transparent)]
    Restore(#[from] FailoverError),
    #[error("the VM left the table")]
    VmGone,
}

/// Why a request got no answer: refused (exit 2 at the CLI) or failed (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Failed(#[from] Failure),
}

/// Why a connection ended other than by its peer hanging up (logged by [`Daemon::serve`]).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Socket(std::io::Error),
    #[error("no greeting within {GREETING_TIMEOUT:?}: dropped the connection")]
    GreetingTimeout,
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The peer was refused, and told why.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// An answer could not be sent.
    #[error(transparent)]
    Send(ProtocolError),
    #[error("incoming migration of {vm:?} failed: {source}")]
    Incoming { vm: String, source: MigrationError },
}

type Reply = Result<ControlMessage, Denial>;

impl Daemon {
    /// An agent named `name`; with `psk`, it talks only to peers that hold that key.
    pub fn new(name: String, limits: Limits, sink: OutputSink, psk: Option<Psk>) -> Arc<Self> {
        Arc::new(Daemon { name, limits, vms: Mutex::new(HashMap::new()), sink, psk })
    }

    /// Refuses one more migration when `vms` (the locked VM table) already has the most this agent runs.
    fn check_migrations(&self, vms: &HashMap<String, VmSlot>) -> Result<(), Refusal> {
        let running = vms.values().filter(|s| matches!(s.phase, VmPhase::MigratingOut | VmPhase::MigratingIn)).count();
        if running >= self.limits.max_migrations {
            return Err(Refusal::TooManyMigrations {
                agent: self.name.clone(),
                running,
                limit: self.limits.max_migrations,
            });
        }
        Ok(())
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmSlot>> {
        self.vms.lock().expect("VM table lock")
    }

    /// Accepts connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, peer) = listener.accept().await?;
            let daemon = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = daemon.connection(stream, peer).await {
                    tracing::warn!(%peer, "connection ended: {e}");
                }
            });
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Result<(), DaemonError> {
        stream.set_nodelay(true).map_err(DaemonError::Socket)?;
        let greeting = handshake::accept(stream, &self.name, self.psk.as_ref());
        let Ok(accepted) = tokio::time::timeout(GREETING_TIMEOUT, greeting).await else {
            return Err(DaemonError::GreetingTimeout);
        };
        let (greeted, role) = accepted.inspect_err(|e| {
            if let Some(reason) = e.auth_refusal() {
                crate::metrics::get().auth_refused(reason);
            }
        })?;
        let Greeted { rd, wr, peer: from } = greeted;
        match role {
            Role::Control => self.serve_control(rd, wr, peer).await,
            Role::Migration => self.incoming(rd, wr, &from, peer).await,
        }
    }

    /// Answers the CLI's requests on one connection until it closes.
    async fn serve_control(
        self: Arc<Self>,
        mut rd: FrameReader,
        mut wr: FrameWriter,
        peer: SocketAddr,
    ) -> Result<(), DaemonError> {
        let refuse_with = |reason| ControlMessage::Refuse { reason };
        loop {
            let request = match rd.read::<ControlMessage>().await {
                Ok(Frame::Message(m)) => m,
                Ok(Frame::Pages(_)) => return refuse(&mut wr, Refusal::PagesOnControl, refuse_with).await,
                Err(ProtocolError::Closed) => return Ok(()),
                Err(e) => {
                    note_unauthenticated(&e, peer);
                    return refuse(&mut wr, Refusal::Protocol(e), refuse_with).await;
                }
            };
            let reply = match self.control(request).await {
                Ok(answer) => answer,
                Err(Denial::Refused(refusal)) => ControlMessage::Refuse { reason: refusal.to_string() },
                Err(Denial::Failed(failure)) => ControlMessage::Failed { reason: failure.to_string() },
            };
            send(&mut wr, &reply).await?;
        }
    }

    async fn control(self: &Arc<Self>, request: ControlMessage) -> Reply {
        match request {
            ControlMessage::Ping => Ok(ControlMessage::Pong),
            ControlMessage::Status => Ok(ControlMessage::StatusReport { agent: self.name.clone(), vms: self.status() }),
            ControlMessage::StartVm { name, config, tracking } => self.start_vm(name, config, tracking).await,
            ControlMessage::Migrate { name, to, mode, options } => self.migrate(name, to, mode, options).await,
            ControlMessage::WaitFinished { name, timeout_ms } => self.wait_finished(&name, timeout_ms).await,
            ControlMessage::RunLog { name } => {
                let runs = self.vms().get(&name).map(VmSlot::run_log);
                match runs {
                    Some(runs) => Ok(ControlMessage::RunLogReport { vm: name, runs }),
                    None => Err(self.no_such_vm(name).into()),
                }
            }
            other => Err(Refusal::NotARequest { request: format!("{other:?}") }.into()),
        }
    }

    fn status(&self) -> Vec<VmStatus> {
        let mut list: Vec<VmStatus> = self.vms().iter().map(|(name, slot)| vm_status(name, slot)).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn check_room(&self, name: &str, config: &MachineConfig) -> Result<(), Refusal> {
        if let Some(slot) = self.vms().get(name) {
            if slot.phase != VmPhase::MigratedAway {
                return Err(Refusal::AlreadyExists { vm: name.into(), agent: self.name.clone(), phase: slot.phase });
            }
        }
        if config.mem_bytes > self.limits.max_guest_mem {
            return Err(Refusal::NoRoom {
                agent: self.name.clone(),
                vm: name.into(),
                room: self.limits.max_guest_mem,
                needs: config.mem_bytes,
            });
        }
        crate::host::check_memory_available(config.mem_bytes)
            .map_err(|source| Refusal::HostMemory { agent: self.name.clone(), source })
    }

    async fn start_vm(self: &Arc<Self>, name: String, config: MachineConfig, tracking: DirtyTracking) -> Reply {
        self.check_room(&name, &config)?;
        config.fixture.validate().map_err(Refusal::from)?;
        let boot_config = config.clone();
        let machine = tokio::task::spawn_blocking(move || Machine::boot_with(boot_config, tracking))
            .await
            .map_err(Failure::from)?
            .map_err(|source| Failure::Boot { vm: name.clone(), source })?;
        // Boot completes the configuration (a paced `dirty` guest's TSC ticks per
        // write): keep the machine's own, which is what a migration must send.
        let config = machine.config().clone();
        let gate = OutputGate { sink: self.sink.clone(), released: 0, hold: false };
        let runner = Arc::new(VmRunner::spawn(&name, machine, gate).map_err(Failure::from)?);
        if tracking != DirtyTracking::Bitmap {
            // The ring (and eBPF, which reads its pushes) logs only with logging on: on from
            // the start, it gives the VM a live dirty rate (`pcft vm status`, metrics).
            runner.set_dirty_logging(true).await.map_err(Failure::from)?;
        }
        runner.resume().await.map_err(Failure::from)?;
        tracing::info!(vm = %name, fixture = %config.fixture.kind, "started");
        let mut slot = VmSlot::new(VmPhase::Running, config, tracking);
        slot.attach(runner);
        self.vms().insert(name, slot);
        Ok(ControlMessage::Ok)
    }

    fn known(&self) -> String {
        let names: Vec<String> = self.vms().keys().cloned().collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// The refusal for a request about VM `vm`, which is not here (the table must not be locked).
    fn no_such_vm(&self, vm: String) -> Refusal {
        Refusal::NoSuchVm { vm, agent: self.name.clone(), known: self.known() }
    }

    /// Marks VM `name` as migrating out (if it runs here and a migration may
    /// start), and returns its runner and configuration.
    fn begin_migration(&self, name: &str) -> Result<Outgoing, Refusal> {
        let mut vms = self.vms();
        let running = vms.get(name).is_some_and(|s| s.phase == VmPhase::Running && s.runner.is_some());
        if !running {
            drop(vms);
            return Err(Refusal::NotRunning { vm: name.into(), agent: self.name.clone(), known: self.known() });
        }
        self.check_migrations(&vms)?;
        let slot = vms.get_mut(name).expect("checked");
        slot.phase = VmPhase::MigratingOut;
        let progress = Arc::new(Progress::new());
        slot.migration = Some(Arc::clone(&progress));
        Ok(Outgoing {
            runner: Arc::clone(slot.runner.as_ref().expect("checked")),
            config: slot.config.clone(),
            progress,
        })
    }

    async fn migrate(self: &Arc<Self>, name: String, to: String, mode: Mode, options: MigrationOptions) -> Reply {
        options.validate(mode).map_err(|source| Refusal::MigrationOptions { vm: name.clone(), source })?;
        let Outgoing { runner, config, progress } = self.begin_migration(&name)?;
        tracing::info!(vm = %name, %to, mode = mode.name(), "migrating out");
        let span = tracing::info_span!("migration", vm = %name, to = %to, mode = mode.name(), side = "source");
        let result = migrate_out(MigrateOut {
            runner: &runner,
            vm: &name,
            config: &config,
            to: &to,
            mode,
            options,
            agent: &self.name,
            psk: self.psk.as_ref(),
            staging: &self.limits.staging,
            progress,
        })
        .instrument(span)
        .await;
        count_migration(&name, mode, &result);
        match result {
            Ok(MigrationOutcome::DestinationLost { mut report, committed, detected_at, fenced_at }) => {
                let epoch = committed.epoch;
                let failover = Failover { vm: &name, runner, committed, fenced_at, sink: self.sink.clone() };
                match self.fail_over(failover).await {
                    Ok(failover) => {
                        let failover_ms = detected_at.elapsed().as_secs_f64() * 1e3;
                        report.failover = Some(Box::new(FailoverReport { failover_ms, ..failover }));
                        tracing::warn!(vm = %name, epoch, failover_ms, "recovered at the source");
                        Ok(ControlMessage::Migrated(report))
                    }
                    Err(source) => {
                        self.mark_failed(&name, source.to_string(), false);
                        Err(Failure::FailoverFailed { vm: name, to, source }.into())
                    }
                }
            }
            Ok(MigrationOutcome::Completed(report)) => {
                if let Some(slot) = self.vms().get_mut(&name) {
                    slot.phase = VmPhase::MigratedAway;
                    slot.runner = None;
                }
                // The last handle: the source copy stops here. Stopping joins the
                // VM's threads, so it runs off the async workers.
                tokio::task::spawn_blocking(move || drop(runner));
                tracing::info!(vm = %name, %to, ms = report.total_migration_ms, "migrated");
                Ok(ControlMessage::Migrated(report))
            }
            Err(source @ MigrationError::LostAfterCommit(_)) => {
                self.mark_failed(&name, source.to_string(), true);
                Err(Failure::LostAfterCommit { vm: name, to, source }.into())
            }
            Err(source) => {
                if let Some(slot) = self.vms().get_mut(&name) {
                    slot.phase = VmPhase::Running;
                }
                // An unreachable or refusing destination is the operator's to fix (exit 2 at the CLI).
                match source {
                    MigrationError::Connect { .. } | MigrationError::Refused(_) => {
                        Err(Refusal::DestinationRefused { vm: name, to, source: Box::new(source) }.into())
                    }
                    _ => Err(Failure::Migration { vm: name, to, source }.into()),
                }
            }
        }
    }

    /// VM `name` failed with `error`; with `stopped`, its runner is let go of too.
    fn mark_failed(&self, name: &str, error: String, stopped: bool) {
        let mut vms = self.vms();
        let slot = vms.get_mut(name).expect("a migrating VM stays in the table");
        slot.phase = VmPhase::Failed;
        slot.error = Some(error);
        if stopped {
            slot.runner = None;
        }
    }

    /// PostCopyFT failover (see `migration::ft::failover`): restores the VM at
    /// the source and puts it back in the table, running.
    async fn fail_over(&self, failover: Failover<'_>) -> Result<FailoverReport, FailoverFailure> {
        let name = failover.vm;
        let detach = || match self.vms().get_mut(name) {
            Some(slot) => {
                slot.runner = None;
                slot.tracking
            }
            None => DirtyTracking::Bitmap,
        };
        let (runner, report) = restore_at_source(failover, detach).await?;
        let mut vms = self.vms();
        let slot = vms.get_mut(name).ok_or(FailoverFailure::VmGone)?;
        slot.phase = VmPhase::Running;
        slot.attach(runner);
        Ok(report)
    }

    async fn wait_finished(self: &Arc<Self>, name: &str, timeout_ms: u64) -> Reply {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let found = self.vms().get(name).map(|slot| (slot.runner.clone(), slot.phase, slot.error.clone()));
            let Some((runner, phase, error)) = found else {
                return Err(self.no_such_vm(name.to_string()).into());
            };
            if let Some(error) = error {
                return Err(Failure::VmFailed { vm: name.into(), error }.into());
            }
            if phase == VmPhase::MigratedAway {
                return Err(Refusal::MigratedAway { vm: name.into(), agent: self.name.clone() }.into());
            }
            if let Some(runner) = runner.filter(|_| phase == VmPhase::Running) {
                let status = runner.status();
                if let Some(error) = status.error {
                    return Err(Failure::VmFailed { vm: name.into(), error }.into());
                }
                if status.finished {
                    let verified =
                        runner.verify().await.map_err(|source| Failure::Verify { vm: name.into(), source })?;
                    return Ok(ControlMessage::Verified {
                        name: name.to_string(),
                        records: verified.records as u64,
                        memory_digest: verified.memory_digest,
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure::NotFinished { vm: name.into(), timeout_ms }.into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Admits an incoming migration of VM `name`: room, a sound fixture and
    /// timings, and a free migration place, taken under the same lock as the
    /// count, so two incoming migrations cannot both take the last place.
    fn admit(&self, name: &str, config: &MachineConfig, mode: Mode, options: &MigrationOptions) -> Result<(), Refusal> {
        self.check_room(name, config)?;
        config.fixture.validate()?;
        options.validate(mode)?;
        let mut vms = self.vms();
        self.check_migrations(&vms)?;
        let tracking = if mode.checkpoints() { options.checkpoint_tracker } else { DirtyTracking::Bitmap };
        vms.insert(name.to_string(), VmSlot::new(VmPhase::MigratingIn, config.clone(), tracking));
        Ok(())
    }

    async fn incoming(
        self: Arc<Self>,
        mut rd: FrameReader,
        mut wr: FrameWriter,
        from: &str,
        peer: SocketAddr,
    ) -> Result<(), DaemonError> {
        let refuse_with = |reason| MigrationMessage::Refuse { reason };
        let (name, config, mode, options) = match rd.read::<MigrationMessage>().await {
            Ok(Frame::Message(MigrationMessage::Begin { name, config, mode, options })) => {
                (name, config, mode, options)
            }
            Ok(other) => {
                return refuse(&mut wr, Refusal::ExpectedBegin { got: format!("{other:?}") }, refuse_with).await
            }
            Err(e) => {
                note_unauthenticated(&e, peer);
                return refuse(&mut wr, Refusal::Protocol(e), refuse_with).await;
            }
        };
        if let Err(refusal) = self.admit(&name, &config, mode, &options) {
            tracing::warn!(vm = %name, %from, "refused an incoming migration: {refusal}");
            return refuse(&mut wr, refusal, refuse_with).await;
        }
        tracing::info!(vm = %name, %from, mode = mode.name(), "migrating in");
        let table = Arc::clone(&self);
        let vm = name.clone();
        let span = tracing::info_span!("migration", vm = %name, from = %from, mode = mode.name(), side = "destination");
        let incoming = IncomingMigration { rd, wr, name: name.clone(), config, mode, options, sink: self.sink.clone() };
        let result = migrate_in(incoming, move |runner| {
            if let Some(slot) = table.vms().get_mut(&vm) {
                slot.attach(runner);
            }
        })
        .instrument(span)
        .await;
        let mut vms = self.vms();
        match result {
            Ok(stats) => {
                if let Some(slot) = vms.get_mut(&name) {
                    slot.phase = VmPhase::Running;
                }
                tracing::info!(vm = %name, faulted = stats.pages_faulted, "migration in complete");
                Ok(())
            }
            Err(source) => {
                let ran_here = vms.get(&name).is_some_and(|s| s.runner.is_some());
                if ran_here {
                    let slot = vms.get_mut(&name).expect("checked");
                    slot.phase = VmPhase::Failed;
                    slot.error = Some(source.to_string());
                    slot.fenced = source.fenced_here();
                } else {
                    vms.remove(&name);
                }
                Err(DaemonError::Incoming { vm: name, source })
            }
        }
    }
}

/// Counts a finished outgoing migration of `vm` in the agent's metrics, by its outcome.
fn count_migration(vm: &str, mode: Mode, result: &Result<MigrationOutcome, MigrationError>) {
    let outcome = match result {
        Ok(MigrationOutcome::Completed(_)) => "completed",
        Ok(MigrationOutcome::DestinationLost { .. }) => "recovered",
        Err(MigrationError::LostAfterCommit(_)) => "lost",
        Err(_) => "failed",
    };
    let m = crate::metrics::get();
    m.migrations.get_or_create(&MigrationLabels { mode: mode.name().into(), result: outcome.into() }).inc();
    m.set_phase(vm, outcome);
    if outcome == "recovered" {
        m.vm(&m.failovers, vm, 1);
    }
}

/// One VM as `pcft vm status` shows it.
fn vm_status(name: &str, slot: &VmSlot) -> VmStatus {
    let runner = slot.runner.as_ref().map(|r| r.status());
    let mut phase = slot.phase;
    if phase == VmPhase::Running && runner.as_ref().is_some_and(|s| s.finished) {
        phase = VmPhase::Finished;
    }
    let error = slot.error.clone().or_else(|| runner.as_ref().and_then(|s| s.error.clone()));
    let migration = slot
        .migration
        .as_deref()
        .filter(|_| phase == VmPhase::MigratingOut)
        .map(|progress| migration_progress(progress, slot.config.mem_bytes));
    VmStatus {
        name: name.to_string(),
        phase: if error.is_some() { VmPhase::Failed } else { phase },
        fixture: slot.config.fixture.kind.name().to_string(),
        vcpus: slot.config.fixture.vcpus,
        mem_bytes: slot.config.mem_bytes,
        records: runner.as_ref().map_or(0, |s| s.records),
        error,
        fenced: slot.fenced,
        dirty_rate_bytes_per_second: runner.as_ref().and_then(|s| s.dirty_rate_bytes_per_second),
        dirty_tracker: runner.map(|s| s.dirty_tracker.to_string()),
        migration,
    }
}

async fn send<M: WireMessage>(wr: &mut FrameWriter, message: &M) -> Result<(), DaemonError> {
    wr.write(&encode_message(message)).await.map_err(DaemonError::Send)
}

/// Logs and counts a frame that failed its authentication check.
fn note_unauthenticated(error: &ProtocolError, peer: SocketAddr) {
    if *error == ProtocolError::Unauthenticated {
        tracing::warn!(%peer, "refused a peer: its frame failed the HMAC check (wrong --psk-file, or tampering)");
        crate::metrics::get().auth_refused("bad-mac");
    }
}

/// Tells the peer why (in the message `refuse_with` makes of the reason, in
/// the connection's message set), then ends the connection with the refusal as the error.
async fn refuse<M: WireMessage>(
    wr: &mut FrameWriter,
    refusal: Refusal,
    refuse_with: impl FnOnce(String) -> M,
) -> Result<(), DaemonError> {
    let _ = send(wr, &refuse_with(refusal.to_string())).await;
    Err(DaemonError::Refused(refusal))
}

/// A VM that starts to migrate out: what the migration works with.
struct Outgoing {
    runner: Arc<VmRunner>,
    config: MachineConfig,
    progress: Arc<Progress>,
}

/// How far an outgoing migration has got, as it reports itself.
fn migration_progress(progress: &Progress, mem_bytes: u64) -> MigrationProgress {
    MigrationProgress {
        phase: progress.phase().to_string(),
        pages_sent: progress.pages_sent(),
        pages_total: mem_bytes / crate::vmm::memory::PAGE_SIZE,
        checkpoints_committed: progress.checkpoints_committed(),
        elapsed_ms: progress.started_at().elapsed().as_millis() as u64,
    }
}
