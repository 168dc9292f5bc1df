//! Checks of the host and of operator input that run before any VM is built,
//! so that a bad request fails with one line that names the problem and the fix.

use std::path::Path;

/// The operator asked for something this host cannot do, or mistyped it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    #[error("cannot parse size {0:?}: use a whole number of bytes with an optional K, M, G or T suffix (powers of 1024), e.g. 256M")]
    BadSize(String),
    #[error("{flag} {value} is not a multiple of {unit}: round it, e.g. to {suggest}")]
    Unaligned { flag: &'static str, value: String, unit: &'static str, suggest: String },
    #[error("--mem {requested} exceeds this host's {total} of memory: choose a smaller --mem")]
    MemoryExceedsHost { requested: String, total: String },
    #[error("this host has {available} of memory available and the VM needs {requested}: free memory or choose another host")]
    MemoryNotAvailable { requested: String, available: String },
    #[error("pcft must run as root: it opens /dev/kvm (and, for migration, userfaultfd and BPF); run it with sudo")]
    NotRoot,
    #[error("{0} does not exist: this host has no KVM; enable virtualization and load the kvm module (modprobe kvm_intel or kvm_amd)")]
    NoKvm(String),
    #[error("cannot open {path}: {reason}; check its permissions and that pcft runs as root")]
    KvmUnusable { path: String, reason: String },
}

/// Parses `256M`, `1G`, `64MiB`, `4096`: bytes, with binary suffixes.
pub fn parse_size(text: &str) -> Result<u64, HostError> {
    let bad = || HostError::BadSize(text.to_string());
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// `268435456` → `256 MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Checks that `value` (given as `flag`) is a multiple of `unit` bytes.
pub fn require_multiple(flag: &'static str, value: u64, unit: u64, unit_name: &'static str) -> Result<(), HostError> {
    if value > 0 && value.is_multiple_of(unit) {
        return Ok(());
    }
    Err(HostError::Unaligned {
        flag,
        value: format_size(value),
        unit: unit_name,
        suggest: format_size(value.div_ceil(unit).max(1) * unit),
    })
}

/// This host's physical memory (u64::MAX if /proc/meminfo cannot be read).
pub fn memory_total() -> u64 {
    procfs::Current::current().map(|m: procfs::Meminfo| m.mem_total).unwrap_or(u64::MAX)
}

/// Refuses guest memory larger than the host's physical memory.
pub fn check_memory_fits(requested: u64) -> Result<(), HostError> {
    let total = memory_total();
    if requested > total {
        return Err(HostError::MemoryExceedsHost { requested: format_size(requested), total: format_size(total) });
    }
    Ok(())
}

/// Refuses guest memory larger than what the host has available now (for an
/// agent that takes a VM in: after a migration its non-zero pages are all backed).
pub fn check_memory_available(requested: u64) -> Result<(), HostError> {
    let available = procfs::Current::current().ok().and_then(|m: procfs::Meminfo| m.mem_available).unwrap_or(u64::MAX);
    if requested > available {
        return Err(HostError::MemoryNotAvailable {
            requested: format_size(requested),
            available: format_size(available),
        });
    }
    Ok(())
}

/// Checks that this process can drive KVM: root, and a usable `kvm_path`.
pub fn check_kvm(kvm_path: &Path) -> Result<(), HostError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(HostError::NotRoot);
    }
    if !kvm_path.exists() {
        return Err(HostError::NoKvm(kvm_path.display().to_string()));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_path)
        .map(drop)
        .map_err(|e| HostError::KvmUnusable { path: kvm_path.display().to_string(), reason: e.to_string() })
}

/// The default `--max-connections`: 512, or a quarter of this process's
/// open-files limit if that is less (the rest is for VMs, taps, staging
/// files and the agent itself), at least 16.
pub fn default_max_connections() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes one rlimit into `limit`, which lives across the call.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let quarter = if known { usize::try_from(limit.rlim_cur / 4).unwrap_or(usize::MAX) } else { 512 };
    quarter.clamp(16, 512)
}

/// Makes every thread allocate from glibc's one main heap (`M_ARENA_MAX` 1;
/// call it before any thread is started). With an arena per thread, as glibc
/// makes by default, an agent's RSS climbed with every migration (each
/// starts threads of its own, whose arenas keep what they freed, in
/// fragments): 10 MiB over 300 round trips of a 16 MiB VM while its heap
/// stayed under 9 MiB (heaptrack), and about 7 KiB per migration over a
/// 60-minute soak. With one arena it stays flat. The page path allocates
/// nothing per batch, so the shared heap's lock is not on it.
pub fn use_one_malloc_arena() {
    // SAFETY: mallopt(3) only sets a parameter of the allocator; M_ARENA_MAX is a valid one.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_binary_suffixes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2 gb "), Ok(2 << 30));
        for bad in ["", "M", "12Q", "-1G", "1.5G", "99999999999999999999T", "18446744073709551615T"] {
            assert_eq!(parse_size(bad), Err(HostError::BadSize(bad.into())), "{bad}");
        }
    }

    #[test]
    fn formats_and_checks_alignment() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(require_multiple("--mem", 8 << 20, 2 << 20, "2 MiB"), Ok(()));
        let err = require_multiple("--mem", (8 << 20) + 1, 2 << 20, "2 MiB").unwrap_err();
        assert!(err.to_string().contains("round it, e.g. to 10 MiB"), "{err}");
    }

    #[test]
    fn refuses_more_memory_than_the_host_has() {
        assert!(matches!(check_memory_fits(1 << 50), Err(HostError::MemoryExceedsHost { .. })));
        assert_eq!(check_memory_fits(1 << 20), Ok(()));
        assert!(matches!(check_memory_available(1 << 50), Err(HostError::MemoryNotAvailable { .. })));
        assert_eq!(check_memory_available(1 << 20), Ok(()));
    }
}
