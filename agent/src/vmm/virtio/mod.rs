//! virtio 1.x for the fixture platform: the virtio-mmio transport's register
//! file ([`mmio`]) and split virtqueues over guest memory ([`queue`]). Pure
//! logic: no kernel calls; a device (e.g. [`crate::vmm::net`]) drives them.
//!
//! Why not rust-vmm's `virtio-queue`: it walks rings through `vm-memory`'s
//! `GuestMemory` trait, and ours is a raw mapping that also serves
//! userfaultfd and revocation, and whose device writes must be reported as
//! dirty pages to pre-copy and checkpoints. The split ring is small enough to
//! keep in view here (and [`queue`]'s tests play the driver's side).

pub mod mmio;
pub mod queue;
