//! What a host sets up for a network guest: its tap, either with the host's
//! address on it (checked against the host's other interfaces) or without an
//! address, on an L2 bridge of the host; removed again when the guest is
//! done (only if it was made here).

use super::tap::{interface_exists, is_bridge, is_tap, master_of, validate_name, Tap, TapError};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// A network guest's host end, as it travels with the VM (in
/// `MachineConfig`): the tap's name and, if the tap sits on an L2 bridge
/// instead of carrying the host's address, the bridge's name. Every host that
/// runs the VM (a migration's destination, a restore) puts its own tap of
/// that name on its own bridge of that name, so the guest keeps its address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetBackend {
    pub tap: String,
    /// None: the tap carries the host's address (the guest's gateway).
    #[serde(default)]
    pub bridge: Option<String>,
}

impl NetBackend {
    /// A tap with the host's address on it.
    pub fn routed(tap: impl Into<String>) -> NetBackend {
        NetBackend { tap: tap.into(), bridge: None }
    }

    /// A tap without an address, enslaved to `bridge`.
    pub fn bridged(tap: impl Into<String>, bridge: impl Into<String>) -> NetBackend {
        NetBackend { tap: tap.into(), bridge: Some(bridge.into()) }
    }
}

/// The tap's name (what [`Tap::attach`] opens).
impl AsRef<str> for NetBackend {
    fn as_ref(&self) -> &str {
        &self.tap
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("the guest's network {net}/{prefix} is already in use here: interface {interface} has {address}; choose --guest-ip and --host-ip in another network")]
    Collides { net: Ipv4Addr, prefix: u8, interface: String, address: Ipv4Addr },
    #[error("tap {name} exists with address {found}, not {wanted}: remove it (ip link del {name}) or pass --host-ip {found}")]
    OtherAddress { name: String, found: String, wanted: Ipv4Addr },
    #[error("cannot list the host's addresses: {0}")]
    Addresses(std::io::Error),
    #[error("bridge {name} does not exist here: create it (ip link add {name} type bridge && ip link set {name} up) or pass --bridge with an existing bridge")]
    NoBridge { name: String },
    #[error("interface {name} is not a bridge: pass --bridge with the name of an L2 bridge (ip -d link show type bridge lists them)")]
    NotABridge { name: String },
    #[error(
        "tap {name} exists on {found}, not on bridge {bridge}: remove it (ip link del {name}) or choose another --tap"
    )]
    OtherBridge { name: String, found: String, bridge: String },
}

/// A network guest's tap on this host, removed when the last of this
/// process's users drops it, if this process made it.
#[derive(Debug)]
pub struct HostTap {
    name: String,
    created: bool,
}

/// The taps this process's machines use, by name. One agent may hold two
/// copies of a VM at once (the copy that migrated out, not yet dropped, and
/// the one that came back): the tap goes only when neither uses it, so the
/// old copy's drop cannot take the tap from under the new one.
static TAPS_IN_USE: std::sync::Mutex<std::collections::BTreeMap<String, TapUse>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

#[derive(Debug)]
struct TapUse {
    users: usize,
    /// Made by this process: removed when its last user goes.
    made_here: bool,
}

fn taps_in_use() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, TapUse>> {
    TAPS_IN_USE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn network(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

impl HostTap {
    /// Makes the tap of `backend`: with `host_ip/prefix` on it, or (bridged)
    /// without an address on its bridge; or takes the existing one if it has
    /// that address, or is on that bridge.
    pub fn ensure(backend: &NetBackend, host_ip: Ipv4Addr, prefix: u8) -> Result<HostTap, ProvisionError> {
        // Held across the checks and the creation: a drop cannot remove the tap meanwhile.
        let mut taps = taps_in_use();
        let tap = match &backend.bridge {
            None => Self::ensure_routed(&backend.tap, host_ip, prefix),
            Some(bridge) => Self::ensure_bridged(&backend.tap, bridge),
        }?;
        match taps.get_mut(&tap.name) {
            Some(used) => used.users += 1,
            None => {
                taps.insert(tap.name.clone(), TapUse { users: 1, made_here: tap.created });
            }
        }
        Ok(tap)
    }

    /// Makes tap `name` without an address on the existing bridge `bridge`,
    /// or takes the existing tap if it is on that bridge.
    fn ensure_bridged(name: &str, bridge: &str) -> Result<HostTap, ProvisionError> {
        validate_name(name)?;
        validate_name(bridge)?;
        if !interface_exists(bridge) {
            return Err(ProvisionError::NoBridge { name: bridge.to_string() });
        }
        if !is_bridge(bridge) {
            return Err(ProvisionError::NotABridge { name: bridge.to_string() });
        }
        if interface_exists(name) {
            if !is_tap(name) {
                return Err(TapError::NotATap { name: name.to_string() }.into());
            }
            return match master_of(name) {
                Some(master) if master == bridge => Ok(HostTap { name: name.to_string(), created: false }),
                found => Err(ProvisionError::OtherBridge {
                    name: name.to_string(),
                    found: found.map_or_else(|| "no bridge".to_string(), |m| format!("bridge {m}")),
                    bridge: bridge.to_string(),
                }),
            };
        }
        // Made persistent, then let go: the machine attaches to it by name.
        drop(Tap::create_bridged(name, bridge)?);
        Ok(HostTap { name: name.to_string(), created: true })
    }

    /// Makes tap `name` with `host_ip/prefix`, or takes the existing one if it has that address.
    fn ensure_routed(name: &str, host_ip: Ipv4Addr, prefix: u8) -> Result<HostTap, ProvisionError> {
        validate_name(name)?;
        let addresses = host_ipv4_addresses().map_err(ProvisionError::Addresses)?;
        if interface_exists(name) {
            if !is_tap(name) {
                return Err(TapError::NotATap { name: name.to_string() }.into());
            }
            let mine: Vec<Ipv4Addr> = addresses.iter().filter(|(i, _)| i == name).map(|(_, a)| *a).collect();
            if !mine.contains(&host_ip) {
                let found = if mine.is_empty() {
                    "none".to_string()
                } else {
                    mine.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(", ")
                };
                return Err(ProvisionError::OtherAddress { name: name.to_string(), found, wanted: host_ip });
            }
            return Ok(HostTap { name: name.to_string(), created: false });
        }
        let net = network(host_ip, prefix);
        if let Some((interface, address)) = addresses.iter().find(|(_, a)| network(*a, prefix) == net) {
            return Err(ProvisionError::Collides { net, prefix, interface: interface.clone(), address: *address });
        }
        // Made persistent, then let go: the machine attaches to it by name.
        drop(Tap::create(name, host_ip, prefix)?);
        Ok(HostTap { name: name.to_string(), created: true })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this call made the tap.
    pub fn created(&self) -> bool {
        self.created
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let mut taps = taps_in_use();
        let Some(used) = taps.get_mut(&self.name) else { return };
        used.users -= 1;
        if used.users > 0 {
            return;
        }
        let made_here = taps.remove(&self.name).is_some_and(|u| u.made_here);
        if !made_here {
            return;
        }
        let removed = Tap::attach(&self.name).and_then(Tap::remove);
        if let Err(e) = removed {
            tracing::warn!(tap = %self.name, "cannot remove the tap: {e}; remove it with: ip link del {}", self.name);
        }
    }
}

/// Every IPv4 address of this host (this network namespace), by interface.
pub fn host_ipv4_addresses() -> std::io::Result<Vec<(String, Ipv4Addr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let entry = unsafe { &*cursor };
        // SAFETY: a non-null ifa_addr points at a sockaddr; its family says which kind.
        if !entry.ifa_addr.is_null() && i32::from(unsafe { (*entry.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in; the name is a NUL-terminated string.
            let (sin, name) =
                unsafe { (&*(entry.ifa_addr as *const libc::sockaddr_in), std::ffi::CStr::from_ptr(entry.ifa_name)) };
            out.push((name.to_string_lossy().into_owned(), Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_is_made_with_its_address_and_removed_after() {
        let name = format!("pcftt{}", std::process::id() % 100_000);
        let host_ip = Ipv4Addr::new(10, 199, (std::process::id() % 200) as u8, 1);
        let backend = NetBackend::routed(&name);
        let tap = HostTap::ensure(&backend, host_ip, 24).unwrap();
        assert!(tap.created());
        assert!(host_ipv4_addresses().unwrap().contains(&(name.clone(), host_ip)));
        // Taking it again with the same address is fine; with another, it says which it has.
        assert!(!HostTap::ensure(&backend, host_ip, 24).unwrap().created());
        let other = HostTap::ensure(&backend, Ipv4Addr::new(10, 198, 0, 1), 24).unwrap_err();
        assert!(other.to_string().contains(&host_ip.to_string()), "{other}");
        // A new tap in the network of an existing interface collides.
        let clash = HostTap::ensure(
            &NetBackend::routed(format!("{name}b")),
            Ipv4Addr::new(10, 199, (std::process::id() % 200) as u8, 7),
            24,
        )
        .unwrap_err();
        assert!(matches!(clash, ProvisionError::Collides { .. }), "{clash}");
        // Attached once; a second attach is refused as in use.
        let attached = Tap::attach(&name).unwrap();
        assert!(matches!(Tap::attach(&name), Err(TapError::Busy { .. })));
        drop(attached);
        // A second user in this process (a VM that came back while its old copy
        // is not yet dropped): the maker's drop leaves the tap to it.
        let second = HostTap::ensure(&backend, host_ip, 24).unwrap();
        drop(tap);
        assert!(interface_exists(&name), "the tap went while a user was left");
        drop(second);
        assert!(!interface_exists(&name));
        assert!(matches!(Tap::attach(&name), Err(TapError::Missing { .. })));
    }

    /// An interface made with `ip link add NAME ARGS…` for a test, deleted on drop.
    struct Link(String);

    impl Link {
        fn add(name: &str, args: &[&str]) -> Link {
            let out = std::process::Command::new("ip").args(["link", "add", name]).args(args).output().unwrap();
            assert!(out.status.success(), "ip link add {name} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Link(name.to_string())
        }
    }

    impl Drop for Link {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }

    #[test]
    fn a_bridged_tap_joins_its_bridge_without_an_address_and_is_removed_after() {
        let id = std::process::id() % 100_000;
        let (name, bridge) = (format!("pcftb{id}"), format!("pcftbr{id}"));
        let unused = Ipv4Addr::new(10, 197, 0, 1);
        // No such bridge; an interface that is not one.
        let missing = HostTap::ensure(&NetBackend::bridged(&name, &bridge), unused, 24).unwrap_err();
        assert!(matches!(missing, ProvisionError::NoBridge { .. }), "{missing}");
        assert!(missing.to_string().contains(&bridge) && missing.to_string().contains("type bridge"), "{missing}");
        let not_one = HostTap::ensure(&NetBackend::bridged(&name, "lo"), unused, 24).unwrap_err();
        assert!(matches!(not_one, ProvisionError::NotABridge { .. }), "{not_one}");
        assert!(!interface_exists(&name), "a refusal left its tap");

        let _bridge = Link::add(&bridge, &["type", "bridge"]);
        let backend = NetBackend::bridged(&name, &bridge);
        let tap = HostTap::ensure(&backend, unused, 24).unwrap();
        assert!(tap.created());
        assert_eq!(master_of(&name).as_deref(), Some(bridge.as_str()));
        assert!(!host_ipv4_addresses().unwrap().iter().any(|(i, _)| *i == name), "a bridged tap has no address");
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "the tap is up");
        // Taken again on the same bridge; refused for another bridge or as a routed tap with an address.
        assert!(!HostTap::ensure(&backend, unused, 24).unwrap().created());
        let other = HostTap::ensure(&NetBackend::bridged(&name, "lo"), unused, 24).unwrap_err();
        assert!(matches!(other, ProvisionError::NotABridge { .. }), "{other}");
        let _other_bridge = Link::add(&format!("{bridge}o"), &["type", "bridge"]);
        let other = HostTap::ensure(&NetBackend::bridged(&name, format!("{bridge}o")), unused, 24).unwrap_err();
        assert!(other.to_string().contains(&format!("exists on bridge {bridge}")), "{other}");
        let routed = HostTap::ensure(&NetBackend::routed(&name), unused, 24).unwrap_err();
        assert!(matches!(routed, ProvisionError::OtherAddress { .. }), "{routed}");
        // Attached once; it goes (and leaves the bridge) when dropped.
        let attached = Tap::attach(&backend).unwrap();
        drop(attached);
        drop(tap);
        assert!(!interface_exists(&name));
    }
}
