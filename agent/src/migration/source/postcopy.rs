//! After the commit: the post-copy loop (`Postcopy`: requested pages first,
//! then the push; `Draining`: `AllSent` went out; PostCopyFT's `Finishing`),
//! with heartbeat acks and checkpoint events from PostCopyFT's side. A
//! PostCopyFT cancel, taken before `Finishing`, ends the loop as a loss
//! (`Lost::cancelled`): no heartbeat is acked after it.

use crate::metrics::{self, PageReason};
use crate::migration::error::FailureKind;
use crate::migration::ft::source::FtSource;
use crate::migration::ft::stager;
use crate::migration::postcopy::push::{Push, PUSH_BATCH_PAGES};
use crate::migration::progress::CommitPoint;
use crate::migration::source::demand::DemandSender;
use crate::migration::source::lost::{Cause, Lost};
use crate::migration::source::outbox::Outbox;
use crate::migration::source::phase::{Phase, Phases};
use crate::migration::source::replies::{Heard, Inbound, Queued, Reply};
use crate::vmm::memory::GuestMemory;
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{DestinationStats, MigrationOptions, MigrationReport};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The source after the commit: the post-copy push, answers to page requests
/// first, and (PostCopyFT) checkpoints and heartbeats.
pub struct PostcopySource<'p> {
    pub out: Outbox,
    pub inbound: Inbound,
    pub push: Push,
    /// The demand channel's task (None: requested pages share the connection).
    pub demand: Option<DemandSender>,
    /// When the destination said the VM runs there.
    pub resumed_at: Option<Instant>,
    pub ft: Option<FtSource>,
    pub memory: Arc<GuestMemory>,
    pub report: MigrationReport,
    pub phases: &'p mut Phases,
}

/// The stager's next event (never, without PostCopyFT).
async fn next_checkpoint_event(ft: &mut Option<FtSource>) -> Option<stager::Event> {
    match ft {
        Some(ft) => ft.next_event().await,
        None => std::future::pending().await,
    }
}

impl PostcopySource<'_> {
    /// Sends every page, then `AllSent`, waits for `Complete` and (PostCopyFT)
    /// hands the VM over; returns the destination's stats.
    pub async fn run(&mut self, options: MigrationOptions) -> Result<DestinationStats, Lost> {
        let ran = self.run_loop(options).await;
        if ran.is_err() {
            // No page is read for the destination once it is lost (before any failover).
            if let Some(demand) = &mut self.demand {
                demand.stop().await;
            }
        }
        ran
    }

    async fn run_loop(&mut self, options: MigrationOptions) -> Result<DestinationStats, Lost> {
        self.push_all(options).await?;
        let demand_pages = self.finish_demand().await?;
        let all_sent = MigrationMessage::AllSent { pages: self.out.pages, demand_pages };
        self.out.message(&all_sent).await.map_err(Lost::from_write)?;
        self.phases.enter(Phase::Draining);
        loop {
            if let Some(stats) = self.wait(None).await? {
                if self.ft.is_some() {
                    // The destination has every page: let the VM go. Its output may all go out now.
                    self.finish(Duration::from_millis(options.reply_timeout_ms)).await?;
                }
                return Ok(stats);
            }
        }
    }

    /// `Postcopy`: requested pages first, then one queued reply, then one push batch.
    async fn push_all(&mut self, options: MigrationOptions) -> Result<(), Lost> {
        // Pacing of the background push (demand pages are never held back).
        let pace = (options.postcopy_pages_per_sec > 0)
            .then(|| Duration::from_secs_f64(PUSH_BATCH_PAGES as f64 / options.postcopy_pages_per_sec as f64));
        let mut next_push = Instant::now();
        // Requested pages leave `unsent` when asked for: flush them too before `AllSent`.
        while !self.push.done() {
            // The reply reader may sit in this worker's queue: let it run, so that
            // page requests (and "resumed") are seen after at most one batch.
            tokio::task::yield_now().await;
            self.check_cancel()?;
            self.check_demand().await?;
            self.ack_heartbeat().await?;
            self.take_checkpoint_events().await?;
            self.take_requests();
            // Page requests first, then one queued reply (a checkpoint frame may
            // take a slow disk's write), then one push batch: none starves another.
            if !self.push.has_demand() {
                if let Ok(queued) = self.inbound.replies.try_recv() {
                    if self.handle(queued).await?.is_some() {
                        return Err(Lost::protocol(Cause::CompletedEarly));
                    }
                    self.take_requests();
                }
            }
            self.check_alive()?;
            if self.push.has_demand() {
                let demand = self.push.take_demand();
                self.out.paused_pages(&self.memory, &demand, PUSH_BATCH_PAGES).await.map_err(Lost::from_write)?;
                self.report.pages_faulted += demand.len() as u64;
                self.pages_sent(PageReason::faulted, demand.len() as u64);
                continue;
            }
            // Until the VM runs at the destination nothing needs pages; pushing now
            // would only compete with its resume for the CPU and stretch the downtime.
            let wait_until = if self.resumed_at.is_none() {
                Some(None)
            } else if pace.is_some() && Instant::now() < next_push {
                Some(Some(next_push))
            } else {
                None
            };
            if let Some(until) = wait_until {
                if self.wait(until).await?.is_some() {
                    return Err(Lost::protocol(Cause::CompletedEarly));
                }
                continue;
            }
            let batch = self.push.next_batch();
            self.out.paused_pages(&self.memory, &batch, PUSH_BATCH_PAGES).await.map_err(Lost::from_write)?;
            // A write that found room never yields: let the demand channel's
            // task (a requested page) run on this worker between push frames.
            tokio::task::yield_now().await;
            self.report.pages_pushed += batch.len() as u64;
            self.pages_sent(PageReason::pushed, batch.len() as u64);
            if let Some(pace) = pace {
                next_push = next_push.max(Instant::now() - pace) + pace;
            }
        }
        Ok(())
    }

    /// Closes the demand channel once every page is claimed, and counts what
    /// it carried; returns its page count for `AllSent` (None: no channel).
    async fn finish_demand(&mut self) -> Result<Option<u64>, Lost> {
        let Some(demand) = &mut self.demand else { return Ok(None) };
        let sent = demand.finish().await.map_err(Lost::from_write)?;
        self.out.pages += sent.pages;
        self.out.zero_pages += sent.zero_pages;
        self.out.bytes += sent.bytes;
        self.report.pages_faulted += sent.pages;
        Ok(Some(sent.pages))
    }

    /// The demand channel's task ended on its own: its connection failed.
    async fn check_demand(&mut self) -> Result<(), Lost> {
        match &mut self.demand {
            Some(demand) if demand.failed() => match demand.finish().await {
                Err(e) => Err(Lost::from_write(e)),
                // It ends by itself only once the reply reader is gone: the connection closed.
                Ok(_) => Err(Lost::new(FailureKind::ConnectionClosed, Cause::Closed)),
            },
            _ => Ok(()),
        }
    }

    /// Counts post-copy pages in the metrics and the migration's progress.
    fn pages_sent(&self, reason: PageReason, pages: u64) {
        metrics::get().pages_sent(&self.report.vm, reason, pages);
        self.phases.progress().add_pages_sent(pages);
    }

    /// PostCopyFT's hand-over (`Finishing`): `Finish`, then wait for `Finished`, acking
    /// heartbeats meanwhile so that the destination's lease holds while `Finish`
    /// travels. Only the destination's own words settle it: `Finished` (the VM
    /// is its own) or `Abort` (its lease ran out first and it stopped its copy:
    /// fail over as before). Silence is no answer on a lossy link (TCP delivers
    /// late), so the source waits up to `patience`; and a connection that ends
    /// without either word cannot tell a crash from a lost `Finished`. In both
    /// cases the source must not restore its copy: the VM may run there.
    async fn finish(&mut self, patience: Duration) -> Result<(), Lost> {
        // A cancel that came first: fail over instead of handing the VM over.
        self.phases.hand_over().map_err(|_| Lost::cancelled())?;
        // A write that fails or times out did not deliver a whole `Finish`: fail over as usual.
        self.out.message(&MigrationMessage::Finish).await.map_err(Lost::from_write)?;
        let deadline = Instant::now() + patience;
        let unconfirmed =
            |why: Cause| Lost::new(FailureKind::FinishUnconfirmed, Cause::FinishUnconfirmed(Box::new(why)));
        while self.phases.current() == Phase::Finishing {
            if Instant::now() >= deadline {
                return Err(unconfirmed(Cause::NoAnswer { patience_ms: patience.as_millis() }));
            }
            match self.wait(Some(deadline)).await {
                Ok(_) => {}
                Err(lost) if lost.cause.aborted() => return Err(lost),
                Err(lost) => return Err(unconfirmed(lost.cause)),
            }
        }
        Ok(())
    }

    /// Whether `Finish` went out (checkpoints have stopped: no stall check, and silence settles nothing).
    fn finishing(&self) -> bool {
        self.phases.current() == Phase::Finishing
    }

    /// Waits for the next reply (at most until `until`) and handles it.
    async fn wait(&mut self, until: Option<Instant>) -> Result<Option<DestinationStats>, Lost> {
        let mut deadline = until;
        let finishing = self.finishing();
        if let Some(l) = self.out.liveness.as_ref().filter(|_| !finishing) {
            // Not waiting on the destination now: look again within the timeout.
            let silent = l.deadline().unwrap_or_else(|| Instant::now() + l.timeout);
            deadline = Some(deadline.map_or(silent, |d| d.min(silent)));
        }
        if let Some(ft) = self.ft.as_ref().filter(|_| !finishing) {
            deadline = Some(deadline.map_or(ft.stall_deadline(), |d| d.min(ft.stall_deadline())));
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        // Once the reader is gone, only the queue (its last word) matters.
        let reader_alive = self.inbound.heartbeats.has_changed().is_ok();
        tokio::select! {
            biased;
            // Before anything else: no heartbeat is acked once a cancel is taken.
            () = self.phases.progress().cancelled() => Err(Lost::cancelled()),
            Ok(()) = self.inbound.heartbeats.changed(), if reader_alive => {
                // `changed` marked it seen: ack it here.
                let heard = *self.inbound.heartbeats.borrow_and_update();
                self.send_heartbeat_ack(heard).await?;
                Ok(None)
            }
            Some(gpas) = self.inbound.requests.recv() => {
                self.push.request(gpas);
                self.take_requests();
                Ok(None)
            }
            Some(event) = next_checkpoint_event(&mut self.ft) => {
                self.on_checkpoint(event).await?;
                Ok(None)
            }
            queued = self.inbound.replies.recv() => match queued {
                Some(queued) => self.handle(queued).await,
                None => Err(Lost::new(FailureKind::ConnectionClosed, Cause::Closed)),
            },
            _ = sleep => {
                self.check_alive()?;
                Ok(None)
            }
        }
    }

    /// A write found the connection closed: the destination may have said why
    /// (an `Abort` still in the queue, or about to be). Use its words.
    pub async fn explain(&mut self, lost: &mut Lost) {
        if lost.kind != FailureKind::ConnectionClosed || lost.cause.aborted() {
            return;
        }
        let until = Instant::now() + Duration::from_millis(50);
        while let Ok(Some(queued)) = tokio::time::timeout_at(until.into(), self.inbound.replies.recv()).await {
            let (kind, said) = match queued.reply {
                Reply::Gone(kind, reason) => (kind, Cause::Reader(reason)),
                Reply::Aborted { reason, paused } => (lost.kind, Cause::Aborted { reason, paused }),
                _ => continue,
            };
            let seen = std::mem::replace(&mut lost.cause, Cause::Closed);
            *lost = Lost::new(kind, Cause::Explained { said: Box::new(said), seen: Box::new(seen) });
            return;
        }
    }

    /// Moves the page requests that came meanwhile to the demand queue.
    fn take_requests(&mut self) {
        while let Ok(gpas) = self.inbound.requests.try_recv() {
            self.push.request(gpas);
        }
    }

    /// Acks the latest heartbeat if it is new, renewing the destination's lease.
    async fn ack_heartbeat(&mut self) -> Result<(), Lost> {
        if self.ft.is_none() || !self.inbound.heartbeats.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let heard = *self.inbound.heartbeats.borrow_and_update();
        self.send_heartbeat_ack(heard).await
    }

    async fn send_heartbeat_ack(&mut self, heard: Heard) -> Result<(), Lost> {
        let Some(ft) = &mut self.ft else { return Ok(()) };
        // Known now, whether or not the ack gets out: those records went out there.
        ft.heard_released(heard.released);
        self.out.message(&MigrationMessage::HeartbeatAck { seq: heard.seq }).await.map_err(Lost::from_write)?;
        ft.renewed(Instant::now());
        Ok(())
    }

    /// PostCopyFT: whether the operator cancelled (the only cancel taken
    /// after the commit): then the destination is let go, as if lost.
    fn check_cancel(&self) -> Result<(), Lost> {
        match self.phases.progress().commit_point() {
            CommitPoint::FailOverAsked => Err(Lost::cancelled()),
            _ => Ok(()),
        }
    }

    /// Whether the destination is still there: heard within the heartbeat
    /// timeout, and (PostCopyFT) its checkpoints not stalled.
    fn check_alive(&self) -> Result<(), Lost> {
        let now = Instant::now();
        // After `Finish`, silence settles nothing (see `finish`).
        if self.finishing() {
            return Ok(());
        }
        if let Some(l) = self.out.liveness.as_ref() {
            if let Some(since) = l.silent_since().filter(|_| l.deadline().is_some_and(|d| now >= d)) {
                let silent_ms = since.elapsed().as_millis();
                return Err(Lost::new(FailureKind::HeartbeatTimeout, Cause::Silent { silent_ms }));
            }
        }
        if let Some(ft) = self.ft.as_ref() {
            let waiting_on_destination = self.out.liveness.as_ref().is_some_and(|l| l.silent_since().is_some());
            if let Some(stall) = ft.stall(now, waiting_on_destination) {
                return Err(Lost::new(FailureKind::CheckpointStalled, stall.into()));
            }
        }
        Ok(())
    }

    /// Acts on one queued reply; returns the destination's stats when it completed.
    async fn handle(&mut self, queued: Queued) -> Result<Option<DestinationStats>, Lost> {
        let Queued { at, reply, _room } = queued;
        self.handle_reply(at, reply)
    }

    /// Acts on what the checkpoint stager did: ack commits, give credit back.
    async fn on_checkpoint(&mut self, event: stager::Event) -> Result<(), Lost> {
        let Some(ft) = &mut self.ft else { return Ok(()) };
        let send = ft.on_event(event).map_err(Lost::protocol)?;
        self.phases.progress().set_checkpoints_committed(ft.committed_epoch());
        for message in send {
            self.out.message(&message).await.map_err(Lost::from_write)?;
        }
        Ok(())
    }

    /// Acts on the stager's events that came meanwhile.
    async fn take_checkpoint_events(&mut self) -> Result<(), Lost> {
        while let Some(event) = self.ft.as_mut().and_then(FtSource::try_event) {
            self.on_checkpoint(event).await?;
        }
        Ok(())
    }

    fn handle_reply(&mut self, at: Instant, reply: Reply) -> Result<Option<DestinationStats>, Lost> {
        match reply {
            Reply::Resumed => self.resumed_at = Some(at),
            Reply::Complete(stats) => return Ok(Some(stats)),
            Reply::Gone(kind, reason) => return Err(Lost::new(kind, Cause::Reader(reason))),
            Reply::Aborted { reason, paused } => {
                return Err(Lost::new(FailureKind::ConnectionClosed, Cause::Aborted { reason, paused }));
            }
            // With PostCopyFT these go to the stager; without, they are not allowed.
            Reply::CheckpointPages(_) => return Err(Lost::protocol(Cause::PagesWithoutFt)),
            Reply::CheckpointCommit { epoch, pages, .. } => {
                return Err(Lost::protocol(Cause::CheckpointWithoutFt { epoch, pages }))
            }
            Reply::Finished if self.finishing() => self.phases.enter(Phase::Completed),
            Reply::Finished => return Err(Lost::protocol(Cause::FinishedEarly)),
        }
        Ok(None)
    }
}
