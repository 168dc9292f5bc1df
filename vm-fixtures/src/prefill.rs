//! `--prefill`: a guest whose memory starts with every page written.
//!
//! A fresh VM's memory is zero, and a migration sends a zero page as a few
//! bytes: benchmarks on such a guest measure the zero-page shortcut, not the
//! page path. With `prefill` set, the VMM writes every word of guest memory
//! that the boot image does not use with [`prefill_word`] before the first
//! vCPU runs (see [`FixtureParams::prefill_ranges`]), and the oracle expects
//! that word wherever the guest has not written. The pattern is a function of
//! the address alone, so the oracle needs no copy of it, and it differs at
//! every address, so a page that lands in the wrong place fails the check.

use crate::abi::{self, PAGE_SIZE};
use crate::params::FixtureParams;
use std::ops::Range;

const GIB: u64 = 1 << 30;

/// The word the prefill writes at `gpa` (8-byte aligned): never zero (the
/// tag's high half is set and no guest address reaches it), different at
/// every address.
pub fn prefill_word(gpa: u64) -> u64 {
    gpa ^ abi::PREFILL_TAG
}

/// Writes the prefill pattern into `bytes`, guest memory that starts at `gpa`
/// (8-byte aligned; a trailing partial word is left as it is).
pub fn prefill_bytes(gpa: u64, bytes: &mut [u8]) {
    for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&prefill_word(gpa + i as u64 * 8).to_le_bytes());
    }
}

impl FixtureParams {
    /// The pages of a `mem_bytes` guest that the boot image uses and the
    /// prefill leaves alone: the parameter block, the GDT, the mailboxes, the
    /// page tables of the mapped GiBs, the code area and the vCPUs' stacks
    /// (sorted, page-aligned, all in the first 1 MiB).
    pub fn boot_ranges(&self, mem_bytes: u64) -> Vec<Range<u64>> {
        let page_up = |bytes: u64| bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        vec![
            abi::PARAMS_GPA..abi::PARAMS_GPA + PAGE_SIZE,
            abi::GDT_GPA..abi::GDT_GPA + PAGE_SIZE,
            abi::MAILBOX_GPA..abi::MAILBOX_GPA + page_up(abi::MAX_VCPUS * abi::MAILBOX_STRIDE),
            abi::PML4_GPA..abi::PML4_GPA + PAGE_SIZE,
            abi::PDPT_GPA..abi::PDPT_GPA + PAGE_SIZE,
            abi::PD_GPA..abi::PD_GPA + mem_bytes.div_ceil(GIB) * PAGE_SIZE,
            abi::MMIO_PD_GPA..abi::MMIO_PD_GPA + PAGE_SIZE,
            abi::CODE_GPA..abi::CODE_GPA + abi::CODE_MAX_BYTES,
            abi::STACKS_GPA..abi::STACKS_GPA + self.vcpus * abi::STACK_BYTES,
        ]
    }

    /// What the VMM prefills in a `mem_bytes` guest: all of its memory but the
    /// [boot ranges](Self::boot_ranges) (sorted, page-aligned, disjoint).
    /// Empty unless `prefill` is set. The working set lies wholly inside.
    pub fn prefill_ranges(&self, mem_bytes: u64) -> Vec<Range<u64>> {
        if !self.prefill {
            return Vec::new();
        }
        let mut ranges = Vec::new();
        let mut from = 0;
        for used in self.boot_ranges(mem_bytes) {
            if used.start > from {
                ranges.push(from..used.start.min(mem_bytes));
            }
            from = from.max(used.end);
        }
        if from < mem_bytes {
            ranges.push(from..mem_bytes);
        }
        ranges.retain(|r| r.start < r.end);
        ranges
    }

    /// The word at `gpa` before the guest writes it: the prefill's, or zero.
    pub(crate) fn initial_word(&self, gpa: u64) -> u64 {
        if self.prefill {
            prefill_word(gpa)
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FixtureKind;

    fn prefilled(kind: FixtureKind, vcpus: u64, mem_bytes: u64) -> FixtureParams {
        let ws_pages = (mem_bytes - abi::WORKING_SET_GPA) / PAGE_SIZE;
        FixtureParams { prefill: true, ..FixtureParams::new(kind, vcpus, ws_pages) }
    }

    #[test]
    fn the_pattern_is_never_zero_and_differs_at_every_address() {
        for gpa in [0, 8, 0x1000, (16 << 30) - 8] {
            assert_ne!(prefill_word(gpa), 0);
        }
        assert_ne!(prefill_word(0x1000), prefill_word(0x2000));
        let mut page = [0u8; 4096];
        prefill_bytes(0x20_0000, &mut page);
        assert!(page.chunks_exact(8).all(|w| w != [0; 8]));
        assert_eq!(&page[8..16], &prefill_word(0x20_0008).to_le_bytes());
    }

    #[test]
    fn prefill_covers_all_memory_but_the_boot_image() {
        let mem = 1 << 30;
        let p = prefilled(FixtureKind::Ledger, 2, mem);
        let fill = p.prefill_ranges(mem);
        let boot = p.boot_ranges(mem);
        // Together they tile memory exactly, page-aligned.
        let mut all: Vec<Range<u64>> = fill.iter().chain(&boot).cloned().collect();
        all.sort_by_key(|r| r.start);
        let mut at = 0;
        for r in &all {
            assert_eq!(r.start, at, "{all:?}");
            assert!(r.start.is_multiple_of(PAGE_SIZE) && r.end.is_multiple_of(PAGE_SIZE), "{r:?}");
            at = r.end;
        }
        assert_eq!(at, mem);
        // The working set is prefilled; the boot image stays in the first MiB.
        assert!(fill.iter().any(|r| r.start <= p.ws_base && p.ws_end() <= r.end), "{fill:?}");
        assert!(boot.iter().all(|r| r.end <= abi::WORKING_SET_GPA));
        let boot_pages: u64 = boot.iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum();
        // params, GDT, mailboxes, PML4, PDPT, one PD, the MMIO PD, 32 code pages, 2 stacks of 4 pages.
        assert_eq!(boot_pages, 1 + 1 + 1 + 1 + 1 + 1 + 1 + 32 + 8);
        assert!(FixtureParams { prefill: false, ..p }.prefill_ranges(mem).is_empty());
    }

    #[test]
    fn the_oracle_expects_the_pattern_where_the_guest_did_not_write() {
        let mem = 4 << 20;
        for kind in FixtureKind::ALL {
            let p = FixtureParams { steps: 300, ..prefilled(kind, 2, mem) };
            let e = p.expected_after(p.steps);
            let mut ws = vec![0u8; (p.ws_end() - p.ws_base) as usize];
            prefill_bytes(p.ws_base, &mut ws);
            for &(gpa, value) in e.words() {
                let off = (gpa - p.ws_base) as usize;
                ws[off..off + 8].copy_from_slice(&value.to_le_bytes());
            }
            assert_eq!(e.check_memory(&ws), Ok(e.memory_digest()), "{kind:?}");
            assert_eq!(crate::memory_digest(p.ws_base, &ws), e.memory_digest(), "{kind:?}");
            // The same run without the prefill expects zero there: another oracle.
            let plain = FixtureParams { prefill: false, ..p.clone() }.expected_after(p.steps);
            assert!(plain.check_memory(&ws).is_err(), "{kind:?}");
            // A page left zero (or lost in a migration) fails the check.
            let untouched = (0..ws.len() / 4096).rev().find(|page| {
                let gpa = p.ws_base + (*page * 4096) as u64;
                e.words().iter().all(|&(g, _)| g / 4096 != gpa / 4096)
            });
            let page = untouched.expect("some page the guest did not write");
            ws[page * 4096..(page + 1) * 4096].fill(0);
            assert_eq!(e.check_memory(&ws).unwrap_err().differing_words, 512, "{kind:?}");
        }
    }

    #[test]
    fn the_ledger_reads_the_prefilled_word_it_overwrites() {
        // Each ledger write mixes the word's old value in: prefilled, every
        // digest of the chain differs from the plain run's.
        let p = FixtureParams { steps: 100, record_every: 10, ..prefilled(FixtureKind::Ledger, 1, 4 << 20) };
        let plain = FixtureParams { prefill: false, ..p.clone() };
        let (a, b) = (p.expected_after(100), plain.expected_after(100));
        assert!(a.outputs()[0].iter().zip(&b.outputs()[0]).all(|(x, y)| x.digest != y.digest));
    }
}
