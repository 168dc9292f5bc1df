//! The PostCopyFT host agent: a small KVM VMM whose guests' state can be
//! captured exactly, the base for fault-tolerant post-copy live migration.
//!
//! Layers (see docs/architecture.md): [`kvm`] is the only code that makes
//! ioctls; [`memory`] owns guest RAM; [`boot`], [`devices`] and [`snapshot`]
//! are pure logic over them; [`machine`] ties them into a running VM.

pub mod boot;
pub mod client;
pub mod clock;
pub mod daemon;
pub mod devices;
pub mod dirty;
pub mod ebpf;
pub mod fault;
pub mod fence;
/// Property checks for the fuzzers (tests and `fuzz/`); see docs/protocol.md, "Fuzzing".
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod host;
pub mod http;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod output;
pub mod page_set;
pub mod run_log;
pub mod snapshot;
pub mod timeline;
pub mod uffd;
mod vcpu_worker;
pub mod vm_runner;
