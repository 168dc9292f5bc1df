//! Bad input and unusable hosts: one line on stderr that names the problem and
//! the fix, exit code 2, never a panic.

use std::process::Command;

fn pcft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pcft"))
}

/// Runs `cmd` and checks it failed as bad input, with `needle` in its one-line error.
fn refused(mut cmd: Command, needle: &str) {
    let out = cmd.output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{cmd:?}: stderr {stderr}");
    assert!(stderr.contains(needle), "{cmd:?}: expected {needle:?} in {stderr:?}");
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{cmd:?}: one line, got {stderr:?}");
    assert!(out.stdout.is_empty(), "{cmd:?} printed {:?}", String::from_utf8_lossy(&out.stdout));
}

fn run_args(args: &[&str]) -> Command {
    let mut cmd = pcft();
    cmd.args(["vm", "run"]).args(args);
    cmd
}

#[test]
fn unknown_fixture() {
    refused(run_args(&["--fixture", "nope"]), "unknown fixture \"nope\": choose one of ledger, dirty, idle, kv");
}

#[test]
fn memory_sizes_that_do_not_parse_or_fit() {
    refused(run_args(&["--mem", "lots"]), "cannot parse size \"lots\"");
    refused(run_args(&["--mem", "1.5G"]), "cannot parse size");
    refused(run_args(&["--mem", "3M"]), "not a multiple of 2 MiB: round it, e.g. to 4 MiB");
    refused(run_args(&["--mem", "64T"]), "exceeds this host's");
    refused(run_args(&["--mem", "64M", "--working-set", "64M"]), "does not fit in --mem 64 MiB");
}

#[test]
fn workload_parameters_the_guest_cannot_run() {
    refused(run_args(&["--vcpus", "0"]), "vcpus must be at least 1");
    refused(run_args(&["--vcpus", "17"]), "17 vCPUs are more than the 16");
    refused(run_args(&["--fixture", "dirty", "--pattern", "hot-cold", "--hot-permille", "1500"]), "over 1000");
    refused(run_args(&["--steps", "0"]), "steps must be at least 1");
}

#[test]
fn not_root() {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_pcft"), "vm", "run"]);
    refused(cmd, "pcft must run as root");
}

#[test]
fn no_dev_kvm() {
    // A private mount namespace with an empty /dev: a host without KVM.
    let script = format!("mount -t tmpfs none /dev && exec {} vm run", env!("CARGO_BIN_EXE_pcft"));
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    refused(cmd, "/dev/kvm does not exist: this host has no KVM");
}

#[test]
fn no_dev_net_tun() {
    // A private mount namespace whose /dev/net is empty: a host without tun/tap.
    let script = format!(
        "mount -t tmpfs none /dev/net && exec {} vm run --fixture kv --mem 64M --net tap --tap pcftnotun0 \
         --guest-ip 10.203.0.2 --host-ip 10.203.0.1 --seconds 1",
        env!("CARGO_BIN_EXE_pcft")
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    refused(cmd, "/dev/net/tun is missing: load the tun module");
}

#[test]
fn unusable_snapshot_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.snap");
    let mut cmd = pcft();
    cmd.args(["vm", "restore"]).arg(&missing);
    refused(cmd, "No such file or directory");

    let garbage = dir.path().join("garbage.snap");
    std::fs::write(&garbage, b"PCFTSNAP\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    let mut cmd = pcft();
    cmd.args(["vm", "restore"]).arg(&garbage);
    refused(cmd, "is corrupt: state section claims");

    let mut cmd = pcft();
    cmd.args(["vm", "inspect"]).arg(&garbage);
    refused(cmd, "is corrupt");

    let other = dir.path().join("other.snap");
    std::fs::write(&other, b"PCFTSNAP\x09\x00\x00\x00").unwrap();
    let mut cmd = pcft();
    cmd.args(["vm", "restore"]).arg(&other);
    refused(cmd, "format version 9; this pcft reads version 3");
}

#[test]
fn snapshot_flags_need_each_other() {
    let out = run_args(&["--snapshot-at-record", "3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--snapshot-out"));
}

#[test]
fn postcopy_ft_timings_that_break_the_lease_are_refused_before_anything_runs() {
    let migrate = |extra: &[&str]| {
        let mut cmd = pcft();
        // Nothing listens there: the timings are refused before any connection.
        cmd.args(["migrate", "vm1", "--agent", "127.0.0.1:1", "--to", "127.0.0.1:2", "--mode", "postcopy-ft"]);
        cmd.args(extra).env_remove("PCFT_PSK_FILE");
        cmd
    };
    refused(migrate(&["--heartbeat-interval", "500", "--heartbeat-timeout", "100"]), "--heartbeat-interval 33 or less");
    refused(migrate(&["--heartbeat-timeout", "0"]), "--heartbeat-timeout must be at least 1 ms");
    refused(migrate(&["--checkpoint-interval", "0"]), "--checkpoint-interval must be at least 1 ms");
    // A mode without checkpoints refuses their options instead of ignoring them.
    let mut precopy = pcft();
    precopy.args(["migrate", "vm1", "--agent", "127.0.0.1:1", "--to", "127.0.0.1:2", "--mode", "precopy"]);
    precopy.args(["--checkpoint-interval", "50"]).env_remove("PCFT_PSK_FILE");
    refused(precopy, "--checkpoint-interval tunes PostCopyFT checkpoints and --mode precopy takes none");
}

#[test]
fn keygen_makes_the_key_psk_file_names_without_reading_it_first() {
    // `PCFT_PSK_FILE=K pcft keygen --out K`: the key does not exist yet, and
    // keygen must not try to load it (it used to fail, suggesting this command).
    let dir = std::env::temp_dir().join(format!("pcft-keygen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    let _ = std::fs::remove_file(&key);
    let out = pcft().env("PCFT_PSK_FILE", &key).args(["keygen", "--out"]).arg(&key).output().expect("spawn");
    assert_eq!(out.status.code(), Some(0), "stderr {}", String::from_utf8_lossy(&out.stderr));
    assert!(key.is_file(), "no key at {}", key.display());
    // A second keygen onto it is refused (never overwritten), as bad input.
    let mut again = pcft();
    again.env("PCFT_PSK_FILE", &key).args(["keygen", "--out"]).arg(&key);
    let out = again.output().expect("spawn");
    assert_eq!(out.status.code(), Some(2), "stderr {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    // stderr is a pipe here, as when an operator redirects it to a file.
    let out = pcft()
        .args(["--log", "debug", "vm", "run", "--fixture", "ledger", "--mem", "64M", "--steps", "20"])
        .output()
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr {stderr}");
    assert!(!stderr.trim().is_empty(), "no log line at debug level to look at");
    assert!(!stderr.contains('\x1b'), "ANSI escape codes in a redirected log: {stderr:?}");
}

#[test]
fn every_argument_has_help_and_the_key_is_offered_only_where_it_is_read() {
    let commands: &[&[&str]] = &[
        &["agent"],
        &["vm", "run"],
        &["vm", "restore"],
        &["vm", "inspect"],
        &["vm", "start"],
        &["vm", "status"],
        &["vm", "list"],
        &["vm", "wait"],
        &["vm", "stop"],
        &["vm", "rm"],
        &["migrate"],
        &["migration", "status"],
        &["migration", "wait"],
        &["migration", "cancel"],
        &["status"],
        &["demo"],
        &["keygen"],
    ];
    let local = [&["vm", "run"][..], &["vm", "restore"], &["vm", "inspect"], &["keygen"]];
    for command in commands {
        let out = pcft().args(*command).arg("-h").output().expect("spawn");
        let help = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{command:?}: {help}");
        // An argument's help is on its line, or (clap's long layout) on the next, indented deeper.
        let lines: Vec<&str> = help.lines().collect();
        let indent = |l: &str| l.len() - l.trim_start().len();
        let bare: Vec<&str> = (0..lines.len())
            .filter(|&i| {
                let t = lines[i].trim();
                let argument = (t.starts_with('-') || t.starts_with('<')) && !t.starts_with("-h, --help");
                let next_describes =
                    lines.get(i + 1).is_some_and(|n| !n.trim().is_empty() && indent(n) > indent(lines[i]));
                argument && !t.contains("  ") && !next_describes
            })
            .map(|i| lines[i])
            .collect();
        assert!(bare.is_empty(), "pcft {} has arguments without help: {bare:?}\n{help}", command.join(" "));
        let offers_key = lines.iter().any(|l| l.trim_start().starts_with("--psk-file"));
        assert_eq!(offers_key, !local.contains(command), "pcft {} and --psk-file:\n{help}", command.join(" "));
    }
}
