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
//!
//! A serving VM (`--fixture kv`) runs on the testbed's hosts with a client
//! network of their own: its clients write and read throughout and their
//! history is checked at the end, and what reached them on the wire is
//! audited against the epochs that committed (`serving`, `clients`,
//! `capture`); they verify it in place of an oracle.
//!
//! The run is a sequence of phases, one file each: plan (`plan`, with
//! `fail_at`) → start the agents (`agents`, `key`) and the outside world
//! (`outside`; a serving VM's clients and capture, `serving`) → start the VM
//! and migrate it (`migrate`) → inject the fault
//! (`faults`; or the destination does, at its point) → observe the failover
//! (`migrate`, `agent_calls`) → verify (`one_copy`, `outside`) → report
//! (`announce`, `report`, with `explain`).

pub(crate) mod agent_calls;
pub(crate) mod agents;
mod announce;
mod capture;
pub(crate) mod clients;
mod explain;
mod fail_at;
mod faults;
pub(crate) mod key;
mod migrate;
mod one_copy;
mod outside;
mod plan;
mod report;
mod serving;

use crate::cli::netns::Testbed;
use crate::cli::remote::runtime;
use crate::cli::stopwatch::StopWatch;
use crate::cli::{usage, DemoArgs, FailKind, Failure};
use agents::{AgentSetting, Agents};
use faults::FaultTimer;
use migrate::MigrationRun;
use outside::{OutputAudit, Outside};
use plan::DemoPlan;
use report::{Checks, DemoReport};
use serving::Serving;
use std::sync::Arc;
use vm_fixtures::OutputRecord;

/// `pcft demo`: start agents → start the VM → migrate → inject the fault →
/// observe the failover → verify → report.
pub fn demo(args: DemoArgs) -> Result<(), Failure> {
    // What to do, checked before anything starts.
    let plan = DemoPlan::new(&args)?;

    // Start the agents: on two hosts (network namespaces) when the network fails,
    // with the outside world listening for their released output.
    let testbed = match plan.fault.netns {
        true => Some(Arc::new(Testbed::create(plan.clients.as_ref().map(|c| c.gateway.as_str())).map_err(usage)?)),
        false => None,
    };
    let outside = Outside::start(if plan.fault.netns { "0.0.0.0:0" } else { "127.0.0.1:0" })?;
    // A serving VM's frames, as the destination's guest sent them, to audit what reached its clients.
    let frame_trace = plan.clients.as_ref().map(|_| serving::frame_trace_file()).transpose()?;
    let setting = AgentSetting {
        testbed: testbed.as_deref(),
        outside: &outside.addr,
        frame_trace: frame_trace.as_ref().map(|file| file.path()),
    };
    let (agents, endpoints) = Agents::start_both(&args, &plan.fault, &setting)?;
    // A frozen destination's vCPU threads stop on their way out of KVM_RUN and
    // read the clock only when continued: watch when they were stopped.
    let stop_watch = (plan.fault.kind == FailKind::Freeze).then(|| StopWatch::start(endpoints.destination_pid));
    if !args.json {
        announce::print(&args, &plan, &endpoints, &outside.addr);
    }
    let expected: Vec<OutputRecord> =
        plan.config.fixture.expected_after(plan.config.fixture.steps).outputs().iter().flatten().copied().collect();

    // A serving VM's clients, from their namespace (they connect once the VM
    // serves), and the capture of what reaches them.
    let lan = testbed.as_ref().and_then(|bed| bed.clients.as_ref());
    let serving = match (&plan.clients, lan, &plan.config.fixture.net) {
        (Some(want), Some(lan), Some(net)) => Some(Serving::start(want, lan, net.mac)),
        _ => None,
    };

    // Start the VM, migrate it, inject the fault, observe the failover.
    let faults = FaultTimer::default();
    let migration = MigrationRun {
        args: &args,
        plan: &plan,
        endpoints: &endpoints,
        testbed: testbed.as_ref(),
        faults: &faults,
        clients: serving.as_ref().map(Serving::clients),
    };
    let outcome = migration.run();
    // Whatever happened: nothing more is injected, and the reset rule goes.
    drop(faults.stop());
    // The clients stop; the store is read back where the VM runs, their history
    // checked, and what reached them against the epochs that committed.
    let restored_epoch = outcome.as_ref().ok().and_then(|o| o.report.failover.as_ref()).map(|f| f.restored_epoch);
    let window = outcome.as_ref().ok().map(|o| o.window);
    let serving = match (serving, &frame_trace) {
        (Some(serving), Some(trace)) => Some(serving.finish(trace.path(), restored_epoch, window)),
        _ => None,
    };

    // Verify: one copy at a time, from both agents' run logs (before they stop) ...
    let stopped = stop_watch.map(StopWatch::finish).unwrap_or_default();
    let one_copy = one_copy::check(&endpoints.source, &endpoints.destination, &stopped);
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            drop(agents);
            eprintln!("pcft demo: {}", one_copy.line());
            return Err(e);
        }
    };
    // ... and the outside world's records against the oracle's.
    let outputs = OutputAudit::new(&outside.settle(expected.len()), &expected);

    // Report.
    let namespaces = testbed.as_ref().map(|bed| bed.namespaces()).unwrap_or_default();
    let checks = Checks { outputs, one_copy, applied: faults.applied(), serving, namespaces };
    let report = DemoReport::new(&args, &plan, outcome, checks);
    report.print()?;
    if let Some(url) = &endpoints.dashboard_url {
        if !args.json {
            println!("the dashboard stays up at {url}: press Ctrl-C to stop the agents");
        }
        let _ = runtime().block_on(tokio::signal::ctrl_c());
    }
    drop(agents);
    report.verdict()
}
