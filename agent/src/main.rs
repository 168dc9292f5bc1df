//! `pcft`: the PostCopyFT host agent's command line.

#![warn(clippy::too_many_lines)]

mod cli;

use clap::Parser;
use cli::{Cli, Command, MigrationCommand, VmCommand};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    pcft_agent::host::use_one_malloc_arena();
    let args = Cli::parse();
    let filter = match &args.log {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_log_filter(&args.command))),
    };
    // Colour codes only for a terminal: a log redirected to a file stays plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    match args.log_format {
        cli::LogFormat::Text => logs.init(),
        // One JSON object per event, with the spans it happened in (migration, checkpoint epoch).
        cli::LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).init(),
    }

    // Only commands that talk to agents take a key: `keygen` and the local `vm`
    // commands read none (`PCFT_PSK_FILE=K pcft keygen --out K` must not read K first).
    let psk_file = args.command.psk_file();
    let key = match cli::load_key(psk_file) {
        Ok(key) => key,
        Err(failure) => {
            eprintln!("pcft: error: {:#}", failure.error());
            return ExitCode::from(failure.exit_code());
        }
    };
    if key.is_some() {
        pcft_agent::agent::client::set_key(key);
    }

    let result = match args.command {
        Command::Vm(vm) => match *vm {
            VmCommand::Run(a) => cli::vm::run(a),
            VmCommand::Restore(a) => cli::vm::restore(a),
            VmCommand::Inspect(a) => cli::vm::inspect(a),
            VmCommand::Start(a) => cli::remote::start(a),
            VmCommand::Status(a) => cli::remote::status(a),
            VmCommand::Wait(a) => cli::remote::wait(a),
            VmCommand::List(a) => cli::remote::status(a),
            VmCommand::Stop(a) => cli::remote::stop(a),
            VmCommand::Rm(a) => cli::remote::remove(a),
        },
        Command::Migration(m) => match m {
            MigrationCommand::Status(a) => cli::migration::status(a),
            MigrationCommand::Wait(a) => cli::migration::wait(a),
            MigrationCommand::Cancel(a) => cli::migration::cancel(a),
        },
        Command::Agent(a) => cli::remote::agent(a),
        Command::Migrate(a) => cli::migration::migrate(a),
        Command::Status(a) => cli::remote::status(a),
        Command::Demo(a) => cli::demo::demo(a),
        Command::Soak(a) => cli::soak::soak(a),
        Command::Keygen(a) => cli::keygen(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure @ cli::Failure::Interrupted(_)) => {
            eprintln!("pcft: interrupted: {:#}", failure.error());
            ExitCode::from(failure.exit_code())
        }
        Err(failure) => {
            eprintln!("pcft: error: {:#}", failure.error());
            ExitCode::from(failure.exit_code())
        }
    }
}

/// The log filter without `--log` or `RUST_LOG`: an agent logs its life cycle
/// at INFO (a line per VM started or stopped and per migration started or
/// ended; everything finer is DEBUG), every other command only warnings.
/// Other crates stay at warnings either way.
fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Agent(_) => "warn,pcft_agent=info,pcft=info",
        _ => "warn",
    }
}
