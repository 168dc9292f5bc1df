//! What the demo found, printed (human lines or one JSON object) and judged:
//! the migration report, the guest verified against its oracle, the outside
//! world's audit, the fence, and the one-copy check; then the exit verdict.

use super::explain;
use super::fail_at::FailAt;
use super::faults::Applied;
use super::migrate::Outcome;
use super::one_copy::OneCopy;
use super::outside::OutputAudit;
use super::plan::DemoPlan;
use super::serving::ServingReport;
use crate::cli::remote::print_report;
use crate::cli::{run_failure, DemoArgs, FailKind, Failure};
use anyhow::anyhow;
use pcft_agent::agent::client::ClientError;
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::payload::MigrationReport;
use serde_json::json;

/// The guest's verification where it finished, from the agent's answer.
pub struct Verification {
    pub ok: bool,
    /// Output records the verified run emitted.
    pub records: Option<u64>,
    /// The verified memory digest, in hex.
    pub digest: Option<String>,
    /// Why it did not verify.
    pub error: Option<String>,
}

impl Verification {
    /// The verification in the agent's `answer` to `WaitFinished`, or, for a
    /// serving VM, its clients' history.
    fn new(answer: &Option<Result<ControlMessage, ClientError>>, serving: Option<&ServingReport>) -> Verification {
        let answer = match (answer, serving) {
            (Some(answer), _) => answer,
            (None, Some(serving)) => {
                return Verification {
                    ok: serving.ok(),
                    records: None,
                    digest: serving.clients.store_digest.clone(),
                    error: serving.problem(),
                }
            }
            (None, None) => return Verification::failed("the guest was not verified".into()),
        };
        match answer {
            Ok(ControlMessage::Verified { records, memory_digest, .. }) => Verification {
                ok: true,
                records: Some(*records),
                digest: Some(format!("{memory_digest:#018x}")),
                error: None,
            },
            Ok(other) => Verification::failed(format!("unexpected answer {other:?}")),
            Err(e) => Verification::failed(e.to_string()),
        }
    }

    fn failed(error: String) -> Verification {
        Verification { ok: false, records: None, digest: None, error: Some(error) }
    }
}

/// Everything the demo found.
pub struct DemoReport<'a> {
    pub args: &'a DemoArgs,
    pub plan: &'a DemoPlan,
    /// The source's report of the migration.
    pub migration: MigrationReport,
    pub verification: Verification,
    pub outputs: OutputAudit,
    /// Whether the destination stayed fenced after a failover (None: not checked).
    pub fenced: Option<bool>,
    pub one_copy: OneCopy,
    /// What the demo's timer applied.
    pub applied: Applied,
    /// A serving VM's clients: what they saw and what reached them, checked.
    pub serving: Option<ServingReport>,
    /// The network namespaces the run made (removed before it ends).
    pub namespaces: Vec<String>,
}

/// What the demo checked besides the migration itself.
pub struct Checks {
    /// The outside world's records against the oracle's.
    pub outputs: OutputAudit,
    pub one_copy: OneCopy,
    /// What the demo's timer applied.
    pub applied: Applied,
    /// A serving VM's clients and what reached them.
    pub serving: Option<ServingReport>,
    /// The network namespaces the run made.
    pub namespaces: Vec<String>,
}

impl<'a> DemoReport<'a> {
    /// The report of a migration's `outcome`, with the demo's `checks`.
    pub fn new(args: &'a DemoArgs, plan: &'a DemoPlan, outcome: Outcome, checks: Checks) -> DemoReport<'a> {
        let Checks { outputs, one_copy, applied, serving, namespaces } = checks;
        let verification = Verification::new(&outcome.verified, serving.as_ref());
        DemoReport {
            args,
            plan,
            migration: outcome.report,
            verification,
            outputs,
            fenced: outcome.fenced,
            one_copy,
            applied,
            serving,
            namespaces,
        }
    }

    /// Whether released output agrees with the verified run.
    fn outputs_ok(&self) -> bool {
        self.outputs.lost == 0 && (!self.verification.ok || self.outputs.never_released == 0)
    }

    fn recovered(&self) -> bool {
        self.migration.failover.is_some()
    }

    /// Exactly one copy at a time and at the end (or the one documented
    /// outcome without: the source cannot know whether the destination took
    /// the VM, and must not restore its own).
    fn one_copy_ok(&self) -> bool {
        let finish_unconfirmed = self.migration.failure.as_ref().is_some_and(|f| f.kind == "finish-unconfirmed");
        self.one_copy.overlap.is_zero() && (self.one_copy.copies_at_end() == 1 || finish_unconfirmed)
    }

    /// The slow staging disk of slow-disk.
    fn source_staging(&self) -> Option<String> {
        self.plan.fault.slow_disk.then(|| {
            format!("every checkpoint page staged in a file, each write {} ms slower", self.args.disk_delay_ms)
        })
    }

    /// Prints the report: one JSON object with `--json`, else human lines
    /// (and a note when the failure never happened).
    pub fn print(&self) -> Result<(), Failure> {
        if self.args.json {
            println!("{}", self.json()?);
        } else {
            self.print_text();
            self.print_unreached();
        }
        Ok(())
    }

    /// The source's migration report with the demo's findings added.
    fn json(&self) -> Result<serde_json::Value, Failure> {
        let (report, plan, outputs, one_copy) = (&self.migration, self.plan, &self.outputs, &self.one_copy);
        let mut object = serde_json::to_value(report).map_err(run_failure)?;
        let total = report.total_migration_ms.is_finite().then_some(report.total_migration_ms);
        let extra = json!({
            "fixture": plan.config.fixture.kind.name(), "vcpus": plan.config.fixture.vcpus,
            "mem_bytes": plan.config.mem_bytes, "verified": self.verification.ok && self.outputs_ok(),
            "records": self.verification.records, "memory_digest": self.verification.digest,
            "error": self.verification.error,
            "total_migration_ms": total,
            "fail_at": plan.mode.checkpoints().then(|| plan.fault.fail_at.name()),
            "recovered": self.recovered(),
            "failover_ms": report.failover.as_ref().map(|f| f.failover_ms),
            "restored_epoch": report.failover.as_ref().map(|f| f.restored_epoch),
            "released_outputs": outputs.released,
            "destination_released_outputs": outputs.by_destination,
            "duplicate_released_outputs": outputs.duplicates,
            "duplicate_released_outputs_in_window": outputs.duplicates_in_window,
            "lost_released_outputs": outputs.lost,
            "never_released_outputs": outputs.never_released,
            "fail_kind": plan.fault.kind.name(),
            "destination_fenced": self.fenced,
            "network": self.applied.network,
            "source_throttle": self.applied.source_throttle,
            "source_staging": self.source_staging(),
            "reset_side": plan.fault.reset.then(|| self.args.reset_side.name()),
            "copies_overlap_ms": one_copy.overlap_ms(),
            "copies_first_overlap": one_copy.first.map(|(s, d)| json!({ "source": s, "destination": d })),
            "source_run_intervals": one_copy.source.runs.as_ref().map(|r| r.intervals.len()),
            "destination_run_intervals": one_copy.destination.runs.as_ref().map(|r| r.intervals.len()),
            "run_log_dropped": one_copy.dropped(),
            "copies_at_end": one_copy.copies_at_end(),
            "testbed_namespaces": self.namespaces,
        });
        let object_fields = object.as_object_mut().expect("report is an object");
        object_fields.extend(extra.as_object().expect("object").clone());
        if let Some(serving) = &self.serving {
            object_fields.extend(serving_json(serving).as_object().expect("object").clone());
        }
        Ok(object)
    }

    /// The human lines.
    fn print_text(&self) {
        print_report(&self.migration);
        let fail_at = &self.plan.fault.fail_at;
        if let Some(why) =
            self.migration.failover.as_ref().and_then(|f| explain::restored_why(fail_at, f.restored_epoch))
        {
            println!("{why}");
        }
        let fixture = self.plan.config.fixture.kind.name();
        let place = if self.recovered() { "at the source after the failover" } else { "at the destination" };
        if let Some(serving) = &self.serving {
            print_serving(serving, place, self.migration.downtime_ms);
            self.print_rest();
            return;
        }
        match (&self.verification.error, self.verification.records) {
            (None, Some(records)) => println!(
                "verified: the {fixture} guest finished {place} and matches its oracle ({records} output records)"
            ),
            _ => println!("NOT verified: {}", self.verification.error.as_deref().unwrap_or("unknown")),
        }
        let outputs = &self.outputs;
        println!(
            "outside world: {} distinct records released, {} lost or contradicted, {} never released; {}",
            outputs.released,
            outputs.lost,
            outputs.never_released,
            explain::duplicates_note(outputs.duplicates, outputs.duplicates_in_window, self.recovered())
        );
        self.print_rest();
    }

    /// The lines after the guest's: the failure applied, the fence, one copy.
    fn print_rest(&self) {
        let fail_at = &self.plan.fault.fail_at;
        if self.plan.fault.partition {
            println!("{}", explain::partition_line(fail_at, self.recovered()));
        }
        match &self.applied.network {
            Some(rule) if self.plan.fault.reset => {
                println!("the migration connection was reset ({rule}) until the migration ended")
            }
            Some(network) => println!("the link between the hosts was degraded ({network}) until the migration ended"),
            None => {}
        }
        if let Some(throttle) = &self.applied.source_throttle {
            println!("the source agent was held to a CPU quota ({throttle}) until the migration ended");
        }
        if let Some(staging) = &self.source_staging() {
            println!("the source had a slow staging disk: {staging}");
        }
        match self.fenced {
            Some(true) => println!("the destination keeps its copy stopped (fenced) after the failover: one VM runs"),
            Some(false) => println!("SPLIT BRAIN: the destination's copy runs again after the failover"),
            None => {}
        }
        println!("{}", self.one_copy.line());
    }
}

/// The JSON fields of a serving VM's clients and of what reached them.
fn serving_json(serving: &ServingReport) -> serde_json::Value {
    let (clients, frames) = (&serving.clients, &serving.frames);
    let findings = &clients.findings;
    json!({
        "frames_from_source": frames.from_source,
        "frames_from_destination": frames.from_destination,
        "frames_from_uncommitted_epochs": frames.uncommitted,
        "frames_out_of_turn": frames.out_of_turn,
        "capture_error": frames.error,
        "client_connections": clients.connections,
        "client_ops": findings.ops,
        "client_acked_writes": findings.acked_writes,
        "acked_writes_lost": findings.acked_writes_lost,
        "stale_reads": findings.stale_reads,
        "unexplained_reads": findings.unexplained_reads,
        "client_errors": findings.errors,
        "client_reconnects": clients.reconnects,
        "client_max_gap_ms": clients.max_gap.as_secs_f64() * 1e3,
        "client_latency_p50_ms": clients.latency.p50_ms,
        "client_latency_p99_ms": clients.latency.p99_ms,
        "client_latency_migrating_p50_ms": clients.latency_migrating.p50_ms,
        "client_latency_migrating_p99_ms": clients.latency_migrating.p99_ms,
        "connections_survived": clients.connections_survived,
        "store_digest": clients.store_digest,
        "store_digest_matches": clients.digest_matches,
        "client_anomalies": findings.examples,
        "client_error": clients.error,
    })
}

/// The human lines of a serving VM's clients and of what reached them.
fn print_serving(serving: &ServingReport, place: &str, downtime_ms: f64) {
    let (clients, frames) = (&serving.clients, &serving.frames);
    let f = &clients.findings;
    println!(
        "clients: {} operations on {} connections ({} survived, {} reconnects, {} errors or unanswered); \
         longest time without a reply {:.0} ms (downtime {downtime_ms:.1} ms)",
        f.ops,
        clients.connections,
        clients.connections_survived,
        clients.reconnects,
        f.errors,
        clients.max_gap.as_secs_f64() * 1e3,
    );
    println!(
        "on the wire: {} frames from the VM reached the clients through the source, {} through the destination; \
         {} of these from epochs that never committed, {} out of turn (after the source answered again)",
        frames.from_source, frames.from_destination, frames.uncommitted, frames.out_of_turn
    );
    match serving.problem() {
        None => println!(
            "verified: the kv guest serves {place}; of {} acknowledged writes none was lost, no read was stale, \
             and the store holds exactly what the clients read back (digest {})",
            f.acked_writes,
            clients.store_digest.as_deref().unwrap_or("?")
        ),
        Some(problem) => println!("NOT verified: {problem}"),
    }
}

impl DemoReport<'_> {
    /// The note when a failure was asked for but never happened (text output only).
    fn print_unreached(&self) {
        let (plan, report) = (self.plan, &self.migration);
        let asked = plan.mode.checkpoints() && plan.fault.fail_at != FailAt::None;
        if !asked || self.recovered() || report.failure.is_some() {
            return;
        }
        match plan.fault.kind {
            FailKind::Stall => println!(
                "(the migration completed before the stall point, or before --checkpoint-timeout ({} ms) ran out after it)",
                plan.options.checkpoint_timeout_ms
            ),
            FailKind::Lossy | FailKind::SlowSource => {
                println!("(the migration completed: with the link degraded or the source slowed, or before that)")
            }
            FailKind::Reset => println!("(the migration completed before the reset)"),
            _ => println!("(the failure point was not reached before the migration completed)"),
        }
    }

    /// The exit: success only if the destination stayed fenced, one copy ran
    /// at a time, the guest verified and released output agrees with it.
    pub fn verdict(self) -> Result<(), Failure> {
        let outputs_ok = self.outputs_ok();
        if !self.fenced.is_none_or(|fenced| fenced) {
            Err(run_failure(anyhow!("the destination's copy ran again after the failover (not fenced)")))
        } else if !self.one_copy_ok() {
            Err(run_failure(anyhow!("{}", self.one_copy.line())))
        } else if self.verification.ok && outputs_ok {
            Ok(())
        } else if !self.verification.ok {
            Err(run_failure(anyhow!("the VM did not verify: {}", self.verification.error.unwrap_or_default())))
        } else {
            Err(run_failure(anyhow!(
                "released output is inconsistent with the recovered run: {} lost or contradicted, {} never released",
                self.outputs.lost,
                self.outputs.never_released
            )))
        }
    }
}
