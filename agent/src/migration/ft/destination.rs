//! PostCopyFT at the destination, as the destination's endpoint sees it: one
//! handle that starts the checkpointer and the heartbeats when the VM runs
//! here, takes the source's acks (commits release output; heartbeat acks
//! renew the lease and extend the fence), and says when the VM must stop
//! here for good ([`FtStop`]).

use super::checkpointer::{CheckpointError, Checkpointer, UnackedEpochs};
use super::lease::Lease;
use crate::clock::BootTime;
use crate::metrics;
use crate::migration::return_path::ReturnPath;
use crate::vmm::fence::Fence;
use crate::vmm::memory::GuestMemory;
use crate::vmm::runner::VmRunner;
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::MigrationOptions;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// Why this copy of the VM must stop for good (the fenced path).
#[derive(Debug, thiserror::Error)]
pub enum FtStop {
    #[error("the lease expired: the source acked no heartbeat in time")]
    LeaseExpired,
    #[error("checkpoint {epoch} failed: {error}")]
    CheckpointFailed { epoch: u64, error: CheckpointError },
    #[error("the lease ran out before this ack arrived")]
    AckTooLate,
    #[error("Finish came {late_ms} ms after the lease ran out")]
    FinishTooLate { late_ms: u128 },
}

/// The destination's lease as its async side keeps it, and the fence that
/// enforces it on the vCPUs (the fence is what counts: once it has tripped,
/// a late ack that extends the lease changes nothing).
pub struct Leased {
    pub lease: Lease,
    pub fence: Arc<Fence>,
}

/// PostCopyFT at the destination: the lease, the checkpointer and heartbeat
/// tasks, and the output of each epoch waiting for the source's ack.
pub struct FtDestination {
    lease: Arc<Mutex<Lease>>,
    fence: Arc<Fence>,
    runner: Arc<VmRunner>,
    /// Epochs sent and not yet acked, with the output-log length at their pause.
    unacked: UnackedEpochs,
    acked: u64,
    /// The last acked epoch, for the checkpointer's window of epochs in flight.
    acked_tx: watch::Sender<u64>,
    checkpointer: tokio::task::JoinHandle<()>,
    heartbeats: tokio::task::JoinHandle<()>,
    pause_max_us: Arc<AtomicU64>,
}

impl FtDestination {
    /// Starts checkpointing the running VM and heartbeating; `stops` hears
    /// (once from each task) when the VM must stop here.
    pub fn start(
        runner: Arc<VmRunner>,
        memory: Arc<GuestMemory>,
        out: ReturnPath,
        options: &MigrationOptions,
        leased: Leased,
        stops: mpsc::UnboundedSender<FtStop>,
    ) -> Self {
        let Leased { lease, fence } = leased;
        let lease = Arc::new(Mutex::new(lease));
        let unacked: UnackedEpochs = Arc::default();
        let pause_max_us = Arc::new(AtomicU64::new(0));
        let (acked_tx, acked) = watch::channel(0);
        let checkpointer = Checkpointer {
            runner: Arc::clone(&runner),
            memory,
            out: out.clone(),
            interval: Duration::from_millis(options.checkpoint_interval_ms.max(1)),
            unacked: Arc::clone(&unacked),
            acked,
            pause_max_us: Arc::clone(&pause_max_us),
        };
        let failed = stops.clone();
        let checkpointer = tokio::spawn(
            async move {
                if let Err((epoch, error)) = checkpointer.run().await {
                    let _ = failed.send(FtStop::CheckpointFailed { epoch, error });
                }
            }
            .in_current_span(),
        );
        let beat = Duration::from_millis(options.heartbeat_interval_ms.max(1));
        let heartbeats = tokio::spawn(
            heartbeats(out, Arc::clone(&runner), Arc::clone(&lease), Arc::clone(&fence), beat, stops).in_current_span(),
        );
        FtDestination { lease, fence, runner, unacked, acked: 0, acked_tx, checkpointer, heartbeats, pause_max_us }
    }

    /// The source committed `epoch`: the output of every epoch up to it may go out.
    pub fn acked(&mut self, epoch: u64) {
        let mut unacked = self.unacked.lock().expect("unacked epochs lock");
        let mut release = None;
        while unacked.front().is_some_and(|(e, _)| *e <= epoch) {
            release = unacked.pop_front().map(|(_, outputs)| outputs);
        }
        if let Some(outputs) = release {
            self.runner.release_outputs(Some(outputs));
        }
        self.acked = self.acked.max(epoch);
        self.acked_tx.send_replace(self.acked);
    }

    /// The source acked heartbeat `seq`: the lease, and the fence with it, run
    /// on. Too late once the fence has tripped.
    pub fn heartbeat_acked(&self, seq: u64) -> Result<(), FtStop> {
        let mut lease = self.lease.lock().expect("lease lock");
        if let Some(sent) = lease.acked(seq) {
            metrics::get().heartbeat_rtt.observe(sent.elapsed().as_secs_f64());
        }
        self.fence.extend(lease.expires());
        if self.fence.tripped() {
            // Too late: the vCPUs stopped at the deadline, and no ack revives them.
            return Err(FtStop::AckTooLate);
        }
        Ok(())
    }

    /// Every page is here: the VM's state is no longer split, no more checkpoints.
    /// Returns the epochs acked and the longest pause (µs).
    pub fn stop_checkpoints(&self) -> (u64, u64) {
        self.checkpointer.abort();
        (self.acked, self.pause_max_us.load(Ordering::Relaxed))
    }

    /// `Finish` arrived: the VM is ours alone if the fence has not tripped
    /// (disarmed now, it never will). Then drop this handle: heartbeats and
    /// checkpoints end.
    pub fn finish(&self) -> Result<(), FtStop> {
        if !self.fence.disarm() {
            let expired = self.lease.lock().expect("lease lock").expires();
            return Err(FtStop::FinishTooLate { late_ms: expired.elapsed().as_millis() });
        }
        Ok(())
    }
}

impl Drop for FtDestination {
    fn drop(&mut self) {
        self.checkpointer.abort();
        self.heartbeats.abort();
    }
}

/// Heartbeats to the source, each saying how far the output has gone out
/// here, and the lease check: when the lease runs out (or the fence tripped
/// on its own, at the deadline) the VM must stop here for good and the source
/// be told; no heartbeat goes out after that.
async fn heartbeats(
    out: ReturnPath,
    runner: Arc<VmRunner>,
    lease: Arc<Mutex<Lease>>,
    fence: Arc<Fence>,
    every: Duration,
    stops: mpsc::UnboundedSender<FtStop>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = BootTime::now();
        let (seq, expired) = {
            let mut lease = lease.lock().expect("lease lock");
            (lease.sent(now), lease.expired(now) || !fence.allows_running())
        };
        if expired {
            let _ = stops.send(FtStop::LeaseExpired);
            return;
        }
        // Written out, not merely handed to the sink: the source re-releases none of these after a failover.
        let released = runner.written_out();
        if out.message(&MigrationMessage::Heartbeat { seq, released }).is_err() {
            return;
        }
    }
}
