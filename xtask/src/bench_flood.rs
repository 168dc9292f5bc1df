//! `cargo xtask bench --only flood`: what a flood at the destination agent
//! costs a migration that is running into it. A `dirty` guest of 64 MiB that
//! has written all of its memory and goes on writing random pages migrates in
//! post-copy (pushed at 2048 pages/s, so it lasts about 8 s and its vCPU
//! faults on pages the push has not reached); its demand-fault latency
//! (p50, p99 from the migration's report) with the destination left alone,
//! and with, from the switchover to its end:
//!
//! - connections that never greet, held open past `--max-connections 64`
//!   (those past the limit are closed at once), opened again as they close;
//! - `pcft vm start` of a 64 MiB VM every 50 ms past `--max-total-guest-mem
//!   64M`, which the arriving VM fills (refused with the reason, before any boot).
//!
//! Quiet and flooded runs alternate, `reps` of each; the table shows medians
//! and the ratio flooded / quiet of the same run. Results:
//! target/bench/flood.{md,json}, and stdout.

use crate::bench::{pcft_json, pcft_ok, Agent, PCFT_TIMEOUT};
use crate::bench_dirty::median;
use crate::progress::Progress;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The destination's limits, low enough that the flood crosses them.
const DESTINATION_LIMITS: [&str; 4] = ["--max-connections", "64", "--max-total-guest-mem", "64M"];
/// Idle connections the flood keeps open (the agent takes 64 of them).
const HELD: usize = 200;

/// What the flood did while the migration ran.
#[derive(Default)]
struct FloodCount {
    connections: AtomicU64,
    closed_by_agent: AtomicU64,
    vm_starts: AtomicU64,
    vm_starts_refused: AtomicU64,
}

/// Whether the agent still holds `stream` open (a non-blocking one).
fn still_open(stream: &TcpStream) -> bool {
    match stream.peek(&mut [0u8; 1]) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// Floods the agent at `addr` until `stop`: idle connections and refused `vm start`s.
fn flood(pcft: &Path, addr: &str, stop: &AtomicBool, count: &FloodCount) {
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let before = held.len();
                held.retain(still_open);
                count.closed_by_agent.fetch_add((before - held.len()) as u64, Ordering::Relaxed);
                while held.len() < HELD && !stop.load(Ordering::Relaxed) {
                    let Ok(stream) = TcpStream::connect(addr) else { break };
                    count.connections.fetch_add(1, Ordering::Relaxed);
                    if stream.set_nonblocking(true).is_ok() {
                        held.push(stream);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("flood{i}");
            i += 1;
            let out = Command::new(pcft)
                .args(["vm", "start", "--agent", addr, "--name", &name, "--fixture", "dirty", "--mem", "64M"])
                .args(["--forever", "--rate", "100"])
                .output();
            count.vm_starts.fetch_add(1, Ordering::Relaxed);
            if out.is_ok_and(|o| o.status.code() == Some(2)) {
                count.vm_starts_refused.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// Waits until the VM migrating out of the agent at `addr` is in post-copy
/// (false: the migration ended first, `ended`).
fn in_postcopy(pcft: &Path, addr: &str, ended: &AtomicBool) -> bool {
    while !ended.load(Ordering::Relaxed) {
        let status = pcft_json(pcft, &["status", "--agent", addr, "--json"], PCFT_TIMEOUT);
        if status.is_ok_and(|s| s["vms"][0]["migration"]["phase"] == "postcopy") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One post-copy migration of a prefilled, randomly writing 64 MiB `dirty`
/// guest into a limited destination, flooded or not; the report's figures.
fn once(pcft: &Path, flooded: bool) -> Result<Value> {
    let src = Agent::start(pcft, "source")?;
    let dst = Agent::start_with_args(pcft, "destination", &DESTINATION_LIMITS)?;
    let start = ["vm", "start", "--agent", src.addr(), "--name", "moving", "--fixture", "dirty", "--mem", "64M"];
    pcft_ok(pcft, &[&start[..], &["--forever", "--prefill", "--pattern", "random"]].concat(), PCFT_TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(300));
    let migrate = ["migrate", "moving", "--agent", src.addr(), "--to", dst.addr(), "--mode", "postcopy"];
    let migrate = [&migrate[..], &["--postcopy-rate", "2048", "--json"]].concat();
    let (stop, count) = (AtomicBool::new(false), FloodCount::default());
    let began = Instant::now();
    let report = std::thread::scope(|scope| {
        let migration = scope.spawn(|| {
            let report = pcft_json(pcft, &migrate, PCFT_TIMEOUT);
            stop.store(true, Ordering::Relaxed);
            report
        });
        // The flood comes once the migration runs (admitted, in post-copy):
        // what it costs a running migration, not whether a new one gets in.
        if flooded && in_postcopy(pcft, src.addr(), &stop) {
            flood(pcft, dst.addr(), &stop, &count);
        }
        migration.join().expect("the migration thread panicked")
    })?;
    let seconds = began.elapsed().as_secs_f64();
    let latency = &report["fault_latency_us"];
    Ok(json!({
        "flooded": flooded,
        "fault_p50_us": latency["p50"].as_f64().context("the report has no fault latency")?,
        "fault_p99_us": latency["p99"].as_f64().context("the report has no fault latency")?,
        "pages_faulted": report["pages_faulted"],
        "total_migration_ms": report["total_migration_ms"],
        "flood_connections_per_s": count.connections.load(Ordering::Relaxed) as f64 / seconds,
        "flood_connections_closed_by_agent": count.closed_by_agent.load(Ordering::Relaxed),
        "flood_vm_starts": count.vm_starts.load(Ordering::Relaxed),
        "flood_vm_starts_refused": count.vm_starts_refused.load(Ordering::Relaxed),
    }))
}

pub fn run(root: &Path, pcft: &Path, quick: bool) -> Result<()> {
    let reps = if quick { 1 } else { 3 };
    let mut progress = Progress::new(2 * reps as u64);
    let (mut quiet, mut flooded) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        for flood in [false, true] {
            progress.step(format!(
                "flood bench: rep {} of {reps}, {}",
                rep + 1,
                if flood { "flooded" } else { "quiet" }
            ));
            let run = once(pcft, flood).with_context(|| format!("flood bench, rep {}, flooded: {flood}", rep + 1))?;
            if flood {
                flooded.push(run)
            } else {
                quiet.push(run)
            }
        }
    }
    let med = |runs: &[Value], key: &str| median(runs.iter().filter_map(|r| r[key].as_f64()).collect());
    let (q50, q99, f50, f99) = (
        med(&quiet, "fault_p50_us"),
        med(&quiet, "fault_p99_us"),
        med(&flooded, "fault_p50_us"),
        med(&flooded, "fault_p99_us"),
    );
    let mut md = format!(
        "# A flood at the destination during a post-copy migration into it\n\n\
         64 MiB `dirty` guest, all memory written, random writes; post-copy pushed at 2048 pages/s; destination \
         `{}`; medians of {reps} run(s) each, alternating.\n\n\
         | destination | fault p50 µs | fault p99 µs | pages faulted | total ms | flood: connections/s, closed by the agent | flood: vm starts (refused) |\n\
         |---|---:|---:|---:|---:|---|---|\n",
        DESTINATION_LIMITS.join(" ")
    );
    for (name, runs) in [("quiet", &quiet), ("flooded", &flooded)] {
        md.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}, {:.0} | {:.0} ({:.0}) |\n",
            med(runs, "fault_p50_us"),
            med(runs, "fault_p99_us"),
            med(runs, "pages_faulted"),
            med(runs, "total_migration_ms"),
            med(runs, "flood_connections_per_s"),
            med(runs, "flood_connections_closed_by_agent"),
            med(runs, "flood_vm_starts"),
            med(runs, "flood_vm_starts_refused"),
        ));
    }
    md.push_str(&format!("\nFlooded / quiet: fault p50 {:.2}×, fault p99 {:.2}×.\n", f50 / q50, f99 / q99));
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("flood.md"), &md)?;
    let results =
        json!({ "reps": reps, "p50_ratio": f50 / q50, "p99_ratio": f99 / q99, "quiet": quiet, "flooded": flooded });
    std::fs::write(out.join("flood.json"), serde_json::to_string_pretty(&results)?)?;
    println!("{md}");
    eprintln!("bench: wrote {}", out.join("flood.md").display());
    Ok(())
}
