//! `--prefill`: a fixture that starts with all of its memory written still
//! meets its oracle, here and after a migration, and no page of it is zero
//! but the boot image's own.

use pcft_tests::{pcft_json, pcft_output, run_json, start_vm, Agent};

#[test]
fn every_fixture_verifies_prefilled() {
    for fixture in ["ledger", "dirty", "idle"] {
        let run = run_json(&["vm", "run", "--fixture", fixture, "--prefill", "--mem", "64M", "--vcpus", "2"]);
        assert!(run.verified(), "{fixture} --prefill did not verify");
        let plain = run_json(&["vm", "run", "--fixture", fixture, "--mem", "64M", "--vcpus", "2"]);
        assert_ne!(run.memory_digest(), plain.memory_digest(), "{fixture}: the prefill is part of the memory checked");
    }
}

#[test]
fn a_prefilled_guest_has_no_zero_page_but_its_boot_image_s() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("prefilled.snap");
    let snap_arg = snap.to_str().unwrap();
    let args = ["vm", "run", "--fixture", "ledger", "--prefill", "--mem", "64M", "--vcpus", "2"];
    let (code, _, err) = pcft_output(&[&args[..], &["--snapshot-out", snap_arg, "--snapshot-at-record", "1"]].concat());
    assert_eq!(code, Some(0), "{err}");
    // A snapshot holds exactly the pages that are not all zero.
    let inspect = pcft_json(&["vm", "inspect", snap_arg, "--json"]);
    let params: vm_fixtures::FixtureParams = serde_json::from_value(inspect["fixture"].clone()).unwrap();
    assert!(params.prefill);
    let mem = 64 << 20;
    let boot_pages: u64 = params.boot_ranges(mem).iter().map(|r| (r.end - r.start) / 4096).sum();
    let pages = inspect["pages"].as_u64().unwrap();
    assert!(pages >= mem / 4096 - boot_pages, "{pages} non-zero pages of {}: {inspect}", mem / 4096);
}

#[test]
fn a_prefilled_guest_migrates_in_post_copy_and_verifies() {
    let (source, destination) = (Agent::start("source", &[]), Agent::start("destination", &[]));
    start_vm(
        &source.addr,
        "full",
        &["--fixture", "ledger", "--mem", "128M", "--vcpus", "2", "--steps", "40000", "--prefill"],
    );
    let report = pcft_json(&[
        "migrate",
        "full",
        "--agent",
        &source.addr,
        "--to",
        &destination.addr,
        "--mode",
        "postcopy",
        "--json",
    ]);
    // Every page moves whole: none is a zero page but the boot image's.
    let boot_pages: u64 = vm_fixtures::FixtureParams::new(vm_fixtures::FixtureKind::Ledger, 2, 1)
        .boot_ranges(128 << 20)
        .iter()
        .map(|r| (r.end - r.start) / vm_fixtures::abi::PAGE_SIZE)
        .sum();
    let zero = report["zero_pages"].as_u64().unwrap();
    assert!(zero <= boot_pages, "{zero} zero pages, more than the {boot_pages} of the boot image: {report}");
    assert!(report["bytes_sent"].as_u64().unwrap() >= 128 << 20, "{report}");
    let verified = pcft_json(&["vm", "wait", "full", "--agent", &destination.addr, "--json", "--timeout", "120"]);
    assert_eq!(verified["verified"], true, "{verified}");
}
