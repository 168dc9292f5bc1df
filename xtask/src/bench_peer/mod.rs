//! `cargo xtask bench --only peer` (issue 16): pcft's post-copy beside a peer,
//! QEMU's, and beside the physical limit, a raw TCP copy, all in one run on
//! this machine's loopback.
//!
//! - pcft: two `pcft agent`s with authentication on (a key from `pcft
//!   keygen`), the `dirty` fixture started with `--prefill` (all of its memory
//!   written, so that no page travels as a zero page) writing pages at random
//!   as fast as it can, then `pcft migrate --mode postcopy` and `postcopy-ft`.
//! - QEMU (Debian's `qemu-system-x86`, `-accel kvm`): a guest of our own
//!   (xtask/peer-guest/peer.S, the VM's firmware) that writes every page of
//!   its memory, says so on the serial port, then writes pages at random;
//!   source and destination on loopback, `postcopy-ram` on both, `migrate`
//!   then `migrate-start-postcopy` at once, or after 0.3 s of pre-copy.
//! - a raw TCP copy of as many bytes as the guest has memory.
//!
//! Runs alternate between pcft and QEMU, for each memory size, a few times.
//! CPU time of the source's and the destination's processes (their vCPU
//! threads apart) is read from /proc before and after each migration.
//! Results: target/bench/peer.{md,json} (plotted as peer-*.svg), and stdout.

mod cpu;
mod qemu;
mod qmp;
mod report;

use crate::bench::{pcft_json, pcft_ok, Agent, PCFT_TIMEOUT};
use anyhow::{bail, Context, Result};
use cpu::{CpuUse, CpuWatch};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the benchmark runs; `--quick` is a 64 MiB smoke run.
struct Plan {
    mems_mib: &'static [u64],
    /// Runs of each system per memory size (the tables show medians).
    reps: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan { mems_mib: &[64], reps: 1 }
        } else {
            Plan { mems_mib: &[256, 1024], reps: 5 }
        }
    }
}

/// How long QEMU pre-copies before post-copy starts, in the second QEMU variant.
const SHORT_PRECOPY: Duration = Duration::from_millis(300);
/// How long the pcft guest runs at the source before it migrates.
const PCFT_WARMUP: Duration = Duration::from_millis(300);
/// How often CPU use is sampled while a migration runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// One of the things measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    PcftPostcopy,
    PcftPostcopyFt,
    QemuAtOnce,
    QemuAfterPrecopy,
    Tcp,
}

impl System {
    pub const ALL: [System; 5] =
        [System::PcftPostcopy, System::PcftPostcopyFt, System::QemuAtOnce, System::QemuAfterPrecopy, System::Tcp];

    /// Its key in peer.json.
    pub fn key(self) -> &'static str {
        match self {
            System::PcftPostcopy => "pcft-postcopy",
            System::PcftPostcopyFt => "pcft-postcopy-ft",
            System::QemuAtOnce => "qemu-postcopy-at-once",
            System::QemuAfterPrecopy => "qemu-postcopy-after-precopy",
            System::Tcp => "tcp",
        }
    }

    /// Its name in the tables.
    pub fn label(self) -> &'static str {
        match self {
            System::PcftPostcopy => "pcft post-copy",
            System::PcftPostcopyFt => "pcft post-copy-ft",
            System::QemuAtOnce => "QEMU post-copy, started at once",
            System::QemuAfterPrecopy => "QEMU post-copy after 0.3 s of pre-copy",
            System::Tcp => "raw TCP copy",
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Measured {
    pub total_ms: f64,
    pub downtime_ms: Option<f64>,
    /// Bytes moved (pcft `bytes_sent`, QEMU `ram.transferred`, the TCP copy's bytes).
    pub bytes: u64,
    /// CPU use of the source's and the destination's process (the TCP copy: its sending and receiving thread).
    pub src: CpuUse,
    pub dst: CpuUse,
    /// Pages the destination asked for (pcft `pages_faulted`, QEMU `ram.postcopy-requests`).
    pub demand_pages: Option<u64>,
    /// The system's own report.
    pub detail: Value,
}

/// One run: what it measured, or why it failed.
#[derive(Clone, Debug)]
pub struct Run {
    pub system: System,
    pub mem_mib: u64,
    pub rep: usize,
    pub outcome: Result<Measured, String>,
}

pub fn run(root: &Path, pcft: &Path, quick: bool) -> Result<()> {
    let plan = Plan::new(quick);
    let dir = root.join("target/bench");
    let work = dir.join("peer-work");
    std::fs::create_dir_all(&work)?;
    let qemu = qemu::Setup::prepare(root, &work)?;
    let key = psk_file(pcft, &work)?;
    let ticks = cpu::ticks_per_second();
    let started = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    let mut progress = crate::progress::Progress::new((plan.mems_mib.len() * plan.reps * System::ALL.len()) as u64);
    for &mem_mib in plan.mems_mib {
        for rep in 1..=plan.reps {
            for system in order(rep) {
                progress.step(format!("peer: {}, {mem_mib} MiB, run {rep}/{}", system.label(), plan.reps));
                warm_free_memory(mem_mib << 20);
                let outcome = match system {
                    System::PcftPostcopy => pcft_once(pcft, &key, "postcopy", mem_mib, ticks),
                    System::PcftPostcopyFt => pcft_once(pcft, &key, "postcopy-ft", mem_mib, ticks),
                    System::QemuAtOnce => qemu.migrate_once(mem_mib, None, ticks),
                    System::QemuAfterPrecopy => qemu.migrate_once(mem_mib, Some(SHORT_PRECOPY), ticks),
                    System::Tcp => tcp_copy(mem_mib << 20, ticks),
                };
                if let Err(e) = &outcome {
                    eprintln!("bench peer: {} of {mem_mib} MiB failed: {e:#}", system.label());
                }
                runs.push(Run { system, mem_mib, rep, outcome: outcome.map_err(|e| format!("{e:#}")) });
                // After each run, so that a later failure keeps what was measured.
                report::write(&dir, &runs, plan.mems_mib, plan.reps, started.elapsed())?;
            }
        }
    }
    drop(progress);
    let md = report::write(&dir, &runs, plan.mems_mib, plan.reps, started.elapsed())?;
    println!("{md}");
    eprintln!("bench: wrote {} and {}", dir.join("peer.md").display(), dir.join("peer.json").display());
    report::check_measured(&runs, plan.mems_mib)
}

/// The order of the systems in run `rep`: pcft and QEMU alternate, and who
/// goes first alternates from run to run; the TCP copy ends each.
fn order(rep: usize) -> [System; 5] {
    use System::*;
    if rep % 2 == 1 {
        [PcftPostcopy, QemuAtOnce, PcftPostcopyFt, QemuAfterPrecopy, Tcp]
    } else {
        [QemuAtOnce, PcftPostcopy, QemuAfterPrecopy, PcftPostcopyFt, Tcp]
    }
}

/// Makes the kernel's free memory for the next run memory the hypervisor
/// under this host backs: touches twice `bytes` and frees it again. This
/// host's kernel reports free memory to its hypervisor (virtio-balloon free
/// page reporting), which takes it away; the first touch of such a page costs
/// a fault in the hypervisor, invisible here but 4× a copy of the page. Whichever run
/// followed one that freed little memory (the TCP copy) paid that for most of its
/// pages, and pcft's destination took 2–3× as long: a run's place, not its system.
fn warm_free_memory(bytes: u64) {
    let warm = vec![1u8; 2 * bytes as usize];
    std::hint::black_box(&warm);
}

/// A fresh pre-shared key (`pcft keygen`) for the benchmark's agents.
fn psk_file(pcft: &Path, work: &Path) -> Result<PathBuf> {
    let key = work.join("peer.key");
    // keygen never overwrites a key file.
    let _ = std::fs::remove_file(&key);
    pcft_ok(pcft, &["keygen", "--out", path_str(&key)?], PCFT_TIMEOUT)?;
    Ok(key)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// One pcft migration of a prefilled `dirty` guest of `mem_mib` between two
/// authenticating agents, with the agents' CPU use.
fn pcft_once(pcft: &Path, key: &Path, mode: &str, mem_mib: u64, ticks: f64) -> Result<Measured> {
    let (src, dst) = (Agent::start_with_key(pcft, "source", key)?, Agent::start_with_key(pcft, "destination", key)?);
    let (key, mem) = (path_str(key)?, format!("{mem_mib}M"));
    let start = ["vm", "start", "--agent", src.addr(), "--name", "peer", "--fixture", "dirty", "--mem", &mem];
    pcft_ok(pcft, &[&start[..], &["--forever", "--prefill", "--psk-file", key]].concat(), PCFT_TIMEOUT)?;
    std::thread::sleep(PCFT_WARMUP);
    let migrate =
        ["migrate", "peer", "--agent", src.addr(), "--to", dst.addr(), "--mode", mode, "--json", "--psk-file", key];
    let mut watch = CpuWatch::start(&[src.pid(), dst.pid()], ticks)?;
    let report = std::thread::scope(|scope| {
        let migration = scope.spawn(|| pcft_json(pcft, &migrate, PCFT_TIMEOUT));
        while !migration.is_finished() {
            watch.sample();
            std::thread::sleep(SAMPLE_EVERY);
        }
        migration.join().expect("the migration thread panicked")
    })?;
    let cpu = watch.finish()?;
    let total_ms = report["total_migration_ms"].as_f64().context("the report has no total_migration_ms")?;
    Ok(Measured {
        total_ms,
        downtime_ms: report["downtime_ms"].as_f64(),
        bytes: report["bytes_sent"].as_u64().context("the report has no bytes_sent")?,
        src: cpu[0],
        dst: cpu[1],
        demand_pages: report["pages_faulted"].as_u64(),
        detail: report,
    })
}

/// A plain copy of `bytes` (non-zero) over a loopback TCP connection, with
/// the CPU time of the sending and the receiving thread.
fn tcp_copy(bytes: u64, ticks: f64) -> Result<Measured> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
        let (mut stream, _) = listener.accept()?;
        let before = cpu::this_thread_ticks();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match stream.read(&mut buf)? {
                0 => return Ok((total, cpu::this_thread_ticks() - before)),
                n => total += n as u64,
            }
        }
    });
    let mut stream = TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 1 << 20];
    let before = cpu::this_thread_ticks();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = buf.len().min((bytes - sent) as usize);
        stream.write_all(&buf[..n])?;
        sent += n as u64;
    }
    let send_ticks = cpu::this_thread_ticks() - before;
    drop(stream);
    let (received, receive_ticks) = reader.join().expect("the reader thread panicked")?;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    if received != sent {
        bail!("the TCP copy lost bytes: sent {sent}, received {received}");
    }
    let cpu = |t: u64| CpuUse { total_s: t as f64 / ticks, vcpu_s: 0.0 };
    Ok(Measured {
        total_ms,
        downtime_ms: None,
        bytes: sent,
        src: cpu(send_ticks),
        dst: cpu(receive_ticks),
        demand_pages: None,
        detail: Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_alternate_between_pcft_and_qemu() {
        for rep in 1..=4 {
            let systems = order(rep);
            let is_pcft = |s: &System| matches!(s, System::PcftPostcopy | System::PcftPostcopyFt);
            // pcft, QEMU, pcft, QEMU (or the other way round), then TCP.
            for pair in systems[..4].windows(2) {
                assert_ne!(is_pcft(&pair[0]), is_pcft(&pair[1]), "run {rep}: {systems:?}");
            }
            assert_eq!(systems[4], System::Tcp);
            assert!(System::ALL.iter().all(|s| systems.contains(s)));
            assert_ne!(is_pcft(&systems[0]), is_pcft(&order(rep + 1)[0]), "who goes first alternates");
        }
    }

    #[test]
    fn a_tcp_copy_moves_every_byte() {
        let copy = tcp_copy(8 << 20, cpu::ticks_per_second()).unwrap();
        assert_eq!(copy.bytes, 8 << 20);
        assert!(copy.total_ms > 0.0 && copy.src.total_s >= 0.0);
    }
}
