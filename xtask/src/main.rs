//! `cargo xtask …`: PostCopyFT's developer workflow.
//!
//! - `setup`: install what a fresh Debian machine lacks (idempotent).
//! - `run`:   the main job: build pcft and run the migration demo (see README).
//! - `test`:  the README's test command: setup, then every test on real KVM.
//! - `bench`: migration benchmarks against a TCP baseline, and beside QEMU (target/bench/).
//! - `ci`:    what `.ci/run` runs: setup, format and lint checks, tests.
//! - `dashboard-assets`: re-vendor the dashboard's plotting library from npm.
//! - `chaos`: the fault-injection suite (random failures over many demo runs).
//! - `soak`:  a serving VM migrated back and forth for minutes with failures (target/soak/).
//! - `fuzz`:  the cargo-fuzz targets (frame decoder, checkpoint store), bounded in time.

mod bench;
mod bench_dirty;
mod bench_flood;
mod bench_ft;
mod bench_kv;
mod bench_kv_ft;
mod bench_peer;
mod chaos;
mod ebpf;
mod fuzz;
mod plots;
mod progress;
mod soak;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "PostCopyFT developer workflow")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing system packages (binutils, util-linux, iproute2, nftables, libclang, chromium,
    /// qemu-system-x86, redis-tools, redis-server) and the kv guest's Rust target.
    Setup,
    /// Build pcft (release) and run the main job, `pcft demo`; extra arguments go to it.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test on real KVM (needs root and /dev/kvm).
    Test,
    /// Benchmark the migration modes (release build), the page path (criterion) and
    /// pcft's post-copy beside QEMU's (peer: needs qemu-system-x86, which setup installs);
    /// `--quick` for 64 MiB smoke runs only. Results: target/bench/*.{md,json,svg}.
    Bench {
        #[arg(long)]
        quick: bool,
        /// Run only this part: migration, dirty, ft (PostCopyFT), peer (beside QEMU and a raw TCP copy),
        /// kv (redis-benchmark against the kv guest, beside the host's redis-server), kv-ft (what a
        /// serving VM's clients see while it migrates, with and without FT) or flood (demand-fault
        /// latency of a migration into an agent flooded with connections and refused vm starts).
        #[arg(long, value_parser = ["migration", "dirty", "ft", "peer", "kv", "kv-ft", "flood"])]
        only: Option<String>,
    },
    /// Setup, `cargo fmt --check`, `cargo clippy -D warnings`, then the tests.
    Ci,
    /// Build the eBPF programs (installing the pinned nightly and bpf-linker if
    /// missing) into target/bpf/pcft-ebpf.o, which pcft then embeds.
    BuildEbpf,
    /// Plot the results in target/bench/*.json again (SVG), without running anything.
    Plots,
    /// The fault-injection suite: many PostCopyFT demos, each failing at a random point
    /// by crash, freeze, network partition, a lossy link, a slow source or stalled
    /// checkpoints; every one must verify wherever it finished, lose no released output,
    /// and leave the destination fenced if it failed over (target/chaos/). kv runs (a
    /// serving VM with clients) must also lose no acknowledged write and read nothing stale.
    Chaos {
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Which guests: `both` (ledger and kv runs, half each), `ledger` or `kv`.
        #[arg(long, default_value = "both", value_parser = ["both", "ledger", "kv"])]
        fixture: String,
    },
    /// The soak: a serving VM migrated back and forth with PostCopyFT for minutes, its clients
    /// writing throughout and a failure every few migrations; nothing lost, grown or left
    /// behind (target/soak/: the report and each agent's RSS, fds and threads over time).
    Soak {
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
    },
    /// Run the cargo-fuzz targets (fuzz/: frame, checkpoint) with the pinned nightly,
    /// installing cargo-fuzz if missing; `cargo test` runs the same properties briefly.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long, value_parser = fuzz::TARGETS)]
        target: Option<String>,
    },
    /// Vendor the dashboard's plotting library (uPlot, the version and checksum
    /// pinned in agent/dashboard/package-lock.json) into agent/dashboard/vendor/.
    DashboardAssets,
}

/// Commands the build and the tests need, and the Debian package that has each.
const SYSTEM_TOOLS: &[(&str, &str)] = &[
    ("as", "binutils"),
    ("objcopy", "binutils"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("mount", "mount"),
    // `pcft demo --fail-kind partition|lossy` and their tests: network namespaces and
    // veth links; lossy degrades the link with `tc` (iproute2) and, where the kernel
    // has no netem, drops packets with an nftables rule.
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("nft", "nftables"),
    // The dashboard's end-to-end test loads it in headless Chromium.
    ("chromium", "chromium"),
    // `cargo xtask bench --only peer`: QEMU's post-copy beside pcft's, its guest linked with ld.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("ld", "binutils"),
    // The kv guest's clients in the tests (redis-cli, redis-benchmark), and the
    // host's own Redis beside it in `cargo xtask bench --only kv`.
    ("redis-cli", "redis-tools"),
    ("redis-benchmark", "redis-tools"),
    ("redis-server", "redis-server"),
    // The kv test pings the guest on its tap (a fresh Debian has no ping).
    ("ping", "iputils-ping"),
];

/// The target the kv guest (vm-fixtures/kv-guest) is built for.
const GUEST_TARGET: &str = "x86_64-unknown-none";

fn main() -> std::process::ExitCode {
    match task(Args::parse().task) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn task(task: Task) -> Result<()> {
    match task {
        Task::Setup => {
            setup()?;
            ebpf::setup()
        }
        Task::BuildEbpf => {
            setup()?;
            let object = ebpf::build()?;
            eprintln!("xtask: eBPF object at {}; cargo build now embeds it in pcft", object.display());
            Ok(())
        }
        Task::Run { args } => run(&args),
        Task::DashboardAssets => dashboard_assets(),
        Task::Plots => plot_results(),
        Task::Chaos { runs, fixture } => {
            setup()?;
            ebpf::build()?;
            require_kvm()?;
            let pcft = build_release()?;
            chaos::run(&workspace_root(), &pcft, runs.max(1), &fixture)
        }
        Task::Soak { minutes } => {
            setup()?;
            ebpf::build()?;
            require_kvm()?;
            let pcft = build_release()?;
            soak::run(&workspace_root(), &pcft, minutes)
        }
        Task::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref()),
        Task::Test => {
            setup()?;
            ebpf::build()?;
            test()
        }
        Task::Bench { quick, only } => {
            setup()?;
            ebpf::build()?;
            require_kvm()?;
            let pcft = build_release()?;
            let part = |name: &str| only.as_deref().is_none_or(|only| only == name);
            if part("migration") {
                bench::run(&workspace_root(), &pcft, quick)?;
            }
            if part("dirty") {
                bench_dirty::run(&workspace_root(), &pcft, quick)?;
            }
            if part("ft") {
                bench_ft::run(&workspace_root(), &pcft, quick)?;
            }
            if part("peer") {
                bench_peer::run(&workspace_root(), &pcft, quick)?;
            }
            if part("kv") {
                bench_kv::run(&workspace_root(), &pcft, quick)?;
            }
            if part("kv-ft") {
                bench_kv_ft::run(&workspace_root(), &pcft, quick)?;
            }
            if part("flood") {
                bench_flood::run(&workspace_root(), &pcft, quick)?;
            }
            if !quick && only.is_none() {
                // The page path's small parts, each beside a baseline from the same run.
                cargo(&["bench", "-p", "pcft-agent", "--bench", "page_path"])?;
            }
            plot_results()
        }
        Task::Ci => {
            setup()?;
            ebpf::build()?;
            cargo(&["fmt", "--all", "--", "--check"]).context("code is not formatted: run cargo fmt --all")?;
            cargo(&["fmt", "--manifest-path", KV_GUEST_MANIFEST, "--", "--check"]).context(
                "the kv guest is not formatted: run cargo fmt --manifest-path vm-fixtures/kv-guest/Cargo.toml",
            )?;
            cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            cargo(&["clippy", "--manifest-path", KV_GUEST_MANIFEST, "--all-targets", "--", "-D", "warnings"])?;
            test()
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    status(Command::new(cargo).args(args).current_dir(workspace_root()))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Whether the dynamic linker knows a libclang that bindgen can load
/// (`libclang.so*` or `libclang-<version>.so*`; `libclang-cpp` is another library).
fn has_libclang() -> bool {
    let Ok(out) = Command::new("ldconfig").arg("-p").output() else { return false };
    String::from_utf8_lossy(&out.stdout).lines().any(|line| {
        let name = line.trim_start();
        name.starts_with("libclang.so")
            || name.strip_prefix("libclang-").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn setup() -> Result<()> {
    install_packages()?;
    install_guest_target()
}

/// `rustup target add` of the kv guest's target for the toolchain that builds the workspace.
fn install_guest_target() -> Result<()> {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    match installed {
        Ok(out) if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == GUEST_TARGET) => Ok(()),
        Ok(_) => {
            eprintln!("xtask: installing the Rust target {GUEST_TARGET} (the kv guest)");
            status(Command::new("rustup").args(["target", "add", GUEST_TARGET]))
        }
        Err(e) => bail!("cannot run rustup ({e}): install rustup, then: rustup target add {GUEST_TARGET}"),
    }
}

fn install_packages() -> Result<()> {
    let mut missing: Vec<&str> = SYSTEM_TOOLS.iter().filter(|(tool, _)| !on_path(tool)).map(|(_, pkg)| *pkg).collect();
    if !has_libclang() {
        // userfaultfd-sys generates its bindings with bindgen, which loads libclang.
        missing.push("libclang1-14");
    }
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing packages {missing:?}: run as root, or apt-get install {}", missing.join(" "));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    status(Command::new("apt-get").arg("update").arg("-q"))?;
    status(
        Command::new("apt-get").args(["install", "-y", "-q"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `npm ci` of agent/dashboard's lockfile (which pins uPlot's version and
/// integrity hash) in a scratch directory, then copies the built files pcft
/// embeds into agent/dashboard/vendor/. The vendored files are committed, so
/// building pcft needs neither npm nor the network.
fn dashboard_assets() -> Result<()> {
    let dashboard = workspace_root().join("agent/dashboard");
    let scratch = workspace_root().join("target/dashboard-npm");
    std::fs::create_dir_all(&scratch)?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(dashboard.join(file), scratch.join(file)).with_context(|| format!("copying {file}"))?;
    }
    if !on_path("npm") {
        bail!("npm is missing: apt-get install npm");
    }
    status(Command::new("npm").args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"]).current_dir(&scratch))?;
    let uplot = scratch.join("node_modules/uplot");
    let vendor = dashboard.join("vendor");
    std::fs::create_dir_all(&vendor)?;
    for (from, to) in [
        ("dist/uPlot.iife.min.js", "uPlot.iife.min.js"),
        ("dist/uPlot.min.css", "uPlot.min.css"),
        ("LICENSE", "LICENSE-uPlot"),
    ] {
        std::fs::copy(uplot.join(from), vendor.join(to)).with_context(|| format!("copying uplot/{from}"))?;
    }
    eprintln!("xtask: vendored uPlot into {}; rebuild pcft to embed it", vendor.display());
    Ok(())
}

fn plot_results() -> Result<()> {
    for plot in plots::all(&workspace_root().join("target/bench"))? {
        eprintln!("bench: plotted {}", plot.display());
    }
    Ok(())
}

fn require_kvm() -> Result<()> {
    if !is_root() {
        bail!("PostCopyFT drives KVM and must run as root: sudo cargo xtask …");
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm does not exist: this machine has no KVM");
    }
    Ok(())
}

fn run(args: &[String]) -> Result<()> {
    setup()?;
    ebpf::build()?;
    require_kvm()?;
    let mut cmd = Command::new(build_release()?);
    // The main job: two agents on this machine, a 2-vCPU ledger VM migrated in
    // post-copy from one to the other and verified there against its oracle.
    cmd.arg("demo");
    cmd.args(args);
    // pcft has already said what went wrong; pass its exit code on unchanged.
    let code = cmd.status().context("cannot run target/release/pcft")?.code().unwrap_or(1);
    std::process::exit(code)
}

/// Runs every test and ends with one total line, `tests: N passed, M failed`
/// (cargo prints a result line per test binary, the last often an empty doc-test run).
fn build_release() -> Result<PathBuf> {
    cargo(&["build", "--release", "--quiet", "-p", "pcft-agent", "--bin", "pcft"])?;
    Ok(workspace_root().join("target/release/pcft"))
}

fn test() -> Result<()> {
    require_kvm()?;
    // The workspace's tests, then the kv guest's pure parts (its own workspace) on the host.
    let runs: [&[&str]; 2] = [&["test", "--workspace"], &["test", "--manifest-path", KV_GUEST_MANIFEST]];
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut failures = Vec::new();
    for args in runs {
        let (p, f, ok) = cargo_test(args)?;
        passed += p;
        failed += f;
        if !ok {
            failures.push(args.join(" "));
        }
    }
    println!("tests: {passed} passed, {failed} failed");
    if !failures.is_empty() || failed > 0 {
        bail!("cargo test failed: {}", failures.join("; "));
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// The kv guest's manifest (a workspace of its own, built for x86_64-unknown-none by vm-fixtures).
const KV_GUEST_MANIFEST: &str = "vm-fixtures/kv-guest/Cargo.toml";

/// Runs `cargo <args>`, echoing its output; returns (passed, failed, whether cargo succeeded).
fn cargo_test(args: &[&str]) -> Result<(u64, u64, bool)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    Ok((passed, failed, status.success()))
}

/// In `ok. 12 passed; 0 failed; …`, the number before `label`.
fn count_before(text: &str, label: &str) -> u64 {
    text.split(';')
        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(label))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
