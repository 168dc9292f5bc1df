//! What an operator reads in an agent's log at its default level (issue 15,
//! item 11): the life cycle of its VMs and migrations at INFO, a line each,
//! and nothing finer (no line per output record, page or checkpoint); plain
//! text when stderr is a file; and a destination that stopped its copy for
//! good because the source failed over says so as a warning, not an error:
//! that is the designed outcome.

use pcft_tests::{migrate, pcft, pcft_json, start_vm, Agent, SMALL_FT_DEMO};
use std::path::Path;

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()))
}

/// The INFO line of `log` whose message is `message` and that names VM `vm`.
fn assert_info(log: &str, message: &str, vm: &str) {
    let found = log
        .lines()
        .any(|l| l.contains(" INFO ") && l.contains(&format!(": {message} ")) && l.contains(&format!("vm={vm}")));
    assert!(found, "no INFO {message:?} line for {vm} in:\n{log}");
}

/// Nothing finer than the life cycle, and nothing a terminal would colour.
fn assert_lifecycle_only(log: &str) {
    assert!(!log.contains('\x1b'), "ANSI escape codes in a log written to a file: {log:?}");
    for line in log.lines() {
        assert!(line.contains(" INFO ") || line.contains(" WARN "), "only INFO and WARN lines here: {line}\n{log}");
        for detail in ["digest=", ": output ", "checkpoint", "switchover", "revoked", "heartbeat"] {
            assert!(!line.contains(detail), "a per-record/page/checkpoint line at the default level: {line}\n{log}");
        }
    }
    // A line per VM start and stop and per migration start and end: a handful, not thousands.
    assert!(log.lines().count() <= 12, "{} lines:\n{log}", log.lines().count());
}

#[test]
fn an_agents_log_at_its_default_level_is_the_life_cycle_of_its_vms_and_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let (source_log, destination_log) = (dir.path().join("source.log"), dir.path().join("destination.log"));
    let source = Agent::start_logging_to("source", &[], &source_log);
    let destination = Agent::start_logging_to("destination", &[], &destination_log);
    start_vm(&source.addr, "logged", &["--mem", "64M", "--vcpus", "2", "--steps", "40000"]);
    let (code, _, err) =
        migrate("logged", &source.addr, &destination.addr, "postcopy-ft", &["--postcopy-rate", "4096"]);
    assert_eq!(code, Some(0), "{err}");
    // The guest finishes at the destination: every output record goes out there
    // (each was an INFO line), and the checkpoints before them.
    let verified = pcft_json(&["vm", "wait", "logged", "--agent", &destination.addr, "--json"]);
    assert_eq!(verified["verified"], true, "{verified}");
    assert!(verified["records"].as_u64().unwrap() >= 40, "{verified}");
    drop((source, destination));

    let source_log = read(&source_log);
    assert!(source_log.lines().any(|l| l.contains(" INFO ") && l.contains("agent started")), "{source_log}");
    assert_info(&source_log, "started", "logged");
    assert_info(&source_log, "migrating out", "logged");
    assert_info(&source_log, "migrated", "logged");
    assert_lifecycle_only(&source_log);

    let destination_log = read(&destination_log);
    assert_info(&destination_log, "migrating in", "logged");
    assert_info(&destination_log, "migration in complete", "logged");
    assert_lifecycle_only(&destination_log);
}

#[test]
fn a_destination_fenced_after_the_source_failed_over_warns_and_logs_no_error() {
    // The demo's agents write their logs to the demo's stderr, a pipe here.
    let args = [&SMALL_FT_DEMO[..], &["--fail-at", "300ms", "--fail-kind", "freeze"]].concat();
    let out = pcft(&args).env_remove("RUST_LOG").output().expect("spawn pcft demo");
    let (stdout, log) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{log}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the report");
    assert_eq!(report["recovered"], true, "{report}");
    assert_eq!(report["destination_fenced"], true, "{report}");
    // Its vCPUs fail as the fence stops them (when they were in the guest, not
    // parked: most runs; vmm::runner's tests make that case certain).
    assert!(!log.lines().any(|l| l.contains(" ERROR ")), "the designed outcome logged as an error:\n{log}");
    assert!(log.lines().any(|l| l.contains(" WARN ") && l.contains("(fenced)")), "no warning that says so:\n{log}");
    assert!(!log.contains('\x1b'), "{log:?}");
}
