//! The kernel edge: every KVM ioctl the agent makes goes through this module.
//!
//! It mirrors kvm-ioctls' fd levels (system/VM → [`vm::KvmVm`], vCPU →
//! [`vcpu::KvmVcpu`]) and returns plain data ([`state`]) and our own exit enum
//! ([`vcpu::VcpuExit`]), so the VMM logic above never touches an ioctl.

pub mod dirty_ring;
pub mod kick;
pub mod state;
pub mod vcpu;
pub mod vm;

/// An ioctl that failed, named, with the kernel's errno.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl KvmError {
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |source| KvmError::Ioctl { op, source }
    }

    /// A hint for the operator about what to do, where one is known.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            KvmError::Open(e) if e.errno() == libc::ENOENT => {
                Some("this host has no /dev/kvm: enable virtualization and load the kvm module")
            }
            KvmError::Open(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
                Some("run pcft as root (the agent needs /dev/kvm and, later, BPF and userfaultfd)")
            }
            _ => None,
        }
    }
}
