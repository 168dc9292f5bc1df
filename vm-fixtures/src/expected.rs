//! The expected state of a fixture guest and the exact comparison against a
//! real guest's memory and output.

use crate::mix;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::Range;

/// One record that the guest emitted through the output device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OutputRecord {
    pub vcpu: u32,
    pub step: u64,
    pub digest: u64,
}

/// Guest memory and output as the oracle computes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    ws_base: u64,
    ws_end: u64,
    /// Every 8-byte word of the working set that the guest wrote as `(gpa,
    /// value)`, sorted by address; without the prefill, only the non-zero ones.
    words: Vec<(u64, u64)>,
    /// Whether memory started prefilled (see `prefill.rs`): then a word the
    /// guest did not write holds the prefill pattern, not zero.
    prefill: bool,
    /// Per vCPU, the records in the order that vCPU emits them.
    outputs: Vec<Vec<OutputRecord>>,
}

/// The guest's memory differs from the oracle's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("guest memory differs from the oracle in {differing_words} words; first at {first_gpa:#x}: expected {expected:#018x}, found {actual:#018x}")]
pub struct MemoryMismatch {
    pub differing_words: u64,
    pub first_gpa: u64,
    pub expected: u64,
    pub actual: u64,
}

/// The guest's output differs from the oracle's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vCPU {vcpu} output differs from the oracle at record {index}: expected {expected:?}, found {actual:?}")]
pub struct OutputMismatch {
    pub vcpu: u32,
    pub index: usize,
    pub expected: Option<OutputRecord>,
    pub actual: Option<OutputRecord>,
}

/// Order-independent digest of a set of `(gpa, value)` words: the same number
/// for the oracle's map and for a scan of real guest memory.
fn word_digest(gpa: u64, value: u64) -> u64 {
    mix(gpa ^ mix(value))
}

/// Digest of guest memory `bytes` that starts at guest-physical `base`
/// (length a multiple of 8). Zero words do not contribute.
pub fn memory_digest(base: u64, bytes: &[u8]) -> u64 {
    let mut digest = 0u64;
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        let value = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        if value != 0 {
            digest = digest.wrapping_add(word_digest(base + i as u64 * 8, value));
        }
    }
    digest
}

impl Expected {
    pub(crate) fn new(
        ws_base: u64,
        ws_end: u64,
        words: HashMap<u64, u64>,
        outputs: Vec<Vec<OutputRecord>>,
        prefill: bool,
    ) -> Self {
        // Prefilled, a written zero differs from the word before it: keep it.
        let mut words: Vec<(u64, u64)> = words.into_iter().filter(|(_, v)| prefill || *v != 0).collect();
        words.sort_unstable();
        Expected { ws_base, ws_end, words, outputs, prefill }
    }

    /// The word at `gpa` where the guest did not write: the prefill pattern, or zero.
    fn initial(&self, gpa: u64) -> u64 {
        if self.prefill {
            crate::prefill_word(gpa)
        } else {
            0
        }
    }

    /// Every word of the working set the guest wrote as `(gpa, value)`, sorted
    /// by address (without the prefill, only the non-zero ones: the rest is zero).
    pub fn words(&self) -> &[(u64, u64)] {
        &self.words
    }

    /// The expected value of the word at `gpa` (if never written: 0, or the prefill pattern).
    pub fn word(&self, gpa: u64) -> u64 {
        match self.words.binary_search_by_key(&gpa, |(g, _)| *g) {
            Ok(i) => self.words[i].1,
            Err(_) => self.initial(gpa),
        }
    }

    /// The index range of `words` that falls in `[start, end)`.
    fn words_in(&self, range: Range<u64>) -> Range<usize> {
        let lo = self.words.partition_point(|(g, _)| *g < range.start);
        let hi = self.words.partition_point(|(g, _)| *g < range.end);
        lo..hi
    }

    pub fn outputs(&self) -> &[Vec<OutputRecord>] {
        &self.outputs
    }

    /// The digest of the expected working set (see [`memory_digest`]).
    /// Prefilled, every word of the working set counts: linear in its size.
    pub fn memory_digest(&self) -> u64 {
        if !self.prefill {
            return self.words.iter().fold(0u64, |d, &(gpa, value)| d.wrapping_add(word_digest(gpa, value)));
        }
        let mut written = self.words.iter().peekable();
        let mut digest = 0u64;
        for gpa in (self.ws_base..self.ws_end).step_by(8) {
            let value = match written.peek() {
                Some(&&(g, v)) if g == gpa => {
                    written.next();
                    v
                }
                _ => self.initial(gpa),
            };
            if value != 0 {
                digest = digest.wrapping_add(word_digest(gpa, value));
            }
        }
        digest
    }

    /// Guest-physical range of the working set `[start, end)`.
    pub fn working_set(&self) -> (u64, u64) {
        (self.ws_base, self.ws_end)
    }

    /// Starts a word-for-word comparison of the working set with the oracle;
    /// feed it the guest's memory in chunks, in any order, then `finish`.
    pub fn memory_check(&self) -> MemoryCheck<'_> {
        MemoryCheck { expected: self, fed: 0, differing: 0, first: None, digest: 0 }
    }

    /// Compares the whole working set, given as one slice from `ws_base` to `ws_end`.
    pub fn check_memory(&self, ws: &[u8]) -> Result<u64, MemoryMismatch> {
        let mut check = self.memory_check();
        check.feed(self.ws_base, ws);
        check.finish()
    }

    /// Compares the emitted records with the oracle: per vCPU, the same records
    /// in the same order, none missing and none extra. Records of different
    /// vCPUs may interleave in any order.
    pub fn check_outputs(&self, records: &[OutputRecord]) -> Result<(), OutputMismatch> {
        let mut per_vcpu: Vec<Vec<OutputRecord>> = vec![Vec::new(); self.outputs.len()];
        for r in records {
            match per_vcpu.get_mut(r.vcpu as usize) {
                Some(list) => list.push(*r),
                None => return Err(OutputMismatch { vcpu: r.vcpu, index: 0, expected: None, actual: Some(*r) }),
            }
        }
        for (v, (expected, actual)) in self.outputs.iter().zip(&per_vcpu).enumerate() {
            let len = expected.len().max(actual.len());
            for index in 0..len {
                let (e, a) = (expected.get(index).copied(), actual.get(index).copied());
                if e != a {
                    return Err(OutputMismatch { vcpu: v as u32, index, expected: e, actual: a });
                }
            }
        }
        Ok(())
    }
}

/// An ongoing comparison of guest memory with the oracle (see [`Expected::memory_check`]).
pub struct MemoryCheck<'a> {
    expected: &'a Expected,
    fed: u64,
    differing: u64,
    first: Option<(u64, u64, u64)>,
    digest: u64,
}

impl MemoryCheck<'_> {
    /// Compares `bytes`, the guest's memory at `gpa` (8-byte aligned); bytes
    /// outside the working set are ignored. Linear in the chunk: it walks the
    /// oracle's sorted words alongside memory.
    pub fn feed(&mut self, gpa: u64, bytes: &[u8]) {
        let (base, end) = self.expected.working_set();
        let start = gpa.max(base);
        let stop = (gpa + bytes.len() as u64).min(end);
        if start >= stop {
            return;
        }
        let mut expected = self.expected.words[self.expected.words_in(start..stop)].iter().peekable();
        let first = ((start - gpa) / 8) as usize;
        let count = ((stop - start) / 8) as usize;
        for (i, chunk) in bytes.chunks_exact(8).skip(first).take(count).enumerate() {
            let word_gpa = start + i as u64 * 8;
            let actual = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
            let want = match expected.peek() {
                Some(&&(g, v)) if g == word_gpa => {
                    expected.next();
                    v
                }
                _ => self.expected.initial(word_gpa),
            };
            if actual != 0 {
                self.digest = self.digest.wrapping_add(word_digest(word_gpa, actual));
            }
            if actual != want {
                self.differing += 1;
                if self.first.is_none_or(|(g, _, _)| word_gpa < g) {
                    self.first = Some((word_gpa, want, actual));
                }
            }
        }
        self.fed += stop - start;
    }

    /// The verdict, and on success the memory digest (see [`memory_digest`]).
    ///
    /// # Panics
    /// If the chunks fed did not cover the working set exactly once.
    pub fn finish(self) -> Result<u64, MemoryMismatch> {
        let (base, end) = self.expected.working_set();
        assert_eq!(self.fed, end - base, "memory check fed {} bytes of a {}-byte working set", self.fed, end - base);
        match self.first {
            None => Ok(self.digest),
            Some((first_gpa, expected, actual)) => {
                Err(MemoryMismatch { differing_words: self.differing, first_gpa, expected, actual })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FixtureKind, FixtureParams};

    fn small() -> (FixtureParams, Expected) {
        let p = FixtureParams { steps: 200, record_every: 50, ..FixtureParams::new(FixtureKind::Ledger, 2, 16) };
        let e = p.expected_after(200);
        (p, e)
    }

    fn render(p: &FixtureParams, e: &Expected) -> Vec<u8> {
        let mut ws = vec![0u8; (p.ws_end() - p.ws_base) as usize];
        for &(gpa, value) in e.words() {
            let off = (gpa - p.ws_base) as usize;
            ws[off..off + 8].copy_from_slice(&value.to_le_bytes());
        }
        ws
    }

    #[test]
    fn memory_check_accepts_the_oracle_and_rejects_a_flipped_bit() {
        let (p, e) = small();
        let mut ws = render(&p, &e);
        assert_eq!(e.check_memory(&ws), Ok(e.memory_digest()));
        assert_eq!(memory_digest(p.ws_base, &ws), e.memory_digest());
        // Fed in two chunks, in reverse order, with bytes outside the working set.
        let mut check = e.memory_check();
        let half = ws.len() / 2;
        check.feed(p.ws_base + half as u64, &ws[half..]);
        let mut head = vec![0xffu8; 4096];
        head.extend_from_slice(&ws[..half]);
        check.feed(p.ws_base - 4096, &head);
        assert_eq!(check.finish(), Ok(e.memory_digest()));
        ws[4096 * 3 + 17] ^= 0x10;
        let err = e.check_memory(&ws).unwrap_err();
        assert_eq!(err.differing_words, 1);
        assert_eq!(err.first_gpa, p.ws_base + 4096 * 3 + 16);
    }

    #[test]
    fn output_check_allows_interleaving_but_not_loss_or_reordering() {
        let (_, e) = small();
        let mut interleaved = Vec::new();
        for i in 0..4 {
            interleaved.push(e.outputs()[1][i]);
            interleaved.push(e.outputs()[0][i]);
        }
        assert_eq!(e.check_outputs(&interleaved), Ok(()));
        let mut lost = interleaved.clone();
        lost.remove(3);
        assert!(e.check_outputs(&lost).is_err());
        let mut swapped = interleaved;
        swapped.swap(1, 3);
        assert_eq!(e.check_outputs(&swapped).unwrap_err().vcpu, 0);
    }
}
