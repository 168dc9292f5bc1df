//! PostCopyFT on real KVM with real processes: the destination agent is
//! SIGKILLed at many points of a post-copy migration (by its own hidden
//! `--crash-at` hook, or by the demo after a delay); every time the source
//! restores its last committed checkpoint, the guest finishes there and
//! matches the ledger oracle, and every output record that reached the outside
//! world is one of the oracle's (none lost, none contradicted). Without a
//! failure the migration completes and the guest verifies at the destination.
//! A destination frozen (SIGSTOP) past its lease is detected by heartbeat
//! silence; when it wakes (SIGCONT) it finds its lease expired and keeps its
//! copy stopped, so exactly one VM runs; so does one cut off by a network
//! partition between two network namespaces.

use pcft_tests::{pcft_json, SMALL_FT_DEMO};
use serde_json::Value;

fn ft_demo(fail_at: &str) -> Value {
    ft_demo_kind(fail_at, "crash")
}

fn ft_demo_kind(fail_at: &str, kind: &str) -> Value {
    ft_demo_with(fail_at, kind, &[])
}

fn ft_demo_with(fail_at: &str, kind: &str, extra: &[&str]) -> Value {
    let args = [&SMALL_FT_DEMO[..], &["--fail-at", fail_at, "--fail-kind", kind], extra].concat();
    let report = pcft_json(&args);
    let what = format!("--fail-at {fail_at}: {report}");
    assert_eq!(report["mode"], "postcopy-ft", "{what}");
    assert_eq!(report["verified"], true, "{what}");
    assert_eq!(report["lost_released_outputs"], 0, "{what}");
    assert_eq!(report["never_released_outputs"], 0, "{what}");
    assert_eq!(report["released_outputs"], report["records"], "every record reached the outside: {what}");
    report
}

/// The destination crashed and the source recovered; returns the restored epoch.
fn recovered(report: &Value) -> u64 {
    let what = report.to_string();
    assert_eq!(report["recovered"], true, "{what}");
    assert!(report["total_migration_ms"].is_null(), "{what}");
    assert!(report["failure"]["kind"].is_string(), "{what}");
    assert!(report["failover_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{what}");
    let epoch = report["restored_epoch"].as_u64().expect("restored_epoch");
    assert_eq!(
        epoch,
        report["checkpoints_committed"].as_u64().unwrap(),
        "the last committed epoch is restored: {what}"
    );
    epoch
}

#[test]
fn without_a_failure_the_migration_completes_with_checkpoints() {
    let report = ft_demo("none");
    let what = report.to_string();
    assert_eq!(report["recovered"], false, "{what}");
    assert!(report["failure"].is_null(), "{what}");
    assert!(report["total_migration_ms"].as_f64().is_some(), "{what}");
    assert!(report["checkpoints_committed"].as_u64().unwrap() >= 3, "checkpoints every 100 ms: {what}");
    assert!(report["checkpoint_pages"].as_u64().unwrap() > 0, "{what}");
    assert_eq!(report["duplicate_released_outputs"], 0, "{what}");
}

#[test]
fn a_crash_before_the_first_checkpoint_restores_the_switchover_state() {
    let report = ft_demo("before-first-checkpoint");
    assert_eq!(recovered(&report), 0, "{report}");
}

#[test]
fn a_crash_during_a_speculative_phase_never_applies_that_epoch() {
    let report = ft_demo("speculative:3");
    assert!(recovered(&report) <= 2, "{report}");
}

#[test]
fn a_crash_during_a_checkpoint_pause_restores_an_earlier_epoch() {
    let report = ft_demo("pause:2");
    assert!(recovered(&report) <= 1, "{report}");
}

#[test]
fn a_crash_between_epochs_restores_the_last_committed_one() {
    let report = ft_demo("epoch:4");
    let epoch = recovered(&report);
    assert!(epoch <= 4, "{report}");
}

#[test]
fn a_crash_right_after_the_last_page_still_recovers() {
    let report = ft_demo("after-last-page");
    let epoch = recovered(&report);
    assert!(epoch >= 3, "post-copy ran long enough for several checkpoints: {report}");
    assert!(report["pages_pushed"].as_u64().unwrap() + report["pages_faulted"].as_u64().unwrap() == 16384, "{report}");
}

#[test]
fn a_sigkill_at_a_time_recovers() {
    // Both land in post-copy: 16384 pages at 4096 pages/s take up to 4 s.
    for at in ["150ms", "700ms"] {
        recovered(&ft_demo(at));
    }
}

#[test]
fn a_frozen_destination_is_fenced_when_it_wakes() {
    for at in ["600ms", "pause:2", "after-last-page"] {
        let report = ft_demo_kind(at, "freeze");
        recovered(&report);
        assert_eq!(report["failure"]["kind"], "heartbeat-timeout", "silence, not a closed socket: {report}");
        assert!(report["failure"]["detection_ms"].as_f64().unwrap() >= 200.0, "the timeout is 200 ms: {report}");
        assert!(report["failover"]["fence_wait_ms"].as_f64().is_some(), "{report}");
        assert_eq!(report["destination_fenced"], true, "exactly one copy runs after the failover: {report}");
    }
}

#[test]
fn a_network_partition_fences_the_destination_and_the_source_recovers() {
    // The agents run in network namespaces joined by a veth pair; the demo cuts
    // the pair mid post-copy, heals it after the failover, and checks that the
    // destination's copy stays stopped.
    let report = ft_demo_kind("600ms", "partition");
    recovered(&report);
    assert_eq!(report["failure"]["kind"], "heartbeat-timeout", "{report}");
    let detection = report["failure"]["detection_ms"].as_f64().unwrap();
    assert!((200.0..400.0).contains(&detection), "detected by 200 ms of silence: {report}");
    assert_eq!(report["destination_fenced"], true, "exactly one copy runs after the failover: {report}");
    assert_eq!(report["testbed_namespaces"].as_array().map(Vec::len), Some(2), "two hosts: {report}");
    pcft_tests::assert_testbed_removed(&report);
}

#[test]
fn the_dirty_ring_and_ebpf_track_the_destination_too() {
    // eBPF needs the program built in: `cargo xtask test` builds it first.
    for tracker in ["ring", "ebpf"] {
        let report = ft_demo_with("none", "crash", &["--checkpoint-tracker", tracker]);
        assert!(report["checkpoint_pages"].as_u64().unwrap() > 0, "{tracker}: {report}");
        assert_eq!(report["recovered"], false, "{tracker}: {report}");
        for (at, newest) in [("pause:3", 2), ("speculative:2", 1)] {
            let report = ft_demo_with(at, "crash", &["--checkpoint-tracker", tracker]);
            assert!(recovered(&report) <= newest, "{tracker} {at}: {report}");
        }
    }
}

#[test]
fn with_ebpf_tracking_on_both_hosts_every_kind_of_failure_recovers() {
    // `--dirty-tracker ebpf`: the VM is tracked by the eBPF program at the
    // source and the destination's checkpoints come from it too.
    let ebpf = ["--dirty-tracker", "ebpf"];
    assert_eq!(recovered(&ft_demo_with("before-first-checkpoint", "crash", &ebpf)), 0);
    for at in ["epoch:3", "400ms"] {
        let report = ft_demo_with(at, "crash", &ebpf);
        assert!(recovered(&report) >= 1, "{at}: {report}");
        assert!(report["checkpoint_pages"].as_u64().unwrap() > 0, "{at}: {report}");
    }
    let report = ft_demo_with("after-last-page", "crash", &ebpf);
    assert!(recovered(&report) >= 3, "{report}");
    let report = ft_demo_with("600ms", "freeze", &ebpf);
    recovered(&report);
    assert_eq!(report["destination_fenced"], true, "{report}");
}

#[test]
fn a_recovered_vm_keeps_its_dirty_tracker_and_live_dirty_rate() {
    use pcft_tests::{http_get, migrate, start_vm, Agent};
    let source = Agent::start("source", &["--metrics", "127.0.0.1:0"]);
    let destination = Agent::start("destination", &["--crash-at", "committed:2"]);
    let workload = ["--fixture", "dirty", "--mem", "64M", "--forever", "--rate", "5000", "--dirty-tracker", "ring"];
    start_vm(&source.addr, "web", &workload);
    let (code, _, err) = migrate("web", &source.addr, &destination.addr, "postcopy-ft", &["--postcopy-rate", "4096"]);
    assert_eq!(code, Some(1), "the destination crashed: the migration failed: {err}");
    assert!(err.contains("recovered and runs at the source"), "{err}");
    let timeline = source.metrics.as_deref().expect("--metrics").replace("/metrics", "/api/timeline");
    let after: Value = serde_json::from_str(&http_get(&timeline)).expect("timeline JSON");
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let later: Value =
        serde_json::from_str(&http_get(&format!("{timeline}?since={}", after["now_ms"]))).expect("timeline JSON");
    let samples: Vec<&Value> =
        later["samples"].as_array().expect("samples").iter().filter(|s| s["vm"] == "web").collect();
    assert!(samples.len() >= 2, "no dirty-rate samples after the failover: {later}");
    assert!(samples.iter().all(|s| s["tracker"] == "ring" && s["bytes_per_second"].as_f64().unwrap() > 0.0), "{later}");
    let status = pcft_json(&["status", "--agent", &source.addr, "--json"]);
    assert_eq!(status["vms"][0]["phase"], "running", "{status}");
    assert_eq!(status["vms"][0]["dirty_tracker"], "ring", "{status}");
}

#[test]
fn a_failover_re_releases_only_what_the_destination_could_not_report() {
    // The destination's heartbeats (every 20 ms) say how far it has released;
    // the recovered source releases only past that. Duplicates remain only of
    // what went out there after its last heartbeat that got through: at most
    // about one acked epoch's records, not all that the destination released
    // (which, before, all went out again). At the end of post-copy (the push
    // paces it, so however loaded the host) the destination has released much.
    for kind in ["crash", "freeze"] {
        let report = ft_demo_kind("after-last-page", kind);
        recovered(&report);
        let what = report.to_string();
        let duplicates = report["duplicate_released_outputs"].as_u64().unwrap();
        assert_eq!(report["duplicate_released_outputs_in_window"].as_u64().unwrap(), duplicates, "{what}");
        let by_destination = report["destination_released_outputs"].as_u64().unwrap();
        assert!(by_destination >= 8, "the destination released output before it died: {what}");
        assert!(duplicates * 4 <= by_destination, "far fewer duplicates than the destination's releases: {what}");
    }
}
