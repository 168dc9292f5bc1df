//! A split virtqueue (virtio 1.x, section 2.7) as the device sees it: take
//! descriptor chains the driver made available, give them back as used.
//! No indirect descriptors and no event index (neither is offered).

use crate::vmm::memory::{GuestMemory, MemoryError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{fence, Ordering};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// `used.flags`: the driver need not notify when it makes buffers available.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// One queue's configuration and the device's place in it: all of its state
/// (the rings themselves are in guest memory).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The next available-ring slot the device will read.
    pub next_avail: u16,
    /// The next used-ring slot the device will write.
    pub next_used: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue descriptor {index} has flags {flags:#x}: indirect descriptors were not offered")]
    Indirect { index: u16, flags: u16 },
    #[error("virtqueue descriptor index {index} is outside the queue of {size}")]
    BadIndex { index: u16, size: u16 },
    #[error("virtqueue descriptor chain from {head} is longer than the queue (a loop)")]
    Loop { head: u16 },
    #[error("the guest's virtqueue is outside its memory: {0}")]
    Memory(#[from] MemoryError),
}

/// A guest buffer of a chain: `len` bytes at `addr`, which the device may write (`writable`) or only read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A chain the driver made available: its head (the id to give back) and its buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub buffers: Vec<Buffer>,
}

impl Chain {
    /// Bytes the device may write.
    pub fn writable_len(&self) -> usize {
        self.buffers.iter().filter(|b| b.writable).map(|b| b.len as usize).sum()
    }
}

/// A queue bound to guest memory for one round of work.
pub struct SplitQueue<'a> {
    memory: &'a GuestMemory,
    state: &'a mut QueueState,
}

impl<'a> SplitQueue<'a> {
    pub fn new(memory: &'a GuestMemory, state: &'a mut QueueState) -> Self {
        SplitQueue { memory, state }
    }

    fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        let mut b = [0u8; 2];
        self.memory.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Whether the driver has made a chain available that the device has not taken.
    pub fn has_available(&self) -> Result<bool, QueueError> {
        if !self.state.ready || self.state.size == 0 {
            return Ok(false);
        }
        Ok(self.read_u16(self.state.avail + 2)? != self.state.next_avail)
    }

    /// Takes the next available chain, if any.
    pub fn pop(&mut self) -> Result<Option<Chain>, QueueError> {
        if !self.has_available()? {
            return Ok(None);
        }
        // The ring entries are read after the index that publishes them.
        fence(Ordering::Acquire);
        let size = self.state.size;
        let slot = u64::from(self.state.next_avail % size);
        let head = self.read_u16(self.state.avail + 4 + 2 * slot)?;
        let mut buffers = Vec::with_capacity(2);
        let mut index = head;
        loop {
            if index >= size {
                return Err(QueueError::BadIndex { index, size });
            }
            let mut d = [0u8; 16];
            self.memory.read(self.state.desc + 16 * u64::from(index), &mut d)?;
            let addr = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes(d[12..14].try_into().expect("2 bytes"));
            let next = u16::from_le_bytes(d[14..16].try_into().expect("2 bytes"));
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect { index, flags });
            }
            buffers.push(Buffer { addr, len, writable: flags & DESC_F_WRITE != 0 });
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            if buffers.len() >= usize::from(size) {
                return Err(QueueError::Loop { head });
            }
            index = next;
        }
        self.state.next_avail = self.state.next_avail.wrapping_add(1);
        Ok(Some(Chain { head, buffers }))
    }

    /// Gives chain `head` back with `written` bytes written into it; returns
    /// the guest pages written (the used ring's), for dirty tracking.
    pub fn push_used(&mut self, head: u16, written: u32) -> Result<[u64; 2], QueueError> {
        let slot = u64::from(self.state.next_used % self.state.size);
        let elem = self.state.used + 4 + 8 * slot;
        let mut entry = [0u8; 8];
        entry[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        entry[4..].copy_from_slice(&written.to_le_bytes());
        self.memory.write(elem, &entry)?;
        self.state.next_used = self.state.next_used.wrapping_add(1);
        // The entry is visible before the index that publishes it.
        fence(Ordering::Release);
        self.memory.write(self.state.used + 2, &self.state.next_used.to_le_bytes())?;
        Ok([self.state.used & !0xfff, elem & !0xfff])
    }

    /// Sets the used ring's flags (e.g. [`USED_F_NO_NOTIFY`]); returns the page written.
    pub fn set_used_flags(&mut self, flags: u16) -> Result<u64, QueueError> {
        self.memory.write(self.state.used, &flags.to_le_bytes())?;
        Ok(self.state.used & !0xfff)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The driver's side of a split queue, as a guest lays it out: the test's stand-in for the guest.
    pub(crate) struct Driver {
        pub state: QueueState,
        avail_idx: u16,
        used_seen: u16,
        next_desc: u16,
    }

    impl Driver {
        /// Rings for a queue of `size` at `base` (desc table, then avail, then used on its own page).
        pub(crate) fn new(base: u64, size: u16) -> Self {
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
            let state = QueueState { size, ready: true, desc, avail, used, next_avail: 0, next_used: 0 };
            Driver { state, avail_idx: 0, used_seen: 0, next_desc: 0 }
        }

        /// Makes a chain of `(addr, len, writable)` buffers available.
        pub(crate) fn offer(&mut self, memory: &GuestMemory, buffers: &[(u64, u32, bool)]) -> u16 {
            let size = self.state.size;
            let head = self.next_desc;
            for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
                let index = (head + i as u16) % size;
                let last = i + 1 == buffers.len();
                let flags = if last { 0 } else { DESC_F_NEXT } | if writable { DESC_F_WRITE } else { 0 };
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..16].copy_from_slice(&((index + 1) % size).to_le_bytes());
                memory.write(self.state.desc + 16 * u64::from(index), &d).unwrap();
            }
            self.next_desc = (head + buffers.len() as u16) % size;
            let slot = u64::from(self.avail_idx % size);
            memory.write(self.state.avail + 4 + 2 * slot, &head.to_le_bytes()).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            memory.write(self.state.avail + 2, &self.avail_idx.to_le_bytes()).unwrap();
            head
        }

        /// The used entries the device published since the last call: (head, bytes written).
        pub(crate) fn used(&mut self, memory: &GuestMemory) -> Vec<(u16, u32)> {
            let mut b = [0u8; 2];
            memory.read(self.state.used + 2, &mut b).unwrap();
            let idx = u16::from_le_bytes(b);
            let mut out = Vec::new();
            while self.used_seen != idx {
                let slot = u64::from(self.used_seen % self.state.size);
                let mut e = [0u8; 8];
                memory.read(self.state.used + 4 + 8 * slot, &mut e).unwrap();
                out.push((
                    u32::from_le_bytes(e[..4].try_into().unwrap()) as u16,
                    u32::from_le_bytes(e[4..].try_into().unwrap()),
                ));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }
    }

    #[test]
    fn chains_come_out_in_order_and_go_back_as_used() {
        let memory = GuestMemory::new(4 << 20, 2 << 20).unwrap();
        let mut driver = Driver::new(0x10000, 4);
        let mut state = driver.state.clone();
        let a = driver.offer(&memory, &[(0x100000, 12, false), (0x101000, 60, false)]);
        let b = driver.offer(&memory, &[(0x102000, 1526, true)]);
        let mut queue = SplitQueue::new(&memory, &mut state);
        let first = queue.pop().unwrap().unwrap();
        assert_eq!(first.head, a);
        assert_eq!(first.buffers.len(), 2);
        assert_eq!(first.writable_len(), 0);
        let second = queue.pop().unwrap().unwrap();
        assert_eq!((second.head, second.writable_len()), (b, 1526));
        assert!(queue.pop().unwrap().is_none());
        queue.push_used(a, 0).unwrap();
        queue.push_used(b, 100).unwrap();
        assert_eq!(driver.used(&memory), vec![(a, 0), (b, 100)]);
        // Around the ring more than once: the indices wrap.
        for round in 0..10u32 {
            let head = driver.offer(&memory, &[(0x103000, round, true)]);
            let mut queue = SplitQueue::new(&memory, &mut state);
            let chain = queue.pop().unwrap().unwrap();
            assert_eq!(chain.buffers[0].len, round);
            queue.push_used(head, round).unwrap();
            assert_eq!(driver.used(&memory), vec![(head, round)]);
        }
    }

    #[test]
    fn a_looping_or_indirect_chain_is_an_error_not_a_hang() {
        let memory = GuestMemory::new(4 << 20, 2 << 20).unwrap();
        let mut driver = Driver::new(0x10000, 2);
        let mut state = driver.state.clone();
        // Two descriptors that point at each other, both with NEXT.
        driver.offer(&memory, &[(0x100000, 1, false), (0x100000, 1, false)]);
        let d1 = state.desc + 16;
        memory.write(d1 + 12, &DESC_F_NEXT.to_le_bytes()).unwrap();
        memory.write(d1 + 14, &0u16.to_le_bytes()).unwrap();
        assert!(matches!(SplitQueue::new(&memory, &mut state).pop(), Err(QueueError::Loop { .. })));
        let mut driver = Driver::new(0x20000, 2);
        let mut state = driver.state.clone();
        driver.offer(&memory, &[(0x100000, 16, false)]);
        memory.write(state.desc + 12, &DESC_F_INDIRECT.to_le_bytes()).unwrap();
        assert!(matches!(SplitQueue::new(&memory, &mut state).pop(), Err(QueueError::Indirect { .. })));
    }
}
