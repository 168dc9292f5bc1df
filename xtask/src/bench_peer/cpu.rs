//! CPU time of processes over a migration, from /proc (utime + stime), with
//! the guest's vCPU threads apart: at the destination the guest runs all
//! along (one vCPU, busy), and that is the guest's time, not the migration's.
//!
//! A vCPU thread may end before the migration does (pcft's source VM goes
//! away once it has moved), and a dead thread's time is only in its process's
//! total: so the threads are sampled while the migration runs (every few ms)
//! and each vCPU thread counts as far as it was last seen.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::process::Command;

/// CPU seconds a process used over the watch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    /// All of its threads.
    pub total_s: f64,
    /// Its guest vCPU threads.
    pub vcpu_s: f64,
}

impl CpuUse {
    /// The rest: the migration's work (and whatever else the process does).
    pub fn migration_s(&self) -> f64 {
        (self.total_s - self.vcpu_s).max(0.0)
    }
}

/// The name (comm) and utime + stime (in clock ticks) of a /proc/…/stat line.
/// The name is in parentheses and may itself hold spaces and parentheses.
pub fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_string();
    // After the name: state (field 3) … utime (field 14), stime (field 15).
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let (utime, stime) = (fields.get(11)?.parse::<u64>().ok()?, fields.get(12)?.parse::<u64>().ok()?);
    Some((name, utime + stime))
}

/// Whether a thread of that name runs a guest vCPU: pcft's `vcpuN`, QEMU's
/// `CPU N/KVM` (with `-name …,debug-threads=on`).
pub fn is_vcpu_thread(name: &str) -> bool {
    name.strip_prefix("vcpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        || (name.starts_with("CPU ") && name.ends_with("/KVM"))
}

/// Clock ticks per second of /proc's times (`getconf CLK_TCK`; 100 on Linux as a rule).
pub fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The CPU ticks of the calling thread so far.
pub fn this_thread_ticks() -> u64 {
    std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|s| parse_stat(&s)).map_or(0, |(_, t)| t)
}

struct Watched {
    pid: u32,
    start_ticks: u64,
    /// vCPU thread id → ticks when the watch began (absent: born since, from 0).
    vcpu_start: HashMap<u32, u64>,
    /// vCPU thread id → ticks when last seen.
    vcpu_last: HashMap<u32, u64>,
}

/// CPU use of a few processes from [`CpuWatch::start`] to [`CpuWatch::finish`].
pub struct CpuWatch {
    ticks_per_s: f64,
    watched: Vec<Watched>,
}

fn process_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path} (did the process exit?)"))?;
    parse_stat(&stat).map(|(_, ticks)| ticks).with_context(|| format!("{path} does not parse: {stat:?}"))
}

/// Ticks of each vCPU thread of `pid` now; threads that end while being read are skipped.
fn vcpu_threads(pid: u32) -> HashMap<u32, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return HashMap::new() };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse::<u32>().ok()?;
            let (name, ticks) = parse_stat(&std::fs::read_to_string(task.path().join("stat")).ok()?)?;
            is_vcpu_thread(&name).then_some((tid, ticks))
        })
        .collect()
}

impl CpuWatch {
    pub fn start(pids: &[u32], ticks_per_s: f64) -> Result<CpuWatch> {
        let watched = pids
            .iter()
            .map(|&pid| {
                let vcpu_start = vcpu_threads(pid);
                Ok(Watched { pid, start_ticks: process_ticks(pid)?, vcpu_last: vcpu_start.clone(), vcpu_start })
            })
            .collect::<Result<_>>()?;
        Ok(CpuWatch { ticks_per_s, watched })
    }

    /// Notes where each vCPU thread is now (call every few ms while the migration runs).
    pub fn sample(&mut self) {
        for w in &mut self.watched {
            w.vcpu_last.extend(vcpu_threads(w.pid));
        }
    }

    /// Each process's use since the start, in the order of the pids given.
    pub fn finish(mut self) -> Result<Vec<CpuUse>> {
        self.sample();
        self.watched
            .iter()
            .map(|w| {
                let total = process_ticks(w.pid)?.saturating_sub(w.start_ticks);
                let vcpu: u64 = w
                    .vcpu_last
                    .iter()
                    .map(|(tid, last)| last.saturating_sub(w.vcpu_start.get(tid).copied().unwrap_or(0)))
                    .sum();
                Ok(CpuUse {
                    total_s: total as f64 / self.ticks_per_s,
                    vcpu_s: vcpu.min(total) as f64 / self.ticks_per_s,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_cpu_ticks() {
        // A QEMU vCPU thread: the name holds a space and a slash.
        let line = "4242 (CPU 0/KVM) S 1 4242 4242 0 -1 4194624 1517 0 0 0 250 37 0 0 20 0 4 0 1234 0 0";
        assert_eq!(parse_stat(line), Some(("CPU 0/KVM".to_string(), 287)));
        // A name with parentheses of its own.
        let odd = "7 (a) b) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 0 0";
        assert_eq!(parse_stat(odd), Some(("a) b".to_string(), 11)));
        assert_eq!(parse_stat("7 (short) R 1"), None);
        let (name, _) = parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert!(!name.is_empty());
    }

    #[test]
    fn vcpu_threads_are_told_by_name() {
        for name in ["vcpu0", "vcpu15", "CPU 0/KVM", "CPU 1/KVM"] {
            assert!(is_vcpu_thread(name), "{name}");
        }
        for name in ["vcpus", "vcpu", "pcft", "live_migration", "CPU 0", "qemu-system-x86"] {
            assert!(!is_vcpu_thread(name), "{name}");
        }
    }

    #[test]
    fn the_watch_counts_this_process() {
        let mut watch = CpuWatch::start(&[std::process::id()], ticks_per_second()).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(200) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        watch.sample();
        let used = watch.finish().unwrap();
        // 200 ms of spinning is at least 10 ms of CPU even on a machine busy with other work
        // (a bar of half the wall time failed when the tests shared 2 cores with builds).
        assert!(used[0].total_s >= 0.01, "{used:?}");
        assert_eq!(used[0].vcpu_s, 0.0);
    }
}
