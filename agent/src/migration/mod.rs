//! Live migration between agents: the wire protocol, the messages, and the
//! source and destination sides of pre-copy, post-copy, hybrid and PostCopyFT
//! (post-copy with reverse incremental checkpoints and failover).

pub mod auth;
pub mod checkpoint;
pub mod crash;
pub mod destination;
pub mod handshake;
pub mod lease;
pub mod messages;
pub mod protocol;
mod replies;
pub mod source;
pub mod stager;
pub mod staging;
