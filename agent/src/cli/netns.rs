//! Two "hosts" on one machine for `pcft demo --fail-kind partition|lossy`: the
//! source and destination agents each run in a network namespace of their
//! own, joined by a veth pair that carries the migration; each namespace also
//! has a veth to the root namespace (where the demo and its outside world
//! live). Cutting the pair partitions the two hosts while both stay alive and
//! both still reach the outside, which is what fencing must handle.
//! Degrading it instead (`degrade`) makes the link lossy and slow: `tc netem`
//! loss and delay where the kernel has netem, else loss from an nftables rule
//! and queueing delay from a `tbf` rate limit (see `degrade`).
//!
//! Addresses (N = a per-run number): source 10.N.1.2 (root side 10.N.1.1),
//! destination 10.N.2.2 (root side 10.N.2.1), the pair 10.N.3.1 ↔ 10.N.3.2.
//!
//! With a client network (`pcft demo --fixture kv`, see `ClientLan`) a third
//! namespace holds the VM's clients on a bridge `brc` that has the VM's
//! gateway address; each host has an L2 bridge `pcft-br0` (where its agent
//! puts the VM's tap) joined to `brc` by a veth, so the VM keeps its address
//! on whichever host runs it:
//!
//! ```text
//!   clients: brc (gateway) ── veth ── source: pcft-br0 ── tap of the VM while it runs there
//!                          └─ veth ── destination: pcft-br0 ── tap …
//! ```
//!
//! `--fail-kind reset` needs no namespaces: both agents listen on loopback,
//! and a `ResetRule` (an nftables table in the host's output path) answers
//! the migration connection's packets with TCP resets while both agents stay
//! alive.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::sync::Mutex;

/// The namespaces and links of one demo run; removed when dropped.
pub struct Testbed {
    pub source_ns: String,
    pub destination_ns: String,
    net: u8,
    /// The source's end of the pair (in the source namespace).
    pair_source_end: String,
    /// The destination's end of the pair (in the destination namespace).
    pair_destination_end: String,
    /// What undoes the degradation of the pair now in place (see `restore`).
    undo: Mutex<Vec<Undo>>,
    /// The clients' network, if asked for.
    pub clients: Option<ClientLan>,
}

/// The clients' side of a testbed: their namespace, and the VM's network.
pub struct ClientLan {
    /// The namespace the clients run in.
    pub ns: String,
    /// The client namespace's ends of the veths to the source's and the
    /// destination's bridge: what comes in on one came from that host.
    pub source_port: String,
    pub destination_port: String,
}

impl ClientLan {
    /// The bridge each host namespace has for the VM's tap.
    pub const HOST_BRIDGE: &'static str = "pcft-br0";

    /// A serving VM's network on the testbed: its tap on each host's bridge,
    /// so its address follows it; the defaults' addresses (the gateway is the clients' bridge).
    pub fn vm_net() -> crate::cli::NetArgs {
        let none = crate::cli::NetArgs::none();
        crate::cli::NetArgs { net: Some(crate::cli::NetArg::Bridge), bridge: Self::HOST_BRIDGE.into(), ..none }
    }
}

/// How the pair link is made lossy and slow; both ends, so each direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Degradation {
    /// `tc netem delay D loss L%` on each end (a kernel with sch_netem).
    Netem { loss_pct: u32, delay_ms: u64 },
    /// Without netem: an nftables rule in each namespace drops L% of the
    /// packets leaving on the pair (`numgen random mod 100 < L drop`), and a
    /// `tbf` of `rate_mbit` on each end queues up to `delay_ms` of traffic: a
    /// delay when the link is busy (as it is during post-copy's push), not a
    /// fixed one. 0 leaves that half out.
    NftTbf { loss_pct: u32, delay_ms: u64, rate_mbit: u64 },
}

impl std::fmt::Display for Degradation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Degradation::Netem { loss_pct, delay_ms } => write!(f, "netem loss {loss_pct}% delay {delay_ms}ms"),
            Degradation::NftTbf { loss_pct, delay_ms, rate_mbit } => {
                let loss = (loss_pct > 0).then(|| format!("nft loss {loss_pct}%"));
                let delay = (delay_ms > 0).then(|| format!("tbf {rate_mbit}mbit/{delay_ms}ms"));
                match (loss, delay) {
                    (Some(loss), Some(delay)) => write!(f, "{loss} + {delay}"),
                    (Some(one), None) | (None, Some(one)) => f.write_str(&one),
                    (None, None) => f.write_str("none"),
                }
            }
        }
    }
}

/// Runs `program args…` in namespace `ns`; the error says what it printed.
fn exec_in(ns: &str, program: &str, args: &[&str]) -> Result<()> {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns, program]).args(args);
    // No context here: `apply` looks at the message itself (netem "unknown").
    exec(command, program, args)
}

/// Runs `command` (`program args…`); the error says what it printed.
fn exec(mut command: Command, program: &str, args: &[&str]) -> Result<()> {
    let out = command.output().with_context(|| format!("cannot run `{program}`"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `nft args…` in namespace `ns`, or (None) in this, the host's.
fn nft_in(ns: Option<&str>, args: &[&str]) -> Result<()> {
    match ns {
        Some(ns) => exec_in(ns, "nft", args),
        None => nft(args),
    }
}

/// Runs `nft args…` in this (the host's) network namespace.
fn nft(args: &[&str]) -> Result<()> {
    let mut command = Command::new("nft");
    command.args(args);
    exec(command, "nft", args)
}

/// Which packets of the migration connection `--fail-kind reset` answers with a TCP reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ResetSide {
    /// The source's packets to the destination: the source sees the reset
    /// (and the destination's packets still reach the source).
    Source,
    /// The destination's packets back to the source: the destination sees the reset.
    Destination,
    /// Both directions: each side sees a reset.
    Both,
}

impl ResetSide {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ResetSide::Source => "source",
            ResetSide::Destination => "destination",
            ResetSide::Both => "both",
        }
    }
}

/// The nftables tables of a `--fail-kind reset` (their name starts with
/// [`ResetRule::TABLE_PREFIX`]); removed when dropped, whatever happened.
pub struct ResetRule {
    table: String,
    /// The network namespaces that have the table (None: this one, the host's).
    places: Vec<Option<String>>,
    description: String,
}

impl ResetRule {
    pub const TABLE_PREFIX: &'static str = "pcft-reset";

    /// Rejects, `with tcp reset`, the packets of `side` of every connection
    /// to the destination agent's `port`, in an output chain of a table of
    /// this process's own (`inet pcft-reset-PID`): on loopback when both
    /// agents run here, or, on a `testbed`, on the pair's end in the source's
    /// namespace (its packets) and the destination's (its packets). By hand:
    /// `nft add table inet pcft-reset; nft add chain inet pcft-reset out
    /// '{ type filter hook output priority 0; }'; nft add rule inet pcft-reset
    /// out tcp dport PORT reject with tcp reset`. Resets themselves pass: the
    /// rule's own go through the output hook too (with `both`, each direction's
    /// rule would otherwise swallow the other's resets, a silent partition),
    /// and so does the reset a kernel sends back for a socket a reset closed.
    pub fn apply(side: ResetSide, port: u16, testbed: Option<&Testbed>) -> Result<ResetRule> {
        let table = format!("{}-{}", Self::TABLE_PREFIX, std::process::id());
        // Where each direction's packets leave: (namespace, interface).
        let (source, destination) = match testbed {
            Some(bed) => (
                (Some(bed.source_ns.clone()), bed.pair_source_end.clone()),
                (Some(bed.destination_ns.clone()), bed.pair_destination_end.clone()),
            ),
            None => ((None, "lo".to_string()), (None, "lo".to_string())),
        };
        let matches = match side {
            ResetSide::Source => vec![(source, "dport")],
            ResetSide::Destination => vec![(destination, "sport")],
            ResetSide::Both => vec![(source, "dport"), (destination, "sport")],
        };
        // One nft script per namespace, each one transaction: the whole table, or nothing.
        let mut scripts: Vec<(Option<String>, String)> = Vec::new();
        for ((ns, dev), direction) in matches {
            let rule = format!(
                "add rule inet {table} out oifname \"{dev}\" tcp {direction} {port} tcp flags & rst == 0 \
                 counter reject with tcp reset; "
            );
            match scripts.iter_mut().find(|(place, _)| *place == ns) {
                Some((_, script)) => script.push_str(&rule),
                None => scripts.push((
                    ns,
                    format!(
                        "add table inet {table}; add chain inet {table} out {{ type filter hook output priority 0; }}; {rule}"
                    ),
                )),
            }
        }
        let mut applied = ResetRule { table, places: Vec::new(), description: String::new() };
        for (ns, script) in scripts {
            let added = nft_in(ns.as_deref(), &[&script]);
            // A failure drops `applied`, which removes the tables added before it.
            added.context("cannot add the TCP reset rule (apt-get install nftables)")?;
            applied.places.push(ns);
        }
        let what = match side {
            ResetSide::Source => format!("the source's packets to port {port}"),
            ResetSide::Destination => format!("the destination's packets from port {port}"),
            ResetSide::Both => format!("both directions of port {port}"),
        };
        applied.description = format!("nft reject with tcp reset, {} side: {what}", side.name());
        Ok(applied)
    }

    /// What was applied, e.g. "nft reject with tcp reset, source side: the source's packets to port 40123".
    pub fn description(&self) -> &str {
        &self.description
    }
}

impl Drop for ResetRule {
    fn drop(&mut self) {
        for ns in &self.places {
            let args = ["delete", "table", "inet", self.table.as_str()];
            let removed = nft_in(ns.as_deref(), &args);
            if let Err(e) = removed {
                let place = ns.as_deref().map_or(String::new(), |ns| format!(" in namespace {ns}"));
                eprintln!("pcft demo: cannot remove the nftables table inet {}{place}: {e:#}", self.table);
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run `ip` (iproute2): apt-get install iproute2")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Held while a testbed is made: testbeds made at once (tests run in parallel,
/// a soak beside them) must not pick the same addresses.
struct TestbedLock {
    /// Locked (flock) while it is open.
    _file: std::fs::File,
}

impl TestbedLock {
    fn take() -> Result<TestbedLock> {
        let path = std::env::temp_dir().join("pcft-testbed.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the testbed lock {}", path.display()))?;
        // SAFETY: flock(2) on an fd we own, held until the file is dropped (which unlocks it).
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            bail!("cannot lock {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(TestbedLock { _file: file })
    }
}

/// A second byte N for the testbed's 10.N.0.0/16 that no interface of this
/// (the host's) namespace uses, starting from one the pid picks.
fn free_net(id: u32) -> Result<u8> {
    let out = Command::new("ip").args(["-o", "-4", "addr", "show"]).output().context("cannot run `ip`")?;
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    (0..128u32).map(|i| 100 + ((id + i) % 128) as u8).find(|net| !listed.contains(&format!(" 10.{net}."))).ok_or_else(
        || anyhow::anyhow!("every 10.N.0.0/16 for N in 100..228 is in use here: remove stale pcft testbeds"),
    )
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all)
}

impl Testbed {
    /// Two host namespaces joined by a pair; with `gateway` (an address and
    /// prefix length, e.g. 10.77.0.1/24), a client namespace too, on the VM's
    /// network (see `ClientLan`).
    pub fn create(gateway: Option<&str>) -> Result<Testbed> {
        let id = std::process::id();
        // One testbed is made at a time on this host (a lock file), so that each
        // takes a /16 no other has: 10.100.x.x … 10.227.x.x, from the pid on.
        let _one_at_a_time = TestbedLock::take()?;
        let net = free_net(id)?;
        let tag = format!("{:x}", id % 0xfffff);
        let bed = Testbed {
            source_ns: format!("pcft-src-{tag}"),
            destination_ns: format!("pcft-dst-{tag}"),
            net,
            pair_source_end: format!("pcp{tag}s"),
            pair_destination_end: format!("pcp{tag}d"),
            undo: Mutex::default(),
            clients: gateway.map(|_| ClientLan {
                ns: format!("pcft-cli-{tag}"),
                source_port: format!("pcl{tag}s"),
                destination_port: format!("pcl{tag}d"),
            }),
        };
        bed.build(&tag)
            .with_context(|| "cannot build the partition testbed (network namespaces and veth links; needs root)")?;
        if let (Some(lan), Some(gateway)) = (&bed.clients, gateway) {
            bed.build_clients(lan, &tag, gateway)
                .with_context(|| format!("cannot build the clients' network (namespace {}, bridges)", lan.ns))?;
        }
        Ok(bed)
    }

    /// The client namespace with bridge `brc` at `gateway`, and each host's
    /// `pcft-br0` joined to it by a veth.
    fn build_clients(&self, lan: &ClientLan, tag: &str, gateway: &str) -> Result<()> {
        ip(&["netns", "add", &lan.ns])?;
        in_ns(&lan.ns, &["link", "add", "brc", "type", "bridge"])?;
        in_ns(&lan.ns, &["addr", "add", gateway, "dev", "brc"])?;
        in_ns(&lan.ns, &["link", "set", "brc", "up"])?;
        in_ns(&lan.ns, &["link", "set", "lo", "up"])?;
        for (ns, client_end, side) in
            [(&self.source_ns, &lan.source_port, "s"), (&self.destination_ns, &lan.destination_port, "d")]
        {
            let host_end = format!("pch{tag}{side}");
            in_ns(ns, &["link", "add", ClientLan::HOST_BRIDGE, "type", "bridge"])?;
            in_ns(ns, &["link", "set", ClientLan::HOST_BRIDGE, "up"])?;
            ip(&["link", "add", client_end, "netns", &lan.ns, "type", "veth", "peer", "name", &host_end, "netns", ns])?;
            in_ns(&lan.ns, &["link", "set", client_end, "master", "brc", "up"])?;
            in_ns(ns, &["link", "set", &host_end, "master", ClientLan::HOST_BRIDGE, "up"])?;
        }
        Ok(())
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
        let pair_destination_end = &self.pair_destination_end;
        ip(&["link", "add", &self.pair_source_end, "type", "veth", "peer", "name", pair_destination_end])?;
        ip(&["link", "set", &self.pair_source_end, "netns", &self.source_ns])?;
        ip(&["link", "set", pair_destination_end, "netns", &self.destination_ns])?;
        in_ns(&self.source_ns, &["addr", "add", &format!("10.{n}.3.1/24"), "dev", &self.pair_source_end])?;
        in_ns(&self.destination_ns, &["addr", "add", &format!("10.{n}.3.2/24"), "dev", pair_destination_end])?;
        in_ns(&self.source_ns, &["link", "set", &self.pair_source_end, "up"])?;
        in_ns(&self.destination_ns, &["link", "set", pair_destination_end, "up"])?;
        Ok(())
    }

    /// The network namespaces it made (removed when it is dropped).
    pub fn namespaces(&self) -> Vec<String> {
        let mut names = vec![self.source_ns.clone(), self.destination_ns.clone()];
        names.extend(self.clients.as_ref().map(|lan| lan.ns.clone()));
        names
    }

    /// Where the source agent's control port is reached from the root namespace.
    pub fn source_addr(&self, port: u16) -> String {
        format!("10.{}.1.2:{port}", self.net)
    }

    pub fn destination_addr(&self, port: u16) -> String {
        format!("10.{}.2.2:{port}", self.net)
    }

    /// The source as the destination sees it over the pair (a migration back).
    pub fn source_over_pair(&self, port: u16) -> String {
        format!("10.{}.3.1:{port}", self.net)
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

    /// Both ends of the pair, each with its namespace.
    fn pair_ends(&self) -> [(&str, &str); 2] {
        [(&self.source_ns, &self.pair_source_end), (&self.destination_ns, &self.pair_destination_end)]
    }

    /// Makes the link between the hosts lossy (`loss_pct` % of the packets
    /// each way) and slow (`delay_ms`): with `tc netem` where the kernel has
    /// it, else with nftables and `tbf` at `rate_mbit` (see `Degradation`).
    /// Returns what was applied; `restore` undoes it (and a failure here
    /// undoes what was applied before it).
    pub fn degrade(&self, loss_pct: u32, delay_ms: u64, rate_mbit: u64) -> Result<Degradation> {
        let mut undo = self.undo.lock().expect("degradation lock");
        if !undo.is_empty() {
            bail!("the link is already degraded");
        }
        let applied = self.apply(loss_pct, delay_ms, rate_mbit, &mut undo);
        if applied.is_err() {
            let _ = run_undo(std::mem::take(&mut *undo));
        }
        applied
    }

    fn apply(&self, loss_pct: u32, delay_ms: u64, rate_mbit: u64, undo: &mut Vec<Undo>) -> Result<Degradation> {
        let (delay, loss) = (format!("{delay_ms}ms"), format!("{loss_pct}%"));
        let del_qdisc = |ns: &str, dev: &str| Undo::new(ns, "tc", &["qdisc", "del", "dev", dev, "root"]);
        let mut netem = true;
        for (ns, dev) in self.pair_ends() {
            match exec_in(ns, "tc", &["qdisc", "add", "dev", dev, "root", "netem", "delay", &delay, "loss", &loss]) {
                Ok(()) => undo.push(del_qdisc(ns, dev)),
                // This kernel has no sch_netem (CONFIG_NET_SCH_NETEM): fall back.
                Err(e) if e.to_string().contains("unknown") && undo.is_empty() => {
                    netem = false;
                    break;
                }
                Err(e) => return Err(e.context("cannot add a netem qdisc (tc, iproute2)")),
            }
        }
        if netem {
            return Ok(Degradation::Netem { loss_pct, delay_ms });
        }
        for (ns, dev) in self.pair_ends() {
            if loss_pct > 0 {
                // numgen's `mod 100` gives 0 to 99: `< 100` is out of its range.
                let drop = match loss_pct {
                    100.. => "drop".to_string(),
                    pct => format!("numgen random mod 100 < {pct} counter drop"),
                };
                let rules = format!(
                    "add table inet pcft; \
                     add chain inet pcft out {{ type filter hook output priority 0; }}; \
                     add rule inet pcft out oifname \"{dev}\" {drop}"
                );
                exec_in(ns, "nft", &[&rules]).context("cannot add the packet-loss rule (apt-get install nftables)")?;
                undo.push(Undo::new(ns, "nft", &["delete", "table", "inet", "pcft"]));
            }
            if delay_ms > 0 {
                // The queue holds `delay_ms` of traffic at the rate; the burst must
                // hold at least one tick's worth (rate / HZ) and a full-size segment.
                let burst = format!("{}kb", (rate_mbit * 1000 / 8 / 100).max(64));
                let rate = format!("{rate_mbit}mbit");
                let tbf =
                    ["qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency", &delay];
                exec_in(ns, "tc", &tbf).context("cannot add the tbf qdisc (tc, iproute2)")?;
                undo.push(del_qdisc(ns, dev));
            }
        }
        Ok(Degradation::NftTbf { loss_pct, delay_ms, rate_mbit })
    }

    /// Undoes `degrade` (nothing if the link is not degraded).
    pub fn restore(&self) -> Result<()> {
        run_undo(std::mem::take(&mut *self.undo.lock().expect("degradation lock")))
    }
}

/// One command that undoes a step of `degrade`.
struct Undo {
    ns: String,
    program: &'static str,
    args: Vec<String>,
}

impl Undo {
    fn new(ns: &str, program: &'static str, args: &[&str]) -> Undo {
        Undo { ns: ns.to_string(), program, args: args.iter().map(|a| a.to_string()).collect() }
    }
}

/// Runs every undo step (the last first); the first error, if any.
fn run_undo(steps: Vec<Undo>) -> Result<()> {
    let mut first_error = None;
    for step in steps.into_iter().rev() {
        let args: Vec<&str> = step.args.iter().map(String::as_str).collect();
        if let Err(e) = exec_in(&step.ns, step.program, &args) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veths in it, and with them their peers.
        let _ = ip(&["netns", "del", &self.source_ns]);
        let _ = ip(&["netns", "del", &self.destination_ns]);
        if let Some(lan) = &self.clients {
            let _ = ip(&["netns", "del", &lan.ns]);
        }
    }
}

/// Moves the calling thread into network namespace `ns` (made by `ip netns
/// add`): the sockets it makes from then on live there.
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("cannot open network namespace {path}"))?;
    // SAFETY: setns(2) changes only this thread's namespace, with an fd we hold open for the call.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("cannot enter network namespace {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
