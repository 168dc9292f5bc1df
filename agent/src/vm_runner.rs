//! One thread per VM on an agent: it owns the `Machine`, keeps its device
//! model current (absorbing vCPU events as they come), and carries out
//! commands from the async side of the agent, answering on oneshot channels.

use crate::machine::{Machine, MachineError, MachineEvent, MachineState, Verified};
use crate::memory::GuestMemory;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Command {
    Pause(Reply<()>),
    Resume(Reply<()>),
    Capture(Reply<MachineState>),
    DirtyLogging(bool, Reply<()>),
    TakeDirty(Reply<Vec<u64>>),
    Verify(Reply<Verified>),
}

/// What the async side can read without a round trip.
#[derive(Clone, Debug, Default)]
pub struct RunnerStatus {
    pub records: u64,
    pub finished: bool,
    pub error: Option<String>,
}

pub struct VmRunner {
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<RunnerStatus>>,
    memory: Arc<GuestMemory>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the runner looks at vCPU events while no command comes.
const PUMP_INTERVAL: Duration = Duration::from_millis(2);

impl VmRunner {
    /// Takes over `machine` (running or paused) on a thread of its own.
    pub fn spawn(name: &str, machine: Machine) -> std::io::Result<VmRunner> {
        let (commands, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(RunnerStatus {
            records: machine.devices().output_log.len() as u64,
            finished: machine.is_finished(),
            error: None,
        }));
        let memory = machine.memory_handle();
        let thread_status = Arc::clone(&status);
        let vm = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("vm-{name}"))
            .spawn(move || run(vm, machine, rx, thread_status))?;
        Ok(VmRunner { commands, status, memory, thread: Some(thread) })
    }

    pub fn status(&self) -> RunnerStatus {
        self.status.lock().expect("runner status lock").clone()
    }

    pub fn memory(&self) -> Arc<GuestMemory> {
        Arc::clone(&self.memory)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).map_err(|_| "the VM thread is gone".to_string())?;
        rx.await.map_err(|_| "the VM thread is gone".to_string())?
    }

    pub async fn pause(&self) -> Result<(), String> {
        self.call(Command::Pause).await
    }

    pub async fn resume(&self) -> Result<(), String> {
        self.call(Command::Resume).await
    }

    pub async fn capture(&self) -> Result<MachineState, String> {
        self.call(Command::Capture).await
    }

    pub async fn set_dirty_logging(&self, enabled: bool) -> Result<(), String> {
        self.call(|r| Command::DirtyLogging(enabled, r)).await
    }

    pub async fn take_dirty_pages(&self) -> Result<Vec<u64>, String> {
        self.call(Command::TakeDirty).await
    }

    pub async fn verify(&self) -> Result<Verified, String> {
        self.call(Command::Verify).await
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

fn text(e: MachineError) -> String {
    e.to_string()
}

fn run(name: String, mut machine: Machine, commands: mpsc::Receiver<Command>, status: Arc<Mutex<RunnerStatus>>) {
    loop {
        match commands.recv_timeout(PUMP_INTERVAL) {
            Ok(command) => match command {
                Command::Pause(r) => drop(r.send(machine.pause().map_err(text))),
                Command::Resume(r) => drop(r.send(machine.resume().map_err(text))),
                Command::Capture(r) => drop(r.send(machine.capture().map_err(text))),
                Command::DirtyLogging(on, r) => drop(r.send(machine.set_dirty_logging(on).map_err(text))),
                Command::TakeDirty(r) => drop(r.send(machine.take_dirty_pages().map_err(text))),
                Command::Verify(r) => drop(r.send(machine.verify().map_err(|e| e.to_string()))),
            },
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Absorb what the vCPUs reported: output records reach the outside here.
        loop {
            match machine.next_event(Duration::ZERO) {
                Ok(Some(MachineEvent::Output(record))) => {
                    tracing::info!(vm = %name, vcpu = record.vcpu, step = record.step, digest = format_args!("{:#018x}", record.digest), "output");
                    status.lock().expect("runner status lock").records += 1;
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
