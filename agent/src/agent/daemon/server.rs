//! The daemon itself: its VM table, limits and key, and the helpers every
//! request shares (`lifecycle`, `outgoing`, `incoming` and `shutdown` add
//! the requests; `connection` serves them).

use super::demand_channels::DemandChannels;
use super::error::{DaemonError, Denial, Refusal};
use super::table::{vm_status, Room, VmTable};
use crate::migration::ft::staging::StagingLimits;
use crate::vmm::output::OutputSink;
use crate::wire::auth::Psk;
use crate::wire::control::ControlMessage;
use crate::wire::frame::{encode_message, FrameWriter};
use crate::wire::message_set::WireMessage;
use crate::wire::payload::VmPhase;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a new connection may take to greet (`Hello`) before it is dropped.
pub(super) const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// What an agent takes on at most.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Guest memory for one VM.
    pub max_guest_mem: u64,
    /// Guest memory for all of the agent's VMs together (running, stopped but
    /// not yet released, and arriving).
    pub max_total_guest_mem: u64,
    /// Migrations in or out at the same time.
    pub max_migrations: usize,
    /// Connections served at the same time (control, migrations, demand channels, not yet greeted).
    pub max_connections: usize,
    /// Memory (and the file beyond it) for each outgoing migration's open checkpoint.
    pub staging: StagingLimits,
    /// How long a VM that no longer runs (finished, failed, stopped) keeps its memory.
    pub release_after: Duration,
}

pub struct Daemon {
    pub(super) name: String,
    pub(super) limits: Limits,
    vms: Mutex<VmTable>,
    /// Where released guest output goes (the outside world).
    pub(super) sink: OutputSink,
    /// With a key, every peer (agents, the CLI) must authenticate with it.
    pub(super) psk: Option<Psk>,
    /// Shutting down: new VMs and migrations are refused.
    pub(super) draining: AtomicBool,
    /// The demand channels incoming migrations wait for.
    pub(super) demand_channels: Arc<DemandChannels>,
}

pub(super) type Reply = Result<ControlMessage, Denial>;

impl Daemon {
    /// An agent named `name`; with `psk`, it talks only to peers that hold that key.
    pub fn new(name: String, limits: Limits, sink: OutputSink, psk: Option<Psk>) -> Arc<Self> {
        Arc::new(Daemon {
            name,
            limits,
            vms: Mutex::new(VmTable::new()),
            sink,
            psk,
            draining: AtomicBool::new(false),
            demand_channels: Arc::default(),
        })
    }

    /// Refuses one more migration when `vms` (the locked VM table) already has the most this agent runs.
    pub(super) fn check_migrations(&self, vms: &VmTable) -> Result<(), Refusal> {
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

    /// Refuses new work while the agent shuts down.
    pub(super) fn refuse_if_draining(&self) -> Result<(), Refusal> {
        if self.is_draining() {
            return Err(Refusal::ShuttingDown { agent: self.name.clone() });
        }
        Ok(())
    }

    /// What this agent may hold, for admission.
    pub(super) fn room(&self) -> Room<'_> {
        Room { agent: &self.name, per_vm: self.limits.max_guest_mem, total: self.limits.max_total_guest_mem }
    }

    pub(super) fn vms(&self) -> std::sync::MutexGuard<'_, VmTable> {
        self.vms.lock().expect("VM table lock")
    }

    pub(super) fn status(&self) -> Vec<crate::wire::payload::VmStatus> {
        let mut list: Vec<_> = self.vms().iter().map(|(name, slot)| vm_status(name, slot)).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub(super) fn known(&self) -> String {
        let mut names: Vec<String> = self.vms().keys().cloned().collect();
        names.sort();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// The refusal for a request about VM `vm`, which is not here (the table must not be locked).
    pub(super) fn no_such_vm(&self, vm: String) -> Refusal {
        Refusal::NoSuchVm { vm, agent: self.name.clone(), known: self.known() }
    }

    /// Whether the agent is shutting down (and so refuses new VMs and migrations).
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub(super) async fn send<M: WireMessage>(wr: &mut FrameWriter, message: &M) -> Result<(), DaemonError> {
    wr.write(&encode_message(message)).await.map_err(DaemonError::Send)
}

/// Tells the peer why (in the message `refuse_with` makes of the reason, in
/// the connection's message set), then ends the connection with the refusal as the error.
pub(super) async fn refuse<M: WireMessage>(
    wr: &mut FrameWriter,
    refusal: Refusal,
    refuse_with: impl FnOnce(String) -> M,
) -> Result<(), DaemonError> {
    let _ = send(wr, &refuse_with(refusal.to_string())).await;
    Err(DaemonError::Refused(refusal))
}
