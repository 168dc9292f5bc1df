//! A serving `kv` VM carried by every migration mode between two agents,
//! each in a network namespace of its own (two hosts on one machine, each
//! with a tap `pcft-kv0` at 10.77.0.1 behind which the VM is 10.77.0.2),
//! with a client writing while it moves: afterwards the destination's store
//! holds every write the client saw acknowledged, and its digest matches.

use pcft_tests::resp::{Client, Reply};
use pcft_tests::{http_get, in_netns, ip, metric, pcft_path, Netns};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST: &str = "10.77.0.2:6379";

/// Two namespaces joined by a veth pair, each running an agent; removed on drop.
struct Hosts {
    agents: Vec<Child>,
    addr: [String; 2],
    /// Dropped after the agents are stopped (`Drop` below runs first).
    ns: [Netns; 2],
}

impl Hosts {
    fn new() -> Hosts {
        let id = std::process::id() % 10_000;
        let ns = [Netns::add(&format!("pkva{id}")), Netns::add(&format!("pkvb{id}"))];
        let net = 150 + (id % 100) as u8;
        let addr = [format!("10.{net}.3.1"), format!("10.{net}.3.2")];
        let (va, vb) = (format!("pkv{id}a"), format!("pkv{id}b"));
        ip(&["link", "add", &va, "netns", ns[0].name(), "type", "veth", "peer", "name", &vb, "netns", ns[1].name()]);
        for (n, (v, a)) in ns.iter().zip([(&va, &addr[0]), (&vb, &addr[1])]) {
            n.ip(&["addr", "add", &format!("{a}/24"), "dev", v]);
            n.ip(&["link", "set", v, "up"]);
        }
        let mut hosts = Hosts { agents: Vec::new(), addr: addr.clone(), ns };
        for (n, a) in hosts.ns.iter().zip(&addr) {
            let child = Command::new("ip")
                .args(["netns", "exec", n.name()])
                .arg(pcft_path())
                .args(["agent", "--insecure", "--listen", &format!("{a}:7401"), "--metrics", &format!("{a}:9401")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start an agent");
            hosts.agents.push(child);
        }
        std::thread::sleep(Duration::from_millis(500));
        hosts
    }

    fn agent(&self, i: usize) -> String {
        format!("{}:7401", self.addr[i])
    }

    /// `pcft args…` run inside namespace `i`; returns (code, stdout, stderr).
    fn pcft(&self, i: usize, args: &[&str]) -> (Option<i32>, String, String) {
        self.ns[i].pcft(args)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

fn connect() -> Client {
    let addr: SocketAddr = GUEST.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(addr, Duration::from_secs(5)) {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("cannot reach the kv guest at {GUEST}: {e}"),
        }
    }
}

type Model = Arc<Mutex<BTreeMap<String, String>>>;

/// A write the client sent but saw no answer to (the VM left under it): it may or may not have been applied.
type InFlight = Option<(String, String)>;

/// Writes `prefix`N keys until `stop` (or the VM goes away under it); every acknowledged one goes into `model`.
fn writer(prefix: String, model: Model, stop: Arc<AtomicBool>) -> impl FnOnce() -> (usize, InFlight) + Send + 'static {
    move || {
        let mut client = connect();
        let mut acked = 0;
        let mut in_flight = None;
        for i in 0u32.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let (key, value) = (format!("{prefix}{i}"), format!("v{i}-{}", i.wrapping_mul(40_503)));
            match client.cmd(&["SET", &key, &value]) {
                Ok(Reply::Simple(ok)) if ok == "OK" => {
                    model.lock().unwrap().insert(key, value);
                    acked += 1;
                }
                Ok(other) => panic!("SET {key}: {other:?}"),
                // The VM left this host: the connection is gone, perhaps after the write was applied.
                Err(_) => {
                    in_flight = Some((key, value));
                    break;
                }
            }
        }
        (acked, in_flight)
    }
}

/// Every acknowledged write is there, and the digest matches the model plus
/// whichever writes in doubt (sent, never answered: the VM left under them)
/// the store has. A write in doubt may land any time later (its client gave
/// up, but its kernel retransmits the segment to the VM at its new place), so
/// those not found stay in doubt for the next check; those found join the model.
fn check_store(ns: &str, mode: &str, model: &Model, in_doubt: &mut Vec<(String, String)>) {
    let acked = model.lock().unwrap().clone();
    let doubts = in_doubt.clone();
    let mode = mode.to_string();
    let landed = in_netns(ns, move || {
        let mut client = connect();
        for (key, value) in &acked {
            assert_eq!(client.cmd(&["GET", key]).unwrap().bulk_text().as_deref(), Some(value.as_str()), "{mode}: {key}");
        }
        let digest = |m: &BTreeMap<String, String>| {
            format!("{:016x}", vm_fixtures::kv::store_digest(m.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes()))))
        };
        let landed_now = |c: &mut Client| -> Vec<(String, String)> {
            let landed =
                doubts.iter().filter(|(key, value)| c.cmd(&["GET", key]).unwrap().bulk_text().as_deref() == Some(value));
            landed.cloned().collect()
        };
        // A write in doubt landing between the reads shows as a change: read again.
        for _ in 0..3 {
            let landed = landed_now(&mut client);
            let found = client.cmd(&["PCFT.DIGEST"]).unwrap().bulk_text().expect("a digest");
            if landed_now(&mut client) != landed {
                continue;
            }
            let mut expected = acked.clone();
            expected.extend(landed.iter().cloned());
            assert_eq!(
                found,
                digest(&expected),
                "{mode}: the store is not the acknowledged writes plus the writes in doubt it has ({landed:?} of {doubts:?})"
            );
            return landed;
        }
        panic!("{mode}: writes in doubt kept landing while the store was read");
    })
    .join()
    .unwrap();
    in_doubt.retain(|write| !landed.contains(write));
    model.lock().unwrap().extend(landed);
}

#[test]
fn a_serving_vm_moves_in_every_mode_with_its_acknowledged_writes() {
    let hosts = Hosts::new();
    let (code, _, err) = hosts.pcft(
        0,
        &["vm", "start", "--agent", &hosts.agent(0), "--name", "kv", "--fixture", "kv", "--mem", "64M", "--net", "tap"],
    );
    assert_eq!(code, Some(0), "{err}");
    let model: Model = Arc::default();
    let mut in_doubt = Vec::new();
    let modes = ["precopy", "postcopy", "hybrid", "postcopy-ft"];
    for (hop, mode) in modes.iter().enumerate() {
        let (from, to) = (hop % 2, (hop + 1) % 2);
        // A client writes on the VM's current host while it moves.
        let stop = Arc::new(AtomicBool::new(false));
        let writing =
            in_netns(hosts.ns[from].name(), writer(format!("{mode}:"), Arc::clone(&model), Arc::clone(&stop)));
        // Under PostCopyFT, a client on the destination's side knocks while the VM
        // arrives there, so that the VM sends frames while they are held (its
        // writer's replies go to the old host). Post-copy is paced to last seconds.
        let knocking = (*mode == "postcopy-ft").then(|| {
            let stop = Arc::clone(&stop);
            in_netns(hosts.ns[to].name(), move || {
                let addr: SocketAddr = GUEST.parse().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut client) = Client::connect(addr, Duration::from_secs(1)) {
                        let _ = client.cmd(&["PING"]);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        });
        std::thread::sleep(Duration::from_millis(800));
        let (agent_from, agent_to) = (hosts.agent(from), hosts.agent(to));
        let mut args = vec!["migrate", "kv", "--agent", &agent_from, "--to", &agent_to, "--mode", mode, "--json"];
        if knocking.is_some() {
            args.extend(["--postcopy-rate", "4096"]);
        }
        let (code, out, err) = hosts.pcft(from, &args);
        assert_eq!(code, Some(0), "{mode}: {out}{err}");
        stop.store(true, Ordering::Relaxed);
        if let Some(knocking) = knocking {
            knocking.join().unwrap();
        }
        let (acked, in_flight) = writing.join().unwrap();
        assert!(acked > 5, "{mode}: only {acked} writes before the migration");
        in_doubt.extend(in_flight);
        check_store(hosts.ns[to].name(), mode, &model, &mut in_doubt);
        if *mode == "postcopy-ft" {
            // Output commit: the destination held the VM's frames until their checkpoints committed.
            let url = format!("http://{}:9401/metrics", hosts.addr[to]);
            let text = in_netns(hosts.ns[to].name(), move || http_get(&url)).join().unwrap();
            let released = metric(&text, "pcft_net_released_frames_total{vm=\"kv\"}").unwrap_or(0.0);
            assert!(released > 0.0, "no held frame was released: {text}");
            assert!(metric(&text, "pcft_net_hold_seconds_count").unwrap_or(0.0) > 0.0, "{text}");
        }
    }
}
