//! What a machine is: its configuration ([`MachineConfig`]) and, paused, its
//! whole state except guest memory ([`MachineState`]), as the snapshot file
//! and a migration carry it.

use crate::vmm::devices::DeviceState;
use crate::vmm::kvm::state::{VcpuState, VmKernelState};
use crate::vmm::net::provision::NetBackend;
use serde::{Deserialize, Serialize};
use vm_fixtures::FixtureParams;

/// How a machine is built: its memory and the workload it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub mem_bytes: u64,
    /// Guest memory is registered as memslots of at most this size.
    pub slot_bytes: u64,
    pub fixture: FixtureParams,
    /// `dirty` fixture: pages each vCPU writes per second (paced on the TSC);
    /// `None` writes as fast as the guest can.
    pub dirty_rate: Option<u64>,
    /// Network guests: the tap behind the guest's virtio-net, and the bridge
    /// it sits on (if it does). Each host that runs the VM makes its own tap
    /// of that name (on its own bridge of that name), or takes the one it has.
    #[serde(default)]
    pub net: Option<NetBackend>,
}

impl MachineConfig {
    pub fn vcpus(&self) -> usize {
        self.fixture.vcpus as usize
    }
}

/// The whole state of a paused machine, except guest memory.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub config: MachineConfig,
    pub vcpus: Vec<VcpuState>,
    pub kernel: VmKernelState,
    pub devices: DeviceState,
}

impl MachineState {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("machine state always encodes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}
