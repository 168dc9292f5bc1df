//! `cargo xtask chaos`: the fault-injection suite. Many PostCopyFT demos in a
//! row, each failing the destination at a random point in a random way:
//! SIGKILL (`crash`), SIGSTOP past its lease (`freeze`), or a network cut
//! between two network namespaces (`partition`). Every run must end with the
//! guest verified against its oracle wherever it finished, no released output
//! lost or contradicted, and, for freeze and partition, the destination's copy
//! fenced. Results: target/chaos/chaos.{md,json}, and stdout.

use crate::bench::output_within;
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Longest a single demo may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The kinds of failure, in the order runs cycle through them (crashes most).
const KINDS: [&str; 5] = ["crash", "crash", "freeze", "crash", "partition"];

/// One demo run: its report, or why it produced none.
fn run_once(pcft: &Path, kind: &str) -> Value {
    let args = [
        "demo",
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--steps",
        "40000",
        "--postcopy-rate",
        "4096",
        "--fail-at",
        "random",
        "--fail-kind",
        kind,
        "--json",
    ];
    match output_within(Command::new(pcft).args(args), RUN_TIMEOUT) {
        Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            json!({ "error": format!("no report ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()) })
        }),
        Err(e) => json!({ "error": format!("{e:#}") }),
    }
}

/// Whether a run came out right: verified, nothing lost, fenced where it must be.
fn held(kind: &str, report: &Value) -> bool {
    let verified = report["verified"] == true && report["lost_released_outputs"] == 0;
    let fenced = kind == "crash" || report["recovered"] != true || report["destination_fenced"] == true;
    verified && fenced
}

pub fn run(root: &Path, pcft: &Path, runs: usize) -> Result<()> {
    let mut progress = Progress::new(runs as u64);
    let mut results = Vec::new();
    for i in 0..runs {
        let kind = KINDS[i % KINDS.len()];
        progress.step(format!("chaos: run {}/{runs}, {kind}", i + 1));
        let report = run_once(pcft, kind);
        results.push(json!({ "kind": kind, "held": held(kind, &report), "report": report }));
    }
    drop(progress);
    let mut md = format!(
        "# Fault-injection suite\n\n{runs} `pcft demo` runs (64M ledger guest, 2 vCPUs, post-copy push 4096 pages/s, \
         checkpoints every 100 ms), each failing the destination at a random point (`--fail-at random`). \
         `held`: the guest verified against its oracle wherever it finished, no released output lost or \
         contradicted, and a frozen or cut-off destination fenced.\n\n\
         | failure | runs | recovered at the source | completed before the failure | held | released outputs | lost | duplicates |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for kind in ["crash", "freeze", "partition"] {
        let of_kind: Vec<&Value> = results.iter().filter(|r| r["kind"] == kind).collect();
        let count = |f: &dyn Fn(&Value) -> bool| of_kind.iter().filter(|r| f(r)).count();
        let sum = |field: &str| of_kind.iter().filter_map(|r| r["report"][field].as_u64()).sum::<u64>();
        md.push_str(&format!(
            "| {kind} | {} | {} | {} | {} | {} | {} | {} |\n",
            of_kind.len(),
            count(&|r| r["report"]["recovered"] == true),
            count(&|r| r["report"]["recovered"] == false && r["report"]["failure"].is_null()),
            count(&|r| r["held"] == true),
            sum("released_outputs"),
            sum("lost_released_outputs"),
            sum("duplicate_released_outputs"),
        ));
    }
    let failed: Vec<&Value> = results.iter().filter(|r| r["held"] != true).collect();
    for r in &failed {
        md.push_str(&format!("\nFAILED ({}): {}\n", r["kind"], r["report"]));
    }
    let dir = root.join("target/chaos");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("chaos.json"), serde_json::to_string_pretty(&json!({ "runs": results }))?)?;
    std::fs::write(dir.join("chaos.md"), &md).context("writing chaos.md")?;
    println!("{md}");
    eprintln!("chaos: wrote {}", dir.join("chaos.md").display());
    if !failed.is_empty() {
        bail!("{} of {runs} runs did not hold (see above)", failed.len());
    }
    Ok(())
}
