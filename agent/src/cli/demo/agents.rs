//! The two `pcft agent` processes the demo starts (in network namespaces of
//! their own when the failure is on the network), and where it reaches them.

use super::fail_at::FailAt;
use super::key::DemoKey;
use super::plan::FaultPlan;
use crate::cli::netns::Testbed;
use crate::cli::{run_failure, DemoArgs, FailKind, Failure};
use anyhow::{anyhow, Context};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The agents' control and migration port inside a network namespace.
const NS_PORT: u16 = 7401;
/// The agents' metrics and dashboard port inside a network namespace.
const NS_HTTP_PORT: u16 = 7480;

/// The agent processes the demo started; killed when dropped, whatever happened.
pub struct Agents {
    children: Vec<Child>,
    /// The key they all hold (None: `--no-auth`).
    key: Option<DemoKey>,
}

/// Where the demo reaches its agents, and which processes they are.
pub struct Endpoints {
    /// The source agent's address, from the demo.
    pub source: String,
    /// The destination agent's address, from the demo.
    pub destination: String,
    /// The destination's address as the source migrates to it (over the link
    /// between the hosts, when they are namespaces).
    pub migrate_to: String,
    /// One dashboard page that plots both agents (with `--dashboard`).
    pub dashboard_url: Option<String>,
    pub source_pid: u32,
    pub destination_pid: u32,
}

/// Where the agents send released output, and on which network.
pub struct AgentSetting<'a> {
    /// The network namespaces of the two hosts (partition, lossy).
    pub testbed: Option<&'a Testbed>,
    /// The outside world's listener (HOST:PORT, as the demo sees it).
    pub outside: &'a str,
    /// Where the destination traces its guest's frames (a serving VM).
    pub frame_trace: Option<&'a std::path::Path>,
}

impl Agents {
    /// Starts the source agent, then the destination agent (with the failure
    /// it injects itself), authenticated with a demo key unless `--no-auth`.
    pub fn start_both(args: &DemoArgs, fault: &FaultPlan, at: &AgentSetting) -> Result<(Agents, Endpoints), Failure> {
        let key = if args.no_auth { None } else { Some(DemoKey::new()?) };
        let mut agents = Agents { children: Vec::new(), key };
        let outside_port = port_of(at.outside);
        let listen = if fault.netns { format!("0.0.0.0:{NS_PORT}") } else { "127.0.0.1:0".to_string() };
        // `--metrics` for each agent when there is a dashboard: the source's where asked, the destination's anywhere.
        let http_listen = |asked: &str| match (&args.dashboard, fault.netns) {
            (None, _) => Vec::new(),
            (Some(_), true) => vec!["--metrics".to_string(), format!("0.0.0.0:{NS_HTTP_PORT}")],
            (Some(_), false) => vec!["--metrics".to_string(), asked.to_string()],
        };

        let source_sink = match at.testbed {
            Some(bed) => bed.outside_from_source(outside_port),
            None => at.outside.to_string(),
        };
        let mut source_args = vec!["--output-sink".to_string(), source_sink];
        source_args.extend(http_listen(args.dashboard.as_deref().unwrap_or_default()));
        if fault.slow_disk {
            source_args.extend(["--staging-memory", "0", "--staging-delay-ms"].map(String::from));
            source_args.push(args.disk_delay_ms.to_string());
        }
        let started = agents.start("source", at.testbed.map(|b| b.source_ns.as_str()), &listen, &source_args)?;
        let (source, source_dashboard) = match at.testbed {
            Some(bed) => (bed.source_addr(NS_PORT), started.http.map(|_| bed.source_addr(NS_HTTP_PORT))),
            None => (started.addr, started.http),
        };

        let destination_sink = match at.testbed {
            Some(bed) => bed.outside_from_destination(outside_port),
            None => at.outside.to_string(),
        };
        let mut dest_args = vec!["--output-sink".to_string(), destination_sink];
        dest_args.extend(crash_args(fault));
        if args.no_output_commit {
            dest_args.push("--no-output-commit".into());
        }
        if let Some(trace) = at.frame_trace {
            dest_args.extend(["--frame-trace".to_string(), trace.display().to_string()]);
        }
        dest_args.extend(http_listen("127.0.0.1:0"));
        let started =
            agents.start("destination", at.testbed.map(|b| b.destination_ns.as_str()), &listen, &dest_args)?;
        // The CLI reaches the destination's agent here; the source migrates to `migrate_to`
        // (over the link between the hosts, when they are namespaces).
        let (destination, migrate_to, destination_dashboard) = match at.testbed {
            Some(bed) => (
                bed.destination_addr(NS_PORT),
                bed.destination_over_pair(NS_PORT),
                started.http.map(|_| bed.destination_addr(NS_HTTP_PORT)),
            ),
            None => (started.addr.clone(), started.addr, started.http),
        };
        // One page plots both agents: the source's serves it, the destination is its peer.
        let dashboard_url = match (&source_dashboard, &destination_dashboard) {
            (Some(source), Some(destination)) => Some(format!("http://{source}/?peers={destination}")),
            _ => None,
        };
        let destination_pid = agents.children.last().map(|c| c.id()).expect("just started");
        let source_pid = agents.children.first().map(|c| c.id()).expect("started first");
        let endpoints = Endpoints { source, destination, migrate_to, dashboard_url, source_pid, destination_pid };
        Ok((agents, endpoints))
    }

    /// Starts `pcft agent` listening on `listen`, in network namespace `ns` if given.
    fn start(&mut self, name: &str, ns: Option<&str>, listen: &str, extra: &[String]) -> Result<Started, Failure> {
        let (child, started) = spawn_agent(name, ns, listen, self.key.as_ref(), extra)?;
        self.children.push(child);
        Ok(started)
    }
}

/// Where a started agent listens.
pub struct Started {
    /// Its control and migration address.
    pub addr: String,
    /// Its metrics and dashboard address (HOST:PORT), when started with `--metrics`.
    pub http: Option<String>,
}

/// Starts `pcft agent --name NAME --listen LISTEN EXTRA…` (in network
/// namespace `ns` if given; with `key`, else `--insecure`) and reads where it
/// listens. The caller owns (and must kill) the child; on an error it is killed here.
pub fn spawn_agent(
    name: &str,
    ns: Option<&str>,
    listen: &str,
    key: Option<&DemoKey>,
    extra: &[String],
) -> Result<(Child, Started), Failure> {
    let exe = std::env::current_exe().context("cannot find the pcft executable").map_err(run_failure)?;
    let mut command = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = command
        .args(["agent", "--listen", listen, "--name", name])
        .args(key.iter().flat_map(|key| [std::ffi::OsStr::new("--psk-file"), key.file.as_os_str()]))
        .args(key.is_none().then_some("--insecure"))
        // The demo's report is the story; the agents' lifecycle lines (their
        // default) would interleave with it. RUST_LOG still reaches them.
        .args(std::env::var_os("RUST_LOG").is_none().then_some(["--log", "warn"]).into_iter().flatten())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the {name} agent"))
        .map_err(run_failure)?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut read_after = |prefix: &str| -> Result<String, Failure> {
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(run_failure)?;
        line.trim()
            .strip_prefix(prefix)
            .map(str::to_string)
            .ok_or_else(|| run_failure(anyhow!("the {name} agent did not start (it printed {line:?})")))
    };
    let started = (|| {
        let addr = read_after("listening on ")?;
        // "metrics on http://HOST:PORT/metrics, dashboard on …"
        let http = match extra.iter().any(|arg| arg == "--metrics") {
            true => Some(read_after("metrics on http://")?.split('/').next().unwrap_or_default().to_string()),
            false => None,
        };
        Ok(Started { addr, http })
    })();
    match started {
        Ok(started) => Ok((child, started)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The destination's fault-injection arguments: where it fails by itself
/// (`--crash-at`), and how (`--crash-signal`, `--stall-fence-ms`).
fn crash_args(fault: &FaultPlan) -> Vec<String> {
    let FailAt::Point(_) = &fault.fail_at else { return Vec::new() };
    let mut crash = vec!["--crash-at".to_string(), fault.fail_at.name().replace("epoch:", "committed:")];
    let crash_signal = match fault.kind {
        FailKind::Freeze => Some("stop"),
        // The destination's checkpointer hangs there; its heartbeats go on.
        FailKind::Stall => Some("stall"),
        // The destination goes silent there; its vCPUs and watchdog stall.
        FailKind::StallFence => Some("stall-fence"),
        _ => None,
    };
    if let Some(signal) = crash_signal {
        crash.extend(["--crash-signal".to_string(), signal.to_string()]);
        if fault.stall_fence {
            crash.extend(["--stall-fence-ms".to_string(), fault.stall_fence_ms.to_string()]);
        }
    }
    crash
}

/// The port of a HOST:PORT address (0 if it has none).
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}
