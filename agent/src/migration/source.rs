//! The source side of a migration: pre-copy rounds, the switchover, and the
//! post-copy push that answers the destination's page requests first.

use super::messages::{DestinationStats, Message, MigrationOptions, MigrationReport, Mode, Role};
use super::protocol::{encode_message, read_frame, write_frame, Frame, PageBatchWriter, ProtocolError};
use crate::machine::MachineConfig;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page_set::PageSet;
use crate::vm_runner::VmRunner;
use std::time::{Duration, Instant};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Pages per batch frame of the background push: small enough that a demand
/// request waits for at most one batch on the wire.
const PUSH_BATCH_PAGES: usize = 64;
/// Pages per batch frame of the pre-copy rounds.
const COPY_BATCH_PAGES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "cannot connect to the destination agent at {to}: {reason}; check that `pcft agent --listen {to}` runs there"
    )]
    Connect { to: String, reason: String },
    #[error("the destination refused: {0}")]
    Refused(String),
    #[error("protocol error with the peer: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the peer sent {0} where the protocol expects something else")]
    Unexpected(String),
    #[error("the peer aborted the migration: {0}")]
    Aborted(String),
    #[error("VM error: {0}")]
    Vm(String),
    #[error("the destination did not answer ({what}) within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("the destination was lost after the switchover committed: {0}; without PostCopyFT checkpoints the VM cannot be recovered")]
    LostAfterCommit(String),
}

/// Writes frames and counts what it sent.
struct Outbox {
    wr: OwnedWriteHalf,
    bytes: u64,
    pages: u64,
    zero_pages: u64,
}

impl Outbox {
    async fn message(&mut self, message: &Message) -> Result<(), MigrationError> {
        let frame = encode_message(message);
        self.bytes += frame.len() as u64;
        Ok(write_frame(&mut self.wr, &frame).await?)
    }

    /// Sends the pages at `gpas` from `memory`, in batches of `per_batch`.
    async fn pages(&mut self, memory: &GuestMemory, gpas: &[u64], per_batch: usize) -> Result<(), MigrationError> {
        let mut batch = PageBatchWriter::new();
        for chunk in gpas.chunks(per_batch) {
            for &gpa in chunk {
                batch.push_with(gpa, |buf| memory.read(gpa, buf)).map_err(|e| MigrationError::Vm(e.to_string()))?;
            }
            self.pages += batch.len() as u64;
            self.zero_pages += u64::from(batch.zero_pages());
            let frame = batch.finish();
            self.bytes += frame.len() as u64;
            write_frame(&mut self.wr, &frame).await?;
        }
        Ok(())
    }
}

/// Reads the destination's next answer (before the switchover commits), waiting at most `timeout`.
async fn expect(rd: &mut OwnedReadHalf, what: &str, timeout: Duration) -> Result<Message, MigrationError> {
    let frame = tokio::time::timeout(timeout, read_frame(rd))
        .await
        .map_err(|_| MigrationError::Timeout { what: what.to_string(), after: timeout })??;
    match frame {
        Frame::Message(Message::Refuse { reason }) => Err(MigrationError::Refused(reason)),
        Frame::Message(Message::Abort { reason }) => Err(MigrationError::Aborted(reason)),
        Frame::Message(m) => Ok(m),
        Frame::Pages(_) => Err(MigrationError::Unexpected(format!("pages (waiting for {what})"))),
    }
}

/// What the destination says after the switchover.
enum Reply {
    Resumed(Instant),
    Requests(Vec<u64>),
    Complete(DestinationStats),
    Failed(String),
}

/// Reads the destination's frames after the switchover and forwards them.
async fn read_replies(mut rd: OwnedReadHalf, tx: mpsc::UnboundedSender<Reply>) {
    loop {
        let reply = match read_frame(&mut rd).await {
            Ok(Frame::Message(Message::Resumed)) => Reply::Resumed(Instant::now()),
            Ok(Frame::Message(Message::PageRequest { gpas })) => Reply::Requests(gpas),
            Ok(Frame::Message(Message::Complete(stats))) => Reply::Complete(stats),
            Ok(Frame::Message(Message::Abort { reason })) => Reply::Failed(format!("destination aborted: {reason}")),
            Ok(other) => Reply::Failed(format!("unexpected frame {other:?}")),
            Err(e) => Reply::Failed(e.to_string()),
        };
        let last = matches!(reply, Reply::Complete(_) | Reply::Failed(_));
        if tx.send(reply).is_err() || last {
            return;
        }
    }
}

/// Migrates the VM that `runner` runs to the agent at `to`. On any failure
/// before the switchover commits, the VM is left running here.
pub async fn migrate_out(
    runner: &VmRunner,
    vm: &str,
    config: &MachineConfig,
    to: &str,
    mode: Mode,
    options: MigrationOptions,
    agent: &str,
) -> Result<MigrationReport, MigrationError> {
    let started = Instant::now();
    let reply_timeout = Duration::from_millis(options.reply_timeout_ms);
    let stream = TcpStream::connect(to)
        .await
        .map_err(|e| MigrationError::Connect { to: to.to_string(), reason: e.to_string() })?;
    stream.set_nodelay(true).map_err(|e| MigrationError::Connect { to: to.to_string(), reason: e.to_string() })?;
    let (mut rd, wr) = stream.into_split();
    let mut out = Outbox { wr, bytes: 0, pages: 0, zero_pages: 0 };
    out.message(&Message::Hello { role: Role::Migration, agent: agent.to_string() }).await?;
    match expect(&mut rd, "welcome", reply_timeout).await? {
        Message::Welcome { .. } => {}
        other => return Err(MigrationError::Unexpected(format!("{other:?}"))),
    }
    out.message(&Message::Begin { name: vm.to_string(), config: config.clone(), mode }).await?;
    match expect(&mut rd, "ready", reply_timeout).await? {
        Message::Ready => {}
        other => return Err(MigrationError::Unexpected(format!("{other:?}"))),
    }

    let mut report = MigrationReport {
        vm: vm.to_string(),
        mode: mode.name().to_string(),
        mem_bytes: config.mem_bytes,
        ..Default::default()
    };
    let memory = runner.memory();
    let stopped = match precopy_and_stop(runner, &memory, &mut out, &mut rd, mode, options, &mut report).await {
        Ok(v) => v,
        Err(e) => {
            // Not committed: the VM keeps running here.
            let _ = runner.set_dirty_logging(false).await;
            let _ = runner.resume().await;
            let _ = out.message(&Message::Abort { reason: e.to_string() }).await;
            return Err(e);
        }
    };

    // Committed from here: the destination runs the VM once it reads `Go`.
    out.message(&Message::Go).await.map_err(|e| MigrationError::LostAfterCommit(e.to_string()))?;
    let (tx, mut replies) = mpsc::unbounded_channel();
    tokio::spawn(read_replies(rd, tx));
    let unsent = match mode {
        Mode::Precopy => PageSet::empty(config.mem_bytes),
        Mode::Postcopy => PageSet::full(config.mem_bytes),
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
    let lost = |e: MigrationError| MigrationError::LostAfterCommit(e.to_string());
    let mut push = Push { unsent, demand: Vec::new(), cursor: 0, resumed_at: None };
    // Pacing of the background push (demand pages are never held back).
    let pace = (options.postcopy_pages_per_sec > 0)
        .then(|| Duration::from_secs_f64(PUSH_BATCH_PAGES as f64 / options.postcopy_pages_per_sec as f64));
    let mut next_push = Instant::now();
    // Requested pages leave `unsent` when asked for: flush them too before `AllSent`.
    while !push.unsent.is_empty() || !push.demand.is_empty() {
        // The reply reader may sit in this worker's queue: let it run, so that
        // page requests (and "resumed") are seen after at most one batch.
        tokio::task::yield_now().await;
        while let Ok(reply) = replies.try_recv() {
            push.absorb(reply)?;
        }
        if !push.demand.is_empty() {
            out.pages(&memory, &push.demand, PUSH_BATCH_PAGES).await.map_err(lost)?;
            report.pages_faulted += push.demand.len() as u64;
            push.demand.clear();
            continue;
        }
        if push.resumed_at.is_none() {
            // Until the VM runs at the destination nothing needs pages; pushing now
            // would only compete with its resume for the CPU and stretch the downtime.
            push.absorb(replies.recv().await.unwrap_or(Reply::Failed("the connection closed".into())))?;
            continue;
        }
        if pace.is_some() && Instant::now() < next_push {
            tokio::select! {
                reply = replies.recv() => push.absorb(reply.unwrap_or(Reply::Failed("the connection closed".into())))?,
                _ = tokio::time::sleep_until(next_push.into()) => {}
            }
            continue;
        }
        let batch = push.next_batch();
        out.pages(&memory, &batch, PUSH_BATCH_PAGES).await.map_err(lost)?;
        report.pages_pushed += batch.len() as u64;
        if let Some(pace) = pace {
            next_push = next_push.max(Instant::now() - pace) + pace;
        }
    }
    let mut resumed_at = push.resumed_at;
    out.message(&Message::AllSent { pages: out.pages }).await.map_err(lost)?;
    let stats = loop {
        match replies.recv().await {
            Some(Reply::Resumed(at)) => resumed_at = Some(at),
            Some(Reply::Requests(_)) => {} // every page is already on its way
            Some(Reply::Complete(stats)) => break stats,
            Some(Reply::Failed(reason)) => return Err(MigrationError::LostAfterCommit(reason)),
            None => return Err(MigrationError::LostAfterCommit("the connection closed".into())),
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report.total_migration_ms = ms(started.elapsed());
    report.downtime_ms = resumed_at.map(|at| ms(at.duration_since(paused_at))).unwrap_or(f64::NAN);
    report.bytes_sent = out.bytes;
    report.pages_sent = out.pages;
    report.zero_pages = out.zero_pages;
    report.fault_latency_us = stats.fault_latency_us;
    Ok(report)
}

/// Post-copy at the source: what is still unsent, what the destination asked
/// for, and where the background push goes next.
struct Push {
    unsent: PageSet,
    demand: Vec<u64>,
    cursor: u64,
    resumed_at: Option<Instant>,
}

impl Push {
    fn absorb(&mut self, reply: Reply) -> Result<(), MigrationError> {
        match reply {
            Reply::Resumed(at) => self.resumed_at = Some(at),
            Reply::Requests(gpas) => {
                for gpa in gpas {
                    if self.unsent.remove(gpa) {
                        self.demand.push(gpa);
                    }
                    // Push on from the latest fault: the guest is likely to touch what follows.
                    self.cursor = gpa.wrapping_add(PAGE_SIZE);
                }
            }
            Reply::Complete(_) => {
                return Err(MigrationError::LostAfterCommit("completed before all pages were sent".into()))
            }
            Reply::Failed(reason) => return Err(MigrationError::LostAfterCommit(reason)),
        }
        Ok(())
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
    rd: &mut OwnedReadHalf,
    mode: Mode,
    options: MigrationOptions,
    report: &mut MigrationReport,
) -> Result<Stopped, MigrationError> {
    let vm = |e: String| MigrationError::Vm(e);
    let reply_timeout = Duration::from_millis(options.reply_timeout_ms);
    let mut dirty = Vec::new();
    let mut discarded = Vec::new();
    if mode != Mode::Postcopy {
        runner.set_dirty_logging(true).await.map_err(vm)?;
        let all: Vec<u64> = (0..memory.size()).step_by(PAGE_SIZE as usize).collect();
        out.pages(memory, &all, COPY_BATCH_PAGES).await?;
        report.rounds = 1;
        loop {
            dirty = runner.take_dirty_pages().await.map_err(vm)?;
            if dirty.len() as u64 <= options.converge_pages || report.rounds >= options.max_rounds {
                break;
            }
            if mode == Mode::Hybrid {
                out.message(&Message::Discard { gpas: dirty.clone() }).await?;
                match expect(rd, "discarded", reply_timeout).await? {
                    Message::Discarded => discarded.append(&mut dirty),
                    other => return Err(MigrationError::Unexpected(format!("{other:?}"))),
                }
            } else {
                out.pages(memory, &dirty, COPY_BATCH_PAGES).await?;
            }
            report.rounds += 1;
        }
    }
    let paused_at = Instant::now();
    runner.pause().await.map_err(vm)?;
    let paused_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    if mode != Mode::Postcopy {
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
    out.message(&Message::Switchover { state, stale }).await?;
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
        Message::Restored => Ok(Stopped { paused_at, final_dirty: dirty, discarded }),
        other => Err(MigrationError::Unexpected(format!("{other:?}"))),
    }
}
