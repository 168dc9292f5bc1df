//! `cargo xtask build-ebpf`: the eBPF programs (`agent-ebpf`) for
//! bpfel-unknown-none, with the pinned nightly and bpf-linker, installed here
//! if missing (the versions that build on our machines:
//! docs/host.md). The object lands at target/bpf/pcft-ebpf.o,
//! where the agent's build.rs embeds it into pcft.

use super::{is_root, on_path, status, workspace_root};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The nightly whose LLVM matches bpf-linker's (also in agent-ebpf/rust-toolchain.toml).
pub(crate) const NIGHTLY: &str = "nightly-2026-05-20";
const BPF_LINKER: &str = "bpf-linker@0.13.0";
const LLVM_PACKAGES: &[&str] =
    &["llvm-22-dev", "libpolly-22-dev", "libclang-22-dev", "clang-22", "libzstd-dev", "zlib1g-dev"];

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(NIGHTLY)))
        .unwrap_or(false)
}

fn cargo_bin(tool: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin").join(tool)
}

/// Installs what building the programs needs, if it is missing.
pub fn setup() -> Result<()> {
    if !has_nightly() {
        eprintln!("xtask: installing {NIGHTLY} (rust-src) for the eBPF programs");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    if on_path("bpf-linker") || cargo_bin("bpf-linker").is_file() {
        return Ok(());
    }
    if !Command::new("dpkg").args(["-s", "llvm-22-dev"]).output().map(|o| o.status.success()).unwrap_or(false) {
        if !is_root() {
            bail!("bpf-linker needs LLVM 22: run as root, or apt-get install {}", LLVM_PACKAGES.join(" "));
        }
        eprintln!("xtask: installing {}", LLVM_PACKAGES.join(" "));
        status(Command::new("apt-get").arg("update").arg("-q"))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(LLVM_PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    eprintln!("xtask: installing {BPF_LINKER} (a few minutes, once)");
    let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
    status(
        Command::new("cargo")
            .args(["install", BPF_LINKER, "--locked", "--no-default-features", "--features", "llvm-22"])
            .env("PATH", path)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// Builds the programs and puts the object where the agent's build embeds it.
pub fn build() -> Result<PathBuf> {
    setup()?;
    let root = workspace_root();
    let crate_dir = root.join("agent-ebpf");
    let path = format!("{}:{}", cargo_bin("").display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = rustup_cargo(NIGHTLY);
    cmd.args(["build", "--release", "--quiet"]).current_dir(&crate_dir).env("PATH", path);
    status(&mut cmd).context("building the eBPF programs (agent-ebpf)")?;
    let built = crate_dir.join("target/bpfel-unknown-none/release/pcft-ebpf");
    let object = root.join("target/bpf/pcft-ebpf.o");
    std::fs::create_dir_all(object.parent().expect("has a parent"))?;
    // Rewrite only when it changed, so that pcft is not rebuilt for nothing.
    let new = std::fs::read(&built).with_context(|| format!("no eBPF object at {}", built.display()))?;
    if std::fs::read(&object).ok().as_deref() != Some(&new[..]) {
        std::fs::write(&object, &new)?;
    }
    Ok(object)
}

/// `cargo` of the rustup toolchain `toolchain`. `cargo xtask` runs under the
/// stable toolchain: none of its settings may leak into that cargo.
pub(crate) fn rustup_cargo(toolchain: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo"]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd
}
