//! Snapshots and reports as the operator meets them (issue 15, items 10, 12
//! and 14): `--snapshot-out` without a point, past the end or where no file
//! can go; private snapshot files; a damaged header told from another
//! version; and the migration and demo reports, which print no unknown number
//! as 0 and say why the checkpoint they restored is the one restored.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn pcft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pcft"))
}

fn output(mut cmd: Command) -> (Output, String) {
    let out = cmd.output().expect("spawn pcft");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked: {stderr}");
    (out, stderr)
}

/// Runs `cmd` and checks it was refused as bad input before anything ran:
/// exit 2, one line on stderr with `needle`, nothing on stdout.
fn refused(cmd: Command, needle: &str) -> String {
    let what = format!("{cmd:?}");
    let (out, stderr) = output(cmd);
    assert_eq!(out.status.code(), Some(2), "{what}: stderr {stderr}");
    assert!(stderr.contains(needle), "{what}: expected {needle:?} in {stderr:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: one line, got {stderr:?}");
    assert!(out.stdout.is_empty(), "{what} ran: {}", String::from_utf8_lossy(&out.stdout));
    stderr
}

/// A small ledger run: 20 output records, done in well under a second.
fn small_run(extra: &[&str]) -> Command {
    let mut cmd = pcft();
    cmd.args(["vm", "run", "--fixture", "ledger", "--mem", "64M", "--steps", "2000", "--record-every", "100"]);
    cmd.args(extra);
    cmd
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

#[test]
fn snapshot_out_without_a_point_is_refused_before_the_run() {
    // It used to run the VM to the end and exit 0, with no file and no word.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("vm.snap");
    let needle = "needs a point to take the snapshot at: add --snapshot-at-record N or --snapshot-after-ms MS";
    refused(small_run(&["--snapshot-out", path_arg(&snap)]), needle);
    let mut restore = pcft();
    restore.args(["vm", "restore", "any.snap", "--snapshot-out", path_arg(&snap)]);
    refused(restore, needle);
    assert!(!snap.exists());
}

#[test]
fn a_snapshot_point_past_the_end_fails_and_says_where_the_run_ended() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("vm.snap");
    for point in [["--snapshot-at-record", "300"], ["--snapshot-after-ms", "600000"]] {
        let (out, stderr) = output(small_run(&[&["--snapshot-out", path_arg(&snap)][..], &point[..]].concat()));
        assert_eq!(out.status.code(), Some(1), "{point:?}: stderr {stderr}");
        assert!(stderr.contains("the VM finished after 20 output records"), "{point:?}: {stderr}");
        let named = format!("before the snapshot point ({} {})", point[0], point[1]);
        assert!(stderr.contains(&named), "{point:?}: {stderr}");
        assert!(stderr.contains(&format!("no snapshot was written to {}", snap.display())), "{stderr}");
        assert!(!snap.exists(), "{point:?}");
    }
}

#[test]
fn an_unwritable_snapshot_out_is_refused_before_the_run() {
    // It used to fail only after the whole run (exit 1), the OS error twice.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir/vm.snap");
    let stderr = refused(
        small_run(&["--snapshot-out", path_arg(&missing), "--snapshot-at-record", "3"]),
        "does not exist: create it, or write the snapshot elsewhere",
    );
    assert!(stderr.contains(&format!("cannot write a snapshot to {}", missing.display())), "{stderr}");
    refused(
        small_run(&["--snapshot-out", path_arg(dir.path()), "--snapshot-at-record", "3"]),
        "is a directory: name a file in it",
    );

    // A read-only file system (root writes anywhere else): mounted over the
    // directory in a mount namespace of the command's own.
    let script = format!(
        "mount -t tmpfs -o ro none {dir} && exec {pcft} vm run --fixture ledger --mem 64M --steps 2000 \
         --snapshot-out {dir}/vm.snap --snapshot-at-record 3",
        dir = dir.path().display(),
        pcft = env!("CARGO_BIN_EXE_pcft")
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let stderr = refused(cmd, "choose a directory this user can write to");
    assert_eq!(stderr.matches("Read-only file system").count(), 1, "the OS error once: {stderr}");
}

#[test]
fn snapshot_files_are_readable_by_their_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("vm.snap");
    let (out, stderr) = output(small_run(&["--snapshot-out", path_arg(&snap), "--snapshot-at-record", "3"]));
    assert_eq!(out.status.code(), Some(0), "stderr {stderr}");
    let mode = std::fs::metadata(&snap).expect("the snapshot").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a snapshot holds guest memory: mode {mode:o}");
}

#[test]
fn a_damaged_version_field_reads_as_corruption_not_as_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("damaged.snap");
    let mut header = b"PCFTSNAP".to_vec();
    header.extend(0x1000_0001u32.to_le_bytes()); // version 1 with a bit of its top byte flipped
    header.extend(100u64.to_le_bytes());
    std::fs::write(&snap, &header).unwrap();
    for command in ["inspect", "restore"] {
        let mut cmd = pcft();
        cmd.args(["vm", command]).arg(&snap);
        let stderr = refused(cmd, "is corrupt: its format version field reads 268435457");
        assert!(!stderr.contains("is snapshot format version 268435457"), "{stderr}");
    }
    // Another version some pcft may write is still named as one.
    header[8..12].copy_from_slice(&4u32.to_le_bytes());
    std::fs::write(&snap, &header).unwrap();
    let mut cmd = pcft();
    cmd.args(["vm", "inspect"]).arg(&snap);
    refused(cmd, "is snapshot format version 4; this pcft reads version 3 only");
}

#[test]
fn an_os_error_is_printed_once() {
    let mut cmd = pcft();
    cmd.args(["vm", "inspect", "/nonexistent/vm.snap"]);
    let stderr = refused(cmd, "No such file or directory");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}

/// `pcft demo` with a small guest, its mode and failure, and more arguments.
fn demo(args: &[&str]) -> (Output, String) {
    let mut cmd = pcft();
    cmd.args(["demo", "--mem", "64M", "--vcpus", "2", "--steps", "40000", "--postcopy-rate", "4096"]);
    cmd.args(args);
    let (out, stderr) = output(cmd);
    assert_eq!(out.status.code(), Some(0), "{args:?}: stderr {stderr}");
    (out, stderr)
}

fn demo_json(args: &[&str]) -> serde_json::Value {
    let (out, _) = demo(&[args, &["--json"]].concat());
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn a_precopy_report_has_no_fault_latency_rather_than_zero() {
    let report = demo_json(&["--mode", "precopy"]);
    assert_eq!(report["pages_faulted"], 0, "{report}");
    assert!(report["fault_latency_us"].is_null(), "none measured, none reported: {report}");
}

#[test]
fn a_failover_before_any_checkpoint_says_none_had_committed() {
    let args = ["--mode", "postcopy-ft", "--fail-at", "before-first-checkpoint"];
    let report = demo_json(&args);
    assert_eq!(report["restored_epoch"], 0, "{report}");
    // The destination was lost before it sent its measurements.
    assert!(report["fault_latency_us"].is_null(), "{report}");

    let (out, stderr) = demo(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |label: &str| text.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or("").to_string();
    let failover = line("failover");
    assert!(failover.contains("no checkpoint had committed"), "{text}\n{stderr}");
    assert!(!failover.contains("checkpoint 0"), "{failover}");
    assert!(line("fault latency").contains("not measured (the destination was lost"), "{text}");
    assert!(line("why this checkpoint").contains("failed before its first checkpoint"), "{text}");
}

#[test]
fn a_partition_is_reported_in_the_operators_words() {
    let report = demo_json(&["--mode", "postcopy-ft", "--fail-kind", "partition", "--fail-at", "600ms"]);
    assert_eq!(report["failure"]["kind"], "heartbeat-timeout", "{report}");
    let reason = report["failure"]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("the destination went silent"), "{reason}");
    assert!(reason.contains("network partition"), "{reason}");
    assert!(!reason.contains("frame was blocked"), "internal words: {reason}");
}
