//! A source that dies during post-copy: the destination cannot complete the
//! VM (pages are missing), so it stops it and says so, in its status and to
//! `pcft vm wait`, within seconds; it does not hang on the missing pages.

use pcft_tests::{migrate, pcft_json, pcft_output, start_vm, Agent};
use std::time::{Duration, Instant};

#[test]
fn a_dead_source_stops_the_destination_with_a_clear_error() {
    let source = Agent::start("source", &[]);
    let destination = Agent::start("destination", &[]);
    start_vm(&source.addr, "vm1", &["--mem", "64M", "--fixture", "ledger", "--steps", "400000"]);
    // A slow push (16384 pages at 2048 pages/s): post-copy lasts about 8 s.
    let (from, to) = (source.addr.clone(), destination.addr.clone());
    let migration = std::thread::spawn(move || migrate("vm1", &from, &to, "postcopy", &["--postcopy-rate", "2048"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while pcft_json(&["status", "--agent", &source.addr, "--json"])["vms"][0]["migration"]["phase"] != "postcopy" {
        assert!(Instant::now() < deadline, "vm1 never reached post-copy");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(source); // SIGKILL
    let (code, _, err) = migration.join().expect("the migration thread");
    assert_ne!(code, Some(0), "the source died: the migration did not complete: {err}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        let status = pcft_json(&["status", "--agent", &destination.addr, "--json"]);
        let vm = &status["vms"][0];
        if vm["phase"] == "failed" {
            break vm["error"].as_str().unwrap_or_default().to_string();
        }
        assert!(Instant::now() < deadline, "the destination did not give up on a dead source: {status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(error.contains("the source was lost during post-copy") && error.contains("stopped"), "{error}");
    let records = pcft_json(&["status", "--agent", &destination.addr, "--json"])["vms"][0]["records"].clone();
    std::thread::sleep(Duration::from_millis(500));
    let later = pcft_json(&["status", "--agent", &destination.addr, "--json"])["vms"][0]["records"].clone();
    assert_eq!(records, later, "the stopped copy emits nothing more");

    let (code, _, err) = pcft_output(&["vm", "wait", "vm1", "--agent", &destination.addr, "--timeout", "30"]);
    assert_ne!(code, Some(0), "nothing to wait for: {err}");
    assert!(err.contains("the source was lost"), "{err}");
}
