//! The source endpoint's phases, and the one place where it moves from one
//! to the next ([`Phases::enter`]). The two moves a cancel can stop go
//! through the migration's `Progress` first: the commit ([`Phases::commit`])
//! and PostCopyFT's hand-over ([`Phases::hand_over`]).

use crate::migration::error::MigrationError;
use crate::migration::progress::{CancelledFirst, Progress};
use std::sync::Arc;

/// Where the source endpoint of a migration is. Before `Postcopy` nothing is
/// committed: a failure or a cancel leaves the VM running here (`Failed`).
/// After it a cancel is refused, except with PostCopyFT until `Finishing`:
/// there it is a deliberate failover (`DestinationLost`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connecting to the destination agent: greeting, `Begin`, `Ready`.
    Connecting,
    /// Pre-copy and hybrid: copy rounds while the VM runs here.
    Precopy,
    /// The VM is stopped; its state went out in `Switchover`; waiting for `Restored`.
    Switchover,
    /// Committed (`Go` went out; no cancel came first): the push, requested pages first.
    Postcopy,
    /// `AllSent` went out; waiting for `Complete`.
    Draining,
    /// PostCopyFT: `Finish` went out (no cancel came first); waiting for `Finished`.
    Finishing,
    /// The VM runs at the destination and the source let go of it.
    Completed,
    /// Before the commit (a failure, or a cancel: `MigrationError::Cancelled`): the VM runs here again.
    Failed,
    /// PostCopyFT: the destination was lost after the commit, or the operator
    /// cancelled (a deliberate failover); the VM is to be restored here from
    /// the last checkpoint (not before the lease allows).
    DestinationLost,
    /// The destination was lost after the commit and the VM cannot be restored here.
    LostAfterCommit,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 10] = [
        Phase::Connecting,
        Phase::Precopy,
        Phase::Switchover,
        Phase::Postcopy,
        Phase::Draining,
        Phase::Finishing,
        Phase::Completed,
        Phase::Failed,
        Phase::DestinationLost,
        Phase::LostAfterCommit,
    ];

    /// Whether the endpoint may go from `self` to `next` (docs/architecture.md,
    /// "The source's phases", draws this table).
    pub fn may_enter(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Connecting, Precopy | Switchover | Failed)
                | (Precopy, Switchover | Failed)
                | (Switchover, Postcopy | Failed)
                | (Postcopy, Draining)
                | (Draining, Finishing | Completed)
                | (Finishing, Completed)
                | (Postcopy | Draining | Finishing, DestinationLost | LostAfterCommit)
        )
    }

    /// Whether the switchover is committed (the destination may run the VM).
    pub fn committed(self) -> bool {
        matches!(
            self,
            Phase::Postcopy
                | Phase::Draining
                | Phase::Finishing
                | Phase::Completed
                | Phase::DestinationLost
                | Phase::LostAfterCommit
        )
    }

    /// Whether the endpoint ends here.
    pub fn ends(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::DestinationLost | Phase::LostAfterCommit)
    }

    /// The phase as a migration's progress names it (one of `metrics::PHASES`).
    pub fn progress_name(self) -> &'static str {
        match self {
            Phase::Connecting | Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Postcopy | Phase::Draining | Phase::Finishing => "postcopy",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::DestinationLost => "recovered",
            Phase::LostAfterCommit => "lost",
        }
    }
}

/// The source endpoint's current phase, and the progress it reports.
pub struct Phases {
    current: Phase,
    progress: Arc<Progress>,
}

impl Phases {
    /// An endpoint that starts `Connecting`.
    pub fn new(progress: Arc<Progress>) -> Phases {
        progress.set_phase(Phase::Connecting.progress_name());
        Phases { current: Phase::Connecting, progress }
    }

    pub fn current(&self) -> Phase {
        self.current
    }

    /// Where the endpoint reports its progress.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Moves to `next` (a transition not in [`Phase::may_enter`] is a bug;
    /// `Postcopy` and `Finishing` are entered only through [`Phases::commit`]
    /// and [`Phases::hand_over`]).
    pub fn enter(&mut self, next: Phase) {
        debug_assert!(self.current.may_enter(next), "source endpoint: {:?} → {next:?}", self.current);
        tracing::debug!(from = ?self.current, to = ?next, "source phase");
        if next.ends() {
            self.progress.end();
        }
        self.current = next;
        self.progress.set_phase(next.progress_name());
    }

    /// The commit point: enters `Postcopy`, unless a cancel came first (then
    /// nothing is committed, the phase stays, and the source must give up).
    pub fn commit(&mut self) -> Result<(), MigrationError> {
        self.progress.try_commit().map_err(|CancelledFirst| MigrationError::Cancelled)?;
        self.enter(Phase::Postcopy);
        Ok(())
    }

    /// PostCopyFT's hand-over: enters `Finishing`, unless a cancel came first
    /// (then the source fails over instead, on purpose).
    pub fn hand_over(&mut self) -> Result<(), CancelledFirst> {
        self.progress.try_hand_over()?;
        self.enter(Phase::Finishing);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_after_the_commit_goes_back_to_failed() {
        use Phase::*;
        let all = Phase::ALL;
        for from in all {
            for to in all {
                if from.may_enter(to) {
                    assert!(!from.committed() || to.committed(), "{from:?} → {to:?}");
                    assert!(to != Failed || !from.committed(), "{from:?} → {to:?}");
                }
            }
            assert!(!from.may_enter(from), "{from:?} stays");
        }
        assert!(!Switchover.may_enter(DestinationLost), "PostCopyFT fails over only after the commit");
    }

    #[test]
    fn a_cancel_before_the_commit_keeps_the_endpoint_uncommitted() {
        use crate::migration::progress::{CancelAnswer, CancelRefused, CommitPoint};
        use crate::wire::payload::Mode;
        let progress = Arc::new(Progress::new(Mode::PostcopyFt));
        let mut phases = Phases::new(Arc::clone(&progress));
        phases.enter(Phase::Switchover);
        assert_eq!(progress.request_cancel(), Ok(CancelAnswer::WillAbort));
        assert!(matches!(phases.commit(), Err(MigrationError::Cancelled)));
        assert_eq!(phases.current(), Phase::Switchover, "nothing committed");
        phases.enter(Phase::Failed);
        assert_eq!(progress.commit_point(), CommitPoint::Ended { cancelled: true });
        assert_eq!(progress.phase(), "failed");

        // PostCopyFT after the commit: the hand-over is refused to a cancel that came first.
        let progress = Arc::new(Progress::new(Mode::PostcopyFt));
        let mut phases = Phases::new(Arc::clone(&progress));
        phases.enter(Phase::Switchover);
        phases.commit().expect("no cancel yet");
        phases.enter(Phase::Draining);
        assert_eq!(progress.request_cancel(), Ok(CancelAnswer::WillFailOver));
        assert_eq!(phases.hand_over(), Err(CancelledFirst));
        assert_eq!(phases.current(), Phase::Draining, "Finish never goes out");
        phases.enter(Phase::DestinationLost);
        assert_eq!(progress.request_cancel(), Err(CancelRefused::AlreadyEnding));
    }

    #[test]
    fn the_diagram_in_the_docs_is_this_table() {
        crate::migration::diagrams::assert_drawn("### The source's phases", &Phase::ALL, Phase::may_enter);
    }
}
