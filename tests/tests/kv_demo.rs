//! `pcft demo --fixture kv`: a serving VM on a testbed of namespaces (clients,
//! two hosts, bridges), its clients writing and reading for the whole run,
//! migrated with and without PostCopyFT while the destination or the network
//! fails; the demo's Jepsen-style check of the clients' history must hold
//! (no acknowledged write lost, no stale read, the store holds exactly what
//! the clients read back), and no frame that an epoch which never committed
//! produced may reach the clients (a capture in the client namespace, checked
//! against the destination's frame trace). Without output commit (a hidden
//! fault-injection flag) both checks must fail: the test can fail.

use pcft_tests::pcft_output;
use serde_json::Value;

/// Runs the kv demo with `extra` arguments; its exit code and JSON report.
fn kv_demo(extra: &[&str]) -> (Option<i32>, Value, String) {
    let mut args = vec!["demo", "--fixture", "kv", "--mem", "64M", "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = pcft_output(&args);
    let report: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("pcft demo {extra:?} printed no JSON report ({e}), exit {code:?}: {out}\n{err}"));
    (code, report, err)
}

/// The clients' history held, and the report says so in every field.
fn assert_clients_held(what: &str, code: Option<i32>, report: &Value, err: &str) {
    let story = format!("{what}: {report}\n{err}");
    assert_eq!(code, Some(0), "{story}");
    assert_eq!(report["verified"], true, "{story}");
    assert_eq!(report["acked_writes_lost"], 0, "{story}");
    assert_eq!(report["stale_reads"], 0, "{story}");
    assert_eq!(report["unexplained_reads"], 0, "{story}");
    assert_eq!(report["store_digest_matches"], true, "{story}");
    assert_eq!(report["frames_from_uncommitted_epochs"], 0, "{story}");
    assert_eq!(report["frames_out_of_turn"], 0, "one host answered at a time: {story}");
    assert!(report["capture_error"].is_null(), "{story}");
    assert!(report["frames_from_source"].as_u64().unwrap() > 0, "the capture saw the VM's frames: {story}");
    assert!(report["store_digest"].as_str().is_some_and(|d| d.len() == 16), "{story}");
    // The clients really worked: a few hundred operations at the guest's ~500/s.
    assert!(report["client_acked_writes"].as_u64().unwrap() >= 50, "{story}");
    assert!(report["client_ops"].as_u64().unwrap() > report["client_acked_writes"].as_u64().unwrap(), "{story}");
    assert_eq!(report["client_connections"], 4, "{story}");
    assert!(report["client_max_gap_ms"].as_f64().is_some_and(|gap| gap > 0.0), "{story}");
    pcft_tests::assert_one_copy_at_a_time(report);
    // Three namespaces (the clients and two hosts), all removed.
    assert_eq!(report["testbed_namespaces"].as_array().map(Vec::len), Some(3), "{story}");
    pcft_tests::assert_testbed_removed(report);
}

#[test]
fn a_serving_vm_recovers_from_a_dead_destination_and_no_acknowledged_write_is_lost() {
    let (code, report, err) = kv_demo(&["--fail-at", "epoch:5"]);
    assert_clients_held("crash at epoch:5", code, &report, &err);
    assert_eq!(report["recovered"], true, "{report}");
    assert_eq!(report["restored_epoch"], 4, "{report}");
    // The destination served too (its frames of committed epochs went out).
    assert!(report["frames_from_destination"].as_u64().unwrap() > 0, "{report}");
    // The clients' connections ride the failover out on TCP's retransmissions.
    assert_eq!(report["connections_survived"], 4, "{report}");
    assert_eq!(report["client_reconnects"], 0, "{report}");
}

#[test]
fn without_output_commit_the_same_failure_loses_acknowledged_writes() {
    let (code, report, _) = kv_demo(&["--fail-at", "epoch:5", "--no-output-commit"]);
    assert_eq!(report["recovered"], true, "{report}");
    assert_eq!(code, Some(1), "the demo fails when the clients' history does not hold: {report}");
    assert_eq!(report["verified"], false, "{report}");
    // Acknowledgements left the destination in epoch 5, which the failover undid.
    assert!(report["acked_writes_lost"].as_u64().unwrap() > 0, "{report}");
    assert!(report["client_anomalies"].as_array().is_some_and(|a| !a.is_empty()), "{report}");
    // On the wire: replies of epochs after the restored one reached the clients.
    assert!(report["frames_from_uncommitted_epochs"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn a_partitioned_or_frozen_destination_is_fenced_and_the_clients_lose_nothing() {
    // Partition: only the link between the hosts is cut; both still reach the
    // clients, who must hear from one host at a time (frames_out_of_turn 0).
    for kind in ["partition", "freeze"] {
        let (code, report, err) = kv_demo(&["--fail-kind", kind, "--fail-at", "400ms"]);
        assert_clients_held(kind, code, &report, &err);
        assert_eq!(report["recovered"], true, "{kind}: {report}");
        assert_eq!(report["destination_fenced"], true, "{kind}: {report}");
    }
}

#[test]
fn a_serving_vm_moves_without_ft_and_its_clients_keep_their_connections() {
    for mode in ["postcopy", "precopy"] {
        let (code, report, err) = kv_demo(&["--mode", mode]);
        assert_clients_held(mode, code, &report, &err);
        assert_eq!(report["recovered"], false, "{report}");
        assert_eq!(report["connections_survived"], 4, "{mode}: {report}");
        assert!(report["downtime_ms"].as_f64().is_some(), "{report}");
        eprintln!(
            "{mode}: downtime {:.1} ms, longest time without a reply {:.0} ms",
            report["downtime_ms"].as_f64().unwrap(),
            report["client_max_gap_ms"].as_f64().unwrap()
        );
    }
}
