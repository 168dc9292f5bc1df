//! Host-side re-implementations of the guest programs. Each mirrors its
//! `guest/*.S` step for step; the tests in the agent run the real guest and
//! compare, so a drift between the two fails loudly.

use crate::abi::{GOLDEN, PAGE_SIZE};
use crate::expected::{Expected, OutputRecord};
use crate::mix;
use crate::params::{DirtyPattern, FixtureKind, FixtureParams};
use std::collections::HashMap;

/// `(x * n) >> 64`: the guest's `mul` high half, a uniform index below `n`.
fn mul_high(x: u64, n: u64) -> u64 {
    ((u128::from(x) * u128::from(n)) >> 64) as u64
}

impl FixtureParams {
    /// What the guest's memory and output look like once every vCPU has run
    /// `steps` steps (use `self.steps` for a run to completion).
    pub fn expected_after(&self, steps: u64) -> Expected {
        let mut words = HashMap::new();
        let mut outputs = Vec::new();
        for v in 0..self.vcpus {
            let records = match self.kind {
                FixtureKind::Ledger => self.ledger_vcpu(v, steps, &mut words),
                FixtureKind::Dirty => self.dirty_vcpu(v, steps, &mut words),
                FixtureKind::Idle => self.idle_vcpu(v, steps, &mut words),
                // A network service: what it holds depends on its clients, not on steps.
                FixtureKind::Kv => Vec::new(),
            };
            outputs.push(records);
        }
        Expected::new(self.ws_base, self.ws_end(), words, outputs, self.prefill)
    }

    fn page_gpa(&self, v: u64, j: u64) -> u64 {
        self.ws_base + (v + self.vcpus * j) * PAGE_SIZE
    }

    fn record(&self, v: u64, step: u64, digest: u64, out: &mut Vec<OutputRecord>) {
        if step.is_multiple_of(self.record_every) {
            out.push(OutputRecord { vcpu: v as u32, step, digest });
        }
    }

    fn ledger_vcpu(&self, v: u64, steps: u64, words: &mut HashMap<u64, u64>) -> Vec<OutputRecord> {
        let ppv = self.pages_per_vcpu();
        let mut out = Vec::new();
        let mut h = mix(self.seed.wrapping_add(v));
        for i in 1..=steps {
            let mut x = h ^ i.wrapping_mul(GOLDEN);
            for _ in 0..self.writes_per_step {
                x = mix(x);
                let word = (x >> 7) & 511;
                let gpa = self.page_gpa(v, mul_high(x, ppv)) + word * 8;
                let slot = words.entry(gpa).or_insert_with(|| self.initial_word(gpa));
                let new = mix(*slot ^ x);
                *slot = new;
                h = mix(h.wrapping_add(new));
            }
            self.record(v, i, h, &mut out);
        }
        out
    }

    fn dirty_vcpu(&self, v: u64, steps: u64, words: &mut HashMap<u64, u64>) -> Vec<OutputRecord> {
        let ppv = self.pages_per_vcpu();
        let s = mix(self.seed.wrapping_add(v));
        let mut out = Vec::new();
        for i in 1..=steps {
            let j = match self.pattern {
                DirtyPattern::Sequential => (i - 1) % ppv,
                DirtyPattern::Random | DirtyPattern::HotCold { .. } => {
                    let x = mix(i.wrapping_mul(GOLDEN) ^ s);
                    let hot = matches!(self.pattern, DirtyPattern::HotCold { .. }) && (x & 1023) < self.hot_threshold();
                    mul_high(x, if hot { self.hot_pages() } else { ppv })
                }
            };
            words.insert(self.page_gpa(v, j), i);
            self.record(v, i, j, &mut out);
        }
        out
    }

    fn idle_vcpu(&self, v: u64, steps: u64, words: &mut HashMap<u64, u64>) -> Vec<OutputRecord> {
        let mut out = Vec::new();
        if steps > 0 {
            words.insert(self.ws_base + v * PAGE_SIZE, steps);
        }
        for i in 1..=steps {
            self.record(v, i, i, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_is_deterministic_and_seed_dependent() {
        let p = FixtureParams { steps: 500, record_every: 100, ..FixtureParams::new(FixtureKind::Ledger, 2, 64) };
        let a = p.expected_after(500);
        assert_eq!(a, p.expected_after(500));
        assert_eq!(a.outputs()[0].len(), 5);
        assert_eq!(a.outputs()[1].len(), 5);
        let q = FixtureParams { seed: 7, ..p.clone() };
        assert_ne!(a.outputs()[0], q.expected_after(500).outputs()[0]);
    }

    #[test]
    fn ledger_vcpus_write_only_their_own_pages() {
        let p = FixtureParams { steps: 300, ..FixtureParams::new(FixtureKind::Ledger, 2, 64) };
        let both = p.expected_after(300);
        // Each vCPU's chain is independent of the other's, so a run with only
        // vCPU 0's records and writes is the even-page half of the 2-vCPU run.
        let mut even = 0;
        for &(gpa, _) in both.words() {
            let page = (gpa - p.ws_base) / PAGE_SIZE;
            assert!(page < 64, "write outside the working set at {gpa:#x}");
            even += usize::from(page.is_multiple_of(2));
        }
        assert!(even > 0 && even < both.words().len(), "both vCPUs write, each on its own pages");
        let fewer = p.expected_after(150);
        assert_eq!(fewer.outputs()[0][..], both.outputs()[0][..fewer.outputs()[0].len()]);
    }

    #[test]
    fn dirty_sequential_wraps_around_each_share() {
        let p = FixtureParams {
            steps: 10,
            pattern: DirtyPattern::Sequential,
            record_every: 5,
            ..FixtureParams::new(FixtureKind::Dirty, 1, 4)
        };
        let e = p.expected_after(10);
        // writes 1..=10 over pages 0,1,2,3,0,1,2,3,0,1: the last writes win.
        let base = p.ws_base;
        assert_eq!(e.word(base), 9);
        assert_eq!(e.word(base + PAGE_SIZE), 10);
        assert_eq!(e.word(base + 2 * PAGE_SIZE), 7);
        assert_eq!(e.word(base + 3 * PAGE_SIZE), 8);
        assert_eq!(
            e.outputs()[0],
            vec![OutputRecord { vcpu: 0, step: 5, digest: 0 }, OutputRecord { vcpu: 0, step: 10, digest: 1 },]
        );
    }

    #[test]
    fn dirty_hot_cold_favours_the_hot_set() {
        let p = FixtureParams {
            steps: 5_000,
            pattern: DirtyPattern::HotCold { hot_pages: 4, hot_permille: 900 },
            record_every: 1,
            ..FixtureParams::new(FixtureKind::Dirty, 1, 1_000)
        };
        let e = p.expected_after(5_000);
        let hot = e.outputs()[0].iter().filter(|r| r.digest < 4).count();
        assert!((4_300..4_700).contains(&hot), "{hot} of 5000 writes hit the hot set");
    }
}
