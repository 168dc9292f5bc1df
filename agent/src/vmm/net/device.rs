//! virtio-net (virtio 1.x, device id 1) over virtio-mmio at
//! [`abi::VIRTIO_NET_MMIO_GPA`], with a frame backend (a tap) behind it.
//!
//! All of its work happens on the vCPU thread at the guest's exits: a
//! register access, a notification of the transmit queue (every frame the
//! guest made available goes out before the guest runs again), and the
//! network idle port (received frames are placed into the guest's posted
//! receive buffers). It raises no interrupts: the guest polls its used rings.
//! A received frame is read from the backend only when the guest has a buffer
//! for it, so the device never holds a frame: its whole state is the
//! transport's registers and the queues' indices ([`NetDeviceState`]).
//!
//! **Output commit** (a PostCopyFT destination): with [`NetDevice::hold_output`]
//! on, transmitted frames do not go out; each is numbered (`tx_frames` counts
//! every frame the guest sent, so a checkpoint's state says how many frames
//! its epoch covers) and held until [`NetDevice::release_output`] is told that
//! the checkpoint covering it committed. The hold is bounded
//! ([`HOLD_MAX_BYTES`]): when it is full the device stops taking frames off the
//! transmit queue, so the guest's queue backs up and memory does not grow.
//! Held frames are not part of the state: a copy that dies takes its
//! uncommitted frames with it, and the survivor's TCP sends them again.
//!
//! Offered features: `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC`; every frame
//! carries the 12-byte `virtio_net_hdr` (zero here). Pages the device writes
//! (receive buffers, used rings) are kept for [`NetDevice::take_written_pages`],
//! so pre-copy and checkpoints see them as dirty.

use crate::vmm::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use crate::vmm::virtio::mmio::{DeviceInfo, MmioAction, MmioState, CONFIG_OFFSET, F_VERSION_1};
use crate::vmm::virtio::queue::{QueueError, SplitQueue, USED_F_NO_NOTIFY};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_fixtures::abi;

pub const DEVICE_ID_NET: u32 = 1;
pub const F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr` with VERSION_1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const NET_HDR_BYTES: usize = 12;
pub const QUEUE_MAX: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const INFO: DeviceInfo = DeviceInfo { device_id: DEVICE_ID_NET, features: F_VERSION_1 | F_MAC, queue_max: QUEUE_MAX };
/// The largest frame a tap delivers (its MTU is far below).
const FRAME_MAX: usize = 65_536;
/// Frames held for output commit, in bytes at most: past it, the transmit queue backs up.
pub const HOLD_MAX_BYTES: usize = 4 << 20;

/// Where frames go to and come from: a tap, or (in tests) a socket.
pub trait FrameBackend: Send + AsRawFd {
    /// One frame, if one waits (never blocks).
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// Sends one frame (a full queue may drop it, as a wire would).
    fn send(&self, frame: &[u8]) -> std::io::Result<()>;
}

impl FrameBackend for super::tap::Tap {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        super::tap::Tap::recv(self, buf)
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        super::tap::Tap::send(self, frame)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net: {0}")]
    Queue(#[from] QueueError),
    #[error("virtio-net: {0}")]
    Memory(#[from] MemoryError),
    #[error("virtio-net: the tap failed: {0}")]
    Backend(std::io::Error),
}

/// The device's state, as snapshots and migrations carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDeviceState {
    pub mac: [u8; 6],
    pub mmio: MmioState,
    pub rx_frames: u64,
    /// Frames the guest transmitted (sent, or held for output commit): the
    /// sequence number of its next frame.
    pub tx_frames: u64,
    /// Received frames larger than the guest's buffer (given back empty).
    pub rx_too_big: u64,
}

impl NetDeviceState {
    pub fn new(mac: [u8; 6]) -> Self {
        NetDeviceState { mac, mmio: MmioState::new(2), rx_frames: 0, tx_frames: 0, rx_too_big: 0 }
    }
}

/// A transmitted frame waiting for its epoch to commit.
struct HeldFrame {
    seq: u64,
    data: Vec<u8>,
    since: Instant,
}

/// Frames held for output commit, oldest first.
#[derive(Default)]
struct FrameHold {
    frames: VecDeque<HeldFrame>,
    bytes: usize,
}

/// What a [`NetDevice::release_output`] let out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Released {
    pub frames: u64,
    pub bytes: u64,
    /// The longest a released frame was held.
    pub max_hold: Duration,
    /// Seconds held, summed over the released frames.
    pub hold_seconds: f64,
}

/// The hold's size now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldLevel {
    pub frames: usize,
    pub bytes: usize,
}

pub struct NetDevice {
    state: NetDeviceState,
    backend: Box<dyn FrameBackend>,
    memory: Arc<GuestMemory>,
    /// Guest pages written since the last take (unsorted, may repeat).
    written: Vec<u64>,
    frame: Vec<u8>,
    /// Output commit: frames held until released (None: frames go out at once).
    hold: Option<FrameHold>,
    /// What reached the wire, for the operators' view (see [`take_traffic`](Self::take_traffic)).
    traffic: Traffic,
}

/// The frames this device exchanged with the wire (not guest state: each
/// copy of the VM counts its own), and the longest quiet on the way out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Frames received from the wire and placed in the guest, in all.
    pub received: u64,
    /// Frames sent to the wire (guest frames, released or not held, and announcements), in all.
    pub sent: u64,
    /// The longest time without a frame sent, since the last take (up to the take).
    pub longest_quiet: Duration,
    last_sent: Option<Instant>,
}

impl Traffic {
    /// Counts a frame sent to the wire at `now`.
    fn sent_at(&mut self, now: Instant) {
        if let Some(last) = self.last_sent {
            self.longest_quiet = self.longest_quiet.max(now.saturating_duration_since(last));
        }
        self.last_sent = Some(now);
        self.sent += 1;
    }
}

impl NetDevice {
    pub fn new(state: NetDeviceState, backend: Box<dyn FrameBackend>, memory: Arc<GuestMemory>) -> Self {
        let traffic = Traffic::default();
        NetDevice { state, backend, memory, written: Vec::new(), frame: vec![0; FRAME_MAX], hold: None, traffic }
    }

    /// The traffic so far; the longest quiet starts again (from now, if the
    /// quiet goes on: it then counts up to this take).
    pub fn take_traffic(&mut self) -> Traffic {
        let now = Instant::now();
        let mut taken = self.traffic;
        if let Some(last) = taken.last_sent {
            taken.longest_quiet = taken.longest_quiet.max(now.saturating_duration_since(last));
            self.traffic.last_sent = Some(now);
        }
        self.traffic.longest_quiet = Duration::ZERO;
        taken
    }

    /// From now on, transmitted frames are held until [`release_output`](Self::release_output).
    pub fn hold_output(&mut self) {
        self.hold.get_or_insert_with(FrameHold::default);
    }

    /// Lets held frames out: those numbered below `upto` (the `tx_frames` of a
    /// committed checkpoint's state), or with `None` all of them, holding no more.
    pub fn release_output(&mut self, upto: Option<u64>) -> Result<Released, NetError> {
        let mut released = Released::default();
        let now = Instant::now();
        while let Some(hold) = &mut self.hold {
            if hold.frames.front().is_none_or(|f| upto.is_some_and(|upto| f.seq >= upto)) {
                break;
            }
            let frame = hold.frames.pop_front().expect("checked");
            hold.bytes -= frame.data.len();
            let held = now.saturating_duration_since(frame.since);
            released.frames += 1;
            released.bytes += frame.data.len() as u64;
            released.max_hold = released.max_hold.max(held);
            released.hold_seconds += held.as_secs_f64();
            self.backend.send(&frame.data).map_err(NetError::Backend)?;
            self.traffic.sent_at(now);
        }
        if upto.is_none() {
            self.hold = None;
        }
        Ok(released)
    }

    /// Says where the guest is now, as QEMU's announce-self does after a
    /// migration: a gratuitous ARP for `ip` from the guest's MAC, broadcast
    /// (twice), so that bridges learn the port behind which the guest now is
    /// and neighbours refresh their entry. Not guest output: never held.
    pub fn announce(&mut self, ip: std::net::Ipv4Addr) -> Result<(), NetError> {
        let frame = gratuitous_arp(self.state.mac, ip);
        for _ in 0..2 {
            self.backend.send(&frame).map_err(NetError::Backend)?;
            self.traffic.sent_at(Instant::now());
        }
        Ok(())
    }

    /// How much is held now (zero when not holding).
    pub fn held(&self) -> HoldLevel {
        self.hold.as_ref().map_or_else(HoldLevel::default, |h| HoldLevel { frames: h.frames.len(), bytes: h.bytes })
    }

    pub fn state(&self) -> &NetDeviceState {
        &self.state
    }

    /// Whether `gpa` is in this device's MMIO window; the offset in it if so.
    pub fn window_offset(gpa: u64) -> Option<u64> {
        gpa.checked_sub(abi::VIRTIO_NET_MMIO_GPA).filter(|off| *off < abi::VIRTIO_MMIO_WINDOW_BYTES)
    }

    /// The guest read `data.len()` bytes at `offset` of the window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            // Config space: the MAC, then a status the driver does not see (VIRTIO_NET_F_STATUS is not offered).
            let mut config = [0u8; 8];
            config[..6].copy_from_slice(&self.state.mac);
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = config.get((offset - CONFIG_OFFSET) as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let value = self.state.mmio.read(offset & !3, &INFO).to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = value.get(start + i).copied().unwrap_or(0);
        }
    }

    /// The guest wrote `data` at `offset` of the window.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Result<(), NetError> {
        if offset >= CONFIG_OFFSET || data.len() != 4 || offset & 3 != 0 {
            // The config space is read-only; registers take aligned 32-bit writes only.
            return Ok(());
        }
        let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        match self.state.mmio.write(offset, value, &INFO) {
            MmioAction::Notify(q) if usize::from(q) == TX_QUEUE => {
                self.transmit()?;
                self.receive()?;
            }
            MmioAction::Notify(_) => {
                self.receive()?;
            }
            MmioAction::DriverOk => {
                let rx = &mut self.state.mmio.queues[RX_QUEUE];
                let page = SplitQueue::new(&self.memory, rx).set_used_flags(USED_F_NO_NOTIFY)?;
                self.written.push(page);
                self.receive()?;
            }
            MmioAction::Reset | MmioAction::None => {}
        }
        Ok(())
    }

    /// Takes every frame the guest made available on the transmit queue and
    /// sends it, or holds it (output commit; while the hold has room).
    pub fn transmit(&mut self) -> Result<usize, NetError> {
        if !self.state.mmio.driver_ok() {
            return Ok(0);
        }
        let mut taken = 0;
        let mut queue = SplitQueue::new(&self.memory, &mut self.state.mmio.queues[TX_QUEUE]);
        while self.hold.as_ref().is_none_or(|h| h.bytes < HOLD_MAX_BYTES) {
            let Some(chain) = queue.pop()? else { break };
            let mut len = 0;
            for buffer in chain.buffers.iter().filter(|b| !b.writable) {
                let n = (buffer.len as usize).min(FRAME_MAX - len);
                self.memory.read(buffer.addr, &mut self.frame[len..len + n])?;
                len += n;
            }
            if len > NET_HDR_BYTES {
                let frame = &self.frame[NET_HDR_BYTES..len];
                crate::fault::frame_trace::frame(self.state.tx_frames, frame);
                match &mut self.hold {
                    Some(hold) => {
                        hold.bytes += frame.len();
                        let seq = self.state.tx_frames;
                        hold.frames.push_back(HeldFrame { seq, data: frame.to_vec(), since: Instant::now() });
                    }
                    None => {
                        self.backend.send(frame).map_err(NetError::Backend)?;
                        self.traffic.sent_at(Instant::now());
                    }
                }
                self.state.tx_frames += 1;
                taken += 1;
            }
            self.written.extend(queue.push_used(chain.head, 0)?);
        }
        Ok(taken)
    }

    /// Whether the guest has posted a receive buffer the device has not filled.
    pub fn can_receive(&self) -> Result<bool, NetError> {
        if !self.state.mmio.driver_ok() {
            return Ok(false);
        }
        let mut rx = self.state.mmio.queues[RX_QUEUE].clone();
        Ok(SplitQueue::new(&self.memory, &mut rx).has_available()?)
    }

    /// Moves waiting frames from the backend into the guest's receive buffers,
    /// while it has any. Returns how many frames it delivered.
    pub fn receive(&mut self) -> Result<usize, NetError> {
        let mut delivered = 0;
        while self.can_receive()? {
            let Some(len) = self.backend.recv(&mut self.frame[NET_HDR_BYTES..]).map_err(NetError::Backend)? else {
                break;
            };
            let mut queue = SplitQueue::new(&self.memory, &mut self.state.mmio.queues[RX_QUEUE]);
            // The guest cannot take back a buffer it made available; if its ring says
            // otherwise (a broken driver), the frame is dropped, as a wire would.
            let Some(chain) = queue.pop()? else { break };
            let total = NET_HDR_BYTES + len;
            let written = if chain.writable_len() < total {
                self.state.rx_too_big += 1;
                0
            } else {
                // The header: all zero but num_buffers = 1.
                self.frame[..NET_HDR_BYTES].fill(0);
                self.frame[10] = 1;
                let mut done = 0;
                for buffer in chain.buffers.iter().filter(|b| b.writable) {
                    let n = (buffer.len as usize).min(total - done);
                    self.memory.write(buffer.addr, &self.frame[done..done + n])?;
                    let first = buffer.addr / PAGE_SIZE;
                    let last = (buffer.addr + n.max(1) as u64 - 1) / PAGE_SIZE;
                    self.written.extend((first..=last).map(|p| p * PAGE_SIZE));
                    done += n;
                    if done == total {
                        break;
                    }
                }
                delivered += 1;
                total as u32
            };
            self.written.extend(queue.push_used(chain.head, written)?);
        }
        self.state.rx_frames += delivered as u64;
        self.traffic.received += delivered as u64;
        Ok(delivered)
    }

    /// The backend's fd, to wait on for received frames.
    pub fn backend_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }

    /// The guest pages the device wrote since the last take, sorted.
    pub fn take_written_pages(&mut self) -> Vec<u64> {
        let mut pages = std::mem::take(&mut self.written);
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// Forgets the pages written so far (dirty logging starts afresh).
    pub fn forget_written_pages(&mut self) {
        self.written.clear();
    }
}

/// An Ethernet frame with a gratuitous ARP request: `mac` says it has `ip`.
pub fn gratuitous_arp(mac: [u8; 6], ip: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]); // to everyone
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0); // the minimum frame, padded
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::virtio::queue::tests::Driver;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// A datagram socket pair: frames keep their boundaries, like a tap's.
    struct SocketBackend(OwnedFd);

    impl AsRawFd for SocketBackend {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    impl FrameBackend for SocketBackend {
        fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
            // SAFETY: recv(2) into a buffer we own, of its length.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
            }
            Ok(Some(n as usize))
        }
        fn send(&self, frame: &[u8]) -> std::io::Result<()> {
            // SAFETY: send(2) of a buffer we own.
            let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }
    }

    fn pair() -> (SocketBackend, SocketBackend) {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two fds into `fds`.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        unsafe { (SocketBackend(OwnedFd::from_raw_fd(fds[0])), SocketBackend(OwnedFd::from_raw_fd(fds[1]))) }
    }

    fn write32(dev: &mut NetDevice, offset: u64, value: u32) {
        dev.mmio_write(offset, &value.to_le_bytes()).unwrap();
    }

    /// Plays a guest driver through initialization with rx rings at 0x10000 and tx rings at 0x20000.
    fn initialized(memory: &Arc<GuestMemory>, backend: SocketBackend) -> (NetDevice, Driver, Driver) {
        let mut dev = NetDevice::new(NetDeviceState::new([2, 0, 0, 0, 0, 9]), Box::new(backend), Arc::clone(memory));
        write32(&mut dev, 0x70, 3);
        write32(&mut dev, 0x24, 1);
        write32(&mut dev, 0x20, 1);
        write32(&mut dev, 0x24, 0);
        write32(&mut dev, 0x20, F_MAC as u32);
        write32(&mut dev, 0x70, 11);
        let rx = Driver::new(0x10000, 8);
        let tx = Driver::new(0x20000, 8);
        for (n, driver) in [(0u32, &rx), (1, &tx)] {
            write32(&mut dev, 0x30, n);
            write32(&mut dev, 0x38, u32::from(driver.state.size));
            for (reg, addr) in [(0x80, driver.state.desc), (0x90, driver.state.avail), (0xa0, driver.state.used)] {
                write32(&mut dev, reg, addr as u32);
                write32(&mut dev, reg + 4, (addr >> 32) as u32);
            }
            write32(&mut dev, 0x44, 1);
        }
        write32(&mut dev, 0x70, 15);
        (dev, rx, tx)
    }

    #[test]
    fn frames_cross_in_both_directions_and_the_written_pages_are_reported() {
        let memory = Arc::new(GuestMemory::new(4 << 20, 2 << 20).unwrap());
        let (device_end, wire) = pair();
        let (mut dev, mut rx, mut tx) = initialized(&memory, device_end);
        let mut mac = [0u8; 6];
        dev.mmio_read(CONFIG_OFFSET, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 9]);
        // The device tells the driver not to notify the receive queue.
        let mut flags = [0u8; 2];
        memory.read(rx.state.used, &mut flags).unwrap();
        assert_eq!(u16::from_le_bytes(flags), USED_F_NO_NOTIFY);

        // Transmit: header and frame in two buffers; it is on the wire when the notify returns.
        memory.write(0x100000, &[0u8; NET_HDR_BYTES]).unwrap();
        memory.write(0x101000, b"an ethernet frame").unwrap();
        let head = tx.offer(&memory, &[(0x100000, NET_HDR_BYTES as u32, false), (0x101000, 17, false)]);
        write32(&mut dev, 0x50, 1);
        assert_eq!(tx.used(&memory), vec![(head, 0)]);
        let mut got = [0u8; 64];
        let n = wire.recv(&mut got).unwrap().unwrap();
        assert_eq!(&got[..n], b"an ethernet frame");

        // Receive: nothing is read from the backend until the guest posts a buffer.
        wire.send(b"a reply").unwrap();
        assert_eq!(dev.receive().unwrap(), 0);
        dev.take_written_pages();
        let buf = rx.offer(&memory, &[(0x200000, 1526, true)]);
        assert_eq!(dev.receive().unwrap(), 1);
        assert_eq!(rx.used(&memory), vec![(buf, (NET_HDR_BYTES + 7) as u32)]);
        let mut frame = [0u8; NET_HDR_BYTES + 7];
        memory.read(0x200000, &mut frame).unwrap();
        assert_eq!(&frame[NET_HDR_BYTES..], b"a reply");
        assert_eq!(frame[10], 1, "num_buffers");
        let written = dev.take_written_pages();
        assert!(written.contains(&0x200000) && written.contains(&(rx.state.used & !0xfff)), "{written:x?}");
        assert_eq!((dev.state().rx_frames, dev.state().tx_frames), (1, 1));

        // A frame larger than the buffer is dropped, the buffer given back empty.
        wire.send(&[7u8; 200]).unwrap();
        let small = rx.offer(&memory, &[(0x201000, 64, true)]);
        dev.receive().unwrap();
        assert_eq!(rx.used(&memory), vec![(small, 0)]);
        assert_eq!(dev.state().rx_too_big, 1);
    }

    #[test]
    fn held_frames_go_out_only_as_far_as_released_and_a_full_hold_backs_the_queue_up() {
        let memory = Arc::new(GuestMemory::new(4 << 20, 2 << 20).unwrap());
        let (device_end, wire) = pair();
        let (mut dev, _rx, mut tx) = initialized(&memory, device_end);
        dev.hold_output();
        let mut send = |dev: &mut NetDevice, text: &[u8]| {
            memory.write(0x100000, &[0u8; NET_HDR_BYTES]).unwrap();
            memory.write(0x100000 + NET_HDR_BYTES as u64, text).unwrap();
            let head = tx.offer(&memory, &[(0x100000, (NET_HDR_BYTES + text.len()) as u32, false)]);
            write32(dev, 0x50, 1);
            (head, tx.used(&memory))
        };
        for text in [b"epoch 1 a", b"epoch 1 b", b"epoch 2 c"] {
            let (head, used) = send(&mut dev, text);
            assert_eq!(used, vec![(head, 0)], "the guest gets its buffer back at once");
        }
        let mut got = [0u8; 64];
        assert_eq!(wire.recv(&mut got).unwrap(), None, "nothing goes out while held");
        assert_eq!(dev.held(), HoldLevel { frames: 3, bytes: 27 });
        assert_eq!(dev.state().tx_frames, 3);
        // Epoch 1 committed with tx_frames = 2: those two go out, in order, and only they.
        let released = dev.release_output(Some(2)).unwrap();
        assert_eq!((released.frames, released.bytes), (2, 18));
        for expected in [&b"epoch 1 a"[..], b"epoch 1 b"] {
            let n = wire.recv(&mut got).unwrap().unwrap();
            assert_eq!(&got[..n], expected);
        }
        assert_eq!(wire.recv(&mut got).unwrap(), None);
        // A release never sends a frame twice.
        assert_eq!(dev.release_output(Some(2)).unwrap().frames, 0);
        // Full: frames stay on the transmit queue (the guest's buffer is not given back).
        dev.hold.as_mut().unwrap().bytes = HOLD_MAX_BYTES;
        let (_, used) = send(&mut dev, b"backed up");
        assert!(used.is_empty(), "a full hold takes nothing off the queue");
        dev.hold.as_mut().unwrap().bytes = 9;
        // Release all and hold no more: the rest goes, and the queued frame with the next transmit.
        assert_eq!(dev.release_output(None).unwrap().frames, 1);
        assert_eq!(dev.transmit().unwrap(), 1);
        for expected in [&b"epoch 2 c"[..], b"backed up"] {
            let n = wire.recv(&mut got).unwrap().unwrap();
            assert_eq!(&got[..n], expected);
        }
        assert_eq!(dev.held(), HoldLevel::default());
    }

    #[test]
    fn an_announcement_is_a_gratuitous_arp_from_the_guest_and_bypasses_the_hold() {
        let memory = Arc::new(GuestMemory::new(4 << 20, 2 << 20).unwrap());
        let (device_end, wire) = pair();
        let (mut dev, _rx, _tx) = initialized(&memory, device_end);
        dev.hold_output();
        dev.announce(std::net::Ipv4Addr::new(10, 77, 0, 2)).unwrap();
        let mut got = [0u8; 128];
        for _ in 0..2 {
            let n = wire.recv(&mut got).unwrap().unwrap();
            let f = &got[..n];
            assert_eq!(n, 60);
            assert_eq!((&f[..6], &f[6..12], &f[12..14]), (&[0xff; 6][..], &[2, 0, 0, 0, 0, 9][..], &[8, 6][..]));
            // Sender and target are the guest's address; the sender's MAC is the guest's.
            assert_eq!(
                (&f[22..28], &f[28..32], &f[38..42]),
                (&[2, 0, 0, 0, 0, 9][..], &[10, 77, 0, 2][..], &[10, 77, 0, 2][..])
            );
        }
        assert_eq!(dev.held(), HoldLevel { frames: 0, bytes: 0 });
    }

    #[test]
    fn the_state_carries_the_queues_across_a_restore() {
        let memory = Arc::new(GuestMemory::new(4 << 20, 2 << 20).unwrap());
        let (device_end, wire) = pair();
        let (mut dev, mut rx, _tx) = initialized(&memory, device_end);
        rx.offer(&memory, &[(0x200000, 1526, true)]);
        rx.offer(&memory, &[(0x201000, 1526, true)]);
        wire.send(b"one").unwrap();
        dev.receive().unwrap();
        let state = dev.state().clone();
        drop(dev);
        let (device_end, wire) = pair();
        let mut restored = NetDevice::new(state, Box::new(device_end), Arc::clone(&memory));
        wire.send(b"two").unwrap();
        assert_eq!(restored.receive().unwrap(), 1);
        let used = rx.used(&memory);
        assert_eq!(used.len(), 2);
        let mut frame = [0u8; NET_HDR_BYTES + 3];
        memory.read(0x201000, &mut frame).unwrap();
        assert_eq!(&frame[NET_HDR_BYTES..], b"two");
    }
}
