//! Frames: the codec and frame readers (with and without a MAC) over any bytes,
//! and a reader with a MAC over mutations of a tagged stream (see `pcft_agent::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pcft_agent::fuzzing::fuzz_frame(data));
