//! `pcft`: the PostCopyFT host agent's command line.

mod cli;

use clap::Parser;
use cli::{Cli, Command, VmCommand};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Cli::parse();
    let filter = match &args.log {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    let result = match args.command {
        Command::Vm(VmCommand::Run(a)) => cli::vm::run(a),
        Command::Vm(VmCommand::Restore(a)) => cli::vm::restore(a),
        Command::Vm(VmCommand::Inspect(a)) => cli::vm::inspect(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("pcft: error: {:#}", failure.error());
            ExitCode::from(failure.exit_code())
        }
    }
}
