//! The PostCopyFT host agent: a small KVM VMM whose guests' state can be
//! captured exactly, the base for fault-tolerant post-copy live migration.
//!
//! One folder a concern, and knowledge flows one way (docs/architecture.md,
//! "Inside the agent: the layout"): [`vmm`] runs a VM on KVM (and is the only code that makes
//! ioctls); [`wire`] is the frame codec, authentication and the messages;
//! [`migration`] moves a VM between agents over the wire; [`agent`] is the
//! daemon, its client and HTTP endpoint; [`metrics`] (and its timeline) is
//! what every floor reports to.

#![warn(clippy::too_many_lines)]

pub mod agent;
pub mod clock;
pub mod fault;
/// Property checks for the fuzzers (tests and `fuzz/`); see docs/protocol.md, "Fuzzing".
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod host;
pub mod metrics;
pub mod migration;
pub mod vmm;
pub mod wire;
