//! Serving connections: the greeting, then the CLI's requests (role
//! `Control`) or an incoming migration (role `Migration`).

use super::admission::{Admission, Ticket};
use super::error::{DaemonError, Denial, Refusal};
use super::outgoing::MigrateRequest;
use super::server::{refuse, send, Daemon, Reply, GREETING_TIMEOUT};
use super::table;
use crate::wire::control::ControlMessage;
use crate::wire::frame::{Frame, FrameReader, FrameWriter, ProtocolError};
use crate::wire::greeting::Role;
use crate::wire::handshake::{self, Greeted};
use crate::wire::migration::MigrationMessage;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// Whether a failed accept(2) concerns only that connection or a shortage that
/// passes (no file descriptor, buffer or memory for it now): then the agent
/// goes on accepting.
fn accept_may_succeed_later(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

/// A warning logged at most once a second (a flood would otherwise flood the log).
#[derive(Default)]
struct RateLimitedWarning {
    last: Option<Instant>,
}

impl RateLimitedWarning {
    fn warn(&mut self, log: impl FnOnce()) {
        if self.last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            self.last = Some(Instant::now());
            log();
        }
    }
}

impl Daemon {
    /// Accepts connections until the listener fails for good (and, meanwhile,
    /// releases the memory of VMs that ended). At most `--max-connections`
    /// that have not greeted are kept: one more closes the oldest of them
    /// (counted), so a flood of silent connections cannot keep a peer that
    /// greets at once out (see `admission`); at most as many greeted ones are
    /// served, and a peer past that is refused with the reason. Running out of
    /// file descriptors or memory for one more is waited out, never fatal: a
    /// flood of connections must not take the agent, and its VMs, down.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let reaper = tokio::spawn(Arc::clone(&self).reap());
        let admission = Admission::new(self.limits.max_connections);
        let mut warned = RateLimitedWarning::default();
        let accepted = loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) if accept_may_succeed_later(&e) => {
                    warned.warn(|| tracing::warn!("cannot accept a connection now ({e}); trying again"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => break e,
            };
            let daemon = Arc::clone(&self);
            let evicted = admission.arrive(|ticket| {
                tokio::spawn(async move {
                    if let Err(e) = daemon.connection(stream, ticket).await {
                        tracing::warn!(%peer, "connection ended: {e}");
                    }
                })
                .abort_handle()
            });
            if evicted {
                crate::metrics::get().connection_refused();
                let limit = admission.limit();
                warned.warn(|| {
                    tracing::warn!(%peer, "{limit} connections had not greeted (--max-connections): closed the oldest of them to take this one")
                });
            }
        };
        reaper.abort();
        Err(accepted)
    }

    pub(super) async fn connection(self: Arc<Self>, stream: TcpStream, ticket: Ticket) -> Result<(), DaemonError> {
        stream.set_nodelay(true).map_err(DaemonError::Socket)?;
        let greeting = handshake::accept(stream, &self.name, self.psk.as_ref());
        let Ok(accepted) = tokio::time::timeout(GREETING_TIMEOUT, greeting).await else {
            return Err(DaemonError::GreetingTimeout { after: GREETING_TIMEOUT });
        };
        let (greeted, role) = accepted.inspect_err(|e| {
            if let Some(reason) = e.auth_refusal() {
                crate::metrics::get().auth_refused(reason);
            }
        })?;
        let Greeted { rd, wr, peer: from } = greeted;
        let Some(_place) = ticket.greeted() else {
            crate::metrics::get().connection_refused();
            let refusal = Refusal::TooManyConnections { agent: self.name.clone(), limit: self.limits.max_connections };
            tracing::warn!(%from, "refused a connection: {refusal}");
            let mut wr = wr;
            return match role {
                Role::Control => refuse(&mut wr, refusal, |reason| ControlMessage::Refuse { reason }).await,
                Role::Migration | Role::DemandChannel { .. } => {
                    refuse(&mut wr, refusal, |reason| MigrationMessage::Refuse { reason }).await
                }
            };
        };
        match role {
            Role::Control => self.serve_control(rd, wr).await,
            Role::Migration => self.incoming(rd, wr, &from).await,
            Role::DemandChannel { token } => match self.demand_channels.attach(token, rd) {
                Ok(()) => Ok(()),
                Err(refusal) => {
                    tracing::warn!(%from, "refused a demand channel: {refusal}");
                    let mut wr = wr;
                    refuse(&mut wr, refusal, |reason| MigrationMessage::Refuse { reason }).await
                }
            },
        }
    }

    /// Answers the CLI's requests on one connection until it closes.
    pub(super) async fn serve_control(
        self: Arc<Self>,
        mut rd: FrameReader,
        mut wr: FrameWriter,
    ) -> Result<(), DaemonError> {
        let refuse_with = |reason| ControlMessage::Refuse { reason };
        loop {
            let request = match rd.read::<ControlMessage>().await {
                Ok(Frame::Message(m)) => m,
                Ok(Frame::Pages(_)) => return refuse(&mut wr, Refusal::PagesOnControl, refuse_with).await,
                Err(ProtocolError::Closed) => return Ok(()),
                Err(e) => return refuse(&mut wr, Refusal::Protocol(e), refuse_with).await,
            };
            let reply = match self.control(request).await {
                Ok(answer) => answer,
                Err(Denial::Refused(refusal)) => ControlMessage::Refuse { reason: refusal.to_string() },
                Err(Denial::Failed(failure)) => failure.answer(),
            };
            send(&mut wr, &reply).await?;
        }
    }

    pub(super) async fn control(self: &Arc<Self>, request: ControlMessage) -> Reply {
        match request {
            ControlMessage::Ping => Ok(ControlMessage::Pong),
            ControlMessage::Status => Ok(ControlMessage::StatusReport { agent: self.name.clone(), vms: self.status() }),
            ControlMessage::StartVm { name, config, tracking } => self.start_vm(name, config, tracking).await,
            ControlMessage::StopVm { name } => self.stop_vm(&name).await,
            ControlMessage::RemoveVm { name } => self.remove_vm(&name).await,
            ControlMessage::Migrate { name, to, mode, options, detach } => {
                self.migrate(MigrateRequest { name, to, mode, options, detach }).await
            }
            ControlMessage::MigrationStatus { name } => Ok(self.migration_status(&name)?),
            ControlMessage::WaitMigration { name, timeout_ms } => self.wait_migration(&name, timeout_ms).await,
            ControlMessage::CancelMigration { name } => Ok(self.cancel_migration(&name)?),
            ControlMessage::WaitFinished { name, timeout_ms } => self.wait_finished(&name, timeout_ms).await,
            ControlMessage::RunLog { name } => {
                let runs = self.vms().get(&name).map(table::VmSlot::run_log);
                match runs {
                    Some(runs) => Ok(ControlMessage::RunLogReport { vm: name, runs }),
                    None => Err(self.no_such_vm(name).into()),
                }
            }
            other => Err(Refusal::NotARequest { request: format!("{other:?}") }.into()),
        }
    }
}
