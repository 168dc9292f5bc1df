//! Where the demo makes the destination fail (`--fail-at`): a point of the
//! destination's work, a time after the switchover, or never; and the random
//! picks among them.

use pcft_agent::fault::crash::CrashPoint;
use std::time::Duration;

/// Where the demo makes the destination fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailAt {
    None,
    /// SIGKILL (or SIGSTOP, or a cut) from the demo this long after the switchover.
    After(Duration),
    /// The destination agent kills itself there (`pcft agent --crash-at`).
    Point(CrashPoint),
}

/// A `--fail-at` that names no failure the demo knows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FailAtError {
    /// `Nms` whose N is not a number.
    #[error("--fail-at {text:?}: expected a number of milliseconds such as 500ms")]
    Milliseconds { text: String },
    /// Not a point the destination agent knows (`reason` says why).
    #[error("--fail-at {text:?}: {reason}; see pcft demo --help")]
    Point { text: String, reason: String },
}

impl std::str::FromStr for FailAt {
    type Err = FailAtError;

    /// `none`, `random` (a pick from the clock), `Nms`, `epoch:N` or a crash
    /// point (`speculative` and `pause` alone mean epoch 2).
    fn from_str(text: &str) -> Result<FailAt, FailAtError> {
        if text == "none" {
            return Ok(FailAt::None);
        }
        if text == "random" {
            return Ok(Self::random());
        }
        if let Some(ms) = text.strip_suffix("ms") {
            return ms
                .parse()
                .map(|ms| FailAt::After(Duration::from_millis(ms)))
                .map_err(|_| FailAtError::Milliseconds { text: text.to_string() });
        }
        let point = match text.split_once(':') {
            Some(("epoch", n)) => format!("committed:{n}"),
            None if text == "speculative" || text == "pause" => format!("{text}:2"),
            _ => text.to_string(),
        };
        point
            .parse()
            .map(FailAt::Point)
            .map_err(|reason| FailAtError::Point { text: text.to_string(), reason: reason.to_string() })
    }
}

impl FailAt {
    /// One of the points, picked from the clock.
    pub fn random() -> FailAt {
        let seed = clock_seed();
        let epoch = u64::from(seed / 7 % 5) + 1;
        match seed % 6 {
            0 => FailAt::Point(CrashPoint::BeforeFirstCheckpoint),
            1 => FailAt::Point(CrashPoint::Speculative(epoch)),
            2 => FailAt::Point(CrashPoint::Pause(epoch)),
            3 => FailAt::Point(CrashPoint::Committed(epoch)),
            4 => FailAt::Point(CrashPoint::AfterLastPage),
            _ => FailAt::After(Duration::from_millis(u64::from(seed / 11 % 1500) + 50)),
        }
    }

    /// Right after a checkpoint epoch from 1 to 5, picked from the clock.
    pub fn random_epoch() -> FailAt {
        FailAt::Point(CrashPoint::Committed(u64::from(clock_seed() / 7 % 5) + 1))
    }

    /// One of the points while the guest runs at the destination (any but
    /// after-last-page), picked from the clock.
    pub fn random_point() -> FailAt {
        let seed = clock_seed();
        let epoch = u64::from(seed / 7 % 5) + 1;
        match seed % 4 {
            0 => FailAt::Point(CrashPoint::BeforeFirstCheckpoint),
            1 => FailAt::Point(CrashPoint::Speculative(epoch)),
            2 => FailAt::Point(CrashPoint::Pause(epoch)),
            _ => FailAt::Point(CrashPoint::Committed(epoch)),
        }
    }

    /// From `low` to `high` ms after the switchover, picked from the clock.
    pub fn random_after(low: u64, high: u64) -> FailAt {
        FailAt::After(Duration::from_millis(low + u64::from(clock_seed() / 13) % (high - low + 1)))
    }

    /// Its name in the demo's output and report (`epoch:N` for a committed point).
    pub fn name(&self) -> String {
        match self {
            FailAt::None => "none".into(),
            FailAt::After(d) => format!("{}ms", d.as_millis()),
            FailAt::Point(CrashPoint::BeforeFirstCheckpoint) => "before-first-checkpoint".into(),
            FailAt::Point(CrashPoint::Speculative(n)) => format!("speculative:{n}"),
            FailAt::Point(CrashPoint::Pause(n)) => format!("pause:{n}"),
            FailAt::Point(CrashPoint::Committed(n)) => format!("epoch:{n}"),
            FailAt::Point(CrashPoint::AfterLastPage) => "after-last-page".into(),
            FailAt::Point(CrashPoint::AfterFinish) => "after-finish".into(),
        }
    }
}

/// The sub-second nanoseconds of the wall clock: the random picks' seed.
fn clock_seed() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_parse_back_to_the_same_failure() {
        for text in
            ["none", "500ms", "before-first-checkpoint", "speculative:3", "pause:1", "epoch:4", "after-last-page"]
        {
            let at: FailAt = text.parse().expect(text);
            assert_eq!(at.name(), text);
        }
        assert_eq!("speculative".parse(), Ok(FailAt::Point(CrashPoint::Speculative(2))));
        assert_eq!("pause".parse(), Ok(FailAt::Point(CrashPoint::Pause(2))));
    }

    #[test]
    fn bad_failures_say_what_is_wrong() {
        let error = "soonms".parse::<FailAt>().unwrap_err();
        assert_eq!(error, FailAtError::Milliseconds { text: "soonms".into() });
        assert_eq!(error.to_string(), "--fail-at \"soonms\": expected a number of milliseconds such as 500ms");
        let error = "epoch:0".parse::<FailAt>().unwrap_err().to_string();
        assert!(error.starts_with("--fail-at \"epoch:0\": \"0\" is not an epoch number"), "{error}");
        assert!(error.ends_with("; see pcft demo --help"), "{error}");
    }
}
