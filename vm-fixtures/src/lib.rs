//! Guest workloads for PostCopyFT and their host-side oracles.
//!
//! Each fixture is a tiny x86-64 program (`guest/*.S`, assembled by `build.rs`
//! with GNU as) that runs in the VMM's 64-bit long-mode environment and follows
//! the guest ABI in [`abi`]. For every fixture this crate can compute, on the
//! host and without running the guest, the exact guest memory and output records
//! expected after any number of steps: the oracle every VM, migration and
//! recovery test checks against.
//!
//! - `ledger`: a hash chain over a working set; every step reads, mixes and
//!   writes pseudo-random pages, and every K steps emits `(step, digest)`.
//! - `dirty`: writes pages at a configurable rate and pattern (sequential,
//!   uniform random, hot/cold) for dirty-rate experiments.
//! - `idle`: spins and writes almost nothing.
//!
//! Any of them can start with all of its memory written (`prefill`, see
//! `prefill.rs`), as a guest that has run for a while has it.

pub mod abi {
    //! The guest ABI shared with the assembler (see `src/abi.rs`).
    include!("abi.rs");
}
mod expected;
pub mod kv;
mod oracle;
mod params;
mod prefill;

pub use expected::{memory_digest, Expected, MemoryCheck, MemoryMismatch, OutputMismatch, OutputRecord};
pub use params::{DirtyPattern, FixtureKind, FixtureParams, GuestNet, ParamsError};
pub use prefill::{prefill_bytes, prefill_word};

/// splitmix64's finalizer: the mixing function of every fixture (guest and host).
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(abi::MIX_MUL1);
    x ^= x >> 27;
    x = x.wrapping_mul(abi::MIX_MUL2);
    x ^ (x >> 31)
}

/// The machine code of a fixture, to be loaded at [`abi::CODE_GPA`].
pub fn image(kind: FixtureKind) -> &'static [u8] {
    match kind {
        FixtureKind::Ledger => include_bytes!(concat!(env!("OUT_DIR"), "/ledger.bin")),
        FixtureKind::Dirty => include_bytes!(concat!(env!("OUT_DIR"), "/dirty.bin")),
        FixtureKind::Idle => include_bytes!(concat!(env!("OUT_DIR"), "/idle.bin")),
        FixtureKind::Kv => include_bytes!(concat!(env!("OUT_DIR"), "/kv.bin")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_fit_the_code_area() {
        for kind in FixtureKind::EVERY {
            let len = image(kind).len() as u64;
            assert!(len > 16 && len <= abi::CODE_MAX_BYTES, "{kind:?}: {len} bytes");
        }
    }

    #[test]
    fn mix_matches_reference_splitmix64() {
        // splitmix64(state = 0) returns mix(0 + GOLDEN) = 0xE220A8397B1DCDAF.
        assert_eq!(mix(abi::GOLDEN), 0xE220_A839_7B1D_CDAF);
    }
}
