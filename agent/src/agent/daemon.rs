//! `pcft agent`: the per-host daemon. It runs VMs, answers the CLI, and sends
//! and receives migrations, all on one TCP port. Every connection starts with
//! `Hello`, whose role says what follows.

use crate::agent::metrics::{MigrationCounts, MigrationLabels};
use crate::host::format_size;
use crate::migration::destination::{migrate_in, IncomingMigration};
use crate::migration::ft::staging::StagingLimits;
use crate::migration::ft::store::Committed;
use crate::migration::progress::Progress;
use crate::migration::source::{migrate_out, MigrateOut, MigrationError, MigrationOutcome};
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::{Machine, MachineConfig};
use crate::vmm::output::OutputSink;
use crate::vmm::run_log::{RunLog, RunLogSnapshot};
use crate::vmm::runner::{OutputGate, VmRunner};
use crate::wire::auth::Psk;
use crate::wire::frame::{encode_message, Frame, FrameReader, FrameWriter, ProtocolError};
use crate::wire::handshake::{self, Greeted};
use crate::wire::messages::{
    FailoverReport, Message, MigrationOptions, MigrationProgress, Mode, Role, VmPhase, VmStatus,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

struct VmSlot {
    phase: VmPhase,
    config: MachineConfig,
    runner: Option<Arc<VmRunner>>,
    error: Option<String>,
    /// While it migrates out: when it started and the VM's counts then.
    migrating_since: Option<(Instant, MigrationCounts)>,
    /// How the VM's writes are tracked here (a failover restores it with the same).
    tracking: DirtyTracking,
    /// When the vCPUs of each copy of the VM that ran here were in the guest.
    runs: Vec<Arc<RunLog>>,
}

impl VmSlot {
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

/// Why a request got no answer: refused (exit 2 at the CLI) or failed (exit 1).
enum Denial {
    Refused(String),
    Failed(String),
}

impl From<String> for Denial {
    fn from(reason: String) -> Self {
        Denial::Refused(reason)
    }
}

type Reply = Result<Message, Denial>;

impl Daemon {
    /// An agent named `name`; with `psk`, it talks only to peers that hold that key.
    pub fn new(name: String, limits: Limits, sink: OutputSink, psk: Option<Psk>) -> Arc<Self> {
        Arc::new(Daemon { name, limits, vms: Mutex::new(HashMap::new()), sink, psk })
    }

    /// Refuses one more migration when `vms` (the locked VM table) already has the most this agent runs.
    fn check_migrations(&self, vms: &HashMap<String, VmSlot>) -> Result<(), String> {
        let running = vms.values().filter(|s| matches!(s.phase, VmPhase::MigratingOut | VmPhase::MigratingIn)).count();
        if running >= self.limits.max_migrations {
            return Err(format!(
                "agent {} already runs {running} migration(s), its limit (--max-migrations {}): try again when one ends",
                self.name, self.limits.max_migrations
            ));
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

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Result<(), String> {
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let greeting = handshake::accept(stream, &self.name, self.psk.as_ref());
        let Ok(accepted) = tokio::time::timeout(GREETING_TIMEOUT, greeting).await else {
            return Err(format!("no greeting within {GREETING_TIMEOUT:?}: dropped the connection"));
        };
        let (greeted, role) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                if let Some(reason) = e.auth_refusal() {
                    crate::agent::metrics::get().auth_refused(reason);
                }
                return Err(e.to_string());
            }
        };
        let Greeted { mut rd, mut wr, peer: from } = greeted;
        match role {
            Role::Control => loop {
                let request = match rd.read().await {
                    Ok(Frame::Message(m)) => m,
                    Ok(Frame::Pages(_)) => {
                        return refuse(&mut wr, "the control connection carries no pages".into()).await
                    }
                    Err(ProtocolError::Closed) => return Ok(()),
                    Err(e) => {
                        note_unauthenticated(&e, peer);
                        return refuse(&mut wr, e.to_string()).await;
                    }
                };
                let reply = match self.control(request).await {
                    Ok(answer) => answer,
                    Err(Denial::Refused(reason)) => Message::Refuse { reason },
                    Err(Denial::Failed(reason)) => Message::Failed { reason },
                };
                send(&mut wr, &reply).await?;
            },
            Role::Migration => self.incoming(rd, wr, &from, peer).await,
        }
    }

    async fn control(self: &Arc<Self>, request: Message) -> Reply {
        match request {
            Message::Ping => Ok(Message::Pong),
            Message::Status => Ok(Message::StatusReport { agent: self.name.clone(), vms: self.status() }),
            Message::StartVm { name, config, tracking } => self.start_vm(name, config, tracking).await,
            Message::Migrate { name, to, mode, options } => self.migrate(name, to, mode, options).await,
            Message::WaitFinished { name, timeout_ms } => self.wait_finished(&name, timeout_ms).await,
            Message::RunLog { name } => match self.vms().get(&name) {
                Some(slot) => Ok(Message::RunLogReport { vm: name, runs: slot.run_log() }),
                None => Err(format!("no VM named {name:?} on agent {} (VMs here: {})", self.name, self.known()).into()),
            },
            other => Err(format!("{other:?} is not a request an agent answers").into()),
        }
    }

    fn status(&self) -> Vec<VmStatus> {
        let mut list: Vec<VmStatus> = self
            .vms()
            .iter()
            .map(|(name, slot)| {
                let runner = slot.runner.as_ref().map(|r| r.status());
                let mut phase = slot.phase;
                if phase == VmPhase::Running && runner.as_ref().is_some_and(|s| s.finished) {
                    phase = VmPhase::Finished;
                }
                let error = slot.error.clone().or_else(|| runner.as_ref().and_then(|s| s.error.clone()));
                let dirty = crate::agent::metrics::get().dirty_rate_of(name);
                let migration = slot
                    .migrating_since
                    .filter(|_| phase == VmPhase::MigratingOut)
                    .map(|since| migration_progress(name, slot.config.mem_bytes, since));
                VmStatus {
                    name: name.clone(),
                    phase: if error.is_some() { VmPhase::Failed } else { phase },
                    fixture: slot.config.fixture.kind.name().to_string(),
                    vcpus: slot.config.fixture.vcpus,
                    mem_bytes: slot.config.mem_bytes,
                    records: runner.map(|s| s.records).unwrap_or(0),
                    error,
                    dirty_rate_bytes_per_second: dirty.as_ref().map(|(rate, _)| *rate),
                    dirty_tracker: dirty.map(|(_, tracker)| tracker),
                    migration,
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn check_room(&self, name: &str, config: &MachineConfig) -> Result<(), String> {
        if let Some(slot) = self.vms().get(name) {
            if slot.phase != VmPhase::MigratedAway {
                return Err(format!("a VM named {name:?} already exists on agent {} ({:?})", self.name, slot.phase));
            }
        }
        if config.mem_bytes > self.limits.max_guest_mem {
            return Err(format!(
                "agent {} has room for {} of guest memory per VM (--max-guest-mem) and VM {name:?} needs {}",
                self.name,
                format_size(self.limits.max_guest_mem),
                format_size(config.mem_bytes)
            ));
        }
        crate::host::check_memory_available(config.mem_bytes).map_err(|e| format!("agent {}: {e}", self.name))
    }

    async fn start_vm(self: &Arc<Self>, name: String, config: MachineConfig, tracking: DirtyTracking) -> Reply {
        self.check_room(&name, &config)?;
        config.fixture.validate().map_err(|e| e.to_string())?;
        let boot_config = config.clone();
        let machine = tokio::task::spawn_blocking(move || Machine::boot_with(boot_config, tracking))
            .await
            .map_err(|e| Denial::Failed(e.to_string()))?
            .map_err(|e| Denial::Failed(format!("cannot start VM {name:?}: {e}")))?;
        // Boot completes the configuration (a paced `dirty` guest's TSC ticks per
        // write): keep the machine's own, which is what a migration must send.
        let config = machine.config().clone();
        let gate = OutputGate { sink: self.sink.clone(), released: 0, hold: false };
        let runner = Arc::new(VmRunner::spawn(&name, machine, gate).map_err(|e| Denial::Failed(e.to_string()))?);
        if tracking != DirtyTracking::Bitmap {
            // The ring (and eBPF, which reads its pushes) logs only with logging on: on from
            // the start, it gives the VM a live dirty rate (`pcft vm status`, metrics).
            runner.set_dirty_logging(true).await.map_err(|e| Denial::Failed(e.to_string()))?;
        }
        runner.resume().await.map_err(|e| Denial::Failed(e.to_string()))?;
        tracing::info!(vm = %name, fixture = %config.fixture.kind, "started");
        let mut slot = VmSlot {
            phase: VmPhase::Running,
            config,
            runner: None,
            error: None,
            migrating_since: None,
            tracking,
            runs: Vec::new(),
        };
        slot.attach(runner);
        self.vms().insert(name, slot);
        Ok(Message::Ok)
    }

    fn known(&self) -> String {
        let names: Vec<String> = self.vms().keys().cloned().collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    async fn migrate(self: &Arc<Self>, name: String, to: String, mode: Mode, options: MigrationOptions) -> Reply {
        options.validate(mode).map_err(|e| format!("migration of {name:?} refused: {e}"))?;
        let (runner, config) = {
            let mut vms = self.vms();
            let running = vms.get(&name).is_some_and(|s| s.phase == VmPhase::Running && s.runner.is_some());
            if !running {
                drop(vms);
                return Err(format!(
                    "no running VM named {name:?} on agent {} (VMs here: {})",
                    self.name,
                    self.known()
                )
                .into());
            }
            self.check_migrations(&vms)?;
            let slot = vms.get_mut(&name).expect("checked");
            slot.phase = VmPhase::MigratingOut;
            slot.migrating_since = Some((Instant::now(), crate::agent::metrics::get().migration_counts(&name)));
            (Arc::clone(slot.runner.as_ref().expect("checked")), slot.config.clone())
        };
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
            progress: Arc::new(Progress::new()),
        })
        .instrument(span)
        .await;
        let outcome = match &result {
            Ok(MigrationOutcome::Completed(_)) => "completed",
            Ok(MigrationOutcome::DestinationLost { .. }) => "recovered",
            Err(MigrationError::LostAfterCommit(_)) => "lost",
            Err(_) => "failed",
        };
        let m = crate::agent::metrics::get();
        m.migrations.get_or_create(&MigrationLabels { mode: mode.name().into(), result: outcome.into() }).inc();
        m.set_phase(&name, if outcome == "completed" { "completed" } else { outcome });
        if outcome == "recovered" {
            m.vm(&m.failovers, &name, 1);
        }
        let result = match result {
            Ok(MigrationOutcome::DestinationLost { mut report, committed, detected_at, fenced_at }) => {
                let epoch = committed.epoch;
                return match self.fail_over(&name, runner, committed, fenced_at).await {
                    Ok(failover) => {
                        let failover_ms = detected_at.elapsed().as_secs_f64() * 1e3;
                        report.failover = Some(Box::new(FailoverReport { failover_ms, ..failover }));
                        tracing::warn!(vm = %name, epoch, failover_ms, "recovered at the source");
                        Ok(Message::Migrated(report))
                    }
                    Err(e) => {
                        let mut vms = self.vms();
                        let slot = vms.get_mut(&name).expect("a migrating VM stays in the table");
                        slot.phase = VmPhase::Failed;
                        slot.error = Some(e.clone());
                        Err(Denial::Failed(format!(
                            "migration of {name:?} to {to} failed and so did the failover: {e}"
                        )))
                    }
                };
            }
            Ok(MigrationOutcome::Completed(report)) => Ok(report),
            Err(e) => Err(e),
        };
        let mut vms = self.vms();
        let slot = vms.get_mut(&name).expect("a migrating VM stays in the table");
        match result {
            Ok(report) => {
                slot.phase = VmPhase::MigratedAway;
                slot.runner = None;
                drop(vms);
                // The last handle: the source copy stops here. Stopping joins the
                // VM's threads, so it runs off the async workers.
                tokio::task::spawn_blocking(move || drop(runner));
                tracing::info!(vm = %name, %to, ms = report.total_migration_ms, "migrated");
                Ok(Message::Migrated(report))
            }
            Err(e @ MigrationError::LostAfterCommit(_)) => {
                slot.phase = VmPhase::Failed;
                slot.error = Some(e.to_string());
                slot.runner = None;
                Err(Denial::Failed(format!("migration of {name:?} to {to} failed: {e}")))
            }
            Err(e) => {
                slot.phase = VmPhase::Running;
                let text = format!("migration of {name:?} to {to} failed, the VM keeps running here: {e}");
                // An unreachable or refusing destination is the operator's to fix (exit 2 at the CLI).
                match e {
                    MigrationError::Connect { .. } | MigrationError::Refused(_) => Err(Denial::Refused(text)),
                    _ => Err(Denial::Failed(text)),
                }
            }
        }
    }

    /// PostCopyFT failover: once the destination's lease has surely expired, stops
    /// the paused source copy, restores the last committed checkpoint over the
    /// source's memory (which holds every committed page), and runs it.
    async fn fail_over(
        &self,
        name: &str,
        runner: Arc<VmRunner>,
        committed: Box<Committed>,
        fenced_at: Instant,
    ) -> Result<FailoverReport, String> {
        let wait_from = Instant::now();
        tokio::time::sleep_until(fenced_at.into()).await;
        let fence_wait_ms = wait_from.elapsed().as_secs_f64() * 1e3;
        let memory = runner.memory();
        // Everything up to the switchover was released here; the restored state
        // holds it and whatever the checkpoints committed after it.
        let released = runner.status().released as usize;
        let tracking = match self.vms().get_mut(name) {
            Some(slot) => {
                slot.runner = None;
                slot.tracking
            }
            None => DirtyTracking::Bitmap,
        };
        let Committed { epoch, state } = *committed;
        let committed_outputs = state.devices.output_log.len() as u64;
        // The old copy's threads are joined, and the new VM built, off the async workers.
        // The restored VM keeps its tracker (and so its live dirty rate).
        let machine = tokio::task::spawn_blocking(move || {
            drop(runner);
            Machine::prepare_with(state.config.clone(), memory, tracking)?.restore(state)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot restore checkpoint {epoch}: {e}"))?;
        let gate = OutputGate { sink: self.sink.clone(), released, hold: false };
        let runner = Arc::new(VmRunner::spawn(name, machine, gate).map_err(|e| e.to_string())?);
        if tracking != DirtyTracking::Bitmap {
            runner.set_dirty_logging(true).await.map_err(|e| e.to_string())?;
        }
        runner.resume().await.map_err(|e| e.to_string())?;
        // Output of the committed epochs that the destination may not have released goes out now.
        runner.release_outputs(None);
        let mut vms = self.vms();
        let slot = vms.get_mut(name).ok_or("the VM left the table")?;
        slot.phase = VmPhase::Running;
        slot.attach(runner);
        Ok(FailoverReport { restored_epoch: epoch, failover_ms: 0.0, fence_wait_ms, committed_outputs })
    }

    async fn wait_finished(self: &Arc<Self>, name: &str, timeout_ms: u64) -> Reply {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let (runner, phase) = {
                let vms = self.vms();
                let Some(slot) = vms.get(name) else {
                    drop(vms);
                    return Err(
                        format!("no VM named {name:?} on agent {} (VMs here: {})", self.name, self.known()).into()
                    );
                };
                if let Some(error) = &slot.error {
                    return Err(Denial::Failed(format!("VM {name:?} failed: {error}")));
                }
                (slot.runner.clone(), slot.phase)
            };
            if phase == VmPhase::MigratedAway {
                return Err(format!("VM {name:?} has migrated away from agent {}", self.name).into());
            }
            if let Some(runner) = runner.filter(|_| phase == VmPhase::Running) {
                let status = runner.status();
                if let Some(error) = status.error {
                    return Err(Denial::Failed(format!("VM {name:?} failed: {error}")));
                }
                if status.finished {
                    let verified = runner.verify().await.map_err(|e| Denial::Failed(format!("VM {name:?}: {e}")))?;
                    return Ok(Message::Verified {
                        name: name.to_string(),
                        records: verified.records as u64,
                        memory_digest: verified.memory_digest,
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(Denial::Failed(format!("VM {name:?} did not finish within {timeout_ms} ms")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn incoming(
        self: Arc<Self>,
        mut rd: FrameReader,
        mut wr: FrameWriter,
        from: &str,
        peer: SocketAddr,
    ) -> Result<(), String> {
        let (name, config, mode, options) = match rd.read().await {
            Ok(Frame::Message(Message::Begin { name, config, mode, options })) => (name, config, mode, options),
            Ok(other) => return refuse(&mut wr, format!("expected Begin, got {other:?}")).await,
            Err(e) => {
                note_unauthenticated(&e, peer);
                return refuse(&mut wr, e.to_string()).await;
            }
        };
        let admitted = self
            .check_room(&name, &config)
            .and_then(|_| config.fixture.validate().map_err(|e| e.to_string()))
            .and_then(|_| options.validate(mode).map_err(|e| e.to_string()));
        // Counted and taken under one lock, so two incoming migrations cannot both take the last place.
        let admitted = admitted.and_then(|_| {
            let mut vms = self.vms();
            self.check_migrations(&vms)?;
            let slot = VmSlot {
                phase: VmPhase::MigratingIn,
                config: config.clone(),
                runner: None,
                error: None,
                migrating_since: None,
                tracking: if mode.checkpoints() { options.checkpoint_tracker } else { DirtyTracking::Bitmap },
                runs: Vec::new(),
            };
            vms.insert(name.clone(), slot);
            Ok(())
        });
        if let Err(reason) = admitted {
            tracing::warn!(vm = %name, %from, "refused an incoming migration: {reason}");
            return refuse(&mut wr, reason).await;
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
            Err(e) => {
                let ran_here = vms.get(&name).is_some_and(|s| s.runner.is_some());
                if ran_here {
                    let slot = vms.get_mut(&name).expect("checked");
                    slot.phase = VmPhase::Failed;
                    slot.error = Some(e.to_string());
                } else {
                    vms.remove(&name);
                }
                Err(format!("incoming migration of {name:?} failed: {e}"))
            }
        }
    }
}

async fn send(wr: &mut FrameWriter, message: &Message) -> Result<(), String> {
    wr.write(&encode_message(message)).await.map_err(|e| e.to_string())
}

/// Logs and counts a frame that failed its authentication check.
fn note_unauthenticated(error: &ProtocolError, peer: SocketAddr) {
    if *error == ProtocolError::Unauthenticated {
        tracing::warn!(%peer, "refused a peer: its frame failed the HMAC check (wrong --psk-file, or tampering)");
        crate::agent::metrics::get().auth_refused("bad-mac");
    }
}

/// Tells the peer why, then ends the connection with that reason as the error.
async fn refuse(wr: &mut FrameWriter, reason: String) -> Result<(), String> {
    let _ = send(wr, &Message::Refuse { reason: reason.clone() }).await;
    Err(reason)
}

/// How far `vm`'s outgoing migration has got, from the agent's metrics since it started.
fn migration_progress(vm: &str, mem_bytes: u64, (started, at_start): (Instant, MigrationCounts)) -> MigrationProgress {
    let m = crate::agent::metrics::get();
    let now = m.migration_counts(vm);
    MigrationProgress {
        phase: m.phase_of(vm).unwrap_or("precopy").to_string(),
        pages_sent: now.pages_sent.saturating_sub(at_start.pages_sent),
        pages_total: mem_bytes / crate::vmm::memory::PAGE_SIZE,
        checkpoints_committed: now.checkpoints.saturating_sub(at_start.checkpoints),
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}
