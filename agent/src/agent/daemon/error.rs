//! Why the daemon does not do what it was asked: refused (the operator's to
//! fix, exit 2 at the CLI) or carried out and failed (exit 1), and why a
//! connection ended.

use crate::host::{format_size, HostError};
use crate::migration::ft::failover::FailoverError;
use crate::migration::source::MigrationError;
use crate::vmm::machine::MachineError;
use crate::vmm::runner::RunnerError;
use crate::wire::frame::ProtocolError;
use crate::wire::handshake::HandshakeError;
use crate::wire::payload::{OptionsError, VmPhase};
use vm_fixtures::ParamsError;

/// Why a request is not served as asked: sent as `Refuse` (exit 2 at the
/// CLI), or, on a connection, the reason it is refused and closed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no VM named {vm:?} on agent {agent} (VMs here: {known})")]
    NoSuchVm { vm: String, agent: String, known: String },
    /// A migration, stop or removal of a VM in a phase that does not allow it.
    #[error("VM {vm:?} on agent {agent} cannot {action}: {why}")]
    WrongPhase { vm: String, agent: String, action: &'static str, why: String },
    #[error("a VM named {vm:?} already runs on agent {agent} ({}): choose another name, or stop and remove it first (pcft vm stop / pcft vm rm)", phase.name())]
    AlreadyExists { vm: String, agent: String, phase: VmPhase },
    /// The destination named is the agent the VM runs on.
    #[error("VM {vm:?} is migrating out of agent {agent}, the agent --to names: a VM cannot migrate to the agent it runs on; name another agent with --to")]
    MigrationToItself { vm: String, agent: String },
    #[error(
        "agent {agent} has room for {} of guest memory per VM (--max-guest-mem) and VM {vm:?} needs {}",
        format_size(*room),
        format_size(*needs)
    )]
    NoRoom { agent: String, vm: String, room: u64, needs: u64 },
    /// The agent's VMs together would hold more guest memory than it may.
    #[error(
        "agent {agent} holds {} of guest memory for {vms} VM(s) and VM {vm:?} needs {} more, past its limit of {} (--max-total-guest-mem; default: this host's memory): remove stopped or finished VMs (pcft vm rm), migrate one away, or use another agent",
        format_size(*held),
        format_size(*needs),
        format_size(*limit)
    )]
    NoTotalRoom { agent: String, vm: String, held: u64, vms: usize, needs: u64, limit: u64 },
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
    #[error(
        "agent {agent} already serves {limit} connections, its limit (--max-connections {limit}): try again when one ends"
    )]
    TooManyConnections { agent: String, limit: usize },
    #[error("VM {vm:?} has migrated away from agent {agent}{}", match to { Some(to) => format!(" to agent {to}: look for it there"), None => String::new() })]
    MigratedAway { vm: String, agent: String, to: Option<String> },
    /// `pcft migration …` about a VM that has not migrated out of this agent.
    #[error("VM {vm:?} on agent {agent} has no outgoing migration: none started here since the VM started or arrived")]
    NoMigration { vm: String, agent: String },
    /// The migration cannot be cancelled now.
    #[error("the migration of VM {vm:?} on agent {agent} cannot be cancelled: {source}")]
    CancelRefused { vm: String, agent: String, source: crate::migration::progress::CancelRefused },
    /// The agent is stopping (SIGTERM) and takes no new work.
    #[error("agent {agent} is shutting down and takes no new VMs or migrations: use another agent")]
    ShuttingDown { agent: String },
    #[error("{request} is not a request an agent answers")]
    NotARequest { request: String },
    /// The destination could not be reached or refused: the operator's to fix.
    #[error("migration of {vm:?} to {to} failed, the VM keeps running here: {source}")]
    DestinationRefused { vm: String, to: String, source: Box<MigrationError> },
    #[error("the control connection carries no pages")]
    PagesOnControl,
    #[error("expected Begin, got {got}")]
    ExpectedBegin { got: String },
    /// A demand channel whose token no migration here expects (it ended, or never began).
    #[error("no migration here expects this demand channel (it ended, or its Begin named another token)")]
    UnknownDemandChannel,
    /// Two migrations named the same demand channel token.
    #[error("another migration here already uses this demand channel token: start the migration again")]
    DemandTokenInUse,
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
    #[error("the migration of VM {vm:?} is still running after {timeout_ms} ms: wait again (pcft migration wait), or cancel it (pcft migration cancel)")]
    MigrationRunning { vm: String, timeout_ms: u64 },
    #[error(
        "the migration of VM {vm:?} to {to} was cancelled before its switchover, as asked; the VM keeps running here"
    )]
    Cancelled { vm: String, to: String },
    #[error("cannot stop VM {vm:?}: {source}")]
    Stop { vm: String, source: RunnerError },
}

impl Failure {
    /// The answer that tells the CLI of this failure, and whether the VM still
    /// runs here (a migration that failed before its switchover, or was cancelled).
    pub fn answer(&self) -> crate::wire::control::ControlMessage {
        let vm_runs_here = matches!(self, Failure::Migration { .. } | Failure::Cancelled { .. });
        crate::wire::control::ControlMessage::Failed { reason: self.to_string(), vm_runs_here }
    }
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

/// Why a connection ended other than by its peer hanging up (logged by `Daemon::serve`).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Socket(std::io::Error),
    #[error("no greeting within {after:?}: dropped the connection")]
    GreetingTimeout { after: std::time::Duration },
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

/// In the operator's words, why a VM in `phase` is not a running VM here
/// (`error`: why it failed, if it did).
pub fn not_running(phase: VmPhase, error: Option<&str>) -> String {
    match phase {
        VmPhase::Starting => "it is still booting; wait until pcft vm start returns".into(),
        VmPhase::Running => "it is running".into(),
        VmPhase::MigratingOut => {
            "it is migrating out (pcft migration status shows where; pcft migration cancel stops it)".into()
        }
        VmPhase::MigratingIn => "it is still arriving here; wait until its migration in completes".into(),
        VmPhase::MigratedAway => "it migrated away; nothing of it runs here".into(),
        VmPhase::Finished => "its workload finished; nothing is left to run or move (pcft vm rm frees it)".into(),
        VmPhase::Stopped => "it was stopped (pcft vm stop); pcft vm rm frees it".into(),
        VmPhase::Failed => format!("it failed ({}); pcft vm rm frees it", error.unwrap_or("no reason recorded")),
    }
}
