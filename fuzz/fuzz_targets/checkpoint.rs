//! Checkpoints: a checkpoint store beside its shadow model, fed a destination's
//! stream, arbitrary operations, and mutated tagged streams (see `pcft_agent::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pcft_agent::fuzzing::fuzz_checkpoint(data));
