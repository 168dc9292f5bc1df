//! The agent's Prometheus metrics (prometheus-client), served as text on
//! `pcft agent --metrics ADDR` at `/metrics`. Names follow Prometheus
//! conventions (base units, `_total` counters) and KubeVirt's where they
//! overlap (`kubevirt_vmi_dirty_rate_bytes_per_second` →
//! `pcft_vm_dirty_rate_bytes_per_second`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

pub mod timeline;

use timeline::{EventKind, Timeline};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    pub vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrackerLabels {
    pub vm: String,
    pub tracker: String,
}

/// Why a page moved in a migration.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PageReason {
    precopy,
    pushed,
    faulted,
    checkpoint,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PageLabels {
    pub vm: String,
    pub reason: PageReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub vm: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub mode: String,
    pub result: String,
}

/// Migration phases, as the `phase` label of `pcft_migration_phase` (one is 1, the rest 0).
pub const PHASES: &[&str] = &["precopy", "switchover", "postcopy", "completed", "failed", "lost", "recovered"];

pub struct Metrics {
    pub registry: Registry,
    pub dirty_rate: Family<TrackerLabels, Gauge<f64, AtomicU64>>,
    pub dirty_pages: Family<TrackerLabels, Counter>,
    pub phase: Family<PhaseLabels, Gauge>,
    pub pages: Family<PageLabels, Counter>,
    pub fault_latency: Histogram,
    pub checkpoints: Family<VmLabels, Counter>,
    pub checkpoint_bytes: Family<VmLabels, Counter>,
    pub checkpoint_staged_file_bytes: Family<VmLabels, Counter>,
    pub checkpoint_pause: Histogram,
    pub heartbeat_rtt: Histogram,
    pub failovers: Family<VmLabels, Counter>,
    pub migrations: Family<MigrationLabels, Counter>,
    pub output_released: Family<VmLabels, Counter>,
    pub auth_refusals: Family<AuthLabels, Counter>,
    /// Last take per (vm, tracker), for the dirty rate.
    last_take: Mutex<HashMap<TrackerLabels, Instant>>,
    /// What the dashboard plots.
    pub timeline: Timeline,
}

fn seconds_buckets() -> Histogram {
    // 10 µs … ~5 s.
    Histogram::new(exponential_buckets(10e-6, 2.0, 20))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pcft");
        let m = Metrics {
            dirty_rate: Family::default(),
            dirty_pages: Family::default(),
            phase: Family::default(),
            pages: Family::default(),
            fault_latency: seconds_buckets(),
            checkpoints: Family::default(),
            checkpoint_bytes: Family::default(),
            checkpoint_staged_file_bytes: Family::default(),
            checkpoint_pause: seconds_buckets(),
            heartbeat_rtt: seconds_buckets(),
            failovers: Family::default(),
            migrations: Family::default(),
            output_released: Family::default(),
            auth_refusals: Family::default(),
            last_take: Mutex::new(HashMap::new()),
            timeline: Timeline::default(),
            registry: Registry::default(),
        };
        registry.register(
            "vm_dirty_rate_bytes_per_second",
            "Guest memory the VM dirtied per second, from its tracker's last two takes",
            m.dirty_rate.clone(),
        );
        registry.register("vm_dirty_pages", "Dirty pages taken from the VM's tracker", m.dirty_pages.clone());
        registry.register("migration_phase", "The VM's migration phase (1 for the current one)", m.phase.clone());
        registry.register("migration_pages", "Guest pages sent in migrations, by reason", m.pages.clone());
        registry.register(
            "migration_fault_latency_seconds",
            "Post-copy: from a guest fault on a missing page to its install (destination)",
            m.fault_latency.clone(),
        );
        registry.register(
            "checkpoint_epochs",
            "PostCopyFT checkpoint epochs committed (source)",
            m.checkpoints.clone(),
        );
        registry.register(
            "checkpoint_bytes",
            "PostCopyFT checkpoint bytes received, page data and state (source)",
            m.checkpoint_bytes.clone(),
        );
        registry.register(
            "checkpoint_staged_file_bytes",
            "PostCopyFT checkpoint bytes that waited for their commit in the staging file, past --staging-memory (source)",
            m.checkpoint_staged_file_bytes.clone(),
        );
        registry.register(
            "checkpoint_pause_seconds",
            "PostCopyFT: how long each checkpoint paused the guest (destination)",
            m.checkpoint_pause.clone(),
        );
        registry.register(
            "heartbeat_round_trip_seconds",
            "PostCopyFT: heartbeat to its ack (destination)",
            m.heartbeat_rtt.clone(),
        );
        registry.register("failovers", "VMs recovered at this agent after losing the destination", m.failovers.clone());
        registry.register("migrations", "Migrations out of this agent, by mode and result", m.migrations.clone());
        registry.register(
            "output_released_records",
            "Guest output records released to the outside",
            m.output_released.clone(),
        );
        registry.register(
            "auth_refusals",
            "Peers refused by authentication, by reason: no-key, unexpected-key, wrong-key (another key: a client or source here, a destination this agent migrated to), bad-mac (a tampered frame)",
            m.auth_refusals.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }

    /// A take of `pages` dirty pages from `vm`'s `tracker`: updates the dirty rate.
    pub fn dirty_taken(&self, vm: &str, tracker: &str, pages: usize) {
        let labels = TrackerLabels { vm: vm.to_string(), tracker: tracker.to_string() };
        self.dirty_pages.get_or_create(&labels).inc_by(pages as u64);
        let now = Instant::now();
        let previous = self.last_take.lock().expect("last take lock").insert(labels.clone(), now);
        if let Some(previous) = previous {
            let seconds = now.duration_since(previous).as_secs_f64();
            if seconds > 0.0 {
                let rate = pages as f64 * 4096.0 / seconds;
                self.dirty_rate.get_or_create(&labels).set(rate);
                self.timeline.sample(vm, tracker, rate);
            }
        }
    }

    /// A dirty rate of `vm` sampled from a continuous count (ring entries or eBPF pushes).
    pub fn dirty_rate_sampled(&self, vm: &str, tracker: &str, bytes_per_second: f64) {
        let labels = TrackerLabels { vm: vm.to_string(), tracker: tracker.to_string() };
        self.dirty_rate.get_or_create(&labels).set(bytes_per_second);
        self.last_take.lock().expect("last take lock").insert(labels, Instant::now());
        self.timeline.sample(vm, tracker, bytes_per_second);
    }

    /// `vm` is now in `phase` (one of [`PHASES`]).
    pub fn set_phase(&self, vm: &str, phase: &str) {
        self.timeline.event(vm, EventKind::Phase, phase.to_string());
        for p in PHASES {
            let labels = PhaseLabels { vm: vm.to_string(), phase: p.to_string() };
            self.phase.get_or_create(&labels).set(i64::from(*p == phase));
        }
    }

    /// A peer refused by authentication (`no-key`, `unexpected-key`, `bad-mac`, `wrong-key`).
    pub fn auth_refused(&self, reason: &str) {
        self.auth_refusals.get_or_create(&AuthLabels { reason: reason.to_string() }).inc();
    }

    pub fn pages_sent(&self, vm: &str, reason: PageReason, pages: u64) {
        self.pages.get_or_create(&PageLabels { vm: vm.to_string(), reason }).inc_by(pages);
    }

    pub fn vm(&self, family: &Family<VmLabels, Counter>, vm: &str, by: u64) {
        family.get_or_create(&VmLabels { vm: vm.to_string() }).inc_by(by);
    }
}

/// The agent's metrics (one set per process).
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_prometheus_names() {
        let m = Metrics::new();
        m.set_phase("vm1", "postcopy");
        m.pages_sent("vm1", PageReason::faulted, 3);
        m.dirty_taken("vm1", "ring", 10);
        std::thread::sleep(std::time::Duration::from_millis(10));
        m.dirty_taken("vm1", "ring", 10);
        m.fault_latency.observe(150e-6);
        let text = m.encode();
        assert!(text.contains(r#"pcft_migration_phase{vm="vm1",phase="postcopy"} 1"#), "{text}");
        assert!(text.contains(r#"pcft_migration_phase{vm="vm1",phase="precopy"} 0"#), "{text}");
        assert!(text.contains(r#"pcft_migration_pages_total{vm="vm1",reason="faulted"} 3"#), "{text}");
        assert!(text.contains(r#"pcft_vm_dirty_pages_total{vm="vm1",tracker="ring"} 20"#), "{text}");
        let rate = text.lines().find(|l| l.starts_with("pcft_vm_dirty_rate_bytes_per_second{")).expect(&text);
        let value: f64 = rate.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > 0.0 && value < 10.0 * 4096.0 / 0.009, "{rate}");
        assert!(text.contains("pcft_migration_fault_latency_seconds_count 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    /// Every series the shipped Grafana dashboard queries is one the agent exports.
    #[test]
    fn the_grafana_dashboard_queries_only_exported_series() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/grafana/pcft-agents.json")).expect("valid JSON");
        // A family shows once it has a series: give each one.
        let m = Metrics::new();
        m.set_phase("vm1", "postcopy");
        m.pages_sent("vm1", PageReason::pushed, 1);
        m.dirty_taken("vm1", "bitmap", 1);
        m.dirty_rate_sampled("vm1", "ring", 1.0);
        for family in
            [&m.checkpoints, &m.checkpoint_bytes, &m.checkpoint_staged_file_bytes, &m.failovers, &m.output_released]
        {
            m.vm(family, "vm1", 1);
        }
        m.migrations.get_or_create(&MigrationLabels { mode: "postcopy-ft".into(), result: "completed".into() }).inc();
        m.auth_refused("no-key");
        let text = m.encode();
        // "# TYPE pcft_checkpoint_epochs counter": the family names.
        let exported: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|rest| rest.split(' ').next()).collect();
        assert!(exported.len() >= 10, "{exported:?}");
        let mut queried = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                queried.extend(
                    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .filter(|word| word.starts_with("pcft_"))
                        .map(str::to_string),
                );
            }
        }
        assert!(queried.len() >= 10, "{queried:?}");
        for series in &queried {
            let family = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| series.strip_suffix(suffix).filter(|f| exported.contains(f)))
                .unwrap_or(series);
            assert!(exported.contains(&family), "the dashboard queries {series}, not exported: {exported:?}");
        }
    }
}
