//! The atomics `state.rs` uses: std's here (the loom model in
//! agent/tests/loom_fence.rs gives the same file loom's).

pub use std::sync::atomic::{AtomicU64, Ordering};
