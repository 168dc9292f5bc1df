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
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Connections closed for `--max-connections` (see `connection_refused`).
    pub connections_refused: Counter,
    /// Output commit of network guests: frames and bytes held now, frames released, how long they were held.
    pub net_held_frames: Family<VmLabels, Gauge>,
    pub net_held_bytes: Family<VmLabels, Gauge>,
    pub net_released_frames: Family<VmLabels, Counter>,
    pub net_hold_seconds: Histogram,
    /// Network VMs' traffic: frames received and sent, and the longest quiet on the way out.
    pub net_received_frames: Family<VmLabels, Counter>,
    pub net_sent_frames: Family<VmLabels, Counter>,
    pub net_longest_quiet_seconds: Family<VmLabels, Gauge<f64, AtomicU64>>,
    /// Last take per (vm, tracker), for the dirty rate.
    last_take: Mutex<HashMap<TrackerLabels, Instant>>,
    /// The instance of each VM here that may set its dirty rate (see [`VmInstance`]).
    instances: Mutex<HashMap<String, u64>>,
    next_instance: AtomicU64,
    /// What the dashboard plots.
    pub timeline: Timeline,
}

/// Registers the network VMs' metrics (output commit and traffic).
fn register_net(registry: &mut Registry, m: &Metrics) {
    registry.register(
        "net_held_frames",
        "Network frames a PostCopyFT destination's VM transmitted and holds until their checkpoint commits",
        m.net_held_frames.clone(),
    );
    registry.register("net_held_bytes", "Bytes of the held network frames", m.net_held_bytes.clone());
    registry.register(
        "net_released_frames",
        "Held network frames released to the outside after their checkpoint committed",
        m.net_released_frames.clone(),
    );
    registry.register(
        "net_hold_seconds",
        "The longest a frame was held, per release (the latency output commit adds)",
        m.net_hold_seconds.clone(),
    );
    registry.register(
        "net_received_frames",
        "Network frames from the wire placed in the guest (the clients' requests and acks)",
        m.net_received_frames.clone(),
    );
    registry.register(
        "net_sent_frames",
        "Network frames sent to the wire (the VM's replies, once released)",
        m.net_sent_frames.clone(),
    );
    registry.register(
        "net_longest_quiet_seconds",
        "The longest time in the last sample interval (about 1 s) in which the VM sent nothing to the wire: the reply gap its clients see",
        m.net_longest_quiet_seconds.clone(),
    );
}

/// A network device's traffic over one sample interval.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetTraffic {
    pub received: u64,
    pub sent: u64,
    pub longest_quiet: std::time::Duration,
    pub held_frames: u64,
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
            connections_refused: Counter::default(),
            net_held_frames: Family::default(),
            net_held_bytes: Family::default(),
            net_released_frames: Family::default(),
            net_hold_seconds: seconds_buckets(),
            net_received_frames: Family::default(),
            net_sent_frames: Family::default(),
            net_longest_quiet_seconds: Family::default(),
            last_take: Mutex::new(HashMap::new()),
            instances: Mutex::new(HashMap::new()),
            next_instance: AtomicU64::new(1),
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
        register_net(&mut registry, &m);
        registry.register(
            "connections_refused",
            "Connections the agent closed for --max-connections: the oldest not yet greeted, to take a new one, or a greeted one past the limit",
            m.connections_refused.clone(),
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

    /// A new running copy of VM `vm` here (a VM's runner calls it as it starts):
    /// from now on only it sets `vm`'s dirty rate, and the rates an earlier
    /// copy of that name left go (its migration phase stays: a failover's
    /// new copy goes on from the migration that restored it).
    pub fn vm_instance(&self, vm: &str) -> VmInstance {
        let mut instances = self.instances.lock().expect("VM instances lock");
        self.remove_dirty_rates(vm);
        let id = self.next_instance.fetch_add(1, Ordering::Relaxed);
        instances.insert(vm.to_string(), id);
        VmInstance { vm: vm.to_string(), id }
    }

    /// VM `vm` left this agent (migrated away, finished, failed, stopped or
    /// removed): the per-VM gauges that describe a running VM go (its dirty
    /// rate for every tracker, with its last-take bookkeeping, and its
    /// migration phase), and its copy's [`VmInstance`] sets none of them again.
    /// Counters stay. Call it after the VM's migration, if any, set its last
    /// phase, and before a VM of the same name may start here.
    pub fn vm_left(&self, vm: &str) {
        let mut instances = self.instances.lock().expect("VM instances lock");
        instances.remove(vm);
        self.remove_dirty_rates(vm);
        let labels = VmLabels { vm: vm.to_string() };
        self.net_held_frames.remove(&labels);
        self.net_held_bytes.remove(&labels);
        self.net_longest_quiet_seconds.remove(&labels);
        for phase in PHASES {
            self.phase.remove(&PhaseLabels { vm: vm.to_string(), phase: phase.to_string() });
        }
    }

    /// Removes `vm`'s dirty rates and last takes (the caller holds the instances lock).
    fn remove_dirty_rates(&self, vm: &str) {
        let mut last_take = self.last_take.lock().expect("last take lock");
        let trackers: Vec<TrackerLabels> = last_take.keys().filter(|l| l.vm == vm).cloned().collect();
        for labels in trackers {
            last_take.remove(&labels);
            self.dirty_rate.remove(&labels);
        }
    }

    /// Runs `set` (which sets `instance`'s gauges) if `instance` is its VM's current one.
    fn if_current(&self, instance: &VmInstance, set: impl FnOnce()) {
        let instances = self.instances.lock().expect("VM instances lock");
        if instances.get(&instance.vm) == Some(&instance.id) {
            set();
        }
    }

    /// A traffic sample of VM copy `instance`'s network device over `seconds`:
    /// `received` and `sent` frames in it, the longest quiet on the way out, and the frames held now.
    pub fn net_traffic(&self, instance: &VmInstance, seconds: f64, traffic: NetTraffic) {
        let labels = VmLabels { vm: instance.vm.clone() };
        self.net_received_frames.get_or_create(&labels).inc_by(traffic.received);
        self.net_sent_frames.get_or_create(&labels).inc_by(traffic.sent);
        self.if_current(instance, || {
            self.net_longest_quiet_seconds.get_or_create(&labels).set(traffic.longest_quiet.as_secs_f64());
            self.timeline.net_sample(timeline::NetSample {
                t_ms: 0.0,
                vm: instance.vm.clone(),
                received_per_second: traffic.received as f64 / seconds,
                sent_per_second: traffic.sent as f64 / seconds,
                longest_quiet_ms: traffic.longest_quiet.as_secs_f64() * 1e3,
                held_frames: traffic.held_frames,
            });
        });
    }

    /// A release of held network frames of VM copy `instance`: `frames` went
    /// out, the longest held `max_hold_seconds`; `held_frames` and `held_bytes` remain.
    pub fn net_released(
        &self,
        instance: &VmInstance,
        frames: u64,
        max_hold_seconds: f64,
        held_frames: usize,
        held_bytes: usize,
    ) {
        let labels = VmLabels { vm: instance.vm.clone() };
        self.net_released_frames.get_or_create(&labels).inc_by(frames);
        if frames > 0 {
            self.net_hold_seconds.observe(max_hold_seconds);
        }
        self.if_current(instance, || {
            self.net_held_frames.get_or_create(&labels).set(held_frames as i64);
            self.net_held_bytes.get_or_create(&labels).set(held_bytes as i64);
        });
    }

    /// A take of `pages` dirty pages from the `tracker` of VM copy `instance`: updates the dirty rate.
    pub fn dirty_taken(&self, instance: &VmInstance, tracker: &str, pages: usize) {
        let vm = instance.vm.as_str();
        let labels = TrackerLabels { vm: vm.to_string(), tracker: tracker.to_string() };
        self.dirty_pages.get_or_create(&labels).inc_by(pages as u64);
        self.if_current(instance, || {
            let now = Instant::now();
            let previous = self.last_take.lock().expect("last take lock").insert(labels.clone(), now);
            let seconds = previous.map_or(0.0, |previous| now.duration_since(previous).as_secs_f64());
            if seconds > 0.0 {
                let rate = pages as f64 * 4096.0 / seconds;
                self.dirty_rate.get_or_create(&labels).set(rate);
                self.timeline.sample(vm, tracker, rate);
            }
        });
    }

    /// A dirty rate of VM copy `instance` sampled from a continuous count (ring entries or eBPF pushes).
    pub fn dirty_rate_sampled(&self, instance: &VmInstance, tracker: &str, bytes_per_second: f64) {
        let vm = instance.vm.as_str();
        let labels = TrackerLabels { vm: vm.to_string(), tracker: tracker.to_string() };
        self.if_current(instance, || {
            self.dirty_rate.get_or_create(&labels).set(bytes_per_second);
            self.last_take.lock().expect("last take lock").insert(labels, Instant::now());
            self.timeline.sample(vm, tracker, bytes_per_second);
        });
    }

    /// `vm` is now in `phase` (one of [`PHASES`]).
    pub fn set_phase(&self, vm: &str, phase: &str) {
        self.timeline.event(vm, EventKind::Phase, phase.to_string());
        for p in PHASES {
            let labels = PhaseLabels { vm: vm.to_string(), phase: p.to_string() };
            self.phase.get_or_create(&labels).set(i64::from(*p == phase));
        }
    }

    /// A connection closed for `--max-connections`: the oldest of those that
    /// had not greeted (to take a new one), or a greeted one past the limit.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
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

/// One running copy of a VM on this agent, as its runner reports its dirty
/// rate: a VM's name can outlive a copy (a VM migrates away and another of
/// that name starts, a failover restores a new copy), so the gauges take
/// updates only from the name's current copy, until [`Metrics::vm_left`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInstance {
    vm: String,
    id: u64,
}

impl VmInstance {
    pub fn vm(&self) -> &str {
        &self.vm
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
        let vm1 = m.vm_instance("vm1");
        m.dirty_taken(&vm1, "ring", 10);
        std::thread::sleep(std::time::Duration::from_millis(10));
        m.dirty_taken(&vm1, "ring", 10);
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

    /// A VM that left takes its running gauges along (dirty rates, phase);
    /// its counters stay, other VMs' gauges stay, and neither its old copy nor
    /// a stopped tracker of it sets its rate again. A new VM of the same name
    /// starts with no rate (issue 15: a new VM showed a migrated-away one's).
    #[test]
    fn a_vm_that_left_has_no_dirty_rate_or_phase() {
        let m = Metrics::new();
        let (old, other) = (m.vm_instance("vm1"), m.vm_instance("vm2"));
        m.dirty_rate_sampled(&old, "ring", 28.4 * 1048576.0);
        m.dirty_taken(&old, "bitmap", 5);
        std::thread::sleep(std::time::Duration::from_millis(2));
        m.dirty_taken(&old, "bitmap", 5);
        m.dirty_rate_sampled(&other, "ring", 1.0);
        m.set_phase("vm1", "completed");
        let text = m.encode();
        assert!(text.contains(r#"pcft_vm_dirty_rate_bytes_per_second{vm="vm1",tracker="ring"}"#), "{text}");
        assert!(text.contains(r#"pcft_vm_dirty_rate_bytes_per_second{vm="vm1",tracker="bitmap"}"#), "{text}");

        m.vm_left("vm1");
        let gone = |text: &str| {
            !text.lines().any(|l| {
                (l.starts_with("pcft_vm_dirty_rate_bytes_per_second{") || l.starts_with("pcft_migration_phase{"))
                    && l.contains(r#"vm="vm1""#)
            })
        };
        let text = m.encode();
        assert!(gone(&text), "{text}");
        assert!(text.contains(r#"pcft_vm_dirty_pages_total{vm="vm1",tracker="bitmap"} 10"#), "counters stay: {text}");
        assert!(text.contains(r#"pcft_vm_dirty_rate_bytes_per_second{vm="vm2",tracker="ring"} 1"#), "{text}");
        assert!(!m.last_take.lock().unwrap().keys().any(|l| l.vm == "vm1"), "its last takes go too");

        // The old copy's runner, or its tracker, sampling late: no rate comes back.
        m.dirty_rate_sampled(&old, "ring", 5.0);
        m.dirty_taken(&old, "bitmap", 5);
        m.dirty_taken(&old, "bitmap", 5);
        assert!(gone(&m.encode()), "{}", m.encode());

        // A new VM of that name: only its own samples count, not the old copy's.
        let new = m.vm_instance("vm1");
        assert!(gone(&m.encode()), "no rate before its first sample: {}", m.encode());
        m.dirty_rate_sampled(&old, "ring", 5.0);
        assert!(gone(&m.encode()), "{}", m.encode());
        m.dirty_rate_sampled(&new, "ring", 7.0);
        assert!(m.encode().contains(r#"pcft_vm_dirty_rate_bytes_per_second{vm="vm1",tracker="ring"} 7"#));
        assert_eq!(new.vm(), "vm1");
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
        let vm1 = m.vm_instance("vm1");
        m.dirty_taken(&vm1, "bitmap", 1);
        m.dirty_rate_sampled(&vm1, "ring", 1.0);
        for family in
            [&m.checkpoints, &m.checkpoint_bytes, &m.checkpoint_staged_file_bytes, &m.failovers, &m.output_released]
        {
            m.vm(family, "vm1", 1);
        }
        m.migrations.get_or_create(&MigrationLabels { mode: "postcopy-ft".into(), result: "completed".into() }).inc();
        m.auth_refused("no-key");
        m.net_traffic(&vm1, 1.0, NetTraffic { received: 1, sent: 1, ..NetTraffic::default() });
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
