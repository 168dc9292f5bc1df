//! A migration runs in its source agent whoever waits for it: `--detach`,
//! Ctrl-C on `pcft migrate`, `pcft migration status|wait`, and a graceful
//! SIGTERM that lets a running migration end instead of losing the VM.

use pcft_tests::{migrate, pcft, pcft_json, pcft_output, start_vm, Agent};
use std::time::{Duration, Instant};

/// A 64 MiB guest that writes all the time; a post-copy of it at 4096 pages/s takes about 4 s.
const BUSY: &[&str] = &["--mem", "64M", "--fixture", "dirty", "--forever", "--rate", "2000"];
const SLOW: &[&str] = &["--postcopy-rate", "4096"];

/// Waits until VM `vm` on `agent` is in `phase`.
fn until_phase(agent: &str, vm: &str, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = pcft_json(&["status", "--agent", agent, "--json"]);
        let found = status["vms"].as_array().expect("vms").iter().find(|v| v["name"] == vm).cloned();
        if found.as_ref().is_some_and(|v| v["phase"] == phase) {
            return;
        }
        assert!(Instant::now() < deadline, "VM {vm} never {phase} on {agent}: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_detached_migration_is_followed_and_waited_for() {
    let source = Agent::start("source", &[]);
    let destination = Agent::start("destination", &[]);
    let (s, d) = (source.addr.as_str(), destination.addr.as_str());
    start_vm(s, "m", BUSY);
    let (code, _, err) = pcft_output(&["migration", "status", "m", "--agent", s]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has no outgoing migration"), "{err}");

    let mut args = vec!["migrate", "m", "--agent", s, "--to", d, "--mode", "postcopy", "--detach", "--json"];
    args.extend_from_slice(SLOW);
    let started = pcft_json(&args);
    assert_eq!((started["started"].as_bool(), started["to"].as_str()), (Some(true), Some(d)), "{started}");

    // While it runs: a second migration of it, or one to its own agent, is refused in words.
    let (code, _, err) = migrate("m", s, d, "postcopy", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("it is already migrating to {d}")), "{err}");
    start_vm(d, "here", BUSY);
    let (code, _, err) = migrate("here", d, d, "postcopy", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot migrate to the agent it runs on"), "{err}");

    let status = pcft_json(&["migration", "status", "m", "--agent", s, "--json"]);
    assert_eq!((status["vm"].as_str(), status["to"].as_str()), (Some("m"), Some(d)), "{status}");
    assert!(matches!(status["state"].as_str(), Some("running" | "completed")), "{status}");
    let report = pcft_json(&["migration", "wait", "m", "--agent", s, "--json"]);
    assert_eq!((report["vm"].as_str(), report["mode"].as_str()), (Some("m"), Some("postcopy")), "{report}");
    assert!(report["failure"].is_null(), "{report}");
    let status = pcft_json(&["migration", "status", "m", "--agent", s, "--json"]);
    assert_eq!(status["state"], "completed", "{status}");
    until_phase(d, "m", "running");
    // The source knows no record count of a VM that moved on: "-", not 0.
    let (code, text, err) = pcft_output(&["status", "--agent", s]);
    assert_eq!(code, Some(0), "{err}");
    let line = text.lines().find(|l| l.trim_start().starts_with("m ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("migrated-away") && line.contains(", - records"), "{line}");
    // Waiting again gives the same report: it is kept with the VM's record.
    let again = pcft_json(&["migration", "wait", "m", "--agent", s, "--json"]);
    assert_eq!(again["total_migration_ms"], report["total_migration_ms"]);
}

#[test]
fn ctrl_c_on_migrate_says_the_migration_goes_on_and_how_to_come_back() {
    let source = Agent::start("source", &[]);
    let destination = Agent::start("destination", &[]);
    let (s, d) = (source.addr.as_str(), destination.addr.as_str());
    start_vm(s, "m", BUSY);
    let cli = pcft(&["migrate", "m", "--agent", s, "--to", d, "--mode", "postcopy", "--postcopy-rate", "4096"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pcft migrate");
    until_phase(s, "m", "migrating-out");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(cli.id() as i32, libc::SIGINT) }, 0);
    let out = cli.wait_with_output().expect("pcft migrate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("goes on in agent") && err.contains(&format!("pcft migration wait m --agent {s}")), "{err}");
    let report = pcft_json(&["migration", "wait", "m", "--agent", s, "--json"]);
    assert!(report["failure"].is_null(), "the migration went on and completed: {report}");
    until_phase(d, "m", "running");
}

#[test]
fn sigterm_at_the_source_lets_a_postcopy_ft_migration_end_and_refuses_new_work() {
    let mut source = Agent::start("source", &[]);
    let destination = Agent::start("destination", &[]);
    let (s, d) = (source.addr.clone(), destination.addr.clone());
    start_vm(&s, "m", BUSY);
    let mut args = vec!["migrate", "m", "--agent", &s, "--to", &d, "--mode", "postcopy-ft", "--detach"];
    args.extend_from_slice(SLOW);
    let (code, _, err) = pcft_output(&args);
    assert_eq!(code, Some(0), "{err}");
    until_phase(&s, "m", "migrating-out");
    source.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(source.alive(), "a graceful agent waits for its migration");
    let (code, _, err) = pcft_output(&["vm", "start", "--agent", &s, "--name", "late", "--mem", "64M", "--forever"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is shutting down"), "{err}");
    assert_eq!(source.wait_exit(Duration::from_secs(60)), Some(0), "the agent exits once the migration ended");
    // The VM was not lost: it runs at the destination, no longer fenced or failed.
    until_phase(&d, "m", "running");
}

#[test]
fn cancel_after_the_switchover_fails_postcopy_ft_over_and_is_refused_for_postcopy() {
    let source = Agent::start("source", &[]);
    let destination = Agent::start("destination", &[]);
    let (s, d) = (source.addr.as_str(), destination.addr.as_str());

    // Plain post-copy: past the switchover the destination holds the only copy.
    start_vm(s, "p", BUSY);
    let mut args = vec!["migrate", "p", "--agent", s, "--to", d, "--mode", "postcopy", "--detach"];
    args.extend_from_slice(SLOW);
    assert_eq!(pcft_output(&args).0, Some(0));
    until_postcopy(s, "p");
    let (code, _, err) = pcft_output(&["migration", "cancel", "p", "--agent", s]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be cancelled") && err.contains("--mode postcopy-ft"), "{err}");
    let report = pcft_json(&["migration", "wait", "p", "--agent", s, "--json"]);
    assert!(report["failure"].is_null(), "it went on and completed: {report}");

    // PostCopyFT: a cancel is a deliberate failover, and the VM runs at the source again.
    start_vm(s, "f", BUSY);
    let mut args = vec!["migrate", "f", "--agent", s, "--to", d, "--mode", "postcopy-ft", "--detach"];
    args.extend_from_slice(SLOW);
    assert_eq!(pcft_output(&args).0, Some(0));
    until_postcopy(s, "f");
    let accepted = pcft_json(&["migration", "cancel", "f", "--agent", s, "--json"]);
    assert_eq!(accepted["cancel"], "failover", "{accepted}");
    let (code, out, err) = pcft_output(&["migration", "wait", "f", "--agent", s, "--json"]);
    assert_eq!(code, Some(1), "the migration did not happen: {err}");
    assert!(err.contains("cancelled after its switchover, as asked"), "{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("a JSON report");
    assert_eq!(
        (report["cancelled"].as_bool(), report["failure"]["kind"].as_str()),
        (Some(true), Some("cancelled")),
        "{report}"
    );
    assert!(report["failover"].is_object(), "{report}");
    let status = pcft_json(&["migration", "status", "f", "--agent", s, "--json"]);
    assert_eq!(status["state"], "recovered", "{status}");
    until_phase(s, "f", "running");
    let (code, _, err) = pcft_output(&["migration", "cancel", "f", "--agent", s]);
    assert_eq!(code, Some(2), "nothing left to cancel: {err}");
    assert!(err.contains("already ended"), "{err}");
}

/// Waits until VM `vm`'s migration out of `agent` is past its switchover.
fn until_postcopy(agent: &str, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = pcft_json(&["migration", "status", vm, "--agent", agent, "--json"]);
        if status["progress"]["phase"] == "postcopy" {
            return;
        }
        assert!(Instant::now() < deadline, "never in post-copy: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
