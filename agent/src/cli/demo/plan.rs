//! What a demo run will do, from its arguments, checked before anything
//! starts: the VM, the migration (mode and options), and the failure (its
//! kind and where it happens, with `random` resolved to a pick).

use super::fail_at::FailAt;
use crate::cli::netns::ClientLan;
use crate::cli::vm::{machine_config, KVM_PATH};
use crate::cli::{usage, DemoArgs, FailKind, Failure, NetArgs, TrackerArg, WorkloadArgs};
use anyhow::anyhow;
use pcft_agent::fault::crash::CrashPoint;
use pcft_agent::host;
use pcft_agent::vmm::machine::MachineConfig;
use pcft_agent::wire::payload::{MigrationOptions, Mode};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A demo run, planned.
pub struct DemoPlan {
    /// The fixture VM started at the source.
    pub config: MachineConfig,
    /// How the VM's writes are tracked at the source (and, unless told, for checkpoints).
    pub tracker: TrackerArg,
    pub mode: Mode,
    /// The migration's tuning.
    pub options: MigrationOptions,
    /// How long the VM runs at the source before the migration starts.
    pub migrate_after: Duration,
    /// The failure to inject.
    pub fault: FaultPlan,
    /// A serving VM's clients (the kv fixture).
    pub clients: Option<ClientPlan>,
}

/// The clients of a serving VM (the kv fixture), on a network of their own.
pub struct ClientPlan {
    /// How many connections.
    pub connections: u32,
    /// Where the VM serves (its address on the clients' network).
    pub guest: SocketAddr,
    /// The clients' bridge address, the VM's gateway, e.g. 10.77.0.1/24.
    pub gateway: String,
}

/// Which failure the demo injects, how, and where.
pub struct FaultPlan {
    /// `--fail-kind` as given (even when the mode has no checkpoints, and so nothing fails).
    pub kind: FailKind,
    /// Where it happens (resolved: never `random`).
    pub fail_at: FailAt,
    /// The agents run in network namespaces of their own (two hosts): partition or lossy.
    pub netns: bool,
    /// The link between the namespaces is cut (and healed after a failover).
    pub partition: bool,
    /// The link between the namespaces is degraded (and restored after the migration).
    pub lossy: bool,
    /// The migration connection is reset by an nftables rule.
    pub reset: bool,
    /// The destination goes silent and its vCPU threads and lease watchdog stall.
    pub stall_fence: bool,
    /// The source stages its checkpoints on a slow disk from the start (nothing else fails).
    pub slow_disk: bool,
    /// How long each stall of stall-fence lasts, in ms.
    pub stall_fence_ms: u64,
}

impl DemoPlan {
    /// The plan of `args`, or why they cannot run (bad input or an unusable host: exit 2).
    pub fn new(args: &DemoArgs) -> Result<DemoPlan, Failure> {
        let tracker = dirty_tracker(args);
        let config = machine_config(&workload(args, tracker))?;
        host::check_kvm(Path::new(KVM_PATH)).map_err(usage)?;
        let mode: Mode = args.mode.into();
        let clients = config.fixture.net.as_ref().map(|net| ClientPlan {
            connections: args.clients,
            guest: SocketAddr::from((net.ip, net.port)),
            gateway: format!("{}/{}", net.gateway, net.prefix),
        });
        let fault = FaultPlan::new(args, mode, clients.is_some())?;
        let migrate_after =
            Duration::from_millis(args.migrate_after_ms.unwrap_or(if args.dashboard.is_some() { 5000 } else { 300 }));
        let options = args.ft.options(
            MigrationOptions {
                postcopy_pages_per_sec: args.postcopy_rate.unwrap_or(if mode.checkpoints() { 16384 } else { 0 }),
                ..MigrationOptions::default()
            },
            tracker,
        );
        Ok(DemoPlan { config, tracker, mode, options, migrate_after, fault, clients })
    }
}

impl FaultPlan {
    /// The failure of `args` in `mode` (only PostCopyFT fails): `--fail-at`
    /// checked against `--fail-kind`, then resolved. A serving VM (`lan`)
    /// always runs on the testbed's hosts, whose client network it serves.
    fn new(args: &DemoArgs, mode: Mode, lan: bool) -> Result<FaultPlan, Failure> {
        let checkpoints = mode.checkpoints();
        let fail_at = if checkpoints { args.fail_at.parse().map_err(usage)? } else { FailAt::None };
        let kind = args.fail_kind;
        let chosen = args.fail_at != "random";
        if chosen {
            refuse_mismatch(kind, checkpoints, &fail_at, &args.fail_at)?;
        }
        let plan = FaultPlan {
            kind,
            fail_at: FailAt::None,
            netns: lan || ((kind == FailKind::Partition || kind == FailKind::Lossy) && checkpoints),
            partition: kind == FailKind::Partition && checkpoints,
            lossy: kind == FailKind::Lossy && checkpoints,
            reset: kind == FailKind::Reset && checkpoints,
            stall_fence: kind == FailKind::StallFence && checkpoints,
            slow_disk: kind == FailKind::SlowDisk && checkpoints,
            // Each stall of stall-fence lasts well past the source's failover (which
            // comes a heartbeat timeout and a lease after the destination goes silent).
            stall_fence_ms: 3 * args
                .ft
                .heartbeat_timeout
                .unwrap_or(MigrationOptions::DEFAULT_HEARTBEAT_TIMEOUT_MS)
                .max(1)
                + 300,
        };
        Ok(FaultPlan { fail_at: plan.resolve(fail_at, chosen), ..plan })
    }

    /// Where the failure happens: `fail_at` as given when `chosen`; a random
    /// one (`fail_at` picked from all points) narrowed to what the kind allows.
    fn resolve(&self, fail_at: FailAt, chosen: bool) -> FailAt {
        match fail_at {
            // The slow disk is there from the start: nothing else fails.
            _ if self.slow_disk => FailAt::None,
            // A random reset: 300 to 600 ms into post-copy.
            FailAt::After(_) | FailAt::Point(_) if self.reset && !chosen => FailAt::random_after(300, 600),
            // A random stall-fence: at a point while the guest runs at the destination.
            FailAt::After(_) | FailAt::Point(_) if self.stall_fence && !chosen => FailAt::random_point(),
            // These happen at a time; a random one lands in post-copy.
            FailAt::Point(_) if happens_at_a_time(self.kind) => FailAt::After(Duration::from_millis(400)),
            // A random stall: right after one of the first checkpoints.
            FailAt::After(_) | FailAt::Point(_) if self.kind == FailKind::Stall && !chosen => FailAt::random_epoch(),
            other => other,
        }
    }
}

/// Failures that happen at a time, not at a point of the destination's work.
fn happens_at_a_time(kind: FailKind) -> bool {
    matches!(kind, FailKind::Partition | FailKind::Lossy | FailKind::SlowSource | FailKind::Reset)
}

/// Refuses a chosen `--fail-at` (`text`, parsed: `fail_at`) that `kind` cannot fail at.
fn refuse_mismatch(kind: FailKind, checkpoints: bool, fail_at: &FailAt, text: &str) -> Result<(), Failure> {
    if kind == FailKind::StallFence && checkpoints && matches!(fail_at, FailAt::After(_)) {
        return Err(usage(anyhow!(
            "--fail-kind stall-fence happens at a point of the destination's work: use --fail-at \
             before-first-checkpoint, speculative:N, pause:N, epoch:N or after-last-page (or random, none), not {text}"
        )));
    }
    if checkpoints && happens_at_a_time(kind) && matches!(fail_at, FailAt::Point(_)) {
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
    if checkpoints && kind == FailKind::Stall && !stall_point && *fail_at != FailAt::None {
        return Err(usage(anyhow!(
            "--fail-kind stall hangs the destination's checkpointer at a point of its work: \
             use --fail-at epoch:N, speculative:N or before-first-checkpoint (or random, none), not {text}"
        )));
    }
    Ok(())
}

/// The fixture's steps when `--steps` is not given: long enough that the
/// guest still runs when the migration starts.
fn default_steps(fixture: &str) -> Option<u64> {
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

/// The demo's VM as `pcft vm start` would describe it.
fn workload(args: &DemoArgs, dirty_tracker: TrackerArg) -> WorkloadArgs {
    // With a dashboard, a run long enough to watch.
    let scale = if args.dashboard.is_some() { 10 } else { 1 };
    let kv = args.fixture == "kv";
    WorkloadArgs {
        vcpus: args.vcpus.unwrap_or(if kv { 1 } else { 2 }),
        steps: args.steps.or_else(|| default_steps(&args.fixture).map(|steps| steps * scale)),
        dirty_tracker,
        // A serving VM: its tap on each host's bridge of the testbed, so its address follows it.
        net: if kv { ClientLan::vm_net() } else { NetArgs::none() },
        ..WorkloadArgs::new(&args.fixture, &args.mem)
    }
}
