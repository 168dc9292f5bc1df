//! Benchmark plots: grouped bar charts (SVG, plotters) of the results that
//! `cargo xtask bench` writes to target/bench/*.json, for a person to look at.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One group of bars: its name and (series name, value) per bar.
pub type Group = (String, Vec<(String, f64)>);

const PALETTE: [RGBColor; 6] = [
    RGBColor(0xc0, 0x39, 0x2b),
    RGBColor(0x24, 0x71, 0xa3),
    RGBColor(0x22, 0x99, 0x54),
    RGBColor(0xd6, 0x89, 0x10),
    RGBColor(0x7d, 0x3c, 0x98),
    RGBColor(0x5d, 0x6d, 0x7e),
];

/// A grouped bar chart of `groups` into `path`; bars of the same series name share a colour.
pub fn bar_chart(path: &Path, title: &str, y_label: &str, groups: &[Group]) -> Result<()> {
    let series: Vec<String> =
        groups.iter().flat_map(|(_, bars)| bars.iter().map(|(s, _)| s.clone())).fold(Vec::new(), |mut names, name| {
            if !names.contains(&name) {
                names.push(name);
            }
            names
        });
    let top =
        groups.iter().flat_map(|(_, bars)| bars.iter().map(|(_, v)| *v)).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let error = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    // Room for every group's name under its bars.
    let width = (groups.len() as u32 * 150).max(960);
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups.len() as f64, 0.0..(top * 1.15).max(1e-9))
        .map_err(|e| error(&e))?;
    let names: Vec<String> = groups.iter().map(|(name, _)| name.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .max_light_lines(0)
        .y_desc(y_label)
        // Three decimals at most: 0.6, not 0.6000000000000001.
        .y_label_formatter(&|v| format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string())
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            // Name each group at its centre.
            let centre = x - x.floor();
            match (names.get(*x as usize), (centre - 0.5).abs() < 1e-6) {
                (Some(name), true) => name.clone(),
                _ => String::new(),
            }
        })
        .draw()
        .map_err(|e| error(&e))?;
    let width = 0.8 / series.len().max(1) as f64;
    for (s, name) in series.iter().enumerate() {
        let colour = PALETTE[s % PALETTE.len()];
        let bars = groups.iter().enumerate().filter_map(|(g, (_, bars))| {
            let value = bars.iter().find(|(n, _)| n == name).map(|(_, v)| *v).filter(|v| v.is_finite())?;
            let left = g as f64 + 0.1 + s as f64 * width;
            Some(Rectangle::new([(left, 0.0), (left + width * 0.9, value)], colour.filled()))
        });
        chart
            .draw_series(bars)
            .map_err(|e| error(&e))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

/// Groups `runs` by `group_key` (in first-seen order), one bar per `series_key`, valued by `value`.
pub fn group_runs(
    runs: &[Value],
    group_key: impl Fn(&Value) -> String,
    series_key: impl Fn(&Value) -> String,
    value: impl Fn(&Value) -> Option<f64>,
) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for run in runs {
        let Some(v) = value(run) else { continue };
        let group = group_key(run);
        match groups.iter_mut().find(|(name, _)| *name == group) {
            Some((_, bars)) => bars.push((series_key(run), v)),
            None => groups.push((group, vec![(series_key(run), v)])),
        }
    }
    groups
}

/// Plots of target/bench/migration.json: total migration time and downtime by mode.
pub fn migration(dir: &Path, results: &Value) -> Result<Vec<PathBuf>> {
    let runs = results["runs"].as_array().cloned().unwrap_or_default();
    let cell = |r: &Value| format!("{}, {}", r["mem"].as_str().unwrap_or("?"), r["dirty_rate"].as_str().unwrap_or("?"));
    let mode = |r: &Value| r["mode"].as_str().unwrap_or("?").to_string();
    let mut written = Vec::new();
    for (file, title, label, field) in [
        (
            "migration-total.svg",
            "Total migration time by mode (guest memory, guest dirty rate)",
            "ms",
            "total_migration_ms",
        ),
        ("migration-downtime.svg", "Downtime by mode (guest memory, guest dirty rate)", "ms", "downtime_ms"),
    ] {
        let groups = group_runs(&runs, cell, mode, |r| r["report"][field].as_f64());
        let path = dir.join(file);
        bar_chart(&path, title, label, &groups)?;
        written.push(path);
    }
    Ok(written)
}

/// Plot of target/bench/dirty.json: guest write throughput with each tracker, over none.
pub fn dirty(dir: &Path, results: &Value) -> Result<Vec<PathBuf>> {
    let runs: Vec<Value> = results["runs"]
        .as_array()
        .map(|runs| runs.iter().filter(|r| r["kind"] == "throughput").cloned().collect())
        .unwrap_or_default();
    let groups = group_runs(
        &runs,
        |r| format!("{} writes", r["pattern"].as_str().unwrap_or("?")),
        |r| r["tracker"].as_str().unwrap_or("?").to_string(),
        |r| r["vs_none"].as_f64(),
    );
    let path = dir.join("dirty-throughput.svg");
    bar_chart(&path, "Guest write throughput with dirty tracking, over no tracking", "throughput / none", &groups)?;
    Ok(vec![path])
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Plots of target/bench/ft.json: total time with and without FT, guest
/// progress by checkpoint interval, failover time by guest memory.
pub fn ft(dir: &Path, results: &Value) -> Result<Vec<PathBuf>> {
    let rows = |part: &str, key: &str| results[part][key].as_array().cloned().unwrap_or_default();
    let mut written = Vec::new();

    let cells = rows("total_time", "cells");
    let total: Vec<Group> = cells
        .iter()
        .map(|c| {
            let name = format!(
                "{} {} push {}",
                c["mem"].as_str().unwrap_or("?"),
                c["dirty_rate"].as_str().unwrap_or("?").replace(" pages/s", "/s"),
                c["push"].as_str().unwrap_or("?").replace(" pages/s", "/s")
            );
            let bars = [("postcopy", "postcopy_ms"), ("postcopy-ft", "postcopy_ft_ms")]
                .iter()
                .filter_map(|(series, field)| c[*field].as_f64().map(|v| (series.to_string(), v)))
                .collect();
            (name, bars)
        })
        .collect();
    let path = dir.join("ft-total.svg");
    bar_chart(&path, "Total migration time with and without PostCopyFT (median)", "ms", &total)?;
    written.push(path);

    let slowdown = group_runs(
        &rows("guest_slowdown", "rows"),
        |r| match r["checkpoint_interval_ms"].as_u64() {
            Some(ms) => format!("every {ms} ms"),
            None => "plain post-copy".into(),
        },
        |_| "guest progress vs plain post-copy".into(),
        |r| r["vs_postcopy"].as_f64(),
    );
    let path = dir.join("ft-guest-progress.svg");
    bar_chart(
        &path,
        "Guest progress during post-copy by checkpoint interval",
        "writes/s over plain post-copy",
        &slowdown,
    )?;
    written.push(path);

    let failover = group_runs(
        &rows("failover", "rows"),
        |r| r["mem"].as_str().unwrap_or("?").to_string(),
        |_| "failover (median)".into(),
        |r| median(r["runs"].as_array()?.iter().filter_map(|run| run["failover_ms"].as_f64()).collect()),
    );
    let path = dir.join("ft-failover.svg");
    bar_chart(&path, "Failover time (detection to guest running) by guest memory", "ms", &failover)?;
    written.push(path);
    Ok(written)
}

/// Plots of target/bench/peer.json: total time, and CPU per GiB moved, of
/// pcft, QEMU and the raw TCP copy, by guest memory (medians).
pub fn peer(dir: &Path, results: &Value) -> Result<Vec<PathBuf>> {
    let summaries = results["summaries"].as_array().cloned().unwrap_or_default();
    let mem = |s: &Value| match s["mem_mib"].as_u64().unwrap_or(0) {
        mib if mib >= 1024 && mib % 1024 == 0 => format!("{} GiB", mib / 1024),
        mib => format!("{mib} MiB"),
    };
    let label = |s: &Value| s["label"].as_str().unwrap_or("?").to_string();
    let total = group_runs(&summaries, mem, label, |s| s["total_ms"].as_f64());
    let path = dir.join("peer-total.svg");
    bar_chart(&path, "Post-copy of a full-memory guest: pcft, QEMU, raw TCP copy (median total)", "ms", &total)?;
    let mut written = vec![path];
    let mut cpu = group_runs(&summaries, |s| format!("{}, source", mem(s)), label, |s| s["src_cpu_s_per_gib"].as_f64());
    cpu.extend(group_runs(
        &summaries,
        |s| format!("{}, destination", mem(s)),
        label,
        |s| s["dst_cpu_s_per_gib"].as_f64(),
    ));
    let path = dir.join("peer-cpu.svg");
    bar_chart(&path, "CPU per GiB moved, guest vCPU threads left out (median)", "CPU-s / GiB", &cpu)?;
    written.push(path);
    Ok(written)
}

/// Plots every result file in `dir` that has a plot; returns the files written.
pub fn all(dir: &Path) -> Result<Vec<PathBuf>> {
    type Plotter = fn(&Path, &Value) -> Result<Vec<PathBuf>>;
    let plotters: [(&str, Plotter); 4] =
        [("migration.json", migration), ("dirty.json", dirty), ("ft.json", ft), ("peer.json", peer)];
    let mut written = Vec::new();
    for (file, plot) in plotters {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else { continue };
        let results: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", dir.join(file).display()))?;
        written.extend(plot(dir, &results)?);
    }
    Ok(written)
}

/// One line of a line chart: its name and (x, y) points.
pub type Line = (String, Vec<(f64, f64)>);

/// A line chart of `lines` into `path` (x from 0; y from 0), each line its own colour.
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, lines: &[Line]) -> Result<()> {
    let error = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let points = lines.iter().flat_map(|(_, p)| p.iter());
    let (right, top) = points.fold((0.0f64, 0.0f64), |(x, y), &(px, py)| (x.max(px), y.max(py)));
    let root = SVGBackend::new(path, (960, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..right.max(1e-9), 0.0..(top * 1.15).max(1e-9))
        .map_err(|e| error(&e))?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| error(&e))?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
            .map_err(|e| error(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bar_chart_draws_one_bar_per_value_with_its_legend() {
        let dir = std::env::temp_dir().join(format!("pcft-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = vec![
            json!({"kind": "throughput", "pattern": "random", "tracker": "none", "vs_none": 1.0}),
            json!({"kind": "throughput", "pattern": "random", "tracker": "ebpf", "vs_none": 0.93}),
            json!({"kind": "throughput", "pattern": "sequential", "tracker": "none", "vs_none": 1.0}),
            json!({"kind": "throughput", "pattern": "sequential", "tracker": "ebpf", "vs_none": 0.91}),
            json!({"kind": "take_cost", "tracker": "ebpf"}),
        ];
        let written = dirty(&dir, &json!({ "runs": runs })).unwrap();
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let texts: Vec<&str> =
            svg.split("</text>").filter_map(|t| t.rsplit_once('>').map(|(_, text)| text.trim())).collect();
        assert!(texts.iter().any(|t| t.starts_with("Guest write throughput")), "the title: {texts:?}");
        assert!(texts.contains(&"ebpf") && texts.contains(&"none"), "the legend: {texts:?}");
        assert!(texts.contains(&"random writes") && texts.contains(&"sequential writes"), "the groups: {texts:?}");
        // Four bars and two legend swatches, filled with the series' colours.
        let filled = |colour: RGBColor| {
            svg.matches(&format!("fill=\"#{:02X}{:02X}{:02X}\"", colour.0, colour.1, colour.2)).count()
        };
        assert_eq!(filled(PALETTE[0]) + filled(PALETTE[1]), 6, "{svg}");
    }
}
