//! `pcft migrate` and `pcft migration status|wait|cancel`: a migration runs in
//! the source agent; these start it, follow it, and come back to it.

use super::remote::{ask, print_report, runtime, unexpected, with_progress};
use super::{run_failure, usage, Failure, MigrateArgs, MigrationWaitArgs, VmNameArgs};
use anyhow::anyhow;
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::{MigrationOptions, MigrationReport, MigrationStatus};
use std::time::Duration;

pub fn migrate(args: MigrateArgs) -> Result<(), Failure> {
    let options = args.ft.options(
        MigrationOptions {
            max_rounds: args.max_rounds.max(1),
            reply_timeout_ms: args.reply_timeout.max(1) * 1000,
            postcopy_pages_per_sec: args.postcopy_rate,
            ..MigrationOptions::default()
        },
        super::TrackerArg::Bitmap,
    );
    let mode: pcft_agent::wire::payload::Mode = args.mode.into();
    if let Some(option) = args.ft.first_given().filter(|_| !mode.checkpoints()) {
        return Err(usage(anyhow!(
            "{option} tunes PostCopyFT checkpoints and --mode {} takes none: drop it, or use --mode postcopy-ft",
            mode.name()
        )));
    }
    options.validate(mode).map_err(usage)?;
    let request =
        ControlMessage::Migrate { name: args.name.clone(), to: args.to.clone(), mode, options, detach: args.detach };
    let answer = runtime().block_on(async {
        let migration = with_progress(&args.agent, &args.name, !args.json && !args.detach, ask(&args.agent, request));
        tokio::select! {
            answer = migration => answer,
            _ = tokio::signal::ctrl_c() => Err(interrupted(&args.agent, &args.name).await),
        }
    })?;
    match answer {
        ControlMessage::MigrationStarted { vm, to, mode } => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "vm": vm, "agent": args.agent, "to": to, "mode": mode, "started": true })
                );
            } else {
                let agent = &args.agent;
                println!("migrating VM {vm} from {agent} to {to} ({}) in the background", mode.name());
                println!("  follow it: pcft migration status {vm} --agent {agent}");
                println!("  its report: pcft migration wait {vm} --agent {agent}");
            }
            Ok(())
        }
        ControlMessage::Migrated(report) => finished(&report, args.json),
        other => Err(unexpected(other)),
    }
}

/// What Ctrl-C on `pcft migrate` tells the operator: the migration goes on in
/// the agent (leaving would not stop it), and how to come back to it.
async fn interrupted(agent: &str, vm: &str) -> Failure {
    let asked =
        tokio::time::timeout(Duration::from_secs(2), ask(agent, ControlMessage::MigrationStatus { name: vm.into() }));
    let now = match asked.await {
        Ok(Ok(ControlMessage::MigrationStatusReport(status))) if !status.state.ended() => {
            format!("the migration of VM {vm} to {} goes on in agent {agent} ({})", status.to, progress_words(&status))
        }
        Ok(Ok(ControlMessage::MigrationStatusReport(status))) => {
            format!("the migration of VM {vm} to {} has ended ({})", status.to, status.state.name())
        }
        _ => format!("the migration of VM {vm} goes on in agent {agent} if it had started"),
    };
    Failure::Interrupted(anyhow!(
        "{now}; leaving does not stop it.\n  where it is:   pcft migration status {vm} --agent {agent}\n  its report:    pcft migration wait {vm} --agent {agent}\n  to cancel it:  pcft migration cancel {vm} --agent {agent}"
    ))
}

/// A migration's report as `pcft migrate` prints it, and its exit status.
fn finished(report: &MigrationReport, json: bool) -> Result<(), Failure> {
    if json {
        println!("{}", serde_json::to_string(report).map_err(run_failure)?);
    } else {
        print_report(report);
    }
    match &report.failure {
        Some(_) if report.cancelled => Err(run_failure(anyhow!(
            "the migration was cancelled after its switchover, as asked: the destination was fenced and the VM failed over to the source, where it runs"
        ))),
        // The migration did not happen, even if the VM was recovered: a failed run.
        Some(failure) => Err(run_failure(anyhow!(
            "the destination was lost ({}: {}){}",
            failure.kind,
            failure.reason,
            if report.failover.is_some() { "; the VM was recovered and runs at the source" } else { "" }
        ))),
        None => Ok(()),
    }
}

fn progress_words(status: &MigrationStatus) -> String {
    let p = &status.progress;
    let checkpoints = match (status.mode.checkpoints(), p.checkpoints_committed) {
        (true, n) => format!(", {n} checkpoint(s) committed"),
        (false, _) => String::new(),
    };
    format!(
        "{}, {} of {} pages sent{checkpoints}, {:.1} s",
        p.phase,
        p.pages_sent,
        p.pages_total,
        p.elapsed_ms as f64 / 1e3
    )
}

/// `pcft migration status`.
pub fn status(args: VmNameArgs) -> Result<(), Failure> {
    let request = ControlMessage::MigrationStatus { name: args.name.clone() };
    let ControlMessage::MigrationStatusReport(status) = runtime().block_on(ask(&args.agent, request))? else {
        return Err(run_failure(anyhow!("the agent did not send the migration's status")));
    };
    if args.json {
        println!("{}", serde_json::to_string(&status).map_err(run_failure)?);
        return Ok(());
    }
    println!(
        "VM {}: migration from {} to {} ({}): {}",
        status.vm,
        args.agent,
        status.to,
        status.mode.name(),
        status.state.name()
    );
    println!("  {}", progress_words(&status));
    if let Some(reason) = &status.reason {
        println!("  {reason}");
    }
    Ok(())
}

/// `pcft migration wait`: the report `pcft migrate` would have printed.
pub fn wait(args: MigrationWaitArgs) -> Result<(), Failure> {
    let MigrationWaitArgs { migration: args, timeout } = args;
    let request = ControlMessage::WaitMigration { name: args.name.clone(), timeout_ms: timeout.saturating_mul(1000) };
    match runtime().block_on(ask(&args.agent, request))? {
        ControlMessage::Migrated(report) => finished(&report, args.json),
        other => Err(unexpected(other)),
    }
}

/// `pcft migration cancel`.
pub fn cancel(args: VmNameArgs) -> Result<(), Failure> {
    let request = ControlMessage::CancelMigration { name: args.name.clone() };
    let ControlMessage::CancelAccepted { vm, failover } = runtime().block_on(ask(&args.agent, request))? else {
        return Err(run_failure(anyhow!("the agent did not accept the cancel")));
    };
    let agent = &args.agent;
    if args.json {
        let outcome = if failover { "failover" } else { "abort" };
        println!("{}", serde_json::json!({ "vm": vm, "agent": agent, "cancel": outcome }));
    } else if failover {
        println!("cancelling the migration of VM {vm} by a deliberate failover: the destination's lease runs out (it fences its copy) and {agent} restores the last committed checkpoint");
        println!("  its report: pcft migration wait {vm} --agent {agent}");
    } else {
        println!("cancelling the migration of VM {vm} before its switchover: the VM keeps running on {agent}");
        println!("  its report: pcft migration wait {vm} --agent {agent}");
    }
    Ok(())
}
