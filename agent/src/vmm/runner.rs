//! One thread per VM on an agent: it owns the `Machine`, keeps its device
//! model current (absorbing vCPU events as they come), releases the guest's
//! output to the outside (at once, or held until the caller says so), and
//! carries out commands from the async side of the agent, answering on
//! oneshot channels.

use crate::vmm::machine::{Machine, MachineError, MachineEvent, MachineState, Verified, VerifyError};
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::vmm::output::OutputSink;
use crate::vmm::run_log::RunLog;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Reply<T> = oneshot::Sender<Result<T, RunnerError>>;

/// Why a command to a VM's runner failed.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("the VM's runner thread is gone (the VM stopped)")]
    Gone,
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

enum Command {
    Pause(Reply<()>),
    Resume(Reply<()>),
    Capture(Reply<MachineState>),
    DirtyLogging(bool, Reply<()>),
    TakeDirty(Reply<Vec<u64>>),
    Verify(Reply<Verified>),
    Checkpoint(u64, Reply<CheckpointCapture>),
    /// Release held output up to this many records of the output log (None: all, and hold no more).
    Release(Option<usize>),
}

/// What a checkpoint's pause took from the machine.
pub struct CheckpointCapture {
    /// Pages written since the last take, sorted.
    pub dirty: Vec<u64>,
    /// Their contents at the pause, `PAGE_SIZE` bytes each, in `dirty` order.
    pub data: Vec<u8>,
    pub state: MachineState,
    /// How long the vCPUs stood still.
    pub pause: Duration,
}

/// How a runner lets the guest's output out.
pub struct OutputGate {
    pub sink: OutputSink,
    /// Records of the output log already released (by this agent or before the VM came here).
    pub released: usize,
    /// Hold new records until [`VmRunner::release_outputs`] (PostCopyFT destination).
    pub hold: bool,
}

/// What the async side can read without a round trip.
#[derive(Clone, Debug, Default)]
pub struct RunnerStatus {
    pub records: u64,
    /// Records of the output log released to the outside.
    pub released: u64,
    pub finished: bool,
    pub error: Option<String>,
    /// The VM's dirty tracker (`bitmap`, `ring` or `ebpf`).
    pub dirty_tracker: &'static str,
    /// The dirty rate sampled last, in bytes per second (once a second; `None`
    /// before the first sample, or while the tracker cannot see writes: the
    /// bitmap with logging off).
    pub dirty_rate_bytes_per_second: Option<f64>,
}

pub struct VmRunner {
    name: String,
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<RunnerStatus>>,
    memory: Arc<GuestMemory>,
    run_log: Arc<RunLog>,
    /// The vCPU threads' kernel ids, by vCPU.
    vcpu_threads: Vec<u32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the runner looks at vCPU events while no command comes.
const PUMP_INTERVAL: Duration = Duration::from_millis(2);

impl VmRunner {
    /// Takes over `machine` (running or paused) on a thread of its own.
    pub fn spawn(name: &str, machine: Machine, outputs: OutputGate) -> std::io::Result<VmRunner> {
        let (commands, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(RunnerStatus {
            records: machine.devices().output_log.len() as u64,
            released: outputs.released as u64,
            finished: machine.is_finished(),
            error: None,
            dirty_tracker: machine.dirty_tracker(),
            dirty_rate_bytes_per_second: None,
        }));
        let memory = machine.memory_handle();
        let run_log = machine.run_log();
        let vcpu_threads = machine.vcpu_threads();
        let thread_status = Arc::clone(&status);
        let vm = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("vm-{name}"))
            .spawn(move || run(vm, machine, rx, thread_status, outputs))?;
        Ok(VmRunner { name: name.to_string(), commands, status, memory, run_log, vcpu_threads, thread: Some(thread) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn status(&self) -> RunnerStatus {
        self.status.lock().expect("runner status lock").clone()
    }

    pub fn memory(&self) -> Arc<GuestMemory> {
        Arc::clone(&self.memory)
    }

    /// When the VM's vCPUs were in the guest.
    pub fn run_log(&self) -> Arc<RunLog> {
        Arc::clone(&self.run_log)
    }

    /// The vCPU threads' kernel ids, by vCPU.
    pub fn vcpu_threads(&self) -> &[u32] {
        &self.vcpu_threads
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, RunnerError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).map_err(|_| RunnerError::Gone)?;
        rx.await.map_err(|_| RunnerError::Gone)?
    }

    pub async fn pause(&self) -> Result<(), RunnerError> {
        self.call(Command::Pause).await
    }

    pub async fn resume(&self) -> Result<(), RunnerError> {
        self.call(Command::Resume).await
    }

    pub async fn capture(&self) -> Result<MachineState, RunnerError> {
        self.call(Command::Capture).await
    }

    pub async fn set_dirty_logging(&self, enabled: bool) -> Result<(), RunnerError> {
        self.call(|r| Command::DirtyLogging(enabled, r)).await
    }

    pub async fn take_dirty_pages(&self) -> Result<Vec<u64>, RunnerError> {
        self.call(Command::TakeDirty).await
    }

    pub async fn verify(&self) -> Result<Verified, RunnerError> {
        self.call(Command::Verify).await
    }

    /// Pauses the VM, takes the pages written since the last take with their
    /// contents and the whole machine state, and resumes it: the pause of a
    /// PostCopyFT checkpoint, all on the VM's thread so that it stays short.
    pub async fn checkpoint(&self, epoch: u64) -> Result<CheckpointCapture, RunnerError> {
        self.call(|r| Command::Checkpoint(epoch, r)).await
    }

    /// Releases held output up to `upto` records of the output log (None: all of
    /// it, and from now on every record at once).
    pub fn release_outputs(&self, upto: Option<usize>) {
        let _ = self.commands.send(Command::Release(upto));
    }
}

fn checkpoint(machine: &mut Machine, epoch: u64) -> Result<CheckpointCapture, MachineError> {
    let paused_at = Instant::now();
    let was_running = machine.is_running();
    machine.pause()?;
    crate::fault::crash::at(crate::fault::crash::CrashPoint::Pause(epoch));
    let dirty = machine.take_dirty_pages()?;
    let mut data = vec![0u8; dirty.len() * PAGE_SIZE as usize];
    for (gpa, page) in dirty.iter().zip(data.chunks_exact_mut(PAGE_SIZE as usize)) {
        machine.memory().read(*gpa, page)?;
    }
    let state = machine.capture()?;
    if was_running {
        machine.resume()?;
    }
    Ok(CheckpointCapture { dirty, data, state, pause: paused_at.elapsed() })
}

/// Releases the output log's records from `gate.released` up to `upto` (capped at the log).
fn release(name: &str, machine: &Machine, gate: &mut OutputGate, upto: usize, status: &Mutex<RunnerStatus>) {
    let log = &machine.devices().output_log;
    let upto = upto.min(log.len());
    let records = log.get(gate.released..upto).unwrap_or_default();
    for record in records {
        gate.sink.release(name, record);
    }
    let m = crate::metrics::get();
    m.vm(&m.output_released, name, records.len() as u64);
    gate.released = gate.released.max(upto);
    status.lock().expect("runner status lock").released = gate.released as u64;
}

impl Drop for VmRunner {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which drops (stops) the machine.
        let (dead, _) = mpsc::channel();
        self.commands = dead;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn text(e: MachineError) -> RunnerError {
    RunnerError::Machine(e)
}

/// How often a VM samples its dirty rate.
const RATE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples the machine's dirty rate into `status` and the metrics (a rate the
/// tracker cannot see now clears the status's and leaves the metric alone).
fn sample_dirty_rate(name: &str, machine: &Machine, status: &Mutex<RunnerStatus>) {
    match machine.sample_dirty_rate() {
        Ok(rate) => {
            if let Some(rate) = rate {
                crate::metrics::get().dirty_rate_sampled(name, machine.dirty_tracker(), rate);
            }
            status.lock().expect("runner status lock").dirty_rate_bytes_per_second = rate;
        }
        Err(e) => tracing::warn!(vm = %name, "cannot sample the dirty rate: {e}"),
    }
}

fn run(
    name: String,
    mut machine: Machine,
    commands: mpsc::Receiver<Command>,
    status: Arc<Mutex<RunnerStatus>>,
    mut gate: OutputGate,
) {
    let mut last_sample = Instant::now();
    loop {
        if last_sample.elapsed() >= RATE_INTERVAL {
            sample_dirty_rate(&name, &machine, &status);
            last_sample = Instant::now();
        }
        match commands.recv_timeout(PUMP_INTERVAL) {
            Ok(command) => match command {
                Command::Pause(r) => drop(r.send(machine.pause().map_err(text))),
                Command::Resume(r) => drop(r.send(machine.resume().map_err(text))),
                Command::Capture(r) => drop(r.send(machine.capture().map_err(text))),
                Command::DirtyLogging(on, r) => drop(r.send(machine.set_dirty_logging(on).map_err(text))),
                Command::TakeDirty(r) => {
                    let taken = machine.take_dirty_pages().map_err(text);
                    if let Ok(pages) = &taken {
                        crate::metrics::get().dirty_taken(&name, machine.dirty_tracker(), pages.len());
                    }
                    drop(r.send(taken))
                }
                Command::Verify(r) => drop(r.send(machine.verify().map_err(RunnerError::Verify))),
                Command::Checkpoint(epoch, r) => {
                    let capture = checkpoint(&mut machine, epoch).map_err(text);
                    if let Ok(c) = &capture {
                        crate::metrics::get().dirty_taken(&name, machine.dirty_tracker(), c.dirty.len());
                    }
                    drop(r.send(capture))
                }
                Command::Release(upto) => {
                    if upto.is_none() {
                        gate.hold = false;
                    }
                    release(&name, &machine, &mut gate, upto.unwrap_or(usize::MAX), &status);
                }
            },
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Absorb what the vCPUs reported: output records reach the outside here.
        loop {
            match machine.next_event(Duration::ZERO) {
                Ok(Some(MachineEvent::Output(_))) => {
                    status.lock().expect("runner status lock").records += 1;
                    if !gate.hold {
                        release(&name, &machine, &mut gate, usize::MAX, &status);
                    }
                }
                Ok(Some(MachineEvent::VcpuDone(_))) => {
                    status.lock().expect("runner status lock").finished = machine.is_finished();
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(vm = %name, "VM failed: {e}");
                    status.lock().expect("runner status lock").error = Some(e.to_string());
                    break;
                }
            }
        }
    }
}
