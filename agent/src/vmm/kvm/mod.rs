//! The kernel edge: every KVM ioctl the agent makes goes through this module.
//!
//! It mirrors kvm-ioctls' fd levels (system/VM → [`vm::KvmVm`], vCPU →
//! [`vcpu::KvmVcpu`]) and returns plain data ([`state`]) and our own exit enum
//! ([`vcpu::VcpuExit`]), so the VMM logic above never touches an ioctl.

pub mod dirty_ring;
pub mod error;
pub mod kick;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use error::KvmError;
