//! What reached the clients on the wire: every frame the VM sent, captured in
//! the client namespace on each host's port of the clients' bridge (an
//! AF_PACKET socket per port, no tcpdump), and the audit of those that came
//! through the destination's port against the destination agent's frame
//! trace (`pcft agent --frame-trace`): after a failover, no frame that an
//! epoch which never committed produced may have reached the clients. That is
//! network output commit, checked from outside the agents.

use crate::cli::netns::enter_netns;
use anyhow::{bail, Context, Result};
use pcft_agent::fault::frame_trace::{frame_hash, FrameTrace};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The capture running on both hosts' ports.
pub struct Capture {
    stop: Arc<AtomicBool>,
    source: JoinHandle<Result<Vec<u64>>>,
    destination: JoinHandle<Result<Vec<u64>>>,
}

/// The hashes of the frames the VM sent that reached the clients, by the host they came through.
pub struct Captured {
    pub source: Vec<u64>,
    pub destination: Vec<u64>,
    /// Why a port could not be captured.
    pub error: Option<String>,
}

impl Capture {
    /// Captures, in namespace `ns`, the frames from `mac` that arrive on
    /// `source_port` and `destination_port` (the client ends of each host's veth).
    pub fn start(ns: &str, source_port: &str, destination_port: &str, mac: [u8; 6]) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |port: &str| {
            let (ns, port, stop) = (ns.to_string(), port.to_string(), Arc::clone(&stop));
            std::thread::spawn(move || {
                enter_netns(&ns)?;
                let socket = PacketSocket::open(&port)?;
                let mut hashes = Vec::new();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Some(frame) = socket.receive(&mut buf)? {
                        if frame.get(6..12) == Some(&mac[..]) {
                            hashes.push(frame_hash(frame));
                        }
                    }
                }
                Ok(hashes)
            })
        };
        let (source, destination) = (spawn(source_port), spawn(destination_port));
        Capture { stop, source, destination }
    }

    /// Stops capturing (a moment after, for frames still on their way).
    pub fn finish(self) -> Captured {
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        let join = |t: JoinHandle<Result<Vec<u64>>>| {
            t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the capture thread panicked")))
        };
        let (source, destination) = (join(self.source), join(self.destination));
        let error = [&source, &destination].iter().find_map(|r| r.as_ref().err().map(|e| format!("{e:#}")));
        Captured { source: source.unwrap_or_default(), destination: destination.unwrap_or_default(), error }
    }
}

/// What reached the clients, checked against the destination's frame trace.
pub struct FrameAudit {
    pub from_source: usize,
    pub from_destination: usize,
    /// Frames that came through the destination's port and that only epochs
    /// after the restored one produced (must be 0).
    pub uncommitted: usize,
    pub error: Option<String>,
}

impl FrameAudit {
    /// The audit of `captured` against the destination's `trace`, whose VM the
    /// source restored from checkpoint `restored_epoch` (None: no failover, every epoch committed).
    pub fn new(captured: &Captured, trace: &FrameTrace, restored_epoch: Option<u64>) -> FrameAudit {
        let uncommitted = restored_epoch
            .map_or(0, |epoch| captured.destination.iter().filter(|&&hash| trace.uncommitted(hash, epoch)).count());
        FrameAudit {
            from_source: captured.source.len(),
            from_destination: captured.destination.len(),
            uncommitted,
            error: captured.error.clone(),
        }
    }
}

/// An AF_PACKET socket that receives every frame on one interface (the kernel edge).
struct PacketSocket {
    fd: OwnedFd,
}

/// `PACKET_OUTGOING`: a frame this host sent (we want the ones it received).
const PACKET_OUTGOING: u8 = 4;

impl PacketSocket {
    fn open(dev: &str) -> Result<PacketSocket> {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(protocol)) };
        if raw < 0 {
            bail!("cannot open a packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(dev).context("interface name")?;
        // SAFETY: if_nametoindex(3) reads the NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            bail!("no interface {dev} to capture on: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: bind(2) reads `len` bytes of `addr`, which lives across the call.
        if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) } != 0 {
            bail!("cannot capture on {dev}: {}", std::io::Error::last_os_error());
        }
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        let buffer: libc::c_int = 4 << 20;
        for (option, value, size) in [
            (libc::SO_RCVTIMEO, std::ptr::addr_of!(timeout).cast(), std::mem::size_of::<libc::timeval>()),
            (libc::SO_RCVBUF, std::ptr::addr_of!(buffer).cast(), std::mem::size_of::<libc::c_int>()),
        ] {
            // SAFETY: setsockopt(2) reads `size` bytes of a value that lives across the call.
            if unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, option, value, size as libc::socklen_t) }
                != 0
            {
                bail!("cannot set up the capture on {dev}: {}", std::io::Error::last_os_error());
            }
        }
        Ok(PacketSocket { fd })
    }

    /// The next frame received on the interface (not sent by it), or None after the 100 ms timeout.
    fn receive<'a>(&self, buf: &'a mut [u8]) -> Result<Option<&'a [u8]>> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: recvfrom(2) writes at most `buf.len()` bytes into `buf` and at most `len` into `from`.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(from).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e).context("capturing frames"),
            };
        }
        if from.sll_pkttype == PACKET_OUTGOING {
            return Ok(None);
        }
        Ok(Some(&buf[..n as usize]))
    }
}
