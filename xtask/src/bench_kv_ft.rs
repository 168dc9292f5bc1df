//! `cargo xtask bench --only kv-ft`: what a serving VM's clients see while it
//! migrates, from `pcft demo --fixture kv` (64M kv guest, 4 client
//! connections writing and reading throughout; post-copy pushed at 4096
//! pages/s, so it lasts about 4 s):
//!
//! 1. The longest time the clients got no answer (`client_max_gap_ms`)
//!    beside the switchover's downtime, for pre-copy, post-copy and
//!    post-copy with FT.
//! 2. The latency that holding output adds: the clients' answer latency for
//!    requests sent while the VM migrated, with FT at checkpoint intervals
//!    of 25, 50, 100 and 200 ms, over plain post-copy's in the same run.
//! 3. Failover as the clients see it: the destination SIGKILLed after its
//!    fifth checkpoint; the longest gap then spans detection, the lease wait,
//!    the restore and TCP's retransmission.
//!
//! Each configuration runs `reps` times, interleaved; tables show medians.
//! Results: target/bench/kv-ft.{md,json}, and stdout.

use crate::bench::{output_within, PCFT_TIMEOUT};
use crate::bench_dirty::median;
use crate::progress::Progress;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// One configuration: its name, the demo's mode, the checkpoint interval (FT), and where it fails.
struct Config {
    name: &'static str,
    mode: &'static str,
    interval_ms: Option<u64>,
    fail_at: &'static str,
}

const CONFIGS: [Config; 7] = [
    Config { name: "pre-copy", mode: "precopy", interval_ms: None, fail_at: "none" },
    Config { name: "post-copy", mode: "postcopy", interval_ms: None, fail_at: "none" },
    Config { name: "post-copy FT, 25 ms", mode: "postcopy-ft", interval_ms: Some(25), fail_at: "none" },
    Config { name: "post-copy FT, 50 ms", mode: "postcopy-ft", interval_ms: Some(50), fail_at: "none" },
    Config { name: "post-copy FT, 100 ms", mode: "postcopy-ft", interval_ms: Some(100), fail_at: "none" },
    Config { name: "post-copy FT, 200 ms", mode: "postcopy-ft", interval_ms: Some(200), fail_at: "none" },
    Config {
        name: "post-copy FT, 100 ms, destination killed after checkpoint 5",
        mode: "postcopy-ft",
        interval_ms: Some(100),
        fail_at: "epoch:5",
    },
];

/// The post-copy push rate, pages/s: a 64M guest stays in post-copy for about 4 s.
const PUSH_RATE: &str = "4096";

/// `pcft demo --fixture kv` of `config`, its JSON report (or the error, as `{"error": …}`).
fn demo(pcft: &Path, config: &Config) -> Value {
    let interval = config.interval_ms.map(|ms| ms.to_string());
    let mut args = vec!["demo", "--fixture", "kv", "--mem", "64M", "--mode", config.mode, "--postcopy-rate", PUSH_RATE];
    args.extend(["--fail-at", config.fail_at, "--json"]);
    if let Some(ms) = &interval {
        args.extend(["--checkpoint-interval", ms]);
    }
    let run = output_within(Command::new(pcft).args(&args), PCFT_TIMEOUT).and_then(|out| {
        serde_json::from_slice::<Value>(&out.stdout).with_context(|| {
            format!(
                "pcft {} printed no report ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    });
    run.unwrap_or_else(|e| json!({ "error": format!("{e:#}") }))
}

/// The median of `field` over the runs that have it (NaN: none).
fn median_of(runs: &[Value], field: &str) -> f64 {
    let values: Vec<f64> = runs.iter().filter_map(|r| r[field].as_f64()).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    median(values)
}

fn cell(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.0}")
    } else {
        "—".into()
    }
}

pub fn run(root: &Path, pcft: &Path, quick: bool) -> Result<()> {
    let reps = if quick { 1 } else { 3 };
    let mut progress = Progress::new((reps * CONFIGS.len()) as u64);
    let mut runs: Vec<Vec<Value>> = CONFIGS.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps {
        for (i, config) in CONFIGS.iter().enumerate() {
            progress.step(format!("kv-ft: {}, run {}/{reps}", config.name, rep + 1));
            runs[i].push(demo(pcft, config));
        }
    }
    drop(progress);
    let plain_p50 = median_of(&runs[1], "client_latency_migrating_p50_ms");
    let mut md = format!(
        "# What a serving VM's clients see while it migrates\n\n`pcft demo --fixture kv` (64M kv guest, 4 client \
         connections writing and reading throughout, post-copy pushed at {PUSH_RATE} pages/s); medians of {reps} \
         run(s) each, interleaved. `downtime`: the switchover's pause at the source. `longest gap`: the longest \
         time no client got an answer. `latency while migrating`: from request to answer, for requests sent \
         while the VM migrated (with FT each answer waits for its epoch's checkpoint to commit). `lost`: \
         acknowledged writes lost, over all runs (must be 0).\n\n\
         | run | downtime ms | longest gap ms | latency while migrating p50 / p99 ms | p50 over post-copy's | \
         total migration ms | failover ms | lost | runs failed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut rows = Vec::new();
    for (config, runs) in CONFIGS.iter().zip(&runs) {
        // A run that failed has no `verified: true` (a demo that could not run: only `error`).
        let failed = runs.iter().filter(|r| r["verified"] != true).count();
        let lost: u64 = runs.iter().filter_map(|r| r["acked_writes_lost"].as_u64()).sum();
        let p50 = median_of(runs, "client_latency_migrating_p50_ms");
        let row = json!({
            "run": config.name,
            "mode": config.mode,
            "checkpoint_interval_ms": config.interval_ms,
            "fail_at": config.fail_at,
            "downtime_ms": median_of(runs, "downtime_ms"),
            "client_max_gap_ms": median_of(runs, "client_max_gap_ms"),
            "client_latency_migrating_p50_ms": p50,
            "client_latency_migrating_p99_ms": median_of(runs, "client_latency_migrating_p99_ms"),
            "latency_p50_vs_postcopy": p50 / plain_p50,
            "total_migration_ms": median_of(runs, "total_migration_ms"),
            "failover_ms": median_of(runs, "failover_ms"),
            "acked_writes_lost": lost,
            "runs_failed": failed,
            "runs": runs,
        });
        md.push_str(&format!(
            "| {} | {:.1} | {} | {} / {} | {:.1}× | {} | {} | {lost} | {failed} |\n",
            config.name,
            row["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            cell(row["client_max_gap_ms"].as_f64().unwrap_or(f64::NAN)),
            cell(p50),
            cell(row["client_latency_migrating_p99_ms"].as_f64().unwrap_or(f64::NAN)),
            p50 / plain_p50,
            cell(row["total_migration_ms"].as_f64().unwrap_or(f64::NAN)),
            cell(row["failover_ms"].as_f64().unwrap_or(f64::NAN)),
        ));
        rows.push(row);
    }
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("kv-ft.md"), &md)?;
    std::fs::write(out.join("kv-ft.json"), serde_json::to_string_pretty(&json!({ "reps": reps, "rows": rows }))?)?;
    println!("{md}");
    eprintln!("bench: wrote {}", out.join("kv-ft.md").display());
    Ok(())
}
