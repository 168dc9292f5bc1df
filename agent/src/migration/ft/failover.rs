//! PostCopyFT failover at the source: once the destination's lease has surely
//! expired, the paused source copy stops, the last committed checkpoint is
//! restored over the source's memory (which holds every committed page), and
//! the restored VM runs (docs/architecture.md, "PostCopyFT").

use crate::migration::ft::store::Committed;
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::{Machine, MachineError};
use crate::vmm::output::OutputSink;
use crate::vmm::runner::{OutputGate, RunnerError, VmRunner};
use crate::wire::payload::FailoverReport;
use std::sync::Arc;
use std::time::Instant;

/// What a failover starts from: the source's paused copy and the last
/// checkpoint the destination committed to it.
pub struct Failover<'a> {
    /// The VM's name (its runner's threads are named after it).
    pub vm: &'a str,
    /// The source's copy, paused since the switchover.
    pub runner: Arc<VmRunner>,
    pub committed: Box<Committed>,
    /// When the destination's lease has surely expired: nothing runs before it.
    pub fenced_at: Instant,
    /// Where the restored VM's released output goes.
    pub sink: OutputSink,
    /// Output records the destination said (in its heartbeats) it had released.
    pub destination_released: u64,
}

/// Why the VM could not be restored at the source.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The blocking task that stops the old copy and builds the new one died.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot restore checkpoint {epoch}: {source}")]
    Restore { epoch: u64, source: MachineError },
    /// The restored VM's threads could not start.
    #[error("{0}")]
    Spawn(#[from] std::io::Error),
    #[error("{0}")]
    Runner(#[from] RunnerError),
}

/// Restores `failover.committed` over the source's memory and runs it. After
/// the lease wait, `detach` is called: the caller lets go of the old copy and
/// says which dirty tracker the VM had (the restored VM keeps it, and so its
/// live dirty rate). Returns the running VM and the report (`failover_ms` is
/// left for the caller, who knows when the loss was detected).
pub async fn restore_at_source(
    failover: Failover<'_>,
    detach: impl FnOnce() -> DirtyTracking,
) -> Result<(Arc<VmRunner>, FailoverReport), FailoverError> {
    let Failover { vm, runner, committed, fenced_at, sink, destination_released } = failover;
    let wait_from = Instant::now();
    tokio::time::sleep_until(fenced_at.into()).await;
    let fence_wait_ms = wait_from.elapsed().as_secs_f64() * 1e3;
    let memory = runner.memory();
    // Everything up to the switchover was released here; the restored state
    // holds it and whatever the checkpoints committed after it, of which the
    // destination released a part that its heartbeats reported.
    let own_released = runner.status().released;
    let tracking = detach();
    let Committed { epoch, state } = *committed;
    let committed_outputs = state.devices.output_log.len() as u64;
    let released = release_from(own_released, destination_released, committed_outputs) as usize;
    // The old copy's threads are joined, and the new VM built, off the async workers.
    let machine = tokio::task::spawn_blocking(move || {
        drop(runner);
        Machine::prepare_with(state.config.clone(), memory, tracking)?.restore(state)
    })
    .await?
    .map_err(|source| FailoverError::Restore { epoch, source })?;
    let gate = OutputGate { sink, released, hold: false };
    let runner = Arc::new(VmRunner::spawn(vm, machine, gate)?);
    if tracking != DirtyTracking::Bitmap {
        runner.set_dirty_logging(true).await?;
    }
    runner.resume().await?;
    // Output of the committed epochs that the destination may not have released goes out now:
    // duplicates only of what it released after its last heartbeat that got through.
    runner.release_outputs(None);
    let report = FailoverReport { restored_epoch: epoch, failover_ms: 0.0, fence_wait_ms, committed_outputs };
    Ok((runner, report))
}

/// Where a failover starts releasing the restored state's output: past what
/// the source released itself (up to the switchover) and what the destination
/// said it had released, within the `committed` records. (The destination
/// releases only output of epochs the source committed, so it never reports
/// more; were it to, records past the restored state are not these.)
pub fn release_from(own: u64, destination: u64, committed: u64) -> u64 {
    own.max(destination.min(committed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_releases_only_what_neither_side_is_known_to_have_released() {
        // Nothing heard from the destination: everything committed since the switchover.
        assert_eq!(release_from(10, 0, 50), 10);
        // The destination's heartbeats said 42 went out: only 42.. is released again.
        assert_eq!(release_from(10, 42, 50), 42);
        // All of it went out there: nothing is released twice.
        assert_eq!(release_from(10, 50, 50), 50);
        // Never past the restored state's records.
        assert_eq!(release_from(10, 70, 50), 50);
        // Never below what the source itself released.
        assert_eq!(release_from(30, 20, 50), 30);
    }
}
