//! Helpers for PostCopyFT's integration tests: run the real `pcft` binary as
//! separate processes and read what it reported.
//!
//! The binary is the one cargo builds for the workspace (`target/<profile>/pcft`);
//! `cargo test --workspace` builds it because the agent has integration tests.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use vm_fixtures::OutputRecord;

/// Path of the `pcft` binary built alongside this test executable. Refuses a
/// binary older than the agent's sources: `cargo test -p pcft-tests` alone does
/// not rebuild it (`cargo test --workspace` and `cargo xtask test` do).
pub fn pcft_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/pcft
    let path = exe.parent().and_then(|d| d.parent()).expect("target/<profile>").join("pcft");
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!("{} is missing: build it with `cargo build -p pcft-agent` (cargo test --workspace does)", path.display())
    });
    let sources = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
    if let Some(newest) = newest_mtime(&sources) {
        assert!(
            built >= newest,
            "{} is older than {}: run `cargo build -p pcft-agent` (or `cargo test --workspace`)",
            path.display(),
            sources.display()
        );
    }
    path
}

fn newest_mtime(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                newest_mtime(&path)
            } else {
                entry.metadata().and_then(|m| m.modified()).ok()
            }
        })
        .max()
}

pub fn pcft(args: &[&str]) -> Command {
    let mut cmd = Command::new(pcft_path());
    cmd.args(args);
    cmd
}

/// What one `pcft vm run|restore --json` process reported.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stderr: String,
    /// Output records in the order the process printed them.
    pub outputs: Vec<OutputRecord>,
    pub snapshot: Option<Value>,
    pub finished: Option<Value>,
}

impl Run {
    pub fn verified(&self) -> bool {
        self.finished.as_ref().and_then(|f| f["verified"].as_bool()) == Some(true)
    }

    pub fn memory_digest(&self) -> u64 {
        let f = self.finished.as_ref().unwrap_or_else(|| panic!("no finished event; stderr: {}", self.stderr));
        parse_hex(f["memory_digest"].as_str().expect("memory_digest"))
    }
}

pub fn parse_hex(text: &str) -> u64 {
    u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {text}"))
}

/// Parses the JSON lines of a `--json` run.
pub fn parse_run(output: Output) -> Run {
    let mut run = Run {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        outputs: Vec::new(),
        snapshot: None,
        finished: None,
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        match v["event"].as_str() {
            Some("output") => run.outputs.push(OutputRecord {
                vcpu: v["vcpu"].as_u64().expect("vcpu") as u32,
                step: v["step"].as_u64().expect("step"),
                digest: parse_hex(v["digest"].as_str().expect("digest")),
            }),
            Some("snapshot") => run.snapshot = Some(v),
            Some("finished") => run.finished = Some(v),
            _ => {}
        }
    }
    run
}

/// Runs `pcft` with `args` plus `--json` and parses what it printed.
pub fn run_json(args: &[&str]) -> Run {
    let output = pcft(args).arg("--json").output().expect("spawn pcft");
    parse_run(output)
}

/// Splits records per vCPU, keeping each vCPU's order.
pub fn per_vcpu(records: &[OutputRecord], vcpus: usize) -> Vec<Vec<OutputRecord>> {
    let mut out = vec![Vec::new(); vcpus];
    for r in records {
        out[r.vcpu as usize].push(*r);
    }
    out
}

/// A `pcft agent` process on a free loopback port; killed when dropped.
pub struct Agent {
    pub addr: String,
    /// `http://…/metrics` when started with `--metrics` (the dashboard is at `http://…/`).
    pub metrics: Option<String>,
    child: std::process::Child,
}

impl Agent {
    pub fn start(name: &str, extra: &[&str]) -> Agent {
        Agent::spawn(pcft(&["agent", "--listen", "127.0.0.1:0", "--name", name]), extra)
    }

    /// [`start`](Self::start), with the agent's stderr (its log) going to the
    /// file `log`, at the agent's default log level unless `extra` says
    /// otherwise (`RUST_LOG` is not passed on).
    pub fn start_logging_to(name: &str, extra: &[&str], log: &std::path::Path) -> Agent {
        let file = std::fs::File::create(log).expect("create the agent's log file");
        let mut command = pcft(&["agent", "--listen", "127.0.0.1:0", "--name", name]);
        command.env_remove("RUST_LOG").stderr(file);
        Agent::spawn(command, extra)
    }

    /// An agent started by `command` (e.g. under `prlimit`), which must end in `pcft agent …`.
    pub fn spawn_command(command: Command, extra: &[&str]) -> Agent {
        Agent::spawn(command, extra)
    }

    fn spawn(mut command: Command, extra: &[&str]) -> Agent {
        use std::io::BufRead;
        // Without a key of its own, an agent must be told it may run open.
        let open = (!extra.contains(&"--psk-file")).then_some("--insecure");
        let mut child =
            command.args(open).args(extra).stdout(std::process::Stdio::piped()).spawn().expect("spawn pcft agent");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("agent stdout");
        let addr =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("agent said {line:?}")).to_string();
        let metrics = extra.contains(&"--metrics").then(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("agent stdout");
            // "metrics on http://ADDR/metrics, dashboard on http://ADDR/"
            let rest = line.trim().strip_prefix("metrics on ").unwrap_or_else(|| panic!("agent said {line:?}"));
            rest.split(',').next().expect("a URL").to_string()
        });
        Agent { addr, metrics, child }
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends the agent process `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child's pid; no memory is shared.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
    }

    /// Waits at most `timeout` for the agent to exit; its exit code (None: still running, or killed by a signal).
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs an `http://host:port/path` URL (HTTP/1.1, no keep-alive) and returns the body.
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the first sample line of `text` that starts with `series` (name and labels).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// Runs `pcft args…` and returns (exit code, stdout, stderr).
pub fn pcft_output(args: &[&str]) -> (Option<i32>, String, String) {
    let out = pcft(args).output().expect("spawn pcft");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `pcft args…`, expects exit 0, and parses its stdout as one JSON object.
pub fn pcft_json(args: &[&str]) -> Value {
    let (code, stdout, stderr) = pcft_output(args);
    assert_eq!(code, Some(0), "pcft {args:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("pcft {args:?} printed no JSON ({e}): {stdout}"))
}

/// Starts VM `name` on the agent at `agent` (`pcft vm start`) with `workload`'s
/// arguments (fixture, size, tracker…); fails the test with pcft's error otherwise.
pub fn start_vm(agent: &str, name: &str, workload: &[&str]) {
    let mut args = vec!["vm", "start", "--agent", agent, "--name", name];
    args.extend_from_slice(workload);
    let (code, _, err) = pcft_output(&args);
    assert_eq!(code, Some(0), "pcft vm start {name}: {err}");
}

/// `pcft migrate VM --agent FROM --to TO --mode MODE` plus `extra`: (exit code, stdout, stderr).
pub fn migrate(vm: &str, from: &str, to: &str, mode: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec!["migrate", vm, "--agent", from, "--to", to, "--mode", mode];
    args.extend_from_slice(extra);
    pcft_output(&args)
}

/// The oracle's memory digest for a ledger VM of `mem_mib` with the given steps (other parameters at their defaults).
pub fn ledger_digest(mem_mib: u64, vcpus: u64, steps: u64) -> (String, u64) {
    let ws_pages = ((mem_mib << 20) - vm_fixtures::abi::WORKING_SET_GPA) / vm_fixtures::abi::PAGE_SIZE;
    let params = vm_fixtures::FixtureParams {
        steps,
        ..vm_fixtures::FixtureParams::new(vm_fixtures::FixtureKind::Ledger, vcpus, ws_pages)
    };
    let expected = params.expected_after(steps);
    (format!("{:#018x}", expected.memory_digest()), expected.outputs().iter().map(|o| o.len() as u64).sum())
}

/// `pcft demo` of the small PostCopyFT run most tests use: a 64M ledger guest
/// with 2 vCPUs and 40000 steps, the post-copy push capped at 4096 pages/s (so
/// post-copy lasts up to 4 s, long enough for checkpoints and failures), and
/// the report as JSON. Add `--fail-at`, `--fail-kind` and the like.
pub const SMALL_FT_DEMO: [&str; 12] = [
    "demo",
    "--mode",
    "postcopy-ft",
    "--mem",
    "64M",
    "--vcpus",
    "2",
    "--steps",
    "40000",
    "--postcopy-rate",
    "4096",
    "--json",
];

/// Asserts the demo's independent "one copy at a time" check on a `pcft demo
/// --json` report: no run interval of the VM's copies at the source overlapped
/// one at the destination (`copies_overlap_ms`, from both agents' KVM_RUN run
/// logs), and at the end the VM runs (or finished) at exactly one agent
/// (`copies_at_end`; the documented exception is a `finish-unconfirmed` failure).
pub fn assert_one_copy_at_a_time(report: &Value) {
    let what = report.to_string();
    assert_eq!(report["copies_overlap_ms"].as_f64(), Some(0.0), "the two copies ran at once: {what}");
    if report["failure"]["kind"] != "finish-unconfirmed" {
        assert_eq!(report["copies_at_end"], 1, "exactly one copy at the end: {what}");
    }
}

pub use vm_fixtures::kv::resp;

/// The network namespaces a demo run made (its report's `testbed_namespaces`,
/// if any) are gone. Only its own are checked (other runs on this machine may
/// have theirs).
pub fn assert_testbed_removed(report: &Value) {
    let names: Vec<&str> =
        report["testbed_namespaces"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let listed = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    for name in names {
        assert!(
            !listed.lines().any(|l| l.split_whitespace().next() == Some(name)),
            "the demo left its namespace {name} behind: {listed}"
        );
    }
}

/// A `kv` guest served by a `pcft vm run --net tap` process of its own, on a
/// tap and network unique to it (tests run at once); stopped with SIGINT
/// (its tap is removed) when dropped.
pub struct KvVm {
    pub child: std::process::Child,
    pub tap: String,
    pub ip: std::net::Ipv4Addr,
    pub host_ip: std::net::Ipv4Addr,
    /// The JSON lines it printed up to and including `serving`.
    pub lines: Vec<Value>,
    stdout: Option<std::io::BufReader<std::process::ChildStdout>>,
    /// Its stderr (the log).
    pub log: PathBuf,
}

static KV_VMS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The arguments of a 64M `kv` guest on its own tap `tap` (`vm run`, `vm start`).
pub fn kv_on_tap(tap: &str, ip: std::net::Ipv4Addr, host_ip: std::net::Ipv4Addr) -> Vec<String> {
    let (ip, host_ip) = (ip.to_string(), host_ip.to_string());
    let args =
        ["--fixture", "kv", "--mem", "64M", "--net", "tap", "--tap", tap, "--guest-ip", &ip, "--host-ip", &host_ip];
    args.iter().map(|s| s.to_string()).collect()
}

/// A tap name and a /24 unique to this process and call.
pub fn unique_net() -> (String, std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let n = KV_VMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    let tap = format!("pkv{}x{n}", pid % 100_000);
    let (b, c) = (100 + (n % 100) as u8, (pid % 250) as u8);
    (tap, std::net::Ipv4Addr::new(10, b, c, 2), std::net::Ipv4Addr::new(10, b, c, 1))
}

impl KvVm {
    /// `pcft vm run --fixture kv` with `extra` arguments; waits until it serves.
    pub fn start(extra: &[&str]) -> KvVm {
        let (tap, ip, host_ip) = unique_net();
        Self::start_on(&tap, ip, host_ip, &["vm", "run"], extra)
    }

    /// Runs `pcft <how> … --json` for a kv guest on `tap` and waits for its `serving` line.
    pub fn start_on(
        tap: &str,
        ip: std::net::Ipv4Addr,
        host_ip: std::net::Ipv4Addr,
        how: &[&str],
        extra: &[&str],
    ) -> KvVm {
        use std::io::BufRead;
        let mut args: Vec<String> = how.iter().map(|s| s.to_string()).collect();
        if how == ["vm", "run"] {
            args.extend(kv_on_tap(tap, ip, host_ip));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--json".into());
        // Its log goes to a file, shown if it fails.
        let log =
            std::env::temp_dir().join(format!("pcft-{tap}-{}.log", KV_VMS.load(std::sync::atomic::Ordering::Relaxed)));
        let mut child = Command::new(pcft_path())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the log file"))
            .spawn()
            .expect("spawn pcft");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).expect("read pcft's output") == 0 {
                let status = child.wait().expect("wait pcft");
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("pcft {args:?} ended ({status}) before it served; it printed {lines:?}; its log:\n{log}");
            }
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let serving = v["event"] == "serving";
            lines.push(v);
            if serving {
                break;
            }
        }
        KvVm { child, tap: tap.to_string(), ip, host_ip, lines, stdout: Some(stdout), log }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.ip, 6379))
    }

    pub fn client(&self) -> resp::Client {
        resp::Client::connect(self.addr(), std::time::Duration::from_secs(10)).expect("connect to the kv guest")
    }

    /// Waits for the process to end by itself; returns its exit code and the JSON lines it printed after `serving`.
    pub fn wait(mut self) -> (Option<i32>, Vec<Value>) {
        use std::io::BufRead;
        let mut rest = Vec::new();
        if let Some(stdout) = self.stdout.take() {
            for line in stdout.lines().map_while(Result::ok) {
                rest.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")));
            }
        }
        let code = self.child.wait().expect("wait pcft").code();
        (code, rest)
    }

    /// Stops it as Ctrl-C does; returns its exit code and its lines after `serving`.
    pub fn stop(self) -> (Option<i32>, Vec<Value>) {
        // SAFETY: kill(2) of our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait()
    }
}

impl Drop for KvVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) of our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `ip args…` (iproute2) and fails the test with its error if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace (`ip netns add`) with its loopback up; deleted on drop,
/// with every interface in it (a test's fabric goes even when the test fails).
pub struct Netns(pub String);

impl Netns {
    pub fn add(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        let ns = Netns(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `ip -n NS args…`, failing the test if it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `ip -n NS -j args…` as JSON (e.g. `link show dev X`, `-4 addr show dev X`).
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let out = Command::new("ip").args(["-n", &self.0, "-j"]).args(args).output().expect("run ip (iproute2)");
        assert!(out.status.success(), "ip -n {} -j {args:?}: {}", self.0, String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("ip -j {args:?} printed no JSON: {e}"))
    }

    /// `pcft args…` run inside this namespace (`ip netns exec`): (exit code, stdout, stderr).
    pub fn pcft(&self, args: &[&str]) -> (Option<i32>, String, String) {
        pcft_in(&self.0, args)
    }

    /// [`Agent::start`] inside this namespace, listening on `listen` (an address of the namespace's).
    pub fn agent(&self, name: &str, listen: &str, extra: &[&str]) -> Agent {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0]).arg(pcft_path()).args(["agent", "--listen", listen, "--name", name]);
        Agent::spawn(command, extra)
    }

    /// A command's output run inside this namespace, for a test's diagnostics (never fails).
    pub fn show(&self, program: &str, args: &[&str]) -> String {
        match Command::new("ip").args(["netns", "exec", &self.0, program]).args(args).output() {
            Ok(out) => format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            Err(e) => format!("({program}: {e})"),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `pcft args…` run inside network namespace `ns` (`ip netns exec`): (exit code, stdout, stderr).
pub fn pcft_in(ns: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("ip").args(["netns", "exec", ns]).arg(pcft_path()).args(args).output().expect("run pcft");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// Runs `f` on a thread inside network namespace `ns` (its sockets live there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) on this thread only, with an fd we hold open.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}
