//! A dead post-copy copy on real KVM: its vCPUs are blocked in userfaultfd on
//! pages that will never come (the source is lost), and its lease has run out.
//! Stopping it for good must not let a vCPU complete the instruction it is
//! blocked in (on a zero page, after the lease): the pages it waits for are
//! revoked before the memory leaves userfaultfd, so it faults out of
//! `KVM_RUN` instead. Checked on what each vCPU reports and on the pages.

use pcft_agent::clock::BootTime;
use pcft_agent::vmm::fence::Fence;
use pcft_agent::vmm::machine::{Machine, MachineConfig, MachineError, MachineEvent};
use pcft_agent::vmm::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use pcft_agent::vmm::uffd::FaultRegion;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_fixtures::{FixtureKind, FixtureParams};

fn config(vcpus: u64) -> MachineConfig {
    let mem_bytes = 8 << 20;
    let ws_pages = (mem_bytes - vm_fixtures::abi::WORKING_SET_GPA) / 4096;
    let fixture = FixtureParams { steps: 50_000_000, ..FixtureParams::new(FixtureKind::Ledger, vcpus, ws_pages) };
    MachineConfig { mem_bytes, slot_bytes: 4 << 20, fixture, dirty_rate: None, net: None }
}

#[test]
fn a_vcpu_blocked_on_a_page_that_never_comes_faults_out_instead_of_running_on() {
    let mut source = Machine::boot(config(2)).expect("boot");
    source.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let state = source.capture().unwrap();
    let working_set = vm_fixtures::abi::WORKING_SET_GPA..state.config.mem_bytes;

    // The destination's memory: everything but the working set arrived.
    let memory = Arc::new(GuestMemory::new(state.config.mem_bytes, state.config.slot_bytes).unwrap());
    let region = FaultRegion::register(Arc::clone(&memory)).unwrap();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for gpa in (0..state.config.mem_bytes).step_by(PAGE_SIZE as usize).filter(|gpa| !working_set.contains(gpa)) {
        source.memory().read(gpa, &mut page).unwrap();
        region.install_page(gpa, Some(&page)).unwrap();
    }
    drop(source);

    let fence = Fence::new(BootTime::now() + Duration::from_millis(100));
    let mut prepared = Machine::prepare(state.config.clone(), Arc::clone(&memory)).unwrap();
    prepared.set_fence(Arc::clone(&fence));
    let mut machine = prepared.restore(state).unwrap();
    machine.resume().unwrap();
    // The vCPUs block on working-set pages; nobody serves them. The lease runs out.
    std::thread::sleep(Duration::from_millis(300));
    assert!(fence.tripped());

    // Stop for good, as the destination does: revoke what they wait for, then unregister.
    let blocked: Vec<u64> = region.queued_faults().unwrap().iter().map(|fault| fault.gpa).collect();
    assert!(!blocked.is_empty(), "the vCPUs wait for working-set pages");
    memory.revoke_pages(&blocked).unwrap();
    let pausing = std::thread::spawn(move || {
        let started = Instant::now();
        let paused = machine.pause();
        (machine, paused, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(2));
    drop(region);
    let (mut machine, paused, took) = pausing.join().unwrap();
    paused.expect("every vCPU answers the pause");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let mut reasons = Vec::new();
    // Failures come one per next_event call after the pause.
    loop {
        match machine.next_event(Duration::from_millis(50)) {
            Err(MachineError::VcpuFailed { vcpu, reason }) => reasons.push((vcpu, reason)),
            Ok(Some(MachineEvent::Output(_))) => {}
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("vCPU outcomes: {reasons:?}");
    // A vCPU that completed its instruction on a zero page would have come back
    // to the VMM normally and then found itself fenced; these fault out on the
    // revoked page (KVM reports the access as MMIO: no memory backs it).
    let faulted = reasons.iter().filter(|(_, reason)| !reason.contains("fenced")).count();
    assert!(faulted >= 1, "a blocked vCPU faulted out of KVM_RUN: {reasons:?}");
    for gpa in blocked {
        assert!(matches!(memory.read_u64(gpa), Err(MemoryError::Revoked { .. })), "{gpa:#x} stays revoked");
    }
}
