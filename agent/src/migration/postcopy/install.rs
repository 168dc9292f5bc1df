//! The destination's pages: every page batch from the source is installed
//! here, in pre-copy as plain writes and in post-copy through userfaultfd,
//! which wakes the vCPUs that faulted on the page (the demand path's second
//! half; see [`super::faults`]). Also the pages a dead copy must never run on.

use super::faults::{BlockedVcpus, PendingFaults};
use crate::metrics;
use crate::migration::error::MigrationError;
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::vmm::page_set::PageSet;
use crate::vmm::uffd::{FaultRegion, Installed};
use crate::wire::frame::{PageBatch, PageRun, ProtocolError};
use crate::wire::payload::Percentiles;
use std::sync::Arc;

const ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// The pages of an incoming VM and how they are installed.
pub struct IncomingPages {
    pub memory: Arc<GuestMemory>,
    /// Post-copy: the memory is registered with userfaultfd (None: pre-copy,
    /// or released).
    pub region: Option<Arc<FaultRegion>>,
    /// Once the VM runs here: which page its vCPUs are blocked on.
    pub vcpus: Option<BlockedVcpus>,
    pub received: PageSet,
    pub pending: PendingFaults,
    /// How long each faulted page took, from its fault to its install (µs).
    latencies_us: Vec<u64>,
    /// Set at the switchover: from then on the guest owns every present page,
    /// and a page that is already present is never overwritten.
    pub switched_over: bool,
}

impl Drop for IncomingPages {
    fn drop(&mut self) {
        self.release_region(false);
    }
}

impl IncomingPages {
    pub fn new(memory: Arc<GuestMemory>, region: Option<Arc<FaultRegion>>) -> Self {
        let received = PageSet::empty(memory.size());
        IncomingPages {
            memory,
            region,
            vcpus: None,
            received,
            pending: Arc::default(),
            latencies_us: Vec::new(),
            switched_over: false,
        }
    }

    /// Pages that faulted and were served so far.
    pub fn pages_faulted(&self) -> u64 {
        self.latencies_us.len() as u64
    }

    /// The median and 99th percentile of the fault latencies so far (and forgets them).
    pub fn take_fault_latency(&mut self) -> Percentiles {
        percentiles(std::mem::take(&mut self.latencies_us))
    }

    /// Takes guest memory out of userfaultfd: every missing page now reads as
    /// zero, and a vCPU blocked on one runs on (unless its page was revoked:
    /// then it faults out). Its run log hears of it before it happens:
    /// `after_revoking`, every page a vCPU waits for was just revoked (see
    /// [`IncomingPages::revoke_missing`]); otherwise any missing page may wake one.
    pub fn release_region(&mut self, after_revoking: bool) {
        if self.region.is_none() {
            return;
        }
        if let Some(vcpus) = &self.vcpus {
            match after_revoking {
                true => vcpus.run_log.pages_zero_filling_where(|page| !self.memory.is_revoked(page)),
                false => vcpus.run_log.pages_installing(0, u64::MAX),
            }
        }
        self.region = None;
    }

    /// Installs a batch from the source (a page already present stays, once the VM switched over).
    pub fn install(&mut self, batch: &PageBatch) -> Result<(), MigrationError> {
        self.install_runs(&batch.runs())
    }

    /// Installs runs of a batch (all of it, or a piece: see [`PageRun::pieces`]).
    pub fn install_runs(&mut self, runs: &[PageRun<'_>]) -> Result<(), MigrationError> {
        if let Some(vcpus) = &self.vcpus {
            // Once per batch, before any of its pages is in place.
            let in_batch = |page: u64| {
                runs.iter().any(|r| page >= r.gpa && page < r.gpa.saturating_add(r.pages as u64 * PAGE_SIZE))
            };
            vcpus.run_log.pages_installing_where(in_batch);
        }
        for &run in runs {
            self.install_run(run)?;
        }
        Ok(())
    }

    fn install_run(&mut self, run: PageRun<'_>) -> Result<(), MigrationError> {
        let len = run.pages as u64 * PAGE_SIZE;
        self.check_range("page batch", run.gpa, len)?;
        let whole_run = match (&self.region, run.data) {
            (Some(region), Some(data)) => region.copy(run.gpa, data).map_err(MigrationError::vm)?,
            (Some(region), None) => region.zero(run.gpa, len).map_err(MigrationError::vm)?,
            // Without userfaultfd (pre-copy) every page is written one by one below.
            (None, _) => Installed::AlreadyPresent,
        };
        let pages = (0..run.pages).map(|i| {
            let gpa = run.gpa + i as u64 * PAGE_SIZE;
            (gpa, run.data.map(|d| &d[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize]))
        });
        for (gpa, data) in pages {
            if whole_run == Installed::AlreadyPresent {
                self.install_page(gpa, data)?;
            }
            self.received.insert(gpa);
        }
        self.served(run.gpa, run.pages as u64);
        Ok(())
    }

    /// The faults pending on `pages` pages from `gpa` are served: their latency counts.
    fn served(&mut self, gpa: u64, pages: u64) {
        let mut pending = self.pending.lock().expect("pending faults lock");
        if pending.is_empty() {
            return;
        }
        for i in 0..pages {
            if let Some(at) = pending.remove(&(gpa + i * PAGE_SIZE)) {
                let latency = at.elapsed();
                self.latencies_us.push(latency.as_micros() as u64);
                metrics::get().fault_latency.observe(latency.as_secs_f64());
            }
        }
    }

    /// A frame from the source names pages outside the VM: a malformed frame.
    fn check_range(&self, what: &'static str, gpa: u64, len: u64) -> Result<(), MigrationError> {
        self.memory.check(gpa, len).map(drop).map_err(|_| {
            MigrationError::Protocol(ProtocolError::Malformed {
                what,
                detail: format!("page {gpa:#x} is outside the VM's {} bytes", self.memory.size()),
            })
        })
    }

    /// Drops pages that changed at the source after they were sent (sorted
    /// addresses, from the source's dirty log), so that the guest faults them in fresh.
    pub fn discard(&mut self, gpas: &[u64]) -> Result<(), MigrationError> {
        for &gpa in gpas {
            self.check_range("discard list", gpa, PAGE_SIZE)?;
        }
        self.memory.discard_pages(gpas).map_err(MigrationError::vm)?;
        for &gpa in gpas {
            self.received.remove(gpa);
        }
        Ok(())
    }

    /// One page of a run that could not be installed whole.
    fn install_page(&mut self, gpa: u64, data: Option<&[u8]>) -> Result<(), MigrationError> {
        let installed = match &self.region {
            Some(region) => region.install_page(gpa, data).map_err(MigrationError::vm)?,
            // Fresh memory reads as zero: a zero page matters only over an older copy.
            None if data.is_none() && !self.received.contains(gpa) => return Ok(()),
            None => Installed::AlreadyPresent,
        };
        match installed {
            Installed::Now => Ok(()),
            // A newer copy from a later pre-copy round; the VM does not run here yet.
            Installed::AlreadyPresent if !self.switched_over => {
                self.memory.write(gpa, data.unwrap_or(&ZERO_PAGE)).map_err(MigrationError::vm)
            }
            Installed::AlreadyPresent => {
                tracing::warn!(
                    gpa = format_args!("{gpa:#x}"),
                    "page sent again after the switchover; the guest's copy stays"
                );
                Ok(())
            }
        }
    }

    /// Makes the pages that vCPUs are blocked on inaccessible for good, before
    /// the memory leaves userfaultfd: a vCPU woken by that then faults instead of
    /// running on a zero page after the lease ran out. (Every other vCPU is out of
    /// the guest by now, or kicked out before its next instruction.)
    pub fn revoke_missing(&mut self) {
        let (Some(region), Some(vcpus)) = (&self.region, &self.vcpus) else { return };
        let mut pages: Vec<u64> = self.pending.lock().expect("pending faults lock").keys().copied().collect();
        match region.queued_faults() {
            Ok(queued) => {
                for fault in queued {
                    vcpus.note(&fault);
                    pages.push(fault.gpa);
                }
            }
            Err(e) => tracing::warn!("reading the last page faults: {e}"),
        }
        pages.retain(|&gpa| !self.received.contains(gpa));
        pages.sort_unstable();
        pages.dedup();
        vcpus.run_log.amend_blocked_exits(|page| !self.received.contains(page));
        if pages.is_empty() {
            return;
        }
        match self.memory.revoke_pages(&pages) {
            Ok(()) => tracing::debug!(pages = pages.len(), "revoked the missing pages blocked vCPUs wait for"),
            Err(e) => tracing::error!("cannot revoke the pages blocked vCPUs wait for: {e}"),
        }
    }
}

fn percentiles(mut samples: Vec<u64>) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles { p50: at(0.5), p99: at(0.99) }
}
