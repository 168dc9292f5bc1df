//! PostCopyFT: reverse incremental checkpoints from the destination, the
//! source's store of them, the lease, and failover. Where a checkpoint
//! commits: the destination's [`checkpointer`] sends an epoch's pages and its
//! commit record; the source's [`stager`] stages them and [`store`] commits
//! the epoch, which is then acked and releases the epoch's output at the
//! destination ([`destination`]).

pub mod checkpointer;
pub mod destination;
pub mod failover;
pub mod lease;
pub mod source;
pub mod stager;
pub mod staging;
pub mod store;
