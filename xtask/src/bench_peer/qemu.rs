//! QEMU's post-copy, measured the way pcft's is: a source and a destination
//! QEMU on loopback, the guest xtask/peer-guest/peer.S (the VM's own
//! firmware: it writes all of its memory, then pages at random), post-copy
//! over QMP, `query-migrate` read at the end. docs/host.md says what works
//! under this machine's KVM.

use super::cpu::{CpuUse, CpuWatch};
use super::qmp::{MigrateStatus, Qmp};
use super::{Measured, SAMPLE_EVERY};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::{BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
/// The longest the guest may take to write all of its memory (about 4 s for 1 GiB here, more under load).
const FILL_TIMEOUT: Duration = Duration::from_secs(180);
/// The longest a migration may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// How often `query-migrate` is asked while a migration runs.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// QEMU limits pre-copy to 128 MiB/s by default (`max-bandwidth`; post-copy
/// is unlimited): raised so that pre-copy is not throttled either.
const MAX_BANDWIDTH: u64 = 100 << 30;
/// QEMU completes a migration in pre-copy once what is left fits in its
/// `downtime-limit` (default 300 ms): at 256 MiB and this loopback's speed
/// that happened within the short pre-copy in 4 runs of 5, a 300 ms stop and
/// no post-copy. Held to 2 ms (pcft's downtime goal), pre-copy cannot finish
/// by itself and post-copy always starts.
pub const DOWNTIME_LIMIT_MS: u64 = 2;

type Session = Qmp<BufReader<UnixStream>, UnixStream>;

/// QEMU and the guest image, ready to run.
pub struct Setup {
    qemu: PathBuf,
    guest: PathBuf,
    work: PathBuf,
}

impl Setup {
    /// Finds QEMU and assembles the guest into `work`.
    pub fn prepare(root: &Path, work: &Path) -> Result<Setup> {
        let qemu = find_on_path(QEMU).with_context(|| {
            format!("{QEMU} not found: run cargo xtask setup (it installs Debian's qemu-system-x86)")
        })?;
        let guest = build_guest(&root.join("xtask/peer-guest/peer.S"), work)?;
        Ok(Setup { qemu, guest, work: work.to_path_buf() })
    }

    /// One post-copy migration of a `mem_mib` guest that has written all of its
    /// memory: post-copy starts right after `migrate`, or after `precopy` of pre-copy.
    pub fn migrate_once(&self, mem_mib: u64, precopy: Option<Duration>, ticks: f64) -> Result<Measured> {
        let mut src = Qemu::spawn(self, "peer-src", mem_mib, &["-serial", "stdio"])?;
        let mut dst = Qemu::spawn(self, "peer-dst", mem_mib, &["-serial", "null", "-incoming", "defer"])?;
        src.wait_for_fill()?;
        let (mut src_qmp, mut dst_qmp) = (src.qmp()?, dst.qmp()?);
        let postcopy = json!({ "capabilities": [{ "capability": "postcopy-ram", "state": true }] });
        for qmp in [&mut src_qmp, &mut dst_qmp] {
            qmp.execute("migrate-set-capabilities", postcopy.clone())?;
        }
        let parameters = json!({ "max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS });
        src_qmp.execute("migrate-set-parameters", parameters)?;
        let uri = format!("tcp:127.0.0.1:{}", free_port()?);
        dst_qmp.execute("migrate-incoming", json!({ "uri": uri }))?;
        let mut watch = CpuWatch::start(&[src.pid(), dst.pid()], ticks)?;
        let started = Instant::now();
        src_qmp.execute("migrate", json!({ "uri": uri }))?;
        start_postcopy(&mut src_qmp, precopy, &mut watch)?;
        let status = wait_until_completed(&mut src_qmp, "source", &mut watch)?;
        wait_until_completed(&mut dst_qmp, "destination", &mut watch)?;
        let wall_ms = started.elapsed().as_secs_f64() * 1e3;
        let cpu = watch.finish()?;
        let running = dst_qmp.execute("query-status", json!({}))?;
        if running["running"] != true {
            bail!("the migration completed but the guest does not run at the destination: {running}");
        }
        measured(&status, [cpu[0], cpu[1]], wall_ms)
    }
}

/// The benchmark's figures from the source's last `query-migrate`.
fn measured(status: &MigrateStatus, cpu: [CpuUse; 2], wall_ms: f64) -> Result<Measured> {
    let total_ms = status.total_ms.context("query-migrate reports no total-time")?;
    Ok(Measured {
        total_ms,
        downtime_ms: status.downtime_ms,
        bytes: status.bytes,
        src: cpu[0],
        dst: cpu[1],
        demand_pages: Some(status.postcopy_requests),
        detail: json!({
            "setup_ms": status.setup_ms, "precopy_bytes": status.precopy_bytes,
            "postcopy_bytes": status.postcopy_bytes,
            "normal_pages": status.normal_pages, "zero_pages": status.zero_pages,
            "postcopy_requests": status.postcopy_requests,
            // Wall clock from `migrate` to "completed" at the destination, as polled.
            "wall_ms": wall_ms,
        }),
    })
}

/// `migrate-start-postcopy`, at once or after `precopy`. A pre-copy that
/// completed the migration by itself leaves no post-copy (and QEMU may or may
/// not refuse the command then): the report tells by `postcopy_bytes`.
fn start_postcopy(qmp: &mut Session, precopy: Option<Duration>, watch: &mut CpuWatch) -> Result<()> {
    if let Some(precopy) = precopy {
        let until = Instant::now() + precopy;
        while Instant::now() < until {
            watch.sample();
            std::thread::sleep(SAMPLE_EVERY.min(until.saturating_duration_since(Instant::now())));
        }
    }
    match qmp.execute("migrate-start-postcopy", json!({})) {
        Ok(_) => Ok(()),
        Err(e) => {
            let status = MigrateStatus::parse(&qmp.execute("query-migrate", json!({}))?)?;
            if status.completed() {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}

/// Polls `query-migrate` until the migration completed there; its last answer.
fn wait_until_completed(qmp: &mut Session, side: &str, watch: &mut CpuWatch) -> Result<MigrateStatus> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let status = MigrateStatus::parse(&qmp.execute("query-migrate", json!({}))?)?;
        if status.completed() {
            return Ok(status);
        }
        if status.failed() {
            bail!(
                "QEMU's migration {} at the {side}: {}",
                status.status,
                status.error.as_deref().unwrap_or("no reason given")
            );
        }
        if Instant::now() >= deadline {
            bail!("QEMU's migration did not complete at the {side} within {} s", MIGRATION_TIMEOUT.as_secs());
        }
        watch.sample();
        std::thread::sleep(POLL_EVERY);
    }
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).map(|dir| dir.join(tool)).find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Assembles `source` into a 64 KiB firmware image in `out` (binutils: `as`, `ld`, `objcopy`).
pub fn build_guest(source: &Path, out: &Path) -> Result<PathBuf> {
    let (obj, elf, bin) = (out.join("peer.o"), out.join("peer.elf"), out.join("peer.bin"));
    let run = |tool: &str, cmd: &mut Command| -> Result<()> {
        let out =
            cmd.output().with_context(|| format!("cannot run {tool}: run cargo xtask setup (it installs binutils)"))?;
        if !out.status.success() {
            bail!("{tool} failed on {}: {}", source.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    run("as", Command::new("as").arg("--32").arg("-o").arg(&obj).arg(source))?;
    // Linked at 0: symbols are offsets in the image, which QEMU maps at 0xf0000 (and below 4 GiB).
    run("ld", Command::new("ld").args(["-m", "elf_i386", "-Ttext=0", "-e", "0", "-o"]).arg(&elf).arg(&obj))?;
    run("objcopy", Command::new("objcopy").args(["-O", "binary", "-j", ".text"]).arg(&elf).arg(&bin))?;
    let image = std::fs::read(&bin)?;
    // QEMU takes a firmware image of a multiple of 64 KiB; the reset vector,
    // 16 bytes below its top, must be the far jump to the entry.
    if image.len() != 64 << 10 || image[0xfff0] != 0xea {
        bail!("{} is not a 64 KiB firmware image with a far jump at its reset vector", bin.display());
    }
    Ok(bin)
}

/// A QEMU process, killed when dropped.
struct Qemu {
    child: Child,
    name: &'static str,
    qmp_path: PathBuf,
    log: PathBuf,
}

impl Qemu {
    fn spawn(setup: &Setup, name: &'static str, mem_mib: u64, extra: &[&str]) -> Result<Qemu> {
        let qmp_path = setup.work.join(format!("{name}.qmp"));
        let log = setup.work.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&qmp_path);
        let mut cmd = Command::new(&setup.qemu);
        cmd.args(["-accel", "kvm", "-nodefaults", "-nographic", "-m", &format!("{mem_mib}M")])
            .arg("-bios")
            .arg(&setup.guest)
            .args(["-name", &format!("{name},debug-threads=on")])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let child = cmd.spawn().with_context(|| format!("cannot start {}", setup.qemu.display()))?;
        Ok(Qemu { child, name, qmp_path, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What QEMU said on stderr (its log), for an error message.
    fn said(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("doesn't support requested feature")).collect();
        match lines.len() {
            0 => String::from("(nothing on stderr)"),
            n => lines[n.saturating_sub(5)..].join(" / "),
        }
    }

    fn qmp(&mut self) -> Result<Session> {
        Qmp::connect(&self.qmp_path, Duration::from_secs(10)).map_err(|e| e.context(self.describe()))
    }

    /// Its name, whether it still runs, and what it said on stderr.
    fn describe(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited with {status}"),
            _ => "running".into(),
        };
        format!("QEMU {} ({status}): {}", self.name, self.said())
    }

    /// Waits for the guest's 'F' on the serial port: all of its memory is written.
    fn wait_for_fill(&mut self) -> Result<()> {
        let stdout = self.child.stdout.take().context("QEMU's serial port is not piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Stops at 'F' or when QEMU exits.
            let filled = BufReader::new(stdout).bytes().map_while(Result::ok).any(|b| b == b'F');
            let _ = tx.send(filled);
        });
        match rx.recv_timeout(FILL_TIMEOUT) {
            Ok(true) => Ok(()),
            Ok(false) => {
                bail!("the guest did not write its memory: {}", self.describe())
            }
            Err(_) => bail!("QEMU {}'s guest did not write its memory within {} s", self.name, FILL_TIMEOUT.as_secs()),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_assembles_into_a_firmware_image() {
        let out = std::env::temp_dir().join(format!("pcft-peer-guest-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("peer-guest/peer.S");
        let bin = build_guest(&source, &out).unwrap();
        let image = std::fs::read(bin).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
        // ljmp $0xf000, $entry16 (offset 0): real mode's far jump from the reset vector.
        assert_eq!(&image[0xfff0..0xfff5], &[0xea, 0x00, 0x00, 0x00, 0xf0]);
        // The entry: cli, then the A20 gate (in al, 0x92).
        assert_eq!(&image[..3], &[0xfa, 0xe4, 0x92]);
    }

    #[test]
    fn the_figures_come_from_the_source_s_query_migrate() {
        let status = MigrateStatus::parse(&json!({
            "status": "completed", "total-time": 1024, "downtime": 3, "setup-time": 20,
            "ram": {"transferred": 1_075_467_279u64, "postcopy-requests": 234, "precopy-bytes": 0},
        }))
        .unwrap();
        let cpu = CpuUse { total_s: 1.5, vcpu_s: 0.25 };
        let m = measured(&status, [cpu, CpuUse::default()], 1100.0).unwrap();
        assert_eq!((m.total_ms, m.downtime_ms, m.bytes, m.demand_pages), (1024.0, Some(3.0), 1_075_467_279, Some(234)));
        assert_eq!(m.src.migration_s(), 1.25);
        assert_eq!(m.detail["wall_ms"], 1100.0);
        let running = MigrateStatus::parse(&json!({"status": "active"})).unwrap();
        assert!(measured(&running, [cpu, cpu], 1.0).is_err());
    }
}
