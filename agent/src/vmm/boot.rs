//! The boot environment the VMM builds for a fixture guest: 64-bit long mode
//! with identity-mapped 2 MiB pages (guest memory, and the first 2 MiB of the
//! device MMIO windows at [`abi::MMIO_GPA`]), a flat GDT, the program at
//! [`abi::CODE_GPA`] and its parameter block at [`abi::PARAMS_GPA`].
//! Pure logic: it writes guest memory and computes register values.

use crate::vmm::memory::{GuestMemory, MemoryError};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use std::ops::Range;
use vm_fixtures::abi;

const GIB: u64 = 1 << 30;
const PTE_PRESENT_RW: u64 = 0b11;
const PDE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT entries: null, 64-bit code, data, TSS (the selectors are index * 8).
const GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff];
const CODE_SELECTOR: u16 = 1 << 3;
const DATA_SELECTOR: u16 = 2 << 3;
const TSS_SELECTOR: u16 = 3 << 3;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest memory of {size} bytes is larger than the {max} GiB the boot page tables map")]
    TooLarge { size: u64, max: u64 },
    #[error("guest memory of {size} bytes is too small: the fixture needs at least {needed} bytes")]
    TooSmall { size: u64, needed: u64 },
    #[error("fixture image of {0} bytes does not fit the code area")]
    ImageTooLarge(usize),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Writes the page tables, GDT, program and parameter block into fresh guest memory.
pub fn write_boot_image(memory: &GuestMemory, image: &[u8], params: &[u8], ws_end: u64) -> Result<(), BootError> {
    let size = memory.size();
    let gib = size.div_ceil(GIB);
    if gib > abi::MAX_MEM_GIB {
        return Err(BootError::TooLarge { size, max: abi::MAX_MEM_GIB });
    }
    if memory.check(0, ws_end).is_err() {
        return Err(BootError::TooSmall { size, needed: ws_end });
    }
    if image.len() as u64 > abi::CODE_MAX_BYTES {
        return Err(BootError::ImageTooLarge(image.len()));
    }
    memory.write_u64(abi::PML4_GPA, abi::PDPT_GPA | PTE_PRESENT_RW)?;
    for g in 0..gib {
        let pd = abi::PD_GPA + g * abi::PAGE_SIZE;
        memory.write_u64(abi::PDPT_GPA + g * 8, pd | PTE_PRESENT_RW)?;
        let entries: Vec<u8> =
            (0..512u64).flat_map(|i| ((g * GIB + (i << 21)) | PTE_PRESENT_RW | PDE_HUGE).to_le_bytes()).collect();
        memory.write(pd, &entries)?;
    }
    // The device MMIO windows: their first 2 MiB, identity-mapped (no memory backs them).
    let mmio_gib = abi::MMIO_GPA / GIB;
    memory.write_u64(abi::PDPT_GPA + mmio_gib * 8, abi::MMIO_PD_GPA | PTE_PRESENT_RW)?;
    memory.write_u64(abi::MMIO_PD_GPA, abi::MMIO_GPA | PTE_PRESENT_RW | PDE_HUGE)?;
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    memory.write(abi::GDT_GPA, &gdt)?;
    memory.write(abi::CODE_GPA, image)?;
    memory.write(abi::PARAMS_GPA, params)?;
    Ok(())
}

/// Writes the prefill pattern over `ranges` of guest memory (`--prefill`:
/// every page the boot image does not use, see
/// [`vm_fixtures::FixtureParams::prefill_ranges`]), 1 MiB at a time.
pub fn write_prefill(memory: &GuestMemory, ranges: &[Range<u64>]) -> Result<(), BootError> {
    let mut chunk = vec![0u8; 1 << 20];
    for range in ranges {
        let mut gpa = range.start;
        while gpa < range.end {
            let len = (range.end - gpa).min(chunk.len() as u64) as usize;
            vm_fixtures::prefill_bytes(gpa, &mut chunk[..len]);
            memory.write(gpa, &chunk[..len])?;
            gpa += len as u64;
        }
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for long mode, starting from the vCPU's reset values.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(CODE_SELECTOR, 0xb, true);
    let data = segment(DATA_SELECTOR, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment { s: 0, db: 0, l: 0, ..segment(TSS_SELECTOR, 0xb, false) };
    sregs.gdt.base = abi::GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_PG;
    sregs.cr3 = abi::PML4_GPA;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the fixture's entry for vCPU `index`.
pub fn entry_regs(index: u8) -> kvm_regs {
    kvm_regs {
        rip: abi::CODE_GPA,
        rdi: abi::PARAMS_GPA,
        rsi: u64::from(index),
        rsp: abi::STACKS_GPA + (u64::from(index) + 1) * abi::STACK_BYTES,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_maps_every_gib_with_huge_pages() {
        let memory = GuestMemory::new(3 * GIB, GIB).unwrap();
        write_boot_image(&memory, &[0x90; 8], &[1, 2, 3], 2 << 20).unwrap();
        assert_eq!(memory.read_u64(abi::PML4_GPA).unwrap(), abi::PDPT_GPA | 3);
        for g in 0..3 {
            let pd = memory.read_u64(abi::PDPT_GPA + g * 8).unwrap() & !0xfff;
            assert_eq!(pd, abi::PD_GPA + g * 4096);
            // The last 2 MiB page of this GiB maps to itself.
            let last = memory.read_u64(pd + 511 * 8).unwrap();
            assert_eq!(last, (g * GIB + (511 << 21)) | 0x83);
        }
        assert_eq!(memory.read_u64(abi::PDPT_GPA + 3 * 8).unwrap(), 0, "no 4th GiB");
        let mut code = [0u8; 8];
        memory.read(abi::CODE_GPA, &mut code).unwrap();
        assert_eq!(code, [0x90; 8]);
    }

    #[test]
    fn prefill_writes_every_page_but_the_boot_image() {
        let mem = 8 << 20;
        let ws_pages = (mem - abi::WORKING_SET_GPA) / abi::PAGE_SIZE;
        let params = vm_fixtures::FixtureParams {
            prefill: true,
            ..vm_fixtures::FixtureParams::new(vm_fixtures::FixtureKind::Dirty, 2, ws_pages)
        };
        let memory = GuestMemory::new(mem, 4 << 20).unwrap();
        write_prefill(&memory, &params.prefill_ranges(mem)).unwrap();
        write_boot_image(&memory, &[0x90; 8], &params.encode(), params.ws_end()).unwrap();
        let boot = params.boot_ranges(mem);
        let mut page = vec![0u8; abi::PAGE_SIZE as usize];
        for gpa in (0..mem).step_by(abi::PAGE_SIZE as usize) {
            memory.read(gpa, &mut page).unwrap();
            let in_boot = boot.iter().any(|r| r.contains(&gpa));
            if !in_boot {
                assert_eq!(&page[..8], &vm_fixtures::prefill_word(gpa).to_le_bytes(), "page {gpa:#x}");
                assert!(page.chunks_exact(8).all(|w| w != [0; 8]), "a zero word in page {gpa:#x}");
            }
        }
        // The boot image is intact: the parameter block and the page tables.
        assert_eq!(memory.read_u64(abi::PARAMS_GPA).unwrap(), abi::PARAMS_MAGIC);
        assert_eq!(memory.read_u64(abi::PML4_GPA).unwrap(), abi::PDPT_GPA | 3);
    }

    #[test]
    fn refuses_memory_the_layout_cannot_hold() {
        let memory = GuestMemory::new(2 << 20, 2 << 20).unwrap();
        assert!(matches!(
            write_boot_image(&memory, &[0x90], &[], 4 << 20),
            Err(BootError::TooSmall { needed, .. }) if needed == 4 << 20
        ));
    }

    #[test]
    fn vcpu_stacks_do_not_overlap() {
        let tops: Vec<u64> = (0..abi::MAX_VCPUS as u8).map(|i| entry_regs(i).rsp).collect();
        assert!(tops.windows(2).all(|w| w[1] - w[0] == abi::STACK_BYTES));
        assert!(*tops.last().unwrap() <= abi::WORKING_SET_GPA);
    }
}
