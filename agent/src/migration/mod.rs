//! Live migration between agents: the source and destination endpoints of
//! pre-copy, post-copy, hybrid and PostCopyFT (post-copy with reverse
//! incremental checkpoints and failover). The endpoints are state machines
//! ([`source`], [`destination`]); post-copy's page path is in [`postcopy`],
//! PostCopyFT in [`ft`]; [`return_path`] carries the destination's frames
//! back; [`progress`] is how far an outgoing migration has got.

pub mod destination;
pub mod error;
pub mod ft;
pub mod postcopy;
pub mod progress;
pub mod return_path;
pub mod source;
