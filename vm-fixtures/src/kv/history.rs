//! The check of a kv client's history, in the manner of Jepsen: what the
//! clients invoked and saw, replayed against a model of each key, and the
//! store's final state read at the end.
//!
//! Each key has one writer (a client connection writes only its own keys, one
//! request at a time), so each key's operations are totally ordered by when
//! they were invoked. A key is either a register (`SET` with a value unique to
//! the key, read with `GET`) or a counter (`INCR`, read with `GET`).
//!
//! An operation whose answer never came (the connection broke or timed out)
//! is *indeterminate*: it may or may not have taken effect. The model assumes
//! that if it did, it did before the next operation on its key was answered —
//! the client aborts such a connection with a TCP reset before it reconnects,
//! so an abandoned request cannot arrive later (see `resp::Client::abort`).
//! An error reply is definite: the write did not happen.
//!
//! What the check finds:
//! - **lost acknowledged writes**: a write the client saw acknowledged whose
//!   effect later vanished: a register's final value older than its last
//!   acknowledged write; a counter that went below an increment already
//!   acknowledged (seen by a later `INCR` or by the final read);
//! - **stale reads**: a `GET` that returned a value older than one the client
//!   had already seen acknowledged (or read) for that key;
//! - **unexplained reads**: a value that no write (acknowledged or in doubt)
//!   before the read could have produced.

use std::collections::BTreeMap;
use std::time::Duration;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `SET key value` (the value unique to the key).
    Set(String),
    /// `INCR key`.
    Incr,
    /// `GET key`.
    Get,
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `+OK` to a `SET`.
    Written,
    /// The counter's new value, from `INCR`.
    Counter(i64),
    /// The value `GET` returned (None: no such key).
    Read(Option<String>),
    /// An error reply (the operation did not happen), or a reply of the wrong type.
    Refused(String),
    /// No answer (the connection broke or timed out): it may or may not have happened.
    Indeterminate(String),
}

/// One operation in a client's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The client connection that made it (its keys are its own).
    pub client: u32,
    pub key: String,
    pub request: Request,
    pub answer: Answer,
    /// When it was sent and when its answer came (or the client gave up), from the run's start.
    pub invoked: Duration,
    pub completed: Duration,
}

/// What the check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Operations in the history.
    pub ops: usize,
    /// Writes (`SET`, `INCR`) the client saw acknowledged.
    pub acked_writes: usize,
    pub acked_writes_lost: u64,
    pub stale_reads: u64,
    pub unexplained_reads: u64,
    /// Operations that got an error reply or no answer.
    pub errors: usize,
    /// The first few anomalies, in words.
    pub examples: Vec<String>,
}

impl Findings {
    /// Whether the history is consistent: nothing lost, nothing stale, nothing unexplained.
    pub fn consistent(&self) -> bool {
        self.acked_writes_lost == 0 && self.stale_reads == 0 && self.unexplained_reads == 0
    }

    fn note(&mut self, what: String) {
        if self.examples.len() < 5 {
            self.examples.push(what);
        }
    }

    /// A read that broke the model (`what`), described by `read`.
    fn bad_read(&mut self, what: Anomaly, read: String) {
        match what {
            Anomaly::Older => self.stale_reads += 1,
            Anomaly::Unexplained => self.unexplained_reads += 1,
        }
        self.note(format!("{} {read}", what.name()));
    }
}

/// The longest time in which no operation got an answer (an error reply
/// counts; giving up does not), from the first answer until `end` (when the
/// clients stopped): the clients' downtime.
pub fn longest_gap(history: &[Op], end: Duration) -> Duration {
    let mut answered: Vec<Duration> =
        history.iter().filter(|op| !matches!(op.answer, Answer::Indeterminate(_))).map(|op| op.completed).collect();
    answered.sort_unstable();
    let Some(&last) = answered.last() else { return Duration::ZERO };
    let tail = end.saturating_sub(last);
    answered.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default().max(tail)
}

/// Checks `history` against the store's `final_values` (each key of the
/// history read at the end; a key missing from the map was not read).
pub fn check(history: &[Op], final_values: &BTreeMap<String, Option<String>>) -> Findings {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut findings = Findings { ops: history.len(), ..Findings::default() };
    for op in history {
        match op.answer {
            Answer::Written | Answer::Counter(_) => findings.acked_writes += 1,
            Answer::Refused(_) | Answer::Indeterminate(_) => findings.errors += 1,
            Answer::Read(_) => {}
        }
    }
    for (key, mut ops) in by_key {
        ops.sort_by_key(|op| op.invoked);
        let last = final_values.get(key);
        if ops.iter().any(|op| op.request == Request::Incr) {
            Counter::default().replay(key, &ops, last, &mut findings);
        } else {
            Register::default().replay(key, &ops, last, &mut findings);
        }
    }
    findings
}

/// A register's model: the writes so far, the last one known to have
/// happened, and those in doubt after it.
#[derive(Default)]
struct Register<'a> {
    /// Every `SET` value, in order, and whether it was acknowledged.
    writes: Vec<(&'a str, bool)>,
    /// The index of the last write known to have happened (acknowledged or read).
    known: Option<usize>,
    /// Writes in doubt after `known` (indeterminate), by index.
    in_doubt: Vec<usize>,
}

impl<'a> Register<'a> {
    fn replay(mut self, key: &str, ops: &[&'a Op], last: Option<&Option<String>>, findings: &mut Findings) {
        for op in ops {
            match (&op.request, &op.answer) {
                (Request::Set(value), Answer::Written) => {
                    self.writes.push((value, true));
                    self.known = Some(self.writes.len() - 1);
                    self.in_doubt.clear();
                }
                (Request::Set(value), Answer::Indeterminate(_)) => {
                    self.writes.push((value, false));
                    self.in_doubt.push(self.writes.len() - 1);
                }
                // A refused write did not happen: a read of its value is unexplained.
                (Request::Set(value), _) => self.writes.push((value, false)),
                (Request::Get, Answer::Read(read)) => {
                    if let Err(what) = self.read(read.as_deref()) {
                        let expected = self.expected();
                        findings.bad_read(what, format!("read of {key} at {:?}: {read:?}, {expected}", op.invoked));
                    }
                }
                _ => {}
            }
        }
        let Some(last) = last else { return };
        if let Err(what) = self.read(last.as_deref()) {
            let lost = match (what, self.known) {
                (Anomaly::Older, Some(known)) => {
                    let found = last.as_deref().and_then(|v| self.position(v)).map_or(0, |i| i + 1);
                    self.writes[found..=known].iter().filter(|(_, acked)| *acked).count() as u64
                }
                _ => 0,
            };
            findings.acked_writes_lost += lost;
            match what {
                Anomaly::Unexplained => findings.unexplained_reads += 1,
                // Older than a write only a read had confirmed: stale, nothing acknowledged lost.
                Anomaly::Older if lost == 0 => findings.stale_reads += 1,
                Anomaly::Older => {}
            }
            findings.note(format!("{key} ends as {last:?}, {}: {lost} acknowledged write(s) lost", self.expected()));
        }
    }

    fn position(&self, value: &str) -> Option<usize> {
        self.writes.iter().position(|(v, _)| *v == value)
    }

    /// What a read may return now, in words.
    fn expected(&self) -> String {
        let known = self.known.map_or("nothing".to_string(), |i| format!("{:?}", self.writes[i].0));
        match self.in_doubt.len() {
            0 => format!("expected {known}"),
            n => format!("expected {known} or one of {n} write(s) in doubt after it"),
        }
    }

    /// A read of `value`: consistent (and what it tells), older than known, or unexplained.
    fn read(&mut self, value: Option<&str>) -> Result<(), Anomaly> {
        let Some(value) = value else {
            return if self.known.is_none() { Ok(()) } else { Err(Anomaly::Older) };
        };
        let Some(index) = self.position(value) else { return Err(Anomaly::Unexplained) };
        if Some(index) == self.known {
            Ok(())
        } else if self.in_doubt.contains(&index) {
            // That write happened; the ones in doubt before it are now behind it.
            self.known = Some(index);
            self.in_doubt.retain(|&i| i > index);
            Ok(())
        } else if self.known.is_some_and(|known| index < known) {
            Err(Anomaly::Older)
        } else {
            Err(Anomaly::Unexplained)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Anomaly {
    /// Older than what the client already knew had happened.
    Older,
    /// No write before it could have produced it.
    Unexplained,
}

impl Anomaly {
    fn name(self) -> &'static str {
        match self {
            Anomaly::Older => "stale",
            Anomaly::Unexplained => "unexplained",
        }
    }
}

/// A counter's model: the value known to have been reached, and the
/// increments in doubt after it.
#[derive(Default)]
struct Counter {
    known: i64,
    in_doubt: i64,
}

impl Counter {
    fn replay(mut self, key: &str, ops: &[&Op], last: Option<&Option<String>>, findings: &mut Findings) {
        for op in ops {
            match (&op.request, &op.answer) {
                (Request::Incr, Answer::Counter(n)) => {
                    let n = *n;
                    if n <= self.known {
                        // The increments up to `known` that this one does not build on vanished.
                        findings.acked_writes_lost += (self.known - n + 1) as u64;
                        findings.note(format!(
                            "INCR {key} at {:?} answered {n}, but {} had been reached: acknowledged increments lost",
                            op.invoked, self.known
                        ));
                    } else if n > self.known + 1 + self.in_doubt {
                        findings.unexplained_reads += 1;
                        findings.note(format!(
                            "INCR {key} at {:?} answered {n}, more than {} + 1 + {} in doubt",
                            op.invoked, self.known, self.in_doubt
                        ));
                    }
                    self.known = n;
                    self.in_doubt = 0;
                }
                (Request::Incr, Answer::Indeterminate(_)) => self.in_doubt += 1,
                (Request::Get, Answer::Read(read)) => {
                    if let Err(what) = self.read(read.as_deref()) {
                        let (low, high) = (self.known, self.known + self.in_doubt);
                        let what_read =
                            format!("read of {key} at {:?}: {read:?}, expected {low} to {high}", op.invoked);
                        findings.bad_read(what, what_read);
                    }
                }
                _ => {}
            }
        }
        let Some(last) = last else { return };
        let value = parse_counter(last.as_deref());
        if let Err(what) = self.read(last.as_deref()) {
            let lost = match (what, value) {
                (Anomaly::Older, Some(v)) => (self.known - v) as u64,
                _ => 0,
            };
            findings.acked_writes_lost += lost;
            if what == Anomaly::Unexplained {
                findings.unexplained_reads += 1;
            }
            findings.note(format!(
                "{key} ends as {last:?}, expected {} to {}: {lost} acknowledged increment(s) lost",
                self.known,
                self.known + self.in_doubt
            ));
        }
    }

    fn read(&mut self, value: Option<&str>) -> Result<(), Anomaly> {
        let Some(v) = parse_counter(value) else { return Err(Anomaly::Unexplained) };
        if v < self.known {
            Err(Anomaly::Older)
        } else if v > self.known + self.in_doubt {
            Err(Anomaly::Unexplained)
        } else {
            // The increments in doubt up to `v` happened.
            self.in_doubt -= v - self.known;
            self.known = v;
            Ok(())
        }
    }
}

/// A counter's value as `GET` returns it (no key: 0); None if it is not a number.
fn parse_counter(value: Option<&str>) -> Option<i64> {
    value.map_or(Some(0), |v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, at: u64, request: Request, answer: Answer) -> Op {
        let t = Duration::from_millis(at);
        Op { client: 0, key: key.into(), request, answer, invoked: t, completed: t + Duration::from_millis(1) }
    }

    fn set(key: &str, at: u64, value: &str, answer: Answer) -> Op {
        op(key, at, Request::Set(value.into()), answer)
    }

    fn get(key: &str, at: u64, value: Option<&str>) -> Op {
        op(key, at, Request::Get, Answer::Read(value.map(str::to_string)))
    }

    fn incr(key: &str, at: u64, answer: Answer) -> Op {
        op(key, at, Request::Incr, answer)
    }

    fn finals(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.map(str::to_string))).collect()
    }

    fn lost() -> Answer {
        Answer::Indeterminate("timed out".into())
    }

    #[test]
    fn a_clean_history_is_consistent() {
        let history = [
            set("r", 1, "a", Answer::Written),
            get("r", 2, Some("a")),
            set("r", 3, "b", Answer::Written),
            incr("n", 4, Answer::Counter(1)),
            incr("n", 5, Answer::Counter(2)),
            get("n", 6, Some("2")),
        ];
        let findings = check(&history, &finals(&[("r", Some("b")), ("n", Some("2"))]));
        assert!(findings.consistent(), "{findings:?}");
        assert_eq!((findings.ops, findings.acked_writes, findings.errors), (6, 4, 0));
    }

    #[test]
    fn a_register_that_ends_before_its_last_acknowledged_write_lost_it() {
        let history =
            [set("r", 1, "a", Answer::Written), set("r", 2, "b", Answer::Written), set("r", 3, "c", Answer::Written)];
        let findings = check(&history, &finals(&[("r", Some("a"))]));
        assert_eq!(findings.acked_writes_lost, 2, "{findings:?}");
        // Gone altogether: all three.
        assert_eq!(check(&history, &finals(&[("r", None)])).acked_writes_lost, 3);
    }

    #[test]
    fn a_write_in_doubt_may_or_may_not_have_happened() {
        let history = [set("r", 1, "a", Answer::Written), set("r", 2, "b", lost())];
        for end in [Some("a"), Some("b")] {
            let findings = check(&history, &finals(&[("r", end)]));
            assert!(findings.consistent(), "{end:?}: {findings:?}");
            assert_eq!(findings.errors, 1);
        }
        // Once a read saw it, it happened: the older value is then stale.
        let history = [set("r", 1, "a", Answer::Written), set("r", 2, "b", lost()), get("r", 3, Some("b"))];
        let findings = check(&history, &finals(&[("r", Some("a"))]));
        assert_eq!(findings.acked_writes_lost, 0, "b was never acknowledged: {findings:?}");
        assert_eq!(findings.stale_reads, 1, "the store went back from a value a read had seen: {findings:?}");
    }

    #[test]
    fn a_read_older_than_an_acknowledged_write_is_stale_and_a_refused_value_unexplained() {
        let history = [
            set("r", 1, "a", Answer::Written),
            set("r", 2, "b", Answer::Written),
            get("r", 3, Some("a")),
            get("r", 4, None),
            set("r", 5, "c", Answer::Refused("ERR store full".into())),
            get("r", 6, Some("c")),
            get("r", 7, Some("zzz")),
        ];
        let findings = check(&history, &finals(&[("r", Some("b"))]));
        assert_eq!((findings.stale_reads, findings.unexplained_reads, findings.acked_writes_lost), (2, 2, 0));
        assert_eq!(findings.examples.len(), 4);
    }

    #[test]
    fn a_counter_that_goes_back_lost_acknowledged_increments_even_if_it_climbs_again() {
        let history = [
            incr("n", 1, Answer::Counter(1)),
            incr("n", 2, Answer::Counter(2)),
            incr("n", 3, Answer::Counter(3)),
            // A failover to a state in which n was 1: 2 and 3 vanished.
            incr("n", 4, Answer::Counter(2)),
            incr("n", 5, Answer::Counter(3)),
            incr("n", 6, Answer::Counter(4)),
        ];
        let findings = check(&history, &finals(&[("n", Some("4"))]));
        assert_eq!(findings.acked_writes_lost, 2, "{findings:?}");
        // A final value below the last acknowledged one.
        let history = [incr("n", 1, Answer::Counter(1)), incr("n", 2, Answer::Counter(2))];
        assert_eq!(check(&history, &finals(&[("n", Some("1"))])).acked_writes_lost, 1);
    }

    #[test]
    fn counter_increments_in_doubt_widen_what_may_be_read() {
        let history = [
            incr("n", 1, Answer::Counter(1)),
            incr("n", 2, lost()),
            get("n", 3, Some("2")),
            incr("n", 4, lost()),
            incr("n", 5, Answer::Counter(4)),
        ];
        let findings = check(&history, &finals(&[("n", Some("4"))]));
        assert!(findings.consistent(), "{findings:?}");
        // More than the increments could have made, and a read below what was reached.
        let history = [incr("n", 1, Answer::Counter(1)), incr("n", 2, Answer::Counter(5)), get("n", 3, Some("4"))];
        let findings = check(&history, &finals(&[("n", Some("5"))]));
        assert_eq!((findings.unexplained_reads, findings.stale_reads), (1, 1), "{findings:?}");
    }

    #[test]
    fn the_longest_gap_counts_answers_not_give_ups() {
        let mut a = set("r", 0, "a", Answer::Written);
        let mut b = set("r", 10, "b", lost());
        let mut c = set("r", 20, "c", Answer::Refused("ERR".into()));
        a.completed = Duration::from_millis(5);
        b.completed = Duration::from_millis(700);
        c.completed = Duration::from_millis(905);
        let history = [a, b, c];
        assert_eq!(longest_gap(&history, Duration::from_millis(910)), Duration::from_millis(900));
        // No answer from the last one until the clients stopped: that is the longest.
        assert_eq!(longest_gap(&history, Duration::from_millis(2000)), Duration::from_millis(1095));
        assert_eq!(longest_gap(&[], Duration::from_secs(1)), Duration::ZERO);
    }
}
