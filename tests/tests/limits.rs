//! An agent's limits: a migration over `--max-migrations` is refused with a
//! line that names the limit (the VM keeps running where it is), and one
//! goes through once a place is free; a connection that never greets is
//! dropped instead of holding the agent's resources forever; a flood of
//! silent connections past `--max-connections` has its oldest closed, so
//! neither a running migration nor a new one (nor the CLI) is kept out, and
//! never takes the agent down, not even when it runs out of file descriptors;
//! and a flood of `vm start` past `--max-total-guest-mem` is refused with the
//! reason, before any of the refused VMs is booted, while a migration into
//! the agent goes on.

use pcft_tests::{migrate, pcft_json, start_vm, Agent};
use std::time::Duration;

#[test]
fn migrations_over_the_agents_limit_are_refused() {
    let source = Agent::start("source", &["--max-migrations", "1"]);
    let destination = Agent::start("destination", &[]);
    for vm in ["vm1", "vm2"] {
        start_vm(&source.addr, vm, &["--mem", "64M", "--forever", "--fixture", "dirty", "--rate", "2000"]);
    }
    // A slow post-copy (16384 pages at 4096 pages/s) holds the only place.
    let (from, to) = (source.addr.clone(), destination.addr.clone());
    let first = std::thread::spawn(move || migrate("vm1", &from, &to, "postcopy", &["--postcopy-rate", "4096"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = pcft_json(&["status", "--agent", &source.addr, "--json"]);
        if status["vms"][0]["migration"].is_object() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "vm1 never started migrating: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _, err) = migrate("vm2", &source.addr, &destination.addr, "postcopy", &[]);
    assert_eq!(code, Some(2), "refused: {err}");
    assert!(err.contains("--max-migrations 1"), "{err}");
    let status = pcft_json(&["status", "--agent", &source.addr, "--json"]);
    assert_eq!(status["vms"][1]["phase"], "running", "vm2 still runs at the source: {status}");

    let (code, _, err) = first.join().expect("the first migration");
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = migrate("vm2", &source.addr, &destination.addr, "postcopy", &[]);
    assert_eq!(code, Some(0), "a place is free again: {err}");
}

#[test]
fn a_connection_that_never_greets_is_dropped() {
    use std::io::Read;
    let agent = Agent::start("idle", &[]);
    let mut stream = std::net::TcpStream::connect(&agent.addr).unwrap();
    // The agent gives a peer 10 s to say Hello; well before this, it closes the connection.
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut rest = Vec::new();
    let closed = stream.read_to_end(&mut rest);
    assert!(closed.is_ok(), "the agent kept a silent connection open: {closed:?}");
    assert!(rest.is_empty(), "nothing is said to a peer that said nothing");
}

/// Opens `n` connections to `addr` that never greet, one after another; after
/// `settle`, how many the agent has closed, and the open ones (to hold).
fn flood(addr: &str, n: usize, settle: Duration) -> (usize, Vec<std::net::TcpStream>) {
    let mut streams = Vec::new();
    let mut closed = 0;
    for _ in 0..n {
        match std::net::TcpStream::connect(addr) {
            Ok(stream) => streams.push(stream),
            Err(_) => closed += 1,
        }
    }
    std::thread::sleep(settle);
    let mut open = Vec::new();
    for stream in streams {
        stream.set_nonblocking(true).unwrap();
        match stream.peek(&mut [0u8; 1]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open.push(stream),
            _ => closed += 1,
        }
    }
    (closed, open)
}

#[test]
fn a_flood_of_silent_connections_keeps_neither_a_running_nor_a_new_migration_out() {
    let source = Agent::start("source", &[]);
    let destination = Agent::start("destination", &["--max-connections", "16", "--metrics", "127.0.0.1:0"]);
    start_vm(&source.addr, "vm1", &["--mem", "64M", "--forever", "--fixture", "dirty", "--rate", "2000"]);
    start_vm(&source.addr, "vm2", &["--mem", "64M", "--forever", "--fixture", "dirty", "--rate", "2000"]);
    // A slow post-copy (16384 pages at 2048 pages/s: 8 s) runs while the flood comes.
    let (from, to) = (source.addr.clone(), destination.addr.clone());
    let migration = std::thread::spawn(move || migrate("vm1", &from, &to, "postcopy", &["--postcopy-rate", "2048"]));
    std::thread::sleep(Duration::from_millis(1500));
    let (closed, held) = flood(&destination.addr, 100, Duration::from_millis(300));
    assert!(closed >= 80, "past 16 silent ones, the oldest are closed: {closed} of 100 closed");
    assert!(held.len() <= 16, "at most 16 silent connections are kept: {}", held.len());

    // With the flood's connections still held, a peer that greets at once gets in:
    // the CLI, and a new migration (its control connection and its demand channel).
    let status = pcft_json(&["status", "--agent", &destination.addr, "--json"]);
    assert_eq!(status["agent"], "destination", "{status}");
    let (code, _, err) = migrate("vm2", &source.addr, &destination.addr, "postcopy", &[]);
    assert_eq!(code, Some(0), "a new migration started and completed during the flood: {err}");
    let (code, _, err) = migration.join().expect("the migration");
    assert_eq!(code, Some(0), "the running migration went on through the flood: {err}");
    drop(held);
    let metrics = pcft_tests::http_get(destination.metrics.as_deref().expect("--metrics"));
    let refused = pcft_tests::metric(&metrics, "pcft_connections_refused_total").unwrap_or(0.0);
    assert!(refused >= closed as f64 - 1.0, "counted: {refused} (closed {closed})");
    let status = pcft_json(&["status", "--agent", &destination.addr, "--json"]);
    let running = status["vms"].as_array().expect("vms").iter().filter(|v| v["phase"] == "running").count();
    assert_eq!(running, 2, "both VMs run at the destination: {status}");
}

#[test]
fn running_out_of_file_descriptors_does_not_take_the_agent_down() {
    // 64 open files: the default --max-connections is then 16, and a flood of
    // 200 never reaches the limit; with --max-connections 1000 it does (accept
    // fails with EMFILE), and the agent waits it out instead of stopping.
    for max_connections in [None, Some("1000")] {
        let mut command = std::process::Command::new("prlimit");
        command.args(["--nofile=64:64", "--"]).arg(pcft_tests::pcft_path());
        command.args(["agent", "--listen", "127.0.0.1:0", "--name", "small"]);
        command.args(max_connections.iter().flat_map(|n| ["--max-connections", n]));
        let mut agent = Agent::spawn_command(command, &[]);
        let (_, held) = flood(&agent.addr, 200, Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(300));
        assert!(agent.alive(), "{max_connections:?}: the agent died under a flood of connections");
        drop(held);
        // Once the flood is gone, it serves again.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (code, out, err) = pcft_tests::pcft_output(&["status", "--agent", &agent.addr, "--json"]);
            if code == Some(0) {
                assert!(out.contains("\"agent\":\"small\""), "{out}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{max_connections:?}: the agent does not serve again: {err}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn a_flood_of_vm_starts_past_the_memory_limit_is_refused_before_booting_while_a_migration_goes_on() {
    let source = Agent::start("source", &[]);
    let log = std::env::temp_dir().join(format!("pcft-limits-flood-{}.log", std::process::id()));
    let destination = Agent::start_logging_to("destination", &["--max-total-guest-mem", "512M"], &log);
    start_vm(&source.addr, "moving", &["--fixture", "ledger", "--mem", "64M", "--vcpus", "1", "--steps", "100000"]);
    // A slow post-copy into the limited agent (16384 pages at 2048 pages/s: 8 s) runs through the flood.
    let (from, to) = (source.addr.clone(), destination.addr.clone());
    let migration = std::thread::spawn(move || migrate("moving", &from, &to, "postcopy", &["--postcopy-rate", "2048"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pcft_json(&["status", "--agent", &source.addr, "--json"])["vms"][0]["migration"]["phase"] != "postcopy" {
        assert!(std::time::Instant::now() < deadline, "the migration never reached post-copy");
        std::thread::sleep(Duration::from_millis(20));
    }

    // 24 starts of 64 MiB at once: the migrating VM holds 64 of the 512, so 7 fit.
    let flood: Vec<_> = (0..24)
        .map(|i| {
            let addr = destination.addr.clone();
            std::thread::spawn(move || {
                let name = format!("flood{i}");
                pcft_tests::pcft_output(&[
                    "vm",
                    "start",
                    "--agent",
                    &addr,
                    "--name",
                    &name,
                    "--mem",
                    "64M",
                    "--fixture",
                    "dirty",
                    "--forever",
                    "--rate",
                    "100",
                ])
            })
        })
        .collect();
    let outcomes: Vec<_> = flood.into_iter().map(|t| t.join().expect("a vm start")).collect();
    let started = outcomes.iter().filter(|(code, _, _)| *code == Some(0)).count();
    assert_eq!(started, 7, "exactly what fits in 512 MiB beside the arriving 64 MiB: {outcomes:?}");
    for (code, _, err) in outcomes.iter().filter(|(code, _, _)| *code != Some(0)) {
        assert_eq!(*code, Some(2), "refused, not failed: {err}");
        assert!(err.contains("--max-total-guest-mem") && err.contains("needs 64 MiB more"), "{err}");
    }
    // The refused 17 were refused before they booted (no guest memory, no KVM VM made for them).
    let text = std::fs::read_to_string(&log).expect("the destination's log");
    let booted = text.lines().filter(|l| l.contains("booting") && l.contains("vm=flood")).count();
    assert_eq!(booted, 7, "only the VMs that fit were booted:\n{text}");
    let _ = std::fs::remove_file(&log);

    let (code, _, err) = migration.join().expect("the migration");
    assert_eq!(code, Some(0), "the migration in went on through the flood: {err}");
    let verified = pcft_json(&["vm", "wait", "moving", "--agent", &destination.addr, "--timeout", "120", "--json"]);
    assert_eq!(verified["memory_digest"], pcft_tests::ledger_digest(64, 1, 100_000).0.as_str(), "{verified}");
    let status = pcft_json(&["status", "--agent", &destination.addr, "--json"]);
    let flooded = status["vms"].as_array().expect("vms").iter().filter(|v| v["phase"] == "running").count();
    assert_eq!(flooded, 7, "the 7 it took run: {status}");
}
