//! `pcft soak`, short: a serving VM migrated back and forth with PostCopyFT,
//! its clients writing throughout, every second migration failing (the
//! destination SIGKILLed and restarted, then a partition); the clients' history
//! must hold, the VM serve, the agents not grow and nothing stay behind.

use pcft_tests::pcft_output;
use serde_json::Value;

#[test]
fn a_short_soak_with_failures_loses_nothing_and_leaves_nothing_behind() {
    let (code, out, err) =
        pcft_output(&["soak", "--minutes", "0.6", "--every-secs", "1", "--fail-every", "2", "--json"]);
    let report: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("no JSON report ({e}), exit {code:?}: {out}\n{err}"));
    let story = format!(
        "{}\n{err}",
        serde_json::to_string(&{
            let mut r = report.clone();
            r.as_object_mut().unwrap().remove("samples");
            r
        })
        .unwrap()
    );
    assert_eq!(code, Some(0), "{story}");
    assert_eq!(report["verified"], true, "{story}");
    let migrations = report["migrations"].as_u64().unwrap();
    assert!(migrations >= 4, "{story}");
    // Every second one failed: a crash first, then a partition; each failed over.
    assert!(report["failures_injected"].as_u64().unwrap() >= 2, "{story}");
    assert!(report["recovered"].as_u64().unwrap() >= 2, "{story}");
    assert_eq!(report["failed"], 0, "{story}");
    assert_eq!(report["acked_writes_lost"], 0, "{story}");
    assert_eq!(report["stale_reads"], 0, "{story}");
    assert!(report["client_acked_writes"].as_u64().unwrap() > 100, "{story}");
    assert_eq!(report["left_behind"], serde_json::json!([]), "{story}");
    assert_eq!(report["grew"], serde_json::json!([]), "{story}");
    // The crashed destination came back as a new process: three agent processes sampled.
    let samples = report["samples"].as_array().unwrap();
    let mut pids: Vec<u64> = samples.iter().filter_map(|s| s["pid"].as_u64()).collect();
    pids.sort_unstable();
    pids.dedup();
    assert!(pids.len() >= 3, "the restarted agent is sampled too: {pids:?}");
    assert!(samples.iter().all(|s| s["rss_kib"].as_u64().unwrap() > 0), "{story}");
}
