//! A graceful stop (SIGTERM): take no new work, let running migrations reach
//! their end (bounded by `--shutdown-timeout` or a second signal), then stop
//! every VM, each with a line in the log. docs/operations.md, "Stopping an
//! agent", says what happens to the VMs.

use super::server::Daemon;
use crate::host::format_size;
use crate::wire::payload::VmPhase;
use std::future::Future;
use std::time::{Duration, Instant};

/// How a shutdown went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Migrations that ended while the agent waited.
    pub migrations_finished: usize,
    /// Migrations still running when the wait ended (cut by the agent's exit), by VM.
    pub migrations_cut: Vec<String>,
    /// VMs that still held a guest here when the agent stopped: running ones
    /// were stopped (a warning each), ended ones only freed.
    pub vms_stopped: Vec<String>,
}

impl Daemon {
    /// Stops the agent gracefully: refuses new work from now on, waits for
    /// the running migrations to end (at most `timeout`, or until `interrupt`
    /// resolves: a second signal), then stops every VM here.
    pub async fn shutdown(&self, timeout: Duration, interrupt: impl Future<Output = ()>) -> ShutdownReport {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        let migrating = self.migrating();
        let mut report = ShutdownReport::default();
        if !migrating.is_empty() {
            tracing::info!(
                migrations = %migrating.join(", "),
                "shutting down: taking no new work; waiting up to {} s (--shutdown-timeout; a second SIGTERM stops waiting) for the running migrations to end",
                timeout.as_secs()
            );
        } else {
            tracing::info!("shutting down: no migration is running");
        }
        let deadline = Instant::now() + timeout;
        let waited = async {
            while !self.migrating().is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            () = waited => {}
            () = interrupt => tracing::warn!("second signal: no more waiting for migrations"),
        }
        let cut = self.migrating();
        report.migrations_finished = migrating.len().saturating_sub(cut.len());
        for migration in &cut {
            tracing::error!(
                migration = %migration,
                "cut by the shutdown: an outgoing migration before its switchover leaves the VM to stop with this agent; after it, the destination lacks the pages not yet sent; an incoming PostCopyFT migration is failed over by its source; an incoming one without PostCopyFT loses the VM"
            );
        }
        report.migrations_cut = cut;
        report.vms_stopped = self.stop_all().await;
        tracing::info!(
            migrations_finished = report.migrations_finished,
            migrations_cut = report.migrations_cut.len(),
            vms_stopped = report.vms_stopped.len(),
            "agent stopped"
        );
        report
    }

    /// The running migrations, as `VM (out to B)` / `VM (in)`.
    fn migrating(&self) -> Vec<String> {
        let vms = self.vms();
        let mut list: Vec<String> = vms
            .iter()
            .filter_map(|(name, slot)| match slot.phase {
                VmPhase::MigratingOut => {
                    let to = slot.migration.as_ref().map_or("?", |m| m.to.as_str());
                    Some(format!("{name} (out to {to})"))
                }
                VmPhase::MigratingIn => Some(format!("{name} (in)")),
                _ => None,
            })
            .collect();
        list.sort();
        list
    }

    /// Stops every VM that still has a guest here and logs each; returns their names.
    async fn stop_all(&self) -> Vec<String> {
        let runners: Vec<_> = {
            let mut vms = self.vms();
            let mut runners: Vec<_> = vms
                .iter_mut()
                .filter_map(|(name, slot)| {
                    let phase = slot.phase();
                    slot.runner.take().map(|runner| (name.clone(), phase, slot.config.mem_bytes, runner))
                })
                .collect();
            runners.sort_by(|a, b| a.0.cmp(&b.0));
            runners
        };
        let mut stopped = Vec::new();
        for (name, phase, mem, runner) in runners {
            match phase {
                VmPhase::Running | VmPhase::MigratingOut | VmPhase::MigratingIn => tracing::warn!(
                    vm = %name,
                    phase = phase.name(),
                    "stopping a running VM with the agent: its guest state is not kept (migrate VMs away before stopping an agent)"
                ),
                _ => tracing::info!(vm = %name, phase = phase.name(), mem = %format_size(mem), "freed"),
            }
            let _ = tokio::task::spawn_blocking(move || drop(runner)).await;
            stopped.push(name);
        }
        stopped
    }
}
