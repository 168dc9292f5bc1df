//! Fault injection for tests and the demo: `pcft agent --crash-at POINT` makes
//! a destination agent kill itself with SIGKILL (a real crash: no cleanup, no
//! goodbye on the socket) at a named point of a PostCopyFT migration; with
//! `--crash-signal stop` it freezes itself with SIGSTOP there instead (a hung
//! host that may wake up later: what fencing is for); with `stall` only its
//! checkpointer hangs there while the rest of it (heartbeats, page requests)
//! goes on: a gray failure that only a progress check finds; with
//! `stall-fence` it goes silent there (writes nothing more to the source) and
//! its vCPU threads and lease watchdog stall at their worst moments (see
//! `crate::fault`): the fence must stop the guest on time all the same.

use std::sync::OnceLock;

/// Where a destination agent crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after the VM resumed, before any checkpoint.
    BeforeFirstCheckpoint,
    /// In epoch N's speculative phase, after its first page frame went out.
    Speculative(u64),
    /// In epoch N's pause: the vCPUs stand still, nothing of the pause was sent.
    Pause(u64),
    /// Epoch N's pages went out and its commit record is ready: a crash,
    /// freeze or silence hits before the record is queued, so checkpoint N
    /// is in flight and never commits; a stall hits right after it is queued
    /// (it goes out; no epoch follows).
    Committed(u64),
    /// When the last page has arrived (on `AllSent`), before answering `Complete`.
    AfterLastPage,
    /// PostCopyFT's hand-over: `Finish` arrived and this agent took the VM,
    /// before it answers `Finished` (the source then hears nothing: `finish-unconfirmed`).
    AfterFinish,
}

/// A crash point or signal that does not parse (the message names the choices).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseCrashError {
    #[error("{0:?} is not an epoch number (1, 2, …)")]
    Epoch(String),
    #[error(
        "unknown crash point {0:?}: use before-first-checkpoint, speculative:N, pause:N, committed:N, after-last-page or after-finish"
    )]
    Point(String),
    #[error("unknown crash signal {0:?}: use kill, stop, stall or stall-fence")]
    Signal(String),
}

impl std::str::FromStr for CrashPoint {
    type Err = ParseCrashError;

    fn from_str(text: &str) -> Result<Self, ParseCrashError> {
        let epoch = |n: &str| n.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| ParseCrashError::Epoch(n.into()));
        match text.split_once(':') {
            None if text == "before-first-checkpoint" => Ok(CrashPoint::BeforeFirstCheckpoint),
            None if text == "after-last-page" => Ok(CrashPoint::AfterLastPage),
            None if text == "after-finish" => Ok(CrashPoint::AfterFinish),
            Some(("speculative", n)) => Ok(CrashPoint::Speculative(epoch(n)?)),
            Some(("pause", n)) => Ok(CrashPoint::Pause(epoch(n)?)),
            Some(("committed", n)) => Ok(CrashPoint::Committed(epoch(n)?)),
            _ => Err(ParseCrashError::Point(text.into())),
        }
    }
}

/// What happens at the crash point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashSignal {
    /// SIGKILL: the process dies.
    Kill,
    /// SIGSTOP: the process freezes until someone sends SIGCONT.
    Stop,
    /// The checkpointer hangs at the point (at `speculative:N`, `committed:N`
    /// or `before-first-checkpoint`); heartbeats go on.
    Stall,
    /// The agent goes silent at the point, and each vCPU thread stalls once
    /// between its fence check and `KVM_RUN`, the lease watchdog once too
    /// (for `pcft agent --stall-fence-ms`).
    StallFence,
}

impl std::str::FromStr for CrashSignal {
    type Err = ParseCrashError;

    fn from_str(text: &str) -> Result<Self, ParseCrashError> {
        match text {
            "kill" => Ok(CrashSignal::Kill),
            "stop" => Ok(CrashSignal::Stop),
            "stall" => Ok(CrashSignal::Stall),
            "stall-fence" => Ok(CrashSignal::StallFence),
            _ => Err(ParseCrashError::Signal(text.into())),
        }
    }
}

/// `--crash-signal stall` was asked for at a point the checkpointer never passes.
#[derive(Debug, thiserror::Error)]
#[error(
    "--crash-signal stall hangs the checkpointer: use it with speculative:N, committed:N or before-first-checkpoint, not {0:?}"
)]
pub struct StallOutsideCheckpointer(pub CrashPoint);

static CRASH_AT: OnceLock<(CrashPoint, CrashSignal)> = OnceLock::new();

/// Arms the crash point for this process (once). A stall can only be armed
/// where the checkpointer passes.
pub fn arm(point: CrashPoint, signal: CrashSignal) -> Result<(), StallOutsideCheckpointer> {
    let in_checkpointer =
        matches!(point, CrashPoint::BeforeFirstCheckpoint | CrashPoint::Speculative(_) | CrashPoint::Committed(_));
    if signal == CrashSignal::Stall && !in_checkpointer {
        return Err(StallOutsideCheckpointer(point));
    }
    let _ = CRASH_AT.set((point, signal));
    Ok(())
}

/// Kills (or freezes) this process if `point` is the armed one.
pub fn at(point: CrashPoint) {
    match CRASH_AT.get() {
        Some(&(armed, CrashSignal::StallFence)) if armed == point => crate::fault::trigger_stall_fence(),
        Some(&(armed, signal)) if armed == point && signal != CrashSignal::Stall => {
            tracing::warn!(?point, ?signal, "crash point reached");
            let signal = if signal == CrashSignal::Kill { libc::SIGKILL } else { libc::SIGSTOP };
            // To this thread (raise(3): tgkill): it takes the stop itself before
            // its next instruction. kill(2) to the process let another thread take
            // it, and this one ran on for some 100 µs meanwhile (after-finish then
            // sent `Finished` from a "frozen" agent).
            // SAFETY: raise(3) with a valid signal number has no memory effects.
            unsafe {
                libc::raise(signal);
            }
        }
        _ => {}
    }
}

/// The checkpointer's crash points: crashes as [`at`] does, and if a stall is
/// armed here, never returns (the rest of the agent goes on).
pub async fn checkpointer_at(point: CrashPoint) {
    at(point);
    stall_at(point).await;
}

/// Never returns if a stall is armed at `point` (the rest of the agent goes on).
pub async fn stall_at(point: CrashPoint) {
    if CRASH_AT.get() == Some(&(point, CrashSignal::Stall)) {
        tracing::warn!(?point, "stall point reached: no more checkpoints (heartbeats go on)");
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_points_parse() {
        assert_eq!("pause:3".parse(), Ok(CrashPoint::Pause(3)));
        assert_eq!("speculative:1".parse(), Ok(CrashPoint::Speculative(1)));
        assert_eq!("committed:2".parse(), Ok(CrashPoint::Committed(2)));
        assert_eq!("after-last-page".parse(), Ok(CrashPoint::AfterLastPage));
        assert_eq!("after-finish".parse(), Ok(CrashPoint::AfterFinish));
        assert_eq!("before-first-checkpoint".parse(), Ok(CrashPoint::BeforeFirstCheckpoint));
        assert!("pause:0".parse::<CrashPoint>().is_err());
        assert!("later".parse::<CrashPoint>().unwrap_err().to_string().contains("unknown crash point"));
    }
}
