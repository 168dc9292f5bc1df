//! A serving `kv` VM whose address follows it: each host puts the VM's tap on
//! an L2 bridge (`--net bridge`), and the client reaches 10.77.0.2 by L2
//! through whichever host runs it. The fabric is made of network namespaces:
//!
//! ```text
//!   client: bridge brc 10.77.0.1/24 (the VM's gateway) ── veth ── hostA: pcft-br0 ── tap pcft-kv0
//!                                                      └─ veth ── hostB: pcft-br0 ── tap pcft-kv0
//!   hostA 10.N.3.1 ── veth (the agents' network, for the migration) ── hostB 10.N.3.2
//! ```
//!
//! A PostCopyFT migration hostA → hostB whose destination dies mid post-copy
//! (`pcft agent --crash-at`, SIGKILL) fails over to hostA; a client that
//! wrote all along then finds every write it saw acknowledged, and the
//! store's digest is that of the acknowledged writes (plus, perhaps, the one
//! that was in flight).
//!
//! Two things in the VMM make this hold: network output commit (the
//! destination's virtio-net holds transmitted frames until their checkpoint
//! commits, so no acknowledgement leaves for a write that a failover could
//! undo) and a gratuitous ARP when a restored VM first resumes (so the
//! bridges and the client learn where the VM is now). Without the first a
//! write acknowledged by the destination can be lost; without the second the
//! client may not reach the VM at its new (or old) host until the bridges'
//! entries age out. The messages below say which of these went wrong.

use pcft_tests::resp::{Client, Reply};
use pcft_tests::{in_netns, ip, pcft_path, Netns};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST_IP: &str = "10.77.0.2";
const GATEWAY: &str = "10.77.0.1";
const BRIDGE: &str = "pcft-br0";
const TAP: &str = "pcft-kv0";

static FABRICS: AtomicU32 = AtomicU32::new(0);

/// A prefix for this fabric's names (namespaces, veths): unique per process and call, short (IFNAMSIZ).
fn unique_id() -> String {
    format!("{}{}", std::process::id() % 10_000, FABRICS.fetch_add(1, Ordering::Relaxed))
}

fn guest() -> SocketAddr {
    format!("{GUEST_IP}:6379").parse().unwrap()
}

/// A client namespace with a bridge `brc` that has the VM's gateway, and
/// `hosts` host namespaces, each with a bridge `pcft-br0` joined to `brc` by a
/// veth pair. Everything is removed on drop (namespaces last).
struct Lan {
    id: String,
    client: Netns,
    hosts: Vec<Netns>,
}

impl Lan {
    fn new(hosts: usize) -> Lan {
        let id = unique_id();
        let client = Netns::add(&format!("pkfc{id}"));
        client.ip(&["link", "add", "brc", "type", "bridge"]);
        client.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", "brc"]);
        client.ip(&["link", "set", "brc", "up"]);
        let mut lan = Lan { id: id.clone(), client, hosts: Vec::new() };
        for h in 0..hosts {
            let host = Netns::add(&format!("pkf{}{id}", ["a", "b"][h]));
            host.ip(&["link", "add", BRIDGE, "type", "bridge"]);
            host.ip(&["link", "set", BRIDGE, "up"]);
            let (c_end, h_end) = (format!("pk{id}c{h}"), format!("pk{id}h{h}"));
            ip(&[
                "link",
                "add",
                &c_end,
                "netns",
                lan.client.name(),
                "type",
                "veth",
                "peer",
                "name",
                &h_end,
                "netns",
                host.name(),
            ]);
            lan.client.ip(&["link", "set", &c_end, "master", "brc", "up"]);
            host.ip(&["link", "set", &h_end, "master", BRIDGE, "up"]);
            lan.hosts.push(host);
        }
        lan
    }

    /// What the client's side knows of the VM (its ARP entry, where its bridge sends frames), for failure messages.
    fn diagnose(&self) -> String {
        let mut out = format!(
            "client neighbours:\n{}client bridge fdb (brc):\n{}",
            self.client.show("ip", &["neigh", "show", "dev", "brc"]),
            self.client.show("bridge", &["fdb", "show", "br", "brc", "dynamic"]),
        );
        for host in &self.hosts {
            out += &format!(
                "{} links on {BRIDGE}:\n{}",
                host.name(),
                host.show("ip", &["-br", "link", "show", "master", BRIDGE])
            );
        }
        out
    }
}

/// A `pcft agent` in a host namespace, listening on its address in the agents' network.
struct NsAgent {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl NsAgent {
    fn start(ns: &Netns, listen: &str, extra: &[&str]) -> NsAgent {
        let log = std::env::temp_dir().join(format!("pcft-kv-failover-{}.log", ns.name()));
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(pcft_path())
            .args(["agent", "--insecure", "--listen", listen])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the agent's log"))
            .spawn()
            .expect("start an agent");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("agent stdout");
        assert!(
            line.starts_with("listening on"),
            "the agent in {} said {line:?}; its log:\n{}",
            ns.name(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        NsAgent { child, addr: listen.to_string(), log }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to the VM, retrying for up to `patience` (the VM may be booting or
/// moving, the bridges still learning where it is).
fn connect(patience: Duration) -> Result<Client, String> {
    let deadline = Instant::now() + patience;
    loop {
        match Client::connect(guest(), Duration::from_secs(10)) {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("cannot reach the kv guest at {} within {patience:?}: {e}", guest())),
        }
    }
}

/// What the writer saw: acknowledged writes (with when, from the test's start),
/// and the one it sent without seeing an answer (it may or may not be applied).
#[derive(Default)]
struct Writes {
    acked: BTreeMap<String, (String, Duration)>,
    in_flight: Option<(String, String)>,
    /// Why the writer stopped early (its connection broke), if it did.
    broke: Option<String>,
}

/// Writes `w:N` keys until `stop` or until the connection breaks (no retry of
/// a write whose answer was lost: it stays the one in flight).
fn writer(writes: Arc<Mutex<Writes>>, stop: Arc<AtomicBool>, t0: Instant) -> impl FnOnce() + Send + 'static {
    move || {
        let mut client = match connect(Duration::from_secs(30)) {
            Ok(c) => c,
            Err(e) => {
                writes.lock().unwrap().broke = Some(e);
                return;
            }
        };
        for i in 0u32.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let (key, value) = (format!("w:{i}"), format!("v{i}-{}", i.wrapping_mul(40_503)));
            match client.cmd(&["SET", &key, &value]) {
                Ok(Reply::Simple(ok)) if ok == "OK" => {
                    writes.lock().unwrap().acked.insert(key, (value, t0.elapsed()));
                }
                Ok(other) => panic!("SET {key}: {other:?}"),
                Err(e) => {
                    let why = match e.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "no answer within 10 s".into(),
                        _ => e.to_string(),
                    };
                    let mut w = writes.lock().unwrap();
                    w.in_flight = Some((key.clone(), value));
                    w.broke = Some(format!("SET {key}: {why} (gave up {:?} after the start)", t0.elapsed()));
                    break;
                }
            }
        }
    }
}

fn digest(m: &BTreeMap<String, String>) -> String {
    format!("{:016x}", vm_fixtures::kv::store_digest(m.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes()))))
}

#[test]
fn a_bridged_tap_has_no_address_and_serves_by_l2_and_bad_bridges_are_refused() {
    let lan = Lan::new(1);
    let host = &lan.hosts[0];
    // Refused before anything runs: no such bridge, an interface that is not a bridge.
    let run = |extra: &[&str]| {
        let mut args = vec!["vm", "run", "--fixture", "kv", "--mem", "64M", "--net", "bridge", "--seconds", "60"];
        args.extend_from_slice(extra);
        host.pcft(&args)
    };
    let veth = format!("pk{}h0", lan.id);
    for (extra, expected) in [
        (vec!["--bridge", "nosuchbr"], "bridge nosuchbr does not exist"),
        (vec!["--bridge", veth.as_str()], &*format!("interface {veth} is not a bridge")),
    ] {
        let (code, _, err) = run(&extra);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.contains(expected), "{extra:?}: expected {expected:?} in the first line of: {err}");
        assert!(
            host.ip_json(&["link", "show"]).as_array().unwrap().iter().all(|l| l["ifname"] != TAP),
            "{extra:?} left a tap"
        );
    }

    // A VM on the bridge: its tap has the bridge as master and no address; the client reaches it by L2.
    let mut vm = Command::new("ip")
        .args(["netns", "exec", host.name()])
        .arg(pcft_path())
        .args(["vm", "run", "--fixture", "kv", "--mem", "64M", "--net", "bridge", "--bridge", BRIDGE])
        .args(["--guest-ip", GUEST_IP, "--host-ip", GATEWAY, "--seconds", "60", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pcft vm run");
    let mut stdout = std::io::BufReader::new(vm.stdout.take().unwrap());
    let serving: Value = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let _ = vm.kill();
            let out = vm.wait_with_output().unwrap();
            panic!("pcft vm run --net bridge ended before it served: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["event"] == "serving" {
            break v;
        }
    };
    assert_eq!(serving["bridge"], BRIDGE, "{serving}");
    let link = &host.ip_json(&["link", "show", "dev", TAP])[0];
    assert_eq!(link["master"], BRIDGE, "the tap is on the bridge: {link}");
    assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "the tap is up: {link}");
    let addrs = &host.ip_json(&["-4", "addr", "show", "dev", TAP])[0]["addr_info"];
    assert!(addrs.as_array().is_none_or(|a| a.is_empty()), "a bridged tap has no IPv4 address: {addrs}");
    let pong = in_netns(lan.client.name(), || {
        let mut client = connect(Duration::from_secs(30))?;
        client.cmd(&["PING"]).map_err(|e| e.to_string())
    })
    .join()
    .unwrap();
    assert_eq!(pong, Ok(Reply::Simple("PONG".into())), "{}", lan.diagnose());
    // SAFETY: kill(2) of our own child's pid (ip netns exec runs pcft in its place).
    unsafe { libc::kill(vm.id() as i32, libc::SIGINT) };
    let status = vm.wait().unwrap();
    assert!(status.success(), "pcft vm run stopped by SIGINT: {status}");
    assert!(
        host.ip_json(&["link", "show"]).as_array().unwrap().iter().all(|l| l["ifname"] != TAP),
        "the tap was removed"
    );
}

/// The agents' network: a veth pair of its own between hostA and hostB; their addresses.
fn agents_link(lan: &Lan) -> (String, String) {
    let (a, b) = (&lan.hosts[0], &lan.hosts[1]);
    let net = 150 + (std::process::id() % 100) as u8;
    let (addr_a, addr_b) = (format!("10.{net}.3.1"), format!("10.{net}.3.2"));
    let (va, vb) = (format!("pk{}ab", lan.id), format!("pk{}ba", lan.id));
    ip(&["link", "add", &va, "netns", a.name(), "type", "veth", "peer", "name", &vb, "netns", b.name()]);
    for (ns, v, addr) in [(a, &va, &addr_a), (b, &vb, &addr_b)] {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", v]);
        ns.ip(&["link", "set", v, "up"]);
    }
    (addr_a, addr_b)
}

/// Starts the kv VM on `agent` in `host`, its tap on the host's bridge.
fn start_kv(host: &Netns, agent: &str) {
    let (code, _, err) = host.pcft(&[
        "vm",
        "start",
        "--agent",
        agent,
        "--name",
        "kv",
        "--fixture",
        "kv",
        "--mem",
        "64M",
        "--net",
        "bridge",
        "--bridge",
        BRIDGE,
        "--tap",
        TAP,
        "--guest-ip",
        GUEST_IP,
        "--host-ip",
        GATEWAY,
    ]);
    assert_eq!(code, Some(0), "pcft vm start --net bridge: {err}");
}

/// Waits until the client has `n` writes acknowledged (30 s at most).
fn wait_for_writes(lan: &Lan, writes: &Mutex<Writes>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while writes.lock().unwrap().acked.len() < n {
        if let Some(why) = &writes.lock().unwrap().broke {
            panic!("the client could not write to the VM: {why}\n{}", lan.diagnose());
        }
        assert!(Instant::now() < deadline, "fewer than {n} writes acknowledged in 30 s\n{}", lan.diagnose());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The longest the client waited for an answer between `from` and `to` (since the start).
fn longest_gap(writes: &Writes, from: Duration, to: Duration) -> Duration {
    let mut times: Vec<Duration> = writes.acked.values().map(|(_, at)| *at).filter(|at| *at >= from).collect();
    times.sort_unstable();
    // The gap that spans `to` counts too: the first answer after the migration ended.
    let end = times.iter().position(|at| *at > to).map_or(times.len(), |i| i + 1);
    times[..end].windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

#[test]
fn a_serving_vm_moves_without_ft_and_its_client_keeps_its_connection() {
    let lan = Lan::new(2);
    let (a, b) = (&lan.hosts[0], &lan.hosts[1]);
    let (addr_a, addr_b) = agents_link(&lan);
    let agents = [NsAgent::start(a, &format!("{addr_a}:7401"), &[]), NsAgent::start(b, &format!("{addr_b}:7401"), &[])];
    start_kv(a, &agents[0].addr);
    let t0 = Instant::now();
    let writes = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = in_netns(lan.client.name(), writer(Arc::clone(&writes), Arc::clone(&stop), t0));
    wait_for_writes(&lan, &writes, 20);
    let mut lines = Vec::new();
    for (hop, mode) in ["postcopy", "precopy", "hybrid"].iter().enumerate() {
        let (from, to) = (hop % 2, (hop + 1) % 2);
        let host = &lan.hosts[from];
        let before = writes.lock().unwrap().acked.len();
        let start = t0.elapsed();
        let (code, out, err) = host.pcft(&[
            "migrate",
            "kv",
            "--agent",
            &agents[from].addr,
            "--to",
            &agents[to].addr,
            "--mode",
            mode,
            "--json",
        ]);
        let end = t0.elapsed();
        assert_eq!(code, Some(0), "{mode}: {out}{err}");
        let report: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{mode}: {e}: {out}"));
        // The client goes on writing on its connection, now to the VM on the other host.
        wait_for_writes(&lan, &writes, before + 20);
        let gap = longest_gap(&writes.lock().unwrap(), start, end);
        lines.push(format!(
            "{mode}: downtime {:.1} ms, longest reply gap {} ms",
            report["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            gap.as_millis()
        ));
    }
    stop.store(true, Ordering::Relaxed);
    writing.join().expect("the writer");
    let writes = std::mem::take(&mut *writes.lock().unwrap());
    assert!(writes.broke.is_none(), "the client's connection broke: {:?}\n{lines:?}", writes.broke);
    let acked: BTreeMap<String, String> = writes.acked.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
    let expected = digest(&acked);
    let found = in_netns(lan.client.name(), move || {
        let mut client = connect(Duration::from_secs(30)).expect("reach the VM");
        client.cmd(&["PCFT.DIGEST"]).expect("PCFT.DIGEST").bulk_text()
    })
    .join()
    .expect("the checking client");
    assert_eq!(found, Some(expected), "the store is not the client's acknowledged writes\n{lines:?}");
    eprintln!("{} writes on one connection across 3 migrations; {}", writes.acked.len(), lines.join("; "));
}

#[test]
fn no_acknowledged_write_is_lost_when_the_destination_dies_mid_postcopy() {
    let lan = Lan::new(2);
    let (a, b) = (&lan.hosts[0], &lan.hosts[1]);
    let (addr_a, addr_b) = agents_link(&lan);
    let source = NsAgent::start(a, &format!("{addr_a}:7401"), &[]);
    // The destination SIGKILLs itself once its post-copy is well under way (5 checkpoints committed).
    let destination = NsAgent::start(b, &format!("{addr_b}:7401"), &["--crash-at", "committed:5"]);
    let logs = || format!("source log:\n{}\ndestination log:\n{}", source.log_tail(), destination.log_tail());

    start_kv(a, &source.addr);
    let t0 = Instant::now();
    let writes = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = in_netns(lan.client.name(), writer(Arc::clone(&writes), Arc::clone(&stop), t0));
    wait_for_writes(&lan, &writes, 20);

    let migrate_start = t0.elapsed();
    let (code, out, err) = a.pcft(&[
        "migrate",
        "kv",
        "--agent",
        &source.addr,
        "--to",
        &destination.addr,
        "--mode",
        "postcopy-ft",
        "--postcopy-rate",
        "2048",
        "--json",
    ]);
    let migrate_end = t0.elapsed();
    let report: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!("pcft migrate --json printed no report ({e}), exit {code:?}: {out}{err}\n{}", logs())
    });
    assert_eq!(code, Some(1), "the destination died: the migration fails (and the VM is recovered): {report}\n{err}");
    assert!(report["failure"].is_object(), "the report names the failure: {report}");
    assert!(report["failover"].is_object(), "the report says the VM failed over to the source: {report}\n{}", logs());
    let restored_epoch = report["failover"]["restored_epoch"].as_u64().expect("restored_epoch");
    assert!(restored_epoch >= 1, "a checkpoint had committed before the crash (committed:5): {report}");
    let status = a.pcft(&["status", "--agent", &source.addr, "--json"]);
    assert!(status.1.contains("\"phase\":\"running\""), "the VM runs at hostA again: {status:?}");

    // The writer goes on on hostA if its connection survived the failover; give it a moment there.
    std::thread::sleep(Duration::from_millis(1_500));
    stop.store(true, Ordering::Relaxed);
    writing.join().expect("the writer");
    let writes = std::mem::take(&mut *writes.lock().unwrap());
    let during = writes.acked.values().filter(|(_, at)| *at >= migrate_start && *at < migrate_end).count();
    let after = writes.acked.values().filter(|(_, at)| *at >= migrate_end).count();
    // The longest the client waited for an answer: downtime as a user sees it
    // (output commit's delay, the failure's detection and the failover).
    let mut times: Vec<Duration> = writes.acked.values().map(|(_, at)| *at).collect();
    times.sort_unstable();
    let max_gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let story = format!(
        "{} writes acknowledged ({during} while the migration ran, {after} after it); longest reply gap {} ms; \
         writer: {}; in flight: {:?}; restored epoch {restored_epoch}; migration {:?}..{:?} after the start",
        writes.acked.len(),
        max_gap.as_millis(),
        writes.broke.as_deref().unwrap_or("ran until stopped"),
        writes.in_flight,
        migrate_start,
        migrate_end,
    );

    // After the failover: every acknowledged write is there, and the digest says nothing else is.
    let acked: BTreeMap<String, String> = writes.acked.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
    let in_flight = writes.in_flight.clone();
    let checked = in_netns(lan.client.name(), move || {
        let mut client = connect(Duration::from_secs(30)).map_err(|e| {
            format!(
                "after the failover: {e} (do the bridges and the client's ARP cache still point at hostB? a restored \
                 VM announces itself with a gratuitous ARP)"
            )
        })?;
        let mut lost = Vec::new();
        for (key, value) in &acked {
            let found = client.cmd(&["GET", key]).map_err(|e| format!("GET {key}: {e}"))?;
            if found.bulk_text().as_deref() != Some(value.as_str()) {
                lost.push(format!("{key}={value} (found {found:?})"));
            }
        }
        if !lost.is_empty() {
            return Err(format!(
                "{} acknowledged write(s) lost in the failover, e.g. {:?}: an acknowledgement left the destination \
                 before its checkpoint committed (network output commit)",
                lost.len(),
                &lost[..lost.len().min(5)]
            ));
        }
        let found = match client.cmd(&["PCFT.DIGEST"]).map_err(|e| format!("PCFT.DIGEST: {e}"))?.bulk_text() {
            Some(d) => d,
            None => return Err("PCFT.DIGEST gave no digest".into()),
        };
        let mut with_in_flight = acked.clone();
        if let Some((k, v)) = &in_flight {
            with_in_flight.insert(k.clone(), v.clone());
        }
        if found != digest(&acked) && found != digest(&with_in_flight) {
            return Err(format!(
                "the store's digest {found} is neither that of the acknowledged writes ({}) nor of those plus the one \
                 in flight ({}): the store has writes the client never sent or saw",
                digest(&acked),
                digest(&with_in_flight)
            ));
        }
        Ok(())
    })
    .join()
    .expect("the checking client");
    if let Err(e) = checked {
        panic!("{e}\n{story}\n{}\n{}", lan.diagnose(), logs());
    }
    eprintln!("{story}");
}
