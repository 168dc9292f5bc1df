//! An agent's limits: a migration over `--max-migrations` is refused with a
//! line that names the limit (the VM keeps running where it is), and one
//! goes through once a place is free; a connection that never greets is
//! dropped instead of holding the agent's resources forever.

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
