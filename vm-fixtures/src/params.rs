//! Fixture parameters: what the operator chooses, validated, and encoded into
//! the guest's parameter block.

use crate::abi;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Which guest workload to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FixtureKind {
    Ledger,
    Dirty,
    Idle,
    /// A key-value server speaking RESP2 (Redis) over virtio-net: needs a network.
    Kv,
}

impl FixtureKind {
    /// The fixtures with an oracle (a host-side model of their memory and output).
    pub const ALL: [FixtureKind; 3] = [FixtureKind::Ledger, FixtureKind::Dirty, FixtureKind::Idle];
    /// Every fixture, `kv` included.
    pub const EVERY: [FixtureKind; 4] = [FixtureKind::Ledger, FixtureKind::Dirty, FixtureKind::Idle, FixtureKind::Kv];

    /// Whether this fixture is a network service (it needs [`FixtureParams::net`]).
    pub fn is_network_service(self) -> bool {
        self == FixtureKind::Kv
    }

    pub fn name(self) -> &'static str {
        match self {
            FixtureKind::Ledger => "ledger",
            FixtureKind::Dirty => "dirty",
            FixtureKind::Idle => "idle",
            FixtureKind::Kv => "kv",
        }
    }
}

impl fmt::Display for FixtureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FixtureKind {
    type Err = ParamsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FixtureKind::EVERY.into_iter().find(|k| k.name() == s).ok_or_else(|| ParamsError::UnknownFixture(s.to_string()))
    }
}

/// Write pattern of the `dirty` fixture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyPattern {
    Sequential,
    Random,
    /// `hot_permille` of the writes go to the first `hot_pages` pages of each vCPU's share.
    HotCold {
        hot_pages: u64,
        hot_permille: u64,
    },
}

impl DirtyPattern {
    fn code(self) -> u64 {
        match self {
            DirtyPattern::Sequential => abi::PATTERN_SEQUENTIAL,
            DirtyPattern::Random => abi::PATTERN_RANDOM,
            DirtyPattern::HotCold { .. } => abi::PATTERN_HOT_COLD,
        }
    }

    /// The hot-set threshold on `x & 1023` that the guest compares against.
    fn hot_threshold(self) -> u64 {
        match self {
            DirtyPattern::HotCold { hot_permille, .. } => hot_permille * 1024 / 1000,
            _ => 0,
        }
    }

    fn hot_pages(self) -> u64 {
        match self {
            DirtyPattern::HotCold { hot_pages, .. } => hot_pages,
            _ => 0,
        }
    }
}

/// Everything that determines a fixture run. Two runs with equal parameters
/// produce the same memory and the same per-vCPU output sequences.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixtureParams {
    pub kind: FixtureKind,
    pub vcpus: u64,
    /// Steps each vCPU runs before it reports done; `u64::MAX` runs until stopped.
    pub steps: u64,
    /// Guest-physical address of the working set's first page.
    pub ws_base: u64,
    /// Pages in the working set (shared out among the vCPUs).
    pub ws_pages: u64,
    /// A record is emitted every this many steps.
    pub record_every: u64,
    pub seed: u64,
    /// `ledger`: pages written per step.
    pub writes_per_step: u64,
    /// `dirty`: which pages are written.
    pub pattern: DirtyPattern,
    /// `dirty`: TSC ticks between writes (0: as fast as the guest can).
    pub ticks_per_write: u64,
    /// `idle`: `pause` instructions between steps.
    pub spin: u64,
    /// Guest memory starts with every page written (see [`FixtureParams::prefill_ranges`]),
    /// as a guest that has run for a while has it, instead of zero.
    #[serde(default)]
    pub prefill: bool,
    /// The guest's TSC frequency in kHz (its clock), filled in by the VMM at boot.
    #[serde(default)]
    pub tsc_khz: u64,
    /// `kv`: the guest's network identity and service.
    #[serde(default)]
    pub net: Option<GuestNet>,
}

/// A network guest's identity as it sees it: its MAC and IPv4 address, its
/// gateway (the host's end of the tap), and what it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub port: u16,
    /// The most bytes of keys and values the store holds; past it, writes get `-ERR`.
    pub max_bytes: u64,
}

impl GuestNet {
    /// The defaults: a locally administered MAC, `10.77.0.2/24` behind `10.77.0.1`, Redis's port.
    pub fn new(ip: Ipv4Addr, gateway: Ipv4Addr, prefix: u8) -> Self {
        let [_, _, c, d] = ip.octets();
        GuestNet { mac: [0x52, 0x54, 0x00, 0x77, c, d], ip, gateway, prefix, port: 6379, max_bytes: 16 << 20 }
    }

    /// The MAC as `P_NET_MAC` carries it: the first octet in the lowest byte.
    pub fn mac_word(&self) -> u64 {
        let mut word = [0u8; 8];
        word[..6].copy_from_slice(&self.mac);
        u64::from_le_bytes(word)
    }
}

/// A parameter that the guest cannot run with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("unknown fixture {0:?}: choose one of ledger, dirty, idle, kv")]
    UnknownFixture(String),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{vcpus} vCPUs are more than the {max} the guest layout has stacks for")]
    TooManyVcpus { vcpus: u64, max: u64 },
    #[error("the working set of {ws_pages} pages is smaller than the {vcpus} vCPUs sharing it: give it at least one page per vCPU")]
    WorkingSetTooSmall { ws_pages: u64, vcpus: u64 },
    #[error("hot/cold pattern: {hot_pages} hot pages is more than the {per_vcpu} pages each vCPU owns")]
    HotSetTooLarge { hot_pages: u64, per_vcpu: u64 },
    #[error("hot/cold pattern: hot share {0}\u{2030} is over 1000\u{2030}")]
    HotShare(u64),
    #[error("the working set starts at {0:#x}, below the first working-set address {min:#x}", min = abi::WORKING_SET_GPA)]
    WorkingSetBase(u64),
    #[error("the kv fixture serves on a network: give it one (--net tap)")]
    NoNetwork,
    #[error("the {0} fixture has no network device: only kv takes --net")]
    NetworkNotServed(FixtureKind),
    #[error("the kv fixture runs on exactly one vCPU, not {0}")]
    KvVcpus(u64),
    #[error("the guest's address {ip} and the host's {gateway} must differ and be in one /{prefix} network (a prefix of 1 to 30): choose --guest-ip, --host-ip and --prefix to match")]
    NetMismatch { ip: Ipv4Addr, gateway: Ipv4Addr, prefix: u8 },
}

impl FixtureParams {
    /// Defaults for `kind` with a working set of `ws_pages` pages at [`abi::WORKING_SET_GPA`].
    pub fn new(kind: FixtureKind, vcpus: u64, ws_pages: u64) -> Self {
        FixtureParams {
            kind,
            vcpus,
            steps: match kind {
                FixtureKind::Ledger => 20_000,
                FixtureKind::Dirty => 100_000,
                FixtureKind::Idle => 200,
                FixtureKind::Kv => u64::MAX,
            },
            ws_base: abi::WORKING_SET_GPA,
            ws_pages,
            record_every: match kind {
                FixtureKind::Ledger => 1_000,
                FixtureKind::Dirty => 10_000,
                FixtureKind::Idle | FixtureKind::Kv => 20,
            },
            seed: 0x5043_4654,
            writes_per_step: 1,
            pattern: DirtyPattern::Random,
            ticks_per_write: 0,
            spin: 1_000,
            prefill: false,
            tsc_khz: 0,
            net: None,
        }
    }

    /// Pages of the working set that vCPU `v` owns: `v, v + n, v + 2n, …`.
    pub fn pages_per_vcpu(&self) -> u64 {
        self.ws_pages / self.vcpus.max(1)
    }

    /// Whether the guest stops by itself.
    pub fn is_finite(&self) -> bool {
        self.steps != u64::MAX
    }

    pub fn validate(&self) -> Result<(), ParamsError> {
        for (name, value) in [
            ("vcpus", self.vcpus),
            ("steps", self.steps),
            ("record-every", self.record_every),
            ("writes-per-step", self.writes_per_step),
            ("spin", self.spin),
        ] {
            if value == 0 {
                return Err(ParamsError::Zero(name));
            }
        }
        if self.vcpus > abi::MAX_VCPUS {
            return Err(ParamsError::TooManyVcpus { vcpus: self.vcpus, max: abi::MAX_VCPUS });
        }
        if self.ws_base < abi::WORKING_SET_GPA {
            return Err(ParamsError::WorkingSetBase(self.ws_base));
        }
        if self.ws_pages < self.vcpus {
            return Err(ParamsError::WorkingSetTooSmall { ws_pages: self.ws_pages, vcpus: self.vcpus });
        }
        match (&self.net, self.kind.is_network_service()) {
            (None, true) => return Err(ParamsError::NoNetwork),
            (Some(_), false) => return Err(ParamsError::NetworkNotServed(self.kind)),
            (Some(net), true) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(net.prefix)).unwrap_or(0);
                let same = u32::from(net.ip) & mask == u32::from(net.gateway) & mask;
                if !(1..=30).contains(&net.prefix) || !same || net.ip == net.gateway {
                    return Err(ParamsError::NetMismatch { ip: net.ip, gateway: net.gateway, prefix: net.prefix });
                }
                if self.vcpus != 1 {
                    return Err(ParamsError::KvVcpus(self.vcpus));
                }
            }
            (None, false) => {}
        }
        if let DirtyPattern::HotCold { hot_pages, hot_permille } = self.pattern {
            if hot_pages == 0 {
                return Err(ParamsError::Zero("hot-pages"));
            }
            if hot_pages > self.pages_per_vcpu() {
                return Err(ParamsError::HotSetTooLarge { hot_pages, per_vcpu: self.pages_per_vcpu() });
            }
            if hot_permille > 1000 {
                return Err(ParamsError::HotShare(hot_permille));
            }
        }
        Ok(())
    }

    /// The working set's end (exclusive guest-physical address).
    pub fn ws_end(&self) -> u64 {
        self.ws_base + self.ws_pages * abi::PAGE_SIZE
    }

    /// The parameter block the guest reads at [`abi::PARAMS_GPA`].
    pub fn encode(&self) -> Vec<u8> {
        let fields = [
            (abi::P_MAGIC, abi::PARAMS_MAGIC),
            (abi::P_VCPUS, self.vcpus),
            (abi::P_STEPS, self.steps),
            (abi::P_WS_BASE, self.ws_base),
            (abi::P_WS_PAGES, self.ws_pages),
            (abi::P_RECORD_EVERY, self.record_every),
            (abi::P_SEED, self.seed),
            (abi::P_WRITES_PER_STEP, self.writes_per_step),
            (abi::P_PATTERN, self.pattern.code()),
            (abi::P_TICKS_PER_WRITE, self.ticks_per_write),
            (abi::P_HOT_PAGES, self.pattern.hot_pages()),
            (abi::P_HOT_THRESHOLD, self.pattern.hot_threshold()),
            (abi::P_SPIN, self.spin),
            (abi::P_TSC_KHZ, self.tsc_khz),
            (abi::P_NET_MAC, self.net.as_ref().map_or(0, GuestNet::mac_word)),
            (abi::P_NET_IP, self.net.as_ref().map_or(0, |n| u64::from(u32::from(n.ip)))),
            (abi::P_NET_GATEWAY, self.net.as_ref().map_or(0, |n| u64::from(u32::from(n.gateway)))),
            (abi::P_NET_PREFIX, self.net.as_ref().map_or(0, |n| u64::from(n.prefix))),
            (abi::P_NET_PORT, self.net.as_ref().map_or(0, |n| u64::from(n.port))),
            (abi::P_KV_MAX_BYTES, self.net.as_ref().map_or(0, |n| n.max_bytes)),
        ];
        let len = fields.iter().map(|(off, _)| off + 8).max().unwrap_or(0);
        let mut block = vec![0u8; len as usize];
        for (off, value) in fields {
            block[off as usize..off as usize + 8].copy_from_slice(&value.to_le_bytes());
        }
        block
    }

    /// Hot-set threshold as the guest sees it (exposed for the oracle).
    pub(crate) fn hot_threshold(&self) -> u64 {
        self.pattern.hot_threshold()
    }

    pub(crate) fn hot_pages(&self) -> u64 {
        self.pattern.hot_pages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixture_names() {
        assert_eq!("ledger".parse::<FixtureKind>(), Ok(FixtureKind::Ledger));
        assert_eq!("nope".parse::<FixtureKind>(), Err(ParamsError::UnknownFixture("nope".into())));
    }

    #[test]
    fn rejects_unrunnable_parameters() {
        let mut p = FixtureParams::new(FixtureKind::Ledger, 2, 1);
        assert_eq!(p.validate(), Err(ParamsError::WorkingSetTooSmall { ws_pages: 1, vcpus: 2 }));
        p.ws_pages = 64;
        p.record_every = 0;
        assert_eq!(p.validate(), Err(ParamsError::Zero("record-every")));
        p.record_every = 1;
        p.pattern = DirtyPattern::HotCold { hot_pages: 33, hot_permille: 900 };
        assert!(matches!(p.validate(), Err(ParamsError::HotSetTooLarge { .. })));
        p.pattern = DirtyPattern::HotCold { hot_pages: 8, hot_permille: 900 };
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn encodes_fields_at_abi_offsets() {
        let p = FixtureParams::new(FixtureKind::Ledger, 2, 100);
        let block = p.encode();
        let field = |off: u64| u64::from_le_bytes(block[off as usize..off as usize + 8].try_into().unwrap());
        assert_eq!(field(abi::P_MAGIC), abi::PARAMS_MAGIC);
        assert_eq!(field(abi::P_VCPUS), 2);
        assert_eq!(field(abi::P_WS_PAGES), 100);
        assert_eq!(field(abi::P_SPIN), p.spin);
    }
}
