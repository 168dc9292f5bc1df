//! How far an outgoing migration has got, as the migration itself reports it,
//! and whether it can still be cancelled: the source endpoint updates a
//! [`Progress`] as it goes, and whoever shows it (the daemon's status) reads
//! it, instead of reading the metrics back.
//!
//! A cancel request ([`Progress::request_cancel`]) and the source's commit
//! point ([`Progress::try_commit`]; PostCopyFT's hand-over,
//! [`Progress::try_hand_over`]) decide on one state under one lock
//! ([`CommitPoint`]), so each cancel is answered for what then happens: one
//! answered [`CancelAnswer::WillAbort`] means the switchover never commits,
//! and one refused [`CancelRefused::PastCommit`] means it did.

use crate::metrics::PHASES;
use crate::wire::payload::Mode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::Notify;

/// What a cancel request will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelAnswer {
    /// Before the commit point: the migration stops, the VM keeps running at the source.
    WillAbort,
    /// PostCopyFT after the commit point: the source fences the destination and restores its last committed checkpoint (a deliberate failover).
    WillFailOver,
}

/// Why a cancel is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    /// post-copy / hybrid / pre-copy after the commit point: the destination runs the only copy.
    #[error(
        "the switchover committed, the VM now runs only at the destination; cancelling would lose it. Let the migration finish, or use --mode postcopy-ft to be able to cancel after the switchover"
    )]
    PastCommit,
    /// The migration is already ending (completed, failing over, failed, or a cancel was already asked).
    #[error(
        "the migration is already ending (it is completing, failing over or has failed, or a cancel was already asked): there is nothing left to cancel"
    )]
    AlreadyEnding,
}

/// The source passed no commit point: a cancel was asked first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a cancel was asked first")]
pub struct CancelledFirst;

/// Where a migration stands for a cancel: one state, changed only under
/// [`Progress`]'s lock, by a cancel request or by the source endpoint.
///
/// ```text
///   Open ──cancel: WillAbort──▶ AbortAsked ········ try_commit refused
///    │ try_commit
///    ▼
///   Committed ──cancel (PostCopyFT): WillFailOver──▶ FailOverAsked ····· try_hand_over refused
///    │          (other modes: PastCommit, no change)
///    │ try_hand_over (PostCopyFT)
///    ▼
///   HandingOver                     every state ──end──▶ Ended
/// ```
///
/// `AbortAsked`, `FailOverAsked`, `HandingOver` and `Ended` answer any
/// cancel [`CancelRefused::AlreadyEnding`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitPoint {
    /// Before the commit point, no cancel asked: a cancel aborts the migration.
    Open,
    /// Before the commit point, a cancel was asked: the commit is refused; the
    /// source gives up and the VM runs on there.
    AbortAsked,
    /// The switchover committed (`Go` goes out): the destination may run the VM.
    Committed,
    /// PostCopyFT, committed: a cancel was asked; the source stops renewing
    /// the destination's lease and fails over once it has run out. It never
    /// hands the VM over.
    FailOverAsked,
    /// PostCopyFT: `Finish` goes out, the destination may take the VM for good.
    HandingOver,
    /// The source endpoint is ending (completed, failing over after a loss,
    /// failed, or acting on a cancel). `cancelled`: a cancel was accepted.
    Ended { cancelled: bool },
}

/// Progress of one outgoing migration, shared between the migration and its readers.
#[derive(Debug)]
pub struct Progress {
    mode: Mode,
    /// Index into [`PHASES`]: the phase as `pcft_migration_phase` names it.
    phase: AtomicUsize,
    pages_sent: AtomicU64,
    checkpoints_committed: AtomicU64,
    started_at: Instant,
    commit_point: Mutex<CommitPoint>,
    /// Wakes the source endpoint's waits when a cancel is accepted.
    cancel: Notify,
}

impl Progress {
    /// A migration in `mode` that starts now, in the `precopy` phase (the name
    /// status shows before a migration has reported anything), not committed.
    pub fn new(mode: Mode) -> Progress {
        Progress {
            mode,
            phase: AtomicUsize::new(0),
            pages_sent: AtomicU64::new(0),
            checkpoints_committed: AtomicU64::new(0),
            started_at: Instant::now(),
            commit_point: Mutex::new(CommitPoint::Open),
            cancel: Notify::new(),
        }
    }

    /// The migration's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The phase, one of [`PHASES`] (`precopy`, `switchover`, `postcopy`, then how it ended).
    pub fn phase(&self) -> &'static str {
        PHASES[self.phase.load(Ordering::Relaxed)]
    }

    /// Enters `phase` (a name not in [`PHASES`] is ignored).
    pub fn set_phase(&self, phase: &str) {
        if let Some(index) = PHASES.iter().position(|p| *p == phase) {
            self.phase.store(index, Ordering::Relaxed);
        }
    }

    /// Pages sent to the destination (pre-copy rounds, the push, and demand), as the metrics count them.
    pub fn pages_sent(&self) -> u64 {
        self.pages_sent.load(Ordering::Relaxed)
    }

    /// `pages` more pages went out.
    pub fn add_pages_sent(&self, pages: u64) {
        self.pages_sent.fetch_add(pages, Ordering::Relaxed);
    }

    /// PostCopyFT: checkpoint epochs committed at the source.
    pub fn checkpoints_committed(&self) -> u64 {
        self.checkpoints_committed.load(Ordering::Relaxed)
    }

    /// PostCopyFT: epochs up to `epoch` are committed.
    pub fn set_checkpoints_committed(&self, epoch: u64) {
        self.checkpoints_committed.fetch_max(epoch, Ordering::Relaxed);
    }

    /// When the migration started.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    fn commit_point_mut(&self) -> MutexGuard<'_, CommitPoint> {
        // Every change is one assignment: a panic elsewhere leaves a whole state.
        self.commit_point.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where the migration stands for a cancel.
    pub fn commit_point(&self) -> CommitPoint {
        *self.commit_point_mut()
    }

    /// Asks to cancel the migration; the answer says what will happen, and
    /// holds: decided under the lock the source's commit point takes too.
    pub fn request_cancel(&self) -> Result<CancelAnswer, CancelRefused> {
        let answer = {
            let mut state = self.commit_point_mut();
            let (next, answer) = match *state {
                CommitPoint::Open => (CommitPoint::AbortAsked, Ok(CancelAnswer::WillAbort)),
                CommitPoint::Committed if self.mode.checkpoints() => {
                    (CommitPoint::FailOverAsked, Ok(CancelAnswer::WillFailOver))
                }
                CommitPoint::Committed => (CommitPoint::Committed, Err(CancelRefused::PastCommit)),
                now @ (CommitPoint::AbortAsked
                | CommitPoint::FailOverAsked
                | CommitPoint::HandingOver
                | CommitPoint::Ended { .. }) => (now, Err(CancelRefused::AlreadyEnding)),
            };
            *state = next;
            answer
        };
        if answer.is_ok() {
            self.cancel.notify_waiters();
        }
        answer
    }

    /// Whether a cancel was accepted (it is being, or was, carried out).
    pub fn cancel_requested(&self) -> bool {
        matches!(
            self.commit_point(),
            CommitPoint::AbortAsked | CommitPoint::FailOverAsked | CommitPoint::Ended { cancelled: true }
        )
    }

    /// Resolves once a cancel is accepted that the source must act on (at once
    /// if one already is): before the commit, abort; after it (PostCopyFT), fail over.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.cancel.notified();
            tokio::pin!(notified);
            // Registered before the state is read: a cancel after the read wakes it.
            notified.as_mut().enable();
            if matches!(self.commit_point(), CommitPoint::AbortAsked | CommitPoint::FailOverAsked) {
                return;
            }
            notified.await;
        }
    }

    /// The source's commit point: committed unless a cancel came first (then
    /// nothing is committed, and the source must give up).
    pub fn try_commit(&self) -> Result<(), CancelledFirst> {
        let mut state = self.commit_point_mut();
        debug_assert!(matches!(*state, CommitPoint::Open | CommitPoint::AbortAsked), "commit from {:?}", *state);
        match *state {
            CommitPoint::Open => {
                *state = CommitPoint::Committed;
                Ok(())
            }
            _ => Err(CancelledFirst),
        }
    }

    /// PostCopyFT's hand-over (`Finish`): from here no cancel can fail over,
    /// unless one came first (then the source fails over instead).
    pub fn try_hand_over(&self) -> Result<(), CancelledFirst> {
        let mut state = self.commit_point_mut();
        debug_assert!(
            matches!(*state, CommitPoint::Committed | CommitPoint::FailOverAsked),
            "hand-over from {:?}",
            *state
        );
        match *state {
            CommitPoint::Committed => {
                *state = CommitPoint::HandingOver;
                Ok(())
            }
            _ => Err(CancelledFirst),
        }
    }

    /// The source endpoint is ending: no cancel can change how from here.
    pub fn end(&self) {
        let mut state = self.commit_point_mut();
        let cancelled = matches!(
            *state,
            CommitPoint::AbortAsked | CommitPoint::FailOverAsked | CommitPoint::Ended { cancelled: true }
        );
        *state = CommitPoint::Ended { cancelled };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CancelAnswer::*;
    use CancelRefused::*;

    const ALL_MODES: [Mode; 4] = [Mode::Precopy, Mode::Postcopy, Mode::Hybrid, Mode::PostcopyFt];

    #[test]
    fn progress_reports_what_the_migration_set() {
        let progress = Progress::new(Mode::Postcopy);
        assert_eq!(progress.phase(), "precopy");
        progress.set_phase("postcopy");
        progress.set_phase("no such phase");
        assert_eq!(progress.phase(), "postcopy");
        progress.add_pages_sent(3);
        progress.add_pages_sent(4);
        progress.set_checkpoints_committed(2);
        progress.set_checkpoints_committed(1);
        assert_eq!((progress.pages_sent(), progress.checkpoints_committed()), (7, 2));
    }

    #[test]
    fn a_cancel_before_the_commit_aborts_and_the_commit_is_refused() {
        for mode in ALL_MODES {
            let progress = Progress::new(mode);
            assert!(!progress.cancel_requested());
            assert_eq!(progress.request_cancel(), Ok(WillAbort), "{mode:?}");
            assert!(progress.cancel_requested());
            assert_eq!(progress.try_commit(), Err(CancelledFirst), "{mode:?}: the switchover must not commit");
            assert_eq!(progress.request_cancel(), Err(AlreadyEnding), "{mode:?}: asked twice");
            progress.end();
            assert_eq!(progress.commit_point(), CommitPoint::Ended { cancelled: true });
            assert!(progress.cancel_requested(), "{mode:?}: the end remembers the cancel");
            assert_eq!(progress.request_cancel(), Err(AlreadyEnding));
        }
    }

    #[test]
    fn after_the_commit_a_cancel_is_refused_unless_postcopy_ft_which_fails_over() {
        for mode in [Mode::Precopy, Mode::Postcopy, Mode::Hybrid] {
            let progress = Progress::new(mode);
            assert_eq!(progress.try_commit(), Ok(()));
            assert_eq!(progress.request_cancel(), Err(PastCommit), "{mode:?}");
            assert_eq!(progress.request_cancel(), Err(PastCommit), "{mode:?}: refused, so nothing changed");
            assert!(!progress.cancel_requested());
            assert!(PastCommit.to_string().contains("--mode postcopy-ft"), "{}", PastCommit);
            progress.end();
            assert_eq!(progress.commit_point(), CommitPoint::Ended { cancelled: false });
        }
        let progress = Progress::new(Mode::PostcopyFt);
        assert_eq!(progress.try_commit(), Ok(()));
        assert_eq!(progress.request_cancel(), Ok(WillFailOver));
        assert!(progress.cancel_requested());
        assert_eq!(progress.try_hand_over(), Err(CancelledFirst), "a source failing over never hands the VM over");
        assert_eq!(progress.request_cancel(), Err(AlreadyEnding));
    }

    #[test]
    fn postcopy_ft_cannot_be_cancelled_once_the_hand_over_began_nor_once_ended() {
        let progress = Progress::new(Mode::PostcopyFt);
        progress.try_commit().unwrap();
        assert_eq!(progress.try_hand_over(), Ok(()));
        assert_eq!(progress.request_cancel(), Err(AlreadyEnding));
        assert!(!progress.cancel_requested());
        for committed in [false, true] {
            let progress = Progress::new(Mode::PostcopyFt);
            if committed {
                progress.try_commit().unwrap();
            }
            // A failure (or the end of the loop after a lost destination) ends it.
            progress.end();
            assert_eq!(progress.request_cancel(), Err(AlreadyEnding), "committed: {committed}");
            assert!(!progress.cancel_requested());
        }
    }

    #[tokio::test]
    async fn the_source_wakes_on_an_accepted_cancel_only() {
        use std::sync::Arc;
        use std::time::Duration;
        let progress = Arc::new(Progress::new(Mode::PostcopyFt));
        let waiting = tokio::spawn({
            let progress = Arc::clone(&progress);
            async move { progress.cancelled().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        progress.try_commit().unwrap();
        assert!(!waiting.is_finished());
        assert_eq!(progress.request_cancel(), Ok(WillFailOver));
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").unwrap();
        // Already asked: at once.
        tokio::time::timeout(Duration::from_secs(5), progress.cancelled()).await.expect("at once");
        // A refused cancel wakes nothing.
        let refused = Progress::new(Mode::Postcopy);
        refused.try_commit().unwrap();
        assert_eq!(refused.request_cancel(), Err(PastCommit));
        assert!(tokio::time::timeout(Duration::from_millis(50), refused.cancelled()).await.is_err());
    }

    /// A cancel and the commit point raced from two threads, many times: the
    /// answer always matches what the source did. The threads go in lockstep
    /// (each round starts both at once, on a spinning flag), the commit from at
    /// once to a few microseconds later, so that on two free CPUs the calls of
    /// a round land within a fraction of a microsecond of each other, in both
    /// orders. One round in 16 each is surely in one order or the other.
    #[test]
    fn a_cancel_racing_the_commit_is_answered_for_what_happened() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        const ROUNDS: usize = 20_000;
        fn spin_until(what: impl Fn() -> bool) {
            let mut spins = 0u32;
            while !what() {
                spins += 1;
                if spins.is_multiple_of(1024) {
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
        }
        for mode in [Mode::Postcopy, Mode::PostcopyFt] {
            let rounds: Arc<Vec<Progress>> = Arc::new((0..ROUNDS).map(|_| Progress::new(mode)).collect());
            // Rounds the canceller is ready for, may begin, and has finished.
            let [ready, started, done] = [(); 3].map(|()| Arc::new(AtomicUsize::new(0)));
            let canceller = std::thread::spawn({
                let (rounds, ready, started, done) =
                    (Arc::clone(&rounds), Arc::clone(&ready), Arc::clone(&started), Arc::clone(&done));
                move || {
                    let mut answers = Vec::with_capacity(ROUNDS);
                    for (round, progress) in rounds.iter().enumerate() {
                        ready.store(round + 1, Ordering::Release);
                        spin_until(|| started.load(Ordering::Acquire) > round);
                        answers.push(progress.request_cancel());
                        done.store(round + 1, Ordering::Release);
                    }
                    answers
                }
            });
            let mut commits = Vec::with_capacity(ROUNDS);
            for (round, progress) in rounds.iter().enumerate() {
                spin_until(|| ready.load(Ordering::Acquire) > round);
                match round % 16 {
                    // Surely in one order, and surely in the other.
                    0 => {
                        started.store(round + 1, Ordering::Release);
                        spin_until(|| done.load(Ordering::Acquire) > round);
                        commits.push(progress.try_commit());
                    }
                    1 => {
                        commits.push(progress.try_commit());
                        started.store(round + 1, Ordering::Release);
                    }
                    // A race: both threads spin (on two CPUs, when the host
                    // gives them) as it starts; the commit from at once to a
                    // few microseconds after the canceller starts.
                    _ => {
                        started.store(round + 1, Ordering::Release);
                        for _ in 0..round % 1024 {
                            std::hint::spin_loop();
                        }
                        commits.push(progress.try_commit());
                    }
                }
                spin_until(|| done.load(Ordering::Acquire) > round);
            }
            let answers = canceller.join().unwrap();
            let (mut aborted, mut after) = (0, 0);
            for (round, (answer, committed)) in answers.into_iter().zip(commits).enumerate() {
                match (answer, committed) {
                    (Ok(WillAbort), Err(CancelledFirst)) => aborted += 1,
                    (Err(PastCommit), Ok(())) if !mode.checkpoints() => after += 1,
                    (Ok(WillFailOver), Ok(())) if mode.checkpoints() => after += 1,
                    other => panic!("{mode:?}, round {round}: the answer and the commit disagree: {other:?}"),
                }
            }
            assert!(aborted >= ROUNDS / 16 && after >= ROUNDS / 16, "{mode:?}: {aborted} aborted, {after} after");
        }
    }
}
