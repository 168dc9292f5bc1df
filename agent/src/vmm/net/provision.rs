//! What a host sets up for a network guest: its tap, with the host's address
//! on it, checked against the host's other interfaces; removed again when
//! the guest is done (only if it was made here).

use super::tap::{interface_exists, is_tap, validate_name, Tap, TapError};
use std::net::Ipv4Addr;

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
}

/// A network guest's tap on this host, removed on drop if it was created here.
#[derive(Debug)]
pub struct HostTap {
    name: String,
    created: bool,
}

fn network(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

impl HostTap {
    /// Makes tap `name` with `host_ip/prefix`, or takes the existing one if it has that address.
    pub fn ensure(name: &str, host_ip: Ipv4Addr, prefix: u8) -> Result<HostTap, ProvisionError> {
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

    pub fn created(&self) -> bool {
        self.created
    }

    /// Keeps the tap after this is dropped (e.g. for a restore in another process).
    pub fn keep(mut self) {
        self.created = false;
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        if !self.created {
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
        let tap = HostTap::ensure(&name, host_ip, 24).unwrap();
        assert!(tap.created());
        assert!(host_ipv4_addresses().unwrap().contains(&(name.clone(), host_ip)));
        // Taking it again with the same address is fine; with another, it says which it has.
        assert!(!HostTap::ensure(&name, host_ip, 24).unwrap().created());
        let other = HostTap::ensure(&name, Ipv4Addr::new(10, 198, 0, 1), 24).unwrap_err();
        assert!(other.to_string().contains(&host_ip.to_string()), "{other}");
        // A new tap in the network of an existing interface collides.
        let clash =
            HostTap::ensure(&format!("{name}b"), Ipv4Addr::new(10, 199, (std::process::id() % 200) as u8, 7), 24)
                .unwrap_err();
        assert!(matches!(clash, ProvisionError::Collides { .. }), "{clash}");
        // Attached once; a second attach is refused as in use.
        let attached = Tap::attach(&name).unwrap();
        assert!(matches!(Tap::attach(&name), Err(TapError::Busy { .. })));
        drop(attached);
        drop(tap);
        assert!(!interface_exists(&name));
        assert!(matches!(Tap::attach(&name), Err(TapError::Missing { .. })));
    }
}
