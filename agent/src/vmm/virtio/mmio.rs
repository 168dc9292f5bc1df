//! The virtio-mmio transport's registers (virtio 1.x, section 4.2.2; register
//! layout version 2), for one device. Pure: a read returns the value, a write
//! updates the state and says what the device must do about it.

use super::queue::QueueState;
use serde::{Deserialize, Serialize};

pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
/// Our vendor id: "PCFT".
pub const VENDOR_ID: u32 = 0x5446_4350;
/// Where the device-specific configuration space starts.
pub const CONFIG_OFFSET: u64 = 0x100;
pub const F_VERSION_1: u64 = 1 << 32;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// What a device is, as the transport presents it.
#[derive(Clone, Copy, Debug)]
pub struct DeviceInfo {
    pub device_id: u32,
    pub features: u64,
    pub queue_max: u16,
}

/// The transport's whole state: what the driver wrote, and each queue's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub status: u32,
    pub driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    pub queues: Vec<QueueState>,
}

/// What a register write asks of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioAction {
    None,
    /// The driver notified queue `n` (it made buffers available).
    Notify(u16),
    /// The driver wrote status 0: the device resets (the state already did).
    Reset,
    /// The driver set DRIVER_OK: the device is live.
    DriverOk,
}

impl MmioState {
    pub fn new(queues: usize) -> Self {
        MmioState {
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: vec![QueueState::default(); queues],
        }
    }

    /// Whether the driver finished initialization and the device may use the queues.
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn selected(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A 32-bit read of register `offset` (below [`CONFIG_OFFSET`]). Unknown registers read 0.
    pub fn read(&self, offset: u64, device: &DeviceInfo) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => device.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => device.features as u32,
                1 => (device.features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |_| u32::from(device.queue_max)),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            // No interrupts are ever raised: the driver polls the used rings.
            reg::INTERRUPT_STATUS => 0,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    /// A 32-bit write of `value` to register `offset`.
    pub fn write(&mut self, offset: u64, value: u32, device: &DeviceInfo) -> MmioAction {
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        // Queue registers may change only before the queue is ready (4.2.2.3).
        let configurable = |q: &QueueState| !q.ready;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                // Only features the device offers can be accepted.
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return MmioAction::None,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(value) << shift) & mask & device.features);
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                let max = device.queue_max;
                if let Some(q) = self.selected().filter(|q| configurable(q)) {
                    // A power of two up to the maximum, or the queue stays unusable.
                    let n = value as u16;
                    q.size = if value <= u32::from(max) && n.is_power_of_two() { n } else { 0 };
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.ready = value == 1 && q.size > 0;
                    q.next_avail = 0;
                    q.next_used = 0;
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected().filter(|q| configurable(q)) {
                    let field = match offset {
                        reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => &mut q.desc,
                        reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *field = if offset & 4 == 0 { low(*field) } else { high(*field) };
                }
            }
            reg::QUEUE_NOTIFY if (value as usize) < self.queues.len() && self.driver_ok() => {
                return MmioAction::Notify(value as u16);
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => {
                if value == 0 {
                    *self = MmioState::new(self.queues.len());
                    return MmioAction::Reset;
                }
                let was_ok = self.driver_ok();
                let mut status = value;
                // FEATURES_OK only sticks if the driver accepted VERSION_1 (a legacy driver is refused).
                if status & STATUS_FEATURES_OK != 0 && self.driver_features & F_VERSION_1 == 0 {
                    status &= !STATUS_FEATURES_OK;
                }
                self.status = status;
                if !was_ok && self.driver_ok() {
                    return MmioAction::DriverOk;
                }
            }
            _ => {}
        }
        MmioAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: DeviceInfo = DeviceInfo { device_id: 1, features: F_VERSION_1 | (1 << 5), queue_max: 256 };

    #[test]
    fn a_driver_initializes_the_device_as_the_spec_says() {
        let mut m = MmioState::new(2);
        assert_eq!(m.read(reg::MAGIC, &NET), MAGIC_VALUE);
        assert_eq!(m.read(reg::VERSION, &NET), 2);
        assert_eq!(m.read(reg::DEVICE_ID, &NET), 1);
        m.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER, &NET);
        m.write(reg::DEVICE_FEATURES_SEL, 1, &NET);
        assert_eq!(m.read(reg::DEVICE_FEATURES, &NET), 1);
        m.write(reg::DEVICE_FEATURES_SEL, 0, &NET);
        assert_eq!(m.read(reg::DEVICE_FEATURES, &NET), 1 << 5);
        // The driver asks for more than is offered: it gets the offered part.
        m.write(reg::DRIVER_FEATURES_SEL, 0, &NET);
        m.write(reg::DRIVER_FEATURES, 0xffff_ffff, &NET);
        m.write(reg::DRIVER_FEATURES_SEL, 1, &NET);
        m.write(reg::DRIVER_FEATURES, 1, &NET);
        assert_eq!(m.driver_features, NET.features);
        m.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, &NET);
        assert_ne!(m.read(reg::STATUS, &NET) & STATUS_FEATURES_OK, 0);
        for (n, base) in [(0u32, 0x10_0000u64), (1, 0x20_0000)] {
            m.write(reg::QUEUE_SEL, n, &NET);
            assert_eq!(m.read(reg::QUEUE_NUM_MAX, &NET), 256);
            m.write(reg::QUEUE_NUM, 64, &NET);
            m.write(reg::QUEUE_DESC_LOW, base as u32, &NET);
            m.write(reg::QUEUE_DESC_HIGH, 0, &NET);
            m.write(reg::QUEUE_DRIVER_LOW, (base + 0x400) as u32, &NET);
            m.write(reg::QUEUE_DEVICE_LOW, (base + 0x1000) as u32, &NET);
            m.write(reg::QUEUE_DEVICE_HIGH, 1, &NET);
            m.write(reg::QUEUE_READY, 1, &NET);
        }
        assert_eq!(m.queues[1].used, (1 << 32) | 0x20_1000);
        assert!(m.queues.iter().all(|q| q.ready && q.size == 64));
        // Notifications only count once the driver is OK.
        assert_eq!(m.write(reg::QUEUE_NOTIFY, 1, &NET), MmioAction::None);
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(m.write(reg::STATUS, all, &NET), MmioAction::DriverOk);
        assert_eq!(m.write(reg::QUEUE_NOTIFY, 1, &NET), MmioAction::Notify(1));
        assert_eq!(m.write(reg::QUEUE_NOTIFY, 7, &NET), MmioAction::None);
        // A ready queue's address cannot move under the device.
        m.write(reg::QUEUE_DESC_LOW, 0x999, &NET);
        assert_eq!(m.queues[1].desc, 0x20_0000);
        assert_eq!(m.write(reg::STATUS, 0, &NET), MmioAction::Reset);
        assert_eq!(m, MmioState::new(2));
    }

    #[test]
    fn a_legacy_driver_and_a_bad_queue_size_are_refused() {
        let mut m = MmioState::new(2);
        m.write(reg::DRIVER_FEATURES, 1 << 5, &NET);
        m.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, &NET);
        assert_eq!(m.read(reg::STATUS, &NET) & STATUS_FEATURES_OK, 0);
        m.write(reg::QUEUE_NUM, 100, &NET);
        m.write(reg::QUEUE_READY, 1, &NET);
        assert!(!m.queues[0].ready);
        m.write(reg::QUEUE_NUM, 512, &NET);
        assert_eq!(m.queues[0].size, 0);
        m.write(reg::QUEUE_SEL, 9, &NET);
        assert_eq!(m.read(reg::QUEUE_NUM_MAX, &NET), 0);
    }
}
