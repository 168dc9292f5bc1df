//! `cargo xtask bench` (PostCopyFT, issue 4): what fault tolerance costs and
//! what it buys, each beside a baseline measured in the same run.
//!
//! 1. Total migration time of postcopy-ft over plain postcopy, per (guest
//!    memory, dirty rate) cell, with the checkpoints sent (goal: within 5%).
//! 2. Guest slowdown by checkpoint interval: the guest's progress at the
//!    destination during post-copy with FT, over plain post-copy's.
//! 3. Failover time by guest memory size (`pcft demo`, the destination
//!    SIGKILLed after checkpoint 2 went out), beside the same run's switchover
//!    downtime (goal: under 50 ms from detection to running at 1 GiB).
//! 4. Failure detection by heartbeat setting, the destination frozen
//!    (SIGSTOP) so that only the heartbeat timeout can tell; a crash (socket
//!    reset) beside it.
//!
//! Results: target/bench/ft.{json,md}, and stdout.

use crate::bench::{migrate_once, output_within, pcft_json, pcft_ok, Agent, PCFT_TIMEOUT};
use crate::bench_dirty::median;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the FT benchmark runs; `--quick` is a 64 MiB smoke run of every part.
struct Plan {
    /// Runs of each configuration, interleaved with its baseline's; tables show medians.
    reps: usize,
    /// Part 1: guest memory sizes, dirty rates of the `dirty` guest (pages/s; None: as fast as it can),
    /// and post-copy push rates (pages/s; None: no limit).
    total_mems: &'static [&'static str],
    total_rates: &'static [(&'static str, Option<u64>)],
    total_push_rates: &'static [(&'static str, Option<u64>)],
    /// Part 2: the guest's memory and the post-copy push rate (pages/s) that
    /// makes post-copy last a few seconds (memory pages / rate).
    slowdown_mem: &'static str,
    slowdown_push_rate: u64,
    /// Part 2: checkpoint intervals, in ms; runs of each (the noisiest part: more of them).
    intervals: &'static [u64],
    slowdown_reps: usize,
    /// Part 3: guest memory sizes.
    failover_mems: &'static [&'static str],
    /// Part 4: the guest's memory, and (heartbeat interval, heartbeat timeout) pairs in ms.
    detection_mem: &'static str,
    heartbeats: &'static [(u64, u64)],
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                reps: 1,
                total_mems: &["64M"],
                total_rates: &[("max", None)],
                total_push_rates: &[("unlimited", None)],
                slowdown_mem: "64M",
                slowdown_push_rate: 16384 / 3,
                intervals: &[50, 200],
                slowdown_reps: 1,
                failover_mems: &["64M"],
                detection_mem: "64M",
                heartbeats: &[(20, 200)],
            }
        } else {
            Plan {
                reps: 5,
                total_mems: &["256M", "1G"],
                total_rates: &[("1k pages/s", Some(1_000)), ("50k pages/s", Some(50_000)), ("max", None)],
                // Capped, post-copy lasts mem / rate (1 s for 256M, 4 s for 1G), long enough for checkpoints.
                total_push_rates: &[("unlimited", None), ("64k pages/s", Some(65_536))],
                slowdown_mem: "256M",
                slowdown_push_rate: 65536 / 4,
                intervals: &[25, 50, 100, 200, 500],
                slowdown_reps: 7,
                failover_mems: &["64M", "256M", "1G"],
                detection_mem: "256M",
                heartbeats: &[(10, 100), (20, 200), (50, 500)],
            }
        }
    }
}

/// One part of the benchmark.
type Measure = fn(&Path, &Plan) -> Result<Part>;

/// One part's results: a markdown section and its raw data.
struct Part {
    md: String,
    json: Value,
}

pub fn run(root: &Path, pcft: &Path, quick: bool) -> Result<()> {
    let plan = Plan::new(quick);
    let mut md = String::from(
        "# PostCopyFT benchmark\n\nEach figure is beside a baseline measured in the same run; both agents \
         share this machine's cores, so checkpoint work at the source competes with the guest too.\n",
    );
    let mut results = serde_json::Map::new();
    let parts: [(&str, &str, Measure); 4] = [
        ("total_time", "part 1 (total migration time)", total_time),
        ("guest_slowdown", "part 2 (guest slowdown)", guest_slowdown),
        ("failover", "part 3 (failover time)", failover_by_mem),
        ("detection", "part 4 (detection time)", detection_by_heartbeat),
    ];
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    for (name, title, measure) in parts {
        let part = measure(pcft, &plan).with_context(|| format!("FT bench, {title}"))?;
        md.push('\n');
        md.push_str(&part.md);
        results.insert(name.to_string(), part.json);
        // After each part, so that a later failure keeps what was measured.
        std::fs::write(dir.join("ft.json"), serde_json::to_string_pretty(&results)?)?;
        std::fs::write(dir.join("ft.md"), &md)?;
    }
    println!("{md}");
    eprintln!("bench: wrote {} and {}", dir.join("ft.md").display(), dir.join("ft.json").display());
    Ok(())
}

// ---- shared ----

fn f64_at(value: &Value, pointer: &str) -> f64 {
    value.pointer(pointer).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn mib(bytes: f64) -> f64 {
    bytes / (1 << 20) as f64
}

/// The run whose `key` is the median (the upper one of an even count).
fn median_run(runs: &[Value], key: impl Fn(&Value) -> f64) -> &Value {
    let mut sorted: Vec<&Value> = runs.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2]
}

fn max_of(runs: &[Value], key: impl Fn(&Value) -> f64) -> f64 {
    runs.iter().map(key).fold(f64::NAN, f64::max)
}

/// What `measure` returns or, when it fails, its error in its place (and on
/// stderr): one failed run (say a false failover on this loaded machine) is a
/// result to report, not a reason to drop the others.
fn run_or_error(what: &str, measure: impl FnOnce() -> Result<Value>) -> Value {
    measure().unwrap_or_else(|e| {
        eprintln!("bench ft: {what} failed: {e:#}");
        json!({ "error": format!("{what}: {e:#}") })
    })
}

/// The runs that measured something; an error if none did.
fn measured(runs: &[Value]) -> Result<Vec<Value>> {
    let ok: Vec<Value> = runs.iter().filter(|r| r.get("error").is_none()).cloned().collect();
    if ok.is_empty() {
        bail!("every run failed; the first: {}", runs.first().map(|r| r["error"].to_string()).unwrap_or_default());
    }
    Ok(ok)
}

fn failed(runs: &[Value]) -> usize {
    runs.iter().filter(|r| r.get("error").is_some()).count()
}

/// `pcft demo ARGS --json`, bounded; its report even when the run failed
/// verification (pcft then exits 1 but still prints the report).
fn demo(pcft: &Path, args: &[&str]) -> Result<Value> {
    let out = output_within(Command::new(pcft).arg("demo").args(args).arg("--json"), PCFT_TIMEOUT)?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "pcft demo {} printed no report ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

// ---- part 1: total migration time, with and without FT ----

fn total_time(pcft: &Path, plan: &Plan) -> Result<Part> {
    let mut cells = Vec::new();
    let steps = plan.total_push_rates.len() * plan.total_mems.len() * plan.total_rates.len() * plan.reps * 2;
    let mut progress = crate::progress::Progress::new(steps as u64);
    for (push_name, push_rate) in plan.total_push_rates {
        let push_text = push_rate.map(|r| r.to_string());
        let migrate_args: Vec<&str> = push_text.iter().flat_map(|r| ["--postcopy-rate", r.as_str()]).collect();
        for mem in plan.total_mems {
            for (rate_name, rate) in plan.total_rates {
                let (mut plain, mut ft) = (Vec::new(), Vec::new());
                for rep in 1..=plan.reps {
                    for (mode, runs) in [("postcopy", &mut plain), ("postcopy-ft", &mut ft)] {
                        progress.step(format!(
                            "ft: total time, {mode}, {mem}, dirty {rate_name}, push {push_name}, run {rep}/{}",
                            plan.reps
                        ));
                        let what = format!("{mode} migration of a {mem} guest dirtying {rate_name}, push {push_name}");
                        runs.push(run_or_error(&what, || migrate_once(pcft, mode, mem, *rate, &migrate_args)));
                    }
                }
                cells.push(total_time_cell(push_name, mem, rate_name, plain, ft)?);
            }
        }
    }
    let mut md = String::from(
        "## Total migration time, with and without FT\n\n\
         The `dirty` guest (1 vCPU, all its memory as working set), default FT settings (checkpoint every 100 ms), \
         post-copy push unlimited or capped. `FT / plain` is the median postcopy-ft total time over the median \
         postcopy one (goal: at most 1.05); `per pair` is the range of each FT run over the plain run just before it. \
         Checkpoints: those of the median FT run. Failed: runs that failed (in ft.json), left out.\n\n\
         | post-copy push | mem | guest dirty rate | postcopy ms | postcopy-ft ms | FT / plain | per pair | checkpoints committed | pages committed | checkpoint MiB received | failed |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in &cells {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.2}–{:.2} | {} | {} | {:.1} | {} |\n",
            c["push"].as_str().unwrap_or(""),
            c["mem"].as_str().unwrap_or(""),
            c["dirty_rate"].as_str().unwrap_or(""),
            f64_at(c, "/postcopy_ms"),
            f64_at(c, "/postcopy_ft_ms"),
            f64_at(c, "/ft_over_plain"),
            f64_at(c, "/pair_ratio_min"),
            f64_at(c, "/pair_ratio_max"),
            c["checkpoints"]["committed"],
            c["checkpoints"]["pages"],
            mib(f64_at(c, "/checkpoints/bytes")),
            c["failed_runs"],
        ));
    }
    Ok(Part { md, json: json!({ "cells": cells }) })
}

fn total_time_cell(push: &str, mem: &str, rate_name: &str, plain: Vec<Value>, ft: Vec<Value>) -> Result<Value> {
    let total = |r: &Value| f64_at(r, "/total_migration_ms");
    let plain_ms = total(median_run(&measured(&plain)?, total));
    let measured_ft = measured(&ft)?;
    let ft_median = median_run(&measured_ft, total);
    let ft_ms = total(ft_median);
    // Each FT run over the plain run just before it: how much the ratio moves from run to run
    // (a failed run gives NaN, which min and max pass over).
    let pair_ratios: Vec<f64> = plain.iter().zip(&ft).map(|(p, f)| total(f) / total(p)).collect();
    Ok(json!({
        "push": push, "mem": mem, "dirty_rate": rate_name,
        "postcopy_ms": plain_ms, "postcopy_ft_ms": ft_ms, "ft_over_plain": ft_ms / plain_ms,
        "pair_ratio_min": pair_ratios.iter().copied().fold(f64::NAN, f64::min),
        "pair_ratio_max": pair_ratios.iter().copied().fold(f64::NAN, f64::max),
        "checkpoints": {
            "committed": ft_median["checkpoints_committed"],
            "pages": ft_median["checkpoint_pages"],
            "bytes": ft_median["checkpoint_bytes"],
        },
        "failed_runs": failed(&plain) + failed(&ft),
        "postcopy_runs": plain, "postcopy_ft_runs": ft,
    }))
}

// ---- part 2: guest slowdown by checkpoint interval ----

/// The guest of part 2: the `dirty` fixture writing random pages of its working
/// set as fast as it can, and emitting an output record every `RECORD_EVERY` writes.
const SLOWDOWN_WORKING_SET: &str = "16M";
const RECORD_EVERY: u64 = 500;
/// How often the destination's record count is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long the guest's progress is measured at the source just before it migrates.
const BEFORE_MIGRATION: Duration = Duration::from_secs(1);

fn guest_slowdown(pcft: &Path, plan: &Plan) -> Result<Part> {
    // None: plain post-copy, the baseline; Some(ms): postcopy-ft with that checkpoint interval.
    let configs: Vec<Option<u64>> = std::iter::once(None).chain(plan.intervals.iter().copied().map(Some)).collect();
    let reps = plan.slowdown_reps;
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); configs.len()];
    let mut progress = crate::progress::Progress::new((reps * configs.len()) as u64);
    for rep in 1..=reps {
        for (config, runs) in configs.iter().zip(&mut runs) {
            progress.step(format!("ft: guest slowdown, {}, run {rep}/{reps}", config_name(*config)));
            let what = format!("guest progress during {}", config_name(*config));
            runs.push(run_or_error(&what, || {
                progress_during_postcopy(pcft, plan.slowdown_mem, plan.slowdown_push_rate, *config)
            }));
        }
    }
    let relative = |r: &Value| f64_at(r, "/relative_progress");
    let baseline = median(measured(&runs[0])?.iter().map(relative).collect());
    let mut md = format!(
        "## Guest slowdown by checkpoint interval\n\n\
         Guest progress at the destination while post-copy runs: the `dirty` guest ({}, 1 vCPU, random writes \
         over a {SLOWDOWN_WORKING_SET} working set as fast as it can, a record every {RECORD_EVERY} writes), \
         its record count read with `pcft vm status` every {} ms at the destination while the VM is \
         `migrating-in`; post-copy push capped at {} pages/s so that the window lasts a few seconds. \
         Writes/s is the slope over that window. So that a change in this shared machine's load between runs \
         does not count, each run also measures the guest at the source for {} s just before it migrates: \
         `of before` is the post-copy rate over that one. `vs postcopy` is the median `of before` with FT \
         over plain post-copy's (medians of {reps} runs, interleaved). Checkpoints, and the guest's checkpoint \
         pauses (from the destination's `pcft_checkpoint_pause_seconds` metric; paused share: of the total \
         migration time): of the median run. Failed: runs that failed (in ft.json), left out.\n\n\
         | mode | checkpoint interval ms | guest writes/s | of before | vs postcopy | window s | checkpoints committed | pages committed | checkpoint MiB received | mean pause ms | paused share | failed |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        plan.slowdown_mem,
        SAMPLE_EVERY.as_millis(),
        plan.slowdown_push_rate,
        BEFORE_MIGRATION.as_secs_f64(),
    );
    let mut rows = Vec::new();
    for (config, runs) in configs.iter().zip(runs) {
        let measured = measured(&runs).with_context(|| config_name(*config))?;
        let vs_postcopy = median(measured.iter().map(relative).collect()) / baseline;
        md.push_str(&slowdown_line(*config, &measured, failed(&runs), vs_postcopy));
        rows.push(json!({ "checkpoint_interval_ms": config, "vs_postcopy": vs_postcopy, "runs": runs }));
    }
    Ok(Part { md, json: json!({ "working_set": SLOWDOWN_WORKING_SET, "record_every": RECORD_EVERY, "rows": rows }) })
}

/// A table line from the runs that measured something (`failed` did not).
fn slowdown_line(checkpoint_interval: Option<u64>, runs: &[Value], failed: usize, vs_postcopy: f64) -> String {
    let relative = |r: &Value| f64_at(r, "/relative_progress");
    let typical = median_run(runs, relative);
    let mean_pause_ms = f64_at(typical, "/checkpoint_paused_s") * 1e3 / f64_at(typical, "/checkpoint_pauses");
    format!(
        "| {} | {} | {:.0} | {:.3} | {vs_postcopy:.3} | {:.2} | {} | {} | {:.1} | {} | {:.1}% | {failed} |\n",
        if checkpoint_interval.is_some() { "postcopy-ft" } else { "postcopy" },
        checkpoint_interval.map_or("—".to_string(), |ms| ms.to_string()),
        median(runs.iter().map(|r| f64_at(r, "/steps_per_s")).collect()),
        relative(typical),
        f64_at(typical, "/window_s"),
        typical["report"]["checkpoints_committed"],
        typical["report"]["checkpoint_pages"],
        mib(f64_at(typical, "/report/checkpoint_bytes")),
        if mean_pause_ms.is_finite() { format!("{mean_pause_ms:.2}") } else { "—".into() },
        f64_at(typical, "/paused_share") * 100.0,
    )
}

fn config_name(checkpoint_interval: Option<u64>) -> String {
    match checkpoint_interval {
        None => "postcopy".into(),
        Some(ms) => format!("postcopy-ft, checkpoint every {ms} ms"),
    }
}

/// One post-copy migration of the part-2 guest (`checkpoint_interval` None:
/// plain post-copy) with the guest's progress sampled at the destination.
fn progress_during_postcopy(pcft: &Path, mem: &str, push_rate: u64, checkpoint_interval: Option<u64>) -> Result<Value> {
    let (src, dst) = (Agent::start(pcft, "source")?, Agent::start_with_metrics(pcft, "destination")?);
    let record_every = RECORD_EVERY.to_string();
    let start = ["vm", "start", "--agent", src.addr(), "--name", "bench", "--fixture", "dirty", "--mem", mem];
    let workload = ["--forever", "--working-set", SLOWDOWN_WORKING_SET, "--record-every", &record_every];
    pcft_ok(pcft, &[&start[..], &workload[..]].concat(), PCFT_TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = steps_per_s_at_source(pcft, src.addr()).context("the guest's progress before the migration")?;
    let (push_rate, interval) = (push_rate.to_string(), checkpoint_interval.map(|ms| ms.to_string()));
    let mut migrate = vec!["migrate", "bench", "--agent", src.addr(), "--to", dst.addr(), "--json"];
    migrate.extend(["--postcopy-rate", &push_rate]);
    match &interval {
        None => migrate.extend(["--mode", "postcopy"]),
        Some(ms) => migrate.extend(["--mode", "postcopy-ft", "--checkpoint-interval", ms]),
    }
    let (samples, report) = std::thread::scope(|scope| -> Result<_> {
        let migration = scope.spawn(|| pcft_json(pcft, &migrate, PCFT_TIMEOUT));
        let samples = sample_records(pcft, dst.addr(), || migration.is_finished());
        let report = migration.join().expect("the migration thread panicked")?;
        Ok((samples?, report))
    })?;
    let window = PostcopyWindow::from_samples(&samples)?;
    let (pauses, paused_s) = checkpoint_pauses(&dst).context("reading the destination's checkpoint pauses")?;
    let steps_per_s = window.records_per_s() * RECORD_EVERY as f64;
    Ok(json!({
        "checkpoint_interval_ms": checkpoint_interval,
        "steps_per_s": steps_per_s, "source_steps_per_s": before, "relative_progress": steps_per_s / before,
        "window_s": window.seconds(), "samples": samples.len(),
        "checkpoint_pauses": pauses, "checkpoint_paused_s": paused_s,
        "paused_share": paused_s / (f64_at(&report, "/total_migration_ms") / 1e3),
        "report": report,
    }))
}

/// The checkpoint pauses of the guest at `destination`, from its metrics: how many, and their total in seconds.
fn checkpoint_pauses(destination: &Agent) -> Result<(u64, f64)> {
    let addr = destination.metrics_addr().context("the agent serves no metrics")?;
    let metrics = http_get(addr, "/metrics")?;
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .with_context(|| format!("no {name} in the metrics of {addr}"))
    };
    Ok((value("pcft_checkpoint_pause_seconds_count")? as u64, value("pcft_checkpoint_pause_seconds_sum")?))
}

/// The body of `GET http://{addr}{path}`, which must answer 200.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).with_context(|| format!("reading http://{addr}{path}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if head.split_whitespace().nth(1) != Some("200") {
        bail!("http://{addr}{path} answered {:?}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// One reading of the VM's state at the destination.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Seconds since sampling began, when the reading came back.
    at_s: f64,
    /// Whether the VM was still being received (post-copy) and already running there.
    in_postcopy: bool,
    records: u64,
}

/// The bench VM's phase and record count on the agent at `agent` (None: no such VM there yet).
fn vm_records(pcft: &Path, agent: &str) -> Result<Option<(String, u64)>> {
    let status = pcft_json(pcft, &["vm", "status", "--agent", agent, "--json"], Duration::from_secs(10))?;
    let vm = status["vms"].as_array().and_then(|vms| vms.iter().find(|vm| vm["name"] == "bench"));
    Ok(vm.map(|vm| (vm["phase"].as_str().unwrap_or("").to_string(), vm["records"].as_u64().unwrap_or(0))))
}

/// The guest's writes per second at the source, over `BEFORE_MIGRATION`.
fn steps_per_s_at_source(pcft: &Path, source: &str) -> Result<f64> {
    let records = || -> Result<(Instant, u64)> {
        let (_, records) = vm_records(pcft, source)?.context("the VM is not on the source agent")?;
        Ok((Instant::now(), records))
    };
    let (t0, r0) = records()?;
    std::thread::sleep(BEFORE_MIGRATION);
    let (t1, r1) = records()?;
    Ok((r1 - r0) as f64 * RECORD_EVERY as f64 / (t1 - t0).as_secs_f64())
}

/// Reads the VM's record count at the destination every `SAMPLE_EVERY` until `done()`.
fn sample_records(pcft: &Path, destination: &str, done: impl Fn() -> bool) -> Result<Vec<Sample>> {
    let started = Instant::now();
    let mut samples = Vec::new();
    while !done() {
        if started.elapsed() > PCFT_TIMEOUT {
            bail!("the migration did not end within {} s", PCFT_TIMEOUT.as_secs());
        }
        let asked = Instant::now();
        let vm = vm_records(pcft, destination)?;
        let at_s = started.elapsed().as_secs_f64();
        if let Some((phase, records)) = vm {
            // No record yet: the VM does not run there yet (the count comes from its runner).
            let in_postcopy = phase == "migrating-in" && records > 0;
            samples.push(Sample { at_s, in_postcopy, records });
        }
        std::thread::sleep(SAMPLE_EVERY.saturating_sub(asked.elapsed()));
    }
    Ok(samples)
}

/// The first and the last sample taken while the VM ran at the destination in post-copy.
struct PostcopyWindow {
    first: Sample,
    last: Sample,
}

impl PostcopyWindow {
    fn from_samples(samples: &[Sample]) -> Result<PostcopyWindow> {
        let mut inside = samples.iter().filter(|s| s.in_postcopy);
        let (Some(first), Some(last)) = (inside.next().copied(), inside.next_back().copied()) else {
            bail!("fewer than 2 samples of the guest in post-copy: raise the guest memory or lower the push rate");
        };
        let window = PostcopyWindow { first, last };
        if window.seconds() < 1.0 {
            bail!("the post-copy window lasted {:.2} s, too short to measure: lower the push rate", window.seconds());
        }
        Ok(window)
    }

    fn seconds(&self) -> f64 {
        self.last.at_s - self.first.at_s
    }

    fn records_per_s(&self) -> f64 {
        (self.last.records - self.first.records) as f64 / self.seconds()
    }
}

// ---- part 3: failover time by guest memory size ----

fn failover_by_mem(pcft: &Path, plan: &Plan) -> Result<Part> {
    let mut rows = Vec::new();
    let mut md = format!(
        "## Failover time by guest memory size\n\n\
         `pcft demo --fail-at epoch:2` (the `ledger` guest, 2 vCPUs; the destination SIGKILLs itself once \
         checkpoint 2's pages went out, before its commit record, so the source detects a closed socket and \
         restores the last committed checkpoint, 1). \
         Failover: from detection to the guest running at the source (goal: under 50 ms at 1 GiB); \
         `failover / switchover` is over the same run's post-copy switchover downtime. Median of {} runs.\n\n\
         | mem | failover ms (median) | failover ms (max) | fence wait ms | switchover downtime ms | failover / switchover | detection ms | restored epoch | recovered & verified | max < 50 ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---|---:|---|\n",
        plan.reps
    );
    let mut progress = crate::progress::Progress::new((plan.failover_mems.len() * plan.reps) as u64);
    for mem in plan.failover_mems {
        let mut runs = Vec::new();
        for rep in 1..=plan.reps {
            progress.step(format!("ft: failover, {mem}, run {rep}/{}", plan.reps));
            runs.push(demo(pcft, &["--mem", mem, "--fail-at", "epoch:2"])?);
        }
        md.push_str(&failover_line(mem, &runs));
        rows.push(json!({ "mem": mem, "runs": runs }));
    }
    Ok(Part { md, json: json!({ "rows": rows }) })
}

fn failover_line(label: &str, runs: &[Value]) -> String {
    let failover = |r: &Value| f64_at(r, "/failover_ms");
    let typical = median_run(runs, failover);
    let (median_ms, max_ms) = (failover(typical), max_of(runs, failover));
    let switchover = median(runs.iter().map(|r| f64_at(r, "/downtime_ms")).collect());
    format!(
        "| {label} | {median_ms:.2} | {max_ms:.2} | {:.2} | {switchover:.2} | {:.2} | {:.1} | {} | {} | {} |\n",
        f64_at(typical, "/failover/fence_wait_ms"),
        median_ms / switchover,
        f64_at(typical, "/failure/detection_ms"),
        restored_epochs(runs),
        recovered_and_verified(runs),
        if max_ms < 50.0 { "yes" } else { "no" },
    )
}

/// The restored epochs of the runs, e.g. `1, 1, 2`.
fn restored_epochs(runs: &[Value]) -> String {
    runs.iter().map(|r| r["restored_epoch"].to_string()).collect::<Vec<_>>().join(", ")
}

/// How many runs recovered the VM and verified it, e.g. `3/3`.
fn recovered_and_verified(runs: &[Value]) -> String {
    let ok = runs.iter().filter(|r| r["recovered"] == true && r["verified"] == true).count();
    format!("{ok}/{}", runs.len())
}

// ---- part 4: detection time by heartbeat setting ----

fn detection_by_heartbeat(pcft: &Path, plan: &Plan) -> Result<Part> {
    // The baseline: a crashed destination, whose socket resets at once (default heartbeats).
    let mut cases: Vec<(&str, Option<(u64, u64)>)> = vec![("crash", None)];
    cases.extend(plan.heartbeats.iter().map(|&pair| ("freeze", Some(pair))));
    let mut md = format!(
        "## Failure detection by heartbeat setting\n\n\
         `pcft demo --mem {} --fail-at epoch:2 --fail-kind freeze`: the destination SIGSTOPs itself once checkpoint 2's \
         pages went out; its socket stays open, so only heartbeat silence tells. A crash (SIGKILL: the socket resets) with \
         the default heartbeats is the baseline. Detection: from the last word heard from the destination to the \
         source declaring it lost (`vs timeout`: over the heartbeat timeout); detected at: from the migration's start. \
         Failover includes waiting out the destination's lease (fence wait). Median of {} runs.\n\n\
         | failure | heartbeat interval ms | heartbeat timeout ms | detection ms (median) | detection ms (max) | vs timeout | detected at ms | failover ms | fence wait ms | detected as | fenced & verified |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n",
        plan.detection_mem, plan.reps
    );
    let mut rows = Vec::new();
    let mut progress = crate::progress::Progress::new((cases.len() * plan.reps) as u64);
    for (kind, heartbeats) in cases {
        let mut args = vec!["--mem", plan.detection_mem, "--fail-at", "epoch:2", "--fail-kind", kind];
        let (interval, timeout) = heartbeats.unwrap_or((DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_HEARTBEAT_TIMEOUT_MS));
        let (interval_text, timeout_text) = (interval.to_string(), timeout.to_string());
        args.extend(["--heartbeat-interval", &interval_text, "--heartbeat-timeout", &timeout_text]);
        let mut runs = Vec::new();
        for rep in 1..=plan.reps {
            progress.step(format!("ft: detection, {kind}, heartbeat {interval}/{timeout} ms, run {rep}/{}", plan.reps));
            runs.push(demo(pcft, &args)?);
        }
        md.push_str(&detection_line(kind, interval, timeout, &runs));
        rows.push(json!({
            "fail_kind": kind, "heartbeat_interval_ms": interval, "heartbeat_timeout_ms": timeout, "runs": runs,
        }));
    }
    Ok(Part { md, json: json!({ "rows": rows }) })
}

/// pcft's defaults (`pcft migrate --help`), for the crash baseline.
const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 20;
const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 200;

fn detection_line(kind: &str, interval: u64, timeout: u64, runs: &[Value]) -> String {
    let detection = |r: &Value| f64_at(r, "/failure/detection_ms");
    let typical = median_run(runs, detection);
    let detected_as: Vec<String> =
        runs.iter().map(|r| r["failure"]["kind"].as_str().unwrap_or("none").to_string()).collect();
    // A crashed destination is not checked for fencing (destination_fenced is null).
    let ok = runs.iter().filter(|r| r["verified"] == true && r["destination_fenced"] != false).count();
    format!(
        "| {kind} | {interval} | {timeout} | {:.1} | {:.1} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {ok}/{} |\n",
        detection(typical),
        max_of(runs, detection),
        detection(typical) / timeout as f64,
        f64_at(typical, "/failure/detected_at_ms"),
        f64_at(typical, "/failover_ms"),
        f64_at(typical, "/failover/fence_wait_ms"),
        tally(detected_as),
        runs.len(),
    )
}

/// Distinct values in first-seen order with how often each came, e.g. `crash ×4, freeze ×1`.
fn tally(values: Vec<String>) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(seen, _)| *seen == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    counts.iter().map(|(v, n)| format!("{v} ×{n}")).collect::<Vec<_>>().join(", ")
}
