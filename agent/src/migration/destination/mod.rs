//! The destination side of a migration: receive pages (installing them under
//! userfaultfd for post-copy), rebuild the VM at the switchover, run it on
//! `Go`, and ask the source for the pages the guest faults on.

use super::error::{MigrationError, VmError};
use crate::agent::timeline::EventKind;
use crate::clock::BootTime;
use crate::fault::crash::{self, CrashPoint};
use crate::migration::ft::lease::Lease;
use crate::page_set::PageSet;
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::fence::Fence;
use crate::vmm::machine::{Machine, MachineConfig, MachineState, PreparedMachine};
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::vmm::output::OutputSink;
use crate::vmm::runner::{OutputGate, VmRunner};
use crate::vmm::uffd::{Fault, FaultRegion, Installed};
use crate::wire::frame::{
    encode_message, Frame, FrameReader, FrameWriter, PageBatch, PageBatchWriter, ProtocolError, CHECKPOINT_WINDOW,
    HEADER_BYTES,
};
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{DestinationStats, MigrationOptions, Mode, Percentiles};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

const ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Faults seen and not yet served: page → when the fault was read.
type PendingFaults = Arc<Mutex<HashMap<u64, Instant>>>;

/// Control frames (heartbeats, page requests, replies) queued for the source at most.
/// They are small and few; a full queue means the connection is stuck.
const CONTROL_QUEUE_FRAMES: usize = 1024;
/// Checkpoint frames (at most 64 pages each) queued for the source at most:
/// beyond this the checkpointer waits (back-pressure; the guest runs on).
const CHECKPOINT_QUEUE_FRAMES: usize = 16;
/// Checkpoint epochs sent and not yet acked at most: the next epoch starts
/// only once the source has committed all but one of them.
const EPOCHS_IN_FLIGHT: u64 = 2;

/// Frames to the source from several tasks, through one writer task, in two
/// bounded lanes: control frames go out before queued checkpoint frames, so a
/// slow checkpoint stream never holds up heartbeats or page requests.
#[derive(Clone)]
struct Outbox {
    control: mpsc::Sender<Vec<u8>>,
    checkpoints: mpsc::Sender<Vec<u8>>,
    /// Checkpoint payload bytes the source has room for (see `CHECKPOINT_WINDOW`).
    credit: Arc<Credit>,
}

/// The destination's side of checkpoint flow control: it sends a checkpoint
/// frame only with credit for its payload, and the source gives credit back
/// as it handles frames. So the source never stops reading the connection,
/// and heartbeats and page requests never wait behind checkpoint data.
struct Credit {
    available: tokio::sync::Semaphore,
    /// Charged and not yet given back (credit never grows past the window).
    outstanding: AtomicU64,
}

impl Credit {
    fn new() -> Self {
        Credit { available: tokio::sync::Semaphore::new(CHECKPOINT_WINDOW as usize), outstanding: AtomicU64::new(0) }
    }

    /// Waits for credit for a frame of `payload` bytes, and takes it.
    async fn take(&self, payload: usize) -> Result<(), String> {
        let cost = (payload as u64).min(CHECKPOINT_WINDOW) as u32;
        let permits = self.available.acquire_many(cost).await.map_err(|_| "the connection closed".to_string())?;
        permits.forget();
        self.outstanding.fetch_add(u64::from(cost), Ordering::SeqCst);
        Ok(())
    }

    /// The source handled `bytes` more.
    fn give_back(&self, bytes: u64) {
        let mut returned = 0;
        let _ = self.outstanding.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |outstanding| {
            returned = bytes.min(outstanding);
            Some(outstanding - returned)
        });
        self.available.add_permits(returned as usize);
    }
}

impl Outbox {
    fn start(mut wr: FrameWriter) -> Self {
        let (control, mut control_rx) = mpsc::channel::<Vec<u8>>(CONTROL_QUEUE_FRAMES);
        let (checkpoints, mut checkpoints_rx) = mpsc::channel::<Vec<u8>>(CHECKPOINT_QUEUE_FRAMES);
        tokio::spawn(async move {
            loop {
                if crate::fault::silenced() {
                    // Fault injection (stall-fence): this destination goes silent.
                    std::future::pending::<()>().await;
                }
                let frame = tokio::select! {
                    biased;
                    Some(frame) = control_rx.recv() => frame,
                    Some(frame) = checkpoints_rx.recv() => frame,
                    else => return,
                };
                if wr.write(&frame).await.is_err() {
                    return;
                }
            }
        });
        Outbox { control, checkpoints, credit: Arc::new(Credit::new()) }
    }

    /// Queues a control message; never waits (a full lane is a stuck connection).
    fn message(&self, message: &MigrationMessage) -> Result<(), MigrationError> {
        self.control.try_send(encode_message(message)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MigrationError::Timeout {
                what: format!("the connection to the source: {CONTROL_QUEUE_FRAMES} control frames wait to go out"),
                after: Duration::ZERO,
            },
            mpsc::error::TrySendError::Closed(_) => MigrationError::Protocol(ProtocolError::Closed),
        })
    }

    /// Queues a checkpoint frame once the source has credit for it, waiting
    /// while it has none or the lane is full.
    async fn checkpoint_frame(&self, frame: Vec<u8>) -> Result<(), String> {
        self.credit.take(frame.len() - HEADER_BYTES).await?;
        self.after_checkpoints(frame).await
    }

    /// Queues a frame behind every checkpoint frame queued so far (no credit needed).
    async fn after_checkpoints(&self, frame: Vec<u8>) -> Result<(), String> {
        self.checkpoints.send(frame).await.map_err(|_| "the connection closed".to_string())
    }
}

/// Tells a VM's run log which page each of its vCPUs faulted on, and when the
/// fault was read (see `RunLog::fault_read`): the "one copy at a time" check
/// then knows a vCPU blocked in userfaultfd retired nothing since.
#[derive(Clone)]
struct BlockedVcpus {
    run_log: Arc<crate::vmm::run_log::RunLog>,
    /// The vCPU threads' kernel ids, by vCPU.
    threads: Vec<u32>,
}

impl BlockedVcpus {
    fn note(&self, fault: &Fault) {
        if let Some(vcpu) = self.threads.iter().position(|&tid| tid == fault.thread) {
            self.run_log.fault_read(vcpu as u8, fault.gpa, BootTime::now());
        }
    }
}

/// The fault-handler thread: reads missing-page faults and asks the source for them.
struct FaultHandler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultHandler {
    fn start(
        region: Arc<FaultRegion>,
        pending: PendingFaults,
        vcpus: BlockedVcpus,
        requests: mpsc::UnboundedSender<u64>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("uffd-faults".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match region.next_fault(Duration::from_millis(20)) {
                    Ok(Some(fault)) => {
                        vcpus.note(&fault);
                        let gpa = fault.gpa;
                        // A repeated fault on a pending page keeps the first fault's time.
                        let first = match pending.lock().expect("pending faults lock").entry(gpa) {
                            Entry::Occupied(_) => false,
                            Entry::Vacant(v) => {
                                v.insert(Instant::now());
                                true
                            }
                        };
                        if first && requests.send(gpa).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!("userfaultfd: {e}");
                        return;
                    }
                }
            }
        })?;
        Ok(FaultHandler { stop, thread: Some(thread) })
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Batches fault requests into `PageRequest` frames as fast as they come.
async fn forward_requests(mut requests: mpsc::UnboundedReceiver<u64>, out: Outbox) {
    while let Some(first) = requests.recv().await {
        let mut gpas = vec![first];
        while let Ok(more) = requests.try_recv() {
            gpas.push(more);
        }
        if out.message(&MigrationMessage::PageRequest { gpas }).is_err() {
            return;
        }
    }
}

fn percentiles(mut samples: Vec<u64>) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles { p50: at(0.5), p99: at(0.99) }
}

/// The pages of an incoming VM and how they are installed.
struct Incoming {
    memory: Arc<GuestMemory>,
    region: Option<Arc<FaultRegion>>,
    /// Once the VM runs here: which page its vCPUs are blocked on.
    vcpus: Option<BlockedVcpus>,
    received: PageSet,
    pending: PendingFaults,
    latencies_us: Vec<u64>,
    /// Set at the switchover: from then on the guest owns every present page,
    /// and a page that is already present is never overwritten.
    switched_over: bool,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.release_region(false);
    }
}

impl Incoming {
    /// Takes guest memory out of userfaultfd: every missing page now reads as
    /// zero, and a vCPU blocked on one runs on (unless its page was revoked:
    /// then it faults out). Its run log hears of it before it happens:
    /// `after_revoking`, every page a vCPU waits for was just revoked (see
    /// `revoke_missing_pages`); otherwise any missing page may wake one.
    fn release_region(&mut self, after_revoking: bool) {
        if self.region.is_none() {
            return;
        }
        if let Some(vcpus) = &self.vcpus {
            match after_revoking {
                true => vcpus.run_log.pages_zero_filling_where(|page| !self.memory.is_revoked(page)),
                false => vcpus.run_log.pages_installing(0, u64::MAX),
            }
        }
        self.region = None;
    }

    fn install(&mut self, batch: &PageBatch) -> Result<(), MigrationError> {
        let runs = batch.runs();
        if let Some(vcpus) = &self.vcpus {
            // Once per batch, before any of its pages is in place.
            let in_batch = |page: u64| {
                runs.iter().any(|r| page >= r.gpa && page < r.gpa.saturating_add(r.pages as u64 * PAGE_SIZE))
            };
            vcpus.run_log.pages_installing_where(in_batch);
        }
        for run in runs {
            let len = run.pages as u64 * PAGE_SIZE;
            if run.gpa.checked_add(len).is_none_or(|end| end > self.memory.size()) {
                return Err(MigrationError::Protocol(ProtocolError::Malformed {
                    what: "page batch",
                    detail: format!("page {:#x} is outside the VM's {} bytes", run.gpa, self.memory.size()),
                }));
            }
            let whole_run = match (&self.region, run.data) {
                (Some(region), Some(data)) => region.copy(run.gpa, data).map_err(MigrationError::vm)?,
                (Some(region), None) => region.zero(run.gpa, len).map_err(MigrationError::vm)?,
                // Without userfaultfd (pre-copy) every page is written one by one below.
                (None, _) => Installed::AlreadyPresent,
            };
            let pages = (0..run.pages).map(|i| {
                let gpa = run.gpa + i as u64 * PAGE_SIZE;
                (gpa, run.data.map(|d| &d[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize]))
            });
            for (gpa, data) in pages {
                if whole_run == Installed::AlreadyPresent {
                    self.install_page(gpa, data)?;
                }
                self.received.insert(gpa);
            }
            let mut pending = self.pending.lock().expect("pending faults lock");
            if !pending.is_empty() {
                for i in 0..run.pages as u64 {
                    if let Some(at) = pending.remove(&(run.gpa + i * PAGE_SIZE)) {
                        let latency = at.elapsed();
                        self.latencies_us.push(latency.as_micros() as u64);
                        crate::agent::metrics::get().fault_latency.observe(latency.as_secs_f64());
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops pages that changed at the source after they were sent (sorted
    /// addresses, from the source's dirty log), so that the guest faults them in fresh.
    fn discard(&mut self, gpas: &[u64]) -> Result<(), MigrationError> {
        if let Some(&bad) =
            gpas.iter().find(|&&gpa| gpa.checked_add(PAGE_SIZE).is_none_or(|end| end > self.memory.size()))
        {
            return Err(MigrationError::Protocol(ProtocolError::Malformed {
                what: "discard list",
                detail: format!("page {bad:#x} is outside the VM's {} bytes", self.memory.size()),
            }));
        }
        self.memory.discard_pages(gpas).map_err(MigrationError::vm)?;
        for &gpa in gpas {
            self.received.remove(gpa);
        }
        Ok(())
    }

    /// One page of a run that could not be installed whole.
    fn install_page(&mut self, gpa: u64, data: Option<&[u8]>) -> Result<(), MigrationError> {
        let installed = match &self.region {
            Some(region) => region.install_page(gpa, data).map_err(MigrationError::vm)?,
            // Fresh memory reads as zero: a zero page matters only over an older copy.
            None if data.is_none() && !self.received.contains(gpa) => return Ok(()),
            None => Installed::AlreadyPresent,
        };
        match installed {
            Installed::Now => Ok(()),
            // A newer copy from a later pre-copy round; the VM does not run here yet.
            Installed::AlreadyPresent if !self.switched_over => {
                self.memory.write(gpa, data.unwrap_or(&ZERO_PAGE)).map_err(MigrationError::vm)
            }
            Installed::AlreadyPresent => {
                tracing::warn!(
                    gpa = format_args!("{gpa:#x}"),
                    "page sent again after the switchover; the guest's copy stays"
                );
                Ok(())
            }
        }
    }
}

/// PostCopyFT at the destination: the lease, the checkpointer and heartbeat
/// tasks, and the output of each epoch waiting for the source's ack.
struct FtDestination {
    lease: Arc<Mutex<Lease>>,
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
    /// Starts checkpointing the running VM and heartbeating; `fenced` fires if the lease runs out.
    fn start(
        runner: Arc<VmRunner>,
        memory: Arc<GuestMemory>,
        out: Outbox,
        options: &MigrationOptions,
        leased: Leased,
        fenced: mpsc::UnboundedSender<String>,
    ) -> Self {
        let Leased { lease, fence } = leased;
        let lease = Arc::new(Mutex::new(lease));
        let unacked: Arc<Mutex<VecDeque<(u64, usize)>>> = Arc::default();
        let pause_max_us = Arc::new(AtomicU64::new(0));
        let interval = Duration::from_millis(options.checkpoint_interval_ms.max(1));
        let (acked_tx, acked_rx) = watch::channel(0);
        let checkpointer = tokio::spawn(
            checkpoints(
                Checkpointer {
                    runner,
                    memory,
                    out: out.clone(),
                    interval,
                    unacked: Arc::clone(&unacked),
                    acked: acked_rx,
                    pause_max_us: Arc::clone(&pause_max_us),
                },
                fenced.clone(),
            )
            .in_current_span(),
        );
        let beat = Duration::from_millis(options.heartbeat_interval_ms.max(1));
        let heartbeats = tokio::spawn(heartbeats(out, Arc::clone(&lease), fence, beat, fenced).in_current_span());
        FtDestination { lease, unacked, acked: 0, acked_tx, checkpointer, heartbeats, pause_max_us }
    }

    /// The source committed `epoch`: the output of every epoch up to it may go out.
    fn acked(&mut self, epoch: u64, runner: &VmRunner) {
        let mut unacked = self.unacked.lock().expect("unacked epochs lock");
        let mut release = None;
        while unacked.front().is_some_and(|(e, _)| *e <= epoch) {
            release = unacked.pop_front().map(|(_, outputs)| outputs);
        }
        if let Some(outputs) = release {
            runner.release_outputs(Some(outputs));
        }
        self.acked = self.acked.max(epoch);
        self.acked_tx.send_replace(self.acked);
    }

    fn stop_checkpoints(&self) {
        self.checkpointer.abort();
    }
}

impl Drop for FtDestination {
    fn drop(&mut self) {
        self.checkpointer.abort();
        self.heartbeats.abort();
    }
}

/// The destination's lease as its async side keeps it, and the fence that
/// enforces it on the vCPUs (the fence is what counts: once it has tripped,
/// a late ack that extends the lease changes nothing).
struct Leased {
    lease: Lease,
    fence: Arc<Fence>,
}

/// Heartbeats to the source, and the lease check: when the lease runs out (or
/// the fence tripped on its own, at the deadline) the VM must stop here for
/// good and the source be told; no heartbeat goes out after that.
async fn heartbeats(
    out: Outbox,
    lease: Arc<Mutex<Lease>>,
    fence: Arc<Fence>,
    every: Duration,
    fenced: mpsc::UnboundedSender<String>,
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
            let _ = fenced.send("the lease expired: the source acked no heartbeat in time".into());
            return;
        }
        if out.message(&MigrationMessage::Heartbeat { seq }).is_err() {
            return;
        }
    }
}

/// What the checkpointer task works with.
struct Checkpointer {
    runner: Arc<VmRunner>,
    memory: Arc<GuestMemory>,
    out: Outbox,
    interval: Duration,
    unacked: Arc<Mutex<VecDeque<(u64, usize)>>>,
    /// The last epoch the source acked.
    acked: watch::Receiver<u64>,
    pause_max_us: Arc<AtomicU64>,
}

/// Reverse incremental checkpoints, one epoch per interval: the pages written
/// since the last epoch are copied while the VM runs (speculative phase), then
/// the VM pauses just long enough to take the pages written meanwhile and its
/// state, and runs on while they and the commit record go out. An epoch starts
/// only while fewer than [`EPOCHS_IN_FLIGHT`] are unacked: a source that falls
/// behind slows the checkpoints (the guest runs on and its output waits), it
/// does not make them pile up.
async fn checkpoints(mut c: Checkpointer, failed: mpsc::UnboundedSender<String>) {
    crash::checkpointer_at(CrashPoint::BeforeFirstCheckpoint).await;
    let mut epoch = 0;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + c.interval, c.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        epoch += 1;
        if *c.acked.borrow() + EPOCHS_IN_FLIGHT < epoch {
            tracing::debug!(epoch, acked = *c.acked.borrow(), "waiting for the source to commit before the next epoch");
            if c.acked.wait_for(|&acked| acked + EPOCHS_IN_FLIGHT >= epoch).await.is_err() {
                return;
            }
        }
        let span = tracing::info_span!("checkpoint", epoch);
        match checkpoint(epoch, &c.runner, &c.memory, &c.out, &c.unacked).instrument(span).await {
            Ok(pause) => {
                let detail = format!("epoch {epoch}: paused the guest {} µs", pause.as_micros());
                crate::agent::metrics::get().timeline.event(c.runner.name(), EventKind::CheckpointSent, detail);
                c.pause_max_us.fetch_max(pause.as_micros() as u64, Ordering::Relaxed);
                crate::agent::metrics::get().checkpoint_pause.observe(pause.as_secs_f64());
                crash::checkpointer_at(CrashPoint::Committed(epoch)).await;
            }
            Err(e) => {
                let _ = failed.send(format!("checkpoint {epoch} failed: {e}"));
                return;
            }
        }
    }
}

/// Epochs sent and not yet acked, with the output-log length at their pause.
type UnackedEpochs = Arc<Mutex<VecDeque<(u64, usize)>>>;

/// One epoch; returns how long the pause took.
async fn checkpoint(
    epoch: u64,
    runner: &VmRunner,
    memory: &GuestMemory,
    out: &Outbox,
    unacked: &UnackedEpochs,
) -> Result<Duration, String> {
    // Speculative: copy while the guest runs. A page written during the copy is
    // dirty again and goes again in the pause, so a torn copy never survives.
    let speculative = runner.take_dirty_pages().await.map_err(|e| e.to_string())?;
    let mut batch = PageBatchWriter::new();
    for (i, chunk) in speculative.chunks(CHECKPOINT_BATCH_PAGES).enumerate() {
        for &gpa in chunk {
            batch.push_with(gpa, |buf| memory.read(gpa, buf)).map_err(|e| e.to_string())?;
        }
        out.checkpoint_frame(batch.finish()).await?;
        if i == 0 {
            crash::checkpointer_at(CrashPoint::Speculative(epoch)).await;
        }
    }
    let capture = runner.checkpoint(epoch).await.map_err(|e| e.to_string())?;
    for (chunk, data) in capture
        .dirty
        .chunks(CHECKPOINT_BATCH_PAGES)
        .zip(capture.data.chunks(CHECKPOINT_BATCH_PAGES * PAGE_SIZE as usize))
    {
        for (&gpa, page) in chunk.iter().zip(data.chunks_exact(PAGE_SIZE as usize)) {
            batch.push(gpa, page);
        }
        out.checkpoint_frame(batch.finish()).await?;
    }
    let pages = (speculative.len() + capture.dirty.len()) as u64;
    let outputs = capture.state.devices.output_log.len();
    let commit = encode_message(&MigrationMessage::CheckpointCommit { epoch, pages, state: capture.state.to_bytes() });
    queue_commit(epoch, outputs, commit, out, unacked).await?;
    tracing::debug!(
        epoch,
        speculative = speculative.len(),
        paused = capture.dirty.len(),
        pause_us = capture.pause.as_micros() as u64,
        "checkpoint sent"
    );
    Ok(capture.pause)
}

/// Queues an epoch's commit record, having first noted the epoch as unacked
/// with its output: the source's ack may arrive as soon as the record leaves,
/// and it must find the epoch whose output it releases.
async fn queue_commit(
    epoch: u64,
    outputs: usize,
    commit: Vec<u8>,
    out: &Outbox,
    unacked: &UnackedEpochs,
) -> Result<(), String> {
    unacked.lock().expect("unacked epochs lock").push_back((epoch, outputs));
    out.checkpoint_frame(commit).await
}

/// Before `Ready`: guest memory, its userfaultfd registration (post-copy), and
/// the VM built up to its state, so that the switchover only has to restore.
async fn prepare_incoming(
    config: &MachineConfig,
    mode: Mode,
    options: &MigrationOptions,
) -> Result<(Arc<GuestMemory>, Incoming, PreparedMachine), MigrationError> {
    let memory = Arc::new(GuestMemory::new(config.mem_bytes, config.slot_bytes).map_err(MigrationError::vm)?);
    let region = if mode.uses_postcopy() {
        Some(Arc::new(FaultRegion::register(Arc::clone(&memory)).map_err(MigrationError::vm)?))
    } else {
        None
    };
    let incoming = Incoming {
        memory: Arc::clone(&memory),
        region,
        received: PageSet::empty(config.mem_bytes),
        vcpus: None,
        pending: Arc::default(),
        latencies_us: Vec::new(),
        switched_over: false,
    };
    let (prep_config, prep_memory) = (config.clone(), Arc::clone(&memory));
    let track = mode.checkpoints();
    let tracking = if track { options.checkpoint_tracker } else { DirtyTracking::Bitmap };
    let prepare = move || {
        let prepared = Machine::prepare_with(prep_config, prep_memory, tracking)?;
        if track {
            // Track the guest's writes from its first instruction here, and do it
            // now rather than in the downtime (re-registering memslots takes a while).
            prepared.set_dirty_logging(true)?;
        }
        Ok::<_, crate::vmm::machine::MachineError>(prepared)
    };
    let prepared = match tokio::task::spawn_blocking(prepare).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(MigrationError::vm(e)),
        Err(e) => return Err(MigrationError::vm(VmError::Panicked(e.to_string()))),
    };
    Ok((memory, incoming, prepared))
}

/// Pages per checkpoint page frame.
const CHECKPOINT_BATCH_PAGES: usize = 64;

/// Receives the VM `name` from the source on the other end of `rd`/`wr`,
/// after `Begin` was read. `on_running` gets the runner once the VM runs here.
/// Returns what the destination measured once every page is in place (and,
/// PostCopyFT, the source has let the VM go).
#[allow(clippy::too_many_arguments)]
pub async fn migrate_in(
    mut rd: FrameReader,
    wr: FrameWriter,
    name: &str,
    config: &MachineConfig,
    mode: Mode,
    options: MigrationOptions,
    sink: OutputSink,
    on_running: impl FnOnce(Arc<VmRunner>),
) -> Result<DestinationStats, MigrationError> {
    let out = Outbox::start(wr);
    let (memory, mut incoming, prepared) = match prepare_incoming(config, mode, &options).await {
        Ok(v) => v,
        Err(e) => {
            // Tell the source why: the VM keeps running there.
            let _ =
                out.message(&MigrationMessage::Refuse { reason: format!("the destination cannot take the VM: {e}") });
            return Err(e);
        }
    };
    let mut prepared = Some(prepared);
    out.message(&MigrationMessage::Ready)?;

    let mut runner: Option<Arc<VmRunner>> = None;
    let mut on_running = Some(on_running);
    let mut handler: Option<FaultHandler> = None;
    let mut stats = DestinationStats::default();
    let mut sink = Some(sink);
    // PostCopyFT: the lease starts when `Restored` goes out (before the source can send `Go`).
    let mut lease_from: Option<BootTime> = None;
    let mut vm_fence: Option<Arc<Fence>> = None;
    let mut ft: Option<FtDestination> = None;
    // At most one word from each of the lease and checkpoint tasks: they end after sending.
    let (fence_tx, mut fenced) = mpsc::unbounded_channel::<String>();
    let mut completed = false;
    // Every way out of the loop is a `break`, never `?`: a VM that ran here
    // must be stopped (and, PostCopyFT, marked fenced) on the way out.
    let result = loop {
        // With data always waiting, reads never yield; the writer task (page
        // requests, "resumed") must not wait behind the page stream.
        tokio::task::yield_now().await;
        let frame = tokio::select! {
            frame = rd.read() => match frame {
                Ok(frame) => frame,
                Err(e) => break Err(MigrationError::Protocol(e)),
            },
            Some(reason) = fenced.recv() => break Err(MigrationError::Fenced(reason)),
        };
        match frame {
            Frame::Pages(batch) => {
                // A page installed wakes the vCPUs blocked on it: never after the lease
                // ran out (a destination frozen past it may find pages still queued).
                if vm_fence.as_ref().is_some_and(|fence| !fence.allows_running()) {
                    break Err(MigrationError::Fenced("the lease ran out; no page is installed after it".into()));
                }
                if let Err(e) = incoming.install(&batch) {
                    break Err(e);
                }
            }
            Frame::Message(MigrationMessage::Switchover { state, stale }) if runner.is_none() => {
                incoming.switched_over = true;
                // Changed after they were sent: drop them so that the guest faults them in fresh.
                if let Err(e) = incoming.discard(&stale) {
                    break Err(e);
                }
                let state = match MachineState::from_bytes(&state) {
                    Ok(s) => s,
                    Err(e) => break Err(MigrationError::vm(e)),
                };
                // The source released the output the VM emitted there.
                let released = state.devices.output_log.len();
                // PostCopyFT: the lease counts from now, before `Restored` goes out (so
                // before the source can send `Go`), and the vCPUs enforce it themselves.
                let from = BootTime::now();
                lease_from = Some(from);
                if mode.checkpoints() {
                    let fence = Fence::new(from + Duration::from_millis(options.heartbeat_timeout_ms));
                    if let Some(p) = prepared.as_mut() {
                        p.set_fence(Arc::clone(&fence));
                    }
                    vm_fence = Some(fence);
                }
                let machine = match prepared.take().map(|p| p.restore(state)) {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => break Err(MigrationError::vm(e)),
                    None => break Err(MigrationError::vm(VmError::AlreadyRestored)),
                };
                let gate =
                    OutputGate { sink: sink.take().expect("one switchover"), released, hold: mode.checkpoints() };
                match VmRunner::spawn(name, machine, gate) {
                    Ok(r) => runner = Some(Arc::new(r)),
                    Err(e) => break Err(MigrationError::vm(VmError::Thread { what: "VM runner", source: e })),
                }
                if let Some(region) = &incoming.region {
                    // Bounded by the guest's pages: a page is queued once, when its first fault is pending.
                    let (tx, rx) = mpsc::unbounded_channel();
                    let r = runner.as_ref().expect("just spawned");
                    let vcpus = BlockedVcpus { run_log: r.run_log(), threads: r.vcpu_threads().to_vec() };
                    incoming.vcpus = Some(vcpus.clone());
                    match FaultHandler::start(Arc::clone(region), Arc::clone(&incoming.pending), vcpus, tx) {
                        Ok(h) => handler = Some(h),
                        Err(e) => break Err(MigrationError::vm(VmError::Thread { what: "fault handler", source: e })),
                    }
                    tokio::spawn(forward_requests(rx, out.clone()));
                }
                if let Err(e) = out.message(&MigrationMessage::Restored) {
                    break Err(e);
                }
            }
            Frame::Message(MigrationMessage::Go) if runner.is_some() && on_running.is_some() => {
                let r = runner.as_ref().expect("checked");
                // The agent knows the VM runs here from before its first instruction:
                // a resume that fails half-way has started some vCPUs.
                if let Some(f) = on_running.take() {
                    f(Arc::clone(r));
                }
                let at = Instant::now();
                if let Err(e) = r.resume().await {
                    break Err(MigrationError::vm(e));
                }
                stats.resume_us = at.elapsed().as_micros() as u64;
                if let Err(e) = out.message(&MigrationMessage::Resumed) {
                    break Err(e);
                }
                crate::agent::metrics::get().set_phase(name, "postcopy");
                if mode.checkpoints() {
                    let lease = Lease::new(
                        Duration::from_millis(options.heartbeat_timeout_ms),
                        lease_from.expect("set at the switchover"),
                    );
                    ft = Some(FtDestination::start(
                        Arc::clone(r),
                        Arc::clone(&memory),
                        out.clone(),
                        &options,
                        Leased { lease, fence: vm_fence.clone().expect("set at the switchover with PostCopyFT") },
                        fence_tx.clone(),
                    ));
                }
            }
            Frame::Message(MigrationMessage::AllSent { .. }) if on_running.is_none() && !completed => {
                if mode.checkpoints() {
                    crash::at(CrashPoint::AfterLastPage);
                }
                // TCP keeps order: every page sent before this is installed.
                let missing = incoming.received.missing();
                if missing > 0 {
                    break Err(MigrationError::Unexpected(format!(
                        "AllSent while {missing} pages never arrived (a source bug)"
                    )));
                }
                drop(handler.take());
                stats.pages_faulted = incoming.latencies_us.len() as u64;
                stats.fault_latency_us = percentiles(std::mem::take(&mut incoming.latencies_us));
                if let Some(ft) = &ft {
                    // The VM's state is no longer split: no more checkpoints.
                    ft.stop_checkpoints();
                    stats.checkpoints_acked = ft.acked;
                    stats.checkpoint_pause_max_us = ft.pause_max_us.load(Ordering::Relaxed);
                }
                if let Err(e) = out.message(&MigrationMessage::Complete(stats)) {
                    break Err(e);
                }
                completed = true;
                if ft.is_none() {
                    crate::agent::metrics::get().set_phase(name, "completed");
                    break Ok(());
                }
            }
            Frame::Message(MigrationMessage::CheckpointCredit { bytes }) if ft.is_some() || completed => {
                out.credit.give_back(bytes);
            }
            Frame::Message(MigrationMessage::CheckpointAck { epoch }) if ft.is_some() => {
                ft.as_mut().expect("checked").acked(epoch, runner.as_ref().expect("runs"));
            }
            Frame::Message(MigrationMessage::HeartbeatAck { seq }) if ft.is_some() => {
                let ft = ft.as_ref().expect("checked");
                let mut lease = ft.lease.lock().expect("lease lock");
                if let Some(sent) = lease.acked(seq) {
                    crate::agent::metrics::get().heartbeat_rtt.observe(sent.elapsed().as_secs_f64());
                }
                if let Some(fence) = &vm_fence {
                    fence.extend(lease.expires());
                    if fence.tripped() {
                        // Too late: the vCPUs stopped at the deadline, and no ack revives them.
                        break Err(MigrationError::Fenced("the lease ran out before this ack arrived".into()));
                    }
                }
            }
            Frame::Message(MigrationMessage::Finish) if completed && ft.is_some() => {
                // The source lets its copy go, if we take the VM while our lease holds.
                if vm_fence.as_ref().is_some_and(|f| !f.disarm()) {
                    let expired = ft.as_ref().expect("checked").lease.lock().expect("lease lock").expires();
                    let late = expired.elapsed().as_millis();
                    break Err(MigrationError::Fenced(format!("Finish came {late} ms after the lease ran out")));
                }
                // The VM is ours alone, and so is its output. Nothing goes out after
                // `Finished`: no heartbeats, no checkpoints (it follows the queued ones).
                drop(ft.take());
                runner.as_ref().expect("runs").release_outputs(None);
                crate::agent::metrics::get().set_phase(name, "completed");
                let finished = out.after_checkpoints(encode_message(&MigrationMessage::Finished)).await;
                if finished.is_ok() {
                    // Read on until the source closes: closing with its frames unread
                    // would reset the connection, and a reset can throw away a
                    // `Finished` not yet delivered.
                    let closed = async { while rd.read::<MigrationMessage>().await.is_ok() {} };
                    let patience = Duration::from_millis(options.reply_timeout_ms);
                    if tokio::time::timeout(patience, closed).await.is_err() {
                        tracing::warn!("the source did not close the connection after Finished");
                    }
                }
                break Ok(());
            }
            // Only under userfaultfd does a dropped page come back (as a fault).
            Frame::Message(MigrationMessage::Discard { gpas }) if runner.is_none() && incoming.region.is_some() => {
                if let Err(e) = incoming.discard(&gpas) {
                    break Err(e);
                }
                if let Err(e) = out.message(&MigrationMessage::Discarded) {
                    break Err(e);
                }
            }
            Frame::Message(MigrationMessage::Abort { reason, .. }) => break Err(MigrationError::Aborted(reason)),
            Frame::Message(other) => break Err(MigrationError::Unexpected(format!("{other:?}"))),
        }
    };
    drop(handler.take());
    let checkpointed = ft.is_some();
    drop(ft.take());
    match result {
        Ok(()) => {
            // Every page is here: no fault can come any more.
            drop(incoming);
            Ok(stats)
        }
        Err(e) => {
            if on_running.is_none() && incoming.received.is_full() && !checkpointed {
                // Every page is here (pre-copy): the VM needs nothing more from the source.
                tracing::warn!("the source was lost after every page arrived ({e}); the VM keeps running here");
                stats.pages_faulted = incoming.latencies_us.len() as u64;
                return Ok(stats);
            }
            // The VM may have run here: after `Go`, and also when a resume failed
            // half-way (some vCPUs started) or `Resumed` could not be queued. It
            // cannot go on: it lacks pages, or (PostCopyFT) the source may resume
            // its own copy. Stop it before anything else, and only then say so.
            let paused = match &runner {
                Some(r) => stop_for_good(r, vm_fence.as_deref(), &mut incoming).await,
                None => true,
            };
            let _ = out.message(&MigrationMessage::Abort { reason: e.to_string(), paused });
            // Read on until the source closes (at most the reply timeout), off this task:
            // closing with its frames unread would reset the connection, and a reset can
            // throw away the `Abort` before the source reads it (it then cannot tell
            // that this copy stopped, and after `Finish` may not restore its own).
            let patience = Duration::from_millis(options.reply_timeout_ms);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(patience, async { while rd.read::<MigrationMessage>().await.is_ok() {} })
                    .await;
            });
            if on_running.is_none() {
                return Err(MigrationError::SourceLost { cause: Box::new(e), checkpointed });
            }
            Err(e)
        }
    }
}

/// Makes the pages that vCPUs are blocked on inaccessible for good, before
/// the memory leaves userfaultfd: a vCPU woken by that then faults instead of
/// running on a zero page after the lease ran out. (Every other vCPU is out of
/// the guest by now, or kicked out before its next instruction.)
fn revoke_missing_pages(incoming: &mut Incoming) {
    let (Some(region), Some(vcpus)) = (&incoming.region, &incoming.vcpus) else { return };
    let mut pages: Vec<u64> = incoming.pending.lock().expect("pending faults lock").keys().copied().collect();
    match region.queued_faults() {
        Ok(queued) => {
            for fault in queued {
                vcpus.note(&fault);
                pages.push(fault.gpa);
            }
        }
        Err(e) => tracing::warn!("reading the last page faults: {e}"),
    }
    pages.retain(|&gpa| !incoming.received.contains(gpa));
    pages.sort_unstable();
    pages.dedup();
    vcpus.run_log.amend_blocked_exits(|page| !incoming.received.contains(page));
    if pages.is_empty() {
        return;
    }
    match incoming.memory.revoke_pages(&pages) {
        Ok(()) => tracing::info!(pages = pages.len(), "revoked the missing pages blocked vCPUs wait for"),
        Err(e) => tracing::error!("cannot revoke the pages blocked vCPUs wait for: {e}"),
    }
}

/// Stops this copy of the VM for good after the migration failed: trips the
/// fence (PostCopyFT: no vCPU enters the guest again), then pauses every vCPU.
/// True only if every vCPU acknowledged the pause: then the source may resume
/// its copy without waiting out the lease.
async fn stop_for_good(runner: &Arc<VmRunner>, fence: Option<&Fence>, incoming: &mut Incoming) -> bool {
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
    revoke_missing_pages(incoming);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_epoch_is_unacked_before_its_commit_record_can_leave() {
        // The source may ack a commit as soon as its record leaves: the epoch
        // (and the output it releases) must already be waiting for that ack.
        // Here the record waits for credit, and the epoch is noted meanwhile.
        let (control, _control_rx) = mpsc::channel(1);
        let (checkpoints, mut checkpoints_rx) = mpsc::channel(1);
        let out = Outbox { control, checkpoints, credit: Arc::new(Credit::new()) };
        out.credit.take(CHECKPOINT_WINDOW as usize).await.unwrap();
        let unacked: UnackedEpochs = Arc::default();
        let queued = tokio::spawn({
            let (out, unacked) = (out.clone(), Arc::clone(&unacked));
            async move { queue_commit(7, 42, vec![0; HEADER_BYTES + 3], &out, &unacked).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(checkpoints_rx.try_recv().is_err(), "no credit: the record has not left");
        assert_eq!(*unacked.lock().unwrap(), VecDeque::from([(7, 42)]), "the epoch waits for its ack already");
        out.credit.give_back(CHECKPOINT_WINDOW);
        queued.await.unwrap().unwrap();
        assert_eq!(checkpoints_rx.recv().await.unwrap().len(), HEADER_BYTES + 3);
    }

    #[tokio::test]
    async fn checkpoint_frames_wait_for_credit_and_credit_never_grows_past_the_window() {
        let credit = Credit::new();
        credit.take(CHECKPOINT_WINDOW as usize - 100).await.unwrap();
        // 200 more bytes do not fit until the source gives some back.
        let waiting = tokio::time::timeout(Duration::from_millis(20), credit.take(200)).await;
        assert!(waiting.is_err(), "sent past the window");
        credit.give_back(150);
        tokio::time::timeout(Duration::from_millis(200), credit.take(200)).await.expect("credit came back").unwrap();
        // A source that gives back more than was charged (a bug, or a forged
        // frame) does not widen the window.
        credit.give_back(u64::MAX);
        assert_eq!(credit.available.available_permits(), CHECKPOINT_WINDOW as usize);
        assert_eq!(credit.outstanding.load(Ordering::SeqCst), 0);
    }
}
