//! The source side of a migration, as a state machine of [`Phase`]s:
//! `Connecting` (connect.rs), `Precopy` (precopy.rs), `Switchover`
//! (switchover.rs), the commit (commit.rs), `Postcopy`, `Draining` and
//! `Finishing` (postcopy.rs, with the reply reader in replies.rs and the
//! writer in outbox.rs), and how it ends (outcome.rs). The push itself is
//! `migration::postcopy::push`; PostCopyFT's side is `migration::ft::source`.

mod answer;
mod commit;
mod connect;
mod demand;
mod lost;
mod outbox;
mod outcome;
mod phase;
mod postcopy;
mod precopy;
mod replies;
mod request;
mod switchover;

pub use super::error::{FailureKind, MigrationError};
pub use outcome::MigrationOutcome;
pub use phase::Phase;
pub use request::MigrateOut;

use crate::metrics;
use crate::migration::ft::source::start_stager;
use crate::migration::progress::Progress;
use crate::vmm::memory::GuestMemory;
use crate::wire::payload::MigrationReport;
use commit::Committing;
use connect::Link;
use outcome::Ending;
use phase::Phases;
use postcopy::PostcopySource;
use precopy::Rounds;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use switchover::Stopped;

/// Migrates the VM that `req.runner` runs to the agent at `req.to`. On any
/// failure before the switchover commits, the VM is left running here.
/// `req.progress` follows it as it goes, and takes cancel requests: one
/// before the commit ends it `Err(MigrationError::Cancelled)`, the VM running
/// here; one after it (PostCopyFT only) ends it
/// `Ok(MigrationOutcome::DestinationLost { .. })` with `report.cancelled`, to
/// fail over once the destination's lease is out, as for a lost destination.
pub async fn migrate_out(req: MigrateOut<'_>) -> Result<MigrationOutcome, MigrationError> {
    let started = Instant::now();
    let mut phases = Phases::new(Arc::clone(&req.progress));
    let result = run(&req, &mut phases, started).await;
    let end = match &result {
        Ok(MigrationOutcome::Completed(_)) => Phase::Completed,
        Ok(MigrationOutcome::DestinationLost { .. }) => Phase::DestinationLost,
        Err(_) if phases.current().committed() => Phase::LostAfterCommit,
        Err(_) => Phase::Failed,
    };
    if phases.current() != end {
        phases.enter(end);
    }
    result
}

/// The endpoint from `Connecting` to its end.
async fn run(req: &MigrateOut<'_>, phases: &mut Phases, started: Instant) -> Result<MigrationOutcome, MigrationError> {
    // A cancel here only closes the connection: the VM was never paused.
    let mut link = unless_cancelled(&req.progress, connect::connect(req)).await?;
    let mut report = MigrationReport {
        vm: req.vm.to_string(),
        mode: req.mode.name().to_string(),
        mem_bytes: req.config.mem_bytes,
        ..Default::default()
    };
    let memory = req.runner.memory();
    metrics::get().set_phase(req.vm, if req.mode.precopies() { "precopy" } else { "switchover" });
    let stopped = match unless_cancelled(&req.progress, stop(req, &mut link, &memory, &mut report, phases)).await {
        Ok(stopped) => stopped,
        // Not committed: the VM keeps running here.
        Err(e) => return Err(outcome::abandon(req, &mut link.out, e, true).await),
    };
    // PostCopyFT's side here, made before `Go`: if it cannot be, nothing is
    // committed and the VM keeps running here.
    let stager = req.mode.checkpoints().then(|| start_stager(&stopped.state, &memory, req.staging, req.vm));
    let stager = match stager.transpose() {
        Ok(stager) => stager,
        Err(e) => return Err(outcome::abandon(req, &mut link.out, e, false).await),
    };
    let committing = Committing { link, memory, report, phases, stager };
    let post = commit::go(req, committing, &stopped).await?;
    postcopy(req, post, started, stopped.paused_at).await
}

/// Runs `work` (a step before the commit) unless a cancel is accepted first:
/// then `work` is dropped at whatever it waits for (a reply, a write the
/// destination does not read, the VM's runner) and the cancel is the error.
async fn unless_cancelled<T>(
    progress: &Progress,
    work: impl Future<Output = Result<T, MigrationError>>,
) -> Result<T, MigrationError> {
    tokio::select! {
        biased;
        () = progress.cancelled() => Err(MigrationError::Cancelled),
        done = work => done,
    }
}

/// `Precopy` (if the mode copies ahead), then `Switchover`.
async fn stop(
    req: &MigrateOut<'_>,
    link: &mut Link,
    memory: &GuestMemory,
    report: &mut MigrationReport,
    phases: &mut Phases,
) -> Result<Stopped, MigrationError> {
    let mut rounds = Rounds::default();
    if req.mode.precopies() {
        phases.enter(Phase::Precopy);
        rounds = precopy::copy_rounds(req, link, memory, report).await?;
    }
    phases.enter(Phase::Switchover);
    switchover::stop_and_switch(req, link, memory, rounds).await
}

/// `Postcopy` to the end: the loop, then what it comes to.
async fn postcopy(
    req: &MigrateOut<'_>,
    mut post: PostcopySource<'_>,
    started: Instant,
    paused_at: Instant,
) -> Result<MigrationOutcome, MigrationError> {
    let mut result = post.run(req.options).await;
    let ended_at = Instant::now();
    // How it ends is settled: a cancel from here changes nothing.
    post.phases.progress().end();
    if let Err(lost) = &mut result {
        post.explain(lost).await;
    }
    let PostcopySource { out, resumed_at, ft, report, phases, .. } = post;
    // Whatever arrived before the end is handled (a whole last epoch too): then the store is final.
    let ft = match ft {
        Some(ft) => Some(ft.finish().await),
        None => None,
    };
    if let Some(ft) = &ft {
        phases.progress().set_checkpoints_committed(ft.store.committed_epoch());
    }
    outcome::conclude(Ending { started, paused_at, ended_at, out, resumed_at, ft, report, to: req.to }, result)
}
