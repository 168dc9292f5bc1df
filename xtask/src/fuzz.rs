//! `cargo xtask fuzz [--seconds N] [--target frame|checkpoint]`: the cargo-fuzz
//! targets in fuzz/ (the properties of `pcft_agent::fuzzing`, which `cargo
//! test` also runs, briefly, in agent/tests/fuzz_protocol.rs), each for N
//! seconds with the pinned nightly, installing cargo-fuzz if it is missing.
//!
//! libFuzzer starts from fuzz/corpus/TARGET (the seeds kept in the repo, read
//! only) and writes what it finds to target/fuzz-corpus/TARGET, so the repo's
//! corpus stays small; a failing input lands in fuzz/artifacts/TARGET/. To keep
//! one as a regression input, copy it into fuzz/corpus/TARGET/: `cargo test`
//! replays every file there.

use super::{status, workspace_root};
use crate::ebpf::NIGHTLY;
use anyhow::{bail, Context, Result};
use std::process::Command;

pub const TARGETS: [&str; 2] = ["frame", "checkpoint"];

/// cargo-fuzz builds with the eBPF programs' pinned nightly.
fn cargo(toolchain: &str) -> Command {
    crate::ebpf::rustup_cargo(toolchain)
}

fn has_cargo_fuzz() -> bool {
    cargo(NIGHTLY).args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success())
}

pub fn run(seconds: u64, target: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t}: the targets are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    if !cargo(NIGHTLY).arg("--version").output().is_ok_and(|o| o.status.success()) {
        bail!("the {NIGHTLY} toolchain is missing: cargo xtask setup installs it");
    }
    if !has_cargo_fuzz() {
        eprintln!("xtask: installing cargo-fuzz (a minute or two, once)");
        status(cargo("stable").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let root = workspace_root();
    for target in targets {
        let found = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
        eprintln!("xtask: fuzzing {target} for {seconds} s (new inputs: {})", found.display());
        status(
            cargo(NIGHTLY)
                .args(["fuzz", "run", target])
                .arg(&found)
                .arg(root.join("fuzz/corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                // A payload is at most 32 MiB (MAX_PAYLOAD): any larger single
                // allocation is a length field trusted too far.
                .arg("-malloc_limit_mb=64")
                .arg("-rss_limit_mb=2048")
                .arg("-print_final_stats=1")
                .current_dir(&root),
        )
        .with_context(|| format!("fuzz target {target} failed: its input is in fuzz/artifacts/{target}/"))?;
    }
    Ok(())
}
