//! How `pcft vm` reports what happens: human lines or JSON lines on stdout.

use super::dirty_takes::TakeStats;
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

    pub fn failed(&self, error: &str) {
        if self.json {
            println!("{}", json!({"event": "finished", "verified": false, "error": error}));
        }
    }
}
