//! `CLOCK_BOOTTIME`: the clock of the PostCopyFT lease at the destination.
//!
//! `Instant` reads `CLOCK_MONOTONIC`, which stands still while the host is
//! suspended: a destination host suspended past its lease would wake up
//! believing it still held it, and run its copy beside the source's restored
//! one. `CLOCK_BOOTTIME` goes on through a suspend, so a lease kept on it has
//! expired when the host wakes (docs/architecture.md, "Fencing: the lease
//! argument"). Both agents on one host read the same clock, which is what the
//! "one copy at a time" check compares intervals on.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on `CLOCK_BOOTTIME` (time since boot, suspends included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootTime(Duration);

impl BootTime {
    pub fn now() -> BootTime {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime(2) writes only the timespec we pass; CLOCK_BOOTTIME exists since Linux 2.6.39.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        BootTime(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// The point `since_boot` after boot (for models and tests).
    pub const fn from_since_boot(since_boot: Duration) -> BootTime {
        BootTime(since_boot)
    }

    pub const fn since_boot(self) -> Duration {
        self.0
    }

    /// Microseconds since boot (what the fence's state word stores).
    pub fn as_micros(self) -> u64 {
        self.0.as_micros() as u64
    }

    pub fn saturating_duration_since(self, earlier: BootTime) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    pub fn elapsed(self) -> Duration {
        BootTime::now().saturating_duration_since(self)
    }
}

impl Add<Duration> for BootTime {
    type Output = BootTime;
    fn add(self, d: Duration) -> BootTime {
        BootTime(self.0 + d)
    }
}

impl Sub<Duration> for BootTime {
    type Output = BootTime;
    fn sub(self, d: Duration) -> BootTime {
        BootTime(self.0.saturating_sub(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_advances_with_monotonic_time() {
        let (b0, m0) = (BootTime::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (db, dm) = (b0.elapsed(), m0.elapsed());
        assert!(db >= Duration::from_millis(20), "{db:?}");
        // No suspend in between: the two clocks agree to well within a millisecond.
        assert!(db.abs_diff(dm) < Duration::from_millis(1), "{db:?} vs {dm:?}");
    }
}
