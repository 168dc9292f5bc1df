//! `Switchover`: stop the VM, send what the mode needs and its state, and wait
//! until the destination has rebuilt the VM (`Restored`).

use crate::migration::error::MigrationError;
use crate::migration::source::answer::{expect, unexpected};
use crate::migration::source::connect::Link;
use crate::migration::source::precopy::{Rounds, COPY_BATCH_PAGES};
use crate::migration::source::request::MigrateOut;
use crate::vmm::memory::GuestMemory;
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::Mode;
use std::time::Instant;

/// What the stop left for the commit and post-copy.
pub struct Stopped {
    pub paused_at: Instant,
    /// The VM's state at the switchover (postcard `MachineState`).
    pub state: Vec<u8>,
    /// Dirty at the stop (pre-copy: sent before the switchover; hybrid: dropped at the switchover).
    pub final_dirty: Vec<u64>,
    /// Hybrid: pages dropped at the destination while the VM still ran here.
    pub discarded: Vec<u64>,
}

/// Pauses the VM, sends the last dirty pages (pre-copy) and `Switchover`,
/// and waits for `Restored`.
pub async fn stop_and_switch(
    req: &MigrateOut<'_>,
    link: &mut Link,
    memory: &GuestMemory,
    rounds: Rounds,
) -> Result<Stopped, MigrationError> {
    let vm = MigrationError::vm;
    let (runner, mode) = (req.runner, req.mode);
    let Rounds { mut dirty, discarded } = rounds;
    let paused_at = Instant::now();
    runner.pause().await.map_err(vm)?;
    let paused_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    if mode.precopies() {
        dirty.extend(runner.take_dirty_pages().await.map_err(vm)?);
        dirty.sort_unstable();
        dirty.dedup();
        runner.set_dirty_logging(false).await.map_err(vm)?;
    }
    if mode == Mode::Precopy {
        link.out.pages(memory, &dirty, COPY_BATCH_PAGES).await?;
    }
    let captured_at = Instant::now();
    let state = runner.capture().await.map_err(vm)?.to_bytes();
    let capture_ms = captured_at.elapsed().as_secs_f64() * 1e3;
    let stale = if mode == Mode::Hybrid { dirty.clone() } else { Vec::new() };
    let (state_bytes, stale_pages) = (state.len(), stale.len());
    link.out.message(&MigrationMessage::Switchover { state: state.clone(), stale }).await?;
    let sent_at = Instant::now();
    let restored = expect(&mut link.rd, "restored", req.reply_timeout()).await?;
    tracing::debug!(
        paused_ms,
        capture_ms,
        state_bytes,
        stale_pages,
        restore_ms = sent_at.elapsed().as_secs_f64() * 1e3,
        since_pause_ms = paused_at.elapsed().as_secs_f64() * 1e3,
        "switchover"
    );
    match restored {
        MigrationMessage::Restored => Ok(Stopped { paused_at, state, final_dirty: dirty, discarded }),
        other => Err(unexpected(&other)),
    }
}
