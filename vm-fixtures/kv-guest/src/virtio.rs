//! A minimal virtio-net driver: virtio 1.x over virtio-mmio (register layout
//! version 2), split virtqueues, polled (the device raises no interrupts).
//!
//! Why not the `virtio-drivers` crate: its queues and `VirtIONetRaw` work
//! through a `Hal` with DMA allocation and per-buffer bookkeeping, and read
//! device registers more often than needed; here every MMIO access is a VM exit
//! (~10 µs) and every guest instruction is emulated (~1 µs). This driver
//! touches MMIO only to set the device up and to notify the transmit queue
//! (once per batch of frames, see [`Net::flush`]); receiving is a read of the
//! used ring in guest memory. ~250 lines, no allocation after setup.
//!
//! Layout: queue 0 (receive) has `RX_QUEUE` descriptors, each permanently
//! bound to one `BUF`-byte buffer; the device writes a 12-byte
//! `virtio_net_hdr` and a frame into it, the driver hands the frame to smoltcp
//! and reposts the descriptor. Queue 1 (transmit) has `TX_QUEUE` descriptors,
//! each bound to its own buffer too; a free stack holds the idle ones. The
//! device consumes transmit buffers synchronously during the notify, so after
//! `flush` all of them are free again.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};
use kv_guest::arena::Arena;
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC: usize = 0x080;
const QUEUE_DRIVER: usize = 0x090;
const QUEUE_DEVICE: usize = 0x0a0;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

const F_MAC: u32 = 1 << 5;
/// VIRTIO_F_VERSION_1 is bit 32: bit 0 of the second feature word.
const F_VERSION_1_HIGH: u32 = 1;

const DESC_F_WRITE: u16 = 2;

/// The virtio_net_hdr without VIRTIO_NET_F_MRG_RXBUF (virtio 1.x: 12 bytes).
pub const NET_HDR: usize = 12;
/// An Ethernet frame without FCS, at most.
pub const FRAME: usize = 1514;
const BUF: usize = 2048;
const RX_QUEUE: u16 = 64;
const TX_QUEUE: u16 = 32;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One split virtqueue in guest memory.
struct Ring {
    size: u16,
    desc: *mut Desc,
    /// flags u16, idx u16, ring[size] u16.
    avail: *mut u16,
    /// flags u16, idx u16, then {id u32, len u32}[size].
    used: *mut u16,
    bufs: *mut u8,
    avail_idx: u16,
    last_used: u16,
}

impl Ring {
    fn new(arena: &mut Arena, size: u16, write: bool) -> Option<Ring> {
        let n = size as usize;
        let avail_off = n * 16;
        let used_off = (avail_off + 6 + 2 * n + 3) & !3;
        let bytes = used_off + 6 + 8 * n;
        let base = arena.alloc_aligned(bytes, 4096)?;
        let bufs = arena.alloc_aligned(n * BUF, 4096)?;
        // SAFETY: fresh memory of `bytes` bytes (contents unknown: prefill).
        unsafe { core::ptr::write_bytes(base, 0, bytes) };
        let ring = Ring {
            size,
            desc: base as *mut Desc,
            // SAFETY: offsets within the block.
            avail: unsafe { base.add(avail_off) } as *mut u16,
            used: unsafe { base.add(used_off) } as *mut u16,
            bufs,
            avail_idx: 0,
            last_used: 0,
        };
        for i in 0..n {
            // SAFETY: i < size descriptors.
            unsafe {
                ring.desc.add(i).write(Desc {
                    addr: bufs as u64 + (i * BUF) as u64,
                    len: BUF as u32,
                    flags: if write { DESC_F_WRITE } else { 0 },
                    next: 0,
                })
            };
        }
        Some(ring)
    }

    fn buf(&self, id: u16) -> *mut u8 {
        // SAFETY: callers pass id < size.
        unsafe { self.bufs.add(id as usize * BUF) }
    }

    /// Offers descriptor `id` to the device.
    #[inline]
    fn post(&mut self, id: u16) {
        let slot = (self.avail_idx % self.size) as usize;
        // SAFETY: slot < size; the ring entries follow flags and idx.
        unsafe { write_volatile(self.avail.add(2 + slot), id) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        // SAFETY: avail idx field.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
    }

    #[inline]
    fn used_idx(&self) -> u16 {
        // SAFETY: used idx field.
        unsafe { read_volatile(self.used.add(1)) }
    }

    /// The next used element: (descriptor id, bytes written).
    #[inline]
    fn next_used(&mut self) -> Option<(u16, u32)> {
        if self.last_used == self.used_idx() {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: element `slot` of the used ring (u32 pairs after 4 bytes).
        let (id, len) = unsafe {
            let e = (self.used as *mut u8).add(4 + 8 * slot) as *const u32;
            (read_volatile(e), read_volatile(e.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }
}

fn mmio_read(base: usize, off: usize) -> u32 {
    // SAFETY: the device's register window (identity-mapped MMIO).
    unsafe { read_volatile((base + off) as *const u32) }
}

fn mmio_write(base: usize, off: usize, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile((base + off) as *mut u32, v) }
}

pub struct Rx {
    ring: Ring,
}

pub struct Tx {
    ring: Ring,
    mmio: usize,
    free: [u16; TX_QUEUE as usize],
    nfree: usize,
    /// Frames posted since the last notify.
    unsent: bool,
}

pub struct Net {
    rx: Rx,
    tx: Tx,
    /// Frames sent and received (for the log).
    pub tx_frames: u64,
    pub rx_frames: u64,
}

/// Why the device could not be set up.
pub type InitError = &'static str;

impl Net {
    /// Resets and sets up the device at `mmio`, with rings and buffers from `arena`.
    pub fn new(mmio: usize, arena: &mut Arena) -> Result<Net, InitError> {
        if mmio_read(mmio, MAGIC) != 0x7472_6976 || mmio_read(mmio, VERSION) != 2 {
            return Err("no virtio-mmio (version 2) device");
        }
        if mmio_read(mmio, DEVICE_ID) != 1 {
            return Err("the virtio device is not a network device");
        }
        mmio_write(mmio, STATUS, 0);
        mmio_write(mmio, STATUS, S_ACKNOWLEDGE);
        mmio_write(mmio, STATUS, S_ACKNOWLEDGE | S_DRIVER);
        mmio_write(mmio, DEVICE_FEATURES_SEL, 1);
        let high = mmio_read(mmio, DEVICE_FEATURES);
        mmio_write(mmio, DEVICE_FEATURES_SEL, 0);
        let low = mmio_read(mmio, DEVICE_FEATURES);
        if high & F_VERSION_1_HIGH == 0 {
            mmio_write(mmio, STATUS, S_FAILED);
            return Err("virtio-net does not offer VIRTIO_F_VERSION_1");
        }
        mmio_write(mmio, DRIVER_FEATURES_SEL, 0);
        mmio_write(mmio, DRIVER_FEATURES, low & F_MAC);
        mmio_write(mmio, DRIVER_FEATURES_SEL, 1);
        mmio_write(mmio, DRIVER_FEATURES, F_VERSION_1_HIGH);
        mmio_write(mmio, STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if mmio_read(mmio, STATUS) & S_FEATURES_OK == 0 {
            mmio_write(mmio, STATUS, S_FAILED);
            return Err("virtio-net refused the features (FEATURES_OK)");
        }
        let mut rings = [None, None];
        for (q, want) in [(0u32, RX_QUEUE), (1, TX_QUEUE)] {
            mmio_write(mmio, QUEUE_SEL, q);
            let max = mmio_read(mmio, QUEUE_NUM_MAX);
            if max == 0 {
                return Err("virtio-net queue unavailable");
            }
            let size = want.min(max.min(0x8000) as u16);
            let ring = Ring::new(arena, size, q == 0).ok_or("out of memory for the virtqueues")?;
            mmio_write(mmio, QUEUE_NUM, u32::from(size));
            for (off, addr) in
                [(QUEUE_DESC, ring.desc as u64), (QUEUE_DRIVER, ring.avail as u64), (QUEUE_DEVICE, ring.used as u64)]
            {
                mmio_write(mmio, off, addr as u32);
                mmio_write(mmio, off + 4, (addr >> 32) as u32);
            }
            mmio_write(mmio, QUEUE_READY, 1);
            rings[q as usize] = Some(ring);
        }
        let [Some(rx), Some(tx)] = rings else { return Err("virtio-net queue setup") };
        let mut net = Net {
            rx: Rx { ring: rx },
            tx: Tx { ring: tx, mmio, free: [0; TX_QUEUE as usize], nfree: 0, unsent: false },
            tx_frames: 0,
            rx_frames: 0,
        };
        for id in 0..net.tx.ring.size {
            net.tx.free[net.tx.nfree] = id;
            net.tx.nfree += 1;
        }
        mmio_write(mmio, STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        for id in 0..net.rx.ring.size {
            net.rx.ring.post(id);
        }
        mmio_write(mmio, QUEUE_NOTIFY, 0);
        Ok(net)
    }

    /// Whether a received frame is waiting (a memory read, no exit).
    #[inline]
    pub fn rx_pending(&self) -> bool {
        self.rx.ring.last_used != self.rx.ring.used_idx()
    }

    /// Notifies the transmit queue if frames were posted since the last
    /// notify (one exit, during which the device sends them all and may
    /// deliver received frames), then takes the used buffers back.
    pub fn flush(&mut self) {
        self.tx.flush();
    }
}

impl Tx {
    fn flush(&mut self) {
        if self.unsent {
            self.unsent = false;
            fence(Ordering::SeqCst);
            mmio_write(self.mmio, QUEUE_NOTIFY, 1);
        }
        self.reclaim();
    }

    fn reclaim(&mut self) {
        while let Some((id, _)) = self.ring.next_used() {
            if id < self.ring.size && self.nfree < self.free.len() {
                self.free[self.nfree] = id;
                self.nfree += 1;
            }
        }
    }

    fn take(&mut self) -> Option<u16> {
        if self.nfree == 0 {
            self.reclaim();
            if self.nfree == 0 {
                self.flush();
            }
        }
        if self.nfree == 0 {
            return None;
        }
        self.nfree -= 1;
        Some(self.free[self.nfree])
    }
}

pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: u32,
}

pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let len = (self.len as usize).min(BUF);
        let buf = self.rx.ring.buf(self.id);
        // SAFETY: the device wrote `len` bytes into this descriptor's buffer
        // and gave it back; it is ours until reposted (in drop).
        let frame = unsafe { core::slice::from_raw_parts(buf, len) };
        f(frame.get(NET_HDR..).unwrap_or(&[]))
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.rx.ring.post(self.id);
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(FRAME);
        match self.tx.take() {
            Some(id) => {
                let buf = self.tx.ring.buf(id);
                // SAFETY: a free transmit buffer of BUF bytes: ours until posted.
                let r = unsafe {
                    core::ptr::write_bytes(buf, 0, NET_HDR);
                    f(core::slice::from_raw_parts_mut(buf.add(NET_HDR), len))
                };
                // SAFETY: descriptor id < size.
                unsafe { (*self.tx.ring.desc.add(id as usize)).len = (NET_HDR + len) as u32 };
                self.tx.ring.post(id);
                self.tx.unsent = true;
                r
            }
            None => {
                // The device holds every buffer (it should not): drop the frame.
                let mut scratch = [0u8; FRAME];
                f(&mut scratch[..len])
            }
        }
    }
}

impl phy::Device for Net {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (id, len) = self.rx.ring.next_used()?;
        if id >= self.rx.ring.size {
            return None;
        }
        self.rx_frames += 1;
        Some((RxToken { rx: &mut self.rx, id, len }, TxToken { tx: &mut self.tx }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.nfree == 0 {
            self.tx.flush();
            if self.tx.nfree == 0 {
                return None;
            }
        }
        self.tx_frames += 1;
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME;
        caps.max_burst_size = None;
        // Frames come from the host's kernel through memory: verifying their
        // checksums would cost ~2 instructions per byte for nothing. Compute
        // them on transmit only.
        let mut ck = ChecksumCapabilities::default();
        ck.ipv4 = Checksum::Tx;
        ck.tcp = Checksum::Tx;
        ck.udp = Checksum::Tx;
        ck.icmpv4 = Checksum::Tx;
        caps.checksum = ck;
        caps
    }
}

const _: () = assert!(NET_HDR + FRAME <= BUF);
