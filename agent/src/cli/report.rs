//! How `pcft vm` reports what happens: human lines or JSON lines on stdout;
//! and the human lines of a migration report (`pcft migrate`, `pcft demo`).

use super::dirty_takes::TakeStats;
use pcft_agent::host::format_size;
use pcft_agent::wire::payload::{FailoverReport, MigrationReport};
use serde_json::json;
use vm_fixtures::OutputRecord;

pub struct Reporter {
    pub json: bool,
}

fn hex(value: u64) -> String {
    format!("{value:#018x}")
}

impl Reporter {
    fn line(&self, value: serde_json::Value, text: String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    }

    /// A record that reached the outside world.
    pub fn output(&self, r: &OutputRecord) {
        self.line(
            json!({"event": "output", "vcpu": r.vcpu, "step": r.step, "digest": hex(r.digest)}),
            format!("output  vcpu={} step={} digest={}", r.vcpu, r.step, hex(r.digest)),
        );
    }

    pub fn started(&self, what: &str, fixture: &str, vcpus: u64, mem: &str, records_before: usize) {
        self.line(
            json!({"event": "started", "how": what, "fixture": fixture, "vcpus": vcpus, "mem": mem, "records_before": records_before}),
            format!("{what}: {fixture} on {vcpus} vCPU(s), {mem} of guest memory ({records_before} records before)"),
        );
    }

    pub fn snapshot(&self, path: &str, stats: &pcft_agent::vmm::snapshot::SnapshotStats, records: usize, ms: u128) {
        self.line(
            json!({"event": "snapshot", "path": path, "records": records, "file_bytes": stats.file_bytes,
                   "pages_written": stats.pages_written, "zero_pages_skipped": stats.zero_pages_skipped, "save_ms": ms}),
            format!(
                "snapshot written to {path} after {records} records: {} pages ({} bytes), {} zero pages skipped, in {ms} ms",
                stats.pages_written, stats.file_bytes, stats.zero_pages_skipped
            ),
        );
    }

    pub fn verified(&self, records: usize, memory_digest: u64, steps: u64, elapsed_ms: u128) {
        self.line(
            json!({"event": "finished", "verified": true, "records": records, "steps": steps,
                   "memory_digest": hex(memory_digest), "elapsed_ms": elapsed_ms}),
            format!(
                "verified: guest memory (digest {}) and all {records} output records match the oracle after {steps} steps per vCPU ({elapsed_ms} ms)",
                hex(memory_digest)
            ),
        );
    }

    pub fn dirty_takes(&self, tracker: &str, t: &TakeStats, elapsed_ms: u128) {
        self.line(
            json!({"event": "dirty-takes", "tracker": tracker, "takes": t.takes, "pages": t.pages,
                   "take_us_total": t.total_us, "take_us_max": t.max_us, "elapsed_ms": elapsed_ms}),
            format!(
                "dirty tracking ({tracker}): {} takes found {} pages; a take cost {} µs on average, {} µs at most",
                t.takes,
                t.pages,
                t.total_us / t.takes.max(1),
                t.max_us
            ),
        );
    }

    /// A network guest serves: where, and how long after the start it took.
    pub fn serving(&self, config: &pcft_agent::vmm::machine::MachineConfig, ms: u128) {
        let Some(net) = &config.fixture.net else { return };
        let address = format!("{}:{}", net.ip, net.port);
        let tap = config.net.as_ref().map_or("none", |b| b.tap.as_str());
        let bridge = config.net.as_ref().and_then(|b| b.bridge.as_deref());
        // Bridged, the gateway is somewhere on the bridge's network, not necessarily this host.
        let host = match bridge {
            Some(bridge) => format!("on bridge {bridge}, gateway {}/{}", net.gateway, net.prefix),
            None => format!("host {}/{}", net.gateway, net.prefix),
        };
        self.line(
            json!({"event": "serving", "address": address, "tap": tap, "bridge": bridge,
                   "host_ip": net.gateway.to_string(), "prefix": net.prefix, "ms": ms,
                   "guest_image_bytes": vm_fixtures::image(config.fixture.kind).len()}),
            format!(
                "serving on {address} (tap {tap}, {host}), {ms} ms after the start; try: redis-cli -h {} -p {} PING",
                net.ip, net.port
            ),
        );
    }

    /// The VM was stopped on request (`how`) after `ms`.
    pub fn stopped(&self, how: &str, devices: &pcft_agent::vmm::devices::DeviceState, ms: u128) {
        let (rx, tx) = devices.net.as_ref().map_or((0, 0), |n| (n.rx_frames, n.tx_frames));
        self.line(
            json!({"event": "stopped", "how": how, "elapsed_ms": ms, "serving": devices.serving,
                   "records": devices.output_log.len(), "rx_frames": rx, "tx_frames": tx}),
            format!(
                "stopped ({how}) after {ms} ms: {} output records, {rx} frames received, {tx} sent",
                devices.output_log.len()
            ),
        );
    }

    pub fn failed(&self, error: &str) {
        if self.json {
            println!("{}", json!({"event": "finished", "verified": false, "error": error}));
        }
    }
}

/// The human summary of a migration report, one line each. A number this
/// agent does not know reads "not measured", never 0.
pub fn migration_lines(r: &MigrationReport) -> Vec<String> {
    let ms = |v: f64| if v.is_finite() { format!("{v:.2} ms") } else { "n/a".into() };
    let outcome = if r.failure.is_some() { "migration FAILED for VM" } else { "migrated VM" };
    let mut lines = vec![
        format!("{outcome} {} ({}, {} of memory)", r.vm, r.mode, format_size(r.mem_bytes)),
        format!("  total migration time   {}", ms(r.total_migration_ms)),
        format!("  downtime               {}", ms(r.downtime_ms)),
        format!(
            "  sent                   {} in {} pages ({} zero)",
            format_size(r.bytes_sent),
            r.pages_sent,
            r.zero_pages
        ),
    ];
    if r.rounds > 0 {
        lines.push(format!("  pre-copy rounds        {} ({} pages dirty at the stop)", r.rounds, r.final_dirty_pages));
    }
    if r.mode != "precopy" {
        let channel = match r.postcopy_preempt {
            true => "on a connection of their own",
            false => "behind the push: no demand channel",
        };
        lines.push(format!(
            "  post-copy pages        {} pushed, {} on demand ({channel})",
            r.pages_pushed, r.pages_faulted
        ));
        let latency = match (&r.fault_latency_us, &r.failure) {
            (Some(l), _) => format!("p50 {} µs, p99 {} µs", l.p50, l.p99),
            (None, Some(_)) => "not measured (the destination was lost before it sent its measurements)".into(),
            (None, None) => "not measured (no page faulted at the destination)".into(),
        };
        lines.push(format!("  fault latency          {latency}"));
    }
    if r.mode == "postcopy-ft" {
        lines.push(format!(
            "  checkpoints            {} committed ({} pages, {})",
            r.checkpoints_committed,
            r.checkpoint_pages,
            format_size(r.checkpoint_bytes)
        ));
    }
    if let Some(f) = &r.failure {
        lines.push(format!(
            "  FAILURE                {} at {:.1} ms ({:.1} ms after the last word from the destination): {}",
            f.kind, f.detected_at_ms, f.detection_ms, f.reason
        ));
    }
    if let Some(f) = &r.failover {
        lines.push(format!("  failover               {}", failover_text(f)));
    }
    lines
}

/// What the failover restored, and how long it took.
fn failover_text(f: &FailoverReport) -> String {
    let timing = format!(
        "guest running {:.2} ms after detection ({:.2} ms of it waiting out the lease)",
        f.failover_ms, f.fence_wait_ms
    );
    match f.restored_epoch {
        0 => format!(
            "no checkpoint had committed: the VM was restored at the source as it was at the switchover; {timing}; {} output records from before the switchover",
            f.committed_outputs
        ),
        epoch => format!(
            "checkpoint {epoch}, the last committed, restored at the source; {timing}; {} committed output records",
            f.committed_outputs
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcft_agent::wire::payload::{FailureReport, Percentiles};

    fn failed_over(restored_epoch: u64) -> MigrationReport {
        MigrationReport {
            vm: "demo".into(),
            mode: "postcopy-ft".into(),
            pages_faulted: 1483,
            failure: Some(Box::new(FailureReport {
                kind: "heartbeat-timeout".into(),
                detected_at_ms: 1500.0,
                detection_ms: 201.0,
                reason: "the destination went silent".into(),
            })),
            failover: Some(Box::new(FailoverReport {
                restored_epoch,
                failover_ms: 28.7,
                fence_wait_ms: 17.2,
                committed_outputs: 10,
            })),
            ..MigrationReport::default()
        }
    }

    fn line<'a>(lines: &'a [String], label: &str) -> &'a str {
        lines.iter().find(|l| l.trim_start().starts_with(label)).map_or("", |l| l.as_str())
    }

    #[test]
    fn a_failover_before_any_checkpoint_says_none_had_committed() {
        let lines = migration_lines(&failed_over(0));
        let failover = line(&lines, "failover");
        assert!(failover.contains("no checkpoint had committed"), "{failover}");
        assert!(failover.contains("as it was at the switchover"), "{failover}");
        assert!(!failover.contains("checkpoint 0"), "{failover}");
        let failover = line(&migration_lines(&failed_over(3)), "failover").to_string();
        assert!(failover.contains("checkpoint 3, the last committed, restored"), "{failover}");
    }

    #[test]
    fn an_unmeasured_fault_latency_is_not_printed_as_zero() {
        // The freeze demo: 1483 pages on demand, the destination lost before `Complete`.
        let lines = migration_lines(&failed_over(12));
        let latency = line(&lines, "fault latency");
        assert!(latency.contains("not measured (the destination was lost"), "{lines:?}");
        let completed = MigrationReport { mode: "postcopy".into(), ..MigrationReport::default() };
        let latency = line(&migration_lines(&completed), "fault latency").to_string();
        assert!(latency.contains("not measured (no page faulted"), "{latency}");
        let measured =
            MigrationReport { fault_latency_us: Some(Percentiles { p50: 80, p99: 1900 }), ..completed.clone() };
        assert!(line(&migration_lines(&measured), "fault latency").ends_with("p50 80 µs, p99 1900 µs"));
        let precopy = MigrationReport { mode: "precopy".into(), ..completed };
        assert_eq!(line(&migration_lines(&precopy), "fault latency"), "", "pre-copy has no fault line");
    }
}
