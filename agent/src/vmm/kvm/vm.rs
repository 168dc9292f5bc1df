//! The VM fd: memslots, in-kernel devices, vCPU creation, VM-level state.

use super::error::KvmError;
use super::state::VmKernelState;
use super::vcpu::KvmVcpu;
use crate::vmm::memory::GuestMemory;
use kvm_bindings::{
    kvm_irqchip, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::Arc;

/// `_IO(KVMIO, 0xc7)` (kvm-ioctls does not wrap it).
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xAEC7;

const IRQCHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
    /// Kept alive for as long as the memslots that point into it.
    memory: Option<Arc<GuestMemory>>,
}

impl KvmVm {
    /// Opens /dev/kvm and creates an empty VM.
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let fd = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        Ok(KvmVm { kvm, fd, memory: None })
    }

    /// Registers every memslot of `memory` with KVM.
    pub fn set_memory(&mut self, memory: Arc<GuestMemory>) -> Result<(), KvmError> {
        if self.memory.is_some() {
            return Err(KvmError::Unsupported("guest memory is already registered with this VM".into()));
        }
        Self::register_slots(&self.fd, &memory, 0)?;
        self.memory = Some(memory);
        Ok(())
    }

    fn register_slots(fd: &VmFd, memory: &Arc<GuestMemory>, flags: u32) -> Result<(), KvmError> {
        for slot in memory.slots() {
            let region = kvm_userspace_memory_region {
                slot: slot.id,
                flags,
                guest_phys_addr: slot.gpa,
                memory_size: slot.size,
                userspace_addr: memory.host_address(slot.gpa).expect("memslot inside guest memory"),
            };
            // SAFETY: the region lies inside `memory`'s live mapping, and the
            // VM keeps an Arc of that memory as long as its fd lives.
            unsafe { fd.set_user_memory_region(region) }.map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    fn memory(&self) -> Result<&Arc<GuestMemory>, KvmError> {
        self.memory.as_ref().ok_or_else(|| KvmError::Unsupported("the VM has no guest memory yet".into()))
    }

    /// Turns KVM's dirty-page logging (`KVM_MEM_LOG_DIRTY_PAGES`) on or off for every memslot.
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), KvmError> {
        let flags = if enabled { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        Self::register_slots(&self.fd, self.memory()?, flags)
    }

    /// Returns (and clears) the pages written since the last call, as sorted
    /// guest-physical addresses. Dirty logging must be on.
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>, KvmError> {
        let memory = self.memory()?;
        let mut pages = Vec::new();
        for slot in memory.slots() {
            let bitmap =
                self.fd.get_dirty_log(slot.id, slot.size as usize).map_err(KvmError::ioctl("KVM_GET_DIRTY_LOG"))?;
            crate::vmm::memory::dirty_bitmap_pages(slot.gpa, &bitmap, &mut pages);
        }
        Ok(pages)
    }

    /// The largest dirty ring this KVM offers per vCPU, in entries (0: none).
    pub fn dirty_ring_max_entries(&self) -> u32 {
        let bytes = self.fd.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING.into());
        (bytes.max(0) as u32) / std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() as u32
    }

    /// Gives every vCPU a dirty ring of `entries` (a power of two). Must come
    /// before the first vCPU is created.
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<(), KvmError> {
        let max = self.dirty_ring_max_entries();
        if !entries.is_power_of_two() || entries > max {
            return Err(KvmError::Unsupported(format!(
                "a dirty ring of {entries} entries: this KVM offers powers of two up to {max}"
            )));
        }
        let mut cap = kvm_bindings::kvm_enable_cap { cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING, ..Default::default() };
        cap.args[0] = u64::from(entries) * std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() as u64;
        self.fd.enable_cap(&cap).map_err(KvmError::ioctl("KVM_ENABLE_CAP(DIRTY_LOG_RING)"))
    }

    /// `KVM_RESET_DIRTY_RINGS`: the kernel re-protects the pages whose ring
    /// entries were harvested and recycles those entries. Returns how many it reset.
    pub fn reset_dirty_rings(&self) -> Result<u32, KvmError> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        // SAFETY: an argument-less ioctl on this VM's fd, which `self` keeps open.
        let rc = unsafe { libc::ioctl(fd, KVM_RESET_DIRTY_RINGS) };
        if rc < 0 {
            return Err(KvmError::Unsupported(format!(
                "KVM_RESET_DIRTY_RINGS failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(rc as u32)
    }

    /// Creates the in-kernel PIC, IOAPIC and per-vCPU LAPICs.
    pub fn create_irqchip(&self) -> Result<(), KvmError> {
        self.fd.create_irq_chip().map_err(KvmError::ioctl("KVM_CREATE_IRQCHIP"))
    }

    /// Creates vCPU `id` with the host's supported CPUID, with its APIC id set to `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<KvmVcpu, KvmError> {
        let fd = self.fd.create_vcpu(u64::from(id)).map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        let mut cpuid =
            self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // Initial APIC id in EBX[31:24].
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
                // x2APIC id of the extended topology leaf.
                0xb => entry.edx = u32::from(id),
                _ => {}
            }
        }
        let msr_indices =
            self.kvm.get_msr_index_list().map_err(KvmError::ioctl("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec();
        KvmVcpu::new(fd, id, cpuid.as_slice().to_vec(), msr_indices)
    }

    /// Captures the in-kernel irqchips and the clock.
    pub fn save_state(&self) -> Result<VmKernelState, KvmError> {
        let mut irqchips = Vec::with_capacity(IRQCHIPS.len());
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            self.fd.get_irqchip(&mut chip).map_err(KvmError::ioctl("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        // Not every KVM has a kvmclock to save; the fixtures do not read it.
        let clock = self.fd.get_clock().ok();
        Ok(VmKernelState { irqchips, clock })
    }

    pub fn restore_state(&self, state: &VmKernelState) -> Result<(), KvmError> {
        for chip in &state.irqchips {
            self.fd.set_irqchip(chip).map_err(KvmError::ioctl("KVM_SET_IRQCHIP"))?;
        }
        if let Some(clock) = &state.clock {
            let mut clock = *clock;
            // Only the clock value may be set; the other flags are read-only outputs.
            clock.flags = 0;
            self.fd.set_clock(&clock).map_err(KvmError::ioctl("KVM_SET_CLOCK"))?;
        }
        Ok(())
    }
}
