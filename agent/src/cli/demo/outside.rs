//! The outside world of the demo's VM: a TCP listener that collects every
//! output record the agents release, and the audit of what reached it against
//! the oracle's records.

use crate::cli::{run_failure, Failure};
use pcft_agent::vmm::output::ReleasedRecord;
use std::collections::{HashMap, HashSet};
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
    /// Of them, those the destination released (first): what a failover
    /// that knew nothing of the destination's releases would send again.
    pub by_destination: usize,
    pub duplicates: usize,
    /// Of the duplicates, those a failover cannot avoid: records the
    /// destination released first (after its last heartbeat that reached the
    /// source, which so could not know) and the recovered source released again.
    /// The rest would be a bug: the source re-releasing what it knew went out,
    /// or an agent releasing a record twice.
    pub duplicates_in_window: usize,
    /// Released records that the verified run does not have (lost or contradicted by the failover).
    pub lost: usize,
    /// Records of the verified run that never reached the outside.
    pub never_released: usize,
}

impl OutputAudit {
    /// The audit of `released` against the oracle's `expected` records.
    pub fn new(released: &[ReleasedRecord], expected: &[OutputRecord]) -> OutputAudit {
        let truth: HashSet<OutputRecord> = expected.iter().copied().collect();
        // Each distinct record, and the agent that released it first.
        let mut seen: HashMap<OutputRecord, &str> = HashMap::new();
        let (mut duplicates, mut duplicates_in_window, mut lost) = (0, 0, 0);
        for released in released {
            let record = released.record();
            match seen.get(&record) {
                Some(first) => {
                    duplicates += 1;
                    if *first == "destination" && released.agent == "source" {
                        duplicates_in_window += 1;
                    }
                }
                None => {
                    seen.insert(record, &released.agent);
                    if !truth.contains(&record) {
                        lost += 1;
                    }
                }
            }
        }
        let never_released = truth.iter().filter(|r| !seen.contains_key(*r)).count();
        let by_destination = seen.values().filter(|agent| **agent == "destination").count();
        OutputAudit { released: seen.len(), by_destination, duplicates, duplicates_in_window, lost, never_released }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(agent: &str, step: u64) -> ReleasedRecord {
        ReleasedRecord { vm: "vm".into(), agent: agent.into(), vcpu: 0, step, digest: step }
    }

    #[test]
    fn duplicates_of_the_destinations_last_releases_are_the_failovers_window() {
        let expected: Vec<OutputRecord> = (0..4).map(|step| OutputRecord { vcpu: 0, step, digest: step }).collect();
        let released = [
            at("source", 0),
            at("destination", 1),
            at("destination", 2),
            // The failover: the source releases 2 again (the window) and 3.
            at("source", 2),
            at("source", 3),
            // A repeat the source knew about: outside the window.
            at("source", 0),
        ];
        let audit = OutputAudit::new(&released, &expected);
        assert_eq!((audit.released, audit.duplicates, audit.duplicates_in_window), (4, 2, 1));
        assert_eq!(audit.by_destination, 2);
        assert_eq!((audit.lost, audit.never_released), (0, 0));
    }
}
