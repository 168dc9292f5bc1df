//! One copy at a time, checked from the agents' own vCPU run logs (`RunLog`,
//! which counts a vCPU still inside `KVM_RUN` as running until now), for a
//! failure the demo cannot inject: the destination's resume at `Go` starts
//! vCPU 0 and then fails (`pcft agent --fail-resume`, hidden). The destination
//! must stop the part of the VM that runs before it tells the source, which
//! restores at once only because the destination says so (`Abort { paused:
//! true }`); the VM finishes at the source and verifies, the destination keeps
//! its copy stopped, and the two copies' run intervals never overlap. (In
//! post-copy the half-resumed vCPU soon blocks on its first missing page, so
//! the old code's harm on this path, a dead copy's vCPU running on zero pages
//! once the memory left userfaultfd, lasted well under a millisecond here:
//! agent/tests/dead_copy_kvm.rs checks that part on its own.)

use pcft_agent::agent::client::AgentClient;
use pcft_agent::vmm::run_log::{overlap, RunInterval};
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::VmPhase;
use pcft_tests::{ledger_digest, migrate, pcft_json, start_vm, Agent};
use std::time::Duration;

const LEDGER: [&str; 8] = ["--fixture", "ledger", "--mem", "64M", "--vcpus", "2", "--steps", "40000"];

/// The VM's run intervals and phase at the agent at `addr`.
fn runs_at(addr: &str) -> (Vec<RunInterval>, Option<VmPhase>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = AgentClient::connect_with(addr, None).await.expect("connect");
        let runs = match client.request(&ControlMessage::RunLog { name: "vm1".into() }).await.expect("run log") {
            ControlMessage::RunLogReport { runs, .. } => runs.intervals,
            other => panic!("{other:?}"),
        };
        let phase = match client.request(&ControlMessage::Status).await.expect("status") {
            ControlMessage::StatusReport { vms, .. } => vms.into_iter().find(|v| v.name == "vm1").map(|v| v.phase),
            other => panic!("{other:?}"),
        };
        (runs, phase)
    })
}

#[test]
fn a_resume_that_fails_half_way_is_stopped_before_the_source_restores() {
    let source = Agent::start("source", &[]);
    let destination = Agent::start("destination", &["--fail-resume"]);
    start_vm(&source.addr, "vm1", &LEDGER);
    std::thread::sleep(Duration::from_millis(200));
    let (code, out, err) =
        migrate("vm1", &source.addr, &destination.addr, "postcopy-ft", &["--postcopy-rate", "4096", "--json"]);
    assert_eq!(code, Some(1), "the destination failed at Go: {err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert!(report["failover"].is_object(), "the source recovered the VM: {report}");
    assert!(
        report["failure"]["reason"].as_str().is_some_and(|r| r.contains("resume failed")),
        "the destination said why: {report}"
    );

    let verified = pcft_json(&["vm", "wait", "vm1", "--agent", &source.addr, "--json"]);
    assert_eq!(verified["memory_digest"], ledger_digest(64, 2, 40_000).0.as_str(), "{verified}");
    let (at_source, _) = runs_at(&source.addr);
    let (at_destination, phase) = runs_at(&destination.addr);
    assert!(at_destination.iter().any(|i| i.vcpu == 0), "vCPU 0 did run at the destination: {at_destination:?}");
    assert_eq!(phase, Some(VmPhase::Failed), "the destination keeps its copy stopped");
    assert_eq!(overlap(&at_source, &at_destination), Duration::ZERO, "{at_source:?} vs {at_destination:?}");
}

/// The hand-over left unconfirmed: the destination takes the VM on `Finish`
/// and freezes before it answers `Finished` (`pcft agent --crash-at
/// after-finish --crash-signal stop`, via the demo's freeze). The source
/// hears nothing for its patience (30 s), reports `finish-unconfirmed` naming
/// the destination, and must not restore its own copy: when the destination
/// is continued it runs the VM, and exactly one copy runs, there.
#[test]
fn an_unconfirmed_hand_over_leaves_exactly_one_copy_at_the_destination() {
    let (code, out, err) = pcft_tests::pcft_output(&[
        "demo",
        "--fail-kind",
        "freeze",
        "--fail-at",
        "after-finish",
        "--mem",
        "64M",
        "--steps",
        "40000",
        "--postcopy-rate",
        "4096",
    ]);
    let story = format!("{out}\n{err}");
    assert_eq!(code, Some(1), "the migration did not complete: {story}");
    let first_error = err.lines().find(|l| l.starts_with("pcft: error:")).unwrap_or_default();
    assert!(first_error.contains("did not confirm Finish"), "{story}");
    assert!(first_error.contains("keeps its copy stopped"), "{story}");
    assert!(first_error.contains("check `pcft status` on 127.0.0.1:"), "names the destination: {story}");
    let one_copy = err.lines().find(|l| l.contains("one copy at a time:")).unwrap_or_default();
    assert!(one_copy.contains("never ran at once"), "{story}");
    assert!(one_copy.contains("one copy at the end, at the destination"), "{story}");
}
