//! `cargo xtask bench` (dirty tracking): guest write throughput with no
//! tracking, the KVM bitmap, the KVM dirty ring and the eBPF tracker, side by
//! side in one run, as a ratio to the untracked run; and the cost of one
//! take-and-clear (a checkpoint epoch's) by working-set size. Each tracked run
//! takes its dirty set every 100 ms, as PostCopyFT checkpoints do. Last, what
//! a live dirty rate costs: each tracker with logging on or off, its rate
//! sampled once a second or not (the `dirty_rate` bench of pcft-agent), as a
//! ratio to the untracked run of that same bench run.
//! Results: target/bench/dirty.{md,json}, and stdout.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// One `pcft vm run` of the `dirty` fixture; returns (elapsed ms, the take line if any).
fn run_once(
    pcft: &Path,
    mem: &str,
    ws: &str,
    steps: u64,
    pattern: &str,
    tracker: Option<&str>,
) -> Result<(f64, Value)> {
    let steps = steps.to_string();
    let mut cmd = Command::new(pcft);
    cmd.args(["vm", "run", "--fixture", "dirty", "--mem", mem, "--working-set", ws, "--steps", &steps]).args([
        "--pattern",
        pattern,
        "--json",
    ]);
    match tracker {
        Some(t) => cmd.args(["--dirty-tracker", t, "--take-dirty-every", "100"]),
        // Untracked: the bitmap (whose logging stays off without takes), not the default auto.
        None => cmd.args(["--dirty-tracker", "bitmap"]),
    };
    let out = cmd.output().context("cannot run pcft vm run")?;
    if !out.status.success() {
        bail!("pcft vm run failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut elapsed = None;
    let mut takes = Value::Null;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        match v["event"].as_str() {
            Some("finished") if v["verified"] == true => elapsed = v["elapsed_ms"].as_f64(),
            Some("dirty-takes") => takes = v,
            _ => {}
        }
    }
    Ok((elapsed.context("the run did not verify")?, takes))
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(root: &Path, pcft: &Path, quick: bool) -> Result<()> {
    let trackers: [Option<&str>; 4] = [None, Some("bitmap"), Some("ring"), Some("ebpf")];
    let (steps, reps) = if quick { (100_000u64, 1) } else { (400_000u64, 3) };
    let mut rows = Vec::new();
    let mut md = String::from(
        "# Dirty tracking benchmark\n\nGuest write throughput of the `dirty` fixture (256M, 1 vCPU, 64 MiB working set), \
         with each tracker taking its dirty set every 100 ms; median of the runs, interleaved. \
         `vs none` is throughput over the untracked run's in the same bench run.\n\n\
         | pattern | tracker | pages/s | vs none | takes | mean take µs | max take µs |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    let sizes: &[(&str, &str)] =
        if quick { &[("64M", "256M")] } else { &[("16M", "256M"), ("64M", "256M"), ("256M", "512M")] };
    let patterns = ["sequential", "random"];
    let mut progress =
        crate::progress::Progress::new((patterns.len() * reps * trackers.len() + sizes.len() * 3 + 1) as u64);
    for pattern in patterns {
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); trackers.len()];
        let mut last_takes: Vec<Value> = vec![Value::Null; trackers.len()];
        for rep in 0..reps {
            for (i, tracker) in trackers.iter().enumerate() {
                progress.step(format!("dirty: {pattern}, {}, run {}/{reps}", tracker.unwrap_or("none"), rep + 1));
                let (ms, takes) = run_once(pcft, "256M", "64M", steps, pattern, *tracker)?;
                times[i].push(ms);
                last_takes[i] = takes;
            }
        }
        let base = steps as f64 / (median(times[0].clone()) / 1e3);
        for (i, tracker) in trackers.iter().enumerate() {
            let rate = steps as f64 / (median(times[i].clone()) / 1e3);
            let t = &last_takes[i];
            let n = t["takes"].as_f64().unwrap_or(0.0);
            let mean = if n > 0.0 { t["take_us_total"].as_f64().unwrap_or(0.0) / n } else { f64::NAN };
            let name = tracker.unwrap_or("none");
            md.push_str(&format!(
                "| {pattern} | {name} | {rate:.0} | {:.3} | {} | {mean:.0} | {} |\n",
                rate / base,
                t["takes"],
                t["take_us_max"]
            ));
            rows.push(json!({"kind": "throughput", "pattern": pattern, "tracker": name, "pages_per_s": rate,
                             "vs_none": rate / base, "runs_ms": times[i], "takes": t}));
        }
    }
    md.push_str(
        "\nCost of one take-and-clear by working-set size (random writes, 1 vCPU; mean over the run's takes).\n\n\
         | working set | tracker | takes | pages per take | mean take µs | max take µs |\n|---|---|---:|---:|---:|---:|\n",
    );
    for (ws, mem) in sizes {
        for tracker in ["bitmap", "ring", "ebpf"] {
            progress.step(format!("dirty: take cost, {ws} working set, {tracker}"));
            let (_, t) = run_once(pcft, mem, ws, steps / 2, "random", Some(tracker))?;
            let n = t["takes"].as_f64().unwrap_or(0.0).max(1.0);
            let per_take = t["pages"].as_f64().unwrap_or(0.0) / n;
            let mean = t["take_us_total"].as_f64().unwrap_or(0.0) / n;
            md.push_str(&format!(
                "| {ws} | {tracker} | {} | {per_take:.0} | {mean:.0} | {} |\n",
                t["takes"], t["take_us_max"]
            ));
            rows.push(json!({"kind": "take_cost", "working_set": ws, "tracker": tracker, "takes": t}));
        }
    }
    progress.step("dirty: the cost of a live dirty rate");
    sampling_cost(root, quick, &mut md, &mut rows)?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("dirty.json"), serde_json::to_string_pretty(&json!({ "runs": rows }))?)?;
    std::fs::write(dir.join("dirty.md"), &md)?;
    println!("{md}");
    eprintln!("bench: wrote {} and {}", dir.join("dirty.md").display(), dir.join("dirty.json").display());
    Ok(())
}

/// Runs pcft-agent's `dirty_rate` bench (in-process machines, so that a rate
/// can be sampled as a VM's runner does) and tabulates it.
fn sampling_cost(root: &Path, quick: bool, md: &mut String, rows: &mut Vec<Value>) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["bench", "-p", "pcft-agent", "--bench", "dirty_rate", "--"]).current_dir(root);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output().context("cannot run the dirty_rate bench")?;
    if !out.status.success() {
        bail!("the dirty_rate bench failed");
    }
    md.push_str(
        "\nCost of a live dirty rate (random writes over 64 MiB, 1 vCPU, no takes): each tracker with its \
         logging on or off and its rate sampled once a second or not. `vs untracked` is throughput over \
         the bitmap with logging off in the same bench run.\n\n\
         | tracker | logging | sampled | pages/s | vs untracked | samples | mean sample µs | max sample µs |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if v["kind"] != "sampling" {
            continue;
        }
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.3} | {} | {:.0} | {:.0} |\n",
            v["tracker"].as_str().unwrap_or("?"),
            if v["logging"] == true { "on" } else { "off" },
            if v["sampled"] == true { "yes" } else { "no" },
            v["pages_per_s"].as_f64().unwrap_or(0.0),
            v["vs_untracked"].as_f64().unwrap_or(0.0),
            v["samples"],
            v["mean_sample_us"].as_f64().unwrap_or(0.0),
            v["max_sample_us"].as_f64().unwrap_or(0.0),
        ));
        rows.push(v);
    }
    Ok(())
}
