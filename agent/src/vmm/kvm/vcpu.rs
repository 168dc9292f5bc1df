//! The vCPU fd: running it, and capturing or restoring its whole state.

use super::error::KvmError;
use super::state::VcpuState;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs, KVM_MAX_MSR_ENTRIES,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::VcpuFd;

/// Why `KVM_RUN` returned, in terms the VMM logic needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The guest wrote `value` (zero-extended) to I/O `port`.
    IoOut { port: u16, value: u32 },
    /// The guest read I/O `port`; it reads all ones (no device answers).
    IoIn { port: u16 },
    /// A signal (a kick) interrupted `KVM_RUN`.
    Interrupted,
    /// The vCPU's dirty ring is (nearly) full: harvest and reset before running again.
    DirtyRingFull,
    /// The guest read `len` bytes at guest-physical `gpa`, which no memory
    /// backs: a device's MMIO window, a revoked page of a dead copy, or a guest
    /// bug. Answer with [`KvmVcpu::set_mmio_read_data`]; the instruction
    /// completes on the next `KVM_RUN`.
    MmioRead { gpa: u64, len: usize },
    /// The guest wrote `data` (`len` bytes of it) at `gpa`, which no memory backs.
    MmioWrite { gpa: u64, data: [u8; 8], len: usize },
    /// The guest triple-faulted or otherwise shut down.
    Shutdown,
    /// Anything else: a bug in the guest or an unsupported exit.
    Unexpected(String),
}

pub struct KvmVcpu {
    fd: VcpuFd,
    id: u8,
    cpuid: Vec<kvm_cpuid_entry2>,
    msr_indices: Vec<u32>,
}

impl KvmVcpu {
    pub(super) fn new(
        fd: VcpuFd,
        id: u8,
        cpuid: Vec<kvm_cpuid_entry2>,
        msr_indices: Vec<u32>,
    ) -> Result<Self, KvmError> {
        let vcpu = KvmVcpu { fd, id, cpuid, msr_indices };
        vcpu.set_cpuid(&vcpu.cpuid)?;
        Ok(vcpu)
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Maps this vCPU's dirty ring (the VM must have enabled one of `entries`).
    pub fn map_dirty_ring(&self, entries: u32) -> Result<super::dirty_ring::DirtyRing, KvmError> {
        super::dirty_ring::DirtyRing::map(std::os::fd::AsRawFd::as_raw_fd(&self.fd), entries)
    }

    fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<(), KvmError> {
        let cpuid = CpuId::from_entries(entries)
            .map_err(|e| KvmError::Unsupported(format!("{} CPUID entries do not fit: {e:?}", entries.len())))?;
        self.fd.set_cpuid2(&cpuid).map_err(KvmError::ioctl("KVM_SET_CPUID2"))
    }

    /// The vCPU's TSC frequency in kHz.
    pub fn tsc_khz(&self) -> Result<u32, KvmError> {
        self.fd.get_tsc_khz().map_err(KvmError::ioctl("KVM_GET_TSC_KHZ"))
    }

    pub fn sregs(&self) -> Result<kvm_sregs, KvmError> {
        self.fd.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))
    }

    pub fn regs(&self) -> Result<kvm_regs, KvmError> {
        self.fd.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))
    }

    /// Sets the registers a freshly booted vCPU starts from and makes it runnable
    /// (with an in-kernel LAPIC, application processors otherwise wait for INIT/SIPI).
    pub fn set_boot_state(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<(), KvmError> {
        self.fd.set_sregs(sregs).map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        self.fd.set_regs(regs).map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        self.fd
            .set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE })
            .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))
    }

    /// Enters the guest until the next exit that needs the VMM.
    pub fn run(&mut self) -> Result<VcpuExit, KvmError> {
        match self.fd.run() {
            Ok(kvm_ioctls::VcpuExit::IoOut(port, data)) => {
                let mut value = [0u8; 4];
                let n = data.len().min(4);
                value[..n].copy_from_slice(&data[..n]);
                Ok(VcpuExit::IoOut { port, value: u32::from_le_bytes(value) })
            }
            Ok(kvm_ioctls::VcpuExit::IoIn(port, data)) => {
                data.fill(0xff);
                Ok(VcpuExit::IoIn { port })
            }
            Ok(kvm_ioctls::VcpuExit::Shutdown) => Ok(VcpuExit::Shutdown),
            Ok(kvm_ioctls::VcpuExit::MmioRead(gpa, data)) => {
                // Unclaimed reads see all ones, as on a bus with nothing behind it.
                data.fill(0xff);
                Ok(VcpuExit::MmioRead { gpa, len: data.len() })
            }
            Ok(kvm_ioctls::VcpuExit::MmioWrite(gpa, data)) => {
                let mut value = [0u8; 8];
                let len = data.len().min(8);
                value[..len].copy_from_slice(&data[..len]);
                Ok(VcpuExit::MmioWrite { gpa, data: value, len })
            }
            Ok(kvm_ioctls::VcpuExit::Intr) => Ok(VcpuExit::Interrupted),
            Ok(kvm_ioctls::VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                Ok(VcpuExit::DirtyRingFull)
            }
            Ok(other) => Ok(VcpuExit::Unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(VcpuExit::Interrupted),
            Err(e) => Err(KvmError::Ioctl { op: "KVM_RUN", source: e }),
        }
    }

    /// The value an MMIO read (the last exit, [`VcpuExit::MmioRead`]) returns to the guest.
    pub fn set_mmio_read_data(&mut self, data: &[u8]) {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_MMIO {
            return;
        }
        // SAFETY: the last exit was KVM_EXIT_MMIO, so the union holds `mmio`; `data` is at most 8 bytes.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = data.len().min(mmio.data.len()).min(mmio.len as usize);
        mmio.data[..len].copy_from_slice(&data[..len]);
    }

    /// Finishes the instruction behind the last exit (an `out` completes only on
    /// the next `KVM_RUN`) without running any further guest code, so that the
    /// state read afterwards is the state after that instruction. Call it before
    /// saving state or parking the vCPU.
    pub fn complete_pending_io(&mut self) -> Result<(), KvmError> {
        self.write_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(KvmError::Ioctl { op: "KVM_RUN (immediate exit)", source: e }),
            Ok(exit) => Err(KvmError::Unsupported(format!("KVM_RUN with immediate_exit ran the guest: {exit:?}"))),
        };
        self.write_immediate_exit(0);
        result
    }

    /// `kvm_run.immediate_exit`, which the kick signal handler also writes (on this thread).
    fn immediate_exit_byte(&mut self) -> *mut u8 {
        &mut self.fd.get_kvm_run().immediate_exit as *mut u8
    }

    fn write_immediate_exit(&mut self, value: u8) {
        let byte = self.immediate_exit_byte();
        // SAFETY: the byte is in this vCPU's kvm_run mapping, alive while `self` is;
        // volatile because the kick handler writes it asynchronously on this thread.
        unsafe { byte.write_volatile(value) };
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets kicks that came before now; a kick after this makes the next `KVM_RUN` return at once.
    pub fn clear_immediate_exit(&mut self) {
        self.write_immediate_exit(0);
    }

    /// Whether a kick came since the last [`clear_immediate_exit`](Self::clear_immediate_exit):
    /// the next `KVM_RUN` then returns `EINTR` without running the guest.
    pub fn immediate_exit_set(&mut self) -> bool {
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        let byte = self.immediate_exit_byte();
        // SAFETY: as in `write_immediate_exit`.
        unsafe { byte.read_volatile() != 0 }
    }

    /// Makes kicks to the calling thread (see [`super::kick`]) set this vCPU's
    /// `immediate_exit`, until the binding is dropped. Call it on the thread
    /// that runs the vCPU, and drop the binding before the vCPU.
    pub(crate) fn bind_kicks_to_this_thread(&mut self) -> super::kick::ImmediateExitBinding {
        let byte = self.immediate_exit_byte();
        // SAFETY: `byte` points into this vCPU's kvm_run mapping; the caller keeps the
        // vCPU alive for as long as the binding (the worker drops the binding first).
        unsafe { super::kick::bind_immediate_exit(byte) }
    }

    /// Reads the MSRs in `indices`, skipping the ones this KVM refuses to read.
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, KvmError> {
        let mut saved = Vec::with_capacity(self.msr_indices.len());
        let mut rest = &self.msr_indices[..];
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<_> = chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries).expect("chunk within KVM_MAX_MSR_ENTRIES");
            let read = self.fd.get_msrs(&mut msrs).map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            // KVM stops at the first MSR it cannot read: skip that one.
            rest = &rest[(read + usize::from(read < chunk.len())).min(rest.len())..];
        }
        Ok(saved)
    }

    /// Writes MSRs, skipping the ones this KVM refuses to write. Returns how many were skipped.
    fn write_msrs(&self, entries: &[kvm_msr_entry]) -> Result<usize, KvmError> {
        let mut skipped = 0;
        let mut rest = entries;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let msrs = Msrs::from_entries(chunk).expect("chunk within KVM_MAX_MSR_ENTRIES");
            let written = self.fd.set_msrs(&msrs).map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
            if written < chunk.len() {
                tracing::debug!(
                    vcpu = self.id,
                    msr = format_args!("{:#x}", chunk[written].index),
                    "MSR not restorable, skipped"
                );
                skipped += 1;
            }
            rest = &rest[(written + usize::from(written < chunk.len())).min(rest.len())..];
        }
        Ok(skipped)
    }

    /// Captures the vCPU's whole state. The vCPU must not be running, and
    /// [`complete_pending_io`](Self::complete_pending_io) must have run since its last exit.
    pub fn save_state(&self) -> Result<VcpuState, KvmError> {
        let io = |op| KvmError::ioctl(op);
        Ok(VcpuState {
            cpuid: self.cpuid.clone(),
            mp_state: self.fd.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?,
            regs: self.fd.get_regs().map_err(io("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(io("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(io("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(io("KVM_GET_XCRS"))?,
            debugregs: self.fd.get_debug_regs().map_err(io("KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(io("KVM_GET_LAPIC"))?,
            msrs: self.read_msrs()?,
            vcpu_events: self.fd.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Restores a state captured by [`save_state`](Self::save_state), in the
    /// order KVM needs (CPUID first, events last).
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), KvmError> {
        let io = |op| KvmError::ioctl(op);
        self.set_cpuid(&state.cpuid)?;
        self.cpuid = state.cpuid.clone();
        self.fd.set_mp_state(state.mp_state).map_err(io("KVM_SET_MP_STATE"))?;
        self.fd.set_regs(&state.regs).map_err(io("KVM_SET_REGS"))?;
        self.fd.set_sregs(&state.sregs).map_err(io("KVM_SET_SREGS"))?;
        // SAFETY: the VM never enabled KVM_CAP_XSAVE2, so the kernel reads exactly
        // the fixed 4 KiB `kvm_xsave` passed here.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(io("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(io("KVM_SET_XCRS"))?;
        self.fd.set_debug_regs(&state.debugregs).map_err(io("KVM_SET_DEBUGREGS"))?;
        self.fd.set_lapic(&state.lapic).map_err(io("KVM_SET_LAPIC"))?;
        self.write_msrs(&state.msrs)?;
        self.fd.set_vcpu_events(&state.vcpu_events).map_err(io("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
