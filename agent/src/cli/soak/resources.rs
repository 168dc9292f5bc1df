//! What an agent process holds, read from `/proc` (RSS, open file
//! descriptors, staging files among them, threads) and from its network
//! namespace (tap devices): the soak samples these every few seconds, and
//! nothing may grow with the number of migrations.

use std::process::Command;

/// One sample of one agent.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Seconds since the soak started.
    pub t_s: f64,
    /// Which host's agent (`a` or `b`).
    pub host: String,
    /// Its process (an agent restarted after a crash is a new one).
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    /// Of the fds, checkpoint staging files (unlinked temp files).
    pub staging_files: u64,
    pub threads: u64,
    /// Tap devices in the host's namespace.
    pub taps: u64,
}

/// Samples agent `pid` of `host`, whose namespace is `ns` (None: gone).
pub fn sample(t_s: f64, host: &str, pid: u32, ns: &str) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (mut fds, mut staging_files) = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        fds += 1;
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        if target.starts_with('/') && target.ends_with("(deleted)") {
            staging_files += 1;
        }
    }
    Some(Sample {
        t_s,
        host: host.to_string(),
        pid,
        rss_kib: field("VmRSS:"),
        fds,
        staging_files,
        threads: field("Threads:"),
        taps: taps_in(ns),
    })
}

/// Tap devices in network namespace `ns`.
pub fn taps_in(ns: &str) -> u64 {
    let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", "type", "tun"]).output();
    out.map_or(0, |o| String::from_utf8_lossy(&o.stdout).lines().count() as u64)
}

/// How an agent's resources went over the soak: first and last samples of
/// each of its processes, and whether anything grew past its allowance.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Growth {
    pub host: String,
    pub pid: u32,
    pub first: Sample,
    pub last: Sample,
    /// What grew, in words (empty: nothing).
    pub grew: Vec<String>,
}

/// Reads one measure of a sample.
type Measure = fn(&Sample) -> u64;

/// The growth of every agent process in `samples`: the peak of each measure
/// over the later half of the process's samples against its peak over the
/// earlier half (a leak keeps climbing; a VM arriving or leaving does not).
/// RSS may rise by a quarter plus 16 MiB (allocator noise); fds, threads and
/// staging files by 4; taps not past one. A process with fewer than 4
/// samples is too short-lived to tell.
pub fn growth(samples: &[Sample]) -> Vec<Growth> {
    let mut processes: Vec<(String, u32)> = samples.iter().map(|s| (s.host.clone(), s.pid)).collect();
    processes.sort();
    processes.dedup();
    processes
        .into_iter()
        .filter_map(|(host, pid)| {
            let of: Vec<&Sample> = samples.iter().filter(|s| s.pid == pid && s.host == host).collect();
            let (first, last) = ((*of.first()?).clone(), (*of.last()?).clone());
            let mut grew = Vec::new();
            if of.len() >= 4 {
                let (early, late) = of.split_at(of.len() / 2);
                let peak = |half: &[&Sample], f: Measure| half.iter().map(|s| f(s)).max().unwrap_or(0);
                let measures: [(&str, Measure); 5] = [
                    ("RSS KiB", |s| s.rss_kib),
                    ("fds", |s| s.fds),
                    ("threads", |s| s.threads),
                    ("staging files", |s| s.staging_files),
                    ("taps", |s| s.taps),
                ];
                for (what, f) in measures {
                    let (a, b) = (peak(early, f), peak(late, f));
                    let allowed = match what {
                        "RSS KiB" => a + a / 4 + 16 * 1024,
                        "taps" => a.max(1),
                        _ => a + 4,
                    };
                    if b > allowed {
                        grew.push(format!("{what} peaked at {a} in the earlier half, {b} in the later"));
                    }
                }
            }
            Some(Growth { host, pid, first, last, grew })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t_s: f64, rss_kib: u64, fds: u64) -> Sample {
        Sample { t_s, host: "a".into(), pid: 7, rss_kib, fds, threads: 10, taps: 1, ..Sample::default() }
    }

    #[test]
    fn growth_past_the_allowance_is_named_and_noise_is_not() {
        // A VM arrives early (RSS and fds step up), then it stays flat: no growth.
        let flat = [at(0.0, 8_000, 12), at(2.0, 50_000, 20), at(4.0, 52_000, 19), at(6.0, 58_000, 22)];
        let g = growth(&flat);
        assert_eq!(g.len(), 1);
        assert!(g[0].grew.is_empty(), "{g:?}");
        // A leak: the later half's peak far above the earlier half's.
        let leaking = [at(0.0, 50_000, 20), at(2.0, 60_000, 30), at(4.0, 150_000, 60), at(6.0, 200_000, 90)];
        let g = growth(&leaking);
        assert_eq!(g[0].grew.len(), 2, "{g:?}");
        assert!(g[0].grew[0].starts_with("RSS"), "{g:?}");
        // Too short-lived to tell.
        assert!(growth(&leaking[..3])[0].grew.is_empty());
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(0.0, "a", std::process::id(), "no-such-namespace").expect("our own /proc");
        assert!(s.rss_kib > 0 && s.fds > 0 && s.threads > 0, "{s:?}");
        assert_eq!(s.taps, 0);
    }
}
