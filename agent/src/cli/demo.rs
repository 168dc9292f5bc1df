//! `pcft demo`: the one-command tour. Two agents as separate processes on this
//! machine, a fixture VM started on one, migrated to the other, verified there
//! against its oracle, everything stopped, and the report printed.

use super::remote::{print_report, runtime};
use super::vm::{machine_config, KVM_PATH};
use super::{run_failure, usage, DemoArgs, Failure, Pattern, WorkloadArgs};
use anyhow::{anyhow, Context};
use pcft_agent::client::{AgentClient, ClientError};
use pcft_agent::dirty::DirtyTracking;
use pcft_agent::host;
use pcft_agent::migration::messages::{Message, MigrationOptions, Mode};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const VM: &str = "demo";

/// The agent processes the demo started; killed when dropped, whatever happened.
struct Agents(Vec<Child>);

impl Agents {
    /// Starts `pcft agent` on a free loopback port and returns its address.
    fn start(&mut self, name: &str) -> Result<String, Failure> {
        let exe = std::env::current_exe().context("cannot find the pcft executable").map_err(run_failure)?;
        let mut child = Command::new(exe)
            .args(["agent", "--listen", "127.0.0.1:0", "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the {name} agent"))
            .map_err(run_failure)?;
        let stdout = child.stdout.take().expect("piped stdout");
        self.0.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map_err(run_failure)?;
        line.trim()
            .strip_prefix("listening on ")
            .map(str::to_string)
            .ok_or_else(|| run_failure(anyhow!("the {name} agent did not start (it printed {line:?})")))
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn default_steps(fixture: &str) -> Option<u64> {
    // Long enough that the guest still runs when the migration starts.
    match fixture {
        "ledger" => Some(60_000),
        "dirty" => Some(600_000),
        "idle" => Some(3_000),
        _ => None,
    }
}

fn workload(args: &DemoArgs) -> WorkloadArgs {
    WorkloadArgs {
        fixture: args.fixture.clone(),
        mem: args.mem.clone(),
        vcpus: args.vcpus,
        steps: args.steps.or_else(|| default_steps(&args.fixture)),
        forever: false,
        working_set: None,
        record_every: None,
        seed: None,
        writes_per_step: 1,
        pattern: Pattern::Random,
        hot_pages: 64,
        hot_permille: 900,
        rate: None,
        spin: None,
        slot_size: "128M".into(),
        dirty_tracker: super::TrackerArg::Bitmap,
    }
}

fn client_error(e: ClientError) -> Failure {
    run_failure(anyhow!(e))
}

pub fn demo(args: DemoArgs) -> Result<(), Failure> {
    let config = machine_config(&workload(&args))?;
    host::check_kvm(Path::new(KVM_PATH)).map_err(usage)?;
    let mode: Mode = args.mode.into();
    let mut agents = Agents(Vec::new());
    let source = agents.start("source")?;
    let destination = agents.start("destination")?;
    if !args.json {
        println!("agents: source at {source}, destination at {destination} (separate processes)");
    }
    let (fixture, vcpus, mem_bytes) = (config.fixture.kind.name(), config.fixture.vcpus, config.mem_bytes);
    let outcome = runtime().block_on(async {
        let mut src = AgentClient::connect(&source).await.map_err(client_error)?;
        let start = Message::StartVm { name: VM.into(), config, tracking: DirtyTracking::Bitmap };
        src.request(&start).await.map_err(client_error)?;
        tokio::time::sleep(Duration::from_millis(args.migrate_after_ms)).await;
        let request =
            Message::Migrate { name: VM.into(), to: destination.clone(), mode, options: MigrationOptions::default() };
        let report = match src.request(&request).await.map_err(client_error)? {
            Message::Migrated(report) => report,
            other => return Err(run_failure(anyhow!("the source answered {other:?}"))),
        };
        let mut dst = AgentClient::connect(&destination).await.map_err(client_error)?;
        let verified = dst.request(&Message::WaitFinished { name: VM.into(), timeout_ms: 600_000 }).await;
        Ok((report, verified))
    });
    drop(agents);
    let (report, verified) = outcome?;
    let (verified_ok, records, digest, error) = match &verified {
        Ok(Message::Verified { records, memory_digest, .. }) => {
            (true, Some(*records), Some(format!("{memory_digest:#018x}")), None)
        }
        Ok(other) => (false, None, None, Some(format!("unexpected answer {other:?}"))),
        Err(e) => (false, None, None, Some(e.to_string())),
    };
    if args.json {
        let mut object = serde_json::to_value(&report).map_err(run_failure)?;
        let extra = json!({
            "fixture": fixture, "vcpus": vcpus, "mem_bytes": mem_bytes, "verified": verified_ok,
            "records": records, "memory_digest": digest, "error": error,
        });
        object.as_object_mut().expect("report is an object").extend(extra.as_object().expect("object").clone());
        println!("{object}");
    } else {
        print_report(&report);
        match (&error, records) {
            (None, Some(records)) => println!(
                "verified: the {fixture} guest finished at the destination and matches its oracle ({records} output records)"
            ),
            _ => println!("NOT verified: {}", error.as_deref().unwrap_or("unknown")),
        }
    }
    if verified_ok {
        Ok(())
    } else {
        Err(run_failure(anyhow!("the migrated VM did not verify at the destination: {}", error.unwrap_or_default())))
    }
}
