//! One thread per VM on an agent: it owns the `Machine`, keeps its device
//! model current (absorbing vCPU events as they come), releases the guest's
//! output to the outside (at once, or held until the caller says so), and
//! carries out commands from the async side of the agent, answering on
//! oneshot channels.

use crate::metrics::{NetTraffic, VmInstance};
use crate::vmm::machine::{Machine, MachineError, MachineEvent, MachineState, Verified, VerifyError};
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::vmm::net::device::Traffic;
use crate::vmm::output::{OutputSink, WrittenMark};
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
    /// Release held output up to this mark (None: all, and hold no more).
    Release(Option<OutputMark>),
}

/// How far a checkpoint's state reaches into the guest's output: its output
/// records and its transmitted network frames. Output up to a committed
/// checkpoint's mark may go out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputMark {
    /// Records of the output log.
    pub records: usize,
    /// Frames the network device took from the guest (`NetDeviceState::tx_frames`).
    pub frames: u64,
}

impl OutputMark {
    pub fn of(devices: &crate::vmm::devices::DeviceState) -> OutputMark {
        OutputMark { records: devices.output_log.len(), frames: devices.net.as_ref().map_or(0, |n| n.tx_frames) }
    }
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
    /// Hold new records and network frames until [`VmRunner::release_outputs`] (PostCopyFT destination).
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
    /// before the first sample, while the tracker cannot see writes (the
    /// bitmap with logging off), and while the guest does not run: paused or
    /// stopped, finished, or failed).
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
    /// How far the released records have been written out.
    written: WrittenMark,
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
        let written = WrittenMark::new(outputs.released as u64);
        let thread_written = written.clone();
        let vm = crate::metrics::get().vm_instance(name);
        if outputs.hold && !crate::fault::output_commit_disabled() {
            machine.hold_net_output();
        }
        let thread = std::thread::Builder::new()
            .name(format!("vm-{name}"))
            .spawn(move || run(&vm, machine, rx, &thread_status, Gate { outputs, written: thread_written }))?;
        Ok(VmRunner {
            name: name.to_string(),
            commands,
            status,
            memory,
            run_log,
            vcpu_threads,
            thread: Some(thread),
            written,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records of the output log released and written out to the output
    /// sink (`RunnerStatus::released` counts those handed to it, which a
    /// process that dies may not have written yet).
    pub fn written_out(&self) -> u64 {
        self.written.get()
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

    /// Releases held output up to `upto` (None: all of it, and from now on
    /// every record and frame at once).
    pub fn release_outputs(&self, upto: Option<OutputMark>) {
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
        // The guest (or a device) wrote these pages: they are there.
        machine.memory().read_present(*gpa, page)?;
    }
    let state = machine.capture()?;
    if was_running {
        machine.resume()?;
    }
    Ok(CheckpointCapture { dirty, data, state, pause: paused_at.elapsed() })
}

/// The runner thread's output gate, and how far its released records were written out.
struct Gate {
    outputs: OutputGate,
    written: WrittenMark,
}

/// Releases the output log's records from `gate.released` up to `upto` (capped at the log).
fn release(name: &str, machine: &Machine, gate: &mut Gate, upto: usize, status: &Mutex<RunnerStatus>) {
    let Gate { outputs: gate, written } = gate;
    let log = &machine.devices().output_log;
    let upto = upto.min(log.len());
    let records = log.get(gate.released..upto).unwrap_or_default();
    for (i, record) in records.iter().enumerate() {
        gate.sink.release_marked(name, record, written, (gate.released + i + 1) as u64);
    }
    let m = crate::metrics::get();
    m.vm(&m.output_released, name, records.len() as u64);
    gate.released = gate.released.max(upto);
    status.lock().expect("runner status lock").released = gate.released as u64;
}

/// Lets the network device's held frames out up to `upto` (None: all, and hold no more).
fn release_frames(vm: &VmInstance, machine: &Machine, upto: Option<u64>) {
    match machine.release_net_output(upto) {
        Ok(Some((released, held))) => {
            let max_hold = released.max_hold.as_secs_f64();
            crate::metrics::get().net_released(vm, released.frames, max_hold, held.frames, held.bytes);
        }
        // No network device: no frames, and no metric series for this VM.
        Ok(None) => {}
        Err(e) => tracing::warn!(vm = vm.vm(), "cannot release the network output: {e}"),
    }
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
/// Only a guest that runs has a rate: a paused, finished or failed one has
/// none (the sample still moves the tracker's baseline, so that a guest that
/// runs again is not measured across its pause).
fn sample_dirty_rate(vm: &VmInstance, machine: &Machine, status: &Mutex<RunnerStatus>) {
    let sampled = machine.sample_dirty_rate();
    let mut status = status.lock().expect("runner status lock");
    if !machine.is_running() || status.finished || status.error.is_some() {
        status.dirty_rate_bytes_per_second = None;
        return;
    }
    match sampled {
        Ok(rate) => {
            if let Some(rate) = rate {
                crate::metrics::get().dirty_rate_sampled(vm, machine.dirty_tracker(), rate);
            }
            status.dirty_rate_bytes_per_second = rate;
        }
        Err(e) => tracing::warn!(vm = vm.vm(), "cannot sample the dirty rate: {e}"),
    }
}

/// Samples a network VM's traffic over the last `seconds` (since `last`, which it updates).
fn sample_net_traffic(vm: &VmInstance, machine: &Machine, seconds: f64, last: &mut Traffic) {
    let Some((now, held)) = machine.take_net_traffic() else { return };
    let traffic = NetTraffic {
        received: now.received.saturating_sub(last.received),
        sent: now.sent.saturating_sub(last.sent),
        longest_quiet: now.longest_quiet,
        held_frames: held.frames as u64,
    };
    *last = now;
    if machine.is_running() {
        crate::metrics::get().net_traffic(vm, seconds, traffic);
    }
}

fn run(
    vm: &VmInstance,
    mut machine: Machine,
    commands: mpsc::Receiver<Command>,
    status: &Mutex<RunnerStatus>,
    mut gate: Gate,
) {
    let mut last_sample = Instant::now();
    let mut last_traffic = machine.take_net_traffic().map(|(traffic, _)| traffic).unwrap_or_default();
    loop {
        if last_sample.elapsed() >= RATE_INTERVAL {
            let seconds = last_sample.elapsed().as_secs_f64();
            sample_dirty_rate(vm, &machine, status);
            sample_net_traffic(vm, &machine, seconds, &mut last_traffic);
            last_sample = Instant::now();
        }
        match commands.recv_timeout(PUMP_INTERVAL) {
            Ok(command) => obey(vm, &mut machine, command, status, &mut gate),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        absorb_events(vm.vm(), &mut machine, status, &mut gate);
    }
    // Stopped: the machine goes with this thread.
    status.lock().expect("runner status lock").dirty_rate_bytes_per_second = None;
}

/// Carries out one command from the async side.
fn obey(vm: &VmInstance, machine: &mut Machine, command: Command, status: &Mutex<RunnerStatus>, gate: &mut Gate) {
    let metrics = crate::metrics::get();
    match command {
        Command::Pause(r) => {
            let paused = machine.pause().map_err(text);
            if !machine.is_running() {
                // Paused (a migration's stop, a stopped VM): no rate until it runs
                // again, and none from before the caller hears of the pause.
                status.lock().expect("runner status lock").dirty_rate_bytes_per_second = None;
            }
            drop(r.send(paused))
        }
        Command::Resume(r) => drop(r.send(machine.resume().map_err(text))),
        Command::Capture(r) => drop(r.send(machine.capture().map_err(text))),
        Command::DirtyLogging(on, r) => drop(r.send(machine.set_dirty_logging(on).map_err(text))),
        Command::TakeDirty(r) => {
            let taken = machine.take_dirty_pages().map_err(text);
            if let Ok(pages) = &taken {
                metrics.dirty_taken(vm, machine.dirty_tracker(), pages.len());
            }
            drop(r.send(taken))
        }
        Command::Verify(r) => drop(r.send(machine.verify().map_err(RunnerError::Verify))),
        Command::Checkpoint(epoch, r) => {
            let capture = checkpoint(machine, epoch).map_err(text);
            if let Ok(c) = &capture {
                metrics.dirty_taken(vm, machine.dirty_tracker(), c.dirty.len());
            }
            drop(r.send(capture))
        }
        Command::Release(_) if !machine.output_may_leave() => {
            // A copy past its lease (e.g. an ack read on waking from a freeze):
            // the source may run the VM now, and re-releases what was not reported.
            tracing::warn!(vm = vm.vm(), "held output not released: this copy's lease ran out (it is fenced)");
        }
        Command::Release(upto) => {
            if upto.is_none() {
                gate.outputs.hold = false;
            }
            release(vm.vm(), machine, gate, upto.map_or(usize::MAX, |m| m.records), status);
            release_frames(vm, machine, upto.map(|m| m.frames));
        }
    }
}

/// Absorbs what the vCPUs reported: output records reach the outside here.
fn absorb_events(name: &str, machine: &mut Machine, status: &Mutex<RunnerStatus>, gate: &mut Gate) {
    loop {
        match machine.next_event(Duration::ZERO) {
            Ok(Some(MachineEvent::Output(_))) => {
                status.lock().expect("runner status lock").records += 1;
                if !gate.outputs.hold {
                    release(name, machine, gate, usize::MAX, status);
                }
            }
            Ok(Some(MachineEvent::VcpuDone(_))) => {
                let mut status = status.lock().expect("runner status lock");
                status.finished = machine.is_finished();
                if status.finished {
                    status.dirty_rate_bytes_per_second = None;
                }
            }
            Ok(Some(MachineEvent::Serving)) => tracing::info!(vm = name, "the guest serves on its network"),
            Ok(None) => break,
            Err(e) => {
                let mut status = status.lock().expect("runner status lock");
                log_failure(name, &e, machine.fenced(), status.error.is_none());
                status.error = Some(e.to_string());
                status.dirty_rate_bytes_per_second = None;
                break;
            }
        }
    }
}

/// Logs a vCPU's failure. On a copy its fence stopped for good (a PostCopyFT
/// destination whose lease ran out or whose migration failed: the source
/// recovers the VM) the vCPUs failing is how it is meant to end: a warning for
/// the first, the rest at debug. Any other failure is an error.
fn log_failure(name: &str, e: &MachineError, fenced: bool, first: bool) {
    match (fenced, first) {
        (true, true) => tracing::warn!(
            vm = %name,
            "this copy of the VM is stopped for good (fenced), as designed when a PostCopyFT migration fails here: \
             the source recovers the VM from its last committed checkpoint ({e})"
        ),
        (true, false) => tracing::debug!(vm = %name, "fenced copy: {e}"),
        (false, _) => tracing::error!(vm = %name, "VM failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::machine::tests::config;
    use vm_fixtures::FixtureKind;

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
    }

    /// A runner of a ledger guest of `steps` steps on one vCPU, running, with dirty logging on.
    fn running(name: &str, steps: u64) -> VmRunner {
        let machine = Machine::boot(config(FixtureKind::Ledger, 1, steps)).unwrap();
        let gate = OutputGate { sink: OutputSink::log_only("test"), released: 0, hold: false };
        let runner = VmRunner::spawn(name, machine, gate).unwrap();
        block_on(runner.set_dirty_logging(true)).unwrap();
        block_on(runner.resume()).unwrap();
        runner
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn gauge_of(vm: &str) -> Option<String> {
        let series = format!(r#"pcft_vm_dirty_rate_bytes_per_second{{vm="{vm}""#);
        crate::metrics::get().encode().lines().find(|l| l.starts_with(&series)).map(str::to_string)
    }

    /// A guest that runs has a rate; paused, it has none (until it runs again);
    /// and once its VM left, its runner sets the gauge no more, though it runs on.
    #[test]
    fn only_a_running_guest_has_a_dirty_rate_and_a_vm_that_left_has_no_gauge() {
        let name = "runner-test-running";
        let runner = running(name, 50_000_000);
        let rate = || runner.status().dirty_rate_bytes_per_second;
        wait_until("the first sample", || rate().is_some());
        assert!(gauge_of(name).is_some());
        block_on(runner.pause()).unwrap();
        assert_eq!(rate(), None, "a paused guest writes nothing: no rate");
        std::thread::sleep(RATE_INTERVAL + Duration::from_millis(200));
        assert_eq!(rate(), None, "nor after the next sample");
        block_on(runner.resume()).unwrap();
        wait_until("a sample after the resume", || rate().is_some());

        crate::metrics::get().vm_left(name);
        assert_eq!(gauge_of(name), None);
        std::thread::sleep(RATE_INTERVAL + Duration::from_millis(300));
        assert_eq!(gauge_of(name), None, "set again by the runner of a VM that left");
    }

    /// What this test binary logs at INFO and above, as text (installed once, for every test).
    fn logs() -> &'static Mutex<Vec<u8>> {
        static LOGS: std::sync::OnceLock<&'static Mutex<Vec<u8>>> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::default());
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::INFO)
                .with_ansi(false)
                .with_writer(move || Writer(logs))
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("no other test sets one");
            logs
        })
    }

    struct Writer(&'static Mutex<Vec<u8>>);

    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A copy whose fence stops it (a PostCopyFT destination whose lease ran
    /// out) is meant to end with its vCPUs failing: one warning that says so,
    /// not an error per vCPU (issue 15: the fenced destination logged ERROR).
    #[test]
    fn a_fenced_copys_vcpus_failing_is_one_warning_not_an_error() {
        let logs = logs();
        let name = "runner-test-fenced";
        let (prepared, state, fence) = crate::vmm::machine::tests::fenced_copy(Duration::from_millis(100));
        let gate = OutputGate { sink: OutputSink::log_only("test"), released: 0, hold: true };
        let runner = VmRunner::spawn(name, prepared.restore(state).unwrap(), gate).unwrap();
        block_on(runner.resume()).unwrap();
        wait_until("the fence stops the copy", || runner.status().error.is_some());
        std::thread::sleep(Duration::from_millis(100));
        assert!(fence.tripped());
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&format!("vm={name}"))).collect();
        assert!(!lines.iter().any(|l| l.contains("ERROR")), "{lines:#?}");
        let warnings: Vec<&&str> = lines.iter().filter(|l| l.contains(" WARN ")).collect();
        assert_eq!(warnings.len(), 1, "one warning for the copy, not one per vCPU: {lines:#?}");
        assert!(warnings[0].contains("stopped for good (fenced), as designed"), "{lines:#?}");
        assert!(warnings[0].contains("the source recovers the VM"), "{lines:#?}");
    }

    /// A copy past its lease lets none of its held output out, even when told
    /// to (an ack it reads on waking from a freeze): the source may be running
    /// the VM and answering the same clients by then. Before the fix, the
    /// release went out: a destination continued after a freeze sent frames
    /// after the recovered source had answered (the kv demo's capture saw it).
    #[test]
    fn a_copy_past_its_lease_releases_no_held_output() {
        let name = "runner-test-past-lease";
        let (prepared, state, fence) = crate::vmm::machine::tests::fenced_copy(Duration::from_millis(300));
        let gate = OutputGate { sink: OutputSink::log_only("test"), released: 0, hold: true };
        let runner = VmRunner::spawn(name, prepared.restore(state).unwrap(), gate).unwrap();
        block_on(runner.resume()).unwrap();
        wait_until("the fence stops the copy", || runner.status().error.is_some());
        assert!(fence.tripped());
        let held = runner.status().records;
        assert!(held > 0, "the guest wrote records while it ran");
        runner.release_outputs(None);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(runner.status().released, 0, "{held} held records, none may leave a fenced copy");
    }

    /// A finished guest has no rate, in the status or the gauge.
    #[test]
    fn a_finished_guest_has_no_dirty_rate() {
        let name = "runner-test-finished";
        let runner = running(name, 3_000);
        wait_until("the guest finished", || runner.status().finished);
        assert_eq!(runner.status().dirty_rate_bytes_per_second, None);
        std::thread::sleep(RATE_INTERVAL + Duration::from_millis(200));
        assert_eq!(runner.status().dirty_rate_bytes_per_second, None, "a sample after the end");
        assert_eq!(gauge_of(name), None, "{:?}", gauge_of(name));
    }
}
