//! What reached the clients on the wire: every frame the VM sent, captured in
//! the client namespace on each host's port of the clients' bridge (an
//! AF_PACKET socket per port, no tcpdump), and the audit of those that came
//! through the destination's port against the destination agent's frame
//! trace (`pcft agent --frame-trace`): after a failover, no frame that an
//! epoch which never committed produced may have reached the clients. That is
//! network output commit, checked from outside the agents. And the clients
//! hear from one host at a time: the source until the switchover, the
//! destination after it, and the source again only after a failover; a frame
//! from the destination once the source has answered again means two copies
//! answered clients.

use crate::cli::netns::enter_netns;
use anyhow::{bail, Context, Result};
use pcft_agent::fault::frame_trace::{frame_hash, FrameTrace};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The capture running on both hosts' ports.
pub struct Capture {
    stop: Arc<AtomicBool>,
    source: JoinHandle<Result<Vec<Seen>>>,
    destination: JoinHandle<Result<Vec<Seen>>>,
}

/// A frame from the VM that reached the clients: when the kernel received it
/// (since the Unix epoch, stamped on arrival, so a capture thread that the
/// scheduler starves does not see it late), and the hash of its bytes.
pub type Seen = (Duration, u64);

/// The frames the VM sent that reached the clients, by the host they came through.
pub struct Captured {
    pub source: Vec<Seen>,
    pub destination: Vec<Seen>,
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
                    if let Some((arrived, frame)) = socket.receive(&mut buf)? {
                        if frame.get(6..12) == Some(&mac[..]) {
                            hashes.push((arrived, frame_hash(frame)));
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
        let join = |t: JoinHandle<Result<Vec<Seen>>>| {
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
    /// Frames from the destination after the source had answered again
    /// following the destination's turn: two copies answering (must be 0).
    pub out_of_turn: usize,
    pub error: Option<String>,
}

impl FrameAudit {
    /// The audit of `captured` against the destination's `trace`, whose VM the
    /// source restored from checkpoint `restored_epoch` (None: no failover, every epoch committed).
    pub fn new(captured: &Captured, trace: &FrameTrace, restored_epoch: Option<u64>) -> FrameAudit {
        let uncommitted = restored_epoch.map_or(0, |epoch| {
            captured.destination.iter().filter(|&&(_, hash)| trace.uncommitted(hash, epoch)).count()
        });
        FrameAudit {
            from_source: captured.source.len(),
            from_destination: captured.destination.len(),
            uncommitted,
            out_of_turn: out_of_turn(&captured.source, &captured.destination),
            error: captured.error.clone(),
        }
    }
}

/// Frames from the destination that came after the source answered again
/// following the destination's first frame (source, then destination, then
/// the source after a failover: each host's turn, once).
fn out_of_turn(source: &[Seen], destination: &[Seen]) -> usize {
    let Some(&(destination_first, _)) = destination.iter().min_by_key(|(at, _)| *at) else { return 0 };
    let Some(&(source_again, _)) = source.iter().filter(|(at, _)| *at > destination_first).min_by_key(|(at, _)| *at)
    else {
        return 0;
    };
    destination.iter().filter(|(at, _)| *at > source_again).count()
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
        let on: libc::c_int = 1;
        for (option, value, size) in [
            (libc::SO_RCVTIMEO, std::ptr::addr_of!(timeout).cast(), std::mem::size_of::<libc::timeval>()),
            (libc::SO_RCVBUF, std::ptr::addr_of!(buffer).cast(), std::mem::size_of::<libc::c_int>()),
            (libc::SO_TIMESTAMPNS, std::ptr::addr_of!(on).cast(), std::mem::size_of::<libc::c_int>()),
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

    /// The next frame received on the interface (not sent by it) with the
    /// kernel's time of its arrival, or None after the 100 ms timeout.
    fn receive<'a>(&self, buf: &'a mut [u8]) -> Result<Option<(Duration, &'a [u8])>> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        // Room for one SCM_TIMESTAMPNS control message (a timespec), aligned for cmsghdr.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_name = std::ptr::addr_of_mut!(from).cast();
        message.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: recvmsg(2) writes at most `buf.len()` bytes into `buf`, at
        // most `msg_namelen` into `from` and `msg_controllen` into `control`,
        // all of which outlive the call.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut message, 0) };
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
        let arrived =
            arrival(&message).unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default());
        Ok(Some((arrived, &buf[..n as usize])))
    }
}

/// The kernel's receive timestamp in the control messages of `message`.
fn arrival(message: &libc::msghdr) -> Option<Duration> {
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer that recvmsg
    // filled, within `msg_controllen`; CMSG_DATA of an SCM_TIMESTAMPNS message
    // holds a timespec, read unaligned.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_TIMESTAMPNS {
                let at: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast());
                return Some(Duration::new(u64::try_from(at.tv_sec).ok()?, u32::try_from(at.tv_nsec).ok()?));
            }
            header = libc::CMSG_NXTHDR(message, header);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_hear_from_one_host_at_a_time() {
        let at = |ms: u64| (Duration::from_millis(1_800_000_000_000 + ms), ms);
        // Source, destination after the switchover, the source again after a failover.
        let source = [at(1), at(2), at(50), at(60)];
        assert_eq!(out_of_turn(&source, &[at(10), at(20)]), 0);
        // Never migrated, or never back.
        assert_eq!(out_of_turn(&source, &[]), 0);
        assert_eq!(out_of_turn(&[at(1)], &[at(10), at(20)]), 0);
        // The destination still answered after the source had resumed: two copies.
        assert_eq!(out_of_turn(&source, &[at(10), at(55), at(70)]), 2);
    }
}
