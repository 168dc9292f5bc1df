//! The kernel edge's one error: an ioctl that failed, named.

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
