//! One thread per vCPU: it owns the vCPU fd, runs `KVM_RUN`, decodes exits into
//! device events, and obeys commands (pause, resume, save, stop) between exits.

use crate::devices::{decode_port_write, DeviceEvent, VcpuStatus};
use crate::dirty::RingTracker;
use crate::fence::Fence;
use crate::kvm::kick;
use crate::kvm::state::VcpuState;
use crate::kvm::vcpu::{KvmVcpu, VcpuExit};
use crate::kvm::KvmError;
use crate::memory::GuestMemory;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

pub(crate) enum Command {
    Pause,
    Resume,
    Save(Sender<Result<VcpuState, KvmError>>),
    Stop,
}

/// What a vCPU thread tells the machine, in the order it happened.
#[derive(Debug)]
pub(crate) enum WorkerEvent {
    Device(u8, DeviceEvent),
    /// The vCPU acknowledged a pause and is out of `KVM_RUN` with no I/O pending.
    Paused(u8),
    /// The vCPU cannot go on; it stays parked and still answers commands.
    Failed(u8, String),
}

pub(crate) struct VcpuWorker {
    pub(crate) commands: Sender<Command>,
    pub(crate) thread: JoinHandle<()>,
    /// The thread's kernel id (what BPF programs see as the current pid).
    pub(crate) tid: u32,
}

impl VcpuWorker {
    /// Starts the thread, parked: it enters the guest on the first `Resume`.
    /// A vCPU whose workload is done is never entered again.
    pub(crate) fn spawn(
        vcpu: KvmVcpu,
        memory: Arc<GuestMemory>,
        status: VcpuStatus,
        events: Sender<WorkerEvent>,
        ring: Option<Arc<RingTracker>>,
        fence: Option<Arc<Fence>>,
    ) -> std::io::Result<Self> {
        kick::install();
        let (commands, rx) = std::sync::mpsc::channel();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name(format!("vcpu{}", vcpu.id())).spawn(move || {
            // SAFETY: gettid(2) has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() } as u32);
            let finished = status != VcpuStatus::Running;
            Worker { vcpu, memory, events, ring, fence, parked: true, finished, stuck_ring_exits: 0 }.run(rx)
        })?;
        let tid = tid_rx.recv().map_err(|_| std::io::Error::other("the vCPU thread died at its start"))?;
        Ok(VcpuWorker { commands, thread, tid })
    }
}

struct Worker {
    vcpu: KvmVcpu,
    memory: Arc<GuestMemory>,
    events: Sender<WorkerEvent>,
    /// The machine's dirty-ring tracker, if it uses one: drained here when this vCPU's ring fills.
    ring: Option<Arc<RingTracker>>,
    /// PostCopyFT destination: past the lease's deadline this vCPU never enters the guest again.
    fence: Option<Arc<Fence>>,
    /// Paused by the machine.
    parked: bool,
    /// Done, or failed: never enters the guest again.
    finished: bool,
    /// Ring-full exits in a row whose drain found nothing to hand back.
    stuck_ring_exits: u32,
}

/// Ring-full exits in a row that drain nothing, after which the ring is
/// taken as broken: KVM lost entries when it overflowed (it prints a WARN
/// from dirty_ring.c) and will report it full forever.
const STUCK_RING_EXITS: u32 = 1000;

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
        let id = self.vcpu.id();
        loop {
            let command = if self.parked || self.finished {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                commands.try_recv().ok()
            };
            if let Some(command) = command {
                match command {
                    Command::Pause => {
                        self.parked = true;
                        let _ = self.events.send(WorkerEvent::Paused(id));
                    }
                    Command::Resume => self.parked = false,
                    Command::Save(reply) => {
                        let _ = reply.send(self.vcpu.save_state());
                    }
                    Command::Stop => return,
                }
                continue;
            }
            if self.fence.as_ref().is_some_and(|f| !f.allows_running()) {
                self.finished = true;
                let _ = self
                    .events
                    .send(WorkerEvent::Failed(id, "fenced: the lease expired; this copy never runs again".into()));
                continue;
            }
            if let Err(reason) = self.step() {
                self.finished = true;
                let _ = self.events.send(WorkerEvent::Failed(id, reason));
            }
        }
    }

    /// Runs the guest to its next exit and handles it.
    ///
    /// Invariant: whenever this returns, no I/O is pending in KVM (an `in` or
    /// `out` completes only on the next `KVM_RUN`, so it is completed here), and
    /// a device event is sent only once its instruction has completed. State
    /// saved while parked is therefore always the state after that instruction.
    fn step(&mut self) -> Result<(), String> {
        let id = self.vcpu.id();
        let exit = self.vcpu.run().map_err(|e| e.to_string())?;
        if matches!(exit, VcpuExit::IoOut { .. } | VcpuExit::IoIn { .. }) {
            self.vcpu.complete_pending_io().map_err(|e| e.to_string())?;
        }
        if !matches!(exit, VcpuExit::DirtyRingFull) {
            self.stuck_ring_exits = 0;
        }
        match exit {
            VcpuExit::Interrupted => {}
            VcpuExit::DirtyRingFull => match &self.ring {
                Some(ring) => {
                    let drained = ring.drain().map_err(|e| e.to_string())?;
                    self.stuck_ring_exits = if drained == 0 { self.stuck_ring_exits + 1 } else { 0 };
                    if self.stuck_ring_exits >= STUCK_RING_EXITS {
                        return Err(format!(
                            "vCPU {id}: the dirty ring overflowed and KVM lost entries (see the kernel log): \
                             its drain thread fell behind; use a larger ring or the bitmap tracker"
                        ));
                    }
                }
                None => return Err("dirty ring full, but this machine has no dirty ring".into()),
            },
            VcpuExit::IoOut { port, value } => {
                let event = decode_port_write(&self.memory, id, port, value).map_err(|e| e.to_string())?;
                let _ = self.events.send(WorkerEvent::Device(id, event));
                match event {
                    DeviceEvent::Status(VcpuStatus::Done) => self.finished = true,
                    DeviceEvent::Status(VcpuStatus::BadParams) => {
                        return Err("the guest rejected its parameter block".into())
                    }
                    DeviceEvent::Unclaimed { port, value } => {
                        tracing::debug!(vcpu = id, port, value, "write to an unclaimed port")
                    }
                    _ => {}
                }
            }
            VcpuExit::IoIn { port } => tracing::debug!(vcpu = id, port, "read of an unclaimed port"),
            VcpuExit::Shutdown => return Err(self.describe("the guest shut down (triple fault)")),
            VcpuExit::Unexpected(what) => return Err(self.describe(&format!("unexpected exit {what}"))),
        }
        Ok(())
    }

    fn describe(&self, what: &str) -> String {
        match self.vcpu.regs() {
            Ok(regs) => format!("{what} at rip={:#x}", regs.rip),
            Err(_) => what.to_string(),
        }
    }
}
