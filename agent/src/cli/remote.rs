//! Commands that talk to agents: `pcft agent`, `vm start|status|list|wait|stop|rm`.

use super::vm::{machine_config, KVM_PATH};
use super::{run_failure, usage, AgentArgs, Failure, StartArgs, StatusArgs, VmNameArgs, WaitArgs};
use anyhow::anyhow;
use pcft_agent::agent::client::{AgentClient, ClientError};
use pcft_agent::agent::daemon::{Daemon, Limits};
use pcft_agent::host::{self, format_size, parse_size};
use pcft_agent::migration::ft::staging::StagingLimits;
use pcft_agent::vmm::output::OutputSink;
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::MigrationReport;
use std::io::Write;
use std::path::Path;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// An unreachable agent or a refused request is the operator's to fix (exit 2);
/// a request that was carried out and failed is a failed run (exit 1).
pub fn client_failure(e: ClientError) -> Failure {
    match e {
        ClientError::Connect { .. } | ClientError::Refused(_) => usage(e),
        e => run_failure(e),
    }
}

pub fn agent(args: AgentArgs) -> Result<(), Failure> {
    host::check_kvm(Path::new(KVM_PATH)).map_err(usage)?;
    let max_guest_mem = match &args.max_guest_mem {
        Some(text) => parse_size(text).map_err(|e| usage(anyhow!("--max-guest-mem {text}: {e}")))?,
        None => u64::MAX,
    };
    let max_total_guest_mem = match &args.max_total_guest_mem {
        Some(text) => parse_size(text).map_err(|e| usage(anyhow!("--max-total-guest-mem {text}: {e}")))?,
        None => host::memory_total(),
    };
    match (pcft_agent::agent::client::key().is_some(), args.insecure) {
        (false, false) => {
            return Err(usage(anyhow!(
                "an agent needs a pre-shared key: --psk-file FILE (or PCFT_PSK_FILE; make one with `pcft keygen --out FILE` and give every agent and CLI the same), or --insecure to let any peer in (test benches only)"
            )))
        }
        (true, true) => {
            return Err(usage(anyhow!(
                "--insecure and a key (--psk-file or PCFT_PSK_FILE) contradict each other: drop one"
            )))
        }
        _ => {}
    }
    let staging = StagingLimits {
        memory_bytes: parse_size(&args.staging_memory)
            .map_err(|e| usage(anyhow!("--staging-memory {}: {e}", args.staging_memory)))?,
        dir: args.staging_dir.clone().unwrap_or_else(std::env::temp_dir),
        write_delay: std::time::Duration::from_millis(args.staging_delay_ms),
    };
    if !staging.dir.is_dir() {
        return Err(usage(anyhow!(
            "--staging-dir {}: not a directory; give a directory with room for one checkpoint",
            staging.dir.display()
        )));
    }
    runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| usage(anyhow!("cannot listen on {}: {e}; choose another --listen address", args.listen)))?;
        let addr = listener.local_addr().map_err(run_failure)?;
        let name = args.name.clone().unwrap_or_else(|| addr.to_string());
        let http = match &args.metrics {
            Some(metrics_addr) => Some(tokio::net::TcpListener::bind(metrics_addr).await.map_err(|e| {
                usage(anyhow!("cannot serve metrics on {metrics_addr}: {e}; choose another --metrics address"))
            })?),
            None => None,
        };
        let http_addr = http.as_ref().map(|l| l.local_addr()).transpose().map_err(run_failure)?;
        if args.json {
            let url = |path: &str| http_addr.map(|a| format!("http://{a}/{path}"));
            let started = serde_json::json!({
                "event": "listening", "agent": name, "addr": addr.to_string(),
                "metrics": url("metrics"), "dashboard": url(""),
            });
            println!("{started}");
        } else {
            // The first line on stdout is the bound address, the second (with
            // --metrics) the HTTP one: scripts (and `pcft demo`) read them.
            println!("listening on {addr}");
            if let Some(bound) = http_addr {
                println!("metrics on http://{bound}/metrics, dashboard on http://{bound}/");
            }
        }
        if let Some(listener) = http {
            tokio::spawn(pcft_agent::agent::http::serve(listener, name.clone()));
        }
        std::io::stdout().flush().map_err(run_failure)?;
        tracing::info!(agent = %name, %addr, "agent started");
        arm_faults(&args)?;
        let sink = match &args.output_sink {
            Some(addr) => OutputSink::tcp(&name, addr).map_err(run_failure)?,
            None => OutputSink::log_only(&name),
        };
        let key = pcft_agent::agent::client::key().cloned();
        if key.is_none() {
            tracing::warn!(
                agent = %name,
                "--insecure: any peer that reaches {addr} can start, stop and migrate VMs here; run agents with a key (pcft keygen) outside a test bench"
            );
        }
        let limits = Limits {
            max_guest_mem,
            max_total_guest_mem,
            max_migrations: args.max_migrations.max(1),
            max_connections: args.max_connections.unwrap_or_else(pcft_agent::host::default_max_connections).max(1),
            staging,
            release_after: std::time::Duration::from_secs(args.release_after),
        };
        let daemon = Daemon::new(name, limits, sink, key);
        serve_until_stopped(daemon, listener, std::time::Duration::from_secs(args.shutdown_timeout)).await
    })
}

/// Arms the agent's hidden fault-injection flags (tests, the demo, chaos).
fn arm_faults(args: &AgentArgs) -> Result<(), Failure> {
    if args.no_output_commit {
        tracing::warn!(
            "fault injection armed: no network output commit (frames leave before their checkpoint commits)"
        );
        pcft_agent::fault::disable_output_commit();
    }
    if let Some(path) = &args.frame_trace {
        pcft_agent::fault::frame_trace::open(path)
            .map_err(|e| anyhow!("cannot write the frame trace {}: {e}", path.display()))
            .map_err(usage)?;
    }
    if args.fail_resume {
        tracing::warn!("fault injection armed: the first resume of a VM here fails half-way");
        pcft_agent::fault::arm_partial_resume();
    }
    if let Some(point) = args.crash_at {
        tracing::warn!(?point, signal = ?args.crash_signal, "fault injection armed: this agent fails there");
        pcft_agent::fault::crash::arm(point, args.crash_signal).map_err(|e| usage(anyhow!(e)))?;
        if args.crash_signal == pcft_agent::fault::crash::CrashSignal::StallFence {
            pcft_agent::fault::arm_stall_fence(std::time::Duration::from_millis(args.stall_fence_ms));
        }
    }
    Ok(())
}

/// Serves until SIGTERM or Ctrl-C, then shuts the agent down gracefully
/// (serving on meanwhile, so that new work is refused with the reason).
async fn serve_until_stopped(
    daemon: std::sync::Arc<Daemon>,
    listener: tokio::net::TcpListener,
    shutdown_timeout: std::time::Duration,
) -> Result<(), Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(run_failure)?;
    let serving = std::sync::Arc::clone(&daemon).serve(listener);
    tokio::pin!(serving);
    let stopped = |e: std::io::Error| run_failure(anyhow!("the agent stopped accepting connections: {e}"));
    let signal = tokio::select! {
        served = &mut serving => return served.map_err(stopped),
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!(signal, "stopping the agent");
    let second = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    let report = tokio::select! {
        report = daemon.shutdown(shutdown_timeout, second) => report,
        served = &mut serving => return served.map_err(stopped),
    };
    if report.migrations_cut.is_empty() {
        return Ok(());
    }
    Err(run_failure(anyhow!(
        "stopped with {} migration(s) still running, cut: {} (see the log; a longer --shutdown-timeout lets them end)",
        report.migrations_cut.len(),
        report.migrations_cut.join(", ")
    )))
}

pub async fn ask(addr: &str, message: ControlMessage) -> Result<ControlMessage, Failure> {
    let mut client = AgentClient::connect(addr).await.map_err(client_failure)?;
    client.request(&message).await.map_err(client_failure)
}

pub fn unexpected(answer: ControlMessage) -> Failure {
    run_failure(anyhow!("the agent answered {answer:?}"))
}

pub fn start(args: StartArgs) -> Result<(), Failure> {
    let config = machine_config(&args.workload)?;
    // A network guest: where it will serve, once it has booted.
    let serves = config.fixture.net.as_ref().map(|net| format!("{}:{}", net.ip, net.port));
    let start =
        ControlMessage::StartVm { name: args.name.clone(), config, tracking: args.workload.dirty_tracker.into() };
    match runtime().block_on(ask(&args.agent, start))? {
        ControlMessage::Ok => {
            if args.json {
                let line =
                    serde_json::json!({ "vm": args.name, "agent": args.agent, "started": true, "address": serves });
                println!("{line}");
            } else {
                match &serves {
                    Some(address) => println!(
                        "started VM {} on {}; it serves on {address} once booted (a second or so)",
                        args.name, args.agent
                    ),
                    None => println!("started VM {} on {}", args.name, args.agent),
                }
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

pub fn status(args: StatusArgs) -> Result<(), Failure> {
    let ControlMessage::StatusReport { agent, vms } = runtime().block_on(ask(&args.agent, ControlMessage::Status))?
    else {
        return Err(run_failure(anyhow!("the agent did not send a status report")));
    };
    if args.json {
        println!("{}", serde_json::json!({ "agent": agent, "vms": vms }));
        return Ok(());
    }
    println!("agent {agent}: {} VM(s)", vms.len());
    // Names as wide as the widest, so that a long one does not break the columns.
    let width = vms.iter().map(|vm| vm.name.chars().count()).max().unwrap_or(0).max(12);
    for vm in vms {
        let dirty = match (vm.dirty_rate_bytes_per_second, &vm.dirty_tracker) {
            (Some(rate), Some(tracker)) => format!(", dirtying {}/s ({tracker})", format_size(rate as u64)),
            (None, Some(tracker)) => format!(", dirty tracker {tracker}"),
            _ => String::new(),
        };
        let migration = match &vm.migration {
            Some(m) => format!(
                ", migrating ({}, {} of {} pages sent, {} checkpoints, {:.1} s)",
                m.phase,
                m.pages_sent,
                m.pages_total,
                m.checkpoints_committed,
                m.elapsed_ms as f64 / 1e3
            ),
            None => String::new(),
        };
        let records = vm.records_here().map_or("-".to_string(), |n| n.to_string());
        // A VM that no longer runs here may have given its memory back already.
        let released = match (vm.memory_released, vm.phase) {
            (true, phase) if phase != pcft_agent::wire::payload::VmPhase::MigratedAway => " (memory released)",
            _ => "",
        };
        println!(
            "  {:<width$} {:<14} {} on {} vCPU(s), {}{released}, {records} records{dirty}{migration}{}",
            vm.name,
            vm.phase.name(),
            vm.fixture,
            vm.vcpus,
            format_size(vm.mem_bytes),
            vm.error.map(|e| format!(" — {e}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// `pcft vm stop`.
pub fn stop(args: VmNameArgs) -> Result<(), Failure> {
    let request = ControlMessage::StopVm { name: args.name.clone() };
    let ControlMessage::Stopped { name, was } = runtime().block_on(ask(&args.agent, request))? else {
        return Err(run_failure(anyhow!("the agent did not say the VM stopped")));
    };
    if args.json {
        println!("{}", serde_json::json!({ "vm": name, "agent": args.agent, "stopped": true, "was": was }));
    } else if was == pcft_agent::wire::payload::VmPhase::Running {
        println!(
            "stopped VM {name} on {} (pcft vm rm {name} frees it now; else its memory goes after --release-after)",
            args.agent
        );
    } else {
        println!("VM {name} on {} was not running ({}): nothing to stop", args.agent, was.name());
    }
    Ok(())
}

/// `pcft vm rm`.
pub fn remove(args: VmNameArgs) -> Result<(), Failure> {
    let request = ControlMessage::RemoveVm { name: args.name.clone() };
    let ControlMessage::Removed { name } = runtime().block_on(ask(&args.agent, request))? else {
        return Err(run_failure(anyhow!("the agent did not say the VM was removed")));
    };
    if args.json {
        println!("{}", serde_json::json!({ "vm": name, "agent": args.agent, "removed": true }));
    } else {
        println!("removed VM {name} from {}", args.agent);
    }
    Ok(())
}

pub fn wait(args: WaitArgs) -> Result<(), Failure> {
    let request = ControlMessage::WaitFinished { name: args.name.clone(), timeout_ms: args.timeout * 1000 };
    match runtime().block_on(ask(&args.agent, request))? {
        ControlMessage::Verified { name, records, memory_digest } => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"vm": name, "verified": true, "records": records, "memory_digest": format!("{memory_digest:#018x}")})
                );
            } else {
                println!("verified: VM {name} on {} matches its oracle ({records} records, memory digest {memory_digest:#018x})", args.agent);
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// Runs `migration` (a request that migrates VM `vm` away from agent `agent`)
/// under a progress bar on stderr fed by the agent's status (when `shown` and
/// stderr is a terminal).
pub async fn with_progress<T>(
    agent: &str,
    vm: &str,
    shown: bool,
    migration: impl std::future::Future<Output = T>,
) -> T {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::with_draw_target(
        None,
        if shown { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    if bar.is_hidden() {
        // No terminal to draw on (or --json): no status polling either.
        return migration.await;
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} pages {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let watch = async {
        let Ok(mut client) = AgentClient::connect(agent).await else { return std::future::pending().await };
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let Ok(ControlMessage::StatusReport { vms, .. }) = client.request(&ControlMessage::Status).await else {
                break;
            };
            if let Some(m) = vms.into_iter().find(|v| v.name == vm).and_then(|v| v.migration) {
                bar.set_length(m.pages_total);
                bar.set_position(m.pages_sent.min(m.pages_total));
                let checkpoints = match m.checkpoints_committed {
                    0 => String::new(),
                    n => format!(", {n} checkpoints committed"),
                };
                bar.set_message(format!("({}{checkpoints})", m.phase));
            }
        }
        std::future::pending().await
    };
    let result = tokio::select! {
        result = migration => result,
        never = watch => never,
    };
    bar.finish_and_clear();
    result
}

/// The human summary of a migration report.
pub fn print_report(r: &MigrationReport) {
    for line in super::report::migration_lines(r) {
        println!("{line}");
    }
}
