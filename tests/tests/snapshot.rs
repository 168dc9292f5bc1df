//! A snapshot taken from a running VM by one `pcft` process and restored by
//! another continues exactly where it stopped: the final guest memory and the
//! whole output history equal an uninterrupted run's, and the oracle's.

use pcft_tests::{per_vcpu, run_json, Run};
use vm_fixtures::{abi, FixtureKind, FixtureParams};

const STEPS: u64 = 4_000;
const EVERY: u64 = 250;

fn base_args(fixture: &str, vcpus: &str) -> Vec<String> {
    [
        "vm",
        "run",
        "--fixture",
        fixture,
        "--mem",
        "64M",
        "--vcpus",
        vcpus,
        "--steps",
        &STEPS.to_string(),
        "--record-every",
        &EVERY.to_string(),
        "--seed",
        "11",
        "--spin",
        "300",
        "--timeout",
        "120",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Run {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_json(&args);
    assert_eq!(run.code, Some(0), "{args:?}: {}", run.stderr);
    run
}

/// Runs uninterrupted, then again through `hops` snapshot/restore hand-offs
/// (each in new processes, each at `trigger`), and compares.
fn hand_off(fixture: FixtureKind, vcpus: u64, trigger: &[&str], hops: usize) {
    let dir = tempfile::tempdir().unwrap();
    let v = vcpus.to_string();
    let whole = run(&base_args(fixture.name(), &v));
    assert!(whole.verified());

    let ws_pages = ((64 << 20) - abi::WORKING_SET_GPA) / abi::PAGE_SIZE;
    let params = FixtureParams {
        steps: STEPS,
        record_every: EVERY,
        seed: 11,
        spin: 300,
        ..FixtureParams::new(fixture, vcpus, ws_pages)
    };
    let expected = params.expected_after(STEPS);
    assert_eq!(whole.memory_digest(), expected.memory_digest());

    let mut printed = Vec::new();
    let mut args = base_args(fixture.name(), &v);
    for hop in 0..hops {
        let path = dir.path().join(format!("hop{hop}.snap"));
        args.extend(["--snapshot-out".to_string(), path.display().to_string()]);
        args.extend(trigger.iter().map(|s| s.to_string()));
        let part = run(&args);
        let snap = part.snapshot.unwrap_or_else(|| panic!("{args:?}: no snapshot event"));
        assert!(part.finished.is_none(), "a process that snapshots stops there");
        assert_eq!(snap["records"].as_u64().unwrap() as usize, printed.len() + part.outputs.len());
        printed.extend(part.outputs);
        args = vec!["vm".into(), "restore".into(), path.display().to_string(), "--timeout".into(), "120".into()];
    }
    let last = run(&args);
    printed.extend(last.outputs.iter().copied());
    assert!(last.verified(), "{:?}", last.finished);
    assert_eq!(last.memory_digest(), whole.memory_digest(), "final memory after {hops} hand-off(s) at {trigger:?}");
    assert_eq!(per_vcpu(&printed, vcpus as usize), per_vcpu(&whole.outputs, vcpus as usize), "output history");
    assert_eq!(per_vcpu(&printed, vcpus as usize), expected.outputs());
}

#[test]
fn ledger_one_vcpu_at_several_records() {
    for record in ["1", "7", "15"] {
        hand_off(FixtureKind::Ledger, 1, &["--snapshot-at-record", record], 1);
    }
}

#[test]
fn ledger_two_vcpus_at_several_records() {
    for record in ["2", "9", "31"] {
        hand_off(FixtureKind::Ledger, 2, &["--snapshot-at-record", record], 1);
    }
}

#[test]
fn ledger_two_vcpus_at_arbitrary_instructions() {
    // Time-based points land mid-step, between exits, wherever the vCPUs are.
    for ms in ["5", "40"] {
        hand_off(FixtureKind::Ledger, 2, &["--snapshot-after-ms", ms], 1);
    }
}

#[test]
fn ledger_after_the_last_record() {
    // The snapshot comes when the guest has finished or is about to.
    hand_off(FixtureKind::Ledger, 2, &["--snapshot-at-record", "32"], 1);
}

#[test]
fn chained_hand_offs_across_three_processes() {
    hand_off(FixtureKind::Ledger, 2, &["--snapshot-after-ms", "15"], 3);
}

#[test]
fn idle_mid_spin_and_dirty_mid_write() {
    hand_off(FixtureKind::Idle, 1, &["--snapshot-after-ms", "20"], 1);
    hand_off(FixtureKind::Dirty, 2, &["--snapshot-after-ms", "10"], 1);
}
