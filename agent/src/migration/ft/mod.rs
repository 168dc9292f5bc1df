//! PostCopyFT: reverse incremental checkpoints from the destination, the
//! source's store of them, the lease, and failover.

pub mod failover;
pub mod lease;
pub mod stager;
pub mod staging;
pub mod store;
