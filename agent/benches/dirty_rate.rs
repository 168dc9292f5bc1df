//! What a live dirty rate costs the guest: write throughput of the `dirty`
//! fixture (1 vCPU, random writes over 64 MiB) with each tracker, its logging
//! on or off, and its rate sampled once a second (as a VM's runner does) or
//! not; as a ratio to the bitmap with logging off (nothing tracked) from the
//! same run, runs interleaved. Prints one JSON object a line.
//! Run with `cargo bench -p pcft-agent --bench dirty_rate [-- --quick]`
//! (`cargo xtask bench --only dirty` runs it and tabulates it).

use pcft_agent::vmm::dirty::DirtyTracking;
use pcft_agent::vmm::machine::{Machine, MachineConfig};
use std::time::{Duration, Instant};
use vm_fixtures::{DirtyPattern, FixtureKind, FixtureParams};

/// One measured setup.
#[derive(Clone, Copy)]
struct Setup {
    tracker: &'static str,
    tracking: DirtyTracking,
    logging: bool,
    sampled: bool,
}

const RING: u32 = DirtyTracking::DEFAULT_RING_ENTRIES;

const SETUPS: [Setup; 7] = [
    Setup { tracker: "bitmap", tracking: DirtyTracking::Bitmap, logging: false, sampled: false },
    Setup { tracker: "bitmap", tracking: DirtyTracking::Bitmap, logging: true, sampled: false },
    Setup { tracker: "bitmap", tracking: DirtyTracking::Bitmap, logging: true, sampled: true },
    Setup { tracker: "ring", tracking: DirtyTracking::Ring { entries: RING }, logging: true, sampled: false },
    Setup { tracker: "ring", tracking: DirtyTracking::Ring { entries: RING }, logging: true, sampled: true },
    Setup { tracker: "ebpf", tracking: DirtyTracking::Ebpf { entries: RING }, logging: true, sampled: false },
    Setup { tracker: "ebpf", tracking: DirtyTracking::Ebpf { entries: RING }, logging: true, sampled: true },
];

/// What one run measured.
struct Run {
    seconds: f64,
    samples: u32,
    sample_us_total: f64,
    sample_us_max: f64,
}

fn config(steps: u64) -> MachineConfig {
    let (mem_bytes, ws_bytes) = (256u64 << 20, 64u64 << 20);
    let mut fixture = FixtureParams::new(FixtureKind::Dirty, 1, ws_bytes / 4096);
    fixture.pattern = DirtyPattern::Random;
    fixture.steps = steps;
    fixture.record_every = steps;
    MachineConfig { mem_bytes, slot_bytes: 128 << 20, fixture, dirty_rate: None, net: None }
}

/// Boots, runs the guest to its end with `setup`, and verifies it; `None` if
/// the tracker cannot be built here (eBPF without its program).
fn run_once(setup: Setup, steps: u64) -> Option<Run> {
    let mut machine = match Machine::boot_with(config(steps), setup.tracking) {
        Ok(machine) => machine,
        Err(e) => {
            eprintln!("dirty_rate: {} skipped: {e}", setup.tracker);
            return None;
        }
    };
    if setup.logging {
        machine.set_dirty_logging(true).expect("dirty logging");
    }
    let mut run = Run { seconds: 0.0, samples: 0, sample_us_total: 0.0, sample_us_max: 0.0 };
    let started = Instant::now();
    let mut next_sample = started + Duration::from_secs(1);
    machine.resume().expect("resume");
    while !machine.is_finished() {
        if setup.sampled && Instant::now() >= next_sample {
            let at = Instant::now();
            machine.sample_dirty_rate().expect("a sample");
            let us = at.elapsed().as_secs_f64() * 1e6;
            run.samples += 1;
            run.sample_us_total += us;
            run.sample_us_max = run.sample_us_max.max(us);
            next_sample += Duration::from_secs(1);
        }
        machine.next_event(Duration::from_millis(10)).expect("the guest runs");
    }
    run.seconds = started.elapsed().as_secs_f64();
    machine.verify().expect("the run matches the oracle");
    Some(run)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (steps, reps) = if quick { (1_000_000u64, 1) } else { (2_000_000u64, 3) };
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    let mut last: Vec<Option<Run>> = SETUPS.iter().map(|_| None).collect();
    for rep in 0..reps {
        for (i, setup) in SETUPS.iter().enumerate() {
            eprintln!(
                "dirty_rate: run {}/{reps}: {} logging {} sampled {}",
                rep + 1,
                setup.tracker,
                setup.logging,
                setup.sampled
            );
            if let Some(run) = run_once(*setup, steps) {
                times[i].push(run.seconds);
                last[i] = Some(run);
            }
        }
    }
    let base = steps as f64 / median(times[0].clone());
    for (i, setup) in SETUPS.iter().enumerate() {
        let Some(run) = &last[i] else { continue };
        let rate = steps as f64 / median(times[i].clone());
        let mean_us = if run.samples > 0 { run.sample_us_total / f64::from(run.samples) } else { 0.0 };
        println!(
            "{}",
            serde_json::json!({
                "kind": "sampling", "tracker": setup.tracker, "logging": setup.logging,
                "sampled": setup.sampled, "pages_per_s": rate, "vs_untracked": rate / base,
                "runs_s": times[i], "samples": run.samples, "mean_sample_us": mean_us,
                "max_sample_us": run.sample_us_max,
            })
        );
    }
}
