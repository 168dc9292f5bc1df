//! Four VMs migrating at once between two agents, two each way, all in
//! post-copy-ft, and a failure in the middle of their post-copy:
//!
//! - a partition of the link between the agents (each in its own network
//!   namespace): every agent is then the source of two VMs and the
//!   destination of two others at once; each fences the copies it received
//!   and restores the ones it sent, so all four end at their sources, each
//!   verified against the ledger oracle, and no VM's two copies ever ran at
//!   once (the agents' vCPU run logs, compared per VM);
//! - a SIGKILL of one agent: the VMs it was receiving recover at their
//!   source and verify. The VMs it was *sending* die with it: in post-copy
//!   their newest memory was split between the hosts, and PostCopyFT's
//!   checkpoints flow from the destination back to the source, so they cover
//!   a lost destination or network, not a lost source (as in the paper). The
//!   surviving agent must then stop its half-received copies and say so, not
//!   run them on missing pages.

use pcft_agent::agent::client::{AgentClient, ClientError};
use pcft_agent::vmm::run_log::{overlap, RunInterval};
use pcft_agent::wire::control::ControlMessage;
use pcft_tests::{in_netns, ip, ledger_digest, pcft_in, pcft_json, pcft_output, start_vm, Agent, Netns};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Long enough (about 20 s of one core each) that no VM finishes before all
/// four migrations run, even when a boot is slow (a clean-clone CI once took
/// 6–13 s to boot one of them while the others ran).
const STEPS: u64 = 1_000_000;
const STEPS_ARG: &str = "1000000";

/// The two tests run one at a time: each is four busy VMs on this host's two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const LEDGER: [&str; 8] = ["--fixture", "ledger", "--mem", "64M", "--vcpus", "1", "--steps", STEPS_ARG];
/// 16384 pages at 2048 pages/s: each post-copy lasts about 8 s, time to fail in its middle.
const SLOW_PUSH: [&str; 3] = ["--postcopy-rate", "2048", "--json"];

/// The VMs: two start at agent a and move to b, two start at b and move to a.
const A_TO_B: [&str; 2] = ["a1", "a2"];
const B_TO_A: [&str; 2] = ["b1", "b2"];

/// Runs `pcft args…` where the agents can be reached: in `ns`, or here.
fn pcft_at(ns: Option<&str>, args: &[&str]) -> (Option<i32>, String, String) {
    match ns {
        Some(ns) => pcft_in(ns, args),
        None => pcft_output(args),
    }
}

/// The status of VM `vm` at the agent at `addr` (Null: the agent does not know it).
fn vm_status(ns: Option<&str>, addr: &str, vm: &str) -> Value {
    let (code, out, err) = pcft_at(ns, &["status", "--agent", addr, "--json"]);
    assert_eq!(code, Some(0), "pcft status --agent {addr}: {err}");
    let status: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    status["vms"].as_array().into_iter().flatten().find(|v| v["name"] == vm).cloned().unwrap_or(Value::Null)
}

/// One agent of the pair: where it listens, and the namespace to reach it from (None: this one).
struct Side<'a> {
    addr: &'a str,
    ns: Option<&'a str>,
}

/// A `pcft migrate` running on its own thread: (exit code, stdout, stderr).
type Migration = std::thread::JoinHandle<(Option<i32>, String, String)>;

/// Starts the four migrations at once (each on its own thread, from where its
/// source can be reached) and waits until all four are in post-copy.
fn four_at_once(a: &Side, b: &Side) -> Vec<(String, Migration)> {
    let mut migrations = Vec::new();
    for (vms, from, to) in [(A_TO_B, a, b), (B_TO_A, b, a)] {
        for vm in vms {
            let (vm_name, from_addr, to_addr, ns) =
                (vm.to_string(), from.addr.to_string(), to.addr.to_string(), from.ns.map(str::to_string));
            let thread = std::thread::spawn(move || {
                let mut args =
                    vec!["migrate", &vm_name, "--agent", &from_addr, "--to", &to_addr, "--mode", "postcopy-ft"];
                args.extend_from_slice(&SLOW_PUSH);
                pcft_at(ns.as_deref(), &args)
            });
            migrations.push((vm.to_string(), thread));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (vms, from) in [(A_TO_B, a), (B_TO_A, b)] {
        for vm in vms {
            loop {
                let status = vm_status(from.ns, from.addr, vm);
                if status["migration"]["phase"] == "postcopy" {
                    break;
                }
                if let Some(at) = migrations.iter().position(|(name, thread)| name == vm && thread.is_finished()) {
                    let (_, thread) = migrations.swap_remove(at);
                    panic!("{vm} ended before post-copy: {:?}; at {}: {status}", thread.join(), from.addr);
                }
                assert!(Instant::now() < deadline, "{vm} never reached post-copy at {}: {status}", from.addr);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // Some checkpoints in, and some pages still to come.
    std::thread::sleep(Duration::from_millis(500));
    migrations
}

/// The migration's report (`pcft migrate --json` exits 1 after a failover and prints one).
fn failed_over(vm: &str, (code, out, err): (Option<i32>, String, String)) -> Value {
    assert_eq!(code, Some(1), "{vm}: the migration failed and was recovered: {out} {err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{vm}: {e}: {out} {err}"));
    assert!(report["failover"].is_object(), "{vm}: the source recovered it: {report}");
    report
}

/// Waits for VM `vm` at its source to finish and checks its memory against the ledger oracle.
fn verified_at(side: &Side, vm: &str) {
    let (code, out, err) = pcft_at(side.ns, &["vm", "wait", vm, "--agent", side.addr, "--timeout", "300", "--json"]);
    assert_eq!(code, Some(0), "{vm} at {}: {err}", side.addr);
    let run: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{vm}: {e}: {out}"));
    assert_eq!(run["memory_digest"], ledger_digest(64, 1, STEPS).0.as_str(), "{vm} at {}: {run}", side.addr);
}

/// When the vCPUs of VM `vm`'s copies at the agent at `addr` were inside `KVM_RUN`.
fn run_log(addr: &str, vm: &str) -> Vec<RunInterval> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = AgentClient::connect_with(addr, None).await.expect("connect to ask for a run log");
        match client.request(&ControlMessage::RunLog { name: vm.into() }).await {
            Ok(ControlMessage::RunLogReport { runs, .. }) => {
                assert_eq!(runs.dropped, 0, "{vm} at {addr}: no interval dropped for room");
                runs.intervals
            }
            Err(ClientError::Refused(_)) => Vec::new(),
            other => panic!("{vm} at {addr}: {other:?}"),
        }
    })
}

#[test]
fn a_partition_under_four_migrations_each_way_leaves_each_vm_at_its_source_once() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let id = std::process::id() % 100_000;
    let (ns_a, ns_b) = (Netns::add(&format!("pcft-cfa{id}")), Netns::add(&format!("pcft-cfb{id}")));
    let (link_a, link_b) = (format!("pcf{id}a"), format!("pcf{id}b"));
    ip(&["link", "add", &link_a, "netns", ns_a.name(), "type", "veth", "peer", "name", &link_b, "netns", ns_b.name()]);
    for (ns, link, address) in [(&ns_a, &link_a, "10.98.0.1/24"), (&ns_b, &link_b, "10.98.0.2/24")] {
        ns.ip(&["addr", "add", address, "dev", link]);
        ns.ip(&["link", "set", link, "up"]);
    }
    let agent_a = ns_a.agent("a", "10.98.0.1:0", &[]);
    let agent_b = ns_b.agent("b", "10.98.0.2:0", &[]);
    let a = Side { addr: &agent_a.addr, ns: Some(ns_a.name()) };
    let b = Side { addr: &agent_b.addr, ns: Some(ns_b.name()) };
    for (vms, side) in [(A_TO_B, &a), (B_TO_A, &b)] {
        for vm in vms {
            let mut args = vec!["vm", "start", "--agent", side.addr, "--name", vm];
            args.extend_from_slice(&LEDGER);
            let (code, _, err) = pcft_at(side.ns, &args);
            assert_eq!(code, Some(0), "pcft vm start {vm}: {err}");
        }
    }

    let migrations = four_at_once(&a, &b);
    // Cut the link: a's side drops everything on it, both ways; nothing is refused, just silent.
    // (Not `ip link set down`: that also takes a's own address away from the CLI talking to a.)
    let rules = format!(
        "table inet pcft-cut {{ chain in {{ type filter hook input priority 0; iifname \"{link_a}\" drop; }}; \
         chain out {{ type filter hook output priority 0; oifname \"{link_a}\" drop; }}; }}"
    );
    let cut = std::process::Command::new("ip")
        .args(["netns", "exec", ns_a.name(), "nft", &rules])
        .output()
        .expect("run nft (apt-get install nftables)");
    assert!(cut.status.success(), "nft: {}", String::from_utf8_lossy(&cut.stderr));
    for (vm, thread) in migrations {
        failed_over(&vm, thread.join().expect("a migration thread"));
    }

    for (vms, source, destination) in [(A_TO_B, &a, &b), (B_TO_A, &b, &a)] {
        for vm in vms {
            verified_at(source, vm);
            let fenced = vm_status(destination.ns, destination.addr, vm);
            assert_ne!(fenced["phase"], "running", "{vm}: its destination keeps its copy stopped: {fenced}");
            let (from, to) = (source.addr.to_string(), destination.addr.to_string());
            let at_source = in_netns(source.ns.unwrap(), move || run_log(&from, vm)).join().unwrap();
            let at_destination = in_netns(destination.ns.unwrap(), move || run_log(&to, vm)).join().unwrap();
            assert!(!at_destination.is_empty(), "{vm} did run at its destination for a while");
            assert_eq!(
                overlap(&at_source, &at_destination),
                Duration::ZERO,
                "{vm}: its two copies ran at once: {at_source:?} vs {at_destination:?}"
            );
        }
    }
}

#[test]
fn a_killed_agent_under_four_migrations_each_way_loses_only_the_vms_it_was_sending() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let agent_a = Agent::start("a", &[]);
    let agent_b = Agent::start("b", &[]);
    let a = Side { addr: &agent_a.addr, ns: None };
    let b = Side { addr: &agent_b.addr, ns: None };
    for (vms, side) in [(A_TO_B, &a), (B_TO_A, &b)] {
        for vm in vms {
            start_vm(side.addr, vm, &LEDGER);
        }
    }

    let migrations = four_at_once(&a, &b);
    drop(agent_b); // SIGKILL
    for (vm, thread) in migrations {
        let outcome = thread.join().expect("a migration thread");
        if A_TO_B.contains(&vm.as_str()) {
            failed_over(&vm, outcome);
        } else {
            assert_ne!(outcome.0, Some(0), "{vm}: its source died, the migration cannot have completed: {outcome:?}");
        }
    }

    for vm in A_TO_B {
        verified_at(&a, vm);
    }
    for vm in B_TO_A {
        let deadline = Instant::now() + Duration::from_secs(15);
        let error = loop {
            let status = vm_status(None, a.addr, vm);
            if status["phase"] == "failed" {
                break status["error"].as_str().unwrap_or_default().to_string();
            }
            assert!(Instant::now() < deadline, "{vm}: its destination did not give up on the dead source: {status}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(error.contains("the source was lost during post-copy"), "{vm}: {error}");
        let records = vm_status(None, a.addr, vm)["records"].clone();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(records, vm_status(None, a.addr, vm)["records"], "{vm}: the stopped copy runs no more");
    }
    let still = pcft_json(&["status", "--agent", a.addr, "--json"]);
    assert_eq!(still["vms"].as_array().map(Vec::len), Some(4), "{still}");
}
