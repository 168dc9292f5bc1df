//! `pcft soak`: reliability under time. A `kv` VM migrates back and forth
//! between two agents in `postcopy-ft` every few seconds for `--minutes`,
//! with its clients writing and reading throughout; every `--fail-every`-th
//! migration fails (the destination is SIGKILLed and restarted, frozen past
//! its lease and continued, or cut off by a partition that is healed), and a
//! VM that failed over migrates again. Both agents are sampled every two
//! seconds (RSS, file descriptors, staging files, threads, taps in their
//! namespace): nothing may grow with the number of migrations. At the end the
//! clients' history must hold (no acknowledged write lost, no stale read,
//! the store as read back), the VM must serve, and nothing may be left
//! behind (namespaces, taps, processes, files).

mod hosts;
mod resources;

use crate::cli::demo::agent_calls::client_error;
use crate::cli::demo::clients::{ClientReport, Clients};
use crate::cli::demo::key::DemoKey;
use crate::cli::netns::{ClientLan, Testbed};
use crate::cli::remote::runtime;
use crate::cli::vm::{machine_config, KVM_PATH};
use crate::cli::{run_failure, usage, FailKind, Failure, SoakArgs, TrackerArg, WorkloadArgs};
use anyhow::anyhow;
use hosts::{Host, PORT};
use pcft_agent::agent::client::{AgentClient, ClientError};
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::{MigrationOptions, MigrationReport, Mode};
use resources::{Growth, Sample};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The VM's name on both agents.
const VM: &str = "kv";
/// How long into a failing migration its failure comes (post-copy lasts about 4 s).
const FAIL_AFTER: Duration = Duration::from_millis(400);
/// The failures, in the order failing migrations take them.
const FAILURES: [FailKind; 3] = [FailKind::Crash, FailKind::Partition, FailKind::Freeze];

/// How one migration of the soak ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Completed,
    /// Failed over to the source after the injected failure.
    Recovered,
    /// Failed before its switchover after the injected failure: the VM ran on at the source.
    KeptAtSource,
    /// Any other end (why), a failure of the soak.
    Failed(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Completed => f.write_str("completed"),
            Outcome::Recovered => f.write_str("recovered"),
            Outcome::KeptAtSource => f.write_str("kept at the source"),
            Outcome::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

impl serde::Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One migration of the soak.
#[derive(serde::Serialize)]
struct Round {
    n: u32,
    from: &'static str,
    to: &'static str,
    /// The failure injected (its `--fail-kind` name; None: none).
    failure: Option<String>,
    outcome: Outcome,
    total_migration_ms: Option<f64>,
    downtime_ms: f64,
    failover_ms: Option<f64>,
}

/// `pcft soak`.
pub fn soak(args: SoakArgs) -> Result<(), Failure> {
    pcft_agent::host::check_kvm(std::path::Path::new(KVM_PATH)).map_err(usage)?;
    let config = machine_config(&workload(&args))?;
    let net = config.fixture.net.clone().ok_or_else(|| usage(anyhow!("the kv fixture has no network")))?;
    let testbed = Testbed::create(Some(&format!("{}/{}", net.gateway, net.prefix))).map_err(usage)?;
    let lan = testbed.clients.as_ref().expect("a testbed with clients");
    let key = DemoKey::new()?;
    let mut hosts = [
        Host::new("a", &testbed.source_ns, testbed.source_addr(PORT), testbed.source_over_pair(PORT)),
        Host::new("b", &testbed.destination_ns, testbed.destination_addr(PORT), testbed.destination_over_pair(PORT)),
    ];
    for host in &mut hosts {
        host.start(&key)?;
    }
    let started = Instant::now();
    let pids = Arc::new([AtomicU32::new(hosts[0].pid()), AtomicU32::new(hosts[1].pid())]);
    let sampler = Sampler::start(Arc::clone(&pids), [hosts[0].ns.clone(), hosts[1].ns.clone()], started);

    runtime().block_on(async {
        let mut client = AgentClient::connect(&hosts[0].control).await.map_err(client_error)?;
        let start = ControlMessage::StartVm { name: VM.into(), config, tracking: TrackerArg::Bitmap.into() };
        client.request(&start).await.map_err(client_error).map(drop)
    })?;
    let clients = Clients::start(&lan.ns, SocketAddr::from((net.ip, net.port)), args.clients);
    runtime().block_on(clients.wait_serving(20, Duration::from_secs(60)))?;

    let deadline = started + Duration::from_secs_f64(args.minutes * 60.0);
    let mut rounds = Vec::new();
    let mut at = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs_f64(args.every_secs));
        let n = rounds.len() as u32 + 1;
        let failure = (args.fail_every > 0 && n.is_multiple_of(args.fail_every))
            .then(|| FAILURES[(n / args.fail_every - 1) as usize % FAILURES.len()]);
        let round = migrate_once(&mut hosts, &testbed, &key, at, n, failure, &args)?;
        if round.outcome == Outcome::Completed {
            at = 1 - at;
        }
        for (i, host) in hosts.iter().enumerate() {
            pids[i].store(host.pid(), Ordering::Relaxed);
        }
        // Progress: on stdout, or with --json on stderr (stdout is the report's).
        let line = format!(
            "migration {n} at {:.0} s: {} → {}{}: {}",
            started.elapsed().as_secs_f64(),
            round.from,
            round.to,
            round.failure.as_ref().map_or(String::new(), |f| format!(" ({f})")),
            round.outcome
        );
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
        rounds.push(round);
    }

    let clients = clients.finish(None);
    let samples = sampler.finish();
    let growth = resources::growth(&samples);
    let serving_at = hosts[at].name;
    drop(hosts);
    let key_dir = key.dir().to_path_buf();
    drop(key);
    let namespaces = testbed.namespaces();
    drop(testbed);
    let left_behind = left_behind(&namespaces, &key_dir);
    let report = SoakReport { args: &args, rounds, clients, samples, growth, left_behind, serving_at, started };
    report.print();
    report.verdict()
}

/// The soak's VM: the kv fixture, its tap on each host's bridge.
fn workload(args: &SoakArgs) -> WorkloadArgs {
    WorkloadArgs { net: ClientLan::vm_net(), ..WorkloadArgs::new("kv", &args.mem) }
}

/// One migration from `hosts[from]` to the other, with `failure` injected
/// `FAIL_AFTER` into it and undone after (a killed agent is started again).
fn migrate_once(
    hosts: &mut [Host; 2],
    testbed: &Testbed,
    key: &DemoKey,
    from: usize,
    n: u32,
    failure: Option<FailKind>,
    args: &SoakArgs,
) -> Result<Round, Failure> {
    let to = 1 - from;
    // A crash or a freeze: a signal to the destination agent, from a thread of its own.
    let destination_pid = hosts[to].pid() as libc::pid_t;
    let signal = match failure {
        Some(FailKind::Crash) => Some(libc::SIGKILL),
        Some(FailKind::Freeze) => Some(libc::SIGSTOP),
        _ => None,
    };
    let injector = signal.map(|signal| {
        std::thread::spawn(move || {
            std::thread::sleep(FAIL_AFTER);
            // SAFETY: kill(2) of the destination agent, our own child (reaped only after this thread is joined).
            unsafe { libc::kill(destination_pid, signal) };
        })
    });
    // A partition: the link between the hosts is cut from here, while the migration runs.
    let partition_at = (failure == Some(FailKind::Partition)).then(|| Instant::now() + FAIL_AFTER);
    let request = ControlMessage::Migrate {
        name: VM.into(),
        to: hosts[to].over_pair.clone(),
        mode: Mode::PostcopyFt,
        options: MigrationOptions { postcopy_pages_per_sec: args.postcopy_rate, ..MigrationOptions::default() },
        detach: false,
    };
    let control = hosts[from].control.clone();
    let migrated = runtime().block_on(async {
        let mut client = AgentClient::connect(&control).await?;
        let migration = client.request(&request);
        tokio::pin!(migration);
        if let Some(at) = partition_at {
            tokio::select! {
                answer = &mut migration => return answer,
                () = tokio::time::sleep_until(at.into()) => {
                    if let Err(e) = testbed.cut() {
                        eprintln!("pcft soak: cannot cut the link: {e:#}");
                    }
                }
            }
        }
        migration.await
    });
    if let Some(injector) = injector {
        let _ = injector.join();
    }
    // Undo: heal, continue, or start the killed agent again.
    match failure {
        Some(FailKind::Partition) => testbed.heal().map_err(run_failure)?,
        Some(FailKind::Freeze) => hosts[to].signal(libc::SIGCONT),
        Some(FailKind::Crash) => {
            hosts[to].kill();
            hosts[to].start(key)?;
        }
        _ => {}
    }
    // An agent that came back after a crash holds no VM: nothing it had received runs again.
    let stale = match failure {
        Some(FailKind::Crash) => vms_at(&hosts[to].control),
        _ => Vec::new(),
    };
    let (from_name, to_name) = (hosts[from].name, hosts[to].name);
    let round = |outcome: Outcome, report: Option<&MigrationReport>| Round {
        n,
        from: from_name,
        to: to_name,
        failure: failure.map(FailKind::name),
        outcome: match stale.is_empty() {
            true => outcome,
            false => Outcome::Failed(format!("the restarted destination runs {stale:?}")),
        },
        total_migration_ms: report.map(|r| r.total_migration_ms).filter(|ms| ms.is_finite()),
        downtime_ms: report.map_or(f64::NAN, |r| r.downtime_ms),
        failover_ms: report.and_then(|r| r.failover.as_ref().map(|f| f.failover_ms)),
    };
    Ok(match migrated {
        Ok(ControlMessage::Migrated(report)) => {
            let outcome = match (&report.failover, &report.failure) {
                (Some(_), _) => Outcome::Recovered,
                (None, None) => Outcome::Completed,
                (None, Some(f)) => Outcome::Failed(f.kind.clone()),
            };
            round(outcome, Some(&report))
        }
        Ok(other) => round(Outcome::Failed(format!("the source answered {other:?}")), None),
        // The failure came before the switchover (e.g. a freeze before the
        // destination was ready): the migration failed and the VM runs on at
        // the source, as it must.
        Err(ClientError::Failed { vm_runs_here: true, .. }) if failure.is_some() => round(Outcome::KeptAtSource, None),
        Err(e) => round(Outcome::Failed(e.to_string()), None),
    })
}

/// The VMs the agent at `control` has (its `pcft status`); a VM named
/// `unreachable` if it cannot be asked.
fn vms_at(control: &str) -> Vec<String> {
    runtime().block_on(async {
        let asked = async {
            let mut client = AgentClient::connect(control).await?;
            client.request(&ControlMessage::Status).await
        };
        match asked.await {
            Ok(ControlMessage::StatusReport { vms, .. }) => vms.into_iter().map(|vm| vm.name).collect(),
            _ => vec!["unreachable".to_string()],
        }
    })
}

/// Samples both agents every two seconds on a thread of its own.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(pids: Arc<[AtomicU32; 2]>, namespaces: [String; 2], started: Instant) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let t_s = started.elapsed().as_secs_f64();
                for (i, host) in ["a", "b"].iter().enumerate() {
                    let pid = pids[i].load(Ordering::Relaxed);
                    samples.extend(resources::sample(t_s, host, pid, &namespaces[i]));
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            samples
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// What the soak left behind once everything stopped: its `namespaces`, its key's directory.
fn left_behind(namespaces: &[String], key_dir: &std::path::Path) -> Vec<String> {
    let listed = std::process::Command::new("ip").args(["netns", "list"]).output();
    let listed = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut left: Vec<String> = namespaces
        .iter()
        .filter(|ns| listed.lines().any(|l| l.split_whitespace().next() == Some(ns.as_str())))
        .map(|ns| format!("network namespace {ns}"))
        .collect();
    if key_dir.exists() {
        left.push(format!("directory {}", key_dir.display()));
    }
    left
}

/// What the soak found.
struct SoakReport<'a> {
    args: &'a SoakArgs,
    rounds: Vec<Round>,
    clients: ClientReport,
    samples: Vec<Sample>,
    growth: Vec<Growth>,
    left_behind: Vec<String>,
    serving_at: &'static str,
    started: Instant,
}

impl SoakReport<'_> {
    /// Migrations that ended in none of the expected ways.
    fn failed(&self) -> usize {
        self.rounds.iter().filter(|r| matches!(r.outcome, Outcome::Failed(_))).count()
    }

    fn count(&self, outcome: &Outcome) -> usize {
        self.rounds.iter().filter(|r| r.outcome == *outcome).count()
    }

    fn grew(&self) -> Vec<String> {
        self.growth
            .iter()
            .flat_map(|g| g.grew.iter().map(move |w| format!("agent {} (pid {}): {w}", g.host, g.pid)))
            .collect()
    }

    fn print(&self) {
        let (clients, f) = (&self.clients, &self.clients.findings);
        if self.args.json {
            let object = json!({
                "minutes": self.started.elapsed().as_secs_f64() / 60.0,
                "migrations": self.rounds.len(),
                "failures_injected": self.rounds.iter().filter(|r| r.failure.is_some()).count(),
                "completed": self.count(&Outcome::Completed),
                "recovered": self.count(&Outcome::Recovered),
                "kept_at_source": self.count(&Outcome::KeptAtSource),
                "failed": self.failed(),
                "serving_at": self.serving_at,
                "client_ops": f.ops,
                "client_acked_writes": f.acked_writes,
                "acked_writes_lost": f.acked_writes_lost,
                "stale_reads": f.stale_reads,
                "unexplained_reads": f.unexplained_reads,
                "client_reconnects": clients.reconnects,
                "client_max_gap_ms": clients.max_gap.as_secs_f64() * 1e3,
                "store_digest_matches": clients.digest_matches,
                "client_error": clients.error,
                "verified": self.problem().is_none(),
                "error": self.problem(),
                "grew": self.grew(),
                "growth": self.growth,
                "left_behind": self.left_behind,
                "rounds": self.rounds,
                "samples": self.samples,
            });
            println!("{object}");
            return;
        }
        println!(
            "{} migrations in {:.1} min: {} completed, {} failed over after an injected failure, {} failed \
             before the switchover (the VM ran on at the source), {} failed otherwise; the VM serves at host {}",
            self.rounds.len(),
            self.started.elapsed().as_secs_f64() / 60.0,
            self.count(&Outcome::Completed),
            self.count(&Outcome::Recovered),
            self.count(&Outcome::KeptAtSource),
            self.failed(),
            self.serving_at
        );
        println!(
            "clients: {} operations, {} acknowledged writes, {} lost, {} stale reads, {} reconnects; longest time \
             without an answer {:.0} ms",
            f.ops,
            f.acked_writes,
            f.acked_writes_lost,
            f.stale_reads,
            clients.reconnects,
            clients.max_gap.as_secs_f64() * 1e3
        );
        for g in &self.growth {
            println!(
                "agent {} (pid {}): RSS {} → {} KiB, fds {} → {}, threads {} → {}, staging files {} → {}, taps {} → {}",
                g.host,
                g.pid,
                g.first.rss_kib,
                g.last.rss_kib,
                g.first.fds,
                g.last.fds,
                g.first.threads,
                g.last.threads,
                g.first.staging_files,
                g.last.staging_files,
                g.first.taps,
                g.last.taps
            );
        }
        match self.problem() {
            None => println!("held: nothing lost, nothing grew, nothing left behind"),
            Some(problem) => println!("NOT held: {problem}"),
        }
    }

    /// What went wrong (None: it held).
    fn problem(&self) -> Option<String> {
        let mut wrong = Vec::new();
        if let Some(problem) = self.clients.problem() {
            wrong.push(problem);
        }
        let failed: Vec<String> = self
            .rounds
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .map(|r| format!("migration {} ({} → {}): {}", r.n, r.from, r.to, r.outcome))
            .collect();
        wrong.extend(failed);
        wrong.extend(self.grew());
        wrong.extend(self.left_behind.iter().map(|l| format!("left behind: {l}")));
        (!wrong.is_empty()).then(|| wrong.join("; "))
    }

    fn verdict(&self) -> Result<(), Failure> {
        match self.problem() {
            None => Ok(()),
            Some(problem) => Err(run_failure(anyhow!("the soak did not hold: {problem}"))),
        }
    }
}
