//! The destination's demand path, first half: a thread reads the guest's
//! missing-page faults from userfaultfd, notes which vCPU waits for which
//! page, and asks for each page once, itself: it queues the `PageRequest`
//! for the return path's writer, no task in between (the source
//! serves it before its background push: push.rs). The page comes
//! back through install.rs, which wakes the vCPUs.

use crate::clock::BootTime;
use crate::vmm::run_log::RunLog;
use crate::vmm::uffd::{Fault, FaultRegion};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Faults seen and not yet served: page → when the fault was read.
pub type PendingFaults = Arc<Mutex<HashMap<u64, Instant>>>;

/// Tells a VM's run log which page each of its vCPUs faulted on, and when the
/// fault was read (see `RunLog::fault_read`): the "one copy at a time" check
/// then knows a vCPU blocked in userfaultfd retired nothing since.
#[derive(Clone)]
pub struct BlockedVcpus {
    pub run_log: Arc<RunLog>,
    /// The vCPU threads' kernel ids, by vCPU.
    pub threads: Vec<u32>,
}

impl BlockedVcpus {
    pub fn note(&self, fault: &Fault) {
        if let Some(vcpu) = self.threads.iter().position(|&tid| tid == fault.thread) {
            self.run_log.fault_read(vcpu as u8, fault.gpa, BootTime::now());
        }
    }
}

/// The fault-handler thread: reads missing-page faults and queues the pages
/// to ask the source for. Stops when dropped.
pub struct FaultHandler {
    stop: Arc<AtomicBool>,
    region: Arc<FaultRegion>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultHandler {
    /// Starts reading `region`'s faults; `request` asks for each page once,
    /// when its first fault is pending, and says whether the connection is still there.
    pub fn start(
        region: Arc<FaultRegion>,
        pending: PendingFaults,
        vcpus: BlockedVcpus,
        mut request: impl FnMut(u64) -> bool + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handler_region = Arc::clone(&region);
        // Its lines carry the span it was started in (the migration's: which VM).
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new().name("uffd-faults".into()).spawn(move || {
            let _span = span.entered();
            while !flag.load(Ordering::Relaxed) {
                match region.next_fault(Duration::from_millis(500)) {
                    Ok(Some(fault)) => {
                        vcpus.note(&fault);
                        if first_pending(&pending, fault.gpa) && !request(fault.gpa) {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!("userfaultfd: {e}");
                        return;
                    }
                }
            }
        })?;
        Ok(FaultHandler { stop, region: handler_region, thread: Some(thread) })
    }
}

/// Notes a fault on `gpa`; true if it is the first pending one (a repeated
/// fault on a pending page keeps the first fault's time).
fn first_pending(pending: &PendingFaults, gpa: u64) -> bool {
    match pending.lock().expect("pending faults lock").entry(gpa) {
        Entry::Occupied(_) => false,
        Entry::Vacant(v) => {
            v.insert(Instant::now());
            true
        }
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Not a poll timeout later: every post-copy waited that out when its last page came.
        self.region.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
