//! Explicit-state model check (stateright, breadth first) of PostCopyFT's
//! hand-over and lease protocol after the switchover. Over every reachable
//! state: never two copies of the VM run at once, and in a quiescent state
//! exactly one copy runs unless the source reported `finish-unconfirmed` (the
//! documented outcome that leaves the VM to an operator). Each `Rules` switch
//! brings back an old, broken behaviour, and the checker must find it.
//!
//! `PCFT_MODEL_FAULTS=N` checks with up to N faults per run everywhere (the
//! defaults are below; 3 everywhere passes too, in about a minute and a half
//! on two cores).
//!
//! # Time
//!
//! Integer ticks of `TICK_MS` = 20 ms: the lease (`--heartbeat-timeout`, 200 ms)
//! is `LEASE` = 10 ticks, a heartbeat goes every `BEAT` = 4 ticks (the agent's
//! 20 ms would be a tick each: four a lease keep the state space small and
//! change nothing of the argument), and the source's wait after its last renewal
//! is what the real `lease::fenced_after` says, rounded up to a tick (230 ms: 12
//! ticks). The source waits `PATIENCE` = 10 ticks for an answer to `Finish` (the
//! real default is 30 s; only that it ends matters). A state holds no absolute
//! time, only ages and countdowns (capped where larger ones mean the same), so
//! the state graph is finite and the check covers runs of any length, with no
//! horizon. The real fence and lease code, which only compares and adds times,
//! runs at one fixed present (`NOW`) in every step. Both agents read one clock
//! (one host); one run lets the destination's clock stand still one tick in
//! eleven, the slowest that `CLOCK_RATE_MARGIN` allows.
//!
//! # What is modelled, and the code each part mirrors
//!
//! - The source (`migration/source.rs`, `PostcopySource`). It waits for
//!   `Restored` and sends `Go` (the commit, and its first renewal, `go_at`). It
//!   answers each `Heartbeat` with a `HeartbeatAck` (`send_heartbeat_ack`: a
//!   renewal), from a lane of its own (`replies::Lanes`, the biased `select!` in
//!   `wait`), so it may ack a heartbeat before the `Resumed` or `Complete` its
//!   reader read first. It sends `AllSent` at any moment once the destination
//!   `Resumed`, `Finish` on `Complete` (`run`, `finish`), and takes `Finished`
//!   as the end. Before `Finish` it gives the destination up on a lease of
//!   silence (`check_alive`, `replies::Liveness`: the time since its reader last
//!   read a frame), a close or a reset (`replies::read_replies`: `Reply::Gone`),
//!   an `Abort` (`handle_reply`), or anything else at any time (a stalled
//!   checkpoint stream, a protocol error, a write that blocked: the fault
//!   `SourceGivesUp`). It then closes the connection and restores its copy at
//!   the real `lease::source_may_restore_at`, with `Stopped` only for an
//!   `Abort { paused: true }` and `MayRun` for anything else (`migrate_out`; then
//!   `Daemon::fail_over` sleeps until that moment). After `Finish`
//!   (`finish`): an `Abort` fails over as before; no answer within the
//!   patience, a close or a reset is `finish-unconfirmed`, `MayOwnTheVm`, and it
//!   never restores. Before `Go` (`precopy_and_stop`), any failure resumes the
//!   source's copy at once and sends `Abort`: the destination never had `Go`.
//! - The destination (`migration/destination.rs`: `migrate_in`, `heartbeats`,
//!   `stop_for_good`). It restored the VM paused and armed its fence and lease
//!   at the switchover (deadline a lease later), and `Restored` is in flight.
//!   On `Go` it resumes, sends `Resumed`, and starts its heartbeat task (a
//!   tokio interval's first slot is at once). Each slot checks the `Lease`: if it
//!   has expired, the destination gives the source up instead of sending. On
//!   `HeartbeatAck` it calls `Lease::acked` and then `Fence::extend(lease.expires())`.
//!   On `AllSent` it sends `Complete`, and on `Finish` it calls `disarm_at(now)`:
//!   true, it sends `Finished` and the VM is its own; false, it stops. Giving the
//!   source up (a close, a reset, an `Abort`, its lease expired, a refused
//!   disarm, or its own failure: the fault `DestinationGivesUp`, e.g. a failed
//!   checkpoint or resume) is `stop_for_good`: `trip()`, then the pause, which
//!   may succeed or fail (both explored), then `Abort { paused }`.
//! - The fence (`fence/state.rs`, `FenceState`, the real code). The model
//!   keeps its phase as a plain value and applies each transition to a
//!   `FenceState` rebuilt from it (`apply`). The vCPUs' kernel timers trip it
//!   at the deadline, at the tick, even while the process is frozen
//!   (`fence/mod.rs`, `vcpu_worker.rs`). "The destination's copy runs" means
//!   it resumed, has not stopped or crashed, and its fence has not tripped. A
//!   frozen destination counts as running, since it runs the instant it wakes
//!   unless it is fenced.
//! - The lease (`migration/lease.rs`, `Lease`, the real code). The model
//!   keeps the ticks until it expires and the ages of the heartbeats not yet
//!   acked. It rebuilds a `Lease` from them for every slot and every ack
//!   (`rebuild_lease`). A heartbeat (and its ack) is named by its age, one
//!   heartbeat a tick at most, which stands for its sequence number. One
//!   older than a lease is forgotten, since its ack renews nothing.
//! - The network is one TCP connection, FIFO each way. A message waits any
//!   number of ticks. Everything from some point on may be lost in either
//!   direction: a partition that never heals (one that heals is a long delay).
//!   A middlebox reset may reach the source, the destination or both. The
//!   side that gets it sees the connection closed, loses what it has not read,
//!   and sends nothing more, and the other side's next segment draws a reset
//!   too. A crashed destination's kernel closes its socket: the source reads
//!   the close after what was sent before it, unless that direction is cut. A
//!   source that gives up closes its socket, and the destination reads the
//!   close.
//! - Faults come at any tick, each kind once, at most `max_faults` per run:
//!   any number with one clock, 1 with the slower clock, 2 for the broken
//!   rules. The destination crashes (before it took the VM: a crash of the
//!   VM's owner after the hand-over is a host failure, not the protocol's) or
//!   freezes for any number of ticks. Either direction is cut. A reset reaches
//!   either side or both. Either side gives up. `Restored` never comes.
//!
//! # What is abstracted away
//!
//! - Pages, page requests and the push: only the moment `AllSent` goes out
//!   matters.
//! - Checkpoints, the stager, credit and checkpoint acks: only the verdicts
//!   they can lead to (either side giving up).
//! - Output commit, and authentication: every word comes from the peer.
//! - Blocking writes: one that blocks ends as silence or as giving up.
//! - The source's own crash, which PostCopyFT does not cover.
//! - The `explain` path: a reset drops what was not read yet.
//! - The coalescing of heartbeats at the source (acking fewer is a subset).
//! - The watchdog's kick latency: a fence trips exactly at its tick, which the
//!   tick-rounded `STOP_MARGIN` covers.
//!
//! Heartbeats beyond `TO_SOURCE_CAP` messages in flight to the source are
//! skipped, as by a heartbeat task that runs late.
//!
//! # The rules
//!
//! - `skip_lease_wait_on_close`: the old `FailureKind::ConnectionClosed`
//!   shortcut of `migrate_out` (now `source_may_restore_at` with `MayRun`):
//!   restore at once on any close, reset or `Abort`.
//! - `non_atomic_disarm`: the old `Fence::disarm` (now one compare-and-swap,
//!   `FenceState::disarm_at`). It checks the deadline, then stores "disarmed"
//!   as a separate step, during which the kernel timer may trip the fence. A
//!   trip in between left the vCPUs fenced for good while `migrate_in` still
//!   sent `Finished`.
//! - `restore_on_silence_after_finish`: `PostcopySource::finish` taking no
//!   answer to `Finish` (patience, a close, a reset) as `MayRun` instead of
//!   `FinishUnconfirmed` / `MayOwnTheVm`.
//! - `no_fence_check_on_wake`: without the per-vCPU kernel timer
//!   (`vcpu_worker.rs`, `may_enter`; `fence/mod.rs`), only the watchdog thread
//!   trips the fence, and it runs only while the process is not frozen. A
//!   destination frozen past its deadline runs on when it wakes.
//! - `extend_from_ack_arrival` (never in the code, a check of the model): the
//!   lease counted from an ack's arrival instead of its heartbeat's send time
//!   (`Lease::acked`).

use pcft_agent::clock::BootTime;
use pcft_agent::migration::ft::lease::{self, DestinationCopy, Lease, CLOCK_RATE_MARGIN};
use pcft_agent::vmm::fence::state::{FencePhase, FenceState};
use stateright::{Checker, HasDiscoveries, Model, Path, Property};
use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ---- time --------------------------------------------------------------------

/// One model tick.
const TICK_MS: u64 = 20;
const TICK: Duration = Duration::from_millis(TICK_MS);
/// The lease and the source's silence timeout (`--heartbeat-timeout`), in ticks.
const LEASE: u8 = 10;
/// The destination's heartbeat interval, in ticks.
const BEAT: u8 = 4;
/// How long the source waits for an answer to `Finish`, in ticks.
const PATIENCE: u8 = 10;
/// Messages in flight to the source at most (past it a heartbeat is skipped).
const TO_SOURCE_CAP: usize = 3;
/// The tick every step is computed at. The state keeps only times relative to
/// the present (ages and countdowns), and the real code only compares and adds
/// times, so one fixed present serves every step.
const NOW: u8 = 100;
/// `CLOCK_BOOTTIME` at tick 0 (the fence's word needs deadlines above zero).
const BOOT_AT_ZERO: Duration = Duration::from_secs(1);

fn lease_length() -> Duration {
    TICK * u32::from(LEASE)
}

/// The source's `Instant` at tick `t`: one base per process.
fn instant(t: u8) -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now) + TICK * u32::from(t)
}

/// The first tick at or after `at`.
fn tick_at_or_after(at: Instant) -> u8 {
    let ticks = at.duration_since(instant(0)).as_nanos().div_ceil(TICK.as_nanos());
    u8::try_from(ticks).expect("a tick within range")
}

/// The destination's `CLOCK_BOOTTIME` at its tick `t`.
fn boot(t: u8) -> BootTime {
    BootTime::from_since_boot(BOOT_AT_ZERO + TICK * u32::from(t))
}

fn tick_of_boot(at: BootTime) -> u8 {
    let since = at.since_boot().checked_sub(BOOT_AT_ZERO).expect("no time before tick 0");
    assert_eq!(since.as_nanos() % TICK.as_nanos(), 0, "{at:?} is not on a tick");
    u8::try_from(since.as_nanos() / TICK.as_nanos()).expect("a tick within range")
}

/// The fence word's time (µs on the lease's clock) of the destination's tick `t`.
fn fence_us(t: u8) -> u64 {
    boot(t).as_micros()
}

/// How long after the last renewal the source waits, in ticks (`fenced_after`).
fn fenced_ticks() -> u8 {
    tick_at_or_after(lease::fenced_after(instant(NOW), lease_length())) - NOW
}

// ---- the real fence and lease, applied to plain values ----------------------------

/// The fence's phase as a plain, hashable value: `FencePhase` with the
/// deadline as ticks from now (0: due, not yet seen by anyone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fence {
    Armed(u8),
    Tripped,
    Disarmed,
}

impl Fence {
    fn from_phase(phase: FencePhase) -> Fence {
        match phase {
            FencePhase::Armed { deadline_us } => {
                let deadline = tick_of_boot(BootTime::from_since_boot(Duration::from_micros(deadline_us)));
                Fence::Armed(deadline.checked_sub(NOW).expect("an armed deadline is never behind now"))
            }
            FencePhase::Tripped => Fence::Tripped,
            FencePhase::Disarmed => Fence::Disarmed,
        }
    }
}

/// Applies `f` to a real `FenceState` in the phase `fence`, at tick `NOW`;
/// returns the phase it left the word in, and what `f` returned.
fn apply<R>(fence: Fence, f: impl FnOnce(&FenceState) -> R) -> (Fence, R) {
    let word = match fence {
        Fence::Armed(left) => FenceState::new(fence_us(NOW + left)),
        Fence::Tripped => {
            let word = FenceState::new(fence_us(NOW));
            assert!(word.trip());
            word
        }
        Fence::Disarmed => {
            let word = FenceState::new(fence_us(NOW));
            assert!(word.disarm_at(0), "a deadline above zero");
            word
        }
    };
    assert_eq!(Fence::from_phase(word.phase()), fence, "the word rebuilt");
    let result = f(&word);
    (Fence::from_phase(word.phase()), result)
}

/// The destination's real `Lease`, rebuilt from the model's summary of it: the
/// ticks until it expires, and the ages of the heartbeats not yet acked,
/// oldest first (each younger than a lease). Returns it with the sequence
/// number it gave each of those heartbeats.
fn rebuild_lease(left: u8, unacked: &[u8]) -> (Lease, Vec<u64>) {
    let mut lease = Lease::new(lease_length(), boot(NOW + left) - lease_length());
    assert_eq!(lease.expires(), boot(NOW + left));
    let seqs = unacked.iter().map(|&age| lease.sent(boot(NOW - age))).collect();
    (lease, seqs)
}

/// Ticks from now until the lease expires (0: it has).
fn lease_left(lease: &Lease) -> u8 {
    tick_of_boot(lease.expires()).saturating_sub(NOW)
}

// ---- the model -------------------------------------------------------------------

/// Old, broken behaviours, each a switch (all false: the protocol as it is).
#[derive(Clone, Copy, Debug, Default)]
struct Rules {
    skip_lease_wait_on_close: bool,
    non_atomic_disarm: bool,
    restore_on_silence_after_finish: bool,
    no_fence_check_on_wake: bool,
    extend_from_ack_arrival: bool,
}

#[derive(Clone, Debug)]
struct Handover {
    rules: Rules,
    /// Faults per run at most.
    max_faults: u8,
    /// The destination's clock may run up to `1 + CLOCK_RATE_MARGIN` times slower.
    slow_destination_clock: bool,
    /// `fenced_ticks()`.
    fenced: u8,
}

/// Faults per run: `default`, or `PCFT_MODEL_FAULTS` for a deeper (slower) check.
fn max_faults(default: u8) -> u8 {
    std::env::var("PCFT_MODEL_FAULTS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// With a slower destination clock: its clock may stand still for one tick
/// after this many ticks in which it went on (10 ticks of its clock in 11).
fn lag_every() -> u8 {
    (1.0 / CLOCK_RATE_MARGIN).round() as u8
}

impl Handover {
    fn new(rules: Rules, faults: u8) -> Self {
        Handover { rules, max_faults: max_faults(faults), slow_destination_clock: false, fenced: fenced_ticks() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ToSource {
    Restored,
    Resumed,
    /// Its age on the destination's clock (None: older than a lease, so that
    /// its ack renews nothing).
    Heartbeat(Option<u8>),
    Complete,
    Finished,
    Abort {
        paused: bool,
    },
    /// The destination's socket closed (its kernel, when it crashed).
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ToDestination {
    Go,
    /// The age of the heartbeat it acks, as in `ToSource::Heartbeat`.
    HeartbeatAck(Option<u8>),
    AllSent,
    Finish,
    Abort,
    /// The source closed its socket.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SourcePhase {
    WaitRestored,
    PostCopy {
        resumed: bool,
    },
    AwaitComplete,
    /// `Finish` went out `waited` ticks ago (at most `PATIENCE`).
    Finishing {
        waited: u8,
    },
    /// Gave the destination up; restores its copy in `restore_in` ticks.
    Lost {
        restore_in: u8,
    },
    /// Its copy runs.
    Restored {
        after_commit: bool,
    },
    /// `Finished` came: the VM is the destination's.
    Done,
    /// `finish-unconfirmed`: an operator must look.
    Reported,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Source {
    phase: SourcePhase,
    /// Ticks since it last sent `Go` or a `HeartbeatAck` (at most `fenced_ticks()`).
    renewal_age: u8,
    /// Ticks since it last read a frame or sent `Go` (at most `LEASE`).
    heard_age: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum DestinationPhase {
    /// Restored paused, waiting for `Go`.
    AwaitGo,
    Running {
        completed: bool,
    },
    /// `non_atomic_disarm` only: checked the deadline, not yet stored "disarmed".
    Disarming,
    /// Took the VM for good (sent `Finished`).
    Owner,
    /// Gave the source up: fence tripped, pausing, `Abort` not yet sent.
    Stopping,
    Stopped,
    Crashed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Destination {
    phase: DestinationPhase,
    frozen: bool,
    fence: Fence,
    /// `non_atomic_disarm` only: the fence tripped, then was overwritten with "disarmed".
    vcpus_fenced: bool,
    /// Ticks of its clock until its `Lease` expires (0: expired).
    lease_left: u8,
    /// Ages of the heartbeats sent and not yet acked, oldest first.
    unacked: Vec<u8>,
    /// Ticks until the heartbeat task's next slot (0: due).
    beat_in: u8,
    /// A reset reached its socket (it reads the error when it next looks).
    socket_reset: bool,
    /// Slower clock only: ticks since its clock last stood still (at most `lag_every()`).
    since_lag: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fault {
    Crash,
    Freeze,
    CutToSource,
    CutToDestination,
    ResetSource,
    ResetDestination,
    ResetBoth,
    SourceGivesUp,
    DestinationGivesUp,
    NoRestored,
}

impl Fault {
    const ALL: [Fault; 10] = [
        Fault::Crash,
        Fault::Freeze,
        Fault::CutToSource,
        Fault::CutToDestination,
        Fault::ResetSource,
        Fault::ResetDestination,
        Fault::ResetBoth,
        Fault::SourceGivesUp,
        Fault::DestinationGivesUp,
        Fault::NoRestored,
    ];

    /// The fault kinds it uses up.
    fn bits(self) -> u16 {
        match self {
            Fault::ResetBoth => Fault::ResetSource.bits() | Fault::ResetDestination.bits(),
            f => 1 << (f as u16),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    source: Source,
    destination: Destination,
    to_source: Vec<ToSource>,
    to_destination: Vec<ToDestination>,
    faults: u8,
    used: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// Time goes on one tick.
    Tick,
    /// Slower clock only: a tick in which the destination's clock stands still.
    TickDestinationLags,
    SourceReceives,
    /// The source acks a heartbeat that its reader read after replies it has
    /// not handled yet (heartbeats have a lane of their own, handled first).
    SourceAcksFirst,
    SourceSendsAllSent,
    SourceSilence,
    SourcePatienceEnds,
    SourceRestores,
    DestinationReceives,
    DestinationBeat,
    DestinationSeesReset,
    DestinationStoresDisarmed,
    DestinationAborts {
        paused: bool,
    },
    Thaw,
    /// After a reset reached one side only, the other side's next segment
    /// draws a reset from the first side's kernel.
    ResetEchoesToSource,
    ResetEchoesToDestination,
    Fault(Fault),
}

/// Why the source gave the destination up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cause {
    Silence,
    Closed,
    Reset,
    Abort,
    GaveUp,
}

impl State {
    fn cut(&self, fault: Fault) -> bool {
        self.used & fault.bits() != 0
    }

    fn source_active(&self) -> bool {
        matches!(
            self.source.phase,
            SourcePhase::WaitRestored
                | SourcePhase::PostCopy { .. }
                | SourcePhase::AwaitComplete
                | SourcePhase::Finishing { .. }
        )
    }

    /// Where the first heartbeat waits behind replies only (`Resumed`, `Complete`).
    fn heartbeat_behind_replies(&self) -> Option<usize> {
        let i = self.to_source.iter().position(|m| !matches!(m, ToSource::Resumed | ToSource::Complete))?;
        (i > 0 && matches!(self.to_source[i], ToSource::Heartbeat(_))).then_some(i)
    }

    fn source_final(&self) -> bool {
        matches!(self.source.phase, SourcePhase::Restored { .. } | SourcePhase::Done | SourcePhase::Reported)
    }

    /// The destination reads its socket.
    fn destination_reading(&self) -> bool {
        matches!(self.destination.phase, DestinationPhase::AwaitGo | DestinationPhase::Running { .. })
    }

    fn destination_alive(&self) -> bool {
        matches!(
            self.destination.phase,
            DestinationPhase::AwaitGo
                | DestinationPhase::Running { .. }
                | DestinationPhase::Disarming
                | DestinationPhase::Stopping
        )
    }

    /// The destination's process takes steps.
    fn destination_steps(&self) -> bool {
        !self.destination.frozen && self.destination_alive()
    }

    fn source_runs(&self) -> bool {
        matches!(self.source.phase, SourcePhase::Restored { .. })
    }

    /// Its vCPUs run, or would the moment a frozen process wakes.
    fn destination_runs(&self) -> bool {
        let d = &self.destination;
        matches!(d.phase, DestinationPhase::Running { .. } | DestinationPhase::Disarming | DestinationPhase::Owner)
            && !d.vcpus_fenced
            && d.fence != Fence::Tripped
    }

    /// Whether the destination's copy may still start or stop running.
    fn destination_settled(&self) -> bool {
        let d = &self.destination;
        match d.phase {
            DestinationPhase::Owner
            | DestinationPhase::Stopping
            | DestinationPhase::Stopped
            | DestinationPhase::Crashed => true,
            _ => d.fence == Fence::Tripped || d.vcpus_fenced,
        }
    }

    /// Nothing can change which copies run any more.
    fn quiescent(&self) -> bool {
        self.source_final() && self.destination_settled()
    }

    fn one_copy_or_reported(&self) -> bool {
        self.source.phase == SourcePhase::Reported || self.source_runs() != self.destination_runs()
    }

    fn send_to_source(&mut self, message: ToSource) {
        let dropped = self.cut(Fault::CutToSource) || self.destination.socket_reset || !self.source_active();
        if !dropped {
            self.to_source.push(message);
        }
    }

    fn send_to_destination(&mut self, message: ToDestination) {
        let dropped = self.cut(Fault::CutToDestination) || self.destination.socket_reset || !self.destination_reading();
        if !dropped {
            self.to_destination.push(message);
        }
    }

    /// Forgets what can no longer matter, so that equal situations are one state.
    fn canonicalize(&mut self) {
        let s = &mut self.source;
        match s.phase {
            SourcePhase::PostCopy { .. } | SourcePhase::AwaitComplete => {}
            SourcePhase::Finishing { .. } => s.heard_age = 0,
            _ => (s.renewal_age, s.heard_age) = (0, 0),
        }
        if !self.source_active() {
            self.to_source.clear();
        }
        let d = &mut self.destination;
        match d.phase {
            DestinationPhase::AwaitGo => d.beat_in = 0,
            DestinationPhase::Running { .. } => {}
            _ => {
                d.lease_left = 0;
                d.unacked.clear();
                d.beat_in = 0;
                d.socket_reset = false;
            }
        }
        match d.phase {
            DestinationPhase::Stopped | DestinationPhase::Crashed => {
                (d.frozen, d.fence, d.vcpus_fenced) = (false, Fence::Tripped, false);
            }
            DestinationPhase::Owner => d.frozen = false,
            _ => {}
        }

        if !self.destination_reading() {
            self.to_destination.clear();
        }
        // Acks of heartbeats older than a lease do nothing: one stands for a run of them.
        self.to_destination.dedup_by(|a, b| a == b && *a == ToDestination::HeartbeatAck(None));
    }
}

impl Handover {
    /// The source gives the destination up: it closes the connection and
    /// restores its copy when `source_may_restore_at` allows (never: it reports).
    fn source_loses(&self, s: &mut State, copy: DestinationCopy, cause: Cause) {
        let word_or_close = matches!(cause, Cause::Closed | Cause::Reset | Cause::Abort);
        let restore_at = if self.rules.skip_lease_wait_on_close && word_or_close {
            Some(NOW)
        } else {
            let last_renewal = instant(NOW - s.source.renewal_age);
            lease::source_may_restore_at(copy, instant(NOW), last_renewal, lease_length()).map(tick_at_or_after)
        };
        if cause != Cause::Reset {
            s.send_to_destination(ToDestination::Closed);
        }
        s.source.phase = match restore_at {
            Some(at) => SourcePhase::Lost { restore_in: at.checked_sub(NOW).expect("not before detection") },
            None => SourcePhase::Reported,
        };
    }

    /// Before `Go`: the source resumes its own copy and tells the destination.
    fn source_keeps_the_vm(&self, s: &mut State, cause: Cause) {
        if cause != Cause::Reset {
            s.send_to_destination(ToDestination::Abort);
        }
        s.source.phase = SourcePhase::Restored { after_commit: false };
    }

    /// After `Finish`, no `Finished` and no `Abort`.
    fn source_unconfirmed(&self, s: &mut State, cause: Cause) {
        let copy = if self.rules.restore_on_silence_after_finish {
            DestinationCopy::MayRun
        } else {
            DestinationCopy::MayOwnTheVm
        };
        self.source_loses(s, copy, cause);
    }

    /// The source sees the connection closed or reset.
    fn source_sees_close(&self, s: &mut State, cause: Cause) {
        match s.source.phase {
            SourcePhase::WaitRestored => self.source_keeps_the_vm(s, cause),
            SourcePhase::PostCopy { .. } | SourcePhase::AwaitComplete => {
                self.source_loses(s, DestinationCopy::MayRun, cause)
            }
            SourcePhase::Finishing { .. } => self.source_unconfirmed(s, cause),
            phase => unreachable!("the source reads nothing in {phase:?}"),
        }
    }

    fn source_receives(&self, s: &mut State, message: ToSource) {
        s.source.heard_age = 0;
        match (s.source.phase, message) {
            (SourcePhase::WaitRestored, ToSource::Restored) => {
                s.send_to_destination(ToDestination::Go);
                s.source.renewal_age = 0;
                s.source.phase = SourcePhase::PostCopy { resumed: false };
            }
            (SourcePhase::WaitRestored, ToSource::Abort { .. }) => self.source_keeps_the_vm(s, Cause::Abort),
            (_, ToSource::Closed) => self.source_sees_close(s, Cause::Closed),
            (SourcePhase::PostCopy { .. }, ToSource::Resumed) => {
                s.source.phase = SourcePhase::PostCopy { resumed: true }
            }
            (
                SourcePhase::PostCopy { .. } | SourcePhase::AwaitComplete | SourcePhase::Finishing { .. },
                ToSource::Heartbeat(age),
            ) => {
                s.send_to_destination(ToDestination::HeartbeatAck(age));
                s.source.renewal_age = 0;
            }
            (SourcePhase::AwaitComplete, ToSource::Complete) => {
                s.send_to_destination(ToDestination::Finish);
                s.source.phase = SourcePhase::Finishing { waited: 0 };
            }
            (SourcePhase::Finishing { .. }, ToSource::Finished) => s.source.phase = SourcePhase::Done,
            (_, ToSource::Abort { paused }) => {
                let copy = if paused { DestinationCopy::Stopped } else { DestinationCopy::MayRun };
                self.source_loses(s, copy, Cause::Abort);
            }
            (phase, message) => unreachable!("the source got {message:?} in {phase:?}"),
        }
    }

    /// `stop_for_good`, first half: the fence trips (the pause and `Abort` follow).
    fn destination_loses(&self, s: &mut State) {
        let d = &mut s.destination;
        d.fence = apply(d.fence, |f| f.trip()).0;
        d.phase = DestinationPhase::Stopping;
    }

    fn destination_receives(&self, s: &mut State, message: ToDestination) {
        match (s.destination.phase, message) {
            (DestinationPhase::AwaitGo, ToDestination::Go) => {
                s.destination.phase = DestinationPhase::Running { completed: false };
                s.send_to_source(ToSource::Resumed);
                // The heartbeat task's first slot is at once.
                s.destination.beat_in = 0;
            }
            (DestinationPhase::Running { .. }, ToDestination::HeartbeatAck(age)) => {
                let d = &mut s.destination;
                let (mut lease, seqs) = rebuild_lease(d.lease_left, &d.unacked);
                if let Some(i) = age.and_then(|age| d.unacked.iter().position(|&a| a == age)) {
                    if self.rules.extend_from_ack_arrival {
                        // As if every acked heartbeat had been sent just now.
                        lease.sent(boot(NOW));
                        lease.acked(seqs.len() as u64 + 1);
                    } else {
                        lease.acked(seqs[i]);
                    }
                    d.unacked.drain(..=i);
                }
                d.lease_left = lease_left(&lease);
                let deadline = fence_us(tick_of_boot(lease.expires()).max(NOW));
                d.fence = apply(d.fence, |f| f.extend(deadline)).0;
                if d.fence == Fence::Tripped {
                    // Too late: no ack revives a tripped fence (`migrate_in`, `HeartbeatAck`).
                    self.destination_loses(s);
                }
            }
            (DestinationPhase::Running { completed: false }, ToDestination::AllSent) => {
                s.destination.phase = DestinationPhase::Running { completed: true };
                s.send_to_source(ToSource::Complete);
            }
            (DestinationPhase::Running { completed: true }, ToDestination::Finish) => {
                if self.rules.non_atomic_disarm {
                    // The old check-then-store: the check alone.
                    match s.destination.fence {
                        Fence::Armed(left) if left > 0 => s.destination.phase = DestinationPhase::Disarming,
                        _ => self.destination_loses(s),
                    }
                    return;
                }
                let (fence, disarmed) = apply(s.destination.fence, |f| f.disarm_at(fence_us(NOW)));
                s.destination.fence = fence;
                if disarmed {
                    s.destination.phase = DestinationPhase::Owner;
                    s.send_to_source(ToSource::Finished);
                } else {
                    self.destination_loses(s);
                }
            }
            (_, ToDestination::Abort | ToDestination::Closed) => self.destination_loses(s),
            (phase, message) => unreachable!("the destination got {message:?} in {phase:?}"),
        }
    }

    /// A slot of the destination's heartbeat task (`heartbeats`): the lease
    /// has run out if its own clock says so or the fence does.
    fn destination_beat(&self, s: &mut State) {
        let (mut lease, _) = rebuild_lease(s.destination.lease_left, &s.destination.unacked);
        let (fence, allows) = apply(s.destination.fence, |f| f.allows_running_at(fence_us(NOW)));
        s.destination.fence = fence;
        if lease.expired(boot(NOW)) || !allows {
            self.destination_loses(s);
            return;
        }
        s.destination.beat_in = BEAT;
        if s.to_source.len() >= TO_SOURCE_CAP {
            return; // A heartbeat task running late: this one never went out.
        }
        lease.sent(boot(NOW));
        s.destination.unacked.push(0);
        s.send_to_source(ToSource::Heartbeat(Some(0)));
    }

    /// One tick of the source's clock, and of the destination's unless it lags.
    fn tick(&self, s: &mut State, destination_lags: bool) {
        let src = &mut s.source;
        src.renewal_age = (src.renewal_age + 1).min(self.fenced);
        src.heard_age = (src.heard_age + 1).min(LEASE);
        match &mut src.phase {
            SourcePhase::Finishing { waited } => *waited = (*waited + 1).min(PATIENCE),
            SourcePhase::Lost { restore_in } => *restore_in = restore_in.saturating_sub(1),
            _ => {}
        }
        let d = &mut s.destination;
        if self.slow_destination_clock {
            d.since_lag = if destination_lags { 0 } else { (d.since_lag + 1).min(lag_every()) };
        }
        if destination_lags {
            return;
        }
        // The vCPUs' kernel timers (and the watchdog): the fence trips at its deadline.
        if let Fence::Armed(left) = d.fence {
            d.fence = Fence::Armed(left.saturating_sub(1));
            if !(self.rules.no_fence_check_on_wake && d.frozen) {
                d.fence = apply(d.fence, |f| f.allows_running_at(fence_us(NOW))).0;
            }
        }
        d.lease_left = d.lease_left.saturating_sub(1);
        d.beat_in = d.beat_in.saturating_sub(1);
        // What `Lease::sent` would forget, and whose acks renew nothing: heartbeats older than a lease.
        d.unacked.iter_mut().for_each(|age| *age += 1);
        d.unacked.retain(|&age| age < LEASE);
        let older = |age: Option<u8>| age.map(|a| a + 1).filter(|&a| a < LEASE);
        for m in &mut s.to_source {
            if let ToSource::Heartbeat(age) = m {
                *age = older(*age);
            }
        }
        for m in &mut s.to_destination {
            if let ToDestination::HeartbeatAck(age) = m {
                *age = older(*age);
            }
        }
    }

    fn fault_enabled(&self, s: &State, fault: Fault) -> bool {
        if s.faults >= self.max_faults || s.used & fault.bits() != 0 {
            return false;
        }
        match fault {
            Fault::Crash => s.destination_alive(),
            Fault::Freeze => s.destination_alive() && !s.destination.frozen,
            Fault::CutToSource | Fault::ResetSource => s.source_active(),
            Fault::CutToDestination | Fault::ResetDestination => s.destination_reading(),
            Fault::ResetBoth => s.source_active() && s.destination_reading(),
            Fault::SourceGivesUp => {
                matches!(s.source.phase, SourcePhase::PostCopy { .. } | SourcePhase::AwaitComplete)
            }
            Fault::DestinationGivesUp => s.destination_reading() && !s.destination.frozen,
            Fault::NoRestored => s.source.phase == SourcePhase::WaitRestored,
        }
    }

    fn inject(&self, s: &mut State, fault: Fault) {
        s.faults += 1;
        s.used |= fault.bits();
        match fault {
            Fault::Crash => {
                // Its kernel closes the socket.
                s.send_to_source(ToSource::Closed);
                s.destination.phase = DestinationPhase::Crashed;
            }
            Fault::Freeze => s.destination.frozen = true,
            Fault::CutToSource => s.to_source.clear(),
            Fault::CutToDestination => s.to_destination.clear(),
            Fault::ResetSource => self.reset_source(s),
            Fault::ResetDestination => self.reset_destination(s),
            Fault::ResetBoth => {
                self.reset_destination(s);
                self.reset_source(s);
            }
            Fault::SourceGivesUp => self.source_loses(s, DestinationCopy::MayRun, Cause::GaveUp),
            Fault::DestinationGivesUp => self.destination_loses(s),
            Fault::NoRestored => self.source_keeps_the_vm(s, Cause::Silence),
        }
    }

    fn reset_source(&self, s: &mut State) {
        s.to_source.clear();
        self.source_sees_close(s, Cause::Reset);
    }

    fn reset_destination(&self, s: &mut State) {
        s.to_destination.clear();
        s.destination.socket_reset = true;
    }
}

impl Model for Handover {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            source: Source { phase: SourcePhase::WaitRestored, renewal_age: 0, heard_age: 0 },
            destination: Destination {
                phase: DestinationPhase::AwaitGo,
                frozen: false,
                // The switchover was just now: the lease and the fence count from it.
                fence: Fence::Armed(LEASE),
                vcpus_fenced: false,
                lease_left: LEASE,
                unacked: Vec::new(),
                beat_in: 0,
                socket_reset: false,
                since_lag: if self.slow_destination_clock { lag_every() } else { 0 },
            },
            to_source: vec![ToSource::Restored],
            to_destination: Vec::new(),
            faults: 0,
            used: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.quiescent() {
            return;
        }
        let src = &s.source;
        if s.source_active() && !s.to_source.is_empty() {
            actions.push(Action::SourceReceives);
            if s.heartbeat_behind_replies().is_some() {
                actions.push(Action::SourceAcksFirst);
            }
        }
        let mut urgent = false;
        match src.phase {
            SourcePhase::PostCopy { resumed: true } => actions.push(Action::SourceSendsAllSent),
            SourcePhase::Finishing { waited } if waited >= PATIENCE => actions.push(Action::SourcePatienceEnds),
            SourcePhase::Lost { restore_in: 0 } => {
                actions.push(Action::SourceRestores);
                urgent = true;
            }
            _ => {}
        }
        if matches!(src.phase, SourcePhase::PostCopy { .. } | SourcePhase::AwaitComplete) && src.heard_age >= LEASE {
            actions.push(Action::SourceSilence);
        }
        let d = &s.destination;
        if s.destination_steps() {
            match d.phase {
                DestinationPhase::AwaitGo | DestinationPhase::Running { .. } => {
                    if !s.to_destination.is_empty() {
                        actions.push(Action::DestinationReceives);
                    }
                    if d.socket_reset {
                        actions.push(Action::DestinationSeesReset);
                    }
                    if matches!(d.phase, DestinationPhase::Running { .. }) && d.beat_in == 0 {
                        actions.push(Action::DestinationBeat);
                        urgent = true;
                    }
                }
                DestinationPhase::Disarming => actions.push(Action::DestinationStoresDisarmed),
                DestinationPhase::Stopping => {
                    actions.push(Action::DestinationAborts { paused: true });
                    actions.push(Action::DestinationAborts { paused: false });
                }
                _ => {}
            }
        }
        if d.frozen {
            actions.push(Action::Thaw);
        }
        if s.cut(Fault::ResetDestination) && !s.cut(Fault::CutToDestination) && s.source_active() {
            actions.push(Action::ResetEchoesToSource);
        }
        if s.cut(Fault::ResetSource) && !s.cut(Fault::CutToSource) && s.destination_reading() && !d.socket_reset {
            actions.push(Action::ResetEchoesToDestination);
        }
        for fault in Fault::ALL {
            if self.fault_enabled(s, fault) {
                actions.push(Action::Fault(fault));
            }
        }
        // A due restore and a due heartbeat slot (of a destination not frozen) happen before time goes on.
        if !urgent {
            actions.push(Action::Tick);
            if self.slow_destination_clock && d.since_lag >= lag_every() {
                actions.push(Action::TickDestinationLags);
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Tick => self.tick(&mut s, false),
            Action::TickDestinationLags => self.tick(&mut s, true),
            Action::SourceReceives => {
                let message = s.to_source.remove(0);
                self.source_receives(&mut s, message);
            }
            Action::SourceAcksFirst => {
                let i = s.heartbeat_behind_replies().expect("enabled");
                let message = s.to_source.remove(i);
                self.source_receives(&mut s, message);
            }
            Action::SourceSendsAllSent => {
                s.send_to_destination(ToDestination::AllSent);
                s.source.phase = SourcePhase::AwaitComplete;
            }
            Action::SourceSilence => self.source_loses(&mut s, DestinationCopy::MayRun, Cause::Silence),
            Action::SourcePatienceEnds => self.source_unconfirmed(&mut s, Cause::Silence),
            Action::SourceRestores => s.source.phase = SourcePhase::Restored { after_commit: true },
            Action::DestinationReceives => {
                let message = s.to_destination.remove(0);
                self.destination_receives(&mut s, message);
            }
            Action::DestinationBeat => self.destination_beat(&mut s),
            Action::DestinationSeesReset => self.destination_loses(&mut s),
            Action::DestinationStoresDisarmed => {
                // The old fence: a trip since the check left the vCPUs out for good.
                let d = &mut s.destination;
                d.vcpus_fenced |= d.fence == Fence::Tripped;
                d.fence = Fence::Disarmed;
                d.phase = DestinationPhase::Owner;
                s.send_to_source(ToSource::Finished);
            }
            Action::DestinationAborts { paused } => {
                s.send_to_source(ToSource::Abort { paused });
                s.destination.phase = DestinationPhase::Stopped;
            }
            Action::Thaw => s.destination.frozen = false,
            Action::ResetEchoesToSource => self.reset_source(&mut s),
            Action::ResetEchoesToDestination => self.reset_destination(&mut s),
            Action::Fault(fault) => self.inject(&mut s, fault),
        }
        s.canonicalize();
        let d = &mut s.destination;
        let timers = matches!(
            d.phase,
            DestinationPhase::AwaitGo | DestinationPhase::Running { .. } | DestinationPhase::Disarming
        );
        if self.slow_destination_clock && !timers {
            d.since_lag = lag_every(); // No timer of its own matters any more.
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(NEVER_TWO, |_, s: &State| !(s.source_runs() && s.destination_runs())),
            Property::always(NEVER_ZERO, |_, s: &State| !s.quiescent() || s.one_copy_or_reported()),
            // Sanity: each ending is reachable (no property holds vacuously).
            Property::sometimes(HANDED_OVER, |_, s: &State| {
                s.quiescent() && s.source.phase == SourcePhase::Done && s.destination_runs()
            }),
            Property::sometimes(FAILED_OVER, |_, s: &State| {
                s.quiescent() && s.source.phase == (SourcePhase::Restored { after_commit: true })
            }),
            Property::sometimes(REPORTED, |_, s: &State| s.quiescent() && s.source.phase == SourcePhase::Reported),
            Property::sometimes(WAITS_OUT, |_, s: &State| {
                matches!(s.source.phase, SourcePhase::Lost { restore_in } if restore_in > 0) && s.destination_runs()
            }),
            Property::sometimes(FINISH_REFUSED, |_, s: &State| {
                matches!(s.source.phase, SourcePhase::Finishing { .. })
                    && s.destination.phase == DestinationPhase::Stopped
                    && s.to_source.iter().any(|m| matches!(m, ToSource::Abort { paused: true }))
            }),
        ]
    }
}

const NEVER_TWO: &str = "never two copies";
const NEVER_ZERO: &str = "never zero copies unless reported";
const HANDED_OVER: &str = "the hand-over completes";
const FAILED_OVER: &str = "the source fails over after the commit";
const REPORTED: &str = "finish-unconfirmed is reported";
const WAITS_OUT: &str = "the source waits out the lease of a running destination";
const FINISH_REFUSED: &str = "an Abort answers Finish";

// ---- running it ------------------------------------------------------------------

/// The steps of `path`, each with the tick it happened at.
fn trace(path: &Path<State, Action>) -> String {
    let mut out = String::new();
    let mut now = 0;
    for (state, action) in path.clone().into_vec() {
        let step = match action {
            None | Some(Action::Tick) => None,
            Some(Action::SourceReceives) => Some(format!("source reads {:?}", state.to_source[0])),
            Some(Action::DestinationReceives) => Some(format!("destination reads {:?}", state.to_destination[0])),
            Some(other) => Some(format!("{other:?}")),
        };
        if let Some(step) = step {
            out += &format!("  t={now:>2}: {step}\n");
        }
        if matches!(action, Some(Action::Tick | Action::TickDestinationLags)) {
            now += 1;
        }
    }
    let last = path.last_state();
    out += &format!(
        "  then (t={now}): source {:?}, destination {:?} (fence {:?}, frozen {}); running: source {}, destination {}\n",
        last.source.phase,
        last.destination.phase,
        last.destination.fence,
        last.destination.frozen,
        last.source_runs(),
        last.destination_runs()
    );
    out
}

/// Checks the protocol as it is: both safety properties hold in every
/// reachable state, and every ending is reachable.
fn check_correct(model: Handover, what: &str) {
    let started = Instant::now();
    let checker = model.clone().checker().threads(2).spawn_bfs().join();
    println!(
        "{what}: {} states checked ({} generated, depth {}) in {:.1?}",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    assert!(checker.is_done());
    for name in [NEVER_TWO, NEVER_ZERO] {
        if let Some(path) = checker.discovery(name) {
            panic!("{what}: \"{name}\" fails:\n{}", trace(&path));
        }
    }
    for name in [HANDED_OVER, FAILED_OVER, REPORTED, WAITS_OUT, FINISH_REFUSED] {
        assert!(checker.discovery(name).is_some(), "{what}: never reached \"{name}\"");
    }
}

/// Checks that a broken rule is caught: `property` fails somewhere.
fn check_caught(rules: Rules, property: &'static str) {
    let started = Instant::now();
    let checker = Handover::new(rules, 2)
        .checker()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([property])))
        .spawn_bfs()
        .join();
    println!("{rules:?}: {} states checked in {:.1?}", checker.unique_state_count(), started.elapsed());
    let path = checker.discovery(property).unwrap_or_else(|| panic!("{rules:?}: \"{property}\" holds"));
    println!("\"{property}\" fails:\n{}", trace(&path));
}

#[test]
fn the_protocol_keeps_one_copy() {
    // Every combination of faults, each kind at most once.
    check_correct(Handover::new(Rules::default(), Fault::ALL.len() as u8), "as it is");
}

#[test]
fn the_protocol_keeps_one_copy_with_a_slower_destination_clock() {
    // One fault per run by default: the lag counter makes this state space 10 times larger.
    let model = Handover { slow_destination_clock: true, ..Handover::new(Rules::default(), 1) };
    check_correct(model, "slower destination clock");
}

#[test]
fn restoring_at_once_on_a_close_runs_two_copies() {
    check_caught(Rules { skip_lease_wait_on_close: true, ..Rules::default() }, NEVER_TWO);
}

#[test]
fn a_non_atomic_disarm_loses_the_vm() {
    check_caught(Rules { non_atomic_disarm: true, ..Rules::default() }, NEVER_ZERO);
}

#[test]
fn restoring_on_silence_after_finish_runs_two_copies() {
    check_caught(Rules { restore_on_silence_after_finish: true, ..Rules::default() }, NEVER_TWO);
}

#[test]
fn no_fence_check_on_wake_runs_two_copies() {
    check_caught(Rules { no_fence_check_on_wake: true, ..Rules::default() }, NEVER_TWO);
}

#[test]
fn a_lease_counted_from_the_acks_arrival_runs_two_copies() {
    check_caught(Rules { extend_from_ack_arrival: true, ..Rules::default() }, NEVER_TWO);
}
