//! Cancelling an outgoing migration, on real KVM, at the level of
//! `migrate_out` (no daemon): the source VM runs in this process, and the
//! destination is either a scripted one over a real greeting (to stop the
//! migration at a chosen wait before the commit) or a real `migrate_in`.
//!
//! - Before the commit a cancel ends the migration at once, whatever the
//!   source waits for (the greeting, a reply, a write the destination does
//!   not read), and the VM runs on at the source and matches its oracle.
//! - A cancel racing the commit is answered for what happened: an abort never
//!   lets `Go` out, a refusal never leaves the VM at the source.
//! - After the commit, without PostCopyFT, it is refused and the migration
//!   completes; with PostCopyFT it is a deliberate failover: the source stops
//!   renewing the lease, the destination stops its copy, and the source
//!   restores its last checkpoint only once the lease is out: the two copies
//!   never run at once, and the guest finishes at the source and verifies.

use pcft_agent::migration::destination::{migrate_in, IncomingMigration};
use pcft_agent::migration::error::MigrationError;
use pcft_agent::migration::ft::failover::{restore_at_source, Failover};
use pcft_agent::migration::ft::staging::StagingLimits;
use pcft_agent::migration::progress::{CancelAnswer, CancelRefused, CommitPoint, Progress};
use pcft_agent::migration::source::{migrate_out, MigrateOut, MigrationOutcome};
use pcft_agent::vmm::dirty::DirtyTracking;
use pcft_agent::vmm::machine::{Machine, MachineConfig};
use pcft_agent::vmm::output::OutputSink;
use pcft_agent::vmm::run_log::overlap;
use pcft_agent::vmm::runner::{OutputGate, VmRunner};
use pcft_agent::wire::frame::{encode_message, Frame, FrameReader, FrameWriter};
use pcft_agent::wire::handshake;
use pcft_agent::wire::migration::MigrationMessage;
use pcft_agent::wire::payload::{DestinationStats, MigrationOptions, Mode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vm_fixtures::{FixtureKind, FixtureParams};

/// A cancel before the commit must end the migration within this (every wait
/// it could hang in is far longer: the reply timeout is a minute).
const PROMPTLY: Duration = Duration::from_secs(5);

/// A 2-vCPU ledger guest in `mem_mib` MiB, its working set all memory above
/// the boot structures.
fn ledger(mem_mib: u64, steps: u64) -> MachineConfig {
    let mem_bytes = mem_mib << 20;
    ledger_over(mem_mib, (mem_bytes - vm_fixtures::abi::WORKING_SET_GPA) / 4096, steps)
}

/// A 2-vCPU ledger guest in `mem_mib` MiB whose working set is `ws_pages` pages.
fn ledger_over(mem_mib: u64, ws_pages: u64, steps: u64) -> MachineConfig {
    let mem_bytes = mem_mib << 20;
    let fixture = FixtureParams { steps, ..FixtureParams::new(FixtureKind::Ledger, 2, ws_pages) };
    MachineConfig { mem_bytes, slot_bytes: mem_bytes.min(16 << 20), fixture, dirty_rate: None, net: None }
}

/// Boots the VM and runs it, as `pcft vm start` does at an agent.
async fn start_vm(name: &str, config: &MachineConfig) -> Arc<VmRunner> {
    let machine = Machine::boot(config.clone()).expect("boot the VM (root and /dev/kvm needed)");
    let gate = OutputGate { sink: OutputSink::log_only("source"), released: 0, hold: false };
    let runner = Arc::new(VmRunner::spawn(name, machine, gate).expect("runner"));
    runner.resume().await.expect("resume");
    runner
}

fn options(reply_timeout: Duration) -> MigrationOptions {
    MigrationOptions { reply_timeout_ms: reply_timeout.as_millis() as u64, ..MigrationOptions::default() }
}

/// Migrates `runner`'s VM to `to` in `mode` on a task of its own.
fn spawn_migration(
    runner: &Arc<VmRunner>,
    config: &MachineConfig,
    to: String,
    mode: Mode,
    options: MigrationOptions,
    progress: &Arc<Progress>,
) -> JoinHandle<Result<MigrationOutcome, MigrationError>> {
    let (runner, config, progress) = (Arc::clone(runner), config.clone(), Arc::clone(progress));
    tokio::spawn(async move {
        let staging = StagingLimits::default();
        migrate_out(MigrateOut {
            runner: &runner,
            vm: "cancel",
            config: &config,
            to: &to,
            mode,
            options,
            agent: "source",
            psk: None,
            staging: &staging,
            progress,
        })
        .await
    })
}

/// Waits until `what` holds (checked every 5 ms), at most `within`.
async fn until(what: &str, within: Duration, mut holds: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !holds() {
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The guest finishes where `runner` runs it, and matches its oracle.
async fn finishes_and_verifies(runner: &VmRunner, where_: &str) {
    until(&format!("the guest to finish at the {where_}"), Duration::from_secs(300), || {
        let status = runner.status();
        assert!(status.error.is_none(), "the VM failed at the {where_}: {:?}", status.error);
        status.finished
    })
    .await;
    runner.verify().await.unwrap_or_else(|e| panic!("the guest at the {where_} does not match its oracle: {e}"));
}

/// A destination agent's listening side: greets the source and reads
/// `Begin`; then accepts the source's demand channel (its second connection,
/// as the agent would), which comes on the receiver.
async fn greet(listener: TcpListener) -> (FrameReader, FrameWriter, MigrationMessage, oneshot::Receiver<FrameReader>) {
    let (stream, _) = listener.accept().await.expect("accept");
    stream.set_nodelay(true).unwrap();
    let (greeted, _role) = handshake::accept(stream, "destination", None).await.expect("greeting");
    let (mut rd, wr) = (greeted.rd, greeted.wr);
    let begin = match rd.read::<MigrationMessage>().await.expect("begin") {
        Frame::Message(begin @ MigrationMessage::Begin { .. }) => begin,
        other => panic!("expected Begin, got {other:?}"),
    };
    let (demand_tx, demand) = oneshot::channel();
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else { return };
        if let Ok((greeted, _role)) = handshake::accept(stream, "destination", None).await {
            let _ = demand_tx.send(greeted.rd);
        }
    });
    (rd, wr, begin, demand)
}

async fn send(wr: &mut FrameWriter, message: &MigrationMessage) {
    wr.write(&encode_message(message)).await.expect("write");
}

/// The next message from the source (page frames skipped); None once it closed.
async fn next_message(rd: &mut FrameReader) -> Option<MigrationMessage> {
    loop {
        match rd.read::<MigrationMessage>().await {
            Ok(Frame::Message(m)) => return Some(m),
            Ok(Frame::Pages(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// Asks for a cancel before the commit (the guest still running, or paused
/// for the switchover): it must be an abort.
fn cancel_before_commit(progress: &Progress, runner: &VmRunner) {
    assert!(!runner.status().finished, "the guest must not have finished before the cancel");
    assert_eq!(progress.request_cancel(), Ok(CancelAnswer::WillAbort));
    assert_eq!(progress.request_cancel(), Err(CancelRefused::AlreadyEnding), "asked twice");
}

/// The migration ends promptly with `Cancelled`, nothing committed.
async fn ends_cancelled(migration: JoinHandle<Result<MigrationOutcome, MigrationError>>, progress: &Progress) {
    let asked = Instant::now();
    let result = tokio::time::timeout(PROMPTLY, migration)
        .await
        .unwrap_or_else(|_| panic!("a cancel before the commit did not end the migration within {PROMPTLY:?}"))
        .expect("the migration task");
    match result {
        Err(e @ MigrationError::Cancelled) => {
            assert!(e.to_string().contains("keeps running at the source"), "{e}");
        }
        Err(e) => panic!("expected Cancelled, got the error {e}"),
        Ok(_) => panic!("expected Cancelled, got an outcome (the migration committed)"),
    }
    assert_eq!(progress.phase(), "failed");
    assert_eq!(progress.commit_point(), CommitPoint::Ended { cancelled: true });
    eprintln!("cancelled {:.1} ms after the request", asked.elapsed().as_secs_f64() * 1e3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_the_destination_does_not_greet_ends_the_migration() {
    let config = ledger(8, 40_000);
    let runner = start_vm("cancel-greet", &config).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap().to_string();
    // Accepts the connection and says nothing.
    let silent = tokio::spawn(async move { listener.accept().await.map(|(stream, _)| stream) });
    let progress = Arc::new(Progress::new(Mode::Postcopy));
    let migration = spawn_migration(&runner, &config, to, Mode::Postcopy, options(Duration::from_secs(60)), &progress);
    let _held = silent.await.unwrap().expect("the source connects");
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel_before_commit(&progress, &runner);
    ends_cancelled(migration, &progress).await;
    finishes_and_verifies(&runner, "source").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_waiting_for_restored_resumes_the_vm_at_the_source_and_tells_the_destination() {
    let config = ledger(8, 40_000);
    let runner = start_vm("cancel-restored", &config).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let (switched_tx, switched) = oneshot::channel();
    // Ready, takes the VM's state, and never answers `Restored`; then reports what came next.
    let destination = tokio::spawn(async move {
        let (mut rd, mut wr, _, _demand) = greet(listener).await;
        send(&mut wr, &MigrationMessage::Ready).await;
        loop {
            match next_message(&mut rd).await {
                Some(MigrationMessage::Switchover { .. }) => break,
                Some(_) => continue,
                None => panic!("closed before Switchover"),
            }
        }
        switched_tx.send(()).unwrap();
        next_message(&mut rd).await
    });
    let progress = Arc::new(Progress::new(Mode::Postcopy));
    let migration = spawn_migration(&runner, &config, to, Mode::Postcopy, options(Duration::from_secs(60)), &progress);
    switched.await.expect("the source sent Switchover");
    assert_eq!(progress.phase(), "switchover");
    cancel_before_commit(&progress, &runner);
    ends_cancelled(migration, &progress).await;
    match destination.await.unwrap() {
        Some(MigrationMessage::Abort { reason, paused: false }) => {
            assert!(reason.contains("cancelled") && reason.contains("keeps running at the source"), "{reason}");
        }
        other => panic!("the destination should hear Abort, not {other:?}"),
    }
    finishes_and_verifies(&runner, "source").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_a_precopy_write_is_blocked_resumes_the_vm_at_the_source() {
    // 64 MiB, all but the guest's 1 MiB working set filled with data (zero
    // pages cost a few bytes): the full copy fills the socket's buffers long
    // before it is out.
    let config = ledger_over(64, 256, 40_000);
    let runner = start_vm("cancel-precopy", &config).await;
    let memory = runner.memory();
    let filler = vec![0xa5u8; 1 << 20];
    for gpa in (config.fixture.ws_end()..config.mem_bytes).step_by(filler.len()) {
        memory.write(gpa, &filler).unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let (ready_tx, ready) = oneshot::channel();
    // Ready, and then it reads nothing more (a frozen destination).
    let destination = tokio::spawn(async move {
        let (rd, mut wr, _, _demand) = greet(listener).await;
        send(&mut wr, &MigrationMessage::Ready).await;
        ready_tx.send(()).unwrap();
        (rd, wr)
    });
    let progress = Arc::new(Progress::new(Mode::Precopy));
    let migration = spawn_migration(&runner, &config, to, Mode::Precopy, options(Duration::from_secs(60)), &progress);
    ready.await.expect("the destination said Ready");
    let _connection = destination.await.unwrap();
    until("the pre-copy", PROMPTLY, || progress.phase() == "precopy").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 64 MiB over loopback takes far less: the full copy is blocked on the destination.
    assert!(!migration.is_finished());
    assert_eq!(progress.pages_sent(), 0, "the full copy is not out");
    cancel_before_commit(&progress, &runner);
    ends_cancelled(migration, &progress).await;
    finishes_and_verifies(&runner, "source").await;
}

/// What a scripted destination saw after it answered `Restored`.
#[derive(Debug, PartialEq, Eq)]
enum Saw {
    Go,
    Abort,
}

/// When the scripted destination asks for the cancel.
#[derive(Clone, Copy, Debug)]
enum CancelAt {
    /// Then it answers `Restored` this long after.
    BeforeRestored(Duration),
    /// It answers `Restored`, lets the source's tasks run this many turns, and asks.
    AfterRestored(u32),
    /// It answers `Restored` and asks once the source has committed.
    AfterCommit,
}

/// One migration whose cancel races the commit: the scripted destination
/// takes the VM's state and asks for the cancel (as an operator would, at the
/// source's `Progress`) at `at` around its `Restored`. Returns the cancel's
/// answer and what the destination saw next; checks that the migration's end
/// agrees with both.
async fn race_once(runner: &Arc<VmRunner>, config: &MachineConfig, at: CancelAt) -> Saw {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let progress = Arc::new(Progress::new(Mode::Postcopy));
    let canceller = Arc::clone(&progress);
    let destination = tokio::spawn(async move {
        let (mut rd, mut wr, _, _demand) = greet(listener).await;
        send(&mut wr, &MigrationMessage::Ready).await;
        while !matches!(next_message(&mut rd).await.expect("Switchover"), MigrationMessage::Switchover { .. }) {}
        let answer = match at {
            CancelAt::BeforeRestored(then) => {
                let answer = canceller.request_cancel();
                tokio::time::sleep(then).await;
                // The source may have closed already.
                let _ = wr.write(&encode_message(&MigrationMessage::Restored)).await;
                answer
            }
            CancelAt::AfterRestored(yields) => {
                send(&mut wr, &MigrationMessage::Restored).await;
                // Each yield lets the source's tasks (on both workers) run on a little.
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                }
                canceller.request_cancel()
            }
            CancelAt::AfterCommit => {
                send(&mut wr, &MigrationMessage::Restored).await;
                until("the commit", PROMPTLY, || canceller.commit_point() != CommitPoint::Open).await;
                canceller.request_cancel()
            }
        };
        let saw = match next_message(&mut rd).await {
            Some(MigrationMessage::Go) => Saw::Go,
            Some(MigrationMessage::Abort { .. }) => Saw::Abort,
            other => panic!("after Restored: {other:?}"),
        };
        // Closes: after `Go` this destination is lost (it never runs the VM).
        drop((rd, wr));
        (answer, saw)
    });
    let migration = spawn_migration(runner, config, to, Mode::Postcopy, options(Duration::from_secs(60)), &progress);
    let (answer, saw) = destination.await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), migration).await.expect("the migration ends").unwrap();
    match (&answer, &saw, &result) {
        (Ok(CancelAnswer::WillAbort), Saw::Abort, Err(MigrationError::Cancelled)) => {}
        (Err(CancelRefused::PastCommit), Saw::Go, Err(MigrationError::LostAfterCommit(_))) => {
            // This destination never ran the VM: run the source's paused copy again for the next round.
            runner.resume().await.unwrap();
        }
        _ => panic!(
            "{at:?}: the cancel, the commit and the end disagree: {answer:?}, the destination saw {saw:?}, the migration {}",
            match &result {
                Ok(_) => "ended with an outcome".to_string(),
                Err(e) => format!("failed: {e}"),
            }
        ),
    }
    saw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_the_commit_is_answered_for_what_happened() {
    let config = ledger(8, 100_000);
    let runner = start_vm("cancel-race", &config).await;
    let before = race_once(&runner, &config, CancelAt::BeforeRestored(Duration::from_millis(50))).await;
    assert_eq!(before, Saw::Abort, "a cancel before Restored aborts");
    // Close races: the source reads `Restored` and commits within a few turns.
    let mut seen = Vec::new();
    for turns in (0..60).chain(0..60) {
        seen.push(race_once(&runner, &config, CancelAt::AfterRestored(turns)).await);
    }
    let after = race_once(&runner, &config, CancelAt::AfterCommit).await;
    assert_eq!(after, Saw::Go, "a cancel after the commit is refused");
    eprintln!("races: {seen:?}");
    finishes_and_verifies(&runner, "source").await;
}

/// A real destination agent's side, in this process: returns how its
/// migration ended and its VM's runner (once the VM ran there).
type Incoming = JoinHandle<(Result<DestinationStats, MigrationError>, Option<Arc<VmRunner>>)>;

fn spawn_destination(listener: TcpListener) -> Incoming {
    tokio::spawn(async move {
        let (rd, wr, begin, demand) = greet(listener).await;
        let MigrationMessage::Begin { name, config, mode, options, demand_token } = begin else { unreachable!() };
        let demand = demand_token.map(|_| demand);
        let config = *config;
        let ran: Arc<Mutex<Option<Arc<VmRunner>>>> = Arc::default();
        let on_running = {
            let ran = Arc::clone(&ran);
            move |runner| *ran.lock().unwrap() = Some(runner)
        };
        let sink = OutputSink::log_only("destination");
        let result =
            migrate_in(IncomingMigration { rd, wr, demand, name, config, mode, options, sink }, on_running).await;
        let runner = ran.lock().unwrap().take();
        (result, runner)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_postcopy_ft_a_cancel_after_the_commit_is_refused_and_the_migration_completes() {
    let config = ledger(32, 100_000);
    let runner = start_vm("cancel-postcopy", &config).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let destination = spawn_destination(listener);
    let progress = Arc::new(Progress::new(Mode::Postcopy));
    // A slow push: post-copy lasts seconds.
    let options = MigrationOptions { postcopy_pages_per_sec: 2048, ..options(Duration::from_secs(60)) };
    let migration = spawn_migration(&runner, &config, to, Mode::Postcopy, options, &progress);
    until("post-copy", Duration::from_secs(60), || progress.phase() == "postcopy").await;
    let refused = progress.request_cancel();
    assert_eq!(refused, Err(CancelRefused::PastCommit));
    let reason = refused.unwrap_err().to_string();
    assert!(reason.contains("runs only at the destination") && reason.contains("--mode postcopy-ft"), "{reason}");
    let outcome = migration.await.unwrap().expect("the migration completes");
    assert!(matches!(outcome, MigrationOutcome::Completed(_)), "a refused cancel changes nothing");
    let (result, at_destination) = destination.await.unwrap();
    result.expect("the destination completes");
    finishes_and_verifies(&at_destination.expect("the VM runs at the destination"), "destination").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postcopy_ft_cancel_after_the_commit_fails_over_once_the_lease_is_out() {
    // A 4 MiB working set in 32 MiB: the guest asks for few pages, the rest go by the slow push.
    let config = ledger_over(32, 1024, 200_000);
    let runner = start_vm("cancel-ft", &config).await;
    let source_runs = runner.run_log();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let destination = spawn_destination(listener);
    let progress = Arc::new(Progress::new(Mode::PostcopyFt));
    // A slow push: post-copy lasts 8 s, checkpoints every 100 ms meanwhile.
    let options = MigrationOptions { postcopy_pages_per_sec: 1024, ..options(Duration::from_secs(60)) };
    let lease = Duration::from_millis(options.heartbeat_timeout_ms);
    let migration = spawn_migration(&runner, &config, to, Mode::PostcopyFt, options, &progress);
    until("two checkpoints", Duration::from_secs(60), || progress.checkpoints_committed() >= 2).await;
    assert_eq!(progress.phase(), "postcopy");
    let asked = Instant::now();
    assert_eq!(progress.request_cancel(), Ok(CancelAnswer::WillFailOver));
    assert_eq!(progress.request_cancel(), Err(CancelRefused::AlreadyEnding), "asked twice");

    // At once: not at the end of post-copy (the hand-over refuses a cancel that came first, too).
    let outcome =
        tokio::time::timeout(Duration::from_secs(2), migration).await.expect("the source lets go at once").unwrap();
    let Ok(MigrationOutcome::DestinationLost { report, committed, detected_at, fenced_at, destination_released }) =
        outcome
    else {
        panic!("expected a deliberate failover, got {:?}", outcome.err());
    };
    assert!(report.cancelled, "the report says the operator asked for it");
    assert!(report.pages_sent < config.mem_bytes / 4096, "post-copy was cut short ({} pages sent)", report.pages_sent);
    let failure = report.failure.as_deref().expect("a failure report");
    assert_eq!(failure.kind, "cancelled");
    assert!(failure.reason.contains("operator cancelled"), "{}", failure.reason);
    assert!(committed.epoch >= 2, "the last committed checkpoint (epoch {})", committed.epoch);
    // The destination's heartbeats said how far it released: only committed output.
    assert!(destination_released <= committed.state.devices.output_log.len() as u64);
    assert!(detected_at >= asked);
    // The destination is alive: the source waits out the lease it last renewed, not less.
    assert!(fenced_at > detected_at, "no lease wait after a cancel");
    assert!(
        fenced_at <= detected_at + lease.mul_f64(1.1) + Duration::from_millis(10),
        "the lease wait is from the last renewal"
    );
    assert_eq!(progress.commit_point(), CommitPoint::Ended { cancelled: true });
    assert_eq!(progress.phase(), "recovered");

    // The destination stops its copy for good, for the source to recover the VM.
    let (result, at_destination) =
        tokio::time::timeout(Duration::from_secs(10), destination).await.expect("the destination ends").unwrap();
    let error = result.expect_err("the destination must not keep the VM");
    assert!(error.fenced_here(), "the destination's copy is stopped for good: {error}");
    let destination_runs = at_destination.expect("the VM ran at the destination").run_log();

    let sink = OutputSink::log_only("source");
    let failover = Failover { vm: "cancel", runner, committed, fenced_at, sink, destination_released };
    let (restored, failed_over) = restore_at_source(failover, || DirtyTracking::Bitmap).await.expect("failover");
    assert!(Instant::now() >= fenced_at, "restored only once the lease is out");
    assert!(failed_over.restored_epoch >= 2);
    finishes_and_verifies(&restored, "source").await;

    let mut at_source = source_runs.snapshot().intervals;
    at_source.extend(restored.run_log().snapshot().intervals);
    let at_destination = destination_runs.snapshot().intervals;
    assert!(!at_destination.is_empty(), "the VM ran at the destination before the cancel");
    assert_eq!(overlap(&at_source, &at_destination), Duration::ZERO, "the two copies ran at once");
}
