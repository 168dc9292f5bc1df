//! PostCopyFT's limits at the source, on real KVM with real agent processes:
//! a checkpoint larger than the source's staging memory waits for its commit
//! in a file and still restores exactly; and a destination whose heartbeats
//! go on but whose checkpoints stop (a gray failure, by its hidden
//! `--crash-signal stall` hook) is declared failed by the source's progress
//! check, fenced, and the VM recovered at the source from the last checkpoint;
//! a slow source holds the destination's checkpoints to a window of two
//! epochs (checked from both agents' timelines; a window of 6 fails it).

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

/// The epochs in `timeline`'s events of `kind` (`epoch N: …`), each with its time (ms).
fn epochs(timeline: &Value, kind: &str) -> Vec<(u64, f64)> {
    timeline["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .filter_map(|e| {
            let n = e["detail"].as_str()?.strip_prefix("epoch ")?.split(':').next()?.parse().ok()?;
            Some((n, e["t_ms"].as_f64()?))
        })
        .collect()
}

#[test]
fn the_destination_never_runs_more_than_two_epochs_ahead_of_the_source() {
    // A source whose staging disk takes 5 ms a write commits slower than
    // the destination checkpoints (every 25 ms): the destination must wait, an
    // epoch starting only when the one two before it was committed. Both
    // agents' dashboards timestamp what happened (wall clock, one host): every
    // epoch N the destination sent came after the source committed N-2.
    let dir = tempfile::tempdir().unwrap();
    let staging_dir = dir.path().to_str().unwrap();
    let slow = ["--staging-memory", "0", "--staging-dir", staging_dir, "--staging-delay-ms", "5"];
    let source = Agent::start("source", &[&slow[..], &["--metrics", "127.0.0.1:0"]].concat());
    let destination = Agent::start("destination", &["--metrics", "127.0.0.1:0"]);
    start_vm(&source.addr, "vm1", &LEDGER);
    let extra = ["--postcopy-rate", "4096", "--checkpoint-interval", "25", "--json"];
    let (code, out, err) = migrate("vm1", &source.addr, &destination.addr, "postcopy-ft", &extra);
    assert_eq!(code, Some(0), "{err}");
    let timeline = |agent: &Agent| -> Value {
        let metrics = agent.metrics.as_deref().expect("--metrics");
        let api = metrics.replace("/metrics", "/api/timeline?since=0");
        serde_json::from_str(&http_get(&api)).expect("timeline JSON")
    };
    let sent = epochs(&timeline(&destination), "checkpoint-sent");
    let committed = epochs(&timeline(&source), "checkpoint-committed");
    assert!(sent.len() >= 5, "enough epochs to fill the window: {sent:?}\n{out}");
    let mut waited = 0;
    for &(epoch, at) in sent.iter().filter(|(epoch, _)| *epoch > 2) {
        let before = committed.iter().find(|(n, _)| *n == epoch - 2).map(|(_, t)| *t);
        let before = before.unwrap_or_else(|| panic!("epoch {} never committed: {committed:?}", epoch - 2));
        assert!(before <= at, "epoch {epoch} went out at {at} before epoch {} committed at {before}", epoch - 2);
        // Held back: it went out less than an interval after that commit.
        waited += usize::from(at - before < 25.0);
    }
    assert!(
        waited > 0,
        "the slow source never held the destination back: the window was not tested\n{sent:?}\n{committed:?}"
    );
}
