//! The guest's network: a virtio-net device ([`device`]) on the virtio-mmio
//! transport, and its host end, a tap ([`tap`], the kernel edge).

pub mod device;
pub mod provision;
pub mod tap;
