//! `cargo xtask bench`: the migration modes (PostCopyFT included) on the `dirty` fixture across
//! guest memory sizes and dirty rates, each against a plain TCP bulk copy
//! measured in the same run on the same loopback. Results go to
//! target/bench/migration.{json,md} and to stdout.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Plain TCP bulk copy of `bytes` over loopback, in bytes per second.
pub fn tcp_baseline(bytes: u64) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    drop(s);
    let received = reader.join().expect("reader thread")?;
    let secs = started.elapsed().as_secs_f64();
    if received != sent {
        bail!("TCP baseline lost bytes: sent {sent}, received {received}");
    }
    Ok(sent as f64 / secs)
}

struct Agent(Child, String);

impl Agent {
    fn start(pcft: &Path, name: &str) -> Result<Agent> {
        let mut child = Command::new(pcft)
            .args(["agent", "--listen", "127.0.0.1:0", "--name", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pcft agent")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line)?;
        let addr = line.trim().strip_prefix("listening on ").context("agent did not start")?.to_string();
        Ok(Agent(child, addr))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pcft_json(pcft: &Path, args: &[&str]) -> Result<Value> {
    let out = Command::new(pcft).args(args).output()?;
    if !out.status.success() {
        bail!("pcft {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// One migration of a `dirty` VM that writes `rate` pages/s (None: as fast as it can).
fn migrate_once(pcft: &Path, mode: &str, mem: &str, rate: Option<u64>) -> Result<Value> {
    let (src, dst) = (Agent::start(pcft, "source")?, Agent::start(pcft, "destination")?);
    let mut start =
        vec!["vm", "start", "--agent", &src.1, "--name", "bench", "--fixture", "dirty", "--mem", mem, "--forever"];
    let rate_text = rate.map(|r| r.to_string());
    if let Some(r) = &rate_text {
        start.extend(["--rate", r]);
    }
    let out = Command::new(pcft).args(&start).output()?;
    if !out.status.success() {
        bail!("pcft vm start: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    std::thread::sleep(Duration::from_millis(300));
    pcft_json(pcft, &["migrate", "bench", "--agent", &src.1, "--to", &dst.1, "--mode", mode, "--json"])
}

pub fn run(root: &Path, pcft: &Path, quick: bool) -> Result<()> {
    let mems: &[&str] = if quick { &["64M"] } else { &["256M", "1G"] };
    let rates: &[(&str, Option<u64>)] = if quick {
        &[("max", None)]
    } else {
        &[("1k pages/s", Some(1_000)), ("50k pages/s", Some(50_000)), ("max", None)]
    };
    // postcopy-ft beside postcopy: the cost of checkpointing on total time (issue goal: within 5%).
    let modes = ["precopy", "postcopy", "hybrid", "postcopy-ft"];
    eprintln!("bench: TCP baseline (1 GiB over loopback)...");
    let tcp = tcp_baseline(if quick { 256 << 20 } else { 1 << 30 })?;
    let mut rows = Vec::new();
    let total = mems.len() * rates.len() * modes.len();
    for mem in mems {
        for (rate_name, rate) in rates {
            for mode in modes {
                eprintln!("bench [{}/{total}]: {mode}, {mem}, dirty {rate_name}", rows.len() + 1);
                let report = migrate_once(pcft, mode, mem, *rate)?;
                let mem_bytes = report["mem_bytes"].as_f64().unwrap_or(0.0);
                let total_ms = report["total_migration_ms"].as_f64().unwrap_or(f64::NAN);
                let bytes = report["bytes_sent"].as_f64().unwrap_or(0.0);
                let copy_ms = mem_bytes / tcp * 1e3;
                rows.push(json!({
                    "mode": mode, "mem": mem, "dirty_rate": rate_name, "report": report,
                    "memory_copy_ms": copy_ms,
                    "total_vs_memory_copy": total_ms / copy_ms,
                    "stream_gbit_s": bytes * 8.0 / (total_ms / 1e3) / 1e9,
                    "stream_vs_tcp": (bytes / (total_ms / 1e3)) / tcp,
                }));
            }
        }
    }
    let mut md = format!(
        "# Migration benchmark\n\nTCP bulk copy over loopback, same run: {:.2} Gbit/s ({:.0} MiB/s). \
         `total / copy` is the total migration time over the time to copy the guest's memory at that rate.\n\n\
         | mode | mem | guest dirty rate | total ms | downtime ms | rounds | pushed | faulted | fault p50 µs | fault p99 µs | sent MiB | stream Gbit/s | stream / TCP | total / copy | checkpoints |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        tcp * 8.0 / 1e9,
        tcp / (1 << 20) as f64
    );
    for r in &rows {
        let rep = &r["report"];
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.2} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {} |\n",
            r["mode"].as_str().unwrap_or(""),
            r["mem"].as_str().unwrap_or(""),
            r["dirty_rate"].as_str().unwrap_or(""),
            rep["total_migration_ms"].as_f64().unwrap_or(f64::NAN),
            rep["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            rep["rounds"],
            rep["pages_pushed"],
            rep["pages_faulted"],
            rep["fault_latency_us"]["p50"],
            rep["fault_latency_us"]["p99"],
            rep["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            r["stream_gbit_s"].as_f64().unwrap_or(f64::NAN),
            r["stream_vs_tcp"].as_f64().unwrap_or(f64::NAN),
            r["total_vs_memory_copy"].as_f64().unwrap_or(f64::NAN),
            rep["checkpoints_committed"],
        ));
    }
    let dir: PathBuf = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let results = json!({ "tcp_bytes_per_s": tcp, "runs": rows });
    std::fs::write(dir.join("migration.json"), serde_json::to_string_pretty(&results)?)?;
    std::fs::write(dir.join("migration.md"), &md)?;
    println!("{md}");
    eprintln!("bench: wrote {} and {}", dir.join("migration.md").display(), dir.join("migration.json").display());
    Ok(())
}
