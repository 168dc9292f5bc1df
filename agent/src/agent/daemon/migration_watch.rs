//! One outgoing migration as the daemon keeps it: where it goes, how far it
//! got, and, once it ended, the answer `pcft migrate` gets — kept so that an
//! operator can leave (`--detach`, Ctrl-C) and come back (`pcft migration
//! status|wait`), and so that a migration runs on in the agent whoever waits.

use crate::migration::progress::Progress;
use crate::wire::control::ControlMessage;
use crate::wire::payload::{MigrationProgress, MigrationState, MigrationStatus, Mode};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// An outgoing migration, running or ended.
#[derive(Debug)]
pub struct MigrationWatch {
    pub to: String,
    pub mode: Mode,
    pub progress: Arc<Progress>,
    /// Where it is, and why it ended the way it did (for failures and cancels).
    state: Mutex<(MigrationState, Option<String>)>,
    /// The answer `Migrate` gets, once the migration ended.
    answer: watch::Sender<Option<ControlMessage>>,
}

impl MigrationWatch {
    pub fn new(to: String, mode: Mode, progress: Arc<Progress>) -> MigrationWatch {
        MigrationWatch {
            to,
            mode,
            progress,
            state: Mutex::new((MigrationState::Running, None)),
            answer: watch::Sender::new(None),
        }
    }

    pub fn state(&self) -> MigrationState {
        self.state.lock().expect("migration state lock").0
    }

    /// A cancel was accepted: the migration is ending.
    pub fn cancelling(&self) {
        let mut state = self.state.lock().expect("migration state lock");
        if state.0 == MigrationState::Running {
            state.0 = MigrationState::Cancelling;
        }
    }

    /// The migration ended in `state` (`reason`: why, for a failure or a
    /// cancel); `answer` is what its waiters get.
    pub fn end(&self, state: MigrationState, reason: Option<String>, answer: ControlMessage) {
        *self.state.lock().expect("migration state lock") = (state, reason);
        self.answer.send_replace(Some(answer));
    }

    /// Waits until the migration ends (at most `timeout`) and returns its
    /// answer; None if it was still running then.
    pub async fn wait(&self, timeout: Option<Duration>) -> Option<ControlMessage> {
        let mut answers = self.answer.subscribe();
        let ended = answers.wait_for(Option::is_some);
        let answer = match timeout {
            Some(timeout) => tokio::time::timeout(timeout, ended).await.ok()?,
            None => ended.await,
        };
        // The sender lives as long as `self`, so the channel cannot close under us.
        answer.ok().and_then(|a| a.clone())
    }

    /// As `pcft migration status` shows it, for VM `vm` of `mem_bytes`.
    pub fn status(&self, vm: &str, mem_bytes: u64) -> MigrationStatus {
        let (state, reason) = self.state.lock().expect("migration state lock").clone();
        MigrationStatus {
            vm: vm.to_string(),
            to: self.to.clone(),
            mode: self.mode,
            state,
            progress: progress_of(&self.progress, mem_bytes),
            reason,
        }
    }
}

/// How far an outgoing migration has got, as it reports itself.
pub fn progress_of(progress: &Progress, mem_bytes: u64) -> MigrationProgress {
    MigrationProgress {
        phase: progress.phase().to_string(),
        pages_sent: progress.pages_sent(),
        pages_total: mem_bytes / crate::vmm::memory::PAGE_SIZE,
        checkpoints_committed: progress.checkpoints_committed(),
        elapsed_ms: progress.started_at().elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_gets_the_answer_whether_it_came_before_or_after_the_end() {
        let watch = Arc::new(MigrationWatch::new("b".into(), Mode::Postcopy, Arc::new(Progress::new(Mode::Postcopy))));
        assert_eq!(watch.wait(Some(Duration::from_millis(10))).await, None, "still running");
        let early = tokio::spawn({
            let watch = Arc::clone(&watch);
            async move { watch.wait(None).await }
        });
        tokio::task::yield_now().await;
        watch.cancelling();
        assert_eq!(watch.state(), MigrationState::Cancelling);
        watch.end(MigrationState::Cancelled, Some("asked".into()), ControlMessage::Ok);
        assert_eq!(early.await.unwrap(), Some(ControlMessage::Ok));
        assert_eq!(watch.wait(None).await, Some(ControlMessage::Ok), "a late waiter too");
        let status = watch.status("vm", 1 << 20);
        assert_eq!(
            (status.state, status.reason.as_deref(), status.progress.pages_total),
            (MigrationState::Cancelled, Some("asked"), 256)
        );
        // An ended migration is not set back to cancelling.
        watch.cancelling();
        assert_eq!(watch.state(), MigrationState::Cancelled);
    }
}
