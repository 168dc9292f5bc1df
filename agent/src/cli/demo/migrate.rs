//! The demo's migration, in phases: start the VM at the source, migrate it
//! (with the timer armed for a failure at a time), undo what was injected,
//! observe the failover (a destination whose VM the source recovered must
//! keep its copy stopped), and wait for the guest to finish where it runs.

use super::agent_calls::{client_error, destination_fenced, VM};
use super::agents::{port_of, Endpoints};
use super::clients::Clients;
use super::fail_at::FailAt;
use super::faults::{FaultTimer, TimedFault};
use super::plan::DemoPlan;
use crate::cli::netns::Testbed;
use crate::cli::remote::{runtime, with_progress};
use crate::cli::{run_failure, DemoArgs, FailKind, Failure};
use anyhow::{anyhow, Context};
use pcft_agent::agent::client::{AgentClient, ClientError};
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::MigrationReport;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Answers the clients of a serving VM have before it migrates (it serves them).
const SERVING_ANSWERS: u64 = 20;
/// How long the clients of a serving VM go on after the migration (or failover), where it runs then.
const SERVE_AFTER: Duration = Duration::from_millis(1500);

/// What the demo's migration needs.
pub struct MigrationRun<'a> {
    pub args: &'a DemoArgs,
    pub plan: &'a DemoPlan,
    pub endpoints: &'a Endpoints,
    /// The hosts' network namespaces (partition, lossy).
    pub testbed: Option<&'a Arc<Testbed>>,
    /// Applies failures at a time, and keeps what it applied.
    pub faults: &'a FaultTimer,
    /// A serving VM's clients (the kv fixture).
    pub clients: Option<&'a Clients>,
}

/// How the migration went.
pub struct Outcome {
    /// The source's report of the migration.
    pub report: MigrationReport,
    /// The answer to waiting for the guest to finish (and verifying it) where
    /// it runs; None for a serving VM, which its clients' history verifies.
    pub verified: Option<Result<ControlMessage, ClientError>>,
    /// Whether the destination keeps its copy stopped after a failover (None: not checked).
    pub fenced: Option<bool>,
    /// When the migration was asked for and when its report came.
    pub window: (Instant, Instant),
}

impl MigrationRun<'_> {
    /// Runs the migration's phases, start to end.
    pub fn run(&self) -> Result<Outcome, Failure> {
        runtime().block_on(async {
            let mut source = self.start_vm().await?;
            if let Some(clients) = self.clients {
                // The VM serves its clients before it moves.
                clients.wait_serving(SERVING_ANSWERS, Duration::from_secs(60)).await?;
            }
            tokio::time::sleep(self.plan.migrate_after).await;
            if let FailAt::After(after) = self.plan.fault.fail_at {
                self.faults.arm(self.timed_fault(after));
            }
            let asked = Instant::now();
            let report = match self.migrate(&mut source).await {
                Ok(report) => report,
                Err(e) => {
                    // No report (e.g. the hand-over went unconfirmed: the source
                    // kept its copy stopped): a frozen destination may own the VM.
                    self.continue_frozen_destination();
                    return Err(e);
                }
            };
            let window = (asked, Instant::now());
            self.undo_faults(&report)?;
            let fenced = self.observe_failover(&report).await?;
            // After a failover the VM runs on at the source; otherwise at the destination.
            let runs_at = if report.failover.is_some() { &self.endpoints.source } else { &self.endpoints.destination };
            let verified = match self.clients {
                // A serving VM runs on: its clients keep going a while where it runs now.
                Some(_) => {
                    tokio::time::sleep(SERVE_AFTER).await;
                    None
                }
                None => {
                    let mut client = AgentClient::connect(runs_at).await.map_err(client_error)?;
                    let wait = ControlMessage::WaitFinished { name: VM.into(), timeout_ms: 600_000 };
                    Some(client.request(&wait).await)
                }
            };
            Ok(Outcome { report, verified, fenced, window })
        })
    }

    /// Starts the demo VM at the source; the connection stays for the migration request.
    async fn start_vm(&self) -> Result<AgentClient, Failure> {
        let mut source = AgentClient::connect(&self.endpoints.source).await.map_err(client_error)?;
        let start = ControlMessage::StartVm {
            name: VM.into(),
            config: self.plan.config.clone(),
            tracking: self.plan.tracker.into(),
        };
        source.request(&start).await.map_err(client_error)?;
        Ok(source)
    }

    /// The failure the timer applies `after` the switchover.
    fn timed_fault(&self, after: std::time::Duration) -> TimedFault {
        let args = self.args;
        TimedFault {
            kind: self.plan.fault.kind,
            after,
            source: self.endpoints.source.clone(),
            testbed: self.testbed.cloned(),
            loss: args.loss,
            delay_ms: args.delay_ms,
            link_mbit: args.link_mbit,
            cpu_pct: args.source_cpu_pct,
            reset_side: args.reset_side,
            destination_port: port_of(&self.endpoints.migrate_to),
            source_pid: self.endpoints.source_pid,
            destination_pid: self.endpoints.destination_pid,
        }
    }

    /// Asks the source to migrate the VM, under a progress bar unless `--json`.
    async fn migrate(&self, source: &mut AgentClient) -> Result<MigrationReport, Failure> {
        let request = ControlMessage::Migrate {
            name: VM.into(),
            to: self.endpoints.migrate_to.clone(),
            mode: self.plan.mode,
            options: self.plan.options,
            detach: false,
        };
        let migration = with_progress(&self.endpoints.source, VM, !self.args.json, source.request(&request));
        match migration.await.map_err(client_error)? {
            ControlMessage::Migrated(report) => Ok(report),
            other => Err(run_failure(anyhow!("the source answered {other:?}"))),
        }
    }

    /// The migration is over: undoes what the timer applied (and has it apply nothing more).
    fn undo_faults(&self, report: &MigrationReport) -> Result<(), Failure> {
        let reset_rule = self.faults.stop();
        let throttle = self.faults.take_throttle();
        // The agents may talk again (and the demo reach the destination): the destination must stay fenced.
        drop(reset_rule);
        if let Some(throttle) = throttle {
            throttle.release().context("cannot release the source agent's CPU throttle").map_err(run_failure)?;
        }
        if let (Some(bed), true) = (self.testbed, self.plan.fault.lossy) {
            // Restore the link before the fencing check, as a partition heals.
            bed.restore().context("cannot restore the link between the hosts").map_err(run_failure)?;
        }
        if report.failover.is_none() {
            self.continue_frozen_destination();
        }
        if let (Some(bed), true) = (self.testbed, self.plan.fault.partition && report.failover.is_some()) {
            // Heal the network: the destination may hear from the source again, and must stay fenced.
            bed.heal().map_err(run_failure)?;
        }
        Ok(())
    }

    /// A frozen destination whose VM the source did not take back (the
    /// migration completed, or the hand-over went unconfirmed) may own the VM:
    /// it is continued, and runs on.
    fn continue_frozen_destination(&self) {
        if self.plan.fault.kind == FailKind::Freeze {
            // SAFETY: kill(2) of the destination agent we started (a child process).
            unsafe { libc::kill(self.endpoints.destination_pid as libc::pid_t, libc::SIGCONT) };
        }
    }

    /// Whatever failed (but a crash: nothing is left to fence), a destination
    /// whose VM the source recovered must keep its copy stopped: whether it
    /// does (None: no failover, or nothing to check).
    async fn observe_failover(&self, report: &MigrationReport) -> Result<Option<bool>, Failure> {
        let fault = &self.plan.fault;
        if !self.plan.mode.checkpoints() || fault.kind == FailKind::Crash || report.failover.is_none() {
            return Ok(None);
        }
        // The check waits a lease, and with stall-fence the stalls too: the destination
        // marks its copy fenced when it stops it, which its stalled vCPU threads hold up
        // (they do not run the guest meanwhile: the run logs show that).
        let settle_ms =
            self.plan.options.heartbeat_timeout_ms + if fault.stall_fence { fault.stall_fence_ms } else { 0 };
        let endpoints = self.endpoints;
        Ok(Some(destination_fenced(&endpoints.destination, endpoints.destination_pid, settle_ms).await?))
    }
}
