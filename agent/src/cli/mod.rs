//! `pcft`'s command line: argument definitions and the mapping from failures
//! to exit codes (2: bad input or an unusable host; 1: the run itself failed).

pub mod cgroup;
pub mod demo;
pub mod dirty_takes;
pub mod migration;
pub mod netns;
pub mod remote;
pub mod report;
pub mod soak;
pub mod stopwatch;
pub mod vm;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pcft_agent::wire::auth::Psk;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "pcft", version, about = "PostCopyFT: fault-tolerant post-copy live migration for KVM")]
pub struct Cli {
    /// Log level filter (overrides RUST_LOG), e.g. debug or pcft_agent=trace.
    #[arg(long, global = true)]
    pub log: Option<String>,
    /// Log lines as text, or as one JSON object per event (with its spans).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The pre-shared key, on the commands that talk to agents.
#[derive(Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// Pre-shared key file (hex, mode 600; `pcft keygen` makes one): an agent
    /// then talks only to peers that hold the same key, and the CLI
    /// authenticates to agents with it. Every frame carries a GMAC (AES-256-GCM) tag.
    #[arg(long, env = "PCFT_PSK_FILE")]
    pub psk_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where an agent listens unless told otherwise.
pub const DEFAULT_AGENT: &str = "127.0.0.1:7401";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the per-host agent daemon: it runs VMs and sends and receives migrations.
    Agent(AgentArgs),
    /// Run, snapshot and restore fixture VMs on this host, or start and watch them on an agent.
    #[command(subcommand)]
    Vm(Box<VmCommand>),
    /// Migrate a VM from the agent that runs it to another agent.
    Migrate(MigrateArgs),
    /// Follow a VM's outgoing migration after `pcft migrate` left it: status, wait, cancel.
    #[command(subcommand)]
    Migration(MigrationCommand),
    /// List an agent's VMs: their state, live dirty rate and migration progress.
    Status(StatusArgs),
    /// One command: start two agents on this machine, run a VM on one, migrate it, verify it on the other.
    Demo(DemoArgs),
    /// Reliability under time: a serving VM migrated back and forth with PostCopyFT for minutes,
    /// its clients writing throughout, failures injected; nothing may be lost, grow or stay behind.
    Soak(SoakArgs),
    /// Write a new random pre-shared key (for --psk-file) to a file readable by its owner only.
    Keygen(KeygenArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Copy rounds while the VM runs at the source, then stop-and-copy.
    Precopy,
    /// Switch at once; the destination pulls pages on demand while the source pushes the rest.
    Postcopy,
    /// One full copy while the VM runs, then post-copy for what it wrote since.
    Hybrid,
    /// Post-copy with reverse incremental checkpoints and failover (PostCopyFT).
    #[value(name = "postcopy-ft")]
    PostcopyFt,
}

impl From<ModeArg> for pcft_agent::wire::payload::Mode {
    fn from(m: ModeArg) -> Self {
        use pcft_agent::wire::payload::Mode;
        match m {
            ModeArg::Precopy => Mode::Precopy,
            ModeArg::Postcopy => Mode::Postcopy,
            ModeArg::Hybrid => Mode::Hybrid,
            ModeArg::PostcopyFt => Mode::PostcopyFt,
        }
    }
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed first).
    #[arg(long, default_value = DEFAULT_AGENT)]
    pub listen: String,
    /// This agent's name in logs and reports (default: the listen address).
    #[arg(long)]
    pub name: Option<String>,
    /// The most guest memory this agent accepts for one VM (default: all of this host's memory).
    #[arg(long)]
    pub max_guest_mem: Option<String>,
    /// The most guest memory this agent's VMs hold together: running,
    /// arriving, and ended but not yet released (default: all of this host's memory).
    #[arg(long)]
    pub max_total_guest_mem: Option<String>,
    /// Seconds a VM that no longer runs here (finished, failed, stopped)
    /// keeps its memory before the agent gives it back; its record stays (pcft vm rm removes it).
    #[arg(long, default_value_t = 300)]
    pub release_after: u64,
    /// On SIGTERM (or Ctrl-C), the agent takes no new work and waits at most
    /// this many seconds for its running migrations to end, then stops its VMs
    /// and exits; a second signal stops the wait at once.
    #[arg(long, default_value_t = 120)]
    pub shutdown_timeout: u64,
    /// The most migrations (in and out together) this agent runs at once; more are refused.
    #[arg(long, default_value_t = 4)]
    pub max_migrations: usize,
    /// The most connections this agent keeps that have not greeted yet (one
    /// more closes the oldest of them), and the most greeted ones it serves
    /// (the CLI's, migrations' and their demand channels; one more is refused
    /// with the reason); both counted in pcft_connections_refused_total
    /// [default: 512, or a quarter of the open-files limit (ulimit -n) if that
    /// is less, at least 16].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Run without a pre-shared key: any peer that reaches --listen may start,
    /// stop, remove and migrate VMs here (test benches only). Without it an agent
    /// needs --psk-file (or PCFT_PSK_FILE).
    #[arg(long)]
    pub insecure: bool,
    /// Memory for the pages of a PostCopyFT checkpoint that has not committed
    /// yet, per outgoing migration; the rest of a larger checkpoint waits in a
    /// file in --staging-dir.
    #[arg(long, default_value = "64M")]
    pub staging_memory: String,
    /// Where a checkpoint larger than --staging-memory waits for its commit
    /// (an unlinked file; room for one checkpoint: up to the VM's memory) [default: the temp dir, e.g. /tmp].
    #[arg(long)]
    pub staging_dir: Option<std::path::PathBuf>,
    /// Fault injection: every write to the checkpoint staging file takes this many ms more (a slow disk).
    #[arg(long, hide = true, default_value_t = 0)]
    pub staging_delay_ms: u64,
    /// Send released guest output (one JSON line per record) to the TCP listener
    /// at this address: the outside world of the VMs on this agent.
    #[arg(long)]
    pub output_sink: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port;
    /// the bound address is printed on the second line of stdout).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Print the listening addresses as one JSON object (the first line of stdout).
    #[arg(long)]
    pub json: bool,
    /// Fault injection: SIGKILL this agent at a point of an incoming PostCopyFT
    /// migration (before-first-checkpoint, speculative:N, pause:N, committed:N, after-last-page,
    /// after-finish).
    #[arg(long, hide = true)]
    pub crash_at: Option<pcft_agent::fault::crash::CrashPoint>,
    /// Fault injection: what happens at --crash-at (kill: SIGKILL; stop: SIGSTOP, a frozen host;
    /// stall: the checkpointer hangs while heartbeats go on; stall-fence: the agent goes
    /// silent and its vCPU threads and lease watchdog stall for --stall-fence-ms at their worst moments).
    #[arg(long, hide = true, default_value = "kill")]
    pub crash_signal: pcft_agent::fault::crash::CrashSignal,
    /// Fault injection: how long each stall of --crash-signal stall-fence lasts, in ms.
    #[arg(long, hide = true, default_value_t = 1000)]
    pub stall_fence_ms: u64,
    /// Fault injection: the first resume of an incoming VM starts vCPU 0 and then fails.
    #[arg(long, hide = true)]
    pub fail_resume: bool,
    /// Fault injection: as a PostCopyFT destination, send the guest's network
    /// frames at once instead of holding them until their checkpoint commits.
    #[arg(long, hide = true)]
    pub no_output_commit: bool,
    /// Test instrument: write a line to this file for every frame a guest
    /// here transmits and every checkpoint sent (see fault::frame_trace).
    #[arg(long, hide = true)]
    pub frame_trace: Option<PathBuf>,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Name of the VM to migrate.
    pub name: String,
    /// The agent that runs the VM now.
    #[arg(long, default_value = DEFAULT_AGENT)]
    pub agent: String,
    /// The agent to migrate it to.
    #[arg(long)]
    pub to: String,
    /// How the VM moves. The default, postcopy-ft, survives the loss of the
    /// destination or the network during post-copy (the source takes the VM
    /// back from its last checkpoint); plain postcopy loses the VM then, for
    /// somewhat less traffic and time.
    #[arg(long, value_enum, default_value_t = ModeArg::PostcopyFt)]
    pub mode: ModeArg,
    /// Pre-copy: most rounds before stop-and-copy.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Seconds to wait for each answer of the destination before the switchover commits.
    #[arg(long, default_value_t = 30)]
    pub reply_timeout: u64,
    /// Post-copy: most pages per second the background push sends (0: no limit);
    /// pages the guest faults on are never held back.
    #[arg(long, default_value_t = 0)]
    pub postcopy_rate: u64,
    #[command(flatten)]
    pub ft: FtArgs,
    /// Return once the migration has started instead of when it ends; follow
    /// it with `pcft migration status|wait|cancel NAME`.
    #[arg(long)]
    pub detach: bool,
    /// Print the migration report as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Subcommand, Debug)]
pub enum MigrationCommand {
    /// Where a VM's latest outgoing migration is (running, or how it ended).
    Status(VmNameArgs),
    /// Wait for a VM's outgoing migration to end and print its report, as `pcft migrate` would have.
    Wait(MigrationWaitArgs),
    /// Cancel a VM's outgoing migration: before its switchover the VM stays at
    /// the source; after it, only a PostCopyFT migration can be cancelled (a
    /// deliberate failover to the source's last committed checkpoint).
    Cancel(VmNameArgs),
}

#[derive(Args, Debug)]
pub struct MigrationWaitArgs {
    #[command(flatten)]
    pub migration: VmNameArgs,
    /// Give up (exit 1; the migration goes on) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

/// PostCopyFT tuning (used with `--mode postcopy-ft`; other modes refuse it).
#[derive(Args, Debug, Clone)]
pub struct FtArgs {
    /// How often the destination checkpoints back to the source, in ms [default: 100].
    #[arg(long)]
    pub checkpoint_interval: Option<u64>,
    /// How often the destination sends a heartbeat, in ms [default: 20].
    #[arg(long)]
    pub heartbeat_interval: Option<u64>,
    /// Silence after which either side declares the other lost (and the destination's lease), in ms [default: 200].
    #[arg(long)]
    pub heartbeat_timeout: Option<u64>,
    /// How long the source waits for the destination's next checkpoint, in ms:
    /// past it a destination whose heartbeats go on but whose checkpoints
    /// stopped is declared failed (and the VM recovered at the source) [default: 3000].
    #[arg(long)]
    pub checkpoint_timeout: Option<u64>,
    /// How the destination tracks the pages the guest writes there, for
    /// checkpoints [default: bitmap; for `pcft demo`, its --dirty-tracker].
    #[arg(long, value_enum)]
    pub checkpoint_tracker: Option<TrackerArg>,
}

impl FtArgs {
    /// These settings over `base`; the checkpoint tracker is `default_tracker` unless given.
    pub fn options(
        &self,
        base: pcft_agent::wire::payload::MigrationOptions,
        default_tracker: TrackerArg,
    ) -> pcft_agent::wire::payload::MigrationOptions {
        pcft_agent::wire::payload::MigrationOptions {
            checkpoint_interval_ms: self.checkpoint_interval.unwrap_or(base.checkpoint_interval_ms),
            heartbeat_interval_ms: self.heartbeat_interval.unwrap_or(base.heartbeat_interval_ms),
            heartbeat_timeout_ms: self.heartbeat_timeout.unwrap_or(base.heartbeat_timeout_ms),
            checkpoint_timeout_ms: self.checkpoint_timeout.unwrap_or(base.checkpoint_timeout_ms),
            checkpoint_tracker: self.checkpoint_tracker.unwrap_or(default_tracker).into(),
            ..base
        }
    }

    /// The first PostCopyFT option given, if any (a mode without checkpoints refuses them).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("--checkpoint-interval", self.checkpoint_interval.is_some()),
            ("--heartbeat-interval", self.heartbeat_interval.is_some()),
            ("--heartbeat-timeout", self.heartbeat_timeout.is_some()),
            ("--checkpoint-timeout", self.checkpoint_timeout.is_some()),
            ("--checkpoint-tracker", self.checkpoint_tracker.is_some()),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How the VM moves (see `pcft migrate --help`).
    #[arg(long, value_enum, default_value_t = ModeArg::PostcopyFt)]
    pub mode: ModeArg,
    /// Guest memory size.
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// Guest workload: ledger (verifiable records), dirty (writes memory),
    /// idle, or kv (a key-value server whose clients, on a network of their
    /// own, write and read for the whole run; their history is checked at the end).
    #[arg(long, default_value = "ledger")]
    pub fixture: String,
    /// Number of vCPUs, each running its own share of the workload [default: 2; kv: 1, all it runs on].
    #[arg(long)]
    pub vcpus: Option<u64>,
    /// Steps each vCPU runs (default: enough to still be running when the migration starts).
    #[arg(long)]
    pub steps: Option<u64>,
    /// How long the VM runs at the source before the migration starts [default: 300; with --dashboard, 5000].
    #[arg(long)]
    pub migrate_after_ms: Option<u64>,
    /// postcopy-ft: where the destination fails. `none`; `random` (one of the
    /// points below, printed; for partition, lossy and slow-source: 400ms; for
    /// reset: 300ms to 600ms; for stall: epoch:N, N from 1 to 5; for
    /// stall-fence: any point but after-last-page); `Nms` (N ms after the
    /// switchover: crash, freeze, partition, lossy, slow-source, reset);
    /// `epoch:N` (checkpoint N's pages went out, its commit record did not: it
    /// never commits; for stall, right after the record); `speculative:N` (in
    /// checkpoint N's speculative copy); `pause:N` (in checkpoint N's pause);
    /// `before-first-checkpoint`; `after-last-page` (when the last page
    /// arrived); `after-finish` (the destination took the VM on `Finish` and
    /// has not answered `Finished`: the source must report
    /// `finish-unconfirmed` and not restore; never picked at random). The
    /// points are for crash, freeze and stall-fence; stall takes epoch:N,
    /// speculative:N and before-first-checkpoint.
    #[arg(long, default_value = "random")]
    pub fail_at: String,
    /// How the migration fails: `crash` (SIGKILL of the destination agent),
    /// `freeze` (SIGSTOP; SIGCONT once the source has recovered the VM: the
    /// destination must find its lease expired and stay stopped),
    /// `partition` (the agents run in network namespaces joined by a veth
    /// pair, which is cut; healed after the failover), `lossy` (the same
    /// namespaces; the pair is made lossy and slow, see --loss and
    /// --delay-ms; restored after the migration), `slow-source` (the SOURCE
    /// agent is held to --source-cpu-pct of a CPU by a cgroup until the
    /// migration ends), `stall` (the destination's checkpointer hangs at the
    /// point while its heartbeats go on: a gray failure the source must
    /// detect from the missing checkpoints, by --checkpoint-timeout), `reset`
    /// (both agents stay alive on loopback; an nftables rule answers the
    /// migration connection's packets with TCP resets, see --reset-side;
    /// removed after the migration), or `stall-fence` (the destination goes
    /// silent at the point, and its vCPU threads and lease watchdog each
    /// stall once, for 3 heartbeat timeouts + 300 ms, at their worst moments:
    /// its fence must stop the guest on time anyway). Lossy and slow-source
    /// may complete (slowly) or fail over; every kind but crash must leave
    /// the destination fenced if the source recovered the VM.
    #[arg(long, value_enum, default_value_t = FailKind::Crash)]
    pub fail_kind: FailKind,
    /// reset: whose packets are answered with a reset: the source's to the
    /// destination (the source sees the reset), the destination's back to the
    /// source (the destination sees it; the source, only the reset its next
    /// write draws from the destination's closed socket), or both.
    #[arg(long, value_enum, default_value_t = netns::ResetSide::Source)]
    pub reset_side: netns::ResetSide,
    /// lossy: packets lost on the link between the hosts, in % each way (100: a cut).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub loss: u32,
    /// lossy: delay added on the link between the hosts, in ms each way (0:
    /// none). With `tc netem` a fixed delay; on a kernel without netem, a
    /// `tbf` queue of this many ms at --link-mbit (a delay while the link is
    /// busy, as it is during post-copy's push).
    #[arg(long, default_value_t = 40)]
    pub delay_ms: u64,
    /// lossy, without netem: the rate of the `tbf` queue that makes the delay,
    /// in Mbit/s (the default is above the push of --postcopy-rate 4096, about
    /// 140; the link then queues in bursts, such as checkpoints).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub link_mbit: u64,
    /// slow-source: the source agent's CPU quota, in % of one CPU (cgroup cpu
    /// controller, 100 ms period).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub source_cpu_pct: u32,
    /// slow-disk: how much longer each write to the source's checkpoint staging
    /// file takes, in ms (every checkpoint page goes through that file).
    #[arg(long, default_value_t = 20)]
    pub disk_delay_ms: u64,
    /// Post-copy push rate in pages/s (0: no limit). Default: 16384 for
    /// postcopy-ft (a 256M guest stays in post-copy for up to 4 s, long enough
    /// for checkpoints and failures to matter), no limit for the other modes.
    #[arg(long)]
    pub postcopy_rate: Option<u64>,
    /// How the VM's written pages are tracked: at the source (its dirty rate)
    /// and, unless --checkpoint-tracker says otherwise, at the destination for
    /// checkpoints [default: bitmap; with --dashboard, auto].
    #[arg(long, value_enum)]
    pub dirty_tracker: Option<TrackerArg>,
    /// Serve each agent's live dashboard (and metrics): the source's at this
    /// address (port 0: a free one), the destination's on a free port; print
    /// the URL, and keep the agents up after the report until Ctrl-C. Also
    /// makes the run long enough to watch: unless given, --migrate-after-ms
    /// 5000, ten times the default --steps, and --dirty-tracker auto.
    #[arg(long)]
    pub dashboard: Option<String>,
    /// kv: how many client connections write to the VM and read from it for
    /// the whole run (from a client network namespace; see the report's client lines).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub clients: u32,
    /// Fault injection: the destination sends the guest's network frames at
    /// once, without output commit (to see what it prevents: lost acknowledged writes).
    #[arg(long, hide = true)]
    pub no_output_commit: bool,
    /// Run the agents without authentication (by default they and the demo
    /// share a fresh pre-shared key, or the one given with --psk-file).
    #[arg(long)]
    pub no_auth: bool,
    #[command(flatten)]
    pub ft: FtArgs,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long to migrate back and forth, in minutes.
    #[arg(long, default_value_t = 2.0)]
    pub minutes: f64,
    /// Seconds between the end of one migration and the start of the next.
    #[arg(long, default_value_t = 3.0)]
    pub every_secs: f64,
    /// Every Nth migration fails: the destination is SIGKILLed (and started
    /// again), cut off by a partition (healed after), or frozen past its lease
    /// (continued after), in turn (0: none fails).
    #[arg(long, default_value_t = 3)]
    pub fail_every: u32,
    /// Client connections writing and reading for the whole soak.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub clients: u32,
    /// Guest memory.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// Post-copy push rate in pages/s (a 64M guest stays in post-copy about 4 s).
    #[arg(long, default_value_t = 4096)]
    pub postcopy_rate: u64,
    /// Print the report (with every resource sample) as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The key file to create (never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Print the key file's path as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The key `--psk-file` names, if any (a bad key file is bad input: exit 2).
pub fn load_key(path: Option<&std::path::Path>) -> Result<Option<Psk>, Failure> {
    path.map(Psk::load).transpose().map_err(usage)
}

/// `pcft keygen`.
pub fn keygen(args: KeygenArgs) -> Result<(), Failure> {
    let key = Psk::generate().map_err(run_failure)?;
    key.write_new(&args.out).map_err(usage)?;
    if args.json {
        println!("{}", serde_json::json!({ "psk_file": args.out }));
    } else {
        println!(
            "wrote a new pre-shared key to {}: give it to every agent and CLI with --psk-file",
            args.out.display()
        );
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FailKind {
    /// SIGKILL the destination agent.
    Crash,
    /// SIGSTOP the destination agent, and SIGCONT it after the failover.
    Freeze,
    /// Run the agents in network namespaces of their own, joined by a veth
    /// pair, and cut that link (then heal it after the failover).
    Partition,
    /// The same namespaces; make the link lossy and slow (netem, or nftables
    /// loss and tbf queueing), then restore it.
    Lossy,
    /// Hold the source agent to a small CPU quota (cgroup cpu controller).
    SlowSource,
    /// The destination's checkpointer hangs while its heartbeats go on.
    Stall,
    /// From the start, the source stages every checkpoint page in a file whose
    /// every write is slow (--disk-delay-ms): a slow disk at the source.
    SlowDisk,
    /// Both agents stay alive; TCP resets are injected into the migration
    /// connection (an nftables rule on loopback, see --reset-side).
    Reset,
    /// The destination goes silent at a point, and its vCPU threads and lease
    /// watchdog stall right where a weak fence would let the guest run on.
    StallFence,
}

impl FailKind {
    /// Its name on the command line and in reports.
    pub fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Boot a fixture VM, print its output records, and verify it against the oracle when it finishes.
    Run(RunArgs),
    /// Restore a VM from a snapshot file and run it on from where it was saved.
    Restore(RestoreArgs),
    /// Check a snapshot file's checksums and describe what it holds.
    Inspect(InspectArgs),
    /// Start a fixture VM on an agent.
    Start(StartArgs),
    /// List an agent's VMs (the same as `pcft status`).
    Status(StatusArgs),
    /// List an agent's VMs (the same as `pcft status`).
    List(StatusArgs),
    /// Stop a VM's guest for good; its record (phase, records) stays until `pcft vm rm`.
    Stop(VmNameArgs),
    /// Forget a VM that no longer runs (stopped, finished, failed, migrated away) and free its memory.
    Rm(VmNameArgs),
    /// Wait until a VM's workload finishes on an agent, and verify it against the oracle there.
    Wait(WaitArgs),
}

impl Command {
    /// The key file the command was given, if it talks to agents (`keygen`
    /// and the local `vm` commands take none).
    pub fn psk_file(&self) -> Option<&std::path::Path> {
        let key = match self {
            Command::Agent(a) => &a.key,
            Command::Migrate(a) => &a.key,
            Command::Status(a) => &a.key,
            Command::Demo(a) => &a.key,
            Command::Soak(a) => &a.key,
            Command::Migration(m) => match m {
                MigrationCommand::Status(a) | MigrationCommand::Cancel(a) => &a.key,
                MigrationCommand::Wait(a) => &a.migration.key,
            },
            Command::Vm(vm) => match &**vm {
                VmCommand::Start(a) => &a.key,
                VmCommand::Status(a) | VmCommand::List(a) => &a.key,
                VmCommand::Wait(a) => &a.key,
                VmCommand::Stop(a) | VmCommand::Rm(a) => &a.key,
                VmCommand::Run(_) | VmCommand::Restore(_) | VmCommand::Inspect(_) => return None,
            },
            Command::Keygen(_) => return None,
        };
        key.psk_file.as_deref()
    }
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// Name for the VM (unique on the agent while it runs there).
    #[arg(long)]
    pub name: String,
    /// The agent to start it on (its --listen address).
    #[arg(long, default_value = DEFAULT_AGENT)]
    pub agent: String,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Print the answer as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
pub struct VmNameArgs {
    /// Name of the VM.
    pub name: String,
    /// The agent it is on (for `pcft migration`: the agent it migrates out of).
    #[arg(long, default_value = DEFAULT_AGENT)]
    pub agent: String,
    /// Print the answer as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The agent to ask (its --listen address).
    #[arg(long, default_value = DEFAULT_AGENT)]
    pub agent: String,
    /// Print the agent's VMs as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Name of the VM.
    pub name: String,
    /// The agent it runs on (its --listen address).
    #[arg(long, default_value = DEFAULT_AGENT)]
    pub agent: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Print the verdict as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    Sequential,
    Random,
    HotCold,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub control: RunControl,
}

/// The fixture VM to build: shared by `vm run` and `vm start`.
#[derive(Args, Debug)]
pub struct WorkloadArgs {
    /// Guest workload: ledger, dirty, idle, or kv (a key-value server speaking
    /// Redis's protocol on port 6379; needs --net tap).
    #[arg(long, default_value = "ledger")]
    pub fixture: String,
    /// Guest memory size (a multiple of 2M), e.g. 256M or 1G.
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// Number of vCPUs, each running its own share of the workload.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    /// Steps each vCPU runs (default: the fixture's own).
    #[arg(long, conflicts_with = "forever")]
    pub steps: Option<u64>,
    /// Run until stopped (no verification).
    #[arg(long)]
    pub forever: bool,
    /// Working set size (a multiple of 4K; default: all memory above 1M).
    #[arg(long)]
    pub working_set: Option<String>,
    /// Emit an output record every this many steps (default: the fixture's own).
    #[arg(long)]
    pub record_every: Option<u64>,
    /// Seed of the workload's pseudo-random choices.
    #[arg(long)]
    pub seed: Option<u64>,
    /// ledger: pages written per step.
    #[arg(long, default_value_t = 1)]
    pub writes_per_step: u64,
    /// dirty: which pages are written.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pub pattern: Pattern,
    /// dirty, hot-cold pattern: size of each vCPU's hot set, in pages.
    #[arg(long, default_value_t = 64)]
    pub hot_pages: u64,
    /// dirty, hot-cold pattern: share of writes that go to the hot set, in per mille.
    #[arg(long, default_value_t = 900)]
    pub hot_permille: u64,
    /// dirty: pages each vCPU writes per second (default: as fast as it can).
    #[arg(long)]
    pub rate: Option<u64>,
    /// idle: pause instructions between steps.
    #[arg(long)]
    pub spin: Option<u64>,
    /// Guest memory is registered with KVM as memslots of at most this size (a multiple of 2M).
    #[arg(long, default_value = "128M")]
    pub slot_size: String,
    /// How the VM's written pages are tracked (for pre-copy and its dirty rate):
    /// KVM's dirty bitmap, or its dirty ring (65,536 entries per vCPU, drained by
    /// a thread of its own), or eBPF; auto picks the best this host has.
    #[arg(long, value_enum, default_value_t = TrackerArg::Auto)]
    pub dirty_tracker: TrackerArg,
    /// Start with all of guest memory written, as a guest that has run for a
    /// while has it: before boot, every page the boot image does not use gets
    /// a non-zero pattern that the fixture's oracle expects wherever the guest
    /// does not write (so no page migrates as a zero page).
    #[arg(long)]
    pub prefill: bool,
    #[command(flatten)]
    pub net: NetArgs,
}

impl WorkloadArgs {
    /// `fixture` in `mem` with every other option at its default (one vCPU,
    /// the fixture's steps, random writes, the bitmap tracker, no network).
    pub fn new(fixture: &str, mem: &str) -> Self {
        WorkloadArgs {
            fixture: fixture.into(),
            mem: mem.into(),
            vcpus: 1,
            steps: None,
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
            dirty_tracker: TrackerArg::Bitmap,
            prefill: false,
            net: NetArgs::none(),
        }
    }
}

/// A network guest's network (the kv fixture).
#[derive(Args, Debug)]
pub struct NetArgs {
    /// Give the guest a network: `tap` makes a tap device on this host (or
    /// takes the one --tap names, if it has --host-ip), with the host at
    /// --host-ip and the guest at --guest-ip; `bridge` makes the tap without
    /// an address on the existing L2 bridge --bridge (the VM keeps its address
    /// on whichever host runs it). A tap made here is removed when the VM ends.
    #[arg(long, value_enum)]
    pub net: Option<NetArg>,
    /// The tap's name.
    #[arg(long, default_value = "pcft-kv0")]
    pub tap: String,
    /// With `--net bridge`, the L2 bridge the tap joins (it must exist on
    /// every host that runs the VM, under this name).
    #[arg(long, default_value = "pcft-br0")]
    pub bridge: String,
    /// The guest's IPv4 address.
    #[arg(long, default_value = "10.77.0.2")]
    pub guest_ip: std::net::Ipv4Addr,
    /// The guest's gateway: the host's IPv4 address on the tap; with --net
    /// bridge, an address on the bridge's network (e.g. its router).
    #[arg(long, default_value = "10.77.0.1")]
    pub host_ip: std::net::Ipv4Addr,
    /// The network's prefix length.
    #[arg(long, default_value_t = 24)]
    pub prefix: u8,
    /// kv: the most bytes of keys and values the store holds (past it, writes get an error), e.g. 16M.
    #[arg(long, default_value = "16M")]
    pub store_size: String,
}

impl NetArgs {
    /// No network, with the options' defaults.
    pub fn none() -> Self {
        NetArgs {
            net: None,
            tap: "pcft-kv0".into(),
            bridge: "pcft-br0".into(),
            guest_ip: std::net::Ipv4Addr::new(10, 77, 0, 2),
            host_ip: std::net::Ipv4Addr::new(10, 77, 0, 1),
            prefix: 24,
            store_size: "16M".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetArg {
    /// A tap device on this host, with the host's address (--host-ip).
    Tap,
    /// A tap device without an address, on the L2 bridge --bridge.
    Bridge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrackerArg {
    /// KVM's dirty bitmap.
    Bitmap,
    /// KVM's dirty ring, drained by a thread of its own.
    Ring,
    /// The eBPF program on kvm:kvm_dirty_ring_push (needs root and a pcft built after `cargo xtask build-ebpf`).
    Ebpf,
    /// eBPF if it loads here, else the ring (with a warning).
    Auto,
}

impl From<TrackerArg> for pcft_agent::vmm::dirty::DirtyTracking {
    fn from(t: TrackerArg) -> Self {
        use pcft_agent::vmm::dirty::DirtyTracking;
        match t {
            TrackerArg::Bitmap => DirtyTracking::Bitmap,
            TrackerArg::Ring => DirtyTracking::Ring { entries: DirtyTracking::DEFAULT_RING_ENTRIES },
            TrackerArg::Ebpf => DirtyTracking::Ebpf { entries: DirtyTracking::DEFAULT_RING_ENTRIES },
            TrackerArg::Auto => DirtyTracking::Auto { entries: DirtyTracking::DEFAULT_RING_ENTRIES },
        }
    }
}

/// What to do while the VM runs, shared by `run` and `restore`.
#[derive(Args, Debug)]
pub struct RunControl {
    /// Write a snapshot to this file and stop, at the point set by --snapshot-at-record or --snapshot-after-ms.
    #[arg(long)]
    pub snapshot_out: Option<PathBuf>,
    /// Take the snapshot once this many output records (in all, counting any before a restore) have been emitted.
    #[arg(long, requires = "snapshot_out", conflicts_with = "snapshot_after_ms")]
    pub snapshot_at_record: Option<usize>,
    /// Take the snapshot this many milliseconds after the VM starts running.
    #[arg(long, requires = "snapshot_out")]
    pub snapshot_after_ms: Option<u64>,
    /// Give up (exit 1) if the VM has not finished after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Run this many seconds, then stop the VM (exit 0). A serving VM (kv)
    /// otherwise runs until Ctrl-C.
    #[arg(long, conflicts_with = "timeout")]
    pub seconds: Option<u64>,
    /// Track the pages the guest writes and take them every this many
    /// milliseconds, as checkpoint epochs would; the result reports the takes
    /// (for dirty-tracking benchmarks). `vm run` tracks with its
    /// --dirty-tracker; `vm restore` with KVM's dirty bitmap.
    #[arg(long)]
    pub take_dirty_every: Option<u64>,
    /// Print JSON lines instead of text: one object per output record, then the result.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot file written by `pcft vm run --snapshot-out`.
    pub snapshot: PathBuf,
    #[command(flatten)]
    pub control: RunControl,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Snapshot file to check.
    pub snapshot: PathBuf,
    /// Print what it holds as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A failure, with the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// Bad input or an unusable host: exit 2.
    Usage(anyhow::Error),
    /// The run itself failed (KVM error, verification mismatch, timeout): exit 1.
    Run(anyhow::Error),
    /// The operator interrupted the command (Ctrl-C): exit 130, as a shell reports SIGINT.
    Interrupted(anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Run(_) => 1,
            Failure::Interrupted(_) => 130,
        }
    }

    pub fn error(&self) -> &anyhow::Error {
        match self {
            Failure::Usage(e) | Failure::Run(e) | Failure::Interrupted(e) => e,
        }
    }
}

pub fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Usage(e.into())
}

pub fn run_failure(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Run(e.into())
}
