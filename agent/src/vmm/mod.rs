//! A VM on KVM: guest memory, boot, devices, vCPU workers, the machine that
//! ties them together, its state and snapshots, dirty-page tracking, the
//! fence, and the runner thread that owns a running machine. [`kvm`] is the
//! only code that makes ioctls.

pub mod boot;
pub mod devices;
pub mod dirty;
pub mod fence;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod net;
pub mod output;
pub mod page_set;
pub mod run_log;
pub mod runner;
pub mod snapshot;
pub mod state;
pub mod uffd;
mod vcpu_worker;
pub mod virtio;
