//! `cargo xtask soak [--minutes N]`: `pcft soak` (a serving VM migrated back
//! and forth with PostCopyFT, its clients writing throughout, a failure every
//! few migrations), with its report and each agent's resources over time
//! plotted: target/soak/soak.{md,json} and soak-{rss,fds,threads}.svg.

use crate::plots::{line_chart, Line};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

pub fn run(root: &Path, pcft: &Path, minutes: f64) -> Result<()> {
    eprintln!("soak: {minutes} min of migrations back and forth (pcft soak)");
    // Its progress (a line per migration) and log go to the terminal; its report comes on stdout.
    let out = Command::new(pcft)
        .args(["soak", "--minutes", &minutes.to_string(), "--json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run pcft soak")?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("pcft soak printed no report ({}); its log is above", out.status))?;
    let dir = root.join("target/soak");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(&report)?)?;
    let samples = report["samples"].as_array().cloned().unwrap_or_default();
    // One line per agent process (a restarted agent is a new one).
    let lines = |field: &str, scale: f64| -> Vec<Line> {
        let mut keys: Vec<(String, u64)> = samples
            .iter()
            .map(|s| (s["host"].as_str().unwrap_or("?").to_string(), s["pid"].as_u64().unwrap_or(0)))
            .collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|(host, pid)| {
                let points = samples
                    .iter()
                    .filter(|s| s["host"] == host.as_str() && s["pid"] == pid)
                    .map(|s| (s["t_s"].as_f64().unwrap_or(0.0), s[field].as_f64().unwrap_or(0.0) / scale))
                    .collect();
                (format!("agent {host} (pid {pid})"), points)
            })
            .collect()
    };
    for (field, scale, unit, name) in
        [("rss_kib", 1024.0, "RSS MiB", "rss"), ("fds", 1.0, "open fds", "fds"), ("threads", 1.0, "threads", "threads")]
    {
        let title = format!("pcft soak: each agent's {unit} over time");
        line_chart(&dir.join(format!("soak-{name}.svg")), &title, "seconds", unit, &lines(field, scale))?;
    }
    let md = summary(&report);
    std::fs::write(dir.join("soak.md"), &md)?;
    println!("{md}");
    eprintln!("soak: wrote {}", dir.join("soak.md").display());
    if report["verified"] != true {
        bail!("the soak did not hold: {}", report["error"]);
    }
    Ok(())
}

/// The report in words and a table of each agent's first and last sample.
fn summary(r: &Value) -> String {
    let mut md = format!(
        "# Soak\n\n{:.1} minutes: {} migrations in postcopy-ft back and forth, {} with a failure injected \
         (crash, partition, freeze in turn); {} completed, {} failed over to the source, {} failed before \
         the switchover (the VM ran on at the source), {} failed otherwise. Clients: {} \
         operations, {} acknowledged writes, {} lost, {} stale reads, {} reconnects, longest time without an \
         answer {:.0} ms. Left behind: {}. Verdict: {}.\n\n\
         | agent | pid | RSS KiB first → last | fds | threads | staging files | taps | grew |\n\
         |---|---:|---|---|---|---|---|---|\n",
        r["minutes"].as_f64().unwrap_or(0.0),
        r["migrations"],
        r["failures_injected"],
        r["completed"],
        r["recovered"],
        r["kept_at_source"],
        r["failed"],
        r["client_ops"],
        r["client_acked_writes"],
        r["acked_writes_lost"],
        r["stale_reads"],
        r["client_reconnects"],
        r["client_max_gap_ms"].as_f64().unwrap_or(f64::NAN),
        match r["left_behind"].as_array() {
            Some(left) if !left.is_empty() => format!("{left:?}"),
            _ => "nothing".into(),
        },
        if r["verified"] == true { "held".to_string() } else { format!("NOT held: {}", r["error"]) },
    );
    for g in r["growth"].as_array().into_iter().flatten() {
        let pair = |field: &str| format!("{} → {}", g["first"][field], g["last"][field]);
        let grew: Vec<&str> = g["grew"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            g["host"].as_str().unwrap_or("?"),
            g["pid"],
            pair("rss_kib"),
            pair("fds"),
            pair("threads"),
            pair("staging_files"),
            pair("taps"),
            if grew.is_empty() { "nothing".to_string() } else { grew.join("; ") },
        ));
    }
    md
}
