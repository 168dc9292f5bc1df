//! The fence's one state word: `Armed(deadline)`, then `Tripped` or
//! `Disarmed`, for good. Every change is one compare-and-swap of the whole
//! word, so no thread can see the fence half-way between two states: a
//! `disarm` and a trip cannot both succeed, an extension never revives a
//! tripped fence, and a vCPU that is allowed to run was allowed at one instant.
//!
//! Time is an argument (microseconds on the lease's clock), so the same code
//! runs under the `loom` model checker (agent/tests/loom_fence.rs includes this
//! file with loom's atomics as `super::sync`) and under the handover model.
//!
//! ```text
//!   Armed(d) ──extend(d' > d)──▶ Armed(d')
//!   Armed(d) ──now ≥ d, or trip()──▶ Tripped      (vCPUs never enter the guest again)
//!   Armed(d) ──disarm_at(now < d)──▶ Disarmed     (the VM is this host's alone)
//! ```

use super::sync::{AtomicU64, Ordering};

const STATE_SHIFT: u32 = 62;
const DEADLINE_MASK: u64 = (1 << STATE_SHIFT) - 1;
const ARMED: u64 = 0;
const TRIPPED: u64 = 1 << STATE_SHIFT;
const DISARMED: u64 = 2 << STATE_SHIFT;

/// What the fence says, read at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FencePhase {
    /// The VM may run until the deadline (µs on the lease's clock).
    Armed { deadline_us: u64 },
    /// The deadline passed (or the fence was tripped on purpose): never again.
    Tripped,
    /// The lease is no longer needed: no deadline.
    Disarmed,
}

fn decode(word: u64) -> FencePhase {
    match word & !DEADLINE_MASK {
        ARMED => FencePhase::Armed { deadline_us: word & DEADLINE_MASK },
        TRIPPED => FencePhase::Tripped,
        _ => FencePhase::Disarmed,
    }
}

pub struct FenceState {
    word: AtomicU64,
}

impl FenceState {
    pub fn new(deadline_us: u64) -> FenceState {
        FenceState { word: AtomicU64::new(ARMED | (deadline_us & DEADLINE_MASK)) }
    }

    pub fn phase(&self) -> FencePhase {
        decode(self.word.load(Ordering::SeqCst))
    }

    /// Applies `step` to the current word until a compare-and-swap succeeds or
    /// `step` declines (None); returns the phase the word was left in.
    ///
    /// The first read is a read-modify-write (`fetch_or(0)`), not a load: the
    /// vCPU's "mark, then check" and the watchdog's "trip, then read the marks"
    /// are a store-buffering pattern, which is only safe if each side's second
    /// access reads the latest value. A read-modify-write always does, and
    /// synchronizes with the other side's, whatever the memory model (loom
    /// models `SeqCst` as acquire/release and finds the plain-load version wrong).
    fn update(&self, step: impl Fn(FencePhase) -> Option<u64>) -> FencePhase {
        let mut current = self.word.fetch_or(0, Ordering::SeqCst);
        loop {
            let Some(next) = step(decode(current)) else { return decode(current) };
            match self.word.compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return decode(next),
                Err(actual) => current = actual,
            }
        }
    }

    /// Moves an armed fence's deadline later (never earlier). No effect once
    /// tripped or disarmed.
    pub fn extend(&self, deadline_us: u64) {
        let deadline_us = deadline_us & DEADLINE_MASK;
        self.update(|phase| match phase {
            FencePhase::Armed { deadline_us: d } if deadline_us > d => Some(ARMED | deadline_us),
            _ => None,
        });
    }

    /// Whether the VM may run at `now_us`; past the deadline this trips the fence.
    pub fn allows_running_at(&self, now_us: u64) -> bool {
        let phase = self.update(|phase| match phase {
            FencePhase::Armed { deadline_us } if now_us >= deadline_us => Some(TRIPPED),
            _ => None,
        });
        !matches!(phase, FencePhase::Tripped)
    }

    /// Takes the VM for good if the deadline has not passed at `now_us`
    /// (true; also if already disarmed). Refused (false) once the fence has
    /// tripped or the deadline has passed: the source may be restoring its copy.
    pub fn disarm_at(&self, now_us: u64) -> bool {
        let phase = self.update(|phase| match phase {
            FencePhase::Armed { deadline_us } if now_us < deadline_us => Some(DISARMED),
            FencePhase::Armed { .. } => Some(TRIPPED),
            _ => None,
        });
        phase == FencePhase::Disarmed
    }

    /// Stops the VM for good now, whatever the deadline: true unless the fence
    /// was disarmed first (then the VM is this host's and keeps running).
    pub fn trip(&self) -> bool {
        let phase = self.update(|phase| match phase {
            FencePhase::Armed { .. } => Some(TRIPPED),
            _ => None,
        });
        phase == FencePhase::Tripped
    }
}

/// vCPUs that may be inside the guest: one bit per vCPU, set before the vCPU
/// checks the fence and cleared once it is out of `KVM_RUN`. The watchdog
/// reads it after tripping the fence: a vCPU whose check came before the trip
/// is marked, so it is kicked; one whose check came after sees the trip.
pub struct VcpuMarks {
    bits: AtomicU64,
}

impl Default for VcpuMarks {
    fn default() -> Self {
        VcpuMarks { bits: AtomicU64::new(0) }
    }
}

impl VcpuMarks {
    /// vCPU `id` (taken modulo 64) is about to check the fence and enter.
    pub fn entering(&self, id: u8) {
        self.bits.fetch_or(1 << (id % 64), Ordering::SeqCst);
    }

    /// vCPU `id` is out of the guest (or decided not to enter).
    pub fn left(&self, id: u8) {
        self.bits.fetch_and(!(1 << (id % 64)), Ordering::SeqCst);
    }

    /// Whether vCPU `id` may be inside the guest (a read-modify-write, see `FenceState::update`).
    pub fn inside(&self, id: u8) -> bool {
        self.bits.fetch_or(0, Ordering::SeqCst) & (1 << (id % 64)) != 0
    }
}
