//! A slow source host for `pcft demo --fail-kind slow-source`: the source
//! agent's process (every thread) is moved into a cgroup of its own whose CPU
//! quota is a small share of one CPU, then moved back and the cgroup removed.
//!
//! cgroup v2 where its root lists the `cpu` controller
//! (/sys/fs/cgroup/cgroup.controllers; `cpu.max` "QUOTA PERIOD"), else the
//! cgroup v1 `cpu` hierarchy at /sys/fs/cgroup/cpu (`cpu.cfs_quota_us` and
//! `cpu.cfs_period_us`). The period is 100 ms: at 5 % the process runs for at
//! most 5 ms of each 100 ms, so it can go unscheduled for 95 ms at a time.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

const V2_ROOT: &str = "/sys/fs/cgroup";
const V1_CPU: &str = "/sys/fs/cgroup/cpu";
const PERIOD_US: u64 = 100_000;

/// A process held to a CPU quota; released (moved back, cgroup removed) by
/// `release` or when dropped.
pub struct CpuThrottle {
    pid: u32,
    /// The cgroup made for it.
    dir: PathBuf,
    /// The cgroup it was in, to return to.
    home: PathBuf,
    description: String,
    released: bool,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {text:?} to {}", path.display()))
}

/// The process's cgroup path (relative to the hierarchy's root) in the
/// hierarchy that `/proc/PID/cgroup` names by `matches` (its controller list).
fn cgroup_of(pid: u32, matches: impl Fn(&str) -> bool) -> Result<String> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            matches(controllers).then(|| path.trim_start_matches('/').to_string())
        })
        .next()
        .ok_or_else(|| anyhow!("{file} names no cgroup with the cpu controller"))
}

fn v2_has_cpu() -> bool {
    std::fs::read_to_string(Path::new(V2_ROOT).join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
}

impl CpuThrottle {
    /// Holds process `pid` (all its threads, and any it starts) to `percent` % of one CPU.
    pub fn apply(pid: u32, percent: u32) -> Result<CpuThrottle> {
        if !(1..=100).contains(&percent) {
            bail!("a CPU share of {percent}%: expected 1 to 100");
        }
        let quota = PERIOD_US * u64::from(percent) / 100;
        let name = format!("pcft-src-{pid}");
        let (dir, home, description) = if v2_has_cpu() {
            // Under the root: a cgroup with processes of its own cannot enable
            // controllers for children (cgroup v2's no-internal-process rule).
            let root = Path::new(V2_ROOT);
            let home = root.join(cgroup_of(pid, |c| c.is_empty())?);
            write(&root.join("cgroup.subtree_control"), "+cpu")?;
            let dir = root.join(&name);
            std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            (dir, home, format!("cgroup v2 cpu.max {quota} {PERIOD_US} ({percent}% of a CPU)"))
        } else if Path::new(V1_CPU).join("cpu.cfs_quota_us").exists() {
            let home = Path::new(V1_CPU).join(cgroup_of(pid, |c| c.split(',').any(|c| c == "cpu"))?);
            let dir = home.join(&name);
            std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            (dir, home, format!("cgroup v1 cfs_quota_us {quota}/{PERIOD_US} ({percent}% of a CPU)"))
        } else {
            bail!("no cgroup cpu controller: neither {V2_ROOT}/cgroup.controllers lists cpu nor is {V1_CPU} mounted");
        };
        // From here on, dropping it removes the cgroup again.
        let throttle = CpuThrottle { pid, dir, home, description, released: false };
        if throttle.description.starts_with("cgroup v2") {
            write(&throttle.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
        } else {
            write(&throttle.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&throttle.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        // cgroup.procs moves the whole process: every thread.
        write(&throttle.dir.join("cgroup.procs"), &pid.to_string())?;
        Ok(throttle)
    }

    /// What was applied, e.g. "cgroup v1 cfs_quota_us 5000/100000 (5% of a CPU)".
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Moves the process back to its cgroup and removes the throttle's.
    pub fn release(mut self) -> Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.released, true) {
            return Ok(());
        }
        // ESRCH: the process is gone (its cgroup empties by itself).
        if let Err(e) = write(&self.home.join("cgroup.procs"), &self.pid.to_string()) {
            let gone = e.root_cause().downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error)
                == Some(libc::ESRCH);
            if !gone {
                return Err(e);
            }
        }
        // An exiting process may hold the cgroup for a moment.
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(anyhow!(e).context(format!("cannot remove {}", self.dir.display()))),
            }
        }
    }
}

impl Drop for CpuThrottle {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            eprintln!("pcft demo: cannot remove the CPU throttle: {e:#}");
        }
    }
}
