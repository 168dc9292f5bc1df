//! `pcft vm run | restore | inspect`.

use super::dirty_takes::TakeStats;
use super::report::Reporter;
use super::{
    run_failure, usage, Failure, InspectArgs, NetArg, Pattern, RestoreArgs, RunArgs, RunControl, WorkloadArgs,
};
use anyhow::{anyhow, Context};
use pcft_agent::host::{self, format_size, parse_size, require_multiple};
use pcft_agent::vmm::machine::{Machine, MachineConfig, MachineError, MachineEvent};
use pcft_agent::vmm::memory::GuestMemory;
use pcft_agent::vmm::net::provision::NetBackend;
use pcft_agent::vmm::snapshot::{self, SnapshotReader};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_fixtures::{abi, DirtyPattern, FixtureKind, FixtureParams, GuestNet};

pub const KVM_PATH: &str = "/dev/kvm";
const TWO_MIB: u64 = 2 << 20;

/// Turns workload arguments into a machine configuration, or says what is wrong with them.
pub fn machine_config(args: &WorkloadArgs) -> Result<MachineConfig, Failure> {
    let kind: FixtureKind = args.fixture.parse().map_err(usage)?;
    let mem_bytes = parse_size(&args.mem).map_err(usage)?;
    require_multiple("--mem", mem_bytes, TWO_MIB, "2 MiB").map_err(usage)?;
    host::check_memory_fits(mem_bytes).map_err(usage)?;
    let max = abi::MAX_MEM_GIB << 30;
    if mem_bytes > max {
        return Err(usage(anyhow!(
            "--mem {} is more than the {} a fixture VM can map: choose --mem {} or less",
            format_size(mem_bytes),
            format_size(max),
            format_size(max)
        )));
    }
    let slot_bytes = parse_size(&args.slot_size).map_err(usage)?;
    require_multiple("--slot-size", slot_bytes, TWO_MIB, "2 MiB").map_err(usage)?;

    let room = mem_bytes.saturating_sub(abi::WORKING_SET_GPA);
    let ws_bytes = match &args.working_set {
        Some(text) => parse_size(text).map_err(usage)?,
        None => room,
    };
    require_multiple("--working-set", ws_bytes, abi::PAGE_SIZE, "4 KiB").map_err(usage)?;
    if ws_bytes > room {
        return Err(usage(anyhow!(
            "--working-set {} does not fit in --mem {} (the first 1 MiB holds the VMM's boot structures): use at most {}",
            format_size(ws_bytes), format_size(mem_bytes), format_size(room)
        )));
    }

    let mut fixture = FixtureParams::new(kind, args.vcpus, ws_bytes / abi::PAGE_SIZE);
    if args.forever {
        fixture.steps = u64::MAX;
    } else if let Some(steps) = args.steps {
        fixture.steps = steps;
    }
    if let Some(r) = args.record_every {
        fixture.record_every = r;
    }
    if let Some(seed) = args.seed {
        fixture.seed = seed;
    }
    if let Some(spin) = args.spin {
        fixture.spin = spin;
    }
    fixture.writes_per_step = args.writes_per_step;
    fixture.prefill = args.prefill;
    fixture.pattern = match args.pattern {
        Pattern::Sequential => DirtyPattern::Sequential,
        Pattern::Random => DirtyPattern::Random,
        Pattern::HotCold => DirtyPattern::HotCold { hot_pages: args.hot_pages, hot_permille: args.hot_permille },
    };
    let net = &args.net;
    let backend = match net.net {
        Some(how @ (NetArg::Tap | NetArg::Bridge)) => {
            let mut guest = GuestNet::new(net.guest_ip, net.host_ip, net.prefix);
            guest.max_bytes = parse_size(&net.store_size).map_err(usage)?;
            fixture.net = Some(guest);
            Some(match how {
                NetArg::Bridge => NetBackend::bridged(&net.tap, &net.bridge),
                NetArg::Tap => NetBackend::routed(&net.tap),
            })
        }
        None => None,
    };
    fixture.validate().map_err(|e| match e {
        vm_fixtures::ParamsError::NoNetwork => {
            usage(anyhow!("the {kind} fixture serves on a network: add --net tap (or --net bridge)"))
        }
        vm_fixtures::ParamsError::NetworkNotServed(_) => {
            usage(anyhow!("--net: the {kind} fixture has no network device; only --fixture kv takes --net"))
        }
        e => usage(e),
    })?;
    if args.rate == Some(0) {
        return Err(usage(anyhow!(
            "--rate must be at least 1 page per second; leave it out to write as fast as the guest can"
        )));
    }
    Ok(MachineConfig { mem_bytes, slot_bytes, fixture, dirty_rate: args.rate, net: backend })
}

/// Checks `--snapshot-out` before anything runs: it needs a point to take
/// the snapshot at, and a place where a file can be written.
fn check_snapshot_out(control: &RunControl) -> Result<(), Failure> {
    let Some(path) = &control.snapshot_out else {
        return Ok(());
    };
    if control.snapshot_at_record.is_none() && control.snapshot_after_ms.is_none() {
        return Err(usage(anyhow!(
            "--snapshot-out {} needs a point to take the snapshot at: add --snapshot-at-record N or --snapshot-after-ms MS",
            path.display()
        )));
    }
    snapshot::check_writable(path)
        .with_context(|| format!("cannot write a snapshot to {} (--snapshot-out)", path.display()))
        .map_err(usage)
}

/// The snapshot point, in the words of its option.
fn snapshot_point(control: &RunControl) -> String {
    match (control.snapshot_at_record, control.snapshot_after_ms) {
        (Some(n), _) => format!("--snapshot-at-record {n}"),
        (None, Some(ms)) => format!("--snapshot-after-ms {ms}"),
        (None, None) => "no snapshot point".into(),
    }
}

/// The run ended (`how`) before the snapshot point: say so, and that no snapshot was written.
fn snapshot_missed(control: &RunControl, how: &str) -> Option<anyhow::Error> {
    let path = control.snapshot_out.as_ref()?;
    Some(anyhow!(
        "{how}, before the snapshot point ({}): no snapshot was written to {}; choose an earlier point",
        snapshot_point(control),
        path.display()
    ))
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    let config = machine_config(&args.workload)?;
    check_snapshot_out(&args.control)?;
    host::check_kvm(Path::new(KVM_PATH)).map_err(usage)?;
    let reporter = Reporter { json: args.control.json };
    let fixture = config.fixture.kind.name();
    let (vcpus, mem) = (config.fixture.vcpus, format_size(config.mem_bytes));
    let machine = Machine::boot_with(config, args.workload.dirty_tracker.into()).map_err(|e| match e {
        MachineError::Tap(_) | MachineError::Provision(_) => usage(anyhow!(e).context("cannot start the VM")),
        e => run_failure(anyhow!(e).context("cannot start the VM")),
    })?;
    reporter.started("booted", fixture, vcpus, &mem, 0);
    drive(machine, &args.control, &reporter)
}

pub fn restore(args: RestoreArgs) -> Result<(), Failure> {
    check_snapshot_out(&args.control)?;
    host::check_kvm(Path::new(KVM_PATH)).map_err(usage)?;
    let reporter = Reporter { json: args.control.json };
    let started = Instant::now();
    let machine = Machine::restore_snapshot(&args.snapshot).map_err(|e| match e {
        MachineError::Snapshot(_) => usage(anyhow!(e).context("cannot restore: the snapshot file is unusable")),
        MachineError::Tap(_) | MachineError::Provision(_) => {
            usage(anyhow!(e).context(format!("cannot restore {}", args.snapshot.display())))
        }
        e => run_failure(anyhow!(e).context(format!("cannot restore {}", args.snapshot.display()))),
    })?;
    let config = machine.config();
    tracing::info!(ms = started.elapsed().as_millis() as u64, "restored {}", args.snapshot.display());
    reporter.started(
        "restored",
        config.fixture.kind.name(),
        config.fixture.vcpus,
        &format_size(config.mem_bytes),
        machine.devices().output_log.len(),
    );
    drive(machine, &args.control, &reporter)
}

/// Runs the machine until it finishes (then verifies it), until the snapshot point, or until the timeout.
fn drive(mut machine: Machine, control: &RunControl, reporter: &Reporter) -> Result<(), Failure> {
    let started = Instant::now();
    let timeout = control.timeout.map(Duration::from_secs);
    let snapshot_after = control.snapshot_after_ms.map(Duration::from_millis);
    let take_every = control.take_dirty_every.map(|ms| Duration::from_millis(ms.max(1)));
    let mut takes = TakeStats::default();
    if take_every.is_some() {
        machine.set_dirty_logging(true).map_err(run_failure)?;
    }
    let mut next_take = take_every.map(|every| started + every);
    let stop_after = control.seconds.map(Duration::from_secs);
    // Ctrl-C (or SIGTERM) stops the VM cleanly: a serving guest runs until then.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted)).map_err(run_failure)?;
    }
    if machine.devices().serving {
        // Restored from a snapshot of a VM that was serving: it serves from its first instruction.
        reporter.serving(machine.config(), started.elapsed().as_millis());
    }
    machine.resume().map_err(run_failure)?;
    loop {
        if let (Some(at), Some(every)) = (next_take, take_every) {
            if Instant::now() >= at {
                takes.take(&machine).map_err(run_failure)?;
                next_take = Some(at.max(Instant::now() - every) + every);
            }
        }
        let records = machine.devices().output_log.len();
        let snapshot_due = control.snapshot_at_record.is_some_and(|n| records >= n)
            || snapshot_after.is_some_and(|d| started.elapsed() >= d);
        if let (true, Some(path)) = (snapshot_due, &control.snapshot_out) {
            return take_snapshot(&mut machine, path, reporter);
        }
        if machine.is_finished() {
            break;
        }
        let stopped_by = if interrupted.load(Ordering::Relaxed) {
            Some("interrupted")
        } else if stop_after.is_some_and(|d| started.elapsed() >= d) {
            Some("--seconds")
        } else {
            None
        };
        if let Some(how) = stopped_by {
            return stop(&mut machine, reporter, how, started.elapsed().as_millis());
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            let how = format!(
                "the VM did not finish within {}s (--timeout); {records} records so far",
                control.timeout.unwrap_or(0)
            );
            let err = snapshot_missed(control, &how).unwrap_or_else(|| anyhow!("{how}"));
            reporter.failed(&format!("{err:#}"));
            return Err(run_failure(err));
        }
        let mut wait = Duration::from_millis(100);
        if let Some(d) = snapshot_after {
            wait = wait.min(d.saturating_sub(started.elapsed()));
        }
        if let Some(at) = next_take {
            wait = wait.min(at.saturating_duration_since(Instant::now()));
        }
        if let Some(d) = stop_after {
            wait = wait.min(d.saturating_sub(started.elapsed()));
        }
        match machine.next_event(wait) {
            Ok(Some(MachineEvent::Output(record))) => reporter.output(&record),
            Ok(Some(MachineEvent::Serving)) => reporter.serving(machine.config(), started.elapsed().as_millis()),
            Ok(_) => {}
            Err(e) => {
                let err = anyhow!(e).context("the VM failed");
                reporter.failed(&format!("{err:#}"));
                return Err(run_failure(err));
            }
        }
    }
    // Records emitted in the last moments are already in the log; print any not yet shown.
    drain_events(&mut machine, reporter)?;
    let elapsed_ms = started.elapsed().as_millis();
    if take_every.is_some() {
        takes.take(&machine).map_err(run_failure)?;
        reporter.dirty_takes(machine.dirty_tracker(), &takes, elapsed_ms);
    }
    finish(&machine, control, reporter, elapsed_ms)
}

/// The VM finished: verify it, and fail if it finished before the snapshot point.
fn finish(machine: &Machine, control: &RunControl, reporter: &Reporter, elapsed_ms: u128) -> Result<(), Failure> {
    let steps = machine.config().fixture.steps;
    let verified = machine.verify().map_err(|e| {
        let err = anyhow!(e).context("verification against the oracle failed");
        reporter.failed(&format!("{err:#}"));
        run_failure(err)
    })?;
    reporter.verified(verified.records, verified.memory_digest, steps, elapsed_ms);
    let how = format!("the VM finished after {} output records and {elapsed_ms} ms", verified.records);
    match snapshot_missed(control, &how) {
        Some(err) => Err(run_failure(err)),
        None => Ok(()),
    }
}

/// Stops a VM that was told to stop (--seconds, Ctrl-C): no oracle check, a summary instead.
fn stop(machine: &mut Machine, reporter: &Reporter, how: &str, elapsed_ms: u128) -> Result<(), Failure> {
    drain_events(machine, reporter)?;
    let state = machine.capture().context("cannot stop the VM").map_err(run_failure)?;
    reporter.stopped(how, &state.devices, elapsed_ms);
    Ok(())
}

fn drain_events(machine: &mut Machine, reporter: &Reporter) -> Result<(), Failure> {
    while let Some(event) = machine.next_event(Duration::ZERO).map_err(run_failure)? {
        if let MachineEvent::Output(record) = event {
            reporter.output(&record);
        }
    }
    Ok(())
}

fn take_snapshot(machine: &mut Machine, path: &Path, reporter: &Reporter) -> Result<(), Failure> {
    let started = Instant::now();
    let stats = machine
        .save_snapshot(path)
        .with_context(|| format!("cannot write the snapshot to {}", path.display()))
        .map_err(run_failure)?;
    // Records emitted while the vCPUs were pausing are part of the snapshot's history: show them.
    drain_events(machine, reporter)?;
    reporter.snapshot(
        &path.display().to_string(),
        &stats,
        machine.devices().output_log.len(),
        started.elapsed().as_millis(),
    );
    Ok(())
}

pub fn inspect(args: InspectArgs) -> Result<(), Failure> {
    let unusable =
        |e: pcft_agent::vmm::snapshot::SnapshotError| usage(anyhow!(e).context("the snapshot file is unusable"));
    let (state, reader) = SnapshotReader::open(&args.snapshot).map_err(unusable)?;
    let config = &state.config;
    let memory = GuestMemory::new(config.mem_bytes, config.slot_bytes).map_err(|e| usage(anyhow!(e)))?;
    let pages = reader.load_memory(&memory).map_err(unusable)?;
    let rips: Vec<String> = state.vcpus.iter().map(|v| format!("{:#x}", v.regs.rip)).collect();
    let summary = serde_json::json!({
        "path": args.snapshot.display().to_string(),
        "format_version": pcft_agent::vmm::snapshot::FORMAT_VERSION,
        "checksums": "ok",
        "fixture": config.fixture,
        "mem_bytes": config.mem_bytes,
        "memslots": config.mem_bytes.div_ceil(config.slot_bytes),
        "pages": pages,
        "records": state.devices.output_log.len(),
        "vcpu_status": state.devices.vcpu_status,
        "vcpu_rip": rips,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{}: PostCopyFT snapshot v{}, checksums ok\n  fixture {} on {} vCPU(s), {} of memory in {} memslot(s), {pages} non-zero pages\n  {} output records so far; vCPU status {:?}; rip {}",
            args.snapshot.display(),
            pcft_agent::vmm::snapshot::FORMAT_VERSION,
            config.fixture.kind,
            config.fixture.vcpus,
            format_size(config.mem_bytes),
            config.mem_bytes.div_ceil(config.slot_bytes),
            state.devices.output_log.len(),
            state.devices.vcpu_status,
            rips.join(", "),
        );
    }
    Ok(())
}
