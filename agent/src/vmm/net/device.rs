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
//! Offered features: `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC`; every frame
//! carries the 12-byte `virtio_net_hdr` (zero here). Pages the device writes
//! (receive buffers, used rings) are kept for [`NetDevice::take_written_pages`],
//! so pre-copy and checkpoints see them as dirty.

use crate::vmm::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use crate::vmm::virtio::mmio::{DeviceInfo, MmioAction, MmioState, CONFIG_OFFSET, F_VERSION_1};
use crate::vmm::virtio::queue::{QueueError, SplitQueue, USED_F_NO_NOTIFY};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
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
    pub tx_frames: u64,
    /// Received frames larger than the guest's buffer (given back empty).
    pub rx_too_big: u64,
}

impl NetDeviceState {
    pub fn new(mac: [u8; 6]) -> Self {
        NetDeviceState { mac, mmio: MmioState::new(2), rx_frames: 0, tx_frames: 0, rx_too_big: 0 }
    }
}

pub struct NetDevice {
    state: NetDeviceState,
    backend: Box<dyn FrameBackend>,
    memory: Arc<GuestMemory>,
    /// Guest pages written since the last take (unsorted, may repeat).
    written: Vec<u64>,
    frame: Vec<u8>,
}

impl NetDevice {
    pub fn new(state: NetDeviceState, backend: Box<dyn FrameBackend>, memory: Arc<GuestMemory>) -> Self {
        NetDevice { state, backend, memory, written: Vec::new(), frame: vec![0; FRAME_MAX] }
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

    /// Sends every frame the guest made available on the transmit queue.
    pub fn transmit(&mut self) -> Result<usize, NetError> {
        if !self.state.mmio.driver_ok() {
            return Ok(0);
        }
        let mut sent = 0;
        let mut queue = SplitQueue::new(&self.memory, &mut self.state.mmio.queues[TX_QUEUE]);
        while let Some(chain) = queue.pop()? {
            let mut len = 0;
            for buffer in chain.buffers.iter().filter(|b| !b.writable) {
                let n = (buffer.len as usize).min(FRAME_MAX - len);
                self.memory.read(buffer.addr, &mut self.frame[len..len + n])?;
                len += n;
            }
            if len > NET_HDR_BYTES {
                self.backend.send(&self.frame[NET_HDR_BYTES..len]).map_err(NetError::Backend)?;
                sent += 1;
            }
            self.written.extend(queue.push_used(chain.head, 0)?);
        }
        self.state.tx_frames += sent as u64;
        Ok(sent)
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
            let chain = queue.pop()?.expect("can_receive saw a chain");
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
