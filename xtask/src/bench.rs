//! `cargo xtask bench`: the migration modes (PostCopyFT included) on the `dirty` fixture across
//! guest memory sizes and dirty rates, each against a plain TCP bulk copy
//! measured in the same run on the same loopback. Results go to
//! target/bench/migration.{json,md} and to stdout.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
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

/// A `pcft agent` on a free loopback port, killed when dropped.
pub(crate) struct Agent {
    child: Child,
    addr: String,
    /// Where it serves Prometheus metrics (`--metrics`), if it does.
    metrics: Option<String>,
}

impl Agent {
    pub(crate) fn start(pcft: &Path, name: &str) -> Result<Agent> {
        Agent::spawn(pcft, name, false, None)
    }

    /// An agent that also serves its Prometheus metrics (see [`Agent::metrics_addr`]).
    pub(crate) fn start_with_metrics(pcft: &Path, name: &str) -> Result<Agent> {
        Agent::spawn(pcft, name, true, None)
    }

    /// An agent that authenticates its peers and the CLI with the pre-shared key in `psk_file`.
    pub(crate) fn start_with_key(pcft: &Path, name: &str, psk_file: &Path) -> Result<Agent> {
        Agent::spawn(pcft, name, false, Some(psk_file))
    }

    /// An open agent started with `extra` arguments (limits, say).
    pub(crate) fn start_with_args(pcft: &Path, name: &str, extra: &[&str]) -> Result<Agent> {
        Agent::spawn_with(pcft, name, false, None, extra)
    }

    fn spawn(pcft: &Path, name: &str, metrics: bool, psk_file: Option<&Path>) -> Result<Agent> {
        Agent::spawn_with(pcft, name, metrics, psk_file, &[])
    }

    fn spawn_with(pcft: &Path, name: &str, metrics: bool, psk_file: Option<&Path>, extra: &[&str]) -> Result<Agent> {
        let mut cmd = Command::new(pcft);
        cmd.args(["agent", "--listen", "127.0.0.1:0", "--name", name]).args(extra);
        match psk_file {
            Some(key) => cmd.arg("--psk-file").arg(key),
            None => cmd.arg("--insecure"),
        };
        if metrics {
            cmd.args(["--metrics", "127.0.0.1:0"]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("starting pcft agent")?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        // Killed on drop from here on, should it not come up.
        let mut agent = Agent { child, addr: String::new(), metrics: None };
        agent.addr =
            read_line_after(&mut stdout, "listening on ").with_context(|| format!("the {name} agent did not start"))?;
        if metrics {
            let url = read_line_after(&mut stdout, "metrics on http://")
                .with_context(|| format!("the {name} agent serves no metrics"))?;
            // "ADDR/metrics, dashboard on http://ADDR/"
            let url = url.split(',').next().unwrap_or_default();
            agent.metrics = Some(url.trim_end_matches("/metrics").to_string());
        }
        Ok(agent)
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address of its metrics server (`GET /metrics`), if started with them.
    pub(crate) fn metrics_addr(&self) -> Option<&str> {
        self.metrics.as_deref()
    }
}

/// The next line of `out`, which must start with `prefix`; the rest of it.
fn read_line_after(out: &mut impl BufRead, prefix: &str) -> Result<String> {
    let mut line = String::new();
    out.read_line(&mut line)?;
    match line.trim().strip_prefix(prefix) {
        Some(rest) => Ok(rest.to_string()),
        None => bail!("expected a line starting {prefix:?}, read {line:?}"),
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The longest any one pcft command of the benchmarks may take.
pub(crate) const PCFT_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `cmd` to its end and collects its output; kills it, and fails saying
/// which command it was, if it takes longer than `timeout`.
pub(crate) fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    let deadline = Instant::now() + timeout;
    // Read on threads of their own, so that a full pipe cannot stall the child.
    let (stdout, stderr) = (read_on_thread(child.stdout.take()), read_on_thread(child.stderr.take()));
    let left = || deadline.saturating_duration_since(Instant::now());
    // Its stdout closes when it exits (as a rule): that wakes this at once, with no polling.
    let stdout = stdout.recv_timeout(left());
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {shown}"))? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {} s and was killed", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    Ok(Output {
        status,
        stdout: stdout.unwrap_or_default(),
        // Children of the command may hold its stderr open: take what came by the deadline.
        stderr: stderr.recv_timeout(left()).unwrap_or_default(),
    })
}

/// Reads `pipe` to its end on a thread; the bytes come on the channel.
fn read_on_thread(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = tx.send(bytes);
    });
    rx
}

/// `pcft ARGS` that must succeed within `timeout`; its stdout.
pub(crate) fn pcft_ok(pcft: &Path, args: &[&str], timeout: Duration) -> Result<Vec<u8>> {
    let out = output_within(Command::new(pcft).args(args), timeout)?;
    if !out.status.success() {
        bail!("pcft {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// `pcft ARGS` that must succeed within `timeout` and print one JSON object.
pub(crate) fn pcft_json(pcft: &Path, args: &[&str], timeout: Duration) -> Result<Value> {
    let stdout = pcft_ok(pcft, args, timeout)?;
    serde_json::from_slice(&stdout)
        .with_context(|| format!("pcft {}: the output is not one JSON object", args.join(" ")))
}

/// One migration of a `dirty` VM that has written all of its memory first
/// (`--prefill`: no zero pages to flatter the stream) and writes `rate`
/// pages/s (None: as fast as it can); `migrate_args` go to `pcft migrate`.
pub(crate) fn migrate_once(
    pcft: &Path,
    mode: &str,
    mem: &str,
    rate: Option<u64>,
    migrate_args: &[&str],
) -> Result<Value> {
    let (src, dst) = (Agent::start(pcft, "source")?, Agent::start(pcft, "destination")?);
    let mut start =
        vec!["vm", "start", "--agent", src.addr(), "--name", "bench", "--fixture", "dirty", "--mem", mem, "--forever"];
    start.push("--prefill");
    let rate_text = rate.map(|r| r.to_string());
    if let Some(r) = &rate_text {
        start.extend(["--rate", r]);
    }
    pcft_ok(pcft, &start, PCFT_TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(300));
    let migrate = ["migrate", "bench", "--agent", src.addr(), "--to", dst.addr(), "--mode", mode, "--json"];
    pcft_json(pcft, &[&migrate[..], migrate_args].concat(), PCFT_TIMEOUT)
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
    let mut progress = crate::progress::Progress::new((mems.len() * rates.len() * modes.len()) as u64);
    for mem in mems {
        for (rate_name, rate) in rates {
            for mode in modes {
                progress.step(format!("migration: {mode}, {mem}, dirty {rate_name}"));
                let report = migrate_once(pcft, mode, mem, *rate, &[])?;
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
            // Null where none was measured (pre-copy: no page faulted).
            rep["fault_latency_us"]["p50"].as_u64().map_or("–".into(), |us| us.to_string()),
            rep["fault_latency_us"]["p99"].as_u64().map_or("–".into(), |us| us.to_string()),
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
