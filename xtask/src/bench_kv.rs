//! `cargo xtask bench --only kv`: redis-benchmark against the `kv` guest
//! (a Rust key-value server on smoltcp behind pcft's virtio-net and a tap),
//! beside the same benchmark against Debian's redis-server on this host, for
//! scale (every guest instruction is emulated here, so the guest is far
//! slower); plus the guest's boot-to-serving time and image size.
//! Results: target/bench/kv.{md,json}, and stdout.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TAP: &str = "pcft-bench0";
const GUEST_IP: &str = "10.78.0.2";
const HOST_IP: &str = "10.78.0.1";
const REDIS_PORT: &str = "6391";
/// The goal for GET and SET with 4 clients, per vCPU.
const GOAL_RPS: f64 = 300.0;

/// One row of `redis-benchmark --csv`.
#[derive(Clone, Debug)]
struct Row {
    test: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn benchmark(host: &str, port: &str, requests: u64, clients: u64) -> Result<Vec<Row>> {
    let (n, c) = (requests.to_string(), clients.to_string());
    let out = Command::new("redis-benchmark")
        .args(["-h", host, "-p", port, "-t", "set,get,incr", "-n", &n, "-c", &c, "--csv"])
        .output()
        .context("cannot run redis-benchmark: apt-get install redis-tools (cargo xtask setup does)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("ERR") {
        bail!("redis-benchmark against {host}:{port} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').map(|s| s.trim_matches('"')).collect();
        if f.len() < 7 {
            continue;
        }
        let num = |i: usize| f[i].parse::<f64>().with_context(|| format!("redis-benchmark line {line:?}"));
        rows.push(Row { test: f[0].to_string(), rps: num(1)?, p50_ms: num(4)?, p99_ms: num(6)? });
    }
    if rows.len() != 3 {
        bail!("redis-benchmark printed {} result rows, not 3: {text}", rows.len());
    }
    Ok(rows)
}

/// A kv guest serving on the bench's tap, stopped when dropped.
struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        // Ctrl-C: it stops and removes its tap.
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// Boots the guest; returns it, its boot-to-serving ms and its image size.
fn start_guest(pcft: &Path) -> Result<(Guest, f64, Option<u64>)> {
    let mut child = Command::new(pcft)
        .args(["vm", "run", "--fixture", "kv", "--mem", "256M", "--net", "tap", "--tap", TAP])
        .args(["--guest-ip", GUEST_IP, "--host-ip", HOST_IP, "--seconds", "3600", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run pcft vm run --fixture kv")?;
    let stdout = child.stdout.take().expect("piped");
    let guest = Guest(child);
    for line in std::io::BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line?).context("pcft printed a line that is not JSON")?;
        if v["event"] == "serving" {
            let ms = v["ms"].as_f64().context("serving line without ms")?;
            return Ok((guest, ms, v["guest_image_bytes"].as_u64()));
        }
    }
    bail!("the kv guest ended before it served")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(root: &Path, pcft: &Path, quick: bool) -> Result<()> {
    let (requests, reps) = if quick { (600u64, 1) } else { (3000u64, 3) };
    let mut progress = crate::progress::Progress::new(reps as u64 * 2);
    let mut guest_runs: Vec<Vec<Row>> = Vec::new();
    let mut host_runs: Vec<Vec<Row>> = Vec::new();
    let mut boot_ms = Vec::new();
    let mut image_bytes = None;
    for rep in 0..reps {
        progress.step(format!("kv: guest, run {}/{reps}", rep + 1));
        let (guest, ms, bytes) = start_guest(pcft)?;
        boot_ms.push(ms);
        image_bytes = image_bytes.or(bytes);
        guest_runs.push(benchmark(GUEST_IP, "6379", requests, 4)?);
        drop(guest);

        progress.step(format!("kv: redis-server on this host, run {}/{reps}", rep + 1));
        let mut server = Command::new("redis-server")
            .args(["--port", REDIS_PORT, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot run redis-server: apt-get install redis-server (cargo xtask setup does)")?;
        std::thread::sleep(Duration::from_millis(300));
        let rows = benchmark("127.0.0.1", REDIS_PORT, requests * 10, 4);
        let _ = server.kill();
        let _ = server.wait();
        host_runs.push(rows?);
    }

    let tests = ["SET", "GET", "INCR"];
    let pick = |runs: &[Vec<Row>], test: &str, f: fn(&Row) -> f64| {
        median(runs.iter().flat_map(|r| r.iter().filter(|row| row.test == test).map(f)).collect())
    };
    let mut md = format!(
        "# kv guest benchmark\n\n`redis-benchmark -t set,get,incr -c 4` against the `kv` guest (256M, 1 vCPU, \
         pcft's virtio-net on a tap; every guest instruction emulated here) and against Debian's redis-server on \
         this host over loopback (10× the requests), median of {reps} run(s). Guest: {requests} requests per test.\n\n\
         | test | guest req/s | guest p50 ms | guest p99 ms | redis-server req/s | p50 ms | p99 ms | guest/host |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut rows = Vec::new();
    for test in tests {
        let g = (
            pick(&guest_runs, test, |r| r.rps),
            pick(&guest_runs, test, |r| r.p50_ms),
            pick(&guest_runs, test, |r| r.p99_ms),
        );
        let h = (
            pick(&host_runs, test, |r| r.rps),
            pick(&host_runs, test, |r| r.p50_ms),
            pick(&host_runs, test, |r| r.p99_ms),
        );
        md.push_str(&format!(
            "| {test} | {:.0} | {:.2} | {:.2} | {:.0} | {:.3} | {:.3} | {:.4} |\n",
            g.0,
            g.1,
            g.2,
            h.0,
            h.1,
            h.2,
            g.0 / h.0
        ));
        rows.push(json!({"test": test, "guest_rps": g.0, "guest_p50_ms": g.1, "guest_p99_ms": g.2,
                         "host_rps": h.0, "host_p50_ms": h.1, "host_p99_ms": h.2, "goal_rps": GOAL_RPS}));
    }
    let boot = median(boot_ms.clone());
    md.push_str(&format!(
        "\nBoot to serving: {boot:.0} ms (median; start of `pcft vm run` to the guest's SERVING report). \
         Guest image: {} bytes. Goal: ≥ {GOAL_RPS:.0} requests/s per vCPU for GET and SET with 4 clients: {}.\n",
        image_bytes.map_or("unknown".into(), |b| b.to_string()),
        if ["SET", "GET"].iter().all(|t| pick(&guest_runs, t, |r| r.rps) >= GOAL_RPS) { "met" } else { "NOT met" }
    ));
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("kv.md"), &md)?;
    let result = json!({"rows": rows, "boot_to_serving_ms": boot, "guest_image_bytes": image_bytes,
                        "requests": requests, "clients": 4, "runs": reps});
    std::fs::write(out.join("kv.json"), serde_json::to_string_pretty(&result)?)?;
    println!("{md}");
    Ok(())
}
