//! Gray failures in `pcft demo`: the link between the hosts made lossy and
//! slow (`--fail-kind lossy`: two network namespaces; `tc netem`, or where
//! the kernel lacks netem, nftables loss and a `tbf` queue), a source
//! starved of CPU (`--fail-kind slow-source`: a cgroup CPU quota), and a
//! destination whose checkpoints stop while it heartbeats (`--fail-kind
//! stall`, which the source must fail over), TCP resets injected into the
//! migration connection while both agents live (`--fail-kind reset`, an
//! nftables rule on loopback, on either side or both), and a destination that
//! goes silent while its vCPU threads and lease watchdog stall right where a
//! weak fence would let the guest run on (`--fail-kind stall-fence`). Whether
//! the migration completes or the source fails over, the guest verifies
//! against its oracle, no released output is lost, a destination whose VM was
//! recovered at the source stays fenced, and the two copies never ran at once
//! (the demo's check from both agents' KVM_RUN run logs). The demo removes its
//! namespaces, rules and cgroups.

use pcft_tests::{assert_one_copy_at_a_time, pcft_json, SMALL_FT_DEMO};
use serde_json::Value;
use std::sync::Mutex;

/// One demo at a time: they are heavy on this 2-core machine, and each test
/// checks that no namespace or cgroup of a demo is left behind.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn demo(kind: &str, extra: &[&str]) -> Value {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let args = [&SMALL_FT_DEMO[..], &["--fail-kind", kind], extra].concat();
    let report = pcft_json(&args);
    let what = format!("{kind} {extra:?}: {report}");
    assert_eq!(report["fail_kind"], kind, "{what}");
    assert_eq!(report["verified"], true, "{what}");
    assert_eq!(report["lost_released_outputs"], 0, "{what}");
    assert_eq!(report["never_released_outputs"], 0, "{what}");
    if report["recovered"] == true {
        assert_eq!(report["destination_fenced"], true, "exactly one copy runs after the failover: {what}");
    }
    assert_one_copy_at_a_time(&report);
    pcft_tests::assert_testbed_removed(&report);
    cgroups_removed();
    reset_rules_removed();
    report
}

fn reset_rules_removed() {
    let tables = std::process::Command::new("nft").args(["list", "tables"]).output().expect("nft list tables");
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(!tables.contains("pcft-reset"), "the demo removes its nftables reset table: {tables}");
}

fn cgroups_removed() {
    let leftover = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup"]
        .into_iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().starts_with("pcft-src-"));
    assert!(!leftover, "the demo removes its cgroup");
}

#[test]
fn a_link_losing_every_packet_fails_over_like_a_cut() {
    let report = demo("lossy", &["--fail-at", "300ms", "--loss", "100"]);
    let what = report.to_string();
    assert_eq!(report["recovered"], true, "{what}");
    assert_eq!(report["failure"]["kind"], "heartbeat-timeout", "only silence tells: {what}");
    let network = report["network"].as_str().expect("the degradation applied");
    assert!(
        network.starts_with("netem loss 100%") || network.starts_with("nft loss 100%"),
        "netem where the kernel has it, else nftables: {what}"
    );
}

#[test]
fn a_mildly_lossy_link_slows_the_migration_but_it_completes() {
    let report = demo("lossy", &["--fail-at", "200ms", "--loss", "1", "--delay-ms", "5", "--link-mbit", "1000"]);
    let what = report.to_string();
    assert_eq!(report["recovered"], false, "{what}");
    assert!(report["failure"].is_null(), "{what}");
    assert!(report["total_migration_ms"].as_f64().is_some(), "{what}");
    assert!(report["network"].as_str().is_some_and(|n| n.contains("loss 1%")), "{what}");
}

#[test]
fn a_source_starved_of_cpu_completes_or_fails_over_safely() {
    // 2% of a CPU: the source may ack heartbeats too late for the destination's
    // lease (it then stops its copy and the source fails over), or the migration
    // completes slowly; either way nothing is lost.
    let report = demo("slow-source", &["--fail-at", "300ms", "--source-cpu-pct", "2"]);
    let what = report.to_string();
    assert!(report["source_throttle"].as_str().is_some_and(|t| t.contains("2% of a CPU")), "{what}");
}

#[test]
fn a_destination_whose_checkpoints_stall_is_failed_over_and_fenced() {
    // The checkpoint timeout (3 s by default) would outlast this short post-copy.
    let report = demo("stall", &["--fail-at", "epoch:2", "--checkpoint-timeout", "500"]);
    let what = report.to_string();
    assert_eq!(report["recovered"], true, "{what}");
    assert_eq!(report["failure"]["kind"], "checkpoint-stalled", "heartbeats went on: {what}");
    assert_eq!(report["restored_epoch"], 2, "{what}");
    assert_eq!(report["destination_fenced"], true, "{what}");
}

#[test]
fn a_slow_staging_disk_at_the_source_slows_the_migration_and_loses_nothing() {
    let report = demo("slow-disk", &["--disk-delay-ms", "20"]);
    let what = report.to_string();
    assert!(report["source_staging"].as_str().is_some_and(|s| s.contains("20 ms")), "{what}");
    // Checkpoints went on at the pace of the disk (fewer, larger epochs); post-copy
    // and heartbeats did not wait for it.
    assert!(report["checkpoints_committed"].as_u64().is_some_and(|n| n >= 1), "{what}");
    assert_eq!(report["recovered"], false, "a slow disk is no reason to fail over: {what}");
}

/// A reset on `side`: the source fails over (it cannot know the destination
/// stopped: it waits out the lease), and the destination, alive, stays fenced.
fn reset(side: &str) -> Value {
    let report = demo("reset", &["--fail-at", "400ms", "--reset-side", side]);
    let what = report.to_string();
    assert_eq!(report["recovered"], true, "{what}");
    assert_eq!(report["reset_side"], side, "{what}");
    assert!(report["network"].as_str().is_some_and(|n| n.contains("reject with tcp reset")), "{what}");
    assert_eq!(report["destination_fenced"], true, "{what}");
    // Both agents answered (a guest that finished before the switchover has none at the destination).
    assert!(report["source_run_intervals"].as_u64().is_some_and(|n| n > 0), "{what}");
    assert!(report["destination_run_intervals"].as_u64().is_some(), "{what}");
    report
}

#[test]
fn a_reset_seen_by_the_source_fails_over_after_the_lease() {
    let report = reset("source");
    let what = report.to_string();
    assert_eq!(report["failure"]["kind"], "connection-closed", "{what}");
    // A reset proves nothing about the destination's copy: the source waits out
    // its lease (the last renewal was a heartbeat interval or so before).
    assert!(report["failover"]["fence_wait_ms"].as_f64().is_some_and(|ms| ms >= 100.0), "{what}");
}

#[test]
fn a_reset_seen_by_the_destination_fences_it_and_the_source_recovers() {
    let report = reset("destination");
    let what = report.to_string();
    // The source hears the destination's kernel reset the next time it writes, or nothing.
    let kind = report["failure"]["kind"].as_str().unwrap_or_default();
    assert!(["connection-closed", "heartbeat-timeout"].contains(&kind), "{what}");
}

#[test]
fn a_reset_both_ways_fails_over_and_fences_the_destination() {
    let report = reset("both");
    assert_eq!(report["failure"]["kind"], "connection-closed", "{report}");
}

#[test]
fn a_destination_whose_vcpus_and_watchdog_stall_past_its_lease_is_fenced_on_time() {
    // It goes silent at the point, and each of its vCPU threads stalls (once)
    // between its fence check and KVM_RUN, its lease watchdog too, for three
    // heartbeat timeouts and more: far past the source's failover.
    let report = demo("stall-fence", &["--fail-at", "epoch:2"]);
    let what = report.to_string();
    assert_eq!(report["recovered"], true, "{what}");
    assert_eq!(report["failure"]["kind"], "heartbeat-timeout", "silence: {what}");
    assert_eq!(report["destination_fenced"], true, "{what}");
    assert_eq!(report["copies_overlap_ms"].as_f64(), Some(0.0), "the guest did not run past the lease there: {what}");
}
