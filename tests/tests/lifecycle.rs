//! An operator's life cycle of VMs on an agent: stop, list, remove, the
//! release of an ended VM's memory, name reuse and agent-wide memory admission.

use pcft_tests::{pcft_json, pcft_output, start_vm, Agent};
use serde_json::Value;
use std::time::{Duration, Instant};

const FOREVER: &[&str] = &["--mem", "64M", "--fixture", "idle", "--forever"];

fn vm_of(agent: &str, name: &str) -> Option<Value> {
    let status = pcft_json(&["vm", "list", "--agent", agent, "--json"]);
    status["vms"].as_array().expect("a list").iter().find(|vm| vm["name"] == name).cloned()
}

/// Polls VM `name` until `done` holds of it (at most 20 s).
fn until(agent: &str, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let vm = vm_of(agent, name).unwrap_or(Value::Null);
        if done(&vm) {
            return vm;
        }
        assert!(Instant::now() < deadline, "VM {name} never became {what}: {vm}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vm_is_stopped_released_removed_and_its_name_reused() {
    let agent = Agent::start("a", &["--release-after", "1"]);
    let a = agent.addr.as_str();
    start_vm(a, "v1", FOREVER);

    let (code, _, err) = pcft_output(&["vm", "rm", "v1", "--agent", a]);
    assert_eq!(code, Some(2), "a running VM is not removed: {err}");
    assert!(err.contains("it is running: stop it first (pcft vm stop)"), "{err}");
    let (code, _, err) = pcft_output(&["vm", "start", "--agent", a, "--name", "v1", "--mem", "64M", "--forever"]);
    assert_eq!(code, Some(2), "its name is taken: {err}");
    assert!(err.contains("already runs") && err.contains("(running)"), "{err}");

    let stopped = pcft_json(&["vm", "stop", "v1", "--agent", a, "--json"]);
    assert_eq!((stopped["stopped"].as_bool(), stopped["was"].as_str()), (Some(true), Some("running")), "{stopped}");
    let vm = vm_of(a, "v1").expect("a stopped VM keeps its record");
    assert_eq!(vm["phase"], "stopped", "{vm}");
    let again = pcft_json(&["vm", "stop", "v1", "--agent", a, "--json"]);
    assert_eq!(again["was"], "stopped", "stopping twice is harmless: {again}");
    // --release-after 1: its memory goes, its record stays.
    until(a, "v1", "released", |vm| vm["memory_released"] == true && vm["phase"] == "stopped");
    let (_, text, _) = pcft_output(&["vm", "list", "--agent", a]);
    assert!(text.contains("stopped") && text.contains("(memory released)"), "{text}");

    // A stopped VM's name is free for a new VM, which replaces the record.
    start_vm(a, "v1", FOREVER);
    let vm = vm_of(a, "v1").expect("the new VM");
    assert_eq!((vm["phase"].as_str(), vm["memory_released"].as_bool()), (Some("running"), Some(false)), "{vm}");
    pcft_json(&["vm", "stop", "v1", "--agent", a, "--json"]);
    let removed = pcft_json(&["vm", "rm", "v1", "--agent", a, "--json"]);
    assert_eq!(removed["removed"], true, "{removed}");
    assert!(vm_of(a, "v1").is_none(), "removed VMs leave the list");
    let (code, _, err) = pcft_output(&["vm", "stop", "v1", "--agent", a]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no VM named \"v1\""), "{err}");
}

#[test]
fn a_finished_vm_is_still_verified_after_its_memory_is_released() {
    let agent = Agent::start("a", &["--release-after", "0"]);
    let a = agent.addr.as_str();
    start_vm(a, "l", &["--mem", "64M", "--fixture", "ledger", "--steps", "200"]);
    let first = pcft_json(&["vm", "wait", "l", "--agent", a, "--json", "--timeout", "60"]);
    let vm = until(a, "l", "released", |vm| vm["memory_released"] == true);
    assert_eq!(vm["phase"], "finished", "{vm}");
    assert_eq!(vm["records"], first["records"], "the record keeps its count: {vm}");
    let again = pcft_json(&["vm", "wait", "l", "--agent", a, "--json", "--timeout", "5"]);
    assert_eq!(again["verified"], true, "{again}");
    assert_eq!(again["memory_digest"], first["memory_digest"], "the verdict made before the release");
    let (code, _, err) = pcft_output(&["migrate", "l", "--agent", a, "--to", "127.0.0.1:9"]);
    assert_eq!(code, Some(2), "a finished VM is not migrated: {err}");
    assert!(err.contains("its workload finished"), "{err}");
}

#[test]
fn the_agents_vms_together_stay_within_its_memory_limit() {
    let agent = Agent::start("a", &["--max-total-guest-mem", "160M"]);
    let a = agent.addr.as_str();
    start_vm(a, "v1", FOREVER);
    start_vm(a, "v2", FOREVER);
    let (code, _, err) = pcft_output(&["vm", "start", "--agent", a, "--name", "v3", "--mem", "64M", "--forever"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("holds 128 MiB of guest memory for 2 VM(s)") && err.contains("--max-total-guest-mem"),
        "{err}"
    );
    // A stopped VM still holds its memory until it is released or removed.
    pcft_json(&["vm", "stop", "v2", "--agent", a, "--json"]);
    let (code, _, err) = pcft_output(&["vm", "start", "--agent", a, "--name", "v3", "--mem", "64M", "--forever"]);
    assert_eq!(code, Some(2), "{err}");
    pcft_json(&["vm", "rm", "v2", "--agent", a, "--json"]);
    start_vm(a, "v3", FOREVER);
}
