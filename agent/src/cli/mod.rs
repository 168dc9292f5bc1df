//! `pcft`'s command line: argument definitions and the mapping from failures
//! to exit codes (2: bad input or an unusable host; 1: the run itself failed).

pub mod report;
pub mod vm;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "pcft", version, about = "PostCopyFT: fault-tolerant post-copy live migration for KVM")]
pub struct Cli {
    /// Log level filter (overrides RUST_LOG), e.g. debug or pcft_agent=trace.
    #[arg(long, global = true)]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run, snapshot and restore fixture VMs on this host.
    #[command(subcommand)]
    Vm(VmCommand),
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Boot a fixture VM, print its output records, and verify it against the oracle when it finishes.
    Run(RunArgs),
    /// Restore a VM from a snapshot file and run it on from where it was saved.
    Restore(RestoreArgs),
    /// Check a snapshot file's checksums and describe what it holds.
    Inspect(InspectArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    Sequential,
    Random,
    HotCold,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest workload: ledger, dirty or idle.
    #[arg(long, default_value = "ledger")]
    pub fixture: String,
    /// Guest memory size (a multiple of 2M), e.g. 256M or 1G.
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// Number of vCPUs, each running its own share of the workload.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    /// Steps each vCPU runs (default: the fixture's own).
    #[arg(long, conflicts_with = "forever")]
    pub steps: Option<u64>,
    /// Run until stopped (no verification).
    #[arg(long)]
    pub forever: bool,
    /// Working set size (a multiple of 4K; default: all memory above 1M).
    #[arg(long)]
    pub working_set: Option<String>,
    /// Emit an output record every this many steps (default: the fixture's own).
    #[arg(long)]
    pub record_every: Option<u64>,
    /// Seed of the workload's pseudo-random choices.
    #[arg(long)]
    pub seed: Option<u64>,
    /// ledger: pages written per step.
    #[arg(long, default_value_t = 1)]
    pub writes_per_step: u64,
    /// dirty: which pages are written.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pub pattern: Pattern,
    /// dirty, hot-cold pattern: size of each vCPU's hot set, in pages.
    #[arg(long, default_value_t = 64)]
    pub hot_pages: u64,
    /// dirty, hot-cold pattern: share of writes that go to the hot set, in per mille.
    #[arg(long, default_value_t = 900)]
    pub hot_permille: u64,
    /// dirty: pages each vCPU writes per second (default: as fast as it can).
    #[arg(long)]
    pub rate: Option<u64>,
    /// idle: pause instructions between steps.
    #[arg(long)]
    pub spin: Option<u64>,
    /// Guest memory is registered with KVM as memslots of at most this size (a multiple of 2M).
    #[arg(long, default_value = "128M")]
    pub slot_size: String,
    #[command(flatten)]
    pub control: RunControl,
}

/// What to do while the VM runs, shared by `run` and `restore`.
#[derive(Args, Debug)]
pub struct RunControl {
    /// Write a snapshot to this file and stop, at the point set by --snapshot-at-record or --snapshot-after-ms.
    #[arg(long)]
    pub snapshot_out: Option<PathBuf>,
    /// Take the snapshot once this many output records (in all, counting any before a restore) have been emitted.
    #[arg(long, requires = "snapshot_out", conflicts_with = "snapshot_after_ms")]
    pub snapshot_at_record: Option<usize>,
    /// Take the snapshot this many milliseconds after the VM starts running.
    #[arg(long, requires = "snapshot_out")]
    pub snapshot_after_ms: Option<u64>,
    /// Give up (exit 1) if the VM has not finished after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Print JSON lines instead of text: one object per output record, then the result.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot file written by `pcft vm run --snapshot-out`.
    pub snapshot: PathBuf,
    #[command(flatten)]
    pub control: RunControl,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Snapshot file to check.
    pub snapshot: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// A failure, with the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// Bad input or an unusable host: exit 2.
    Usage(anyhow::Error),
    /// The run itself failed (KVM error, verification mismatch, timeout): exit 1.
    Run(anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Run(_) => 1,
        }
    }

    pub fn error(&self) -> &anyhow::Error {
        match self {
            Failure::Usage(e) | Failure::Run(e) => e,
        }
    }
}

pub fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Usage(e.into())
}

pub fn run_failure(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Run(e.into())
}
