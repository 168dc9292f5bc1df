//! What the demo asks its agents about its VM while the migration runs:
//! whether post-copy started, and whether the destination keeps its copy
//! stopped after a failover.

use crate::cli::{run_failure, Failure};
use anyhow::anyhow;
use pcft_agent::agent::client::{AgentClient, ClientError};
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::VmPhase;
use std::time::Duration;

/// The demo VM's name on both agents.
pub const VM: &str = "demo";

/// A request to an agent that failed: the run failed (exit 1).
pub fn client_error(e: ClientError) -> Failure {
    run_failure(anyhow!(e))
}

/// Waits until the source reports the demo VM's migration in post-copy (the
/// VM runs at the destination); false if the migration ended before that or
/// the source cannot be asked. (It may start before the source has the
/// request: a VM still `running` there is waited for too.)
pub async fn postcopy_started(source: &str) -> bool {
    let Ok(mut client) = AgentClient::connect(source).await else { return false };
    loop {
        let Ok(ControlMessage::StatusReport { vms, .. }) = client.request(&ControlMessage::Status).await else {
            return false;
        };
        let Some(vm) = vms.into_iter().find(|v| v.name == VM) else { return false };
        if vm.migration.is_some_and(|m| m.phase == "postcopy") {
            return true;
        }
        if !matches!(vm.phase, VmPhase::Running | VmPhase::MigratingOut) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Wakes the frozen destination (SIGCONT) and checks, `settle_ms` + 300 ms
/// later, that its copy stays stopped: the VM is marked failed (fenced) and
/// emits nothing more.
pub async fn destination_fenced(destination: &str, pid: u32, settle_ms: u64) -> Result<bool, Failure> {
    // SAFETY: kill(2) of the destination agent we started (a child process) has no memory effects.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    tokio::time::sleep(Duration::from_millis(settle_ms + 300)).await;
    let mut client = AgentClient::connect(destination).await.map_err(client_error)?;
    let records = |answer: ControlMessage| match answer {
        ControlMessage::StatusReport { vms, .. } => vms.into_iter().find(|v| v.name == VM),
        _ => None,
    };
    let Some(before) = records(client.request(&ControlMessage::Status).await.map_err(client_error)?) else {
        return Ok(true); // the VM is gone there
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = records(client.request(&ControlMessage::Status).await.map_err(client_error)?);
    let stopped = after.as_ref().is_none_or(|a| a.records == before.records);
    let marked = before.fenced;
    Ok(stopped && marked)
}
