//! The agents' Prometheus metrics after a real PostCopyFT migration between
//! two agent processes: the source counts the migration, its pages and the
//! committed checkpoints; the destination its fault latencies, checkpoint
//! pauses, heartbeat round trips, dirty rate and released output.

use pcft_tests::{http_get, metric, pcft_output, Agent};

#[test]
fn a_postcopy_ft_migration_shows_in_both_agents_metrics() {
    let source = Agent::start("source", &["--metrics", "127.0.0.1:0"]);
    let destination = Agent::start("destination", &["--metrics", "127.0.0.1:0"]);
    let (code, _, err) = pcft_output(&[
        "vm",
        "start",
        "--agent",
        &source.addr,
        "--name",
        "m1",
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--steps",
        "400000",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = pcft_output(&[
        "migrate",
        "m1",
        "--agent",
        &source.addr,
        "--to",
        &destination.addr,
        "--mode",
        "postcopy-ft",
        "--postcopy-rate",
        "8000",
    ]);
    assert_eq!(code, Some(0), "{err}");

    let src = http_get(source.metrics.as_deref().unwrap());
    assert_eq!(metric(&src, r#"pcft_migrations_total{mode="postcopy-ft",result="completed"}"#), Some(1.0), "{src}");
    // The VM left the source: its phase series go with it (the outcome is in pcft_migrations_total).
    assert_eq!(metric(&src, r#"pcft_migration_phase{vm="m1""#), None, "{src}");
    let pushed = metric(&src, r#"pcft_migration_pages_total{vm="m1",reason="pushed"}"#).unwrap_or(0.0);
    let faulted = metric(&src, r#"pcft_migration_pages_total{vm="m1",reason="faulted"}"#).unwrap_or(0.0);
    assert_eq!(pushed + faulted, 16384.0, "every page of 64M moved once: {src}");
    assert!(metric(&src, r#"pcft_checkpoint_epochs_total{vm="m1"}"#).unwrap_or(0.0) >= 1.0, "{src}");
    assert!(metric(&src, r#"pcft_checkpoint_bytes_total{vm="m1"}"#).unwrap_or(0.0) > 4096.0, "{src}");
    assert!(src.ends_with("# EOF\n"));

    let dst = http_get(destination.metrics.as_deref().unwrap());
    assert!(metric(&dst, "pcft_migration_fault_latency_seconds_count").unwrap_or(0.0) > 0.0, "{dst}");
    assert!(metric(&dst, "pcft_checkpoint_pause_seconds_count").unwrap_or(0.0) >= 1.0, "{dst}");
    assert!(metric(&dst, "pcft_heartbeat_round_trip_seconds_count").unwrap_or(0.0) >= 1.0, "{dst}");
    assert!(
        metric(&dst, r#"pcft_vm_dirty_rate_bytes_per_second{vm="m1",tracker="bitmap"}"#).unwrap_or(0.0) > 0.0,
        "{dst}"
    );
    assert!(metric(&dst, r#"pcft_output_released_records_total{vm="m1"}"#).unwrap_or(0.0) >= 1.0, "{dst}");
}

/// FT off costs nothing: a plain post-copy migration sends no checkpoint and
/// no heartbeat, and holds no output back.
#[test]
fn a_plain_postcopy_migration_sends_no_checkpoints_or_heartbeats() {
    let source = Agent::start("source", &["--metrics", "127.0.0.1:0"]);
    let destination = Agent::start("destination", &["--metrics", "127.0.0.1:0"]);
    pcft_tests::start_vm(&source.addr, "plain", &["--mem", "64M", "--steps", "60000"]);
    let (code, out, err) = pcft_tests::migrate("plain", &source.addr, &destination.addr, "postcopy", &["--json"]);
    assert_eq!(code, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("the report");
    assert_eq!(report["checkpoints_committed"], 0, "{report}");
    assert_eq!(report["checkpoint_bytes"], 0, "{report}");
    assert!(report["pages_faulted"].as_u64().unwrap() > 0, "the guest ran during post-copy: {report}");
    let verified = pcft_tests::pcft_json(&["vm", "wait", "plain", "--agent", &destination.addr, "--json"]);
    assert_eq!(verified["verified"], true, "{verified}");

    let src = http_get(source.metrics.as_deref().unwrap());
    assert_eq!(metric(&src, r#"pcft_migrations_total{mode="postcopy",result="completed"}"#), Some(1.0), "{src}");
    assert_eq!(metric(&src, r#"pcft_checkpoint_epochs_total{vm="plain"}"#), None, "{src}");
    let dst = http_get(destination.metrics.as_deref().unwrap());
    assert_eq!(metric(&dst, "pcft_checkpoint_pause_seconds_count"), Some(0.0), "{dst}");
    assert_eq!(metric(&dst, "pcft_heartbeat_round_trip_seconds_count"), Some(0.0), "{dst}");
    // Output is released as it comes, not held for checkpoints.
    let released = metric(&dst, r#"pcft_output_released_records_total{vm="plain"}"#).unwrap_or(0.0);
    assert_eq!(released, verified["records"].as_f64().unwrap(), "{dst}");
}
