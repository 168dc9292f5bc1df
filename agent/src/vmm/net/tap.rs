//! A tap device: the host end of a guest's virtio-net (kernel edge, thin).
//!
//! [`Tap::create`] makes a persistent tap (it outlives the process, so a
//! snapshot restored in another process, or a migration's destination on this
//! host, can attach to it by name) and gives the host its address;
//! [`Tap::create_bridged`] makes one without an address, enslaved to an L2
//! bridge; [`Tap::attach`] opens an existing one. Frames are read and written whole,
//! non-blocking, without the packet-information header.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub const TUN_PATH: &str = "/dev/net/tun";

/// `SIOCBRADDIF` (linux/sockios.h): add the interface `ifr_ifindex` to the bridge `ifr_name`.
const SIOCBRADDIF: libc::Ioctl = 0x89a2;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is not usable: 1 to 15 characters of letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("{TUN_PATH} is missing: load the tun module (modprobe tun) or run on a host with tun/tap support")]
    NoTun,
    #[error("cannot open {TUN_PATH}: {0}; run as root (CAP_NET_ADMIN)")]
    OpenTun(std::io::Error),
    #[error(
        "tap {name} is in use by another process (a VM already attached to it): stop that VM or choose another --tap"
    )]
    Busy { name: String },
    #[error("interface {name} exists and is not a tap: choose another --tap")]
    NotATap { name: String },
    #[error("tap {name} does not exist: create it first (pcft vm run --net tap creates one)")]
    Missing { name: String },
    #[error("tap {name}: {op} failed: {source}")]
    Ioctl { name: String, op: &'static str, source: std::io::Error },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    name: String,
    file: File,
}

fn check_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(TapError::BadName(name.to_string()));
    }
    let mut raw = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in raw.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(raw)
}

fn ifreq(name: [libc::c_char; libc::IFNAMSIZ]) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name and a union of integers and sockaddrs): all zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = name;
    req
}

/// Checks that `name` can name a tap.
pub fn validate_name(name: &str) -> Result<(), TapError> {
    check_name(name).map(drop)
}

/// Whether interface `name` (which exists) is a tun/tap device.
pub fn is_tap(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("tun_flags").exists()
}

/// Whether a network interface named `name` exists on this host (in this namespace).
pub fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether interface `name` (which exists) is an L2 bridge.
pub fn is_bridge(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("bridge").is_dir()
}

/// The interface `name` is enslaved to (its bridge), if any.
pub fn master_of(name: &str) -> Option<String> {
    let link = std::fs::read_link(Path::new("/sys/class/net").join(name).join("master")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// A datagram socket for the interface ioctls (SIOCSIF*, SIOCBR*).
fn ioctl_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Tap {
    /// Creates tap `name` (persistent), gives the host `host_ip/prefix` on it, and brings it up.
    pub fn create(name: &str, host_ip: Ipv4Addr, prefix: u8) -> Result<Tap, TapError> {
        if interface_exists(name) {
            return Err(if is_tap(name) {
                TapError::Busy { name: name.to_string() }
            } else {
                TapError::NotATap { name: name.to_string() }
            });
        }
        let tap = Self::open(name)?;
        tap.ioctl_int(libc::TUNSETPERSIST, 1, "TUNSETPERSIST")?;
        let configured = tap.configure(host_ip, prefix);
        if let Err(e) = configured {
            let _ = tap.remove();
            return Err(e);
        }
        Ok(tap)
    }

    /// Creates tap `name` (persistent) without an address, enslaves it to
    /// the existing bridge `bridge`, and brings it up. The caller checks that
    /// `bridge` is one (a missing one fails here with an ioctl error).
    pub fn create_bridged(name: &str, bridge: &str) -> Result<Tap, TapError> {
        if interface_exists(name) {
            return Err(if is_tap(name) {
                TapError::Busy { name: name.to_string() }
            } else {
                TapError::NotATap { name: name.to_string() }
            });
        }
        let bridge_name = check_name(bridge)?;
        let tap = Self::open(name)?;
        tap.ioctl_int(libc::TUNSETPERSIST, 1, "TUNSETPERSIST")?;
        let configured = tap.enslave(bridge_name).and_then(|socket| tap.bring_up(&socket));
        if let Err(e) = configured {
            let _ = tap.remove();
            return Err(e);
        }
        Ok(tap)
    }

    /// Attaches to the existing tap `name` (one made by [`create`](Self::create)
    /// or [`create_bridged`](Self::create_bridged)).
    pub fn attach(name: impl AsRef<str>) -> Result<Tap, TapError> {
        let name = name.as_ref();
        check_name(name)?;
        if !interface_exists(name) {
            return Err(TapError::Missing { name: name.to_string() });
        }
        Self::open(name)
    }

    fn open(name: &str) -> Result<Tap, TapError> {
        let raw_name = check_name(name)?;
        if !Path::new(TUN_PATH).exists() {
            return Err(TapError::NoTun);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut req = ifreq(raw_name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq; `req` is one, alive for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy { name: name.to_string() },
                Some(libc::EINVAL) => TapError::NotATap { name: name.to_string() },
                _ => TapError::Ioctl { name: name.to_string(), op: "TUNSETIFF", source },
            });
        }
        Ok(Tap { name: name.to_string(), file })
    }

    fn ioctl_int(&self, request: libc::Ioctl, value: libc::c_ulong, op: &'static str) -> Result<(), TapError> {
        // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, value) };
        if rc < 0 {
            return Err(TapError::Ioctl { name: self.name.clone(), op, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Sets the host's address and netmask on the tap and brings it up (SIOCSIF* on a socket).
    fn configure(&self, host_ip: Ipv4Addr, prefix: u8) -> Result<(), TapError> {
        let err = |op| move |source| TapError::Ioctl { name: self.name.clone(), op, source };
        let socket = ioctl_socket().map_err(err("socket"))?;
        let name = check_name(&self.name)?;
        let sockaddr = |ip: Ipv4Addr| {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and both are plain data.
            unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
        };
        let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
        for (request, op, addr) in
            [(libc::SIOCSIFADDR, "SIOCSIFADDR", host_ip), (libc::SIOCSIFNETMASK, "SIOCSIFNETMASK", mask)]
        {
            let mut req = ifreq(name);
            req.ifr_ifru.ifru_addr = sockaddr(addr);
            // SAFETY: these requests read an ifreq; `req` is one, alive for the call.
            if unsafe { libc::ioctl(socket.as_raw_fd(), request, &mut req) } < 0 {
                return Err(err(op)(std::io::Error::last_os_error()));
            }
        }
        self.bring_up(&socket)
    }

    /// Adds the tap to bridge `bridge` (SIOCBRADDIF on a socket); returns the socket for more ioctls.
    fn enslave(&self, bridge: [libc::c_char; libc::IFNAMSIZ]) -> Result<OwnedFd, TapError> {
        let err = |op| move |source| TapError::Ioctl { name: self.name.clone(), op, source };
        let socket = ioctl_socket().map_err(err("socket"))?;
        let mut req = ifreq(check_name(&self.name)?);
        // SAFETY: SIOCGIFINDEX fills the ifreq's index.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } < 0 {
            return Err(err("SIOCGIFINDEX")(std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel just wrote the index member of the union.
        let index = unsafe { req.ifr_ifru.ifru_ifindex };
        let mut req = ifreq(bridge);
        req.ifr_ifru.ifru_ifindex = index;
        // SAFETY: SIOCBRADDIF reads an ifreq (the bridge's name, the port's index); `req` is one, alive for the call.
        if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDIF, &mut req) } < 0 {
            return Err(err("SIOCBRADDIF")(std::io::Error::last_os_error()));
        }
        Ok(socket)
    }

    /// Sets IFF_UP on the tap (SIOCGIFFLAGS/SIOCSIFFLAGS on `socket`).
    fn bring_up(&self, socket: &OwnedFd) -> Result<(), TapError> {
        let err = |op| move |source| TapError::Ioctl { name: self.name.clone(), op, source };
        let mut req = ifreq(check_name(&self.name)?);
        // SAFETY: SIOCGIFFLAGS fills the ifreq's flags.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(err("SIOCGIFFLAGS")(std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel just wrote the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the ifreq's flags.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } < 0 {
            return Err(err("SIOCSIFFLAGS")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the tap: it stops being persistent and goes when its last fd closes.
    pub fn remove(self) -> Result<(), TapError> {
        self.ioctl_int(libc::TUNSETPERSIST, 0, "TUNSETPERSIST")
    }

    /// Reads one frame, if one is waiting. `buf` should hold 65,535 bytes (a tap delivers frames up to its MTU).
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one frame. A full queue drops it (as a wire would; TCP retransmits).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        match (&self.file).write(frame) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            // The interface is down (its host end was taken down): the frame is lost, as on a cut cable.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Waits until `fd` is readable or `timeout` passes (with no fd: just the
/// timeout). A signal (a vCPU kick) ends the wait early. True: readable.
pub fn wait_readable(fd: Option<RawFd>, timeout: std::time::Duration) -> std::io::Result<bool> {
    let mut pollfd = libc::pollfd { fd: fd.unwrap_or(-1), events: libc::POLLIN, revents: 0 };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: one pollfd (ignored when its fd is -1) and a timespec, both alive for the call; no signal mask.
    let n = unsafe { libc::ppoll(&mut pollfd, 1, &ts, std::ptr::null()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(n > 0 && pollfd.revents & libc::POLLIN != 0)
}
