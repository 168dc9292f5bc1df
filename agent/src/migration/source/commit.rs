//! The commit: `Go` goes out, and from then on the destination may run the
//! VM. Starts the reply reader and sets up the push of what it still lacks.

use crate::metrics;
use crate::migration::error::MigrationError;
use crate::migration::ft::source::{FtSource, FtTimeouts, StartedStager};
use crate::migration::postcopy::push::Push;
use crate::migration::source::connect::Link;
use crate::migration::source::demand::{DemandSender, DemandWork};
use crate::migration::source::outbox::Outbox;
use crate::migration::source::outcome;
use crate::migration::source::phase::Phases;
use crate::migration::source::postcopy::PostcopySource;
use crate::migration::source::replies::{spawn_reader, Liveness};
use crate::migration::source::request::MigrateOut;
use crate::migration::source::switchover::Stopped;
use crate::vmm::memory::GuestMemory;
use crate::vmm::page_set::PageSet;
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{MigrationReport, Mode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The source at the switchover, `Restored` heard: ready to commit.
pub struct Committing<'p> {
    pub link: Link,
    pub memory: Arc<GuestMemory>,
    pub report: MigrationReport,
    pub phases: &'p mut Phases,
    /// PostCopyFT: the stager, started before the commit.
    pub stager: Option<StartedStager>,
}

/// Commits (`Postcopy` from here): sends `Go`, starts the reply reader, and
/// returns the post-copy loop over the pages the destination still lacks.
/// A cancel that came first stops it here: nothing is committed, the VM runs
/// here again (`MigrationError::Cancelled`).
pub async fn go<'p>(
    req: &MigrateOut<'_>,
    committing: Committing<'p>,
    stopped: &Stopped,
) -> Result<PostcopySource<'p>, MigrationError> {
    let Committing { mut link, memory, mut report, phases, stager } = committing;
    if let Err(cancelled) = phases.commit() {
        // (A stager already started ends as `stager` drops.)
        return Err(outcome::abandon(req, &mut link.out, cancelled, false).await);
    }
    // Committed from here: the destination runs the VM once it reads `Go`.
    let go_at = Instant::now();
    metrics::get().set_phase(req.vm, "postcopy");
    let (ft, checkpoints) = match stager {
        Some(stager) => {
            let timeouts = FtTimeouts {
                heartbeat: Duration::from_millis(req.options.heartbeat_timeout_ms),
                checkpoint: Duration::from_millis(req.options.checkpoint_timeout_ms),
            };
            link.out.liveness = Some(Arc::new(Liveness::new(go_at, timeouts.heartbeat)));
            let (ft, inbox) = FtSource::new(stager, go_at, timeouts);
            (Some(ft), Some(inbox))
        }
        None => (None, None),
    };
    if let Err(e) = link.out.message(&MigrationMessage::Go).await {
        if ft.is_none() {
            return Err(MigrationError::LostAfterCommit(format!("{e}; {}", outcome::NOT_RECOVERABLE)));
        }
    }
    let Link { rd, out, demand } = link;
    let mut inbound = spawn_reader(rd, checkpoints, out.liveness.clone());
    let unsent = unsent_pages(req.mode, req.config.mem_bytes, stopped);
    report.final_dirty_pages = if req.mode == Mode::Hybrid { unsent.len() } else { stopped.final_dirty.len() as u64 };
    let push = Push::new(unsent);
    // Page requests go straight to the demand channel's task, if there is one.
    let demand = demand.map(|channel| {
        let mut channel = Outbox::new(channel);
        channel.liveness = out.liveness.clone();
        let (_, no_requests) = tokio::sync::mpsc::unbounded_channel();
        DemandSender::start(DemandWork {
            out: channel,
            memory: Arc::clone(&memory),
            requests: std::mem::replace(&mut inbound.requests, no_requests),
            claims: push.demand_claims(),
            vm: req.vm.to_string(),
            progress: Arc::clone(&req.progress),
        })
    });
    report.postcopy_preempt = demand.is_some();
    Ok(PostcopySource { out, inbound, push, demand, resumed_at: None, ft, memory, report, phases })
}

/// What the destination still lacks after the switchover, by mode.
fn unsent_pages(mode: Mode, mem_bytes: u64, stopped: &Stopped) -> PageSet {
    match mode {
        Mode::Precopy => PageSet::empty(mem_bytes),
        Mode::Postcopy | Mode::PostcopyFt => PageSet::full(mem_bytes),
        Mode::Hybrid => {
            let mut set = PageSet::empty(mem_bytes);
            for &gpa in stopped.final_dirty.iter().chain(&stopped.discarded) {
                set.insert(gpa);
            }
            set
        }
    }
}
