//! Dirty-page tracking for a machine: which guest pages were written since the
//! last take, and how fast, behind one interface ([`DirtyTracker`], in
//! `tracker.rs`). Three trackers: KVM's dirty bitmap (`bitmap.rs`), KVM's dirty
//! ring drained by a harvester thread of its own (`ring.rs`), and the eBPF
//! program on the ring's pushes (`ebpf.rs` over `bpf.rs`, the program's
//! user-space side). `tracking.rs` holds the choice ([`DirtyTracking`], `auto`
//! included) and builds the tracker around the vCPUs; `rate.rs` turns a count
//! into a rate. Pre-copy rounds and PostCopyFT checkpoints take from whichever
//! the machine has.

pub mod bitmap;
pub mod bpf;
pub mod ebpf;
pub mod rate;
pub mod ring;
pub mod tracker;
pub mod tracking;

pub use tracker::{DirtyError, DirtyTracker};
pub use tracking::{DirtyTracking, TrackerPlan};
