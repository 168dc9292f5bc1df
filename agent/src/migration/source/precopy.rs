//! `Precopy`: copy rounds while the VM runs here (pre-copy and hybrid).
//!
//! Pre-copy re-sends dirty pages round after round. Hybrid sends the full copy
//! once; after that, pages dirtied again are not re-sent but dropped at the
//! destination (`Discard`) while the VM still runs here, round after round
//! until a round is small, so that the switchover has little left to drop and
//! the dropped pages move in post-copy.

use crate::metrics::{self, PageReason};
use crate::migration::error::MigrationError;
use crate::migration::source::answer::{expect, unexpected};
use crate::migration::source::connect::Link;
use crate::migration::source::request::MigrateOut;
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{MigrationReport, Mode};

/// Pages per batch frame of the pre-copy rounds.
pub const COPY_BATCH_PAGES: usize = 256;

/// What the copy rounds leave for the switchover.
#[derive(Default)]
pub struct Rounds {
    /// Dirty after the last round (dirty logging still on).
    pub dirty: Vec<u64>,
    /// Hybrid: pages dropped at the destination while the VM still ran here.
    pub discarded: Vec<u64>,
}

/// Runs the copy rounds until a round is small (`converge_pages`) or
/// `max_rounds`; leaves dirty logging on for the switchover.
pub async fn copy_rounds(
    req: &MigrateOut<'_>,
    link: &mut Link,
    memory: &GuestMemory,
    report: &mut MigrationReport,
) -> Result<Rounds, MigrationError> {
    let vm = MigrationError::vm;
    let (runner, options) = (req.runner, req.options);
    let mut rounds = Rounds::default();
    runner.set_dirty_logging(true).await.map_err(vm)?;
    let all: Vec<u64> = (0..memory.size()).step_by(PAGE_SIZE as usize).collect();
    link.out.pages(memory, &all, COPY_BATCH_PAGES).await?;
    pages_sent(req, &report.vm, all.len() as u64);
    report.rounds = 1;
    loop {
        rounds.dirty = runner.take_dirty_pages().await.map_err(vm)?;
        if rounds.dirty.len() as u64 <= options.converge_pages || report.rounds >= options.max_rounds {
            break;
        }
        if req.mode == Mode::Hybrid {
            link.out.message(&MigrationMessage::Discard { gpas: rounds.dirty.clone() }).await?;
            match expect(&mut link.rd, "discarded", req.reply_timeout()).await? {
                MigrationMessage::Discarded => rounds.discarded.append(&mut rounds.dirty),
                other => return Err(unexpected(&other)),
            }
        } else {
            link.out.pages(memory, &rounds.dirty, COPY_BATCH_PAGES).await?;
            pages_sent(req, &report.vm, rounds.dirty.len() as u64);
        }
        report.rounds += 1;
    }
    Ok(rounds)
}

/// Counts pre-copy pages in the metrics and the migration's progress.
fn pages_sent(req: &MigrateOut<'_>, vm: &str, pages: u64) {
    metrics::get().pages_sent(vm, PageReason::precopy, pages);
    req.progress.add_pages_sent(pages);
}
