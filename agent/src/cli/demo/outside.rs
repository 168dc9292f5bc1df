//! The outside world of the demo's VM: a TCP listener that collects every
//! output record the agents release, and the audit of what reached it against
//! the oracle's records.

use crate::cli::{run_failure, Failure};
use pcft_agent::vmm::output::ReleasedRecord;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_fixtures::OutputRecord;

/// The listener the agents send released output to (`pcft agent --output-sink`).
pub struct Outside {
    /// Where it listens (HOST:PORT).
    pub addr: String,
    records: Arc<Mutex<Vec<ReleasedRecord>>>,
}

impl Outside {
    /// Listens on `bind`, collecting records on threads of its own.
    pub fn start(bind: &str) -> Result<Outside, Failure> {
        let listener = std::net::TcpListener::bind(bind).map_err(run_failure)?;
        let addr = listener.local_addr().map_err(run_failure)?.to_string();
        let records: Arc<Mutex<Vec<ReleasedRecord>>> = Arc::default();
        let sink = Arc::clone(&records);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        if let Ok(record) = serde_json::from_str::<ReleasedRecord>(&line) {
                            sink.lock().expect("outside lock").push(record);
                        }
                    }
                });
            }
        });
        Ok(Outside { addr, records })
    }

    fn records(&self) -> Vec<ReleasedRecord> {
        self.records.lock().expect("outside lock").clone()
    }

    /// Waits (a little) for records still on their way.
    pub fn settle(&self, expected: usize) -> Vec<ReleasedRecord> {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let records = self.records();
            let distinct: HashSet<(u32, u64)> = records.iter().map(|r| (r.vcpu, r.step)).collect();
            if distinct.len() >= expected || std::time::Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What reached the outside, checked against the oracle's records.
pub struct OutputAudit {
    /// Distinct records released.
    pub released: usize,
    pub duplicates: usize,
    /// Released records that the verified run does not have (lost or contradicted by the failover).
    pub lost: usize,
    /// Records of the verified run that never reached the outside.
    pub never_released: usize,
}

impl OutputAudit {
    /// The audit of `released` against the oracle's `expected` records.
    pub fn new(released: &[ReleasedRecord], expected: &[OutputRecord]) -> OutputAudit {
        let truth: HashSet<OutputRecord> = expected.iter().copied().collect();
        let mut seen = HashSet::new();
        let (mut duplicates, mut lost) = (0, 0);
        for record in released.iter().map(ReleasedRecord::record) {
            if !seen.insert(record) {
                duplicates += 1;
            } else if !truth.contains(&record) {
                lost += 1;
            }
        }
        let never_released = truth.iter().filter(|r| !seen.contains(*r)).count();
        OutputAudit { released: seen.len(), duplicates, lost, never_released }
    }
}
