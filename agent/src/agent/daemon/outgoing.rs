//! Outgoing migrations: each runs as a task of the agent, not of the request
//! that started it, so it goes on when the CLI leaves (`--detach`, Ctrl-C);
//! `pcft migration status|wait|cancel` find it in the VM's record.

use super::error::{FailoverFailure, Failure, Refusal};
use super::migration_watch::MigrationWatch;
use super::server::{Daemon, Reply};
use crate::metrics::MigrationLabels;
use crate::migration::ft::failover::{restore_at_source, Failover};
use crate::migration::progress::{CancelAnswer, Progress};
use crate::migration::source::{migrate_out, MigrateOut, MigrationError, MigrationOutcome};
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::MachineConfig;
use crate::vmm::runner::VmRunner;
use crate::wire::control::ControlMessage;
use crate::wire::payload::{FailoverReport, MigrationOptions, MigrationState, Mode, VmPhase};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// A VM that starts to migrate out: what the migration works with.
struct Outgoing {
    runner: Arc<VmRunner>,
    config: MachineConfig,
    watch: Arc<MigrationWatch>,
}

/// One outgoing migration as asked.
pub(super) struct MigrateRequest {
    pub name: String,
    pub to: String,
    pub mode: Mode,
    pub options: MigrationOptions,
    /// Answer at once (`MigrationStarted`) instead of when the migration ends.
    pub detach: bool,
}

impl Daemon {
    /// Marks VM `name` as migrating out to `to` (if it runs here and a
    /// migration may start), and returns what the migration works with.
    fn begin_migration(&self, name: &str, to: &str, mode: Mode) -> Result<Outgoing, Refusal> {
        let mut vms = self.vms();
        let Some(slot) = vms.get(name) else {
            drop(vms);
            return Err(self.no_such_vm(name.to_string()));
        };
        let phase = slot.phase();
        if phase == VmPhase::MigratingOut {
            let to = slot.migration.as_ref().map_or("another agent", |m| m.to.as_str());
            let why = format!(
                "it is already migrating to {to} (pcft migration status shows how far; pcft migration cancel stops it)"
            );
            return Err(Refusal::WrongPhase { vm: name.into(), agent: self.name.clone(), action: "migrate", why });
        }
        if phase != VmPhase::Running || slot.runner.is_none() {
            return Err(self.wrong_phase(name, "migrate", phase, slot.error.as_deref()));
        }
        self.check_migrations(&vms)?;
        let slot = vms.get_mut(name).expect("checked");
        slot.phase = VmPhase::MigratingOut;
        let watch = Arc::new(MigrationWatch::new(to.to_string(), mode, Arc::new(Progress::new(mode))));
        slot.migration = Some(Arc::clone(&watch));
        Ok(Outgoing { runner: Arc::clone(slot.runner.as_ref().expect("checked")), config: slot.config.clone(), watch })
    }

    /// Starts migrating VM `name` away; answers when it ends, or at once with `detach`.
    pub(super) async fn migrate(self: &Arc<Self>, request: MigrateRequest) -> Reply {
        let MigrateRequest { name, to, mode, options, detach } = request;
        self.refuse_if_draining()?;
        options.validate(mode).map_err(|source| Refusal::MigrationOptions { vm: name.clone(), source })?;
        let outgoing = self.begin_migration(&name, &to, mode)?;
        let watch = Arc::clone(&outgoing.watch);
        let waiter = Arc::clone(&watch);
        tracing::info!(vm = %name, %to, mode = mode.name(), detach, "migrating out");
        let daemon = Arc::clone(self);
        let (vm, dest) = (name.clone(), to.clone());
        tokio::spawn(async move {
            let (state, reason, answer) = match daemon.run_migration(&vm, &dest, mode, options, outgoing).await {
                Ok(answer) => match &answer {
                    ControlMessage::Migrated(r) if r.failover.is_some() => {
                        let reason = match &r.failure {
                            Some(f) if r.cancelled => {
                                Some(format!("cancelled after the switchover: failed over on request ({})", f.reason))
                            }
                            Some(f) => Some(format!("the destination was lost ({}): {}", f.kind, f.reason)),
                            None => None,
                        };
                        (MigrationState::Recovered, reason, answer)
                    }
                    _ => (MigrationState::Completed, None, answer),
                },
                Err(super::error::Denial::Failed(failure @ Failure::Cancelled { .. })) => {
                    (MigrationState::Cancelled, Some(failure.to_string()), failure.answer())
                }
                Err(super::error::Denial::Refused(refusal)) => {
                    let reason = refusal.to_string();
                    (MigrationState::Failed, Some(reason.clone()), ControlMessage::Refuse { reason })
                }
                Err(super::error::Denial::Failed(failure)) => {
                    (MigrationState::Failed, Some(failure.to_string()), failure.answer())
                }
            };
            watch.end(state, reason, answer);
        });
        if detach {
            return Ok(ControlMessage::MigrationStarted { vm: name, to, mode });
        }
        Ok(waiter.wait(None).await.expect("a migration without a timeout is waited for until it ends"))
    }

    /// Runs one outgoing migration to its end and settles the VM's record.
    async fn run_migration(
        &self,
        name: &str,
        to: &str,
        mode: Mode,
        options: MigrationOptions,
        outgoing: Outgoing,
    ) -> Reply {
        let Outgoing { runner, config, watch } = outgoing;
        let span = tracing::info_span!("migration", vm = %name, to = %to, mode = mode.name(), side = "source");
        let result = migrate_out(MigrateOut {
            runner: &runner,
            vm: name,
            config: &config,
            to,
            mode,
            options,
            agent: &self.name,
            psk: self.psk.as_ref(),
            staging: &self.limits.staging,
            progress: Arc::clone(&watch.progress),
        })
        .instrument(span)
        .await;
        count_migration(name, mode, &result);
        let (name, to) = (name.to_string(), to.to_string());
        match result {
            Ok(MigrationOutcome::DestinationLost {
                mut report,
                committed,
                detected_at,
                fenced_at,
                destination_released,
            }) => {
                let epoch = committed.epoch;
                let failover =
                    Failover { vm: &name, runner, committed, fenced_at, sink: self.sink.clone(), destination_released };
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
                crate::metrics::get().vm_left(&name);
                // The last handle: the source copy stops here. Stopping joins the
                // VM's threads, so it runs off the async workers.
                tokio::task::spawn_blocking(move || drop(runner));
                tracing::info!(vm = %name, %to, ms = report.total_migration_ms, "migrated");
                Ok(ControlMessage::Migrated(report))
            }
            Err(MigrationError::Cancelled) => {
                if let Some(slot) = self.vms().get_mut(&name) {
                    slot.phase = VmPhase::Running;
                }
                tracing::info!(vm = %name, %to, "migration cancelled before the switchover, the VM keeps running here");
                Err(Failure::Cancelled { vm: name, to }.into())
            }
            Err(source @ MigrationError::LostAfterCommit(_)) => {
                self.mark_failed(&name, source.to_string(), true);
                crate::metrics::get().vm_left(&name);
                tracing::error!(vm = %name, %to, "lost: {source}");
                Err(Failure::LostAfterCommit { vm: name, to, source }.into())
            }
            Err(source) => {
                if let Some(slot) = self.vms().get_mut(&name) {
                    slot.phase = VmPhase::Running;
                }
                tracing::warn!(vm = %name, %to, "migration failed, the VM keeps running here: {source}");
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

    /// VM `name`'s latest outgoing migration.
    fn migration_of(&self, name: &str) -> Result<Arc<MigrationWatch>, Refusal> {
        let vms = self.vms();
        match vms.get(name) {
            Some(slot) => {
                slot.migration.clone().ok_or_else(|| Refusal::NoMigration { vm: name.into(), agent: self.name.clone() })
            }
            None => {
                drop(vms);
                Err(self.no_such_vm(name.to_string()))
            }
        }
    }

    /// `pcft migration status`.
    pub(super) fn migration_status(&self, name: &str) -> Result<ControlMessage, Refusal> {
        let watch = self.migration_of(name)?;
        let mem_bytes = self.vms().get(name).map_or(0, |slot| slot.config.mem_bytes);
        Ok(ControlMessage::MigrationStatusReport(watch.status(name, mem_bytes)))
    }

    /// `pcft migration wait`: the answer `pcft migrate` would have got.
    pub(super) async fn wait_migration(&self, name: &str, timeout_ms: u64) -> Reply {
        let watch = self.migration_of(name)?;
        match watch.wait(Some(Duration::from_millis(timeout_ms))).await {
            Some(answer) => Ok(answer),
            None => Err(Failure::MigrationRunning { vm: name.into(), timeout_ms }.into()),
        }
    }
}

/// Counts a finished outgoing migration of `vm` in the agent's metrics, by its outcome.
fn count_migration(vm: &str, mode: Mode, result: &Result<MigrationOutcome, MigrationError>) {
    let outcome = match result {
        Ok(MigrationOutcome::Completed(_)) => "completed",
        Ok(MigrationOutcome::DestinationLost { .. }) => "recovered",
        Err(MigrationError::LostAfterCommit(_)) => "lost",
        Err(MigrationError::Cancelled) => "cancelled",
        Err(_) => "failed",
    };
    let m = crate::metrics::get();
    m.migrations.get_or_create(&MigrationLabels { mode: mode.name().into(), result: outcome.into() }).inc();
    m.set_phase(vm, outcome);
    if outcome == "recovered" {
        m.vm(&m.failovers, vm, 1);
    }
}

impl Daemon {
    /// `pcft migration cancel`: asks the running migration to stop, as the
    /// source endpoint decides against its commit point.
    pub(super) fn cancel_migration(&self, name: &str) -> Result<ControlMessage, Refusal> {
        let watch = self.migration_of(name)?;
        if watch.state().ended() {
            let why = format!("its latest migration has already ended ({})", watch.state().name());
            return Err(Refusal::WrongPhase { vm: name.into(), agent: self.name.clone(), action: "cancel", why });
        }
        let answer = watch.progress.request_cancel().map_err(|source| Refusal::CancelRefused {
            vm: name.into(),
            agent: self.name.clone(),
            source,
        })?;
        watch.cancelling();
        let failover = answer == CancelAnswer::WillFailOver;
        tracing::warn!(vm = %name, to = %watch.to, failover, "migration cancel accepted");
        Ok(ControlMessage::CancelAccepted { vm: name.to_string(), failover })
    }
}
