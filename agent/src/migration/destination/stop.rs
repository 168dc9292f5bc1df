//! How a failed migration ends at the destination: a copy of the VM that may
//! have run here is stopped for good before anything is said about it.

use crate::migration::postcopy::install::IncomingPages;
use crate::vmm::fence::Fence;
use crate::vmm::runner::VmRunner;
use std::sync::Arc;
use std::time::Duration;

/// Stops this copy of the VM for good after the migration failed: trips the
/// fence (PostCopyFT: no vCPU enters the guest again), then pauses every vCPU.
/// True only if every vCPU acknowledged the pause: then the source may resume
/// its copy without waiting out the lease.
pub async fn stop_for_good(runner: &Arc<VmRunner>, fence: Option<&Fence>, incoming: &mut IncomingPages) -> bool {
    if let Some(fence) = fence {
        fence.trip();
    }
    let pausing = tokio::spawn({
        let r = Arc::clone(runner);
        async move { r.pause().await }
    });
    // vCPUs blocked on pages that will never come cannot stop (a kick does not
    // reach a vCPU blocked in userfaultfd under emulation): with the pause
    // pending (and its kicks), the pages they wait for are revoked and the
    // memory leaves userfaultfd, which wakes them; each faults out of KVM_RUN
    // without completing the instruction it was in. This copy is dead: it is
    // never resumed and its held output never released.
    tokio::time::sleep(Duration::from_millis(2)).await;
    incoming.revoke_missing();
    incoming.release_region(true);
    match pausing.await {
        Ok(Ok(())) => true,
        Ok(Err(pause)) => {
            tracing::error!("cannot pause the VM after the migration failed: {pause}; the lease stops it");
            false
        }
        Err(join) => {
            tracing::error!("cannot pause the VM after the migration failed: {join}; the lease stops it");
            false
        }
    }
}
