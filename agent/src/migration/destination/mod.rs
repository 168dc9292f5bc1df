//! The destination endpoint of a migration, as a state machine over the
//! frames from the source (docs/architecture.md, "The destination's phases"):
//!
//! ```text
//! Receiving --Switchover--> Restored --Go--> Running --AllSent--> Finished       (pre-copy, post-copy, hybrid)
//!                                            Running --AllSent--> Completed --Finish--> Finished   (PostCopyFT)
//! any phase --error, Abort, lease out--> Failed (a copy that may have run here is stopped first)
//! ```
//!
//! Pages may arrive in every phase ([`IncomingPages`] installs them); the
//! demand path is in `migration/postcopy/`, PostCopyFT's checkpoints,
//! heartbeats and lease in `migration/ft/` ([`FtDestination`]).

mod demand;
mod prepare;
mod stop;

use super::error::{MigrationError, VmError};
use super::ft::destination::{FtDestination, FtStop, Leased};
use super::ft::lease::Lease;
use super::postcopy::faults::{BlockedVcpus, FaultHandler};
use super::postcopy::install::IncomingPages;
use super::return_path::ReturnPath;
use crate::clock::BootTime;
use crate::fault::crash::{self, CrashPoint};
use crate::metrics;
use crate::vmm::fence::Fence;
use crate::vmm::machine::{MachineConfig, MachineState, PreparedMachine};
use crate::vmm::output::OutputSink;
use crate::vmm::runner::{OutputGate, VmRunner};
use crate::wire::frame::{encode_message, Frame, FrameReader, FrameWriter, PageBatch};
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{DestinationStats, MigrationOptions, Mode};
use crate::wire::read_ahead::ReadAhead;
use demand::{DemandChannel, DemandEvent};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Page batches received ahead of the one being installed, at most.
const READ_AHEAD_FRAMES: usize = 2;
/// Pages of a pushed batch installed at a time before the demand channel is
/// looked at again. Measured on a 1 GiB full-memory post-copy, fault p50:
/// 0.25–0.31 ms behind whole 256-page frames, 0.12–0.20 ms with pieces of 64,
/// 0.11–0.13 ms with pieces of 16, at the same total time.
const INSTALL_PIECE_PAGES: usize = 16;

/// A migration into this agent, once `Begin` was read.
pub struct IncomingMigration {
    pub rd: FrameReader,
    pub wr: FrameWriter,
    /// The demand channel the source named in `Begin`, once it connects (None: it named none).
    pub demand: Option<oneshot::Receiver<FrameReader>>,
    /// The VM's name here.
    pub name: String,
    pub config: MachineConfig,
    pub mode: Mode,
    pub options: MigrationOptions,
    /// Where the VM's released output goes.
    pub sink: OutputSink,
}

/// Where the destination endpoint stands. Phases only move forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DestinationPhase {
    /// Pages arrive (pre-copy rounds; hybrid drops stale ones); the VM does not run here.
    Receiving,
    /// The switchover: the VM is rebuilt here, paused; it runs on `Go`.
    Restored,
    /// After `Go`: the VM runs here (from just before its resume). Post-copy
    /// pages arrive on demand and by push; PostCopyFT checkpoints and heartbeats.
    Running,
    /// PostCopyFT: every page is here and `Complete` went out; the source may
    /// still restore its copy until `Finish`.
    Completed,
    /// The VM is this agent's alone.
    Finished,
    /// The migration failed here; a copy that may have run is stopped for good.
    Failed,
}

impl DestinationPhase {
    /// The transitions (docs/architecture.md, "The destination's phases", draws this table).
    pub fn may_enter(self, next: DestinationPhase) -> bool {
        use DestinationPhase::*;
        matches!(
            (self, next),
            (Receiving, Restored | Failed)
                | (Restored, Running | Failed)
                | (Running, Completed | Finished | Failed)
                | (Completed, Finished | Failed)
        )
    }
}

/// Receives the VM from the source on the other end of `incoming.rd`/`wr`.
/// `on_running` gets the runner just before the VM first runs here. Returns
/// what the destination measured once every page is in place (and,
/// PostCopyFT, the source has let the VM go).
pub async fn migrate_in(
    incoming: IncomingMigration,
    on_running: impl FnOnce(Arc<VmRunner>) + Send + 'static,
) -> Result<DestinationStats, MigrationError> {
    let IncomingMigration { rd, wr, demand, name, config, mode, options, sink } = incoming;
    // Frames are received and their tags checked while the previous ones install.
    let mut rd = ReadAhead::spawn(rd, READ_AHEAD_FRAMES);
    let out = ReturnPath::start(wr)
        .map_err(|source| MigrationError::vm(VmError::Thread { what: "return path writer", source }))?;
    let (pages, prepared) = match prepare::prepare_incoming(&config, mode, &options).await {
        Ok(v) => v,
        Err(e) => {
            // Tell the source why: the VM keeps running there.
            let _ =
                out.message(&MigrationMessage::Refuse { reason: format!("the destination cannot take the VM: {e}") });
            return Err(e);
        }
    };
    out.message(&MigrationMessage::Ready)?;
    let (stops_tx, mut stops) = mpsc::unbounded_channel();
    let mut destination = Destination {
        name,
        mode,
        options,
        out,
        phase: DestinationPhase::Receiving,
        pages,
        prepared: Some(prepared),
        sink: Some(sink),
        runner: None,
        on_running: Some(Box::new(on_running)),
        faults: None,
        stats: DestinationStats::default(),
        fence: None,
        lease_from: None,
        ft: None,
        stops_tx,
        demand: DemandChannel::expected(demand),
        demand_pages: 0,
    };
    let result = destination.receive(&mut rd, &mut stops).await;
    destination.end(result, rd).await
}

/// The destination endpoint's state: what the phases built so far.
struct Destination {
    name: String,
    mode: Mode,
    options: MigrationOptions,
    out: ReturnPath,
    phase: DestinationPhase,
    pages: IncomingPages,
    /// Until the switchover: the machine built up to its state.
    prepared: Option<PreparedMachine>,
    sink: Option<OutputSink>,
    /// From the switchover on.
    runner: Option<Arc<VmRunner>>,
    on_running: Option<Box<dyn FnOnce(Arc<VmRunner>) + Send>>,
    /// Post-copy, from the switchover until every page is here.
    faults: Option<FaultHandler>,
    stats: DestinationStats,
    /// PostCopyFT, from the switchover on: the vCPUs' own lease check.
    fence: Option<Arc<Fence>>,
    /// When the lease starts (at the switchover, before `Restored` goes out).
    lease_from: Option<BootTime>,
    /// PostCopyFT, from `Go` until `Finish`.
    ft: Option<FtDestination>,
    /// Where the lease and checkpoint tasks say the VM must stop here.
    stops_tx: mpsc::UnboundedSender<FtStop>,
    /// The pages this destination asked for, on a connection of their own.
    demand: DemandChannel,
    /// Pages installed from the demand channel.
    demand_pages: u64,
}

/// The next thing to handle: a frame on the main connection, or news from the demand channel.
enum Incoming {
    Main(Frame<MigrationMessage>),
    Demand(DemandEvent),
}

impl Destination {
    /// Reads frames until the VM is this agent's (`Finished`) or something fails.
    /// Every way out with a VM that ran here goes through [`Destination::end`].
    async fn receive(
        &mut self,
        rd: &mut ReadAhead<MigrationMessage>,
        stops: &mut mpsc::UnboundedReceiver<FtStop>,
    ) -> Result<(), MigrationError> {
        while self.phase != DestinationPhase::Finished {
            // With data always waiting, reads never yield; the writer task (page
            // requests, "resumed") must not wait behind the page stream.
            tokio::task::yield_now().await;
            // Requested pages first: they never wait behind the pushed ones.
            let incoming = tokio::select! {
                biased;
                Some(stop) = stops.recv() => return Err(MigrationError::Fenced(stop.to_string())),
                event = self.demand.next() => Incoming::Demand(event),
                frame = rd.read() => Incoming::Main(frame?),
            };
            let next = match incoming {
                Incoming::Main(Frame::Pages(batch)) => {
                    let next = self.install_pushed(&batch)?;
                    rd.recycle(batch);
                    next
                }
                Incoming::Main(Frame::Message(message)) => self.on_message(message, rd).await?,
                Incoming::Demand(event) => self.on_demand(event)?,
            };
            self.enter(next);
        }
        Ok(())
    }

    /// Moves to `next` (staying is no move; a transition not in
    /// [`DestinationPhase::may_enter`] is a bug).
    fn enter(&mut self, next: DestinationPhase) {
        if next != self.phase {
            debug_assert!(self.phase.may_enter(next), "destination endpoint: {:?} → {next:?}", self.phase);
            tracing::debug!(from = ?self.phase, to = ?next, "destination phase");
            self.phase = next;
        }
    }

    /// The transitions: what each message does in each phase.
    async fn on_message(
        &mut self,
        message: MigrationMessage,
        rd: &mut ReadAhead<MigrationMessage>,
    ) -> Result<DestinationPhase, MigrationError> {
        use DestinationPhase::{Completed, Receiving, Restored, Running};
        let checkpointing = self.ft.is_some();
        match (self.phase, message) {
            (Receiving, MigrationMessage::Switchover { state, stale }) => self.switchover(&state, &stale),
            // Only under userfaultfd does a dropped page come back (as a fault).
            (Receiving, MigrationMessage::Discard { gpas }) if self.pages.region.is_some() => {
                self.pages.discard(&gpas)?;
                self.out.message(&MigrationMessage::Discarded)?;
                Ok(Receiving)
            }
            (Restored, MigrationMessage::Go) => self.go().await,
            (Running, MigrationMessage::AllSent { demand_pages, .. }) => self.all_sent(demand_pages).await,
            (Running | Completed, MigrationMessage::CheckpointCredit { bytes }) if checkpointing => {
                self.out.credit.give_back(bytes);
                Ok(self.phase)
            }
            (Running | Completed, MigrationMessage::CheckpointAck { epoch }) if checkpointing => {
                self.ft.as_mut().expect("checked").acked(epoch);
                Ok(self.phase)
            }
            (Running | Completed, MigrationMessage::HeartbeatAck { seq }) if checkpointing => {
                let ft = self.ft.as_ref().expect("checked");
                ft.heartbeat_acked(seq).map_err(|stop| MigrationError::Fenced(stop.to_string()))?;
                Ok(self.phase)
            }
            (Completed, MigrationMessage::Finish) => self.finish(rd).await,
            (_, MigrationMessage::Abort { reason, .. }) => Err(MigrationError::Aborted(reason)),
            (_, other) => Err(MigrationError::Unexpected(format!("{other:?}"))),
        }
    }

    /// News from the demand channel: pages installed at once; its end (or the
    /// source not connecting it) leaves the main connection to carry the rest.
    fn on_demand(&mut self, event: DemandEvent) -> Result<DestinationPhase, MigrationError> {
        match event {
            DemandEvent::Opened | DemandEvent::Gone | DemandEvent::Closed => Ok(self.phase),
            DemandEvent::Pages(batch) => {
                let next = self.install(&batch)?;
                self.demand_pages += batch.len() as u64;
                self.demand.recycle(batch);
                Ok(next)
            }
            DemandEvent::Message(message) => {
                Err(MigrationError::Unexpected(format!("{message} on the demand channel (it carries pages only)")))
            }
            DemandEvent::Failed(e) => Err(e.into()),
        }
    }

    /// At `AllSent`: the demand channel carried `sent` pages and is closed;
    /// reads it to its end (every page it carried installed) and checks the count.
    async fn drain_demand(&mut self, sent: u64) -> Result<(), MigrationError> {
        let patience = Duration::from_millis(self.options.reply_timeout_ms);
        while self.demand.is_some() {
            let event = tokio::time::timeout(patience, self.demand.next()).await.map_err(|_| {
                MigrationError::Timeout { what: "the end of the demand channel".into(), after: patience }
            })?;
            self.on_demand(event)?;
        }
        if self.demand_pages != sent {
            return Err(MigrationError::Unexpected(format!(
                "a demand channel that carried {} pages where the source says it sent {sent}",
                self.demand_pages
            )));
        }
        Ok(())
    }

    /// Pages, in any phase: installed, which wakes the vCPUs blocked on them.
    fn install(&mut self, batch: &PageBatch) -> Result<DestinationPhase, MigrationError> {
        self.check_fence()?;
        self.pages.install(batch)?;
        Ok(self.phase)
    }

    /// Never after the lease ran out (a destination frozen past it may find pages still queued).
    fn check_fence(&self) -> Result<(), MigrationError> {
        if self.fence.as_ref().is_some_and(|fence| !fence.allows_running()) {
            return Err(MigrationError::Fenced("the lease ran out; no page is installed after it".into()));
        }
        Ok(())
    }

    /// A batch from the main connection (pushed pages, or pre-copy's), in
    /// pieces of at most [`INSTALL_PIECE_PAGES`], with the demand channel's
    /// batches that are ready installed between pieces: a requested page
    /// waits for at most one piece, not a whole 1 MiB frame.
    fn install_pushed(&mut self, batch: &PageBatch) -> Result<DestinationPhase, MigrationError> {
        for run in batch.runs() {
            for piece in run.pieces(INSTALL_PIECE_PAGES) {
                self.check_fence()?;
                self.pages.install_runs(&[piece])?;
                while let Some(event) = self.demand.ready() {
                    self.on_demand(event)?;
                }
            }
        }
        Ok(self.phase)
    }

    /// Receiving → Restored: rebuild the VM from the source's state (paused),
    /// start the fault handler (post-copy), and say `Restored`.
    fn switchover(&mut self, state: &[u8], stale: &[u64]) -> Result<DestinationPhase, MigrationError> {
        self.pages.switched_over = true;
        // Changed after they were sent: drop them so that the guest faults them in fresh.
        self.pages.discard(stale)?;
        let state = MachineState::from_bytes(state).map_err(MigrationError::vm)?;
        // The source released the output the VM emitted there.
        let released = state.devices.output_log.len();
        // PostCopyFT: the lease counts from now, before `Restored` goes out (so
        // before the source can send `Go`), and the vCPUs enforce it themselves.
        let from = BootTime::now();
        self.lease_from = Some(from);
        let mut prepared = self.prepared.take().ok_or(MigrationError::vm(VmError::AlreadyRestored))?;
        if self.mode.checkpoints() {
            let fence = Fence::new(from + Duration::from_millis(self.options.heartbeat_timeout_ms));
            prepared.set_fence(Arc::clone(&fence));
            self.fence = Some(fence);
        }
        let machine = prepared.restore(state).map_err(MigrationError::vm)?;
        let gate =
            OutputGate { sink: self.sink.take().expect("one switchover"), released, hold: self.mode.checkpoints() };
        let runner = VmRunner::spawn(&self.name, machine, gate)
            .map_err(|source| MigrationError::vm(VmError::Thread { what: "VM runner", source }))?;
        let runner = Arc::new(runner);
        self.runner = Some(Arc::clone(&runner));
        if let Some(region) = &self.pages.region {
            let vcpus = BlockedVcpus { run_log: runner.run_log(), threads: runner.vcpu_threads().to_vec() };
            self.pages.vcpus = Some(vcpus.clone());
            // The fault thread queues each request itself (a page is asked for
            // once, when its first fault is pending): no task to wake on the way.
            let out = self.out.clone();
            let request = move |gpa| out.message(&MigrationMessage::PageRequest { gpas: vec![gpa] }).is_ok();
            let handler = FaultHandler::start(Arc::clone(region), Arc::clone(&self.pages.pending), vcpus, request)
                .map_err(|source| MigrationError::vm(VmError::Thread { what: "fault handler", source }))?;
            self.faults = Some(handler);
        }
        self.out.message(&MigrationMessage::Restored)?;
        Ok(DestinationPhase::Restored)
    }

    /// Restored → Running: the source committed the switchover; run the VM
    /// (PostCopyFT: with checkpoints, heartbeats and the lease).
    async fn go(&mut self) -> Result<DestinationPhase, MigrationError> {
        let runner = Arc::clone(self.runner.as_ref().expect("restored"));
        // The VM may run here from now on, and the agent knows it before its first
        // instruction: a resume that fails half-way has started some vCPUs.
        self.enter(DestinationPhase::Running);
        if let Some(f) = self.on_running.take() {
            f(Arc::clone(&runner));
        }
        let at = Instant::now();
        runner.resume().await.map_err(MigrationError::vm)?;
        self.stats.resume_us = at.elapsed().as_micros() as u64;
        self.out.message(&MigrationMessage::Resumed)?;
        metrics::get().set_phase(&self.name, "postcopy");
        if self.mode.checkpoints() {
            let lease = Lease::new(
                Duration::from_millis(self.options.heartbeat_timeout_ms),
                self.lease_from.expect("set at the switchover"),
            );
            let fence = Arc::clone(self.fence.as_ref().expect("set at the switchover with PostCopyFT"));
            self.ft = Some(FtDestination::start(
                runner,
                Arc::clone(&self.pages.memory),
                self.out.clone(),
                &self.options,
                Leased { lease, fence },
                self.stops_tx.clone(),
            ));
        }
        Ok(DestinationPhase::Running)
    }

    /// Running → Finished (PostCopyFT: → Completed): every page is here (those
    /// on the demand channel too, if the source used one: `demand_pages`).
    async fn all_sent(&mut self, demand_pages: Option<u64>) -> Result<DestinationPhase, MigrationError> {
        match demand_pages {
            Some(sent) => self.drain_demand(sent).await?,
            // No demand channel: no page of this migration comes on one.
            None => self.demand = DemandChannel::None,
        }
        if self.mode.checkpoints() {
            crash::at(CrashPoint::AfterLastPage);
        }
        // TCP keeps order: every page sent before this is installed.
        let missing = self.pages.received.missing();
        if missing > 0 {
            return Err(MigrationError::Unexpected(format!(
                "AllSent while {missing} pages never arrived (a source bug)"
            )));
        }
        drop(self.faults.take());
        self.stats.pages_faulted = self.pages.pages_faulted();
        self.stats.fault_latency_us = self.pages.take_fault_latency();
        if let Some(ft) = &self.ft {
            // The VM's state is no longer split: no more checkpoints.
            (self.stats.checkpoints_acked, self.stats.checkpoint_pause_max_us) = ft.stop_checkpoints();
        }
        self.out.message(&MigrationMessage::Complete(self.stats))?;
        if self.ft.is_none() {
            metrics::get().set_phase(&self.name, "completed");
            return Ok(DestinationPhase::Finished);
        }
        Ok(DestinationPhase::Completed)
    }

    /// Completed → Finished (PostCopyFT): the source lets its copy go, and we
    /// take the VM if our lease holds.
    async fn finish(&mut self, rd: &mut ReadAhead<MigrationMessage>) -> Result<DestinationPhase, MigrationError> {
        let ft = self.ft.as_ref().expect("Completed only with PostCopyFT");
        ft.finish().map_err(|stop| MigrationError::Fenced(stop.to_string()))?;
        // The VM is ours alone, and so is its output. Nothing goes out after
        // `Finished`: no heartbeats, no checkpoints (it follows the queued ones).
        drop(self.ft.take());
        self.runner.as_ref().expect("runs").release_outputs(None);
        metrics::get().set_phase(&self.name, "completed");
        // The VM is ours; the source has not heard so yet.
        crash::at(CrashPoint::AfterFinish);
        let finished = self.out.after_checkpoints(encode_message(&MigrationMessage::Finished)).await;
        if finished.is_ok() {
            // Read on until the source closes: closing with its frames unread
            // would reset the connection, and a reset can throw away a
            // `Finished` not yet delivered.
            let closed = async { while rd.read().await.is_ok() {} };
            let patience = Duration::from_millis(self.options.reply_timeout_ms);
            if tokio::time::timeout(patience, closed).await.is_err() {
                tracing::warn!("the source did not close the connection after Finished");
            }
        }
        Ok(DestinationPhase::Finished)
    }

    /// After the last frame: the stats, or (→ Failed) the VM stopped for good
    /// if it may have run here, the source told, and the error.
    async fn end(
        mut self,
        result: Result<(), MigrationError>,
        mut rd: ReadAhead<MigrationMessage>,
    ) -> Result<DestinationStats, MigrationError> {
        drop(self.faults.take());
        let checkpointed = self.ft.is_some();
        drop(self.ft.take());
        let Err(e) = result else {
            // Every page is here: no fault can come any more.
            return Ok(self.stats);
        };
        let ran_here = self.phase >= DestinationPhase::Running;
        self.enter(DestinationPhase::Failed);
        if ran_here && self.pages.received.is_full() && !checkpointed {
            // Every page is here (pre-copy): the VM needs nothing more from the source.
            tracing::warn!("the source was lost after every page arrived ({e}); the VM keeps running here");
            self.stats.pages_faulted = self.pages.pages_faulted();
            return Ok(self.stats);
        }
        // The VM may have run here: after `Go`, and also when a resume failed
        // half-way (some vCPUs started) or `Resumed` could not be queued. It
        // cannot go on: it lacks pages, or (PostCopyFT) the source may resume
        // its own copy. Stop it before anything else, and only then say so.
        let paused = match &self.runner {
            Some(r) => stop::stop_for_good(r, self.fence.as_deref(), &mut self.pages).await,
            None => true,
        };
        let _ = self.out.message(&MigrationMessage::Abort { reason: e.to_string(), paused });
        // Read on until the source closes (at most the reply timeout), off this task:
        // closing with its frames unread would reset the connection, and a reset can
        // throw away the `Abort` before the source reads it (it then cannot tell
        // that this copy stopped, and after `Finish` may not restore its own).
        let patience = Duration::from_millis(self.options.reply_timeout_ms);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(patience, async { while rd.read().await.is_ok() {} }).await;
        });
        if ran_here {
            return Err(MigrationError::SourceLost { cause: Box::new(e), checkpointed });
        }
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::DestinationPhase::{self, *};

    #[test]
    fn the_diagram_in_the_docs_is_this_table() {
        let all = [Receiving, Restored, Running, Completed, Finished, Failed];
        crate::migration::diagrams::assert_drawn("### The destination's phases", &all, DestinationPhase::may_enter);
    }

    #[test]
    fn phases_only_move_forward_and_end_in_finished_or_failed() {
        let all = [Receiving, Restored, Running, Completed, Finished, Failed];
        for from in all {
            for to in all {
                assert!(!from.may_enter(to) || from < to, "{from:?} → {to:?} goes back");
            }
        }
        let ends: Vec<DestinationPhase> = all.into_iter().filter(|p| all.iter().all(|&to| !p.may_enter(to))).collect();
        assert_eq!(ends, [Finished, Failed]);
    }
}
