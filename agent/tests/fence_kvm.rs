//! The fence on real KVM, at its worst moments: every vCPU thread stalls
//! right between its fence check and `KVM_RUN` until long past the lease's
//! deadline, and the lease watchdog stalls as long (`pcft_agent::fault`'s
//! stall-fence hooks, the same ones `pcft demo --fail-kind stall-fence`
//! uses). The guest must not run one instruction past the deadline (plus the
//! stop margin the source's wait allows): the kick handler's `immediate_exit`
//! and each vCPU thread's deadline timer must stop it, since the watchdog is
//! stalled. Checked on the vCPUs' own run log, and on the guest's progress.
//!
//! Its own test binary: the fault hooks are process-wide.

use pcft_agent::clock::BootTime;
use pcft_agent::migration::ft::lease::STOP_MARGIN;
use pcft_agent::vmm::fence::Fence;
use pcft_agent::vmm::machine::{Machine, MachineConfig, MachineError, MachineEvent};
use std::time::{Duration, Instant};
use vm_fixtures::{FixtureKind, FixtureParams};

fn config(vcpus: u64) -> MachineConfig {
    let mem_bytes = 8 << 20;
    let ws_pages = (mem_bytes - vm_fixtures::abi::WORKING_SET_GPA) / 4096;
    let fixture = FixtureParams { steps: 50_000_000, ..FixtureParams::new(FixtureKind::Ledger, vcpus, ws_pages) };
    MachineConfig { mem_bytes, slot_bytes: 4 << 20, fixture, dirty_rate: None, net: None }
}

/// Drains the machine's events for `time`; returns output records seen and vCPU failures.
fn pump(machine: &mut Machine, time: Duration) -> (usize, Vec<String>) {
    let (mut records, mut failures) = (0, Vec::new());
    let until = Instant::now() + time;
    while Instant::now() < until {
        match machine.next_event(Duration::from_millis(5)) {
            Ok(Some(MachineEvent::Output(_))) => records += 1,
            Ok(_) => {}
            Err(MachineError::VcpuFailed { reason, .. }) => failures.push(reason),
            Err(e) => panic!("{e}"),
        }
    }
    (records, failures)
}

#[test]
fn a_vcpu_stalled_between_its_fence_check_and_kvm_run_never_runs_past_the_deadline() {
    // The VM runs a while, then is captured and rebuilt with a fence, as a
    // PostCopyFT destination does at the switchover.
    let mut first = Machine::boot(config(2)).expect("boot");
    first.resume().unwrap();
    let (records, _) = pump(&mut first, Duration::from_millis(200));
    assert!(records > 0, "the guest makes progress");
    let state = first.capture().unwrap();
    let memory = first.memory_handle();
    drop(first);

    let lease = Duration::from_millis(150);
    let hold = Duration::from_millis(600);
    let deadline = BootTime::now() + lease;
    let fence = Fence::new(deadline);
    let mut prepared = Machine::prepare(state.config.clone(), memory).expect("prepare");
    prepared.set_fence(fence.clone());
    let mut machine = prepared.restore(state).expect("restore");
    // From now on each vCPU thread stalls once past its fence check (before
    // KVM_RUN), and the watchdog once before it looks at the deadline.
    pcft_agent::fault::arm_stall_fence(hold);
    pcft_agent::fault::trigger_stall_fence();
    machine.resume().unwrap();
    let (_, failures) = pump(&mut machine, hold + Duration::from_millis(400));

    assert!(fence.tripped(), "the deadline passed: the fence is tripped");
    assert!(
        failures.len() == 2 && failures.iter().all(|f| f.contains("fenced")),
        "both vCPUs report themselves fenced: {failures:?}"
    );
    let late_by = machine
        .run_log()
        .snapshot()
        .intervals
        .iter()
        .map(|i| i.end_us)
        .max()
        .map(|end| Duration::from_micros(end).saturating_sub(deadline.since_boot()));
    assert!(
        late_by.is_none_or(|late| late <= STOP_MARGIN),
        "a vCPU was in the guest {late_by:?} past the deadline (allowed: {STOP_MARGIN:?}); runs: {:?}",
        machine.run_log().snapshot()
    );
    // And nothing more happened in the guest: its state does not move.
    let (records, _) = pump(&mut machine, Duration::from_millis(100));
    assert_eq!(records, 0, "a fenced guest emits nothing");
}
