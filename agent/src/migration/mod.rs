//! Live migration between agents: the source and destination sides of
//! pre-copy, post-copy, hybrid and PostCopyFT (post-copy with reverse
//! incremental checkpoints and failover).

pub mod destination;
pub mod error;
pub mod ft;
pub mod postcopy;
pub mod progress;
pub mod source;
