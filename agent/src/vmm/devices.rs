//! The fixture platform's device model: the output device (the assembly
//! fixtures' stand-in for a network: records that reach the outside world),
//! the control port (the guest's status), the console, and the network idle
//! port; plus, for network guests, the virtio-net device's state
//! ([`crate::vmm::net`]). Its state is part of every snapshot.

use crate::vmm::memory::{GuestMemory, MemoryError};
use crate::vmm::net::device::NetDeviceState;
use serde::{Deserialize, Serialize};
use vm_fixtures::{abi, OutputRecord};

/// What a vCPU last reported on the control port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VcpuStatus {
    Running,
    /// The workload finished; the vCPU is never entered again.
    Done,
    /// The guest rejected its parameter block.
    BadParams,
}

/// A port write decoded into what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    Output(OutputRecord),
    Status(VcpuStatus),
    /// A network guest is up and serves on its port.
    Serving,
    /// The guest panicked (its message went to the console before).
    Panicked,
    /// One byte of console output.
    Console(u8),
    /// The guest has nothing to do until a frame arrives or `timeout_us` passes.
    NetIdle {
        timeout_us: u32,
    },
    /// A write to a port no device decodes (logged, otherwise ignored, as on real hardware).
    Unclaimed {
        port: u16,
        value: u32,
    },
}

/// Decodes the guest's `out value, port` on vCPU `vcpu`.
pub fn decode_port_write(memory: &GuestMemory, vcpu: u8, port: u16, value: u32) -> Result<DeviceEvent, MemoryError> {
    match u64::from(port) {
        abi::PORT_OUTPUT => {
            let mailbox = abi::MAILBOX_GPA + u64::from(vcpu) * abi::MAILBOX_STRIDE;
            Ok(DeviceEvent::Output(OutputRecord {
                vcpu: u32::from(vcpu),
                step: memory.read_u64(mailbox + abi::M_STEP)?,
                digest: memory.read_u64(mailbox + abi::M_DIGEST)?,
            }))
        }
        abi::PORT_CONTROL => Ok(match u64::from(value) {
            abi::CONTROL_DONE => DeviceEvent::Status(VcpuStatus::Done),
            abi::CONTROL_BAD_PARAMS => DeviceEvent::Status(VcpuStatus::BadParams),
            abi::CONTROL_SERVING => DeviceEvent::Serving,
            abi::CONTROL_PANIC => DeviceEvent::Panicked,
            _ => DeviceEvent::Unclaimed { port, value },
        }),
        abi::PORT_CONSOLE => Ok(DeviceEvent::Console(value as u8)),
        abi::PORT_NET_IDLE => Ok(DeviceEvent::NetIdle { timeout_us: value }),
        _ => Ok(DeviceEvent::Unclaimed { port, value }),
    }
}

/// The device model's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Every record the output device emitted, in order. After a restore the
    /// log continues, so it always holds the guest's whole output history.
    pub output_log: Vec<OutputRecord>,
    pub vcpu_status: Vec<VcpuStatus>,
    /// A network guest said it serves (it stays so across snapshots and migrations).
    #[serde(default)]
    pub serving: bool,
    /// The virtio-net device, for network guests (captured with the machine paused).
    #[serde(default)]
    pub net: Option<NetDeviceState>,
}

impl DeviceState {
    pub fn new(vcpus: usize) -> Self {
        DeviceState { output_log: Vec::new(), vcpu_status: vec![VcpuStatus::Running; vcpus], serving: false, net: None }
    }

    /// Applies an event from vCPU `vcpu`.
    pub fn apply(&mut self, vcpu: u8, event: DeviceEvent) {
        match event {
            DeviceEvent::Output(record) => self.output_log.push(record),
            DeviceEvent::Status(status) => self.vcpu_status[usize::from(vcpu)] = status,
            DeviceEvent::Serving => self.serving = true,
            DeviceEvent::Panicked
            | DeviceEvent::Console(_)
            | DeviceEvent::NetIdle { .. }
            | DeviceEvent::Unclaimed { .. } => {}
        }
    }

    pub fn all_done(&self) -> bool {
        self.vcpu_status.iter().all(|s| *s == VcpuStatus::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_doorbell_reads_the_vcpus_mailbox() {
        let memory = GuestMemory::new(2 << 20, 2 << 20).unwrap();
        let mailbox = abi::MAILBOX_GPA + abi::MAILBOX_STRIDE;
        memory.write_u64(mailbox + abi::M_STEP, 7).unwrap();
        memory.write_u64(mailbox + abi::M_DIGEST, 0xabc).unwrap();
        let event = decode_port_write(&memory, 1, abi::PORT_OUTPUT as u16, 1).unwrap();
        assert_eq!(event, DeviceEvent::Output(OutputRecord { vcpu: 1, step: 7, digest: 0xabc }));

        let mut state = DeviceState::new(2);
        state.apply(1, event);
        state.apply(0, decode_port_write(&memory, 0, abi::PORT_CONTROL as u16, 1).unwrap());
        assert_eq!(state.output_log.len(), 1);
        assert!(!state.all_done());
        state.apply(1, DeviceEvent::Status(VcpuStatus::Done));
        assert!(state.all_done());
        assert_eq!(decode_port_write(&memory, 0, 0x80, 5).unwrap(), DeviceEvent::Unclaimed { port: 0x80, value: 5 });
    }
}
