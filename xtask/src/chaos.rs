//! `cargo xtask chaos`: the fault-injection suite. Many PostCopyFT demos in a
//! row, each failing at a random point in a random way: the destination is
//! SIGKILLed (`crash`), SIGSTOPped past its lease (`freeze`), cut off by a
//! network partition between two network namespaces (`partition`), reached
//! over a lossy, slow link (`lossy`), or stalls its checkpoints while it still
//! heartbeats (`stall`), has its migration connection reset while both agents
//! live (`reset`, on the source's side, the destination's or both, at random),
//! or goes silent while its vCPU threads and lease watchdog stall past its
//! lease (`stall-fence`); or the source is starved of CPU (`slow-source`) or
//! stages its checkpoints on a slow disk (`slow-disk`, from the start).
//! Lossy, slow-source and slow-disk runs get a random severity. Every run must end with
//! the guest verified against its oracle wherever it finished, no released
//! output lost or contradicted, for every kind but crash the destination's
//! copy fenced if the source recovered the VM, the two copies never in the
//! guest at once (`copies_overlap_ms` 0, from both agents' KVM_RUN run logs),
//! and exactly one copy at the end (`copies_at_end` 1, or the documented
//! `finish-unconfirmed`). Results: target/chaos/chaos.{md,json}, and stdout.
//!
//! Half the runs (`--fixture both`, the default) use the `kv` guest instead: a
//! key-value server on the demo's client network, its clients writing and
//! reading for the whole run. Such a run must also keep the clients' history
//! (the demo's Jepsen-style check): no acknowledged write lost, no stale
//! read, the store holding exactly what the clients read back, and the VM
//! serving where it ended. Runs alternate between the guests so that over 60
//! runs every kind of failure hits each.

use crate::bench::output_within;
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Longest a single demo may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The kinds of failure, in the order runs cycle through them: per 30 runs,
/// 9 crashes, 4 freezes, 4 partitions, 3 lossy links, 3 resets, 2 slow
/// sources, 2 stalls, 2 stall-fences, 1 slow disk (a short run of 8 has every
/// kind but stall and slow-disk).
const KINDS: [&str; 30] = [
    "crash",
    "reset",
    "freeze",
    "stall-fence",
    "partition",
    "lossy",
    "crash",
    "slow-source",
    "crash",
    "stall",
    "freeze",
    "reset",
    "crash",
    "partition",
    "slow-disk",
    "lossy",
    "crash",
    "stall-fence",
    "freeze",
    "partition",
    "crash",
    "slow-source",
    "reset",
    "crash",
    "lossy",
    "freeze",
    "partition",
    "crash",
    "stall",
    "crash",
];

/// All the kinds, in the order of the results table.
const TABLE: [&str; 9] =
    ["crash", "freeze", "partition", "lossy", "reset", "slow-source", "stall", "stall-fence", "slow-disk"];

/// lossy: packet loss each way, in %, and delay, in ms (picked at random).
const LOSS_PCT: [u32; 4] = [2, 10, 30, 60];
const DELAY_MS: [u64; 3] = [10, 40, 100];
/// slow-source: the source agent's CPU quota, in % of one CPU.
const SOURCE_CPU_PCT: [u32; 4] = [2, 5, 10, 25];
/// slow-disk: how much longer each write to the source's staging file takes, in ms.
const DISK_DELAY_MS: [u64; 3] = [5, 20, 50];
/// stall: the source's --checkpoint-timeout, in ms (5 checkpoint intervals).
const STALL_CHECKPOINT_TIMEOUT_MS: u64 = 500;
/// reset: whose packets are answered with TCP resets (picked at random).
const RESET_SIDES: [&str; 3] = ["source", "destination", "both"];

/// A small pseudo-random generator (splitmix64) seeded from the clock: the
/// severities need variety, not quality. The seed goes into chaos.json.
struct Rng(u64);

impl Rng {
    fn from_clock() -> Rng {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        Rng(nanos as u64)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// A run's failure: its kind, and the demo arguments of its severity.
struct Plan {
    kind: &'static str,
    /// The guest: ledger or kv.
    fixture: &'static str,
    args: Vec<String>,
    /// For the table, e.g. "10% / 40 ms" (lossy) or "5% CPU" (slow-source); empty otherwise.
    severity: String,
}

/// The guest of run `i` for `--fixture which`: with `both`, ledger and kv
/// alternate, starting with the other one in every second cycle of `KINDS`.
fn fixture_of(i: usize, which: &str) -> &'static str {
    match which {
        "ledger" => "ledger",
        "kv" => "kv",
        _ if (i / KINDS.len() + i) % 2 == 1 => "kv",
        _ => "ledger",
    }
}

fn plan(kind: &'static str, fixture: &'static str, rng: &mut Rng) -> Plan {
    let (args, severity) = severity_args(kind, rng);
    Plan { kind, fixture, args, severity }
}

/// The demo arguments of a `kind` of failure at a random severity, and the severity in words.
fn severity_args(kind: &str, rng: &mut Rng) -> (Vec<String>, String) {
    match kind {
        "lossy" => {
            let (loss, delay) = (rng.pick(&LOSS_PCT), rng.pick(&DELAY_MS));
            let args = vec!["--loss".into(), loss.to_string(), "--delay-ms".into(), delay.to_string()];
            (args, format!("{loss}% / {delay} ms"))
        }
        "slow-source" => {
            let cpu = rng.pick(&SOURCE_CPU_PCT);
            (vec!["--source-cpu-pct".into(), cpu.to_string()], format!("{cpu}% CPU"))
        }
        "slow-disk" => {
            let delay = rng.pick(&DISK_DELAY_MS);
            (vec!["--disk-delay-ms".into(), delay.to_string()], format!("{delay} ms a write"))
        }
        "reset" => {
            let side = rng.pick(&RESET_SIDES);
            (vec!["--reset-side".into(), side.into()], format!("{side} side"))
        }
        // The source's checkpoint timeout (3 s by default) outlasts this guest's
        // post-copy: shorter, so that a stall is detected before the migration ends.
        "stall" => (vec!["--checkpoint-timeout".into(), STALL_CHECKPOINT_TIMEOUT_MS.to_string()], String::new()),
        _ => (Vec::new(), String::new()),
    }
}

/// One demo run: its report, or why it produced none.
fn run_once(pcft: &Path, plan: &Plan) -> Value {
    let mut args = vec!["demo", "--fixture", plan.fixture, "--mem", "64M", "--postcopy-rate", "4096"];
    if plan.fixture == "ledger" {
        args.extend(["--vcpus", "2", "--steps", "40000"]);
    }
    args.extend(["--fail-at", "random", "--fail-kind", plan.kind, "--json"]);
    match output_within(Command::new(pcft).args(args).args(&plan.args), RUN_TIMEOUT) {
        Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            json!({ "error": format!("no report ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()) })
        }),
        Err(e) => json!({ "error": format!("{e:#}") }),
    }
}

/// What went wrong in a run (nothing: it held): not verified, output lost,
/// (but for a crash, which leaves nothing to fence) the destination not fenced
/// though the source recovered, the two copies in the guest at once, or not
/// exactly one copy at the end (unless the failure is `finish-unconfirmed`),
/// or a duplicate outside a failover's window (a record the source knew had
/// gone out, released again).
fn violations(kind: &str, report: &Value) -> Vec<String> {
    if report.get("verified").is_none() {
        return vec![report["error"].as_str().unwrap_or("no report").to_string()];
    }
    let mut wrong = Vec::new();
    if report["verified"] != true {
        wrong.push(format!("not verified ({})", report["error"].as_str().unwrap_or("see the report")));
    }
    if report["lost_released_outputs"] != 0 {
        wrong.push(format!("{} released outputs lost or contradicted", report["lost_released_outputs"]));
    }
    let duplicates = report["duplicate_released_outputs"].as_u64().unwrap_or(0);
    let in_window = report["duplicate_released_outputs_in_window"].as_u64().unwrap_or(0);
    if duplicates > in_window {
        wrong.push(format!(
            "{} duplicate released outputs outside the failover's window (released again though known to have gone out)",
            duplicates - in_window
        ));
    }
    if kind != "crash" && report["recovered"] == true && report["destination_fenced"] != true {
        wrong.push("the destination's copy ran again after the failover (not fenced)".into());
    }
    match report["copies_overlap_ms"].as_f64() {
        Some(0.0) => {}
        Some(ms) => {
            wrong.push(format!("the two copies ran at once for {ms:.3} ms (first: {})", report["copies_first_overlap"]))
        }
        None => wrong.push("no copies_overlap_ms in the report".into()),
    }
    let unconfirmed = report["failure"]["kind"] == "finish-unconfirmed";
    if report["copies_at_end"] != 1 && !unconfirmed {
        wrong.push(format!("{} copies at the end, not 1", report["copies_at_end"]));
    }
    if report["fixture"] == "kv" {
        wrong.extend(client_violations(report));
    }
    wrong
}

/// What went wrong for a kv run's clients (the demo's check already fails
/// `verified`; these name the counts): acknowledged writes lost, stale or
/// unexplained reads, frames of uncommitted epochs on the wire, a store that
/// holds other writes, or a VM that no longer serves.
fn client_violations(report: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    for (field, what) in [
        ("acked_writes_lost", "acknowledged writes lost"),
        ("stale_reads", "stale reads"),
        ("unexplained_reads", "unexplained reads"),
        ("frames_from_uncommitted_epochs", "frames from epochs that never committed reached the clients"),
        ("frames_out_of_turn", "frames from the destination after the source answered again (two copies answered)"),
    ] {
        match report[field].as_u64() {
            Some(0) => {}
            Some(n) => wrong.push(format!("{n} {what} (e.g. {})", report["client_anomalies"])),
            None => wrong.push(format!("no {field} in the report")),
        }
    }
    if report["store_digest_matches"] != true {
        wrong.push("the store's digest is not that of what the clients read back".into());
    }
    if let Some(e) = report["client_error"].as_str() {
        wrong.push(format!("the clients: {e}"));
    }
    wrong
}

/// The kv runs' clients, by kind of failure (empty without kv runs).
fn client_table(results: &[Value]) -> String {
    let kv: Vec<&Value> = results.iter().filter(|r| r["fixture"] == "kv").collect();
    if kv.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\nkv runs: what the clients saw (`lost`: acknowledged writes that vanished; `stale`: reads older than an \
         acknowledged write; `longest gap`: the longest time no client got an answer, the worst run's).\n\n\
         | failure | kv runs | recovered | held | client operations | acknowledged writes | lost | stale | \
         longest gap ms | connections survived | reconnects |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for kind in TABLE {
        let of_kind: Vec<&Value> = kv.iter().copied().filter(|r| r["kind"] == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        let sum = |field: &str| of_kind.iter().filter_map(|r| r["report"][field].as_u64()).sum::<u64>();
        let gap = of_kind.iter().filter_map(|r| r["report"]["client_max_gap_ms"].as_f64()).reduce(f64::max);
        md.push_str(&format!(
            "| {kind} | {} | {} | {} | {} | {} | {} | {} | {} | {} of {} | {} |\n",
            of_kind.len(),
            of_kind.iter().filter(|r| r["outcome"] == "recovered").count(),
            of_kind.iter().filter(|r| r["held"] == true).count(),
            sum("client_ops"),
            sum("client_acked_writes"),
            sum("acked_writes_lost"),
            sum("stale_reads"),
            gap.map_or("—".into(), |ms| format!("{ms:.0}")),
            sum("connections_survived"),
            sum("client_connections"),
            sum("client_reconnects"),
        ));
    }
    md
}

/// How a run ended: the migration completed, or the source recovered the VM.
fn outcome(report: &Value) -> &'static str {
    match &report["recovered"] {
        Value::Bool(true) => "recovered",
        Value::Bool(false) => "completed",
        _ => "no report",
    }
}

/// The failure as the demo applied it: its point or time, and for lossy and
/// slow-source what was done to the link or the source.
fn severity(plan: &Plan, report: &Value) -> String {
    let Some(at) = report["fail_at"].as_str() else {
        return if plan.severity.is_empty() { "no report".into() } else { format!("{}, no report", plan.severity) };
    };
    let applied =
        report["network"].as_str().or(report["source_throttle"].as_str()).or(report["source_staging"].as_str());
    match (plan.severity.is_empty(), applied) {
        (true, _) => at.to_string(),
        // slow-disk: from the start, at no point.
        (false, Some(applied)) if at == "none" => format!("{}: {applied}", plan.severity),
        (false, Some(applied)) => format!("{} at {at}: {applied}", plan.severity),
        (false, None) => format!("{} at {at}: not applied (the migration ended first)", plan.severity),
    }
}

/// What degraded the link or slowed the source in these runs (netem, or nft and
/// tbf; the cgroup version), e.g. "nft loss + tbf 200mbit".
fn mechanisms(runs: &[&Value]) -> String {
    let mut used: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            let report = &r["report"];
            report["network"].as_str().or(report["source_throttle"].as_str()).or(report["source_staging"].as_str())
        })
        .map(|applied| {
            // "nft loss 10% + tbf 200mbit/40ms" → "nft loss + tbf 200mbit"; "netem loss 2% delay 10ms" → "netem";
            // "cgroup v1 cfs_quota_us 5000/100000 (5% of a CPU)" → "cgroup v1 cfs_quota_us".
            applied
                .split(" + ")
                .map(|part| {
                    let words: Vec<&str> = part.split_whitespace().collect();
                    match words.as_slice() {
                        ["netem", ..] => "netem".to_string(),
                        ["nft", "loss", ..] => "nft loss".to_string(),
                        ["tbf", rate] => format!("tbf {}", rate.split('/').next().unwrap_or(rate)),
                        ["cgroup", version, knob, ..] => format!("cgroup {version} {knob}"),
                        ["every", "checkpoint", "page", "staged", ..] => "staging file, slow writes".to_string(),
                        // "nft reject with tcp reset, source side: the source's packets to port 40123"
                        ["nft", "reject", ..] => "nft reject with tcp reset".to_string(),
                        _ => part.to_string(),
                    }
                })
                .collect::<Vec<_>>()
                .join(" + ")
        })
        .collect();
    used.sort();
    used.dedup();
    if used.is_empty() {
        "—".into()
    } else {
        used.join("; ")
    }
}

pub fn run(root: &Path, pcft: &Path, runs: usize, fixtures: &str) -> Result<()> {
    let mut progress = Progress::new(runs as u64);
    let mut rng = Rng::from_clock();
    let seed = rng.0;
    let mut results = Vec::new();
    for i in 0..runs {
        let plan = plan(KINDS[i % KINDS.len()], fixture_of(i, fixtures), &mut rng);
        let what = if plan.severity.is_empty() { String::new() } else { format!(" ({})", plan.severity) };
        progress.step(format!("chaos: run {}/{runs}, {} on {}{what}", i + 1, plan.kind, plan.fixture));
        let started = std::time::Instant::now();
        let report = run_once(pcft, &plan);
        let violations = violations(plan.kind, &report);
        results.push(json!({
            "kind": plan.kind,
            "fixture": plan.fixture,
            "severity": severity(&plan, &report),
            "outcome": outcome(&report),
            "failure_kind": report["failure"]["kind"],
            "detection_ms": report["failure"]["detection_ms"],
            "copies_overlap_ms": report["copies_overlap_ms"],
            "copies_at_end": report["copies_at_end"],
            "held": violations.is_empty(),
            "violations": violations,
            "seconds": started.elapsed().as_secs_f64(),
            "report": report,
        }));
    }
    drop(progress);
    let count_of = |fixture: &str| results.iter().filter(|r| r["fixture"] == fixture).count();
    let mut md = format!(
        "# Fault-injection suite\n\n{runs} `pcft demo` runs ({} ledger runs: a 64M guest with 2 vCPUs; {} kv runs: a 64M key-value server with 4 \
         client connections writing and reading for the whole run; post-copy push 4096 pages/s, \
         checkpoints every 100 ms), each failing at a random point (`--fail-at random`; lossy and slow-source \
         at a random severity: loss {LOSS_PCT:?} % each way with delay {DELAY_MS:?} ms, or a source CPU quota \
         of {SOURCE_CPU_PCT:?} % of one CPU, or every write to the source's checkpoint staging file \
         {DISK_DELAY_MS:?} ms slower with all checkpoint pages staged there; stall with \
         `--checkpoint-timeout {STALL_CHECKPOINT_TIMEOUT_MS}`; reset on a random side of {RESET_SIDES:?}). \
         Lossy, slow-source and slow-disk may complete (slowly) or fail over. \
         `held`: the guest verified against its oracle wherever it finished (kv: the clients' history held and the VM serves), no released output lost or \
         contradicted, no duplicate but of a failover's window, for every kind but crash the destination fenced if the source recovered the VM, \
         the two copies never in the guest at once (from both agents' KVM_RUN run logs) and exactly one \
         copy at the end. `overlap`: the longest time, in ms, that the two copies of a run were in the \
         guest at once (must be 0). `duplicates`: records the outside got twice, and of them \
         `in window`: released by the destination after its last heartbeat that reached the source (which \
         so could not know) and again by the recovered source.\n\n\
         | failure | runs | completed | recovered at the source | held | overlap ms | released outputs | lost | duplicates | in window | degradation |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        count_of("ledger"),
        count_of("kv")
    );
    let label = |kind: &'static str| match kind {
        "crash" => "crash (SIGKILL)",
        "freeze" => "freeze (SIGSTOP)",
        "lossy" => "lossy link",
        "slow-source" => "slow source (CPU quota)",
        "stall" => "stall (checkpoints stop, heartbeats go on)",
        "slow-disk" => "slow disk (source staging)",
        "reset" => "reset (TCP resets, both agents alive)",
        "stall-fence" => "stall-fence (silent; vCPUs and watchdog stall)",
        other => other,
    };
    for kind in TABLE {
        let of_kind: Vec<&Value> = results.iter().filter(|r| r["kind"] == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        let count = |f: &dyn Fn(&Value) -> bool| of_kind.iter().filter(|r| f(r)).count();
        let sum = |field: &str| of_kind.iter().filter_map(|r| r["report"][field].as_u64()).sum::<u64>();
        let overlap = of_kind.iter().filter_map(|r| r["copies_overlap_ms"].as_f64()).reduce(f64::max);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            label(kind),
            of_kind.len(),
            count(&|r| r["outcome"] == "completed"),
            count(&|r| r["outcome"] == "recovered"),
            count(&|r| r["held"] == true),
            overlap.map_or("—".into(), |ms| if ms == 0.0 { "0".into() } else { format!("**{ms:.3}**") }),
            sum("released_outputs"),
            sum("lost_released_outputs"),
            sum("duplicate_released_outputs"),
            sum("duplicate_released_outputs_in_window"),
            mechanisms(&of_kind),
        ));
    }
    md.push_str(&client_table(&results));
    // The graded kinds (and resets, by side): which ones completed and which failed over (and how it was detected).
    let graded: Vec<&Value> = results
        .iter()
        .filter(|r| ["lossy", "slow-source", "slow-disk", "reset"].contains(&r["kind"].as_str().unwrap_or("")))
        .collect();
    if !graded.is_empty() {
        md.push_str(
            "\n| failure | severity | outcome | detected by | detection ms | held |\n|---|---|---|---|---:|---|\n",
        );
        for r in graded {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r["kind"].as_str().unwrap_or_default(),
                r["severity"].as_str().unwrap_or_default(),
                r["outcome"].as_str().unwrap_or_default(),
                r["failure_kind"].as_str().unwrap_or("—"),
                r["detection_ms"].as_f64().map_or("—".into(), |ms| format!("{ms:.0}")),
                if r["held"] == true { "yes" } else { "NO" },
            ));
        }
    }
    let failed: Vec<&Value> = results.iter().filter(|r| r["held"] != true).collect();
    for r in &failed {
        let (kind, severity) = (r["kind"].as_str().unwrap_or_default(), r["severity"].as_str().unwrap_or_default());
        let wrong: Vec<&str> = r["violations"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        md.push_str(&format!("\nFAILED ({kind}, {severity}): {}. Report: {}\n", wrong.join("; "), r["report"]));
    }
    let dir = root.join("target/chaos");
    std::fs::create_dir_all(&dir)?;
    let json = json!({ "seed": seed, "runs": results });
    std::fs::write(dir.join("chaos.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(dir.join("chaos.md"), &md).context("writing chaos.md")?;
    println!("{md}");
    eprintln!("chaos: wrote {}", dir.join("chaos.md").display());
    if !failed.is_empty() {
        bail!("{} of {runs} runs did not hold (see above)", failed.len());
    }
    Ok(())
}
