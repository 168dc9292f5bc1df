//! Every fixture, run as a real `pcft` process on real KVM, matches the oracle
//! that this test computes itself from the same parameters.

use pcft_tests::{per_vcpu, run_json};
use vm_fixtures::{abi, DirtyPattern, FixtureKind, FixtureParams};

struct Case {
    kind: FixtureKind,
    vcpus: u64,
    mem_mib: u64,
    steps: u64,
    record_every: u64,
    extra: &'static [&'static str],
    pattern: DirtyPattern,
    writes_per_step: u64,
    spin: u64,
}

fn case(kind: FixtureKind, vcpus: u64, mem_mib: u64, steps: u64, record_every: u64) -> Case {
    let defaults = FixtureParams::new(kind, vcpus, 1);
    Case {
        kind,
        vcpus,
        mem_mib,
        steps,
        record_every,
        extra: &[],
        pattern: defaults.pattern,
        writes_per_step: 1,
        spin: defaults.spin,
    }
}

fn check(c: Case) {
    let ws_pages = ((c.mem_mib << 20) - abi::WORKING_SET_GPA) / abi::PAGE_SIZE;
    let params = FixtureParams {
        steps: c.steps,
        record_every: c.record_every,
        seed: 77,
        pattern: c.pattern,
        writes_per_step: c.writes_per_step,
        spin: c.spin,
        ..FixtureParams::new(c.kind, c.vcpus, ws_pages)
    };
    let expected = params.expected_after(c.steps);
    let (vcpus, mem, steps, every) =
        (c.vcpus.to_string(), format!("{}M", c.mem_mib), c.steps.to_string(), c.record_every.to_string());
    let mut args = vec![
        "vm",
        "run",
        "--fixture",
        c.kind.name(),
        "--mem",
        &mem,
        "--vcpus",
        &vcpus,
        "--steps",
        &steps,
        "--record-every",
        &every,
        "--seed",
        "77",
        "--timeout",
        "120",
    ];
    args.extend_from_slice(c.extra);
    let run = run_json(&args);
    assert_eq!(run.code, Some(0), "{:?}: {}", args, run.stderr);
    assert!(run.verified(), "{args:?}: {:?}", run.finished);
    assert_eq!(run.memory_digest(), expected.memory_digest(), "{args:?}: memory digest");
    assert_eq!(per_vcpu(&run.outputs, c.vcpus as usize), expected.outputs(), "{args:?}: output records");
    assert_eq!(run.outputs.len() as u64, c.vcpus * (c.steps / c.record_every));
}

#[test]
fn ledger_one_vcpu() {
    check(case(FixtureKind::Ledger, 1, 64, 5_000, 500));
}

#[test]
fn ledger_two_vcpus_several_writes_per_step() {
    check(Case {
        writes_per_step: 3,
        extra: &["--writes-per-step", "3"],
        ..case(FixtureKind::Ledger, 2, 128, 4_000, 400)
    });
}

#[test]
fn ledger_one_gib_two_vcpus() {
    check(case(FixtureKind::Ledger, 2, 1024, 10_000, 1_000));
}

#[test]
fn dirty_sequential() {
    check(Case {
        pattern: DirtyPattern::Sequential,
        extra: &["--pattern", "sequential"],
        ..case(FixtureKind::Dirty, 2, 32, 20_000, 2_000)
    });
}

#[test]
fn dirty_random() {
    check(case(FixtureKind::Dirty, 1, 64, 20_000, 5_000));
}

#[test]
fn dirty_hot_cold() {
    check(Case {
        pattern: DirtyPattern::HotCold { hot_pages: 16, hot_permille: 950 },
        extra: &["--pattern", "hot-cold", "--hot-pages", "16", "--hot-permille", "950"],
        ..case(FixtureKind::Dirty, 2, 64, 10_000, 1_000)
    });
}

#[test]
fn dirty_paced_rate_still_matches() {
    // 20k pages/s per vCPU for 2,000 writes: about 0.1 s of pacing on the TSC.
    check(Case { extra: &["--rate", "20000"], ..case(FixtureKind::Dirty, 1, 16, 2_000, 500) });
}

#[test]
fn idle_two_vcpus() {
    check(Case { spin: 200, extra: &["--spin", "200"], ..case(FixtureKind::Idle, 2, 8, 100, 10) });
}
