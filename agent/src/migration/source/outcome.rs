//! How a migration ends at the source: given up before the commit (a failure
//! or a cancel: the VM runs here again), completed, or the destination lost
//! after the commit, or let go of by a PostCopyFT cancel (the report, and with
//! PostCopyFT the checkpoint to restore and when).

use crate::migration::error::{FailureKind, MigrationError};
use crate::migration::ft::source::FtEnd;
use crate::migration::ft::store::Committed;
use crate::migration::source::lost::{Cause, Lost};
use crate::migration::source::outbox::Outbox;
use crate::migration::source::request::MigrateOut;
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{DestinationStats, FailureReport, MigrationReport, Percentiles};
use std::time::{Duration, Instant};

/// How a migration ended at the source.
pub enum MigrationOutcome {
    /// The VM runs at the destination and the source let go of it.
    Completed(MigrationReport),
    /// PostCopyFT: the destination was lost after the commit, or the operator
    /// cancelled then (`report.cancelled`, failure kind `cancelled`: a
    /// deliberate failover). The VM must be restored from `committed` over the
    /// source's memory, not before `fenced_at`.
    DestinationLost {
        report: MigrationReport,
        committed: Box<Committed>,
        detected_at: Instant,
        /// When the destination's lease has surely expired.
        fenced_at: Instant,
        /// Output records the destination said it had released (its last heartbeat heard).
        destination_released: u64,
    },
}

/// How long the source tries to tell the destination why it gave up: the VM
/// already runs here again, and a destination that does not read (frozen,
/// cut off) fails on the closed connection instead.
const ABORT_PATIENCE: Duration = Duration::from_secs(1);

/// Gives up before the commit (after a failure, or a cancel that came first):
/// no cancel is taken from here, the VM runs here again (dirty logging off
/// first, if `dirty_logging` may be on), and the destination hears why if the
/// connection still carries whole frames.
pub async fn abandon(
    req: &MigrateOut<'_>,
    out: &mut Outbox,
    error: MigrationError,
    dirty_logging: bool,
) -> MigrationError {
    req.progress.end();
    if dirty_logging {
        let _ = req.runner.set_dirty_logging(false).await;
    }
    let _ = req.runner.resume().await;
    if !out.torn() {
        let abort = MigrationMessage::Abort { reason: error.to_string(), paused: false };
        let _ = tokio::time::timeout(ABORT_PATIENCE, out.message(&abort)).await;
    }
    if matches!(error, MigrationError::Cancelled) {
        tracing::info!(vm = %req.vm, "migration cancelled before the commit; the VM runs on here");
    }
    error
}

/// What the source has when the post-copy loop has ended.
pub struct Ending<'a> {
    pub started: Instant,
    pub paused_at: Instant,
    /// When the loop ended (the destination, if lost, was found lost).
    pub ended_at: Instant,
    pub out: Outbox,
    pub resumed_at: Option<Instant>,
    /// PostCopyFT's side, stopped: the final store.
    pub ft: Option<FtEnd>,
    pub report: MigrationReport,
    /// The destination agent's address.
    pub to: &'a str,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The migration's outcome from how the post-copy loop ended.
pub fn conclude(
    mut end: Ending<'_>,
    result: Result<DestinationStats, Lost>,
) -> Result<MigrationOutcome, MigrationError> {
    let report = &mut end.report;
    report.total_migration_ms = ms(end.started.elapsed());
    report.downtime_ms = end.resumed_at.map(|at| ms(at.duration_since(end.paused_at))).unwrap_or(f64::NAN);
    report.bytes_sent = end.out.bytes;
    report.pages_sent = end.out.pages;
    report.zero_pages = end.out.zero_pages;
    if let Some(ft) = &end.ft {
        report.checkpoints_committed = ft.store.committed_epoch();
        report.checkpoint_pages = ft.store.pages_committed;
        report.checkpoint_bytes = ft.store.bytes_received;
    }
    match result {
        Ok(stats) => {
            report.fault_latency_us = fault_latency(&stats);
            Ok(MigrationOutcome::Completed(end.report))
        }
        Err(lost) => destination_lost(end, lost),
    }
}

/// The destination's fault latencies, if it measured any: its percentiles of
/// no sample are zeros, which the report must not pass off as measured. (A
/// destination lost before `Complete` never sends them: the report keeps None.)
fn fault_latency(stats: &DestinationStats) -> Option<Percentiles> {
    (stats.pages_faulted > 0).then_some(stats.fault_latency_us)
}

/// The report's reason for losing the destination, in the operator's words:
/// what the source saw and what it usually means, where the cause's own text
/// names the protocol's internals.
fn in_operator_words(cause: &Cause) -> String {
    let silent = "a network partition between the hosts, or the destination host hung";
    match cause {
        Cause::Write(MigrationError::Timeout { after, .. }) => format!(
            "the destination went silent: no heartbeat from it for {} ms, and the network took no more data for it ({silent})",
            after.as_millis()
        ),
        Cause::Silent { silent_ms } => {
            format!("the destination went silent: no heartbeat or other message from it for {silent_ms} ms ({silent})")
        }
        Cause::Explained { said, seen } => format!("{} ({})", in_operator_words(said), in_operator_words(seen)),
        Cause::FinishUnconfirmed(why) => {
            format!("the destination did not confirm Finish ({})", in_operator_words(why))
        }
        other => other.to_string(),
    }
}

/// Why a destination lost after the commit without PostCopyFT leaves no VM.
pub(crate) const NOT_RECOVERABLE: &str = "without PostCopyFT checkpoints the VM cannot be recovered";

/// The destination was lost after the commit: with PostCopyFT, the checkpoint
/// to restore and when the lease allows it; without, nothing to restore.
fn destination_lost(end: Ending<'_>, lost: Lost) -> Result<MigrationOutcome, MigrationError> {
    let Ending { started, ended_at, out, ft, mut report, to, .. } = end;
    let copy = lost.destination_copy();
    let Lost { kind, cause } = lost;
    let reason = in_operator_words(&cause);
    let Some(ft) = ft else {
        return Err(MigrationError::LostAfterCommit(format!("{reason}; {NOT_RECOVERABLE}")));
    };
    let detected_at = ended_at;
    let Some(fenced_at) = ft.restore_at(copy, detected_at) else {
        return Err(MigrationError::LostAfterCommit(format!(
            "{reason}; the source keeps its copy stopped (it cannot tell a crash from a lost `Finished`, and \
             must not restore one that may run there): the destination runs the VM if Finish reached it, or it \
             stopped its copy: check `pcft status` on {to}"
        )));
    };
    let last_heard = match kind {
        FailureKind::CheckpointStalled => ft.checkpoint_progress,
        _ => out.liveness.as_ref().and_then(|l| l.silent_since()).unwrap_or_else(Instant::now),
    };
    // The lease was last renewed before the loop ended; the connection goes (with `out`).
    drop(out);
    report.total_migration_ms = f64::NAN;
    report.cancelled = kind == FailureKind::Cancelled;
    report.failure = Some(Box::new(FailureReport {
        kind: kind.name().to_string(),
        detected_at_ms: ms(detected_at.duration_since(started)),
        detection_ms: ms(detected_at.duration_since(last_heard)),
        reason: reason.clone(),
    }));
    let epoch = ft.store.committed_epoch();
    let destination_released = ft.destination_released;
    if report.cancelled {
        tracing::info!(vm = %report.vm, epoch, "cancelled after the commit: failing over on purpose ({reason})");
    } else {
        tracing::warn!(vm = %report.vm, kind = kind.name(), epoch, "destination lost: {reason}");
    }
    let committed = ft.store.into_committed().map_err(|torn| {
        MigrationError::LostAfterCommit(format!("{reason}; and the source's image is not consistent: {torn}"))
    })?;
    Ok(MigrationOutcome::DestinationLost {
        report,
        committed: Box::new(committed),
        detected_at,
        fenced_at,
        destination_released,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_latency_is_unknown_without_a_sample() {
        // Pre-copy, or post-copy where no page faulted: the destination's zeros are no measurement.
        let none = DestinationStats { pages_faulted: 0, ..DestinationStats::default() };
        assert_eq!(fault_latency(&none), None);
        let measured = Percentiles { p50: 80, p99: 1900 };
        let some = DestinationStats { pages_faulted: 12, fault_latency_us: measured, ..DestinationStats::default() };
        assert_eq!(fault_latency(&some), Some(measured));
    }

    #[test]
    fn a_partition_reads_in_the_operators_words() {
        let blocked = Cause::Write(MigrationError::Timeout {
            what: "heartbeats while a frame was blocked".into(),
            after: Duration::from_millis(200),
        });
        let silent = Cause::Silent { silent_ms: 201 };
        for cause in [blocked, silent] {
            let reason = in_operator_words(&cause);
            assert!(reason.starts_with("the destination went silent: no heartbeat"), "{reason}");
            assert!(reason.contains("network partition"), "{reason}");
            assert!(!reason.contains("frame") && !reason.contains("did not answer ("), "jargon: {reason}");
        }
        let explained = Cause::Explained {
            said: Box::new(Cause::Aborted { reason: "lease expired".into(), paused: true }),
            seen: Box::new(Cause::Silent { silent_ms: 201 }),
        };
        let reason = in_operator_words(&explained);
        assert!(reason.starts_with("destination aborted: lease expired (the destination went silent"), "{reason}");
        assert_eq!(in_operator_words(&Cause::Closed), "the connection closed");
    }
}
