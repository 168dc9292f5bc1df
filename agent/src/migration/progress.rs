//! How far an outgoing migration has got, as the migration itself reports it:
//! the source endpoint updates a [`Progress`] as it goes, and whoever shows it
//! (the daemon's status) reads it, instead of reading the metrics back.

use crate::metrics::PHASES;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Progress of one outgoing migration, shared between the migration and its readers.
#[derive(Debug)]
pub struct Progress {
    /// Index into [`PHASES`]: the phase as `pcft_migration_phase` names it.
    phase: AtomicUsize,
    pages_sent: AtomicU64,
    checkpoints_committed: AtomicU64,
    started_at: Instant,
}

impl Progress {
    /// A migration that starts now, in the `precopy` phase (the name status
    /// shows before a migration has reported anything).
    pub fn new() -> Progress {
        Progress {
            phase: AtomicUsize::new(0),
            pages_sent: AtomicU64::new(0),
            checkpoints_committed: AtomicU64::new(0),
            started_at: Instant::now(),
        }
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
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reports_what_the_migration_set() {
        let progress = Progress::new();
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
}
