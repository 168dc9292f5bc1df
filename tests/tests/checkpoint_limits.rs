//! PostCopyFT's limits at the source, on real KVM with real agent processes:
//! a checkpoint larger than the source's staging memory waits for its commit
//! in a file and still restores exactly; and a destination whose heartbeats
//! go on but whose checkpoints stop (a gray failure, by its hidden
//! `--crash-signal stall` hook) is declared failed by the source's progress
//! check, fenced, and the VM recovered at the source from the last checkpoint.

use pcft_tests::{http_get, ledger_digest, metric, migrate, pcft_json, start_vm, Agent};
use serde_json::Value;

const LEDGER: [&str; 8] = ["--fixture", "ledger", "--mem", "64M", "--vcpus", "2", "--steps", "40000"];

/// The failed migration's report (`pcft migrate --json` exits 1 when the destination was lost).
fn failed_migration(source: &Agent, destination: &Agent, extra: &[&str]) -> Value {
    let mut args = vec!["--postcopy-rate", "4096", "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = migrate("vm1", &source.addr, &destination.addr, "postcopy-ft", &args);
    assert_eq!(code, Some(1), "the destination was lost: the migration failed: {err}");
    assert!(err.contains("recovered and runs at the source"), "{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("no JSON report ({e}): {out}"))
}

/// The recovered VM finishes at the source and matches the ledger oracle.
fn verified_at(agent: &Agent) {
    let verified = pcft_json(&["vm", "wait", "vm1", "--agent", &agent.addr, "--json"]);
    let (digest, records) = ledger_digest(64, 2, 40_000);
    assert_eq!(verified["memory_digest"], digest.as_str(), "{verified}");
    assert_eq!(verified["records"], records, "{verified}");
}

#[test]
fn a_checkpoint_past_the_staging_memory_waits_in_a_file_and_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let staging_dir = dir.path().to_str().unwrap();
    // No staging memory at all: every checkpoint page goes through the file.
    let source =
        Agent::start("source", &["--staging-memory", "0", "--staging-dir", staging_dir, "--metrics", "127.0.0.1:0"]);
    let destination = Agent::start("destination", &["--crash-at", "committed:3"]);
    start_vm(&source.addr, "vm1", &LEDGER);
    let report = failed_migration(&source, &destination, &[]);
    let restored = report["failover"]["restored_epoch"].as_u64().expect("a failover");
    assert!(restored >= 2, "the crash came after checkpoint 3 went out: {report}");
    assert_eq!(Some(restored), report["checkpoints_committed"].as_u64(), "{report}");
    let metrics = http_get(source.metrics.as_deref().expect("--metrics"));
    let in_file = metric(&metrics, "pcft_checkpoint_staged_file_bytes_total{vm=\"vm1\"}").unwrap_or(0.0);
    let received = metric(&metrics, "pcft_checkpoint_bytes_total{vm=\"vm1\"}").unwrap_or(0.0);
    assert!(in_file > 0.0 && received > 0.0, "checkpoint pages went through the staging file: {in_file} of {received}");
    verified_at(&source);
    // The staging file is unlinked: nothing is left in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_destination_whose_checkpoints_stall_is_failed_over_and_fenced() {
    let source = Agent::start("source", &[]);
    // After checkpoint 2 the destination's checkpointer hangs; its heartbeats go on.
    let destination = Agent::start("destination", &["--crash-at", "committed:2", "--crash-signal", "stall"]);
    start_vm(&source.addr, "vm1", &LEDGER);
    let report = failed_migration(&source, &destination, &["--checkpoint-timeout", "1000"]);
    assert_eq!(report["failure"]["kind"], "checkpoint-stalled", "heartbeats went on: {report}");
    assert_eq!(report["failover"]["restored_epoch"], 2, "{report}");
    assert!(report["failover"]["fence_wait_ms"].as_f64().is_some(), "a live destination is fenced first: {report}");
    verified_at(&source);
    // The destination lost the source: its copy is stopped and marked so.
    let status = pcft_json(&["status", "--agent", &destination.addr, "--json"]);
    let vm = &status["vms"][0];
    assert_ne!(vm["phase"], "running", "{status}");
    assert!(vm["error"].as_str().is_some_and(|e| e.contains("fenced")), "{status}");
}

#[test]
fn a_slow_staging_disk_slows_the_checkpoints_not_the_heartbeats() {
    // Every checkpoint page goes through the staging file, and every write to it
    // takes 20 ms (a disk of about 12 MiB/s for these 256 KiB frames): slower
    // than the destination's checkpoints, so the source falls behind and pushes
    // back. Heartbeats are acked ahead of the backlog: the migration completes.
    let dir = tempfile::tempdir().unwrap();
    let staging_dir = dir.path().to_str().unwrap();
    let slow = ["--staging-memory", "0", "--staging-dir", staging_dir, "--staging-delay-ms", "20"];
    let source = Agent::start("source", &[&slow[..], &["--metrics", "127.0.0.1:0"]].concat());
    let destination = Agent::start("destination", &[]);
    start_vm(&source.addr, "vm1", &LEDGER);
    let (code, out, err) =
        migrate("vm1", &source.addr, &destination.addr, "postcopy-ft", &["--postcopy-rate", "4096", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let report: Value = serde_json::from_str(out.trim()).expect("a JSON report");
    assert!(report["failure"].is_null(), "{report}");
    assert!(report["checkpoints_committed"].as_u64().unwrap() >= 1, "{report}");
    let metrics = http_get(source.metrics.as_deref().expect("--metrics"));
    let in_file = metric(&metrics, "pcft_checkpoint_staged_file_bytes_total{vm=\"vm1\"}").unwrap_or(0.0);
    assert!(in_file > 0.0, "checkpoints went through the slow file");
    verified_at(&destination);
}
