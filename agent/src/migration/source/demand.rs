//! The source's demand channel (QEMU's postcopy-preempt channel): a second
//! connection to the destination that carries the pages it asked for and
//! nothing else, written by a task of its own. So a requested page never
//! waits behind the background push, neither in this agent (the post-copy
//! loop may be blocked writing a push batch) nor in the sockets (megabytes
//! of pushed pages queue there). The push and this task share the unsent
//! set ([`DemandClaims`]): a page goes out once, by whichever takes it first.
//! A page taken here is in the destination before this channel closes, and
//! `AllSent` goes out only after that (see [`DemandSender::finish`]).

use crate::metrics::{self, PageReason};
use crate::migration::error::MigrationError;
use crate::migration::postcopy::push::{DemandClaims, PUSH_BATCH_PAGES};
use crate::migration::progress::Progress;
use crate::migration::source::outbox::Outbox;
use crate::vmm::memory::GuestMemory;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// What went out on the demand channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DemandSent {
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

/// The demand channel's writer task.
pub struct DemandSender {
    task: Option<JoinHandle<Result<DemandSent, MigrationError>>>,
    finish: Option<oneshot::Sender<()>>,
}

/// What the task needs to send pages.
pub struct DemandWork {
    pub out: Outbox,
    pub memory: Arc<GuestMemory>,
    /// The destination's page requests (from the reply reader).
    pub requests: mpsc::UnboundedReceiver<Vec<u64>>,
    pub claims: DemandClaims,
    pub vm: String,
    pub progress: Arc<Progress>,
}

impl DemandSender {
    /// Starts serving page requests on the demand channel.
    pub fn start(work: DemandWork) -> DemandSender {
        let (finish, finish_rx) = oneshot::channel();
        let task = tokio::spawn(serve(work, finish_rx));
        DemandSender { task: Some(task), finish: Some(finish) }
    }

    /// Whether the task ended before it was told to (its connection failed).
    pub fn failed(&self) -> bool {
        self.task.as_ref().is_some_and(JoinHandle::is_finished)
    }

    /// Serves what was asked for meanwhile, closes the channel (the
    /// destination reads it to its end) and says what went out. Every page is
    /// claimed by then (the push found none left), so nothing more is asked of it.
    pub async fn finish(&mut self) -> Result<DemandSent, MigrationError> {
        if let Some(finish) = self.finish.take() {
            let _ = finish.send(());
        }
        let Some(task) = self.task.take() else {
            return Err(MigrationError::Unexpected("a demand channel finished twice".into()));
        };
        match task.await {
            Ok(sent) => sent,
            Err(e) => Err(MigrationError::Unexpected(format!("the demand channel's task ended: {e}"))),
        }
    }

    /// Stops the task and waits until it has (no page is read from guest memory after this).
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for DemandSender {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn serve(mut work: DemandWork, mut finish: oneshot::Receiver<()>) -> Result<DemandSent, MigrationError> {
    let mut sent = DemandSent::default();
    loop {
        tokio::select! {
            biased;
            request = work.requests.recv() => match request {
                Some(gpas) => send(&mut work, &gpas, &mut sent).await?,
                // The reply reader is gone: the loop sees why; nothing more will be asked.
                None => break,
            },
            _ = &mut finish => break,
        }
    }
    while let Ok(gpas) = work.requests.try_recv() {
        send(&mut work, &gpas, &mut sent).await?;
    }
    work.out.close().await?;
    sent.bytes = work.out.bytes;
    Ok(sent)
}

/// Sends the requested pages that are still unsent.
async fn send(work: &mut DemandWork, gpas: &[u64], sent: &mut DemandSent) -> Result<(), MigrationError> {
    let pages = work.claims.claim(gpas);
    if pages.is_empty() {
        return Ok(());
    }
    let zero_before = work.out.zero_pages;
    work.out.paused_pages(&work.memory, &pages, PUSH_BATCH_PAGES).await?;
    sent.pages += pages.len() as u64;
    sent.zero_pages += work.out.zero_pages - zero_before;
    metrics::get().pages_sent(&work.vm, PageReason::faulted, pages.len() as u64);
    work.progress.add_pages_sent(pages.len() as u64);
    Ok(())
}
