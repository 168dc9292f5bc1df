//! The peer benchmark's report: medians per (memory size, system), the
//! ratios pcft/QEMU and pcft/TCP, the goals, as target/bench/peer.md
//! and peer.json.

use super::{Measured, Run, System, SHORT_PRECOPY};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const GIB: f64 = (1u64 << 30) as f64;

/// The median of the finite values (the upper one of an even count); None if there is none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

pub fn gbit_per_s(bytes: f64, ms: f64) -> f64 {
    bytes * 8.0 / (ms / 1e3) / 1e9
}

/// CPU seconds per GiB moved.
pub fn cpu_per_gib(cpu_s: f64, bytes: u64) -> f64 {
    cpu_s / (bytes as f64 / GIB)
}

/// The runs of one system at one memory size, summed up.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub system: System,
    pub mem_mib: u64,
    /// Runs that measured, and runs that failed (left out).
    pub runs: usize,
    pub failed: usize,
    /// Medians, and the range of the total.
    pub total_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub downtime_ms: Option<f64>,
    pub bytes: f64,
    pub gbit_s: f64,
    /// CPU seconds per GiB moved, vCPU threads apart (see cpu.rs).
    pub src_cpu_per_gib: f64,
    pub dst_cpu_per_gib: f64,
    pub demand_pages: Option<f64>,
    /// pcft's demand-fault latency at the destination, median of the runs' p50 (QEMU reports none).
    pub fault_p50_us: Option<f64>,
}

pub fn summarize(runs: &[Run], system: System, mem_mib: u64) -> Option<Summary> {
    let cell: Vec<&Run> = runs.iter().filter(|r| r.system == system && r.mem_mib == mem_mib).collect();
    let ok: Vec<&Measured> = cell.iter().filter_map(|r| r.outcome.as_ref().ok()).collect();
    let of = |f: &dyn Fn(&Measured) -> f64| median(ok.iter().map(|m| f(m)).collect());
    let totals: Vec<f64> = ok.iter().map(|m| m.total_ms).collect();
    Some(Summary {
        system,
        mem_mib,
        runs: ok.len(),
        failed: cell.len() - ok.len(),
        total_ms: of(&|m| m.total_ms)?,
        min_ms: totals.iter().copied().fold(f64::INFINITY, f64::min),
        max_ms: totals.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        downtime_ms: of(&|m| m.downtime_ms.unwrap_or(f64::NAN)),
        bytes: of(&|m| m.bytes as f64)?,
        gbit_s: of(&|m| gbit_per_s(m.bytes as f64, m.total_ms))?,
        src_cpu_per_gib: of(&|m| cpu_per_gib(m.src.migration_s(), m.bytes))?,
        dst_cpu_per_gib: of(&|m| cpu_per_gib(m.dst.migration_s(), m.bytes))?,
        demand_pages: of(&|m| m.demand_pages.map_or(f64::NAN, |p| p as f64)),
        fault_p50_us: of(&|m| m.detail.pointer("/fault_latency_us/p50").and_then(Value::as_f64).unwrap_or(f64::NAN)),
    })
}

/// Every (memory size, system) that measured something.
pub fn summaries(runs: &[Run], mems_mib: &[u64]) -> Vec<Summary> {
    mems_mib.iter().flat_map(|&mem| System::ALL.iter().filter_map(move |&s| summarize(runs, s, mem))).collect()
}

fn find(summaries: &[Summary], system: System, mem_mib: u64) -> Option<&Summary> {
    summaries.iter().find(|s| s.system == system && s.mem_mib == mem_mib)
}

/// peer.json's rows: per memory size, one per pcft mode, beside QEMU and TCP.
pub fn rows(summaries: &[Summary], mems_mib: &[u64]) -> Vec<Value> {
    let mut rows = Vec::new();
    for &mem in mems_mib {
        let at = |system| find(summaries, system, mem);
        let total = |system| at(system).map(|s| s.total_ms);
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let (qemu, precopy, tcp) = (total(System::QemuAtOnce), total(System::QemuAfterPrecopy), total(System::Tcp));
        for (mode, system) in [("postcopy", System::PcftPostcopy), ("postcopy-ft", System::PcftPostcopyFt)] {
            let pcft = total(system);
            rows.push(json!({
                "mem_mib": mem, "mode": mode,
                "pcft_ms": pcft, "qemu_ms": qemu, "qemu_precopy_ms": precopy, "tcp_ms": tcp,
                "pcft_over_qemu": ratio(pcft, qemu), "pcft_over_qemu_precopy": ratio(pcft, precopy),
                "pcft_over_tcp": ratio(pcft, tcp), "qemu_over_tcp": ratio(qemu, tcp),
                "ft_over_plain": ratio(pcft, total(System::PcftPostcopy)),
                "pcft_downtime_ms": at(system).and_then(|s| s.downtime_ms),
                "pcft_fault_p50_us": at(system).and_then(|s| s.fault_p50_us),
                "qemu_downtime_ms": at(System::QemuAtOnce).and_then(|s| s.downtime_ms),
                "pcft_gbit_s": at(system).map(|s| s.gbit_s),
                "qemu_gbit_s": at(System::QemuAtOnce).map(|s| s.gbit_s),
                "tcp_gbit_s": at(System::Tcp).map(|s| s.gbit_s),
                "pcft_src_cpu_s_per_gib": at(system).map(|s| s.src_cpu_per_gib),
                "pcft_dst_cpu_s_per_gib": at(system).map(|s| s.dst_cpu_per_gib),
                "qemu_src_cpu_s_per_gib": at(System::QemuAtOnce).map(|s| s.src_cpu_per_gib),
                "qemu_dst_cpu_s_per_gib": at(System::QemuAtOnce).map(|s| s.dst_cpu_per_gib),
            }));
        }
    }
    rows
}

fn num(value: Option<f64>, decimals: usize) -> String {
    value.filter(|v| v.is_finite()).map_or("–".into(), |v| format!("{v:.decimals$}"))
}

fn summary_line(s: &Summary, qemu: Option<f64>, tcp: Option<f64>) -> String {
    let mem = if s.mem_mib >= 1024 { format!("{} GiB", s.mem_mib / 1024) } else { format!("{} MiB", s.mem_mib) };
    format!(
        "| {mem} | {} | {:.0} | {:.0}–{:.0} | {} | {:.0} | {:.1} | {} | {:.2} | {:.2} | {} | {} | {}{} |\n",
        s.system.label(),
        s.total_ms,
        s.min_ms,
        s.max_ms,
        num(s.downtime_ms, 1),
        s.bytes / (1 << 20) as f64,
        s.gbit_s,
        num(s.demand_pages, 0),
        s.src_cpu_per_gib,
        s.dst_cpu_per_gib,
        num(qemu.map(|q| s.total_ms / q), 2),
        num(tcp.map(|t| s.total_ms / t), 2),
        s.runs,
        if s.failed > 0 { format!(" ({} failed)", s.failed) } else { String::new() },
    )
}

fn goals_line(mem: u64, row: &Value, summaries: &[Summary]) -> String {
    let at = |k: &str| row[k].as_f64();
    let yes = |ok: Option<bool>| match ok {
        Some(true) => "yes",
        Some(false) => "no",
        None => "–",
    };
    let plain = find(summaries, System::PcftPostcopy, mem);
    let over_qemu = at("pcft_over_qemu");
    let src_cpu = plain.map(|s| s.src_cpu_per_gib);
    let downtime = plain.and_then(|s| s.downtime_ms);
    let fault = plain.and_then(|s| s.fault_p50_us);
    format!(
        "| {mem} MiB | {} ({}) | {} | {} ({}) | {} ({}) | {} ({}) | {} ({}) |\n",
        num(over_qemu, 2),
        yes(over_qemu.map(|r| r < 1.0)),
        yes(over_qemu.map(|r| r <= 0.5)),
        num(at("pcft_over_tcp"), 2),
        yes(at("pcft_over_tcp").map(|r| r <= 3.0)),
        num(src_cpu, 2),
        yes(src_cpu.map(|c| c <= 0.8)),
        num(downtime, 2),
        yes(downtime.map(|d| d <= 2.0)),
        num(fault, 0),
        yes(fault.map(|f| f < 100.0)),
    )
}

/// The markdown report.
pub fn markdown(runs: &[Run], mems_mib: &[u64], reps: usize, elapsed: Duration) -> String {
    let summaries = summaries(runs, mems_mib);
    let mut md = format!(
        "# Peer benchmark: pcft's post-copy beside QEMU's and a raw TCP copy\n\n\
         One run of `cargo xtask bench --only peer`, {:.0} s, on this machine's loopback; up to {reps} runs of each, \
         alternating pcft and QEMU (medians, and the range of the total). Every guest has written all of its memory \
         (non-zero), then writes pages at random. pcft: two agents with a pre-shared key (authentication on), the \
         `dirty` fixture with `--prefill`, `pcft migrate --mode postcopy|postcopy-ft`. QEMU (`qemu-system-x86_64 -accel \
         kvm`): its own firmware-image guest (xtask/peer-guest/peer.S), `postcopy-ram`, `migrate` then \
         `migrate-start-postcopy` at once or after {} ms of pre-copy (`max-bandwidth` raised from its 128 MiB/s \
         default, `downtime-limit` {} ms so that pre-copy cannot end the migration by itself). Total and downtime are each system's own \
         figures (pcft `total_migration_ms`, QEMU `total-time`, both from the migrate command to the end). \
         Raw TCP: as many bytes as the guest has memory, over one loopback connection. CPU-s/GiB: CPU time of the \
         source's and the destination's process over the migration, their guest vCPU threads left out (the TCP \
         copy: its sending and its receiving thread), per GiB moved; /proc counts in 10 ms ticks. `/ QEMU at once` \
         and `/ TCP`: this row's median total over theirs.\n\n\
         | mem | what | total ms | range | downtime ms | MiB moved | Gbit/s | demand-faulted pages | source CPU-s/GiB | destination CPU-s/GiB | / QEMU at once | / TCP | runs |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        elapsed.as_secs_f64(),
        SHORT_PRECOPY.as_millis(),
        super::qemu::DOWNTIME_LIMIT_MS,
    );
    for s in &summaries {
        let total = |system| find(&summaries, system, s.mem_mib).map(|s| s.total_ms);
        md.push_str(&summary_line(s, total(System::QemuAtOnce), total(System::Tcp)));
    }
    md.push_str(
        "\n## Against issue 16's goals\n\npcft post-copy, authentication on: total below QEMU's started at once \
         (the must), at most half of it and at most 3× the raw TCP copy (the aim), source CPU at most 0.8 s per GiB, \
         downtime at most 2 ms, demand-fault latency (the destination's p50, median of the runs) under 100 µs. \
         FT over plain (goal at most 1.05) per size: ",
    );
    let rows = rows(&summaries, mems_mib);
    let ft: Vec<String> = rows
        .iter()
        .filter(|r| r["mode"] == "postcopy-ft")
        .map(|r| format!("{} MiB {}", r["mem_mib"], num(r["ft_over_plain"].as_f64(), 2)))
        .collect();
    md.push_str(&format!("{}.\n\n", ft.join(", ")));
    md.push_str(
        "| mem | pcft / QEMU (< 1) | ≤ 0.5 | pcft / TCP (≤ 3) | source CPU-s/GiB (≤ 0.8) | downtime ms (≤ 2) | fault p50 µs (< 100) |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows.iter().filter(|r| r["mode"] == "postcopy") {
        md.push_str(&goals_line(row["mem_mib"].as_u64().unwrap_or(0), row, &summaries));
    }
    md.push_str(&precopy_only(runs, mems_mib));
    let failures: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            r.outcome.as_ref().err().map(|e| format!("- {}, {} MiB, run {}: {e}", r.system.label(), r.mem_mib, r.rep))
        })
        .collect();
    if !failures.is_empty() {
        md.push_str(&format!("\nFailed runs (left out of the medians):\n\n{}\n", failures.join("\n")));
    }
    md
}

/// A note on QEMU runs whose short pre-copy completed the migration by itself (no post-copy at all).
fn precopy_only(runs: &[Run], mems_mib: &[u64]) -> String {
    let mut notes = Vec::new();
    for &mem in mems_mib {
        let cell: Vec<&Measured> = runs
            .iter()
            .filter(|r| r.system == System::QemuAfterPrecopy && r.mem_mib == mem)
            .filter_map(|r| r.outcome.as_ref().ok())
            .collect();
        let done = cell.iter().filter(|m| m.detail["postcopy_bytes"].as_u64() == Some(0)).count();
        if done > 0 {
            notes.push(format!("{done} of {} at {mem} MiB", cell.len()));
        }
    }
    if notes.is_empty() {
        return String::new();
    }
    format!(
        "\nQEMU runs whose {} ms of pre-copy completed the migration before post-copy started (no post-copy): {}.\n",
        SHORT_PRECOPY.as_millis(),
        notes.join(", ")
    )
}

fn run_json(run: &Run) -> Value {
    let mut value = json!({ "system": run.system.key(), "mem_mib": run.mem_mib, "rep": run.rep });
    match &run.outcome {
        Ok(m) => {
            let cpu = |c: &super::cpu::CpuUse| json!({ "total_s": c.total_s, "vcpu_s": c.vcpu_s });
            value["total_ms"] = json!(m.total_ms);
            value["downtime_ms"] = json!(m.downtime_ms);
            value["bytes"] = json!(m.bytes);
            value["src_cpu"] = cpu(&m.src);
            value["dst_cpu"] = cpu(&m.dst);
            value["demand_pages"] = json!(m.demand_pages);
            value["detail"] = m.detail.clone();
        }
        Err(e) => value["error"] = json!(e),
    }
    value
}

/// Writes peer.md and peer.json into `dir`; the markdown.
pub fn write(dir: &Path, runs: &[Run], mems_mib: &[u64], reps: usize, elapsed: Duration) -> Result<String> {
    let summaries = summaries(runs, mems_mib);
    let md = markdown(runs, mems_mib, reps, elapsed);
    let results = json!({
        "plan": { "mems_mib": mems_mib, "reps": reps, "short_precopy_ms": SHORT_PRECOPY.as_millis() as u64 },
        "elapsed_s": elapsed.as_secs_f64(),
        "rows": rows(&summaries, mems_mib),
        "summaries": summaries.iter().map(|s| json!({
            "system": s.system.key(), "label": s.system.label(), "mem_mib": s.mem_mib,
            "runs": s.runs, "failed": s.failed, "total_ms": s.total_ms, "min_ms": s.min_ms, "max_ms": s.max_ms,
            "downtime_ms": s.downtime_ms, "bytes": s.bytes, "gbit_s": s.gbit_s,
            "src_cpu_s_per_gib": s.src_cpu_per_gib, "dst_cpu_s_per_gib": s.dst_cpu_per_gib,
            "demand_pages": s.demand_pages, "fault_p50_us": s.fault_p50_us,
        })).collect::<Vec<_>>(),
        "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("peer.json"), serde_json::to_string_pretty(&results)?)?;
    std::fs::write(dir.join("peer.md"), &md)?;
    Ok(md)
}

/// An error if some system measured nothing at some size.
pub fn check_measured(runs: &[Run], mems_mib: &[u64]) -> Result<()> {
    for &mem in mems_mib {
        for system in System::ALL {
            if summarize(runs, system, mem).is_none() {
                let first =
                    runs.iter().find(|r| r.system == system && r.mem_mib == mem).and_then(|r| r.outcome.clone().err());
                bail!("every run of {} at {mem} MiB failed; the first: {}", system.label(), first.unwrap_or_default());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::cpu::CpuUse;
    use super::*;

    fn run(system: System, mem_mib: u64, rep: usize, total_ms: f64, bytes: u64, src_cpu: f64) -> Run {
        let measured = Measured {
            total_ms,
            downtime_ms: Some(2.0),
            bytes,
            src: CpuUse { total_s: src_cpu + 0.5, vcpu_s: 0.5 },
            dst: CpuUse { total_s: 1.0, vcpu_s: 0.0 },
            demand_pages: Some(10),
            detail: json!({ "fault_latency_us": { "p50": 150, "p99": 900 } }),
        };
        Run { system, mem_mib, rep, outcome: Ok(measured) }
    }

    fn sample() -> Vec<Run> {
        let gib = 1u64 << 30;
        let mut runs = Vec::new();
        for (rep, pcft_ms) in [(1, 4000.0), (2, 3000.0), (3, 3500.0)] {
            runs.push(run(System::PcftPostcopy, 1024, rep, pcft_ms, gib, 2.0));
            runs.push(run(System::PcftPostcopyFt, 1024, rep, pcft_ms * 1.2, gib, 2.5));
            runs.push(run(System::QemuAtOnce, 1024, rep, 1000.0, gib, 0.5));
            runs.push(run(System::QemuAfterPrecopy, 1024, rep, 1500.0, gib, 0.6));
            runs.push(run(System::Tcp, 1024, rep, 250.0, gib, 0.2));
        }
        runs.push(Run { system: System::QemuAtOnce, mem_mib: 1024, rep: 4, outcome: Err("QEMU died".into()) });
        runs
    }

    #[test]
    fn medians_rates_and_cpu_per_gib() {
        assert_eq!(median(vec![3.0, f64::NAN, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![f64::NAN]), None);
        assert!((gbit_per_s(1e9, 1000.0) - 8.0).abs() < 1e-12);
        assert_eq!(cpu_per_gib(1.5, 512 << 20), 3.0);
        let runs = sample();
        let pcft = summarize(&runs, System::PcftPostcopy, 1024).unwrap();
        assert_eq!((pcft.total_ms, pcft.min_ms, pcft.max_ms, pcft.runs, pcft.failed), (3500.0, 3000.0, 4000.0, 3, 0));
        // vCPU time is left out of the CPU per GiB.
        assert_eq!(pcft.src_cpu_per_gib, 2.0);
        let qemu = summarize(&runs, System::QemuAtOnce, 1024).unwrap();
        assert_eq!((qemu.runs, qemu.failed), (3, 1));
        assert!(summarize(&runs, System::Tcp, 256).is_none());
    }

    #[test]
    fn rows_carry_the_ratios_pcft_over_qemu_and_over_tcp() {
        let runs = sample();
        let rows = rows(&summaries(&runs, &[1024]), &[1024]);
        assert_eq!(rows.len(), 2);
        let plain = &rows[0];
        for key in ["mem_mib", "mode", "pcft_ms", "qemu_ms", "tcp_ms"] {
            assert!(!plain[key].is_null(), "{key}: {plain}");
        }
        assert_eq!((plain["mode"].as_str(), plain["pcft_ms"].as_f64()), (Some("postcopy"), Some(3500.0)));
        assert_eq!(plain["pcft_over_qemu"].as_f64(), Some(3.5));
        assert_eq!(plain["pcft_over_tcp"].as_f64(), Some(14.0));
        assert_eq!(plain["qemu_precopy_ms"].as_f64(), Some(1500.0));
        assert_eq!(rows[1]["ft_over_plain"].as_f64(), Some(1.2));
        let md = markdown(&runs, &[1024], 3, Duration::from_secs(100));
        assert!(md.contains("| 1 GiB | pcft post-copy | 3500 | 3000–4000 | 2.0 | 1024 | 2.5 |"), "{md}");
        assert!(md.contains("| 1024 MiB | 3.50 (no) | no | 14.00 (no) | 2.00 (no) | 2.00 (yes) | 150 (no) |"), "{md}");
        assert!(md.contains("QEMU post-copy, started at once, 1024 MiB, run 4: QEMU died"), "{md}");
        assert!(check_measured(&runs, &[1024]).is_ok());
        assert!(check_measured(&runs, &[1024, 256]).unwrap_err().to_string().contains("256 MiB"));
    }
}
