//! `pcft demo`: the one-command tour. Two agents as separate processes on this
//! machine, a fixture VM started on one and migrated to the other; with
//! PostCopyFT (the default) the destination fails mid post-copy and the
//! source recovers the VM from its last checkpoint. The guest is verified
//! against its oracle wherever it finished, and every output record that
//! reached the outside world against the oracle's; everything is stopped and
//! the report printed.
//!
//! The failure kinds (`--fail-kind`): the destination crashes, freezes or
//! stalls its checkpoints, the network between the hosts is cut or degraded
//! (the agents then run in network namespaces, see `netns`), the migration
//! connection is reset while both agents live (an nftables rule, see
//! `netns::ResetRule`), the destination goes silent while its vCPUs and lease
//! watchdog stall at their worst moments (`stall-fence`), or the source is
//! starved of CPU (see `cgroup`).
//!
//! Whatever happened, the demo then checks independently that one copy ran
//! at a time: each agent records when the vCPUs of every copy of the VM it ran
//! were inside `KVM_RUN` (`pcft_agent::vmm::run_log`, on `CLOCK_BOOTTIME`, which
//! both agents share on this one host), and no interval of the source's
//! copies may overlap one of the destination's; and at the end the VM must run
//! (or have finished) at exactly one agent.

use super::cgroup::CpuThrottle;
use super::netns::{ResetRule, Testbed};
use super::remote::{print_report, runtime};
use super::stopwatch::{cut_at_stops, StopWatch};
use super::vm::{machine_config, KVM_PATH};
use super::{run_failure, usage, DemoArgs, FailKind, Failure, Pattern, TrackerArg, WorkloadArgs};
use anyhow::{anyhow, Context};
use pcft_agent::agent::client::{AgentClient, ClientError};
use pcft_agent::fault::crash::CrashPoint;
use pcft_agent::host;
use pcft_agent::vmm::output::ReleasedRecord;
use pcft_agent::vmm::run_log::{RunInterval, RunLogSnapshot};
use pcft_agent::wire::auth::Psk;
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::{MigrationOptions, Mode, VmPhase};
use serde_json::json;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_fixtures::OutputRecord;

const VM: &str = "demo";

/// The demo's pre-shared key, in a file of its own (removed when dropped):
/// the agents and the demo's own requests authenticate with it.
struct DemoKey {
    dir: std::path::PathBuf,
    file: std::path::PathBuf,
}

impl DemoKey {
    /// The key given with --psk-file, or a new one.
    fn new() -> Result<DemoKey, Failure> {
        let dir = std::env::temp_dir().join(format!("pcft-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))
            .map_err(run_failure)?;
        let file = dir.join("psk");
        let key = match pcft_agent::agent::client::key() {
            Some(key) => key.clone(),
            None => Psk::generate().map_err(run_failure)?,
        };
        key.write_new(&file).map_err(run_failure)?;
        pcft_agent::agent::client::set_key(Some(key));
        Ok(DemoKey { dir, file })
    }
}

impl Drop for DemoKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The agent processes the demo started; killed when dropped, whatever happened.
struct Agents {
    children: Vec<Child>,
    /// The key they all hold (None: `--no-auth`).
    key: Option<DemoKey>,
}

/// Where a started agent listens.
struct Started {
    /// Its control and migration address.
    addr: String,
    /// Its metrics and dashboard address (HOST:PORT), when started with `--metrics`.
    http: Option<String>,
}

impl Agents {
    /// Starts `pcft agent` listening on `listen`, in network namespace `ns` if given.
    fn start(&mut self, name: &str, ns: Option<&str>, listen: &str, extra: &[&str]) -> Result<Started, Failure> {
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
            .args(self.key.iter().flat_map(|key| [std::ffi::OsStr::new("--psk-file"), key.file.as_os_str()]))
            .args(self.key.is_none().then_some("--insecure"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the {name} agent"))
            .map_err(run_failure)?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        self.children.push(child);
        let mut read_after = |prefix: &str| -> Result<String, Failure> {
            let mut line = String::new();
            stdout.read_line(&mut line).map_err(run_failure)?;
            line.trim()
                .strip_prefix(prefix)
                .map(str::to_string)
                .ok_or_else(|| run_failure(anyhow!("the {name} agent did not start (it printed {line:?})")))
        };
        let addr = read_after("listening on ")?;
        // "metrics on http://HOST:PORT/metrics, dashboard on …"
        let http = match extra.contains(&"--metrics") {
            true => Some(read_after("metrics on http://")?.split('/').next().unwrap_or_default().to_string()),
            false => None,
        };
        Ok(Started { addr, http })
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

fn default_steps(fixture: &str) -> Option<u64> {
    // Long enough that the guest still runs when the migration starts.
    match fixture {
        "ledger" => Some(60_000),
        "dirty" => Some(600_000),
        "idle" => Some(3_000),
        _ => None,
    }
}

/// How the VM's writes are tracked (see `--dirty-tracker`).
fn dirty_tracker(args: &DemoArgs) -> TrackerArg {
    args.dirty_tracker.unwrap_or(if args.dashboard.is_some() { TrackerArg::Auto } else { TrackerArg::Bitmap })
}

fn workload(args: &DemoArgs) -> WorkloadArgs {
    // With a dashboard, a run long enough to watch.
    let scale = if args.dashboard.is_some() { 10 } else { 1 };
    WorkloadArgs {
        fixture: args.fixture.clone(),
        mem: args.mem.clone(),
        vcpus: args.vcpus,
        steps: args.steps.or_else(|| default_steps(&args.fixture).map(|steps| steps * scale)),
        forever: false,
        working_set: None,
        record_every: None,
        seed: None,
        writes_per_step: 1,
        pattern: Pattern::Random,
        hot_pages: 64,
        hot_permille: 900,
        rate: None,
        spin: None,
        slot_size: "128M".into(),
        dirty_tracker: dirty_tracker(args),
    }
}

fn client_error(e: ClientError) -> Failure {
    run_failure(anyhow!(e))
}

/// Where the demo makes the destination fail.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FailAt {
    None,
    /// SIGKILL (or SIGSTOP, or a cut) from the demo this long after the switchover.
    After(Duration),
    /// The destination agent kills itself there (`pcft agent --crash-at`).
    Point(CrashPoint),
}

impl FailAt {
    fn parse(text: &str) -> Result<FailAt, String> {
        if text == "none" {
            return Ok(FailAt::None);
        }
        if text == "random" {
            return Ok(Self::random());
        }
        if let Some(ms) = text.strip_suffix("ms") {
            return ms
                .parse()
                .map(|ms| FailAt::After(Duration::from_millis(ms)))
                .map_err(|_| format!("--fail-at {text:?}: expected a number of milliseconds such as 500ms"));
        }
        let point = match text.split_once(':') {
            Some(("epoch", n)) => format!("committed:{n}"),
            None if text == "speculative" || text == "pause" => format!("{text}:2"),
            _ => text.to_string(),
        };
        point.parse().map(FailAt::Point).map_err(|e| format!("--fail-at {text:?}: {e}; see pcft demo --help"))
    }

    /// One of the points, picked from the clock.
    fn random() -> FailAt {
        let seed = clock_seed();
        let epoch = u64::from(seed / 7 % 5) + 1;
        match seed % 6 {
            0 => FailAt::Point(CrashPoint::BeforeFirstCheckpoint),
            1 => FailAt::Point(CrashPoint::Speculative(epoch)),
            2 => FailAt::Point(CrashPoint::Pause(epoch)),
            3 => FailAt::Point(CrashPoint::Committed(epoch)),
            4 => FailAt::Point(CrashPoint::AfterLastPage),
            _ => FailAt::After(Duration::from_millis(u64::from(seed / 11 % 1500) + 50)),
        }
    }

    /// Right after a checkpoint epoch from 1 to 5, picked from the clock.
    fn random_epoch() -> FailAt {
        FailAt::Point(CrashPoint::Committed(u64::from(clock_seed() / 7 % 5) + 1))
    }

    /// One of the points while the guest runs at the destination (any but
    /// after-last-page), picked from the clock.
    fn random_point() -> FailAt {
        let seed = clock_seed();
        let epoch = u64::from(seed / 7 % 5) + 1;
        match seed % 4 {
            0 => FailAt::Point(CrashPoint::BeforeFirstCheckpoint),
            1 => FailAt::Point(CrashPoint::Speculative(epoch)),
            2 => FailAt::Point(CrashPoint::Pause(epoch)),
            _ => FailAt::Point(CrashPoint::Committed(epoch)),
        }
    }

    /// From `low` to `high` ms after the switchover, picked from the clock.
    fn random_after(low: u64, high: u64) -> FailAt {
        FailAt::After(Duration::from_millis(low + u64::from(clock_seed() / 13) % (high - low + 1)))
    }

    fn name(&self) -> String {
        match self {
            FailAt::None => "none".into(),
            FailAt::After(d) => format!("{}ms", d.as_millis()),
            FailAt::Point(CrashPoint::BeforeFirstCheckpoint) => "before-first-checkpoint".into(),
            FailAt::Point(CrashPoint::Speculative(n)) => format!("speculative:{n}"),
            FailAt::Point(CrashPoint::Pause(n)) => format!("pause:{n}"),
            FailAt::Point(CrashPoint::Committed(n)) => format!("epoch:{n}"),
            FailAt::Point(CrashPoint::AfterLastPage) => "after-last-page".into(),
        }
    }
}

/// The port of a HOST:PORT address (0 if it has none).
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}

fn clock_seed() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
}

/// A failure applied at a time (`--fail-at Nms`) by the demo's timer, and
/// what it applied; once the migration is `over` nothing more is applied.
#[derive(Default)]
struct Injected {
    over: bool,
    /// lossy: how the link between the hosts was degraded.
    network: Option<String>,
    /// slow-source: the source agent's CPU throttle (released when the migration ends).
    throttle: Option<CpuThrottle>,
    /// slow-source: what the throttle was.
    source_throttle: Option<String>,
    /// reset: the nftables rule in place (removed when the migration ends, or dropped).
    reset: Option<ResetRule>,
}

/// Waits until the source reports the demo VM's migration in post-copy (the
/// VM runs at the destination); false if the migration ended before that or
/// the source cannot be asked. (It may start before the source has the
/// request: a VM still `running` there is waited for too.)
async fn postcopy_started(source: &str) -> bool {
    use pcft_agent::wire::payload::VmPhase;
    let Ok(mut client) = AgentClient::connect(source).await else { return false };
    loop {
        let Ok(ControlMessage::StatusReport { vms, .. }) = client.request(&ControlMessage::Status).await else {
            return false;
        };
        let Some(vm) = vms.into_iter().find(|v| v.name == VM) else { return false };
        if vm.migration.is_some_and(|m| m.phase == "postcopy") {
            return true;
        }
        if !matches!(vm.phase, VmPhase::Running | VmPhase::MigratingOut) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The outside world of the demo's VM: a TCP listener that collects every
/// output record the agents release (`pcft agent --output-sink`).
struct Outside {
    addr: String,
    records: Arc<Mutex<Vec<ReleasedRecord>>>,
}

impl Outside {
    fn start(bind: &str) -> Result<Outside, Failure> {
        let listener = std::net::TcpListener::bind(bind).map_err(run_failure)?;
        let addr = listener.local_addr().map_err(run_failure)?.to_string();
        let records: Arc<Mutex<Vec<ReleasedRecord>>> = Arc::default();
        let sink = Arc::clone(&records);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        if let Ok(record) = serde_json::from_str::<ReleasedRecord>(&line) {
                            sink.lock().expect("outside lock").push(record);
                        }
                    }
                });
            }
        });
        Ok(Outside { addr, records })
    }

    fn records(&self) -> Vec<ReleasedRecord> {
        self.records.lock().expect("outside lock").clone()
    }

    /// Waits (a little) for records still on their way.
    fn settle(&self, expected: usize) -> Vec<ReleasedRecord> {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let records = self.records();
            let distinct: HashSet<(u32, u64)> = records.iter().map(|r| (r.vcpu, r.step)).collect();
            if distinct.len() >= expected || std::time::Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What reached the outside, checked against the oracle's records.
struct OutputAudit {
    released: usize,
    duplicates: usize,
    /// Released records that the verified run does not have (lost or contradicted by the failover).
    lost: usize,
    /// Records of the verified run that never reached the outside.
    never_released: usize,
}

fn audit(released: &[ReleasedRecord], expected: &[OutputRecord]) -> OutputAudit {
    let truth: HashSet<OutputRecord> = expected.iter().copied().collect();
    let mut seen = HashSet::new();
    let (mut duplicates, mut lost) = (0, 0);
    for record in released.iter().map(ReleasedRecord::record) {
        if !seen.insert(record) {
            duplicates += 1;
        } else if !truth.contains(&record) {
            lost += 1;
        }
    }
    let never_released = truth.iter().filter(|r| !seen.contains(*r)).count();
    OutputAudit { released: seen.len(), duplicates, lost, never_released }
}

/// Wakes the frozen destination (SIGCONT) and checks, `settle_ms` + 300 ms
/// later, that its copy stays stopped: the VM is marked failed (fenced) and
/// emits nothing more.
async fn destination_fenced(destination: &str, pid: u32, settle_ms: u64) -> Result<bool, Failure> {
    // SAFETY: kill(2) of the destination agent we started (a child process) has no memory effects.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    tokio::time::sleep(Duration::from_millis(settle_ms + 300)).await;
    let mut client = AgentClient::connect(destination).await.map_err(client_error)?;
    let records = |answer: ControlMessage| match answer {
        ControlMessage::StatusReport { vms, .. } => vms.into_iter().find(|v| v.name == VM),
        _ => None,
    };
    let Some(before) = records(client.request(&ControlMessage::Status).await.map_err(client_error)?) else {
        return Ok(true); // the VM is gone there
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = records(client.request(&ControlMessage::Status).await.map_err(client_error)?);
    let stopped = after.as_ref().is_none_or(|a| a.records == before.records);
    let marked = before.error.as_deref().is_some_and(|e| e.contains("fenced"));
    Ok(stopped && marked)
}

/// What one agent said about the demo's VM at the end of the run.
#[derive(Clone, Debug, Default)]
struct CopyAt {
    /// When the vCPUs of the VM's copies there were inside `KVM_RUN` (None:
    /// the agent could not be asked, e.g. it was killed: its intervals died with it).
    runs: Option<RunLogSnapshot>,
    /// The VM's phase there (None: no such VM there, or the agent could not be asked).
    phase: Option<VmPhase>,
}

impl CopyAt {
    /// Whether the VM runs there, or finished there (the copy that took the workload to its end).
    fn live(&self) -> bool {
        matches!(self.phase, Some(VmPhase::Running | VmPhase::MigratingIn | VmPhase::MigratingOut | VmPhase::Finished))
    }

    fn intervals(&self) -> &[RunInterval] {
        self.runs.as_ref().map_or(&[], |r| r.intervals.as_slice())
    }
}

/// Asks the agent at `addr` for the demo VM's run log and phase. An agent that
/// cannot be reached within a few seconds (killed, or frozen) counts as
/// having no copy and no intervals; a VM it does not know, as no intervals.
async fn copy_at(addr: &str) -> CopyAt {
    let ask = async {
        let mut client = AgentClient::connect(addr).await.ok()?;
        let runs = match client.request(&ControlMessage::RunLog { name: VM.into() }).await {
            Ok(ControlMessage::RunLogReport { runs, .. }) => runs,
            // `Refuse`: no such VM there.
            Err(ClientError::Refused(_)) => RunLogSnapshot::default(),
            _ => return None,
        };
        let phase = match client.request(&ControlMessage::Status).await {
            Ok(ControlMessage::StatusReport { vms, .. }) => vms.into_iter().find(|v| v.name == VM).map(|v| v.phase),
            _ => None,
        };
        Some(CopyAt { runs: Some(runs), phase })
    };
    tokio::time::timeout(Duration::from_secs(5), ask).await.ok().flatten().unwrap_or_default()
}

/// The independent "one copy at a time" check: whether the VM's copies at the
/// source and at the destination ever ran at once, and how many run at the end.
#[derive(Clone, Debug)]
struct OneCopy {
    source: CopyAt,
    destination: CopyAt,
    /// The time in which some vCPU of a source copy and some vCPU of a destination copy were both in the guest.
    overlap: Duration,
    /// The first (earliest) pair of intervals that overlap: (source's, destination's).
    first: Option<(RunInterval, RunInterval)>,
}

impl OneCopy {
    fn new(source: CopyAt, destination: CopyAt) -> OneCopy {
        let (overlap, first) = copies_overlap(source.intervals(), destination.intervals());
        OneCopy { source, destination, overlap, first }
    }

    /// Agents where the VM runs or finished at the end.
    fn copies_at_end(&self) -> usize {
        usize::from(self.source.live()) + usize::from(self.destination.live())
    }

    fn dropped(&self) -> u64 {
        [&self.source, &self.destination].iter().filter_map(|c| c.runs.as_ref()).map(|r| r.dropped).sum()
    }

    fn overlap_ms(&self) -> f64 {
        self.overlap.as_secs_f64() * 1e3
    }

    /// The human report's line.
    fn line(&self) -> String {
        let count = |copy: &CopyAt, at: &str| match &copy.runs {
            Some(runs) => format!("{} run intervals at the {at}", runs.intervals.len()),
            None => format!("none from the {at}, whose agent is gone (its intervals with it)"),
        };
        let counts = format!("{}, {}", count(&self.source, "source"), count(&self.destination, "destination"));
        let dropped = match self.dropped() {
            0 => String::new(),
            n => format!("; {n} older intervals were dropped for room, so only the newest were compared"),
        };
        let running: Vec<&str> = [(&self.source, "the source"), (&self.destination, "the destination")]
            .into_iter()
            .filter(|(copy, _)| copy.live())
            .map(|(_, at)| at)
            .collect();
        let end = match running.as_slice() {
            [one] => format!("one copy at the end, at {one}"),
            [] => "NO copy at the end".to_string(),
            _ => "BOTH copies at the end".to_string(),
        };
        match self.first {
            None => format!("one copy at a time: the two copies never ran at once ({counts}{dropped}); {end}"),
            Some((s, d)) => format!(
                "one copy at a time: VIOLATED: the two copies ran at once for {:.3} ms in all; first: source vCPU {} \
                 in the guest {}..{} µs and destination vCPU {} {}..{} µs (CLOCK_BOOTTIME) ({counts}{dropped}); {end}",
                self.overlap_ms(),
                s.vcpu,
                s.start_us,
                s.end_us,
                d.vcpu,
                d.start_us,
                d.end_us
            ),
        }
    }
}

/// How long the two copies ran at once ([`pcft_agent::vmm::run_log::overlap`]), and
/// the earliest pair of intervals, one of each, that overlap (None: no overlap).
fn copies_overlap(
    source: &[RunInterval],
    destination: &[RunInterval],
) -> (Duration, Option<(RunInterval, RunInterval)>) {
    let overlap = pcft_agent::vmm::run_log::overlap(source, destination);
    if overlap.is_zero() {
        return (overlap, None);
    }
    let by_start = |intervals: &[RunInterval]| {
        let mut sorted = intervals.to_vec();
        sorted.sort_by_key(|i| (i.start_us, i.end_us));
        sorted
    };
    let (source, destination) = (by_start(source), by_start(destination));
    // The earliest moment both ran: the smallest max(start) over overlapping pairs.
    let mut first: Option<(RunInterval, RunInterval)> = None;
    for s in &source {
        for d in &destination {
            if d.start_us >= s.end_us {
                break;
            }
            if s.start_us < d.end_us {
                let at = s.start_us.max(d.start_us);
                if first.is_none_or(|(fs, fd)| at < fs.start_us.max(fd.start_us)) {
                    first = Some((*s, *d));
                }
            }
        }
    }
    (overlap, first)
}

pub fn demo(args: DemoArgs) -> Result<(), Failure> {
    let config = machine_config(&workload(&args))?;
    host::check_kvm(Path::new(KVM_PATH)).map_err(usage)?;
    let mode: Mode = args.mode.into();
    let fail_at =
        if mode.checkpoints() { FailAt::parse(&args.fail_at).map_err(|e| usage(anyhow!(e)))? } else { FailAt::None };
    let kind = args.fail_kind;
    let freeze = kind == FailKind::Freeze;
    let partition = kind == FailKind::Partition && mode.checkpoints();
    let lossy = kind == FailKind::Lossy && mode.checkpoints();
    // The agents run in network namespaces of their own (two hosts).
    let netns = partition || lossy;
    let reset = kind == FailKind::Reset && mode.checkpoints();
    let stall_fence = kind == FailKind::StallFence && mode.checkpoints();
    // Failures that happen at a time, not at a point of the destination's work.
    let timed = matches!(kind, FailKind::Partition | FailKind::Lossy | FailKind::SlowSource | FailKind::Reset);
    let chosen = args.fail_at != "random";
    if stall_fence && chosen && matches!(fail_at, FailAt::After(_)) {
        return Err(usage(anyhow!(
            "--fail-kind stall-fence happens at a point of the destination's work: use --fail-at \
             before-first-checkpoint, speculative:N, pause:N, epoch:N or after-last-page (or random, none), not {}",
            args.fail_at
        )));
    }
    if mode.checkpoints() && timed && chosen && matches!(fail_at, FailAt::Point(_)) {
        return Err(usage(anyhow!(
            "--fail-kind {} happens at a time: use --fail-at Nms (or random, none)",
            kind.name()
        )));
    }
    // The checkpointer's own points: in a pause or after the last page it does not run.
    let stall_point = matches!(
        fail_at,
        FailAt::Point(CrashPoint::BeforeFirstCheckpoint | CrashPoint::Speculative(_) | CrashPoint::Committed(_))
    );
    if mode.checkpoints() && kind == FailKind::Stall && chosen && !stall_point && fail_at != FailAt::None {
        return Err(usage(anyhow!(
            "--fail-kind stall hangs the destination's checkpointer at a point of its work: \
             use --fail-at epoch:N, speculative:N or before-first-checkpoint (or random, none), not {}",
            args.fail_at
        )));
    }
    let slow_disk = kind == FailKind::SlowDisk && mode.checkpoints();
    let fail_at = match fail_at {
        // The slow disk is there from the start: nothing else fails.
        _ if slow_disk => FailAt::None,
        // A random reset: 300 to 600 ms into post-copy.
        FailAt::After(_) | FailAt::Point(_) if reset && !chosen => FailAt::random_after(300, 600),
        // A random stall-fence: at a point while the guest runs at the destination.
        FailAt::After(_) | FailAt::Point(_) if stall_fence && !chosen => FailAt::random_point(),
        // These happen at a time; a random one lands in post-copy.
        FailAt::Point(_) if timed => FailAt::After(Duration::from_millis(400)),
        // A random stall: right after one of the first checkpoints.
        FailAt::After(_) | FailAt::Point(_) if kind == FailKind::Stall && !chosen => FailAt::random_epoch(),
        other => other,
    };
    let migrate_after =
        Duration::from_millis(args.migrate_after_ms.unwrap_or(if args.dashboard.is_some() { 5000 } else { 300 }));
    let testbed = if netns { Some(Arc::new(Testbed::create().map_err(usage)?)) } else { None };
    let outside = Outside::start(if netns { "0.0.0.0:0" } else { "127.0.0.1:0" })?;
    let outside_port = port_of(&outside.addr);
    const NS_PORT: u16 = 7401;
    const NS_HTTP_PORT: u16 = 7480;
    let key = if args.no_auth { None } else { Some(DemoKey::new()?) };
    let mut agents = Agents { children: Vec::new(), key };
    // `--metrics` for each agent when there is a dashboard: the source's where asked, the destination's anywhere.
    let http_listen = |asked: &str| match (&args.dashboard, netns) {
        (None, _) => Vec::new(),
        (Some(_), true) => vec!["--metrics".to_string(), format!("0.0.0.0:{NS_HTTP_PORT}")],
        (Some(_), false) => vec!["--metrics".to_string(), asked.to_string()],
    };
    let source_http = http_listen(args.dashboard.as_deref().unwrap_or_default());
    let source_sink = match &testbed {
        Some(bed) => bed.outside_from_source(outside_port),
        None => outside.addr.clone(),
    };
    let listen = if netns { format!("0.0.0.0:{NS_PORT}") } else { "127.0.0.1:0".to_string() };
    let mut source_args = vec!["--output-sink", &source_sink];
    source_args.extend(source_http.iter().map(String::as_str));
    let disk_delay = args.disk_delay_ms.to_string();
    if slow_disk {
        source_args.extend(["--staging-memory", "0", "--staging-delay-ms", &disk_delay]);
    }
    let source_staging = slow_disk
        .then(|| format!("every checkpoint page staged in a file, each write {} ms slower", args.disk_delay_ms));
    let started = agents.start("source", testbed.as_ref().map(|b| b.source_ns.as_str()), &listen, &source_args)?;
    let (source, source_dashboard) = match &testbed {
        Some(bed) => (bed.source_addr(NS_PORT), started.http.map(|_| bed.source_addr(NS_HTTP_PORT))),
        None => (started.addr, started.http),
    };
    let mut crash = match &fail_at {
        FailAt::Point(_) => vec!["--crash-at".to_string(), fail_at.name().replace("epoch:", "committed:")],
        _ => Vec::new(),
    };
    let crash_signal = match kind {
        FailKind::Freeze => Some("stop"),
        // The destination's checkpointer hangs there; its heartbeats go on.
        FailKind::Stall => Some("stall"),
        // The destination goes silent there; its vCPUs and watchdog stall.
        FailKind::StallFence => Some("stall-fence"),
        _ => None,
    };
    // Each stall of stall-fence lasts well past the source's failover (which
    // comes a heartbeat timeout and a lease after the destination goes silent).
    let stall_fence_ms = 3 * args.ft.heartbeat_timeout.max(1) + 300;
    if let (Some(signal), false) = (crash_signal, crash.is_empty()) {
        crash.extend(["--crash-signal".to_string(), signal.to_string()]);
        if stall_fence {
            crash.extend(["--stall-fence-ms".to_string(), stall_fence_ms.to_string()]);
        }
    }
    let destination_sink = match &testbed {
        Some(bed) => bed.outside_from_destination(outside_port),
        None => outside.addr.clone(),
    };
    let destination_http = http_listen("127.0.0.1:0");
    let mut dest_args: Vec<&str> = vec!["--output-sink", &destination_sink];
    dest_args.extend(crash.iter().map(String::as_str));
    dest_args.extend(destination_http.iter().map(String::as_str));
    let started =
        agents.start("destination", testbed.as_ref().map(|b| b.destination_ns.as_str()), &listen, &dest_args)?;
    // The CLI reaches the destination's agent here; the source migrates to `migrate_to`
    // (over the link between the hosts, when they are namespaces).
    let (destination, migrate_to, destination_dashboard) = match &testbed {
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
    // A frozen destination's vCPU threads stop on their way out of KVM_RUN and
    // read the clock only when continued: watch when they were stopped.
    let stop_watch = (kind == FailKind::Freeze).then(|| StopWatch::start(destination_pid));
    let source_pid = agents.children.first().map(|c| c.id()).expect("started first");
    if !args.json {
        println!("agents: source at {source}, destination at {destination} (separate processes)");
        println!("outside world (released output) at {}", outside.addr);
        if let Some(url) = &dashboard_url {
            println!("dashboard: {url} (migrating in {} s)", migrate_after.as_secs_f64());
        }
        if mode.checkpoints() {
            let how = match kind {
                FailKind::Lossy => format!("lossy: loss {}%, delay {} ms", args.loss, args.delay_ms),
                FailKind::SlowSource => format!("slow-source: {}% of a CPU", args.source_cpu_pct),
                FailKind::SlowDisk => format!("slow-disk: {} ms a staging write", args.disk_delay_ms),
                FailKind::Reset => format!(
                    "reset: {} side, TCP resets from an nftables rule, both agents alive",
                    args.reset_side.name()
                ),
                FailKind::StallFence => format!(
                    "stall-fence: it goes silent, and its vCPU threads and lease watchdog stall {stall_fence_ms} ms \
                     between their fence check and the guest"
                ),
                other => other.name(),
            };
            let who = match kind {
                FailKind::Lossy => "the link between the hosts degrades",
                FailKind::SlowSource => "the source slows down",
                FailKind::SlowDisk => "the source's checkpoint staging disk is slow from the start, and nothing fails",
                FailKind::Reset => "the migration connection is reset",
                _ => "the destination fails",
            };
            if slow_disk {
                println!("{who} ({how})");
            } else {
                println!("{who} at: {} ({how})", fail_at.name());
            }
        }
    }
    let (fixture, vcpus, mem_bytes) = (config.fixture.kind.name(), config.fixture.vcpus, config.mem_bytes);
    let expected: Vec<OutputRecord> =
        config.fixture.expected_after(config.fixture.steps).outputs().iter().flatten().copied().collect();
    let options = args.ft.options(
        MigrationOptions {
            postcopy_pages_per_sec: args.postcopy_rate.unwrap_or(if mode.checkpoints() { 16384 } else { 0 }),
            ..MigrationOptions::default()
        },
        dirty_tracker(&args),
    );
    let injected: Arc<Mutex<Injected>> = Arc::default();
    let outcome = runtime().block_on(async {
        let mut src = AgentClient::connect(&source).await.map_err(client_error)?;
        let start = ControlMessage::StartVm { name: VM.into(), config, tracking: dirty_tracker(&args).into() };
        src.request(&start).await.map_err(client_error)?;
        tokio::time::sleep(migrate_after).await;
        if let FailAt::After(after) = fail_at {
            let bed = testbed.clone();
            let source = source.clone();
            let injected = Arc::clone(&injected);
            let (loss, delay_ms, link_mbit, cpu_pct) = (args.loss, args.delay_ms, args.link_mbit, args.source_cpu_pct);
            let (reset_side, destination_port) = (args.reset_side, port_of(&migrate_to));
            tokio::spawn(async move {
                // N ms after the switchover: the VM runs at the destination by then.
                if !postcopy_started(&source).await {
                    return;
                }
                tokio::time::sleep(after).await;
                let mut injected = injected.lock().expect("injection lock");
                if injected.over {
                    return;
                }
                match (kind, &bed) {
                    (FailKind::Partition, Some(bed)) => {
                        if let Err(e) = bed.cut() {
                            eprintln!("pcft demo: cannot cut the link: {e:#}");
                        }
                    }
                    (FailKind::Lossy, Some(bed)) => match bed.degrade(loss, delay_ms, link_mbit) {
                        Ok(applied) => injected.network = Some(applied.to_string()),
                        Err(e) => eprintln!("pcft demo: cannot degrade the link: {e:#}"),
                    },
                    (FailKind::Reset, _) => match ResetRule::apply(reset_side, destination_port) {
                        Ok(rule) => {
                            injected.network = Some(rule.description().to_string());
                            injected.reset = Some(rule);
                        }
                        Err(e) => eprintln!("pcft demo: cannot reset the migration connection: {e:#}"),
                    },
                    (FailKind::SlowSource, _) => match CpuThrottle::apply(source_pid, cpu_pct) {
                        Ok(throttle) => {
                            injected.source_throttle = Some(throttle.description().to_string());
                            injected.throttle = Some(throttle);
                        }
                        Err(e) => eprintln!("pcft demo: cannot throttle the source agent: {e:#}"),
                    },
                    _ => {
                        let signal = if freeze { libc::SIGSTOP } else { libc::SIGKILL };
                        // SAFETY: kill(2) of the destination agent we started (a child process) has no memory effects.
                        unsafe { libc::kill(destination_pid as libc::pid_t, signal) };
                    }
                }
            });
        }
        let request = ControlMessage::Migrate { name: VM.into(), to: migrate_to.clone(), mode, options };
        let migration = super::remote::with_progress(&source, VM, !args.json, src.request(&request));
        let report = match migration.await.map_err(client_error)? {
            ControlMessage::Migrated(report) => report,
            other => return Err(run_failure(anyhow!("the source answered {other:?}"))),
        };
        // The migration is over: undo what the timer applied (and apply nothing more).
        let (throttle, reset_rule) = {
            let mut injected = injected.lock().expect("injection lock");
            injected.over = true;
            (injected.throttle.take(), injected.reset.take())
        };
        // The agents may talk again (and the demo reach the destination): the destination must stay fenced.
        drop(reset_rule);
        if let Some(throttle) = throttle {
            throttle.release().context("cannot release the source agent's CPU throttle").map_err(run_failure)?;
        }
        if let (Some(bed), true) = (&testbed, lossy) {
            // Restore the link before the fencing check, as a partition heals.
            bed.restore().context("cannot restore the link between the hosts").map_err(run_failure)?;
        }
        if let (Some(bed), true) = (&testbed, partition && report.failover.is_some()) {
            // Heal the network: the destination may hear from the source again, and must stay fenced.
            bed.heal().map_err(run_failure)?;
        }
        // The check waits a lease, and with stall-fence the stalls too: the destination
        // marks its copy fenced when it stops it, which its stalled vCPU threads hold up
        // (they do not run the guest meanwhile: the run logs show that).
        let settle_ms = options.heartbeat_timeout_ms + if stall_fence { stall_fence_ms } else { 0 };
        // Whatever failed (but a crash: nothing is left to fence), a destination
        // whose VM the source recovered must keep its copy stopped.
        let fenced = if mode.checkpoints() && kind != FailKind::Crash && report.failover.is_some() {
            Some(destination_fenced(&destination, destination_pid, settle_ms).await?)
        } else {
            None
        };
        // After a failover the VM runs on at the source; otherwise at the destination.
        let runs_at = if report.failover.is_some() { &source } else { &destination };
        let mut client = AgentClient::connect(runs_at).await.map_err(client_error)?;
        let verified = client.request(&ControlMessage::WaitFinished { name: VM.into(), timeout_ms: 600_000 }).await;
        Ok((report, verified, fenced))
    });
    // Whatever happened: nothing more is injected, and the reset rule goes.
    let reset_rule = {
        let mut injected = injected.lock().expect("injection lock");
        injected.over = true;
        injected.reset.take()
    };
    drop(reset_rule);
    // One copy at a time, checked from both agents' run logs (before they stop).
    let stopped = stop_watch.map(StopWatch::finish).unwrap_or_default();
    let one_copy = runtime().block_on(async {
        let (source, mut destination) = tokio::join!(copy_at(&source), copy_at(&destination));
        if let Some(runs) = destination.runs.as_mut() {
            runs.intervals = cut_at_stops(&runs.intervals, &stopped, runs.last_page_install_us);
        }
        OneCopy::new(source, destination)
    });
    let (report, verified, fenced) = match outcome {
        Ok(v) => v,
        Err(e) => {
            drop(agents);
            eprintln!("pcft demo: {}", one_copy.line());
            return Err(e);
        }
    };
    let released = outside.settle(expected.len());
    let outputs = audit(&released, &expected);
    let (verified_ok, records, digest, error) = match &verified {
        Ok(ControlMessage::Verified { records, memory_digest, .. }) => {
            (true, Some(*records), Some(format!("{memory_digest:#018x}")), None)
        }
        Ok(other) => (false, None, None, Some(format!("unexpected answer {other:?}"))),
        Err(e) => (false, None, None, Some(e.to_string())),
    };
    let outputs_ok = outputs.lost == 0 && (!verified_ok || outputs.never_released == 0);
    let fenced_ok = fenced.is_none_or(|f| f);
    let recovered = report.failover.is_some();
    let (network, source_throttle) = {
        let injected = injected.lock().expect("injection lock");
        (injected.network.clone(), injected.source_throttle.clone())
    };
    // The one documented outcome without exactly one copy: the source cannot
    // know whether the destination took the VM (it must not restore its own).
    let finish_unconfirmed = report.failure.as_ref().is_some_and(|f| f.kind == "finish-unconfirmed");
    let copies_at_end = one_copy.copies_at_end();
    let one_copy_ok = one_copy.overlap.is_zero() && (copies_at_end == 1 || finish_unconfirmed);
    if args.json {
        let mut object = serde_json::to_value(&report).map_err(run_failure)?;
        let total = report.total_migration_ms.is_finite().then_some(report.total_migration_ms);
        let extra = json!({
            "fixture": fixture, "vcpus": vcpus, "mem_bytes": mem_bytes, "verified": verified_ok && outputs_ok,
            "records": records, "memory_digest": digest, "error": error,
            "total_migration_ms": total,
            "fail_at": mode.checkpoints().then(|| fail_at.name()),
            "recovered": recovered,
            "failover_ms": report.failover.as_ref().map(|f| f.failover_ms),
            "restored_epoch": report.failover.as_ref().map(|f| f.restored_epoch),
            "released_outputs": outputs.released,
            "duplicate_released_outputs": outputs.duplicates,
            "lost_released_outputs": outputs.lost,
            "never_released_outputs": outputs.never_released,
            "fail_kind": kind.name(),
            "destination_fenced": fenced,
            "network": network,
            "source_throttle": source_throttle,
            "source_staging": source_staging,
            "reset_side": reset.then(|| args.reset_side.name()),
            "copies_overlap_ms": one_copy.overlap_ms(),
            "copies_first_overlap": one_copy.first.map(|(s, d)| json!({ "source": s, "destination": d })),
            "source_run_intervals": one_copy.source.runs.as_ref().map(|r| r.intervals.len()),
            "destination_run_intervals": one_copy.destination.runs.as_ref().map(|r| r.intervals.len()),
            "run_log_dropped": one_copy.dropped(),
            "copies_at_end": copies_at_end,
        });
        object.as_object_mut().expect("report is an object").extend(extra.as_object().expect("object").clone());
        println!("{object}");
    } else {
        print_report(&report);
        let place = if recovered { "at the source after the failover" } else { "at the destination" };
        match (&error, records) {
            (None, Some(records)) => println!(
                "verified: the {fixture} guest finished {place} and matches its oracle ({records} output records)"
            ),
            _ => println!("NOT verified: {}", error.as_deref().unwrap_or("unknown")),
        }
        println!(
            "outside world: {} distinct records released ({} duplicates), {} lost or contradicted, {} never released",
            outputs.released, outputs.duplicates, outputs.lost, outputs.never_released
        );
        match &network {
            Some(rule) if reset => println!("the migration connection was reset ({rule}) until the migration ended"),
            Some(network) => println!("the link between the hosts was degraded ({network}) until the migration ended"),
            None => {}
        }
        if let Some(throttle) = &source_throttle {
            println!("the source agent was held to a CPU quota ({throttle}) until the migration ended");
        }
        if let Some(staging) = &source_staging {
            println!("the source had a slow staging disk: {staging}");
        }
        match fenced {
            Some(true) => println!("the destination keeps its copy stopped (fenced) after the failover: one VM runs"),
            Some(false) => println!("SPLIT BRAIN: the destination's copy runs again after the failover"),
            None => {}
        }
        println!("{}", one_copy.line());
    }
    if mode.checkpoints() && fail_at != FailAt::None && !recovered && report.failure.is_none() && !args.json {
        match kind {
            FailKind::Stall => println!(
                "(the migration completed before the stall point, or before --checkpoint-timeout ({} ms) ran out after it)",
                options.checkpoint_timeout_ms
            ),
            FailKind::Lossy | FailKind::SlowSource => {
                println!("(the migration completed: with the link degraded or the source slowed, or before that)")
            }
            FailKind::Reset => println!("(the migration completed before the reset)"),
            _ => println!("(the failure point was not reached before the migration completed)"),
        }
    }
    if let Some(url) = &dashboard_url {
        if !args.json {
            println!("the dashboard stays up at {url}: press Ctrl-C to stop the agents");
        }
        let _ = runtime().block_on(tokio::signal::ctrl_c());
    }
    drop(agents);
    if !fenced_ok {
        Err(run_failure(anyhow!("the destination's copy ran again after the failover (not fenced)")))
    } else if !one_copy_ok {
        Err(run_failure(anyhow!("{}", one_copy.line())))
    } else if verified_ok && outputs_ok {
        Ok(())
    } else if !verified_ok {
        Err(run_failure(anyhow!("the VM did not verify: {}", error.unwrap_or_default())))
    } else {
        Err(run_failure(anyhow!(
            "released output is inconsistent with the recovered run: {} lost or contradicted, {} never released",
            outputs.lost,
            outputs.never_released
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(vcpu: u8, start_us: u64, end_us: u64) -> RunInterval {
        RunInterval { vcpu, start_us, end_us, ended_blocked: false }
    }

    fn at(intervals: &[RunInterval], phase: Option<VmPhase>) -> CopyAt {
        CopyAt { runs: Some(RunLogSnapshot { intervals: intervals.to_vec(), ..Default::default() }), phase }
    }

    #[test]
    fn copies_that_take_turns_pass_the_check() {
        // The source runs until the switchover; the destination from then until it is
        // fenced; the source's restored copy after the lease.
        let source = [span(0, 0, 1_000), span(1, 10, 990), span(0, 5_000, 9_000), span(1, 5_001, 8_000)];
        let destination = [span(0, 1_000, 3_000), span(1, 1_200, 2_900)];
        let check = OneCopy::new(at(&source, Some(VmPhase::Finished)), at(&destination, Some(VmPhase::Failed)));
        assert_eq!((check.overlap, check.first), (Duration::ZERO, None));
        assert_eq!(check.copies_at_end(), 1);
        assert_eq!(
            check.line(),
            "one copy at a time: the two copies never ran at once (4 run intervals at the source, 2 run intervals \
             at the destination); one copy at the end, at the source"
        );
    }

    #[test]
    fn copies_that_ran_at_once_fail_the_check_and_name_the_first_pair() {
        // A destination vCPU that entered the guest after its lease ran out, while the
        // source's restored copy already ran: what a broken fence looks like.
        let source = [span(0, 0, 1_000), span(0, 5_000, 9_000), span(1, 5_500, 9_000)];
        let destination = [span(0, 1_000, 3_000), span(1, 5_200, 5_700), span(0, 8_000, 8_100)];
        let check = OneCopy::new(at(&source, Some(VmPhase::Finished)), at(&destination, Some(VmPhase::Failed)));
        assert_eq!(check.overlap, Duration::from_micros(600));
        assert_eq!(check.overlap_ms(), 0.6);
        assert_eq!(check.first, Some((span(0, 5_000, 9_000), span(1, 5_200, 5_700))));
        let line = check.line();
        assert!(line.starts_with("one copy at a time: VIOLATED: the two copies ran at once for 0.600 ms"), "{line}");
        assert!(
            line.contains("source vCPU 0 in the guest 5000..9000 µs and destination vCPU 1 5200..5700 µs"),
            "{line}"
        );
    }

    #[test]
    fn the_copies_at_the_end_count_where_the_vm_runs_or_finished() {
        let none = CopyAt::default();
        let check = |s: Option<VmPhase>, d: Option<VmPhase>| OneCopy::new(at(&[], s), at(&[], d)).copies_at_end();
        assert_eq!(check(Some(VmPhase::MigratedAway), Some(VmPhase::Finished)), 1);
        assert_eq!(check(Some(VmPhase::Running), Some(VmPhase::Failed)), 1);
        assert_eq!(check(Some(VmPhase::Finished), Some(VmPhase::Running)), 2);
        assert_eq!(check(Some(VmPhase::Failed), None), 0);
        // A killed destination agent: no copy and no intervals there.
        let crashed = OneCopy::new(at(&[span(0, 0, 10)], Some(VmPhase::Finished)), none);
        assert_eq!(crashed.copies_at_end(), 1);
        assert!(crashed.line().contains("none from the destination, whose agent is gone"), "{}", crashed.line());
    }
}
