//! The demo's opening lines (text output only): where the agents and the
//! outside world are, the dashboard, and what will fail.

use super::agents::Endpoints;
use super::plan::DemoPlan;
use crate::cli::{DemoArgs, FailKind};

/// Prints the opening lines.
pub fn print(args: &DemoArgs, plan: &DemoPlan, endpoints: &Endpoints, outside: &str) {
    println!("agents: source at {}, destination at {} (separate processes)", endpoints.source, endpoints.destination);
    match &plan.clients {
        Some(clients) => println!(
            "a serving VM at {} on a bridge at each host; {} client connections write and read from their own \
             network namespace",
            clients.guest, clients.connections
        ),
        None => println!("outside world (released output) at {outside}"),
    }
    if let Some(url) = &endpoints.dashboard_url {
        println!("dashboard: {url} (migrating in {} s)", plan.migrate_after.as_secs_f64());
    }
    if !plan.mode.checkpoints() {
        return;
    }
    let fault = &plan.fault;
    let how = match fault.kind {
        FailKind::Lossy => format!("lossy: loss {}%, delay {} ms", args.loss, args.delay_ms),
        FailKind::SlowSource => format!("slow-source: {}% of a CPU", args.source_cpu_pct),
        FailKind::SlowDisk => format!("slow-disk: {} ms a staging write", args.disk_delay_ms),
        FailKind::Reset => {
            format!("reset: {} side, TCP resets from an nftables rule, both agents alive", args.reset_side.name())
        }
        FailKind::StallFence => format!(
            "stall-fence: it goes silent, and its vCPU threads and lease watchdog stall {} ms \
             between their fence check and the guest",
            fault.stall_fence_ms
        ),
        other => other.name(),
    };
    let who = match fault.kind {
        FailKind::Lossy => "the link between the hosts degrades",
        FailKind::SlowSource => "the source slows down",
        FailKind::SlowDisk => "the source's checkpoint staging disk is slow from the start, and nothing fails",
        FailKind::Reset => "the migration connection is reset",
        _ => "the destination fails",
    };
    if fault.slow_disk {
        println!("{who} ({how})");
    } else {
        println!("{who} at: {} ({how})", fault.fail_at.name());
    }
}
