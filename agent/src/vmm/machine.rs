//! A running fixture VM: guest memory, the KVM VM, one worker thread per vCPU,
//! and the device model. It boots fresh or from a snapshot, runs, pauses,
//! captures its whole state, and checks the guest against the fixture's oracle.

use crate::vmm::boot::{self, BootError};
use crate::vmm::devices::{DeviceEvent, DeviceState, VcpuStatus};
use crate::vmm::dirty::tracker::{DirtyError, DirtyTracker};
use crate::vmm::dirty::tracking::DirtyTracking;
use crate::vmm::fence::{Fence, Watchdog};
use crate::vmm::kvm::kick;
use crate::vmm::kvm::vcpu::KvmVcpu;
use crate::vmm::kvm::vm::KvmVm;
use crate::vmm::kvm::KvmError;
use crate::vmm::memory::{GuestMemory, MemoryError};
use crate::vmm::net::device::{HoldLevel, NetDevice, NetDeviceState, NetError, Released, Traffic};
use crate::vmm::net::provision::{HostTap, ProvisionError};
use crate::vmm::net::tap::{Tap, TapError};
use crate::vmm::run_log::RunLog;
use crate::vmm::snapshot::{self, SnapshotError, SnapshotReader, SnapshotStats};
pub use crate::vmm::state::{MachineConfig, MachineState};
use crate::vmm::vcpu_worker::{Command, VcpuWorker, WorkerEvent};
use serde::Serialize;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use vm_fixtures::{MemoryMismatch, OutputMismatch, OutputRecord, ParamsError};

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("invalid fixture parameters: {0}")]
    Params(#[from] ParamsError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("vCPU {vcpu} failed: {reason}")]
    VcpuFailed { vcpu: u8, reason: String },
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("vCPU {0} thread is gone")]
    WorkerGone(u8),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the captured state is of another machine configuration than the one prepared for it")]
    ConfigMismatch,
    #[error("snapshot has {found} vCPU states for a {expected}-vCPU machine")]
    VcpuCount { expected: usize, found: usize },
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error("fault injection: {0}")]
    Injected(&'static str),
    #[error("the {fixture} fixture needs a tap for its network: give it one (--net tap)")]
    NoTap { fixture: &'static str },
    #[error("the {fixture} fixture has no network device: it takes no tap")]
    TapNotServed { fixture: &'static str },
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Net(#[from] NetError),
}

/// Something that happened in the machine, for the caller to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineEvent {
    Output(OutputRecord),
    VcpuDone(u8),
    /// A network guest serves on its port.
    Serving,
}

/// Why a finished run does not match the oracle.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the workload is not finished: vCPU statuses {0:?}")]
    NotFinished(Vec<VcpuStatus>),
    #[error(transparent)]
    Memory(#[from] MemoryMismatch),
    #[error(transparent)]
    Output(#[from] OutputMismatch),
    #[error("cannot read guest memory: {0}")]
    Read(#[from] MemoryError),
}

/// A run that matched the oracle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub memory_digest: u64,
    pub records: usize,
}

/// A machine built for a restore, waiting for its state (see [`Machine::prepare`]).
pub struct PreparedMachine {
    config: MachineConfig,
    memory: Arc<GuestMemory>,
    vm: Arc<KvmVm>,
    vcpus: Vec<KvmVcpu>,
    /// The machine's dirty tracker; handed to the machine by [`restore`](Self::restore).
    dirty: Option<Arc<dyn DirtyTracker>>,
    fence: Option<Arc<Fence>>,
}

impl PreparedMachine {
    /// The restored machine's vCPUs will never run past `fence`'s deadline (a
    /// PostCopyFT destination's lease); a watchdog kicks them out at the deadline.
    pub fn set_fence(&mut self, fence: Arc<Fence>) {
        self.fence = Some(fence);
    }

    /// Starts dirty logging before the machine runs at all (a PostCopyFT
    /// destination, so that every guest write there is in some checkpoint).
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), MachineError> {
        match &self.dirty {
            Some(dirty) => Ok(dirty.set_logging(enabled)?),
            None => Ok(()),
        }
    }

    /// Applies a captured state; the machine comes up paused exactly where the captured one was.
    pub fn restore(mut self, state: MachineState) -> Result<Machine, MachineError> {
        let MachineState { config: captured, vcpus: vcpu_states, kernel, devices } = state;
        if captured != self.config {
            return Err(MachineError::ConfigMismatch);
        }
        let count = self.vcpus.len();
        if vcpu_states.len() != count || devices.vcpu_status.len() != count {
            return Err(MachineError::VcpuCount { expected: count, found: vcpu_states.len() });
        }
        let mut vcpus = std::mem::take(&mut self.vcpus);
        for (vcpu, vcpu_state) in vcpus.iter_mut().zip(&vcpu_states) {
            vcpu.restore_state(vcpu_state)?;
        }
        self.vm.restore_state(&kernel)?;
        let statuses = devices.vcpu_status.clone();
        Machine::start(MachineParts {
            config: self.config.clone(),
            memory: Arc::clone(&self.memory),
            vm: Arc::clone(&self.vm),
            dirty: self.dirty.take().expect("a prepared machine is restored once"),
            vcpus: vcpus.into_iter().zip(statuses).collect(),
            devices,
            fence: self.fence.take(),
        })
    }
}

impl Drop for PreparedMachine {
    fn drop(&mut self) {
        // Never restored (a migration that failed before the switchover): end the tracker's thread.
        if let Some(dirty) = self.dirty.take() {
            dirty.stop();
        }
    }
}

/// What a boot and a restore hand to [`Machine::start`]: a built VM, its
/// tracker, and its vCPUs set up, each with the status it starts in.
struct MachineParts {
    config: MachineConfig,
    memory: Arc<GuestMemory>,
    vm: Arc<KvmVm>,
    dirty: Arc<dyn DirtyTracker>,
    vcpus: Vec<(KvmVcpu, VcpuStatus)>,
    devices: DeviceState,
    fence: Option<Arc<Fence>>,
}

const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
const KICK_INTERVAL: Duration = Duration::from_millis(1);

pub struct Machine {
    config: MachineConfig,
    memory: Arc<GuestMemory>,
    vm: Arc<KvmVm>,
    workers: Vec<VcpuWorker>,
    events: Receiver<WorkerEvent>,
    devices: DeviceState,
    /// Events taken off the channel (while pausing) that the caller has not seen yet.
    pending: VecDeque<MachineEvent>,
    /// vCPU failures seen while pausing, for the caller's next [`next_event`](Self::next_event)s.
    failures: VecDeque<MachineError>,
    running: bool,
    /// Where dirty pages and the dirty rate come from (bitmap, ring or eBPF).
    dirty: Arc<dyn DirtyTracker>,
    /// PostCopyFT destination: kicks the vCPUs out when the lease runs out.
    watchdog: Option<Watchdog>,
    /// PostCopyFT destination: the lease, as the vCPUs enforce it.
    fence: Option<Arc<Fence>>,
    /// When each vCPU was in the guest (the "one copy at a time" check).
    run_log: Arc<RunLog>,
    /// Network guests: the virtio-net device (its state goes into `devices.net` at a capture).
    net: Option<Arc<Mutex<NetDevice>>>,
    /// Network guests: the tap, removed after the device (declared after it) if this machine made it.
    _host_tap: Option<HostTap>,
    /// A restored network guest announces where it is when it first runs (the address follows the VM).
    announce_on_resume: bool,
}

impl Machine {
    /// Builds a fresh machine with the fixture loaded, its vCPUs parked at the entry point.
    pub fn boot(config: MachineConfig) -> Result<Machine, MachineError> {
        Self::boot_with(config, DirtyTracking::Bitmap)
    }

    /// [`boot`](Self::boot) with a choice of dirty tracker.
    pub fn boot_with(mut config: MachineConfig, tracking: DirtyTracking) -> Result<Machine, MachineError> {
        config.fixture.validate()?;
        let memory = Arc::new(GuestMemory::new(config.mem_bytes, config.slot_bytes)?);
        let vm = Self::create_vm(&memory)?;
        let (vcpus, dirty) = Self::create_vcpus(&vm, &memory, config.vcpus(), tracking)?;
        let booted = Self::boot_vcpus(&mut config, &memory, vcpus);
        let vcpus = match booted {
            Ok(vcpus) => vcpus,
            Err(e) => {
                dirty.stop();
                return Err(e);
            }
        };
        let devices = DeviceState::new(config.vcpus());
        Self::start(MachineParts { config, memory, vm, dirty, vcpus, devices, fence: None })
    }

    /// Completes `config` (a paced guest's TSC ticks per write), writes the
    /// prefill (if asked) and the boot image and sets each vCPU at the entry point.
    fn boot_vcpus(
        config: &mut MachineConfig,
        memory: &GuestMemory,
        vcpus: Vec<KvmVcpu>,
    ) -> Result<Vec<(KvmVcpu, VcpuStatus)>, MachineError> {
        if let Some(rate) = config.dirty_rate.filter(|r| *r > 0) {
            let tsc_hz = u64::from(vcpus[0].tsc_khz()?) * 1000;
            config.fixture.ticks_per_write = (tsc_hz / rate).max(1);
        }
        if config.fixture.kind.is_network_service() {
            // Its clock (TCP's timers).
            config.fixture.tsc_khz = u64::from(vcpus[0].tsc_khz()?);
        }
        boot::write_prefill(memory, &config.fixture.prefill_ranges(config.mem_bytes))?;
        boot::write_boot_image(
            memory,
            vm_fixtures::image(config.fixture.kind),
            &config.fixture.encode(),
            config.fixture.ws_end(),
        )?;
        for (id, vcpu) in vcpus.iter().enumerate() {
            vcpu.set_boot_state(&boot::entry_regs(id as u8), &boot::long_mode_sregs(vcpu.sregs()?))?;
        }
        Ok(vcpus.into_iter().map(|vcpu| (vcpu, VcpuStatus::Running)).collect())
    }

    /// Starts a worker thread per vCPU (parked), the tracker following them,
    /// and the fence's watchdog: the one place a [`Machine`] is made. On an
    /// error the tracker's thread is stopped.
    fn start(parts: MachineParts) -> Result<Machine, MachineError> {
        let MachineParts { config, memory, vm, dirty, vcpus, mut devices, fence } = parts;
        // A captured device: this machine is a restore (a snapshot, a migration's destination, a failover).
        let restored_net = devices.net.is_some();
        let (net, host_tap) = match Self::attach_net(&config, &memory, devices.net.take()) {
            Ok(attached) => attached.unzip(),
            Err(e) => {
                dirty.stop();
                return Err(e);
            }
        };
        let (tx, events) = mpsc::channel();
        let run_log = Arc::new(RunLog::new(vcpus.len()));
        let mut workers = Vec::with_capacity(vcpus.len());
        let mut watchdog = None;
        let started = (|| {
            for (vcpu, status) in vcpus {
                let worker = VcpuWorker::spawn(
                    vcpu,
                    Arc::clone(&memory),
                    status,
                    tx.clone(),
                    Arc::clone(&dirty),
                    fence.clone(),
                    Arc::clone(&run_log),
                    net.clone(),
                )
                .map_err(MachineError::Thread)?;
                dirty.follow_vcpu_thread(worker.tid)?;
                workers.push(worker);
            }
            if let Some(fence) = &fence {
                let threads = workers.iter().map(|w| w.tid).collect();
                watchdog = Some(Watchdog::start(Arc::clone(fence), threads).map_err(MachineError::Thread)?);
            }
            Ok::<(), MachineError>(())
        })();
        let machine = Machine {
            config,
            memory,
            vm,
            workers,
            events,
            devices,
            pending: VecDeque::new(),
            failures: VecDeque::new(),
            running: false,
            dirty,
            watchdog,
            fence,
            run_log,
            announce_on_resume: restored_net && net.is_some(),
            net,
            _host_tap: host_tap,
        };
        // On an error, dropping the machine stops what did start.
        started.map(|()| machine)
    }

    /// A network guest's virtio-net device on its tap (made here, with the
    /// host's address, unless this host has it): fresh at boot, or in the
    /// captured `state` at a restore. None for the other fixtures.
    #[allow(clippy::type_complexity)]
    fn attach_net(
        config: &MachineConfig,
        memory: &Arc<GuestMemory>,
        state: Option<NetDeviceState>,
    ) -> Result<Option<(Arc<Mutex<NetDevice>>, HostTap)>, MachineError> {
        let fixture = config.fixture.kind.name();
        match (&config.net, &config.fixture.net) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(MachineError::NoTap { fixture }),
            (Some(_), None) => Err(MachineError::TapNotServed { fixture }),
            (Some(backend), Some(guest)) => {
                let host_tap = HostTap::ensure(backend, guest.gateway, guest.prefix)?;
                let tap = Tap::attach(&backend.tap)?;
                let state = state.unwrap_or_else(|| NetDeviceState::new(guest.mac));
                let device = NetDevice::new(state, Box::new(tap), Arc::clone(memory));
                Ok(Some((Arc::new(Mutex::new(device)), host_tap)))
            }
        }
    }

    /// Creates the vCPUs and the dirty tracker around them (a ring, if the
    /// tracker needs one, must exist before any vCPU).
    fn create_vcpus(
        vm: &Arc<KvmVm>,
        memory: &GuestMemory,
        count: usize,
        tracking: DirtyTracking,
    ) -> Result<(Vec<KvmVcpu>, Arc<dyn DirtyTracker>), MachineError> {
        let plan = tracking.prepare(vm, memory)?;
        let vcpus = (0..count as u8).map(|id| vm.create_vcpu(id)).collect::<Result<Vec<_>, _>>()?;
        let dirty = plan.start(vm, memory, &vcpus)?;
        Ok((vcpus, dirty))
    }

    /// Rebuilds a machine from a captured state; `load_memory` fills guest memory.
    /// The machine comes up paused exactly where the captured one was.
    pub fn restore(
        state: MachineState,
        load_memory: impl FnOnce(&GuestMemory) -> Result<(), MachineError>,
    ) -> Result<Machine, MachineError> {
        let memory = Arc::new(GuestMemory::new(state.config.mem_bytes, state.config.slot_bytes)?);
        load_memory(&memory)?;
        Self::restore_into(state, memory)
    }

    /// Rebuilds a machine from a captured state over `memory`, which the
    /// caller has filled (or will fill on demand, under userfaultfd). Paused.
    pub fn restore_into(state: MachineState, memory: Arc<GuestMemory>) -> Result<Machine, MachineError> {
        Self::prepare(state.config.clone(), memory)?.restore(state)
    }

    /// Builds everything a restore needs that does not depend on the captured
    /// state (the KVM VM, its irqchip, the vCPUs), so that a migration can do
    /// it before the switchover and keep it out of the downtime.
    pub fn prepare(config: MachineConfig, memory: Arc<GuestMemory>) -> Result<PreparedMachine, MachineError> {
        Self::prepare_with(config, memory, DirtyTracking::Bitmap)
    }

    /// [`prepare`](Self::prepare) with a choice of dirty tracker (a PostCopyFT destination's).
    pub fn prepare_with(
        config: MachineConfig,
        memory: Arc<GuestMemory>,
        tracking: DirtyTracking,
    ) -> Result<PreparedMachine, MachineError> {
        config.fixture.validate()?;
        if memory.size() != config.mem_bytes {
            return Err(MachineError::Memory(MemoryError::Size(memory.size())));
        }
        let vm = Self::create_vm(&memory)?;
        let (vcpus, dirty) = Self::create_vcpus(&vm, &memory, config.vcpus(), tracking)?;
        Ok(PreparedMachine { config, memory, vm, vcpus, dirty: Some(dirty), fence: None })
    }

    fn create_vm(memory: &Arc<GuestMemory>) -> Result<Arc<KvmVm>, MachineError> {
        let mut vm = KvmVm::new()?;
        vm.set_memory(Arc::clone(memory))?;
        vm.create_irqchip()?;
        Ok(Arc::new(vm))
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// A shared handle on guest memory, for readers outside the machine (migration).
    pub fn memory_handle(&self) -> Arc<GuestMemory> {
        Arc::clone(&self.memory)
    }

    /// Starts (or stops) counting dirty pages from now: KVM logs a memslot's
    /// writes (into the bitmap, or the ring when the VM has one) once the slot
    /// is flagged for it. Starting forgets whatever was collected before.
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), MachineError> {
        if let Some(net) = &self.net {
            net.lock().unwrap_or_else(PoisonError::into_inner).forget_written_pages();
        }
        Ok(self.dirty.set_logging(enabled)?)
    }

    /// The pages written since the last call, sorted (dirty logging must be
    /// on): the guest's, and the network device's (receive buffers, rings).
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>, MachineError> {
        let mut pages = self.dirty.take()?;
        if let Some(net) = &self.net {
            let device = net.lock().unwrap_or_else(PoisonError::into_inner).take_written_pages();
            if !device.is_empty() {
                pages.extend(device);
                pages.sort_unstable();
                pages.dedup();
            }
        }
        Ok(pages)
    }

    /// The tracker dirty pages come from (`bitmap`, `ring` or `ebpf`).
    pub fn dirty_tracker(&self) -> &'static str {
        self.dirty.name()
    }

    /// The guest's dirty rate in bytes per second since the previous sample
    /// (`None`: the bitmap with logging off, which cannot see writes). Pages
    /// the sample harvests stay for the next [`take_dirty_pages`](Self::take_dirty_pages).
    pub fn sample_dirty_rate(&self) -> Result<Option<f64>, MachineError> {
        Ok(self.dirty.sample_rate()?)
    }

    pub fn devices(&self) -> &DeviceState {
        &self.devices
    }

    /// Output commit (a PostCopyFT destination): the network device holds
    /// the frames the guest transmits from now on, until released.
    pub fn hold_net_output(&self) {
        if let Some(net) = &self.net {
            net.lock().unwrap_or_else(PoisonError::into_inner).hold_output();
        }
    }

    /// Lets held frames out: those numbered below `upto` (a committed
    /// checkpoint's `tx_frames`), or with `None` all, holding no more.
    /// Returns what went out and what stays held; `None` without a network device.
    pub fn release_net_output(&self, upto: Option<u64>) -> Result<Option<(Released, HoldLevel)>, MachineError> {
        let Some(net) = &self.net else { return Ok(None) };
        let mut device = net.lock().unwrap_or_else(PoisonError::into_inner);
        let released = device.release_output(upto)?;
        Ok(Some((released, device.held())))
    }

    /// The network device's traffic so far and what it holds now (None
    /// without one); its longest quiet starts again.
    pub fn take_net_traffic(&self) -> Option<(Traffic, HoldLevel)> {
        let net = self.net.as_ref()?;
        let mut device = net.lock().unwrap_or_else(PoisonError::into_inner);
        Some((device.take_traffic(), device.held()))
    }

    /// The vCPU threads' kernel ids, by vCPU.
    pub fn vcpu_threads(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.tid).collect()
    }

    /// When each vCPU was in the guest.
    pub fn run_log(&self) -> Arc<RunLog> {
        Arc::clone(&self.run_log)
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Whether this copy's fence stopped it for good (a PostCopyFT destination
    /// whose lease ran out, or whose migration failed): its vCPUs never run again.
    pub fn fenced(&self) -> bool {
        self.fence.as_ref().is_some_and(|fence| fence.tripped())
    }

    /// Whether held output may leave now: this copy has no fence, or its fence
    /// still allows it to run (its lease holds, or the VM is its own). Past the
    /// lease the source may have restored its copy and be answering the same
    /// clients: a copy that woke from a freeze must not let out what it held.
    pub fn output_may_leave(&self) -> bool {
        self.fence.as_ref().is_none_or(|fence| fence.allows_running())
    }

    /// Whether every vCPU reported its workload done.
    pub fn is_finished(&self) -> bool {
        self.devices.all_done()
    }

    fn send(&self, id: usize, command: Command) -> Result<(), MachineError> {
        self.workers[id].commands.send(command).map_err(|_| MachineError::WorkerGone(id as u8))
    }

    /// Lets the vCPUs run.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        for id in 0..self.workers.len() {
            if id > 0 && crate::fault::resume_fails_half_way() {
                // vCPU 0 runs; the others do not, and the caller hears of a failure. The
                // injection waits (2 s at most) until vCPU 0 has been in the guest, so that
                // it did run, however busy the host (a busy host once stopped it first).
                self.running = true;
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline && !self.run_log.snapshot().intervals.iter().any(|i| i.vcpu == 0) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return Err(MachineError::Injected("the resume failed after vCPU 0 started"));
            }
            self.send(id, Command::Resume)?;
        }
        self.running = true;
        if std::mem::take(&mut self.announce_on_resume) {
            self.announce();
        }
        Ok(())
    }

    /// A network guest says where it is now (a gratuitous ARP from its MAC).
    fn announce(&self) {
        let (Some(net), Some(guest)) = (&self.net, &self.config.fixture.net) else { return };
        if let Err(e) = net.lock().unwrap_or_else(PoisonError::into_inner).announce(guest.ip) {
            tracing::warn!("cannot announce the VM on its network: {e}");
        }
    }

    /// Applies a worker's event to the device model; returns what the caller should see.
    fn absorb(&mut self, event: WorkerEvent) -> Result<Option<MachineEvent>, MachineError> {
        match event {
            WorkerEvent::Device(id, device_event) => {
                self.devices.apply(id, device_event);
                Ok(match device_event {
                    DeviceEvent::Output(record) => Some(MachineEvent::Output(record)),
                    DeviceEvent::Status(VcpuStatus::Done) => Some(MachineEvent::VcpuDone(id)),
                    DeviceEvent::Serving => Some(MachineEvent::Serving),
                    _ => None,
                })
            }
            WorkerEvent::Paused(_) => Ok(None),
            WorkerEvent::Failed(vcpu, reason) => Err(MachineError::VcpuFailed { vcpu, reason }),
        }
    }

    /// Waits up to `timeout` for the next event. `Ok(None)`: nothing happened in time.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<MachineEvent>, MachineError> {
        if let Some(failure) = self.failures.pop_front() {
            return Err(failure);
        }
        if let Some(event) = self.pending.pop_front() {
            return Ok(Some(event));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    if let Some(event) = self.absorb(event)? {
                        return Ok(Some(event));
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => return Err(MachineError::WorkerGone(0)),
            }
        }
    }

    /// Stops every vCPU out of `KVM_RUN` with no I/O pending. Events that
    /// arrive meanwhile are kept for [`next_event`](Self::next_event), and so is
    /// a vCPU's failure: a failed (or fenced) vCPU still answers the pause, and
    /// the others are kicked until they answer too. `Ok` means every vCPU
    /// acknowledged it is parked out of the guest.
    pub fn pause(&mut self) -> Result<(), MachineError> {
        for id in 0..self.workers.len() {
            self.send(id, Command::Pause)?;
        }
        let mut acked = vec![false; self.workers.len()];
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while acked.contains(&false) {
            // A kick can land just before the worker enters KVM_RUN and be lost;
            // kicking again until it answers closes that window.
            for (worker, _) in self.workers.iter().zip(&acked).filter(|(_, a)| !**a) {
                kick::kick(&worker.thread);
            }
            match self.events.recv_timeout(KICK_INTERVAL) {
                Ok(WorkerEvent::Paused(id)) => acked[usize::from(id)] = true,
                Ok(event) => match self.absorb(event) {
                    Ok(Some(event)) => self.pending.push_back(event),
                    Ok(None) => {}
                    Err(failure) => self.failures.push_back(failure),
                },
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    return Err(MachineError::PauseTimeout(PAUSE_TIMEOUT))
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(MachineError::WorkerGone(0)),
            }
        }
        self.running = false;
        Ok(())
    }

    /// Pauses the machine (if it runs) and captures its state; guest memory is
    /// read separately while the machine stays paused.
    pub fn capture(&mut self) -> Result<MachineState, MachineError> {
        if self.running {
            self.pause()?;
        }
        let mut vcpus = Vec::with_capacity(self.workers.len());
        for id in 0..self.workers.len() {
            let (tx, rx) = mpsc::channel();
            self.send(id, Command::Save(tx))?;
            vcpus.push(rx.recv().map_err(|_| MachineError::WorkerGone(id as u8))??);
        }
        let mut devices = self.devices.clone();
        devices.net = self.net.as_ref().map(|net| net.lock().unwrap_or_else(PoisonError::into_inner).state().clone());
        Ok(MachineState { config: self.config.clone(), vcpus, kernel: self.vm.save_state()?, devices })
    }

    /// Pauses the machine and writes its whole state to a snapshot file at `path`.
    /// The machine stays paused; [`resume`](Self::resume) continues it.
    pub fn save_snapshot(&mut self, path: &Path) -> Result<SnapshotStats, MachineError> {
        let state = self.capture()?;
        Ok(snapshot::save(path, &state, &self.memory)?)
    }

    /// Rebuilds the machine saved at `path`, paused where it was saved.
    pub fn restore_snapshot(path: &Path) -> Result<Machine, MachineError> {
        let (state, reader) = SnapshotReader::open(path)?;
        Machine::restore(state, |memory| {
            reader.load_memory(memory)?;
            Ok(())
        })
    }

    /// Checks a finished run against the fixture's oracle: the working set word
    /// for word, and every vCPU's whole output history.
    pub fn verify(&self) -> Result<Verified, VerifyError> {
        if !self.is_finished() {
            return Err(VerifyError::NotFinished(self.devices.vcpu_status.clone()));
        }
        let fixture = &self.config.fixture;
        let expected = fixture.expected_after(fixture.steps);
        expected.check_outputs(&self.devices.output_log)?;
        let mut check = expected.memory_check();
        self.memory.for_each_chunk::<MemoryError>(fixture.ws_base..fixture.ws_end(), 1 << 20, |gpa, bytes| {
            check.feed(gpa, bytes);
            Ok(())
        })?;
        let memory_digest = check.finish()?;
        Ok(Verified { memory_digest, records: self.devices.output_log.len() })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // First: the watchdog kicks threads by id, which must not outlive the vCPU threads.
        drop(self.watchdog.take());
        for worker in &self.workers {
            let _ = worker.commands.send(Command::Stop);
        }
        for worker in self.workers.drain(..) {
            while !worker.thread.is_finished() {
                kick::kick(&worker.thread);
                std::thread::sleep(KICK_INTERVAL);
            }
            let _ = worker.thread.join();
        }
        // The tracker's thread (if any) holds the VM: end it with the machine.
        self.dirty.stop();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_fixtures::{FixtureKind, FixtureParams};

    pub(crate) fn config(kind: FixtureKind, vcpus: u64, steps: u64) -> MachineConfig {
        let mem_bytes = 8 << 20;
        let ws_pages = (mem_bytes - vm_fixtures::abi::WORKING_SET_GPA) / 4096;
        let fixture = FixtureParams { steps, ..FixtureParams::new(kind, vcpus, ws_pages) };
        MachineConfig { mem_bytes, slot_bytes: 4 << 20, fixture, dirty_rate: None, net: None }
    }

    /// A second copy of a 2-vCPU ledger guest that ran 50 ms, prepared under a
    /// fence whose lease runs out `lease` from now: restore it to run it.
    pub(crate) fn fenced_copy(lease: Duration) -> (PreparedMachine, MachineState, Arc<Fence>) {
        let mut first = Machine::boot(config(FixtureKind::Ledger, 2, 50_000_000)).unwrap();
        first.resume().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let state = first.capture().unwrap();
        let memory = first.memory_handle();
        drop(first);
        let fence = Fence::new(crate::clock::BootTime::now() + lease);
        let mut prepared = Machine::prepare(state.config.clone(), memory).unwrap();
        prepared.set_fence(Arc::clone(&fence));
        (prepared, state, fence)
    }

    #[test]
    fn a_pause_waits_for_every_vcpu_even_after_one_failed() {
        // Two vCPUs whose lease runs out while they run: each reports itself
        // fenced (a failure). A pause then still gets every vCPU's answer (it
        // used to return at the first failure, leaving the others unconfirmed),
        // and the failure comes after it, as the next event.
        let (prepared, state, fence) = fenced_copy(Duration::from_millis(60));
        let mut machine = prepared.restore(state).unwrap();
        machine.resume().unwrap();
        std::thread::sleep(Duration::from_millis(150));
        assert!(fence.tripped());
        machine.pause().expect("every vCPU answers the pause, fenced or not");
        assert!(!machine.is_running());
        let failure = machine.next_event(Duration::from_millis(100)).expect_err("the failure is not lost");
        assert!(failure.to_string().contains("fenced"), "{failure}");
    }

    fn run_to_end(machine: &mut Machine) -> Vec<OutputRecord> {
        let mut seen = Vec::new();
        machine.resume().unwrap();
        while !machine.is_finished() {
            if let Some(MachineEvent::Output(r)) = machine.next_event(Duration::from_secs(30)).unwrap() {
                seen.push(r);
            }
        }
        seen
    }

    #[test]
    fn ledger_on_two_vcpus_matches_the_oracle() {
        let mut machine = Machine::boot(config(FixtureKind::Ledger, 2, 3_000)).unwrap();
        let seen = run_to_end(&mut machine);
        let verified = machine.verify().unwrap();
        assert_eq!(verified.records, 6);
        assert_eq!(seen, machine.devices().output_log);
        let fixture = &machine.config().fixture;
        assert_eq!(verified.memory_digest, fixture.expected_after(fixture.steps).memory_digest());
    }

    #[test]
    fn snapshot_restores_mid_run_and_finishes_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.snap");
        let mut machine = Machine::boot(config(FixtureKind::Ledger, 2, 6_000)).unwrap();
        machine.resume().unwrap();
        while machine.devices().output_log.len() < 3 {
            machine.next_event(Duration::from_secs(30)).unwrap();
        }
        let stats = machine.save_snapshot(&path).unwrap();
        let at_snapshot = machine.devices().output_log.len();
        assert!(stats.pages_written > 0 && stats.zero_pages_skipped > 0, "{stats:?}");
        drop(machine);

        let mut restored = Machine::restore_snapshot(&path).unwrap();
        assert_eq!(restored.devices().output_log.len(), at_snapshot);
        let after = run_to_end(&mut restored);
        assert_eq!(at_snapshot + after.len(), 12);
        restored.verify().unwrap();
    }

    #[test]
    fn dirty_log_reports_the_pages_the_guest_wrote() {
        // dirty, sequential, 1 vCPU: write i goes to working-set page (i - 1) mod pages.
        let mut cfg = config(FixtureKind::Dirty, 1, 100);
        cfg.fixture.pattern = vm_fixtures::DirtyPattern::Sequential;
        cfg.fixture.record_every = 100;
        let mut machine = Machine::boot(cfg).unwrap();
        machine.set_dirty_logging(true).unwrap();
        assert_eq!(machine.take_dirty_pages().unwrap(), Vec::<u64>::new(), "nothing ran yet");
        run_to_end(&mut machine);
        let dirty = machine.take_dirty_pages().unwrap();
        let ws = vm_fixtures::abi::WORKING_SET_GPA;
        let written: Vec<u64> = (0..100).map(|j| ws + j * 4096).collect();
        for page in &written {
            assert!(dirty.contains(page), "page {page:#x} written but not reported");
        }
        // Besides the working set, only the mailbox, the stack, and the page
        // tables (the MMU sets their accessed/dirty bits) are written.
        let others: Vec<u64> = dirty.iter().copied().filter(|p| !written.contains(p)).collect();
        let page_tables = vm_fixtures::abi::PML4_GPA..vm_fixtures::abi::CODE_GPA;
        let stacks = vm_fixtures::abi::STACKS_GPA..ws;
        assert!(
            others.iter().all(|p| *p == vm_fixtures::abi::MAILBOX_GPA || page_tables.contains(p) || stacks.contains(p)),
            "unexpected dirty pages {others:x?}"
        );
        assert_eq!(machine.take_dirty_pages().unwrap(), Vec::<u64>::new(), "the log is cleared by a take");
    }

    /// The `dirty` fixture writing `pages` pages once each, in order, over 128 MiB memslots.
    fn one_sequential_pass(pages: u64) -> MachineConfig {
        let ws = vm_fixtures::abi::WORKING_SET_GPA;
        let mem_bytes = (ws + pages * 4096).div_ceil(2 << 20) * (2 << 20);
        let mut fixture = FixtureParams::new(FixtureKind::Dirty, 1, pages);
        fixture.pattern = vm_fixtures::DirtyPattern::Sequential;
        fixture.steps = pages;
        fixture.record_every = pages;
        MachineConfig { mem_bytes, slot_bytes: 128 << 20, fixture, dirty_rate: None, net: None }
    }

    /// Runs the `dirty` fixture writing `pages` pages once each, in order, and
    /// returns what `tracking` says was written, and the writes it logged.
    fn dirtied_by_one_pass(tracking: DirtyTracking, pages: u64) -> (Vec<u64>, u64) {
        // Several memslots, so that ring entries' slot ids matter.
        let config = one_sequential_pass(pages);
        let mut machine = Machine::boot_with(config, tracking).unwrap();
        machine.set_dirty_logging(true).unwrap();
        run_to_end(&mut machine);
        machine.verify().unwrap();
        (machine.take_dirty_pages().unwrap(), machine.dirty.logged())
    }

    #[test]
    fn dirty_ring_and_bitmap_see_the_same_pages() {
        let (ring, harvested) = dirtied_by_one_pass(DirtyTracking::Ring { entries: 4096 }, 3_000);
        let (bitmap, _) = dirtied_by_one_pass(DirtyTracking::Bitmap, 3_000);
        let only_ring: Vec<_> = ring.iter().filter(|p| bitmap.binary_search(p).is_err()).take(5).collect();
        let only_bitmap: Vec<_> = bitmap.iter().filter(|p| ring.binary_search(p).is_err()).take(5).collect();
        assert!(
            ring.len() == bitmap.len() && only_ring.is_empty(),
            "ring {} pages, bitmap {}; only in ring {only_ring:x?}, only in bitmap {only_bitmap:x?}",
            ring.len(),
            bitmap.len()
        );
        let ws = vm_fixtures::abi::WORKING_SET_GPA;
        assert!((0..3_000).all(|j| ring.binary_search(&(ws + j * 4096)).is_ok()));
        assert!(harvested >= 3_000);
    }

    #[test]
    fn dirty_ring_drained_concurrently_loses_no_page_of_a_150k_page_pass() {
        // Measured on this host: one pass over 150,000 pages overran a 1 MiB ring that was
        // drained only on its full-exit. Drained by the harvester thread, even a
        // 4096-entry ring must keep every page.
        let ws = vm_fixtures::abi::WORKING_SET_GPA;
        for entries in [65_536, 4_096] {
            let (dirty, harvested) = dirtied_by_one_pass(DirtyTracking::Ring { entries }, 150_000);
            let missing = (0..150_000u64).filter(|j| dirty.binary_search(&(ws + j * 4096)).is_err()).count();
            assert_eq!(missing, 0, "{entries}-entry ring lost {missing} of 150000 written pages");
            eprintln!("{entries}-entry ring: {harvested} entries harvested for {} dirty pages", dirty.len());
        }
    }

    // The eBPF tracker's tests need the program built in (`cargo xtask build-ebpf`,
    // which `cargo xtask test` and CI run first).
    #[cfg(pcft_ebpf)]
    #[test]
    fn ebpf_sees_exactly_the_pages_the_ring_sees() {
        let (ebpf, _) = dirtied_by_one_pass(DirtyTracking::Ebpf { entries: 4096 }, 3_000);
        let (ring, _) = dirtied_by_one_pass(DirtyTracking::Ring { entries: 4096 }, 3_000);
        assert_eq!(ebpf.len(), ring.len(), "eBPF and ring disagree");
        assert_eq!(ebpf, ring);
    }

    #[cfg(pcft_ebpf)]
    #[test]
    fn ebpf_takes_while_the_guest_runs_lose_no_page_of_a_150k_page_pass() {
        // Takes race the guest's writes all along; their union must still hold every page.
        let ws = vm_fixtures::abi::WORKING_SET_GPA;
        let pages = 150_000u64;
        let config = one_sequential_pass(pages);
        let mut machine = Machine::boot_with(config, DirtyTracking::Ebpf { entries: 4096 }).unwrap();
        assert_eq!(machine.dirty_tracker(), "ebpf");
        machine.set_dirty_logging(true).unwrap();
        machine.resume().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let mut takes = 0;
        while !machine.is_finished() {
            seen.extend(machine.take_dirty_pages().unwrap());
            takes += 1;
            let _ = machine.next_event(Duration::from_millis(2)).unwrap();
        }
        seen.extend(machine.take_dirty_pages().unwrap());
        let missing = (0..pages).filter(|j| !seen.contains(&(ws + j * 4096))).count();
        let (pushes, misses) = (machine.dirty.logged(), crate::vmm::dirty::bpf::misses());
        assert_eq!(missing, 0, "{missing} of {pages} pages lost over {takes} takes");
        assert_eq!(misses, 0);
        assert!(pushes >= pages, "{pushes} pushes for {pages} pages");
        eprintln!("eBPF: {takes} takes while running, {pushes} pushes, {} pages", seen.len());
    }

    #[cfg(pcft_ebpf)]
    #[test]
    fn ebpf_tracks_two_vms_apart() {
        let mut writer_config = config(FixtureKind::Dirty, 1, 500);
        writer_config.fixture.pattern = vm_fixtures::DirtyPattern::Sequential;
        let mut writer = Machine::boot_with(writer_config, DirtyTracking::Ebpf { entries: 4096 }).unwrap();
        let mut idle =
            Machine::boot_with(config(FixtureKind::Idle, 1, 1), DirtyTracking::Ebpf { entries: 4096 }).unwrap();
        writer.set_dirty_logging(true).unwrap();
        idle.set_dirty_logging(true).unwrap();
        run_to_end(&mut writer);
        let written = writer.take_dirty_pages().unwrap();
        let ws = vm_fixtures::abi::WORKING_SET_GPA;
        assert!((0..500).all(|j| written.contains(&(ws + j * 4096))));
        assert_eq!(idle.take_dirty_pages().unwrap(), Vec::<u64>::new(), "the other VM's writes are not this one's");
        run_to_end(&mut idle);
        assert!(writer.take_dirty_pages().unwrap().is_empty(), "and the other way round");
    }

    /// The checkpoint invariant over `tracking`: a shadow copy of guest memory,
    /// updated only with the pages each take names (read while the guest runs,
    /// as a speculative checkpoint phase does), equals guest memory after a
    /// last take once the guest has stopped. A write that no take reports
    /// (lost in a race with a take, or with the tracker's reset) shows as a
    /// differing page.
    /// With `sample`, the dirty rate is sampled between takes too: the pages a
    /// sample harvests must still reach the next take.
    fn shadow_of_takes_matches_memory(tracking: DirtyTracking, sample: bool) {
        let mut config = config(FixtureKind::Ledger, 2, 20_000);
        config.mem_bytes = 32 << 20;
        config.fixture.ws_pages = (config.mem_bytes - vm_fixtures::abi::WORKING_SET_GPA) / 4096;
        let mut machine = Machine::boot_with(config, tracking).unwrap();
        machine.set_dirty_logging(true).unwrap();
        machine.take_dirty_pages().unwrap();
        let size = machine.memory().size() as usize;
        let mut shadow = vec![0u8; size];
        machine.memory().read(0, &mut shadow).unwrap();
        let copy_in = |machine: &Machine, shadow: &mut [u8], pages: Vec<u64>| {
            for gpa in pages {
                let page = &mut shadow[gpa as usize..gpa as usize + 4096];
                machine.memory().read(gpa, page).unwrap();
            }
        };
        machine.resume().unwrap();
        let mut takes = 0;
        while !machine.is_finished() {
            let pages = machine.take_dirty_pages().unwrap();
            copy_in(&machine, &mut shadow, pages);
            takes += 1;
            let _ = machine.next_event(Duration::from_millis(3)).unwrap();
            if sample {
                assert!(machine.sample_dirty_rate().unwrap().is_some(), "logging is on: a rate");
                let _ = machine.next_event(Duration::from_millis(1)).unwrap();
            }
        }
        let pages = machine.take_dirty_pages().unwrap();
        copy_in(&machine, &mut shadow, pages);
        machine.verify().unwrap();
        let mut memory = vec![0u8; size];
        machine.memory().read(0, &mut memory).unwrap();
        let differing: Vec<usize> =
            (0..size / 4096).filter(|p| shadow[p * 4096..(p + 1) * 4096] != memory[p * 4096..(p + 1) * 4096]).collect();
        assert!(takes >= 5, "only {takes} takes ran while the guest ran");
        assert!(
            differing.is_empty(),
            "{}: {} pages written but in no take, e.g. {:x?}",
            machine.dirty_tracker(),
            differing.len(),
            differing.iter().take(5).map(|p| p * 4096).collect::<Vec<_>>()
        );
    }

    #[test]
    fn takes_while_the_guest_runs_reproduce_memory_with_the_bitmap() {
        shadow_of_takes_matches_memory(DirtyTracking::Bitmap, false);
    }

    #[test]
    fn bitmap_rate_samples_between_takes_lose_no_page() {
        shadow_of_takes_matches_memory(DirtyTracking::Bitmap, true);
    }

    #[test]
    fn every_tracker_samples_a_rate_and_the_bitmap_only_while_logging() {
        for tracking in [DirtyTracking::Bitmap, DirtyTracking::Ring { entries: 4096 }] {
            let mut cfg = config(FixtureKind::Dirty, 1, 20_000);
            cfg.fixture.pattern = vm_fixtures::DirtyPattern::Sequential;
            let mut machine = Machine::boot_with(cfg, tracking).unwrap();
            let name = machine.dirty_tracker();
            machine.resume().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let off = machine.sample_dirty_rate().unwrap();
            match tracking {
                DirtyTracking::Bitmap => assert_eq!(off, None, "the bitmap cannot see writes with logging off"),
                _ => assert_eq!(off, Some(0.0), "{name}: no writes are logged with logging off"),
            }
            machine.set_dirty_logging(true).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let on = machine.sample_dirty_rate().unwrap().expect("a rate with logging on");
            assert!(on > 0.0, "{name}: the guest writes, the rate is {on}");
            machine.pause().unwrap();
            assert!(!machine.take_dirty_pages().unwrap().is_empty(), "{name}: the sample's pages wait for the take");
        }
    }

    #[test]
    fn takes_while_the_guest_runs_reproduce_memory_with_the_ring() {
        shadow_of_takes_matches_memory(DirtyTracking::Ring { entries: 4096 }, false);
    }

    #[cfg(pcft_ebpf)]
    #[test]
    fn takes_while_the_guest_runs_reproduce_memory_with_ebpf() {
        shadow_of_takes_matches_memory(DirtyTracking::Ebpf { entries: 4096 }, true);
    }

    #[test]
    fn corrupt_snapshots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idle.snap");
        let mut machine = Machine::boot(config(FixtureKind::Idle, 1, 40)).unwrap();
        run_to_end(&mut machine);
        machine.save_snapshot(&path).unwrap();
        let good = std::fs::read(&path).unwrap();

        let mut flipped = good.clone();
        let last_page_byte = good.len() - 4 - 8 - 100;
        flipped[last_page_byte] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let err = Machine::restore_snapshot(&path).err().expect("flipped page byte is refused");
        assert!(err.to_string().contains("guest memory checksum mismatch"), "{err}");

        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        let err = Machine::restore_snapshot(&path).err().expect("truncated file is refused");
        assert!(err.to_string().contains("truncated"), "{err}");

        let mut state_flip = good.clone();
        state_flip[30] ^= 0x40;
        std::fs::write(&path, &state_flip).unwrap();
        let err = Machine::restore_snapshot(&path).err().expect("flipped state byte is refused");
        assert!(err.to_string().contains("state section checksum mismatch"), "{err}");

        std::fs::write(&path, b"not a snapshot at all").unwrap();
        assert!(matches!(
            Machine::restore_snapshot(&path),
            Err(MachineError::Snapshot(SnapshotError::NotASnapshot { .. }))
        ));
    }
}
