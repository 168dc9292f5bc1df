//! One thread per vCPU: it owns the vCPU fd, runs `KVM_RUN`, decodes exits into
//! device events, and obeys commands (pause, resume, save, stop) between exits.
//!
//! Each pass of its loop, in this order: clear `immediate_exit`, take a
//! command, (with a fence) mark itself entering, arm its deadline timer and
//! check the fence, then enter the guest. Every kick (pause, watchdog, timer)
//! is sent after the condition it signals was set, so a kick that lands before
//! the clear is answered by the checks after it, and one that lands after the
//! clear makes `KVM_RUN` return at once (docs/architecture.md, "Fencing").

use crate::clock::BootTime;
use crate::vmm::devices::{decode_port_write, DeviceEvent, VcpuStatus};
use crate::vmm::dirty::tracker::DirtyTracker;
use crate::vmm::fence::Fence;
use crate::vmm::kvm::kick::{self, DeadlineTimer};
use crate::vmm::kvm::state::VcpuState;
use crate::vmm::kvm::vcpu::{KvmVcpu, VcpuExit};
use crate::vmm::kvm::KvmError;
use crate::vmm::memory::GuestMemory;
use crate::vmm::net::device::NetDevice;
use crate::vmm::net::tap;
use crate::vmm::run_log::RunLog;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest a network idle exit keeps the vCPU out of the guest, whatever the guest asked.
const NET_IDLE_MAX: Duration = Duration::from_millis(100);
/// Console lines kept for failure reports.
const CONSOLE_TAIL_LINES: usize = 4;

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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn spawn(
        vcpu: KvmVcpu,
        memory: Arc<GuestMemory>,
        status: VcpuStatus,
        events: Sender<WorkerEvent>,
        dirty: Arc<dyn DirtyTracker>,
        fence: Option<Arc<Fence>>,
        run_log: Arc<RunLog>,
        net: Option<Arc<Mutex<NetDevice>>>,
    ) -> std::io::Result<Self> {
        kick::install();
        let (commands, rx) = std::sync::mpsc::channel();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        // Its lines carry the span it was started in (a migration's: which VM).
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new().name(format!("vcpu{}", vcpu.id())).spawn(move || {
            let _span = span.entered();
            // SAFETY: gettid(2) has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            let timer = match fence.as_ref().map(|_| DeadlineTimer::for_thread(tid)).transpose() {
                Ok(timer) => timer,
                Err(e) => {
                    let _ = tid_tx.send(Err(e));
                    return;
                }
            };
            let _ = tid_tx.send(Ok(tid));
            let mut vcpu = vcpu;
            // Kicks to this thread now set its vCPU's immediate_exit (unbound before the vCPU closes).
            let kicks = vcpu.bind_kicks_to_this_thread();
            let finished = status != VcpuStatus::Running;
            let fence = fence.map(|fence| Fenced { fence, timer: timer.expect("made with the fence") });
            let worker = Worker {
                _kicks: kicks,
                vcpu,
                memory,
                events,
                dirty,
                fence,
                run_log,
                net,
                console: Vec::new(),
                console_tail: std::collections::VecDeque::new(),
                parked: true,
                finished,
                stuck_ring_exits: 0,
            };
            worker.run(rx)
        })?;
        let tid = tid_rx.recv().map_err(|_| std::io::Error::other("the vCPU thread died at its start"))??;
        Ok(VcpuWorker { commands, thread, tid })
    }
}

struct Worker {
    /// Declared first, so dropped first: the kick handler lets go of the vCPU's
    /// `immediate_exit` before the vCPU (and its kvm_run mapping) goes.
    _kicks: kick::ImmediateExitBinding,
    vcpu: KvmVcpu,
    memory: Arc<GuestMemory>,
    events: Sender<WorkerEvent>,
    /// The machine's dirty tracker: its ring, if it has one, is drained here when this vCPU's ring fills.
    dirty: Arc<dyn DirtyTracker>,
    /// PostCopyFT destination: past the lease's deadline this vCPU never enters the guest again.
    fence: Option<Fenced>,
    /// When this vCPU was in the guest.
    run_log: Arc<RunLog>,
    /// The virtio-net device of a network guest (its MMIO window and idle port are served here).
    net: Option<Arc<Mutex<NetDevice>>>,
    /// The console line being written.
    console: Vec<u8>,
    /// The last console lines, for failure reports.
    console_tail: std::collections::VecDeque<String>,
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

/// A fenced vCPU's lease: the fence, and a kernel timer that kicks this thread at its deadline.
struct Fenced {
    fence: Arc<Fence>,
    timer: DeadlineTimer,
}

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
        let id = self.vcpu.id();
        loop {
            // Before the command and fence checks: a kick that lands after this
            // makes the next KVM_RUN return at once.
            self.vcpu.clear_immediate_exit();
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
            if !self.may_enter() {
                self.finished = true;
                let _ = self
                    .events
                    .send(WorkerEvent::Failed(id, "fenced: the lease expired; this copy never runs again".into()));
                continue;
            }
            let stepped = self.step();
            if let Some(fenced) = &self.fence {
                fenced.fence.left(id);
            }
            if let Err(reason) = stepped {
                self.finished = true;
                let _ = self.events.send(WorkerEvent::Failed(id, reason));
            }
        }
    }

    /// With a fence: marks this vCPU entering (the watchdog kicks marked vCPUs
    /// once it trips the fence), arms the deadline timer, and checks the fence.
    /// False: fenced, never enter again.
    fn may_enter(&mut self) -> bool {
        let id = self.vcpu.id();
        let Some(fenced) = &mut self.fence else { return true };
        fenced.fence.entering(id);
        if let Err(e) = fenced.timer.arm(fenced.fence.deadline()) {
            // The watchdog still kicks; the timer only covers a frozen process.
            tracing::warn!(vcpu = id, "cannot arm the lease timer: {e}");
        }
        if !fenced.fence.allows_running() {
            fenced.fence.left(id);
            return false;
        }
        crate::fault::between_fence_check_and_entry();
        true
    }

    /// Runs the guest to its next exit and handles it.
    ///
    /// Invariant: whenever this returns, no I/O is pending in KVM (an `in` or
    /// `out` completes only on the next `KVM_RUN`, so it is completed here), and
    /// a device event is sent only once its instruction has completed. State
    /// saved while parked is therefore always the state after that instruction.
    fn step(&mut self) -> Result<(), String> {
        let id = self.vcpu.id();
        let entered = BootTime::now();
        self.run_log.entering(id, entered);
        // Read after `entered`: if set now, KVM returns before running the guest.
        let kicked_before_entry = self.vcpu.immediate_exit_set();
        let exit = self.vcpu.run();
        if kicked_before_entry && matches!(exit, Ok(VcpuExit::Interrupted)) {
            // KVM returned before running the guest: no run.
            self.run_log.did_not_run(id);
        } else {
            self.run_log.record_exit(id, entered, BootTime::now());
        }
        let exit = exit.map_err(|e| e.to_string())?;
        let Some(exit) = self.serve_mmio(exit)? else {
            self.stuck_ring_exits = 0;
            return Ok(());
        };
        if matches!(exit, VcpuExit::IoOut { .. } | VcpuExit::IoIn { .. }) {
            self.vcpu.complete_pending_io().map_err(|e| e.to_string())?;
        }
        if !matches!(exit, VcpuExit::DirtyRingFull) {
            self.stuck_ring_exits = 0;
        }
        match exit {
            VcpuExit::Interrupted => {}
            VcpuExit::DirtyRingFull => match self.dirty.ring_full().map_err(|e| e.to_string())? {
                Some(drained) => {
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
                match event {
                    DeviceEvent::Console(byte) => {
                        self.console_byte(byte);
                        return Ok(());
                    }
                    DeviceEvent::NetIdle { timeout_us } => return self.net_idle(timeout_us),
                    DeviceEvent::Panicked => {
                        let said = self.console_tail.back().cloned().unwrap_or_else(|| "(nothing on its console)".into());
                        return Err(self.describe(&format!("the guest panicked: {said}")));
                    }
                    _ => {}
                }
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
            VcpuExit::MmioRead { gpa, .. } | VcpuExit::MmioWrite { gpa, .. } => {
                return Err(self.describe(&format!(
                "the guest accessed {gpa:#x}, which no memory or device backs (a page revoked from a dead copy, or a guest bug)"
            )))
            }
            VcpuExit::Shutdown => return Err(self.describe("the guest shut down (triple fault)")),
            VcpuExit::Unexpected(what) => return Err(self.describe(&format!("unexpected exit {what}"))),
        }
        Ok(())
    }

    /// Serves an access to a device's MMIO window and completes the
    /// instruction (`None`); any other exit is handed back.
    fn serve_mmio(&mut self, exit: VcpuExit) -> Result<Option<VcpuExit>, String> {
        let Some(net) = &self.net else { return Ok(Some(exit)) };
        let gpa = match exit {
            VcpuExit::MmioRead { gpa, .. } | VcpuExit::MmioWrite { gpa, .. } => gpa,
            other => return Ok(Some(other)),
        };
        let Some(offset) = NetDevice::window_offset(gpa) else { return Ok(Some(exit)) };
        match exit {
            VcpuExit::MmioRead { len, .. } => {
                let mut data = [0u8; 8];
                let len = len.min(data.len());
                net.lock().unwrap_or_else(PoisonError::into_inner).mmio_read(offset, &mut data[..len]);
                self.vcpu.set_mmio_read_data(&data[..len]);
            }
            VcpuExit::MmioWrite { data, len, .. } => {
                let mut device = net.lock().unwrap_or_else(PoisonError::into_inner);
                device.mmio_write(offset, &data[..len]).map_err(|e| self.describe(&e.to_string()))?;
            }
            other => return Ok(Some(other)),
        }
        self.vcpu.complete_pending_io().map_err(|e| e.to_string())?;
        Ok(None)
    }

    /// The guest idles: deliver what has arrived, or wait (at most its
    /// timeout, and never past a kick) for a frame it has a buffer for.
    fn net_idle(&mut self, timeout_us: u32) -> Result<(), String> {
        let Some(net) = &self.net else { return Ok(()) };
        let fd = {
            let mut device = net.lock().unwrap_or_else(PoisonError::into_inner);
            // Frames a full output hold left on the transmit queue go now, if it has room.
            device.transmit().map_err(|e| e.to_string())?;
            if device.receive().map_err(|e| e.to_string())? > 0 {
                return Ok(());
            }
            device.can_receive().map_err(|e| e.to_string())?.then(|| device.backend_fd())
        };
        // A kick since the loop's top (a pause, the fence) is answered first.
        if self.vcpu.immediate_exit_set() {
            return Ok(());
        }
        let timeout = Duration::from_micros(u64::from(timeout_us)).min(NET_IDLE_MAX);
        if tap::wait_readable(fd, timeout).map_err(|e| format!("waiting for the tap: {e}"))? {
            net.lock().unwrap_or_else(PoisonError::into_inner).receive().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn console_byte(&mut self, byte: u8) {
        if byte != b'\n' {
            if self.console.len() < 1024 {
                self.console.push(byte);
            }
            return;
        }
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.console)).into_owned();
        tracing::info!(target: "guest", vcpu = self.vcpu.id(), "{line}");
        if self.console_tail.len() == CONSOLE_TAIL_LINES {
            self.console_tail.pop_front();
        }
        self.console_tail.push_back(line);
    }

    /// `what`, with where the guest was: its rip and the instruction bytes there.
    fn describe(&self, what: &str) -> String {
        let Ok(regs) = self.vcpu.regs() else { return what.to_string() };
        let mut code = [0u8; 16];
        // Guest memory is identity-mapped, so the rip is the guest-physical address of the code.
        match self.memory.read(regs.rip, &mut code) {
            Ok(()) => {
                let bytes: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
                format!("{what} at rip={:#x} (code: {})", regs.rip, bytes.join(" "))
            }
            Err(_) => format!("{what} at rip={:#x}", regs.rip),
        }
    }
}
