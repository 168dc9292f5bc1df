//! Two "hosts" on one machine for `pcft demo --fail-kind partition`: the
//! source and destination agents each run in a network namespace of their
//! own, joined by a veth pair that carries the migration; each namespace also
//! has a veth to the root namespace (where the demo and its outside world
//! live). Cutting the pair partitions the two hosts while both stay alive and
//! both still reach the outside, which is what fencing must handle.
//!
//! Addresses (N = a per-run number): source 10.N.1.2 (root side 10.N.1.1),
//! destination 10.N.2.2 (root side 10.N.2.1), the pair 10.N.3.1 ↔ 10.N.3.2.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// The namespaces and links of one demo run; removed when dropped.
pub struct Testbed {
    pub source_ns: String,
    pub destination_ns: String,
    net: u8,
    /// The source's end of the pair (in the source namespace).
    pair_source_end: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run `ip` (iproute2): apt-get install iproute2")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all)
}

impl Testbed {
    pub fn create() -> Result<Testbed> {
        let id = std::process::id();
        // A /16 per run, from the pid: 10.100.x.x … 10.227.x.x.
        let net = 100 + (id % 128) as u8;
        let tag = format!("{:x}", id % 0xfffff);
        let bed = Testbed {
            source_ns: format!("pcft-src-{tag}"),
            destination_ns: format!("pcft-dst-{tag}"),
            net,
            pair_source_end: format!("pcp{tag}s"),
        };
        bed.build(&tag)
            .with_context(|| "cannot build the partition testbed (network namespaces and veth links; needs root)")?;
        Ok(bed)
    }

    fn build(&self, tag: &str) -> Result<()> {
        let n = self.net;
        ip(&["netns", "add", &self.source_ns])?;
        ip(&["netns", "add", &self.destination_ns])?;
        for (ns, side, sub) in [(&self.source_ns, "s", 1), (&self.destination_ns, "d", 2)] {
            let (root_end, ns_end) = (format!("pcr{tag}{side}"), format!("pcn{tag}{side}"));
            ip(&["link", "add", &root_end, "type", "veth", "peer", "name", &ns_end])?;
            ip(&["link", "set", &ns_end, "netns", ns])?;
            ip(&["addr", "add", &format!("10.{n}.{sub}.1/24"), "dev", &root_end])?;
            ip(&["link", "set", &root_end, "up"])?;
            in_ns(ns, &["addr", "add", &format!("10.{n}.{sub}.2/24"), "dev", &ns_end])?;
            in_ns(ns, &["link", "set", &ns_end, "up"])?;
            in_ns(ns, &["link", "set", "lo", "up"])?;
        }
        let pair_destination_end = format!("pcp{tag}d");
        ip(&["link", "add", &self.pair_source_end, "type", "veth", "peer", "name", &pair_destination_end])?;
        ip(&["link", "set", &self.pair_source_end, "netns", &self.source_ns])?;
        ip(&["link", "set", &pair_destination_end, "netns", &self.destination_ns])?;
        in_ns(&self.source_ns, &["addr", "add", &format!("10.{n}.3.1/24"), "dev", &self.pair_source_end])?;
        in_ns(&self.destination_ns, &["addr", "add", &format!("10.{n}.3.2/24"), "dev", &pair_destination_end])?;
        in_ns(&self.source_ns, &["link", "set", &self.pair_source_end, "up"])?;
        in_ns(&self.destination_ns, &["link", "set", &pair_destination_end, "up"])?;
        Ok(())
    }

    /// Where the source agent's control port is reached from the root namespace.
    pub fn source_addr(&self, port: u16) -> String {
        format!("10.{}.1.2:{port}", self.net)
    }

    pub fn destination_addr(&self, port: u16) -> String {
        format!("10.{}.2.2:{port}", self.net)
    }

    /// The destination as the source sees it over the pair (the migration's path).
    pub fn destination_over_pair(&self, port: u16) -> String {
        format!("10.{}.3.2:{port}", self.net)
    }

    /// The root namespace as the source / destination reach it (the outside world).
    pub fn outside_from_source(&self, port: u16) -> String {
        format!("10.{}.1.1:{port}", self.net)
    }

    pub fn outside_from_destination(&self, port: u16) -> String {
        format!("10.{}.2.1:{port}", self.net)
    }

    /// Cuts the link between the two hosts (both ends go down).
    pub fn cut(&self) -> Result<()> {
        in_ns(&self.source_ns, &["link", "set", &self.pair_source_end, "down"])
    }

    pub fn heal(&self) -> Result<()> {
        in_ns(&self.source_ns, &["link", "set", &self.pair_source_end, "up"])
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veths in it, and with them their peers.
        let _ = ip(&["netns", "del", &self.source_ns]);
        let _ = ip(&["netns", "del", &self.destination_ns]);
    }
}
