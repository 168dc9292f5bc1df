//! The source side of a migration: pre-copy rounds, the switchover, and the
//! post-copy push that answers the destination's page requests first.

mod replies;

use super::error::VmError;
pub use super::error::{FailureKind, MigrationError};
use crate::agent::metrics::{self, PageReason};
use crate::migration::ft::lease::{self, DestinationCopy};
use crate::migration::ft::stager::{self, Stager};
use crate::migration::ft::staging::StagingLimits;
use crate::migration::ft::store::{CheckpointStore, Committed};
use crate::migration::source::replies::{read_replies, Lanes, Liveness, Queued, Reply};
use crate::page_set::PageSet;
use crate::vmm::machine::{MachineConfig, MachineState};
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::vmm::runner::VmRunner;
use crate::wire::auth::Psk;
use crate::wire::frame::{encode_message, Frame, FrameReader, FrameWriter, PageBatchWriter, CHECKPOINT_WINDOW};
use crate::wire::greeting::Role;
use crate::wire::handshake::{self, HandshakeError};
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{DestinationStats, FailureReport, MigrationOptions, MigrationReport, Mode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// Pages per batch frame of the background push: small enough that a demand
/// request waits for at most one batch on the wire.
const PUSH_BATCH_PAGES: usize = 64;
/// Pages per batch frame of the pre-copy rounds.
const COPY_BATCH_PAGES: usize = 256;
/// Writes frames and counts what it sent.
struct Outbox {
    wr: FrameWriter,
    bytes: u64,
    pages: u64,
    zero_pages: u64,
    /// PostCopyFT: a write blocked while the destination is silent for too long means it is lost.
    liveness: Option<Arc<Liveness>>,
}

impl Outbox {
    async fn message(&mut self, message: &MigrationMessage) -> Result<(), MigrationError> {
        let frame = encode_message(message);
        self.bytes += frame.len() as u64;
        self.write(&frame).await
    }

    async fn write(&mut self, frame: &[u8]) -> Result<(), MigrationError> {
        let Some(liveness) = self.liveness.clone() else {
            return Ok(self.wr.write(frame).await?);
        };
        // A partition blocks writes rather than failing them: give up once the
        // destination has been silent too long, however long the write took.
        // (The reader never waits on this loop: checkpoint frames go to the
        // stager, heartbeats and page requests to lanes of their own.)
        let write = self.wr.write(frame);
        tokio::pin!(write);
        loop {
            let wake = liveness.deadline().unwrap_or_else(|| Instant::now() + liveness.timeout);
            tokio::select! {
                written = &mut write => return Ok(written?),
                _ = tokio::time::sleep_until(wake.into()) => {
                    if liveness.deadline().is_some_and(|deadline| Instant::now() >= deadline) {
                        return Err(MigrationError::Timeout { what: "heartbeats while a frame was blocked".into(), after: liveness.timeout });
                    }
                }
            }
        }
    }

    /// Sends the pages at `gpas` from `memory`, in batches of `per_batch`.
    async fn pages(&mut self, memory: &GuestMemory, gpas: &[u64], per_batch: usize) -> Result<(), MigrationError> {
        let mut batch = PageBatchWriter::new();
        for chunk in gpas.chunks(per_batch) {
            for &gpa in chunk {
                batch.push_with(gpa, |buf| memory.read(gpa, buf)).map_err(MigrationError::vm)?;
            }
            self.pages += batch.len() as u64;
            self.zero_pages += u64::from(batch.zero_pages());
            let frame = batch.finish();
            self.bytes += frame.len() as u64;
            self.write(&frame).await?;
        }
        Ok(())
    }
}

/// Reads the destination's next answer (before the switchover commits), waiting at most `timeout`.
async fn expect(rd: &mut FrameReader, what: &str, timeout: Duration) -> Result<MigrationMessage, MigrationError> {
    let frame = tokio::time::timeout(timeout, rd.read())
        .await
        .map_err(|_| MigrationError::Timeout { what: what.to_string(), after: timeout })??;
    match frame {
        Frame::Message(MigrationMessage::Refuse { reason }) => Err(MigrationError::Refused(reason)),
        Frame::Message(MigrationMessage::Abort { reason, .. }) => Err(MigrationError::Aborted(reason)),
        Frame::Message(m) => Ok(m),
        Frame::Pages(_) => Err(MigrationError::Unexpected(format!("pages (waiting for {what})"))),
    }
}

/// How a migration ended at the source.
pub enum MigrationOutcome {
    /// The VM runs at the destination and the source let go of it.
    Completed(MigrationReport),
    /// PostCopyFT: the destination was lost after the commit. The VM must be
    /// restored from `committed` over the source's memory, not before `fenced_at`.
    DestinationLost {
        report: MigrationReport,
        committed: Box<Committed>,
        detected_at: Instant,
        /// When the destination's lease has surely expired.
        fenced_at: Instant,
    },
}

/// Migrates the VM that `runner` runs to the agent at `to`. On any failure
/// before the switchover commits, the VM is left running here. `agent` is this
/// agent's name, and `psk` its key, which the destination must hold too.
#[allow(clippy::too_many_arguments)]
pub async fn migrate_out(
    runner: &VmRunner,
    vm: &str,
    config: &MachineConfig,
    to: &str,
    mode: Mode,
    options: MigrationOptions,
    agent: &str,
    psk: Option<&Psk>,
    staging: &StagingLimits,
) -> Result<MigrationOutcome, MigrationError> {
    let started = Instant::now();
    let reply_timeout = Duration::from_millis(options.reply_timeout_ms);
    let stream =
        TcpStream::connect(to).await.map_err(|reason| MigrationError::Connect { to: to.to_string(), reason })?;
    stream.set_nodelay(true).map_err(|reason| MigrationError::Connect { to: to.to_string(), reason })?;
    let greeting = handshake::connect(stream, Role::Migration, agent, psk);
    let greeted = tokio::time::timeout(reply_timeout, greeting)
        .await
        .map_err(|_| MigrationError::Timeout { what: "welcome".into(), after: reply_timeout })?
        .map_err(|e| match e {
            HandshakeError::WrongKey => {
                metrics::get().auth_refused("wrong-key");
                MigrationError::Refused(format!("agent {to}: {}", HandshakeError::WrongKey))
            }
            HandshakeError::Protocol(e) => MigrationError::Protocol(e),
            HandshakeError::Unexpected(what) => MigrationError::Unexpected(what),
            e => MigrationError::Refused(e.to_string()),
        })?;
    let mut rd = greeted.rd;
    let mut out = Outbox { wr: greeted.wr, bytes: 0, pages: 0, zero_pages: 0, liveness: None };
    out.message(&MigrationMessage::Begin { name: vm.to_string(), config: config.clone(), mode, options }).await?;
    match expect(&mut rd, "ready", reply_timeout).await? {
        MigrationMessage::Ready => {}
        other => return Err(MigrationError::Unexpected(format!("{other:?}"))),
    }

    let mut report = MigrationReport {
        vm: vm.to_string(),
        mode: mode.name().to_string(),
        mem_bytes: config.mem_bytes,
        ..Default::default()
    };
    let memory = runner.memory();
    metrics::get().set_phase(vm, if mode.precopies() { "precopy" } else { "switchover" });
    let stopped = match precopy_and_stop(runner, &memory, &mut out, &mut rd, mode, options, &mut report).await {
        Ok(v) => v,
        Err(e) => {
            // Not committed: the VM keeps running here.
            let _ = runner.set_dirty_logging(false).await;
            let _ = runner.resume().await;
            let _ = out.message(&MigrationMessage::Abort { reason: e.to_string(), paused: false }).await;
            return Err(e);
        }
    };

    // PostCopyFT's side here, made before `Go`: if it cannot be, nothing is
    // committed and the VM keeps running here.
    let stager = match mode.checkpoints().then(|| start_stager(&stopped.state, &memory, staging, vm)).transpose() {
        Ok(stager) => stager,
        Err(e) => {
            let _ = runner.resume().await;
            let _ = out.message(&MigrationMessage::Abort { reason: e.to_string(), paused: false }).await;
            return Err(e);
        }
    };
    // Committed from here: the destination runs the VM once it reads `Go`.
    let go_at = Instant::now();
    metrics::get().set_phase(vm, "postcopy");
    let mut ft = stager.map(|(stager, inbox, events)| {
        let hb_timeout = Duration::from_millis(options.heartbeat_timeout_ms);
        out.liveness = Some(Arc::new(Liveness::new(go_at, hb_timeout)));
        (
            FtSource {
                stager,
                timeout: hb_timeout,
                last_renewal: go_at,
                checkpoint_timeout: Duration::from_millis(options.checkpoint_timeout_ms),
                checkpoint_progress: go_at,
            },
            inbox,
            events,
        )
    });
    let (mut ft, stager_inbox, checkpoint_events) = match ft.take() {
        Some((ft, inbox, events)) => (Some(ft), Some(inbox), events),
        // No checkpoints: a channel that stays empty.
        None => (None, None, mpsc::unbounded_channel().1),
    };
    if let Err(e) = out.message(&MigrationMessage::Go).await {
        if ft.is_none() {
            return Err(MigrationError::LostAfterCommit(e.to_string()));
        }
    }
    let (tx, replies) = mpsc::unbounded_channel();
    let (heartbeat_tx, heartbeats) = watch::channel(0);
    let (requests_tx, requests) = mpsc::unbounded_channel();
    tokio::spawn(read_replies(
        rd,
        Lanes { queue: tx, heartbeats: heartbeat_tx, requests: requests_tx, checkpoints: stager_inbox },
        out.liveness.clone(),
    ));
    let unsent = match mode {
        Mode::Precopy => PageSet::empty(config.mem_bytes),
        Mode::Postcopy | Mode::PostcopyFt => PageSet::full(config.mem_bytes),
        Mode::Hybrid => {
            let mut set = PageSet::empty(config.mem_bytes);
            for &gpa in stopped.final_dirty.iter().chain(&stopped.discarded) {
                set.insert(gpa);
            }
            set
        }
    };
    report.final_dirty_pages = if mode == Mode::Hybrid { unsent.len() } else { stopped.final_dirty.len() as u64 };
    let paused_at = stopped.paused_at;
    let mut post = PostcopySource {
        out,
        replies,
        heartbeats,
        requests,
        checkpoint_events,
        push: Push { unsent, demand: Vec::new(), cursor: 0 },
        resumed_at: None,
        ft: ft.take(),
        memory,
        report,
        finishing: false,
        finished: false,
        aborted: false,
        credit_owed: 0,
        committed_epoch: 0,
    };
    let mut result = post.run(options).await;
    let ended_at = Instant::now();
    if let Err(lost) = &mut result {
        post.explain(lost).await;
    }
    let PostcopySource { out, resumed_at, ft, mut report, .. } = post;
    // Whatever arrived before the end is handled (a whole last epoch too): then the store is final.
    let ft = match ft {
        Some(ft) => {
            let FtSource { stager, timeout, last_renewal, checkpoint_progress, .. } = ft;
            Some(FtEnd { store: stager.stop().await, timeout, last_renewal, checkpoint_progress })
        }
        None => None,
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report.total_migration_ms = ms(started.elapsed());
    report.downtime_ms = resumed_at.map(|at| ms(at.duration_since(paused_at))).unwrap_or(f64::NAN);
    report.bytes_sent = out.bytes;
    report.pages_sent = out.pages;
    report.zero_pages = out.zero_pages;
    if let Some(ft) = &ft {
        report.checkpoints_committed = ft.store.committed_epoch();
        report.checkpoint_pages = ft.store.pages_committed;
        report.checkpoint_bytes = ft.store.bytes_received;
    }
    match result {
        Ok(stats) => {
            report.fault_latency_us = stats.fault_latency_us;
            Ok(MigrationOutcome::Completed(report))
        }
        Err(lost) => {
            let copy = lost.destination_copy();
            let Lost { kind, reason, .. } = lost;
            let Some(ft) = ft else {
                return Err(MigrationError::LostAfterCommit(reason));
            };
            let detected_at = ended_at;
            let Some(fenced_at) = lease::source_may_restore_at(copy, detected_at, ft.last_renewal, ft.timeout) else {
                return Err(MigrationError::LostAfterCommit(format!(
                    "{reason}; it runs the VM if Finish reached it, or it stopped its copy: check `pcft status` on {to}"
                )));
            };
            let last_heard = match kind {
                FailureKind::CheckpointStalled => ft.checkpoint_progress,
                _ => out.liveness.as_ref().and_then(|l| l.silent_since()).unwrap_or_else(Instant::now),
            };
            // The lease was last renewed before the loop ended; the connection goes (with `out`).
            drop(out);
            report.total_migration_ms = f64::NAN;
            report.failure = Some(Box::new(FailureReport {
                kind: kind.name().to_string(),
                detected_at_ms: ms(detected_at.duration_since(started)),
                detection_ms: ms(detected_at.duration_since(last_heard)),
                reason: reason.clone(),
            }));
            tracing::warn!(vm = %report.vm, kind = kind.name(), epoch = ft.store.committed_epoch(), "destination lost: {reason}");
            let committed = ft.store.into_committed().map_err(|torn| {
                MigrationError::LostAfterCommit(format!("{reason}; and the source's image is not consistent: {torn}"))
            })?;
            Ok(MigrationOutcome::DestinationLost { report, committed: Box::new(committed), detected_at, fenced_at })
        }
    }
}

/// The checkpoint stager over a store whose epoch 0 is the switchover state.
fn start_stager(
    switchover: &[u8],
    memory: &Arc<GuestMemory>,
    staging: &StagingLimits,
    vm: &str,
) -> Result<(Stager, stager::Inbox, mpsc::UnboundedReceiver<stager::Event>), MigrationError> {
    let switchover = MachineState::from_bytes(switchover).map_err(MigrationError::vm)?;
    let store = CheckpointStore::new(Arc::clone(memory), switchover, staging.clone());
    Stager::start(store, vm.to_string())
        .map_err(|source| MigrationError::vm(VmError::Thread { what: "checkpoint stager", source }))
}

/// The destination was lost after the commit.
struct Lost {
    kind: FailureKind,
    reason: String,
    /// The destination said, in an `Abort`, that every vCPU of its copy is stopped.
    destination_paused: bool,
}

impl Lost {
    fn new(kind: FailureKind, reason: String) -> Lost {
        Lost { kind, reason, destination_paused: false }
    }

    /// What this loss tells of the destination's copy (see `lease::source_may_restore_at`).
    fn destination_copy(&self) -> DestinationCopy {
        match self.kind {
            FailureKind::FinishUnconfirmed => DestinationCopy::MayOwnTheVm,
            _ if self.destination_paused => DestinationCopy::Stopped,
            _ => DestinationCopy::MayRun,
        }
    }

    fn from_write(e: MigrationError) -> Lost {
        let kind = match &e {
            MigrationError::Timeout { .. } => FailureKind::HeartbeatTimeout,
            _ => FailureKind::ConnectionClosed,
        };
        Lost::new(kind, e.to_string())
    }
}

/// PostCopyFT at the source after the migration loop: the final store.
struct FtEnd {
    store: CheckpointStore,
    timeout: Duration,
    last_renewal: Instant,
    checkpoint_progress: Instant,
}

/// PostCopyFT at the source: the checkpoint stager and the liveness of the destination.
struct FtSource {
    stager: Stager,
    timeout: Duration,
    /// When the source last renewed the destination's lease (`Go` or a heartbeat ack).
    last_renewal: Instant,
    /// No checkpoint frame for this long, with every commit acked: the destination stalled.
    checkpoint_timeout: Duration,
    /// When the stager last handled a checkpoint frame or the source last acked a commit.
    checkpoint_progress: Instant,
}

impl FtSource {
    fn stall_deadline(&self) -> Instant {
        self.checkpoint_progress + self.checkpoint_timeout
    }
}

/// The source after the commit: the post-copy push, answers to page requests
/// first, and (PostCopyFT) checkpoints and heartbeats.
struct PostcopySource {
    out: Outbox,
    replies: mpsc::UnboundedReceiver<Queued>,
    /// The latest heartbeat's sequence number (acked before anything queued).
    heartbeats: watch::Receiver<u64>,
    /// Page requests, served before anything queued (bounded by the guest's
    /// pages: the destination asks for a page once).
    requests: mpsc::UnboundedReceiver<Vec<u64>>,
    /// PostCopyFT: what the checkpoint stager did.
    checkpoint_events: mpsc::UnboundedReceiver<stager::Event>,
    push: Push,
    resumed_at: Option<Instant>,
    ft: Option<FtSource>,
    memory: Arc<GuestMemory>,
    report: MigrationReport,
    /// PostCopyFT: `Finish` went out (checkpoints have stopped: no stall check).
    finishing: bool,
    /// PostCopyFT: the destination answered `Finished`.
    finished: bool,
    /// The destination sent `Abort`.
    aborted: bool,
    /// Checkpoint payload bytes handled and not yet returned as credit.
    credit_owed: u64,
    /// The last epoch the stager committed.
    committed_epoch: u64,
}

impl PostcopySource {
    async fn run(&mut self, options: MigrationOptions) -> Result<DestinationStats, Lost> {
        // Pacing of the background push (demand pages are never held back).
        let pace = (options.postcopy_pages_per_sec > 0)
            .then(|| Duration::from_secs_f64(PUSH_BATCH_PAGES as f64 / options.postcopy_pages_per_sec as f64));
        let mut next_push = Instant::now();
        // Requested pages leave `unsent` when asked for: flush them too before `AllSent`.
        while !self.push.unsent.is_empty() || !self.push.demand.is_empty() {
            // The reply reader may sit in this worker's queue: let it run, so that
            // page requests (and "resumed") are seen after at most one batch.
            tokio::task::yield_now().await;
            self.ack_heartbeat().await?;
            self.take_checkpoint_events().await?;
            self.take_requests();
            // Page requests first, then one queued reply (a checkpoint frame may
            // take a slow disk's write), then one push batch: none starves another.
            if self.push.demand.is_empty() {
                if let Ok(queued) = self.replies.try_recv() {
                    if let Some(stats) = self.handle(queued).await? {
                        return Err(Lost::new(FailureKind::Protocol, premature(stats)));
                    }
                    self.take_requests();
                }
            }
            self.check_alive()?;
            if !self.push.demand.is_empty() {
                let demand = std::mem::take(&mut self.push.demand);
                self.out.pages(&self.memory, &demand, PUSH_BATCH_PAGES).await.map_err(Lost::from_write)?;
                self.report.pages_faulted += demand.len() as u64;
                metrics::get().pages_sent(&self.report.vm, PageReason::faulted, demand.len() as u64);
                continue;
            }
            // Until the VM runs at the destination nothing needs pages; pushing now
            // would only compete with its resume for the CPU and stretch the downtime.
            let wait_until = if self.resumed_at.is_none() {
                Some(None)
            } else if pace.is_some() && Instant::now() < next_push {
                Some(Some(next_push))
            } else {
                None
            };
            if let Some(until) = wait_until {
                if let Some(stats) = self.wait(until).await? {
                    return Err(Lost::new(FailureKind::Protocol, premature(stats)));
                }
                continue;
            }
            let batch = self.push.next_batch();
            self.out.pages(&self.memory, &batch, PUSH_BATCH_PAGES).await.map_err(Lost::from_write)?;
            self.report.pages_pushed += batch.len() as u64;
            metrics::get().pages_sent(&self.report.vm, PageReason::pushed, batch.len() as u64);
            if let Some(pace) = pace {
                next_push = next_push.max(Instant::now() - pace) + pace;
            }
        }
        self.out.message(&MigrationMessage::AllSent { pages: self.out.pages }).await.map_err(Lost::from_write)?;
        loop {
            if let Some(stats) = self.wait(None).await? {
                if self.ft.is_some() {
                    // The destination has every page: let the VM go. Its output may all go out now.
                    self.finish(Duration::from_millis(options.reply_timeout_ms)).await?;
                }
                return Ok(stats);
            }
        }
    }

    /// PostCopyFT's hand-over: `Finish`, then wait for `Finished`, acking
    /// heartbeats meanwhile so that the destination's lease holds while `Finish`
    /// travels. Only the destination's own words settle it: `Finished` (the VM
    /// is its own) or `Abort` (its lease ran out first and it stopped its copy:
    /// fail over as before). Silence is no answer on a lossy link (TCP delivers
    /// late), so the source waits up to `patience`; and a connection that ends
    /// without either word cannot tell a crash from a lost `Finished`. In both
    /// cases the source must not restore its copy: the VM may run there.
    async fn finish(&mut self, patience: Duration) -> Result<(), Lost> {
        self.finishing = true;
        // A write that fails or times out did not deliver a whole `Finish`: fail over as usual.
        self.out.message(&MigrationMessage::Finish).await.map_err(Lost::from_write)?;
        let deadline = Instant::now() + patience;
        let unconfirmed = |why: String| Lost {
            destination_paused: false,
            kind: FailureKind::FinishUnconfirmed,
            reason: format!("the destination did not confirm Finish ({why})"),
        };
        while !self.finished {
            if Instant::now() >= deadline {
                return Err(unconfirmed(format!("no answer within {} ms", patience.as_millis())));
            }
            match self.wait(Some(deadline)).await {
                Ok(_) => {}
                Err(lost) if self.aborted => return Err(lost),
                Err(lost) => return Err(unconfirmed(lost.reason)),
            }
        }
        Ok(())
    }

    /// Waits for the next reply (at most until `until`) and handles it.
    async fn wait(&mut self, until: Option<Instant>) -> Result<Option<DestinationStats>, Lost> {
        let mut deadline = until;
        if let Some(l) = self.out.liveness.as_ref().filter(|_| !self.finishing) {
            // Not waiting on the destination now: look again within the timeout.
            let silent = l.deadline().unwrap_or_else(|| Instant::now() + l.timeout);
            deadline = Some(deadline.map_or(silent, |d| d.min(silent)));
        }
        if let Some(ft) = self.ft.as_ref().filter(|_| !self.finishing) {
            deadline = Some(deadline.map_or(ft.stall_deadline(), |d| d.min(ft.stall_deadline())));
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        // Once the reader is gone, only the queue (its last word) matters.
        let reader_alive = self.heartbeats.has_changed().is_ok();
        tokio::select! {
            biased;
            Ok(()) = self.heartbeats.changed(), if reader_alive => {
                // `changed` marked it seen: ack it here.
                let seq = *self.heartbeats.borrow_and_update();
                self.send_heartbeat_ack(seq).await?;
                Ok(None)
            }
            Some(gpas) = self.requests.recv() => {
                self.push.request(gpas);
                self.take_requests();
                Ok(None)
            }
            Some(event) = self.checkpoint_events.recv() => {
                self.on_checkpoint(event).await?;
                Ok(None)
            }
            queued = self.replies.recv() => match queued {
                Some(queued) => self.handle(queued).await,
                None => Err(Lost::new(FailureKind::ConnectionClosed, "the connection closed".into())),
            },
            _ = sleep => {
                self.check_alive()?;
                Ok(None)
            }
        }
    }

    /// A write found the connection closed: the destination may have said why
    /// (an `Abort` still in the queue, or about to be). Use its words.
    async fn explain(&mut self, lost: &mut Lost) {
        if lost.kind != FailureKind::ConnectionClosed || lost.reason.starts_with("destination aborted") {
            return;
        }
        let until = Instant::now() + Duration::from_millis(50);
        while let Ok(Some(queued)) = tokio::time::timeout_at(until.into(), self.replies.recv()).await {
            match queued.reply {
                Reply::Gone(kind, reason) => {
                    *lost = Lost::new(kind, format!("{reason} ({})", lost.reason));
                    return;
                }
                Reply::Aborted { reason, paused } => {
                    *lost = Lost {
                        kind: lost.kind,
                        reason: format!("destination aborted: {reason} ({})", lost.reason),
                        destination_paused: paused,
                    };
                    return;
                }
                _ => {}
            }
        }
    }

    /// Moves the page requests that came meanwhile to the demand queue.
    fn take_requests(&mut self) {
        while let Ok(gpas) = self.requests.try_recv() {
            self.push.request(gpas);
        }
    }

    /// Acks the latest heartbeat if it is new, renewing the destination's lease.
    async fn ack_heartbeat(&mut self) -> Result<(), Lost> {
        if self.ft.is_none() || !self.heartbeats.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let seq = *self.heartbeats.borrow_and_update();
        self.send_heartbeat_ack(seq).await
    }

    async fn send_heartbeat_ack(&mut self, seq: u64) -> Result<(), Lost> {
        if self.ft.is_none() {
            return Ok(());
        }
        self.out.message(&MigrationMessage::HeartbeatAck { seq }).await.map_err(Lost::from_write)?;
        if let Some(ft) = &mut self.ft {
            ft.last_renewal = Instant::now();
        }
        Ok(())
    }

    fn check_alive(&self) -> Result<(), Lost> {
        let now = Instant::now();
        // After `Finish`, silence settles nothing (see `finish`).
        if let Some(l) = self.out.liveness.as_ref().filter(|_| !self.finishing) {
            if let Some(since) = l.silent_since().filter(|_| l.deadline().is_some_and(|d| now >= d)) {
                return Err(Lost::new(
                    FailureKind::HeartbeatTimeout,
                    format!("no word from the destination for {} ms", since.elapsed().as_millis()),
                ));
            }
        }
        // A stall: the destination is heard (heartbeats) but sends no checkpoint, though
        // nothing of it waits here to be handled and every commit was acked.
        if let Some(ft) = self.ft.as_ref().filter(|_| !self.finishing) {
            let waiting_on_destination = self.out.liveness.as_ref().is_some_and(|l| l.silent_since().is_some());
            if now >= ft.stall_deadline() && ft.stager.idle() && waiting_on_destination {
                return Err(Lost::new(
                    FailureKind::CheckpointStalled,
                    format!(
                        "no checkpoint from the destination for {} ms while its heartbeats go on (checkpoint {} was the last committed)",
                        ft.checkpoint_progress.elapsed().as_millis(),
                        self.committed_epoch
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Acts on one reply; returns the destination's stats when it completed.
    /// Acts on one queued reply.
    async fn handle(&mut self, queued: Queued) -> Result<Option<DestinationStats>, Lost> {
        let Queued { at, reply, _room } = queued;
        self.handle_reply(at, reply).await
    }

    /// Acts on what the checkpoint stager did: ack commits, give credit back.
    async fn on_checkpoint(&mut self, event: stager::Event) -> Result<(), Lost> {
        if let Some(ft) = &mut self.ft {
            ft.checkpoint_progress = Instant::now();
        }
        match event {
            stager::Event::Credit(bytes) => {
                self.credit_owed += bytes;
                // In pieces of a window's eighth: few frames, and the destination never waits long.
                if self.credit_owed >= CHECKPOINT_WINDOW / 8 {
                    self.give_credit().await?;
                }
            }
            stager::Event::Committed { epoch, .. } => {
                self.committed_epoch = epoch;
                self.give_credit().await?;
                self.out.message(&MigrationMessage::CheckpointAck { epoch }).await.map_err(Lost::from_write)?;
            }
            stager::Event::Refused(reason) => return Err(Lost::new(FailureKind::Protocol, reason)),
        }
        Ok(())
    }

    async fn give_credit(&mut self) -> Result<(), Lost> {
        if self.credit_owed > 0 {
            let bytes = std::mem::take(&mut self.credit_owed);
            self.out.message(&MigrationMessage::CheckpointCredit { bytes }).await.map_err(Lost::from_write)?;
        }
        Ok(())
    }

    /// Acts on the stager's events that came meanwhile.
    async fn take_checkpoint_events(&mut self) -> Result<(), Lost> {
        while let Ok(event) = self.checkpoint_events.try_recv() {
            self.on_checkpoint(event).await?;
        }
        Ok(())
    }

    async fn handle_reply(&mut self, at: Instant, reply: Reply) -> Result<Option<DestinationStats>, Lost> {
        let protocol = |reason: String| Lost::new(FailureKind::Protocol, reason);
        match reply {
            Reply::Resumed => self.resumed_at = Some(at),
            Reply::Complete(stats) => return Ok(Some(stats)),
            Reply::Gone(kind, reason) => return Err(Lost::new(kind, reason)),
            Reply::Aborted { reason, paused } => {
                self.aborted = true;
                return Err(Lost {
                    kind: FailureKind::ConnectionClosed,
                    reason: format!("destination aborted: {reason}"),
                    destination_paused: paused,
                });
            }
            // With PostCopyFT these go to the stager; without, they are not allowed.
            Reply::CheckpointPages(_) => return Err(protocol("page frames from the destination".into())),
            Reply::CheckpointCommit { epoch, pages, .. } => {
                return Err(protocol(format!("a checkpoint (epoch {epoch}, {pages} pages) without PostCopyFT")))
            }
            Reply::Finished if self.finishing => self.finished = true,
            Reply::Finished => return Err(protocol("Finished before Finish".into())),
        }
        Ok(None)
    }
}

fn premature(_: DestinationStats) -> String {
    "the destination completed before all pages were sent".into()
}

/// Post-copy at the source: what is still unsent, what the destination asked
/// for, and where the background push goes next.
struct Push {
    unsent: PageSet,
    demand: Vec<u64>,
    cursor: u64,
}

impl Push {
    fn request(&mut self, gpas: Vec<u64>) {
        for gpa in gpas {
            if self.unsent.remove(gpa) {
                self.demand.push(gpa);
            }
            // Push on from the latest fault: the guest is likely to touch what follows.
            self.cursor = gpa.wrapping_add(PAGE_SIZE);
        }
    }

    /// The next pages of the background push, in address order from the cursor.
    fn next_batch(&mut self) -> Vec<u64> {
        let mut batch = Vec::with_capacity(PUSH_BATCH_PAGES);
        while batch.len() < PUSH_BATCH_PAGES {
            let Some(gpa) = self.unsent.next_from(self.cursor) else { break };
            self.unsent.remove(gpa);
            batch.push(gpa);
            self.cursor = gpa + PAGE_SIZE;
        }
        batch
    }
}

/// What the pre-copy phase left for the switchover and post-copy.
struct Stopped {
    paused_at: Instant,
    /// The VM's state at the switchover (postcard `MachineState`).
    state: Vec<u8>,
    /// Dirty at the stop (pre-copy: sent before the switchover; hybrid: dropped at the switchover).
    final_dirty: Vec<u64>,
    /// Hybrid: pages dropped at the destination while the VM still ran here.
    discarded: Vec<u64>,
}

/// Pre-copy (pre-copy, hybrid), then stop the VM, send what the mode needs and
/// the switchover, and wait until the destination has rebuilt the VM.
///
/// Pre-copy re-sends dirty pages round after round. Hybrid sends the full copy
/// once; after that, pages dirtied again are not re-sent but dropped at the
/// destination (`Discard`) while the VM still runs here, round after round
/// until a round is small, so that the switchover has little left to drop and
/// the dropped pages move in post-copy.
async fn precopy_and_stop(
    runner: &VmRunner,
    memory: &GuestMemory,
    out: &mut Outbox,
    rd: &mut FrameReader,
    mode: Mode,
    options: MigrationOptions,
    report: &mut MigrationReport,
) -> Result<Stopped, MigrationError> {
    let vm = MigrationError::vm;
    let reply_timeout = Duration::from_millis(options.reply_timeout_ms);
    let mut dirty = Vec::new();
    let mut discarded = Vec::new();
    if mode.precopies() {
        runner.set_dirty_logging(true).await.map_err(vm)?;
        let all: Vec<u64> = (0..memory.size()).step_by(PAGE_SIZE as usize).collect();
        out.pages(memory, &all, COPY_BATCH_PAGES).await?;
        metrics::get().pages_sent(&report.vm, PageReason::precopy, all.len() as u64);
        report.rounds = 1;
        loop {
            dirty = runner.take_dirty_pages().await.map_err(vm)?;
            if dirty.len() as u64 <= options.converge_pages || report.rounds >= options.max_rounds {
                break;
            }
            if mode == Mode::Hybrid {
                out.message(&MigrationMessage::Discard { gpas: dirty.clone() }).await?;
                match expect(rd, "discarded", reply_timeout).await? {
                    MigrationMessage::Discarded => discarded.append(&mut dirty),
                    other => return Err(MigrationError::Unexpected(format!("{other:?}"))),
                }
            } else {
                out.pages(memory, &dirty, COPY_BATCH_PAGES).await?;
                metrics::get().pages_sent(&report.vm, PageReason::precopy, dirty.len() as u64);
            }
            report.rounds += 1;
        }
    }
    let paused_at = Instant::now();
    runner.pause().await.map_err(vm)?;
    let paused_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    if mode.precopies() {
        dirty.extend(runner.take_dirty_pages().await.map_err(vm)?);
        dirty.sort_unstable();
        dirty.dedup();
        runner.set_dirty_logging(false).await.map_err(vm)?;
    }
    if mode == Mode::Precopy {
        out.pages(memory, &dirty, COPY_BATCH_PAGES).await?;
    }
    let captured_at = Instant::now();
    let state = runner.capture().await.map_err(vm)?.to_bytes();
    let capture_ms = captured_at.elapsed().as_secs_f64() * 1e3;
    let stale = if mode == Mode::Hybrid { dirty.clone() } else { Vec::new() };
    let (state_bytes, stale_pages) = (state.len(), stale.len());
    out.message(&MigrationMessage::Switchover { state: state.clone(), stale }).await?;
    let sent_at = Instant::now();
    let restored = expect(rd, "restored", reply_timeout).await?;
    tracing::info!(
        paused_ms,
        capture_ms,
        state_bytes,
        stale_pages,
        restore_ms = sent_at.elapsed().as_secs_f64() * 1e3,
        since_pause_ms = paused_at.elapsed().as_secs_f64() * 1e3,
        "switchover"
    );
    match restored {
        MigrationMessage::Restored => Ok(Stopped { paused_at, state, final_dirty: dirty, discarded }),
        other => Err(MigrationError::Unexpected(format!("{other:?}"))),
    }
}
