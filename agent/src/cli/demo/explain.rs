//! The demo report's explanations, in the operator's words: why the
//! checkpoint that was restored is the one the failure point did not name,
//! what the duplicates the outside world saw are, and what the partition was.

use super::fail_at::FailAt;
use pcft_agent::fault::crash::CrashPoint;

/// Why the failover restored checkpoint `restored` when the destination
/// failed at `fail_at` (None: nothing to add to the report's failover line,
/// as when the point was a time, or the checkpoint it named was restored).
pub fn restored_why(fail_at: &FailAt, restored: u64) -> Option<String> {
    let restored_text = match restored {
        0 => "no checkpoint had committed, so the VM was restored as it was at the switchover".to_string(),
        n => format!("so the last committed one, checkpoint {n}, was restored"),
    };
    let FailAt::Point(point) = fail_at else {
        return None;
    };
    let hit = match *point {
        CrashPoint::Committed(n) if restored < n => format!(
            "the destination failed once checkpoint {n}'s pages were out and before its commit record left: \
             checkpoint {n} was in flight, not committed, when the failure hit"
        ),
        CrashPoint::Speculative(n) | CrashPoint::Pause(n) if restored < n => format!(
            "the destination failed while it was taking checkpoint {n}: that checkpoint was not committed when the \
             failure hit"
        ),
        CrashPoint::BeforeFirstCheckpoint => "the destination failed before its first checkpoint".to_string(),
        _ => return None,
    };
    Some(format!("why this checkpoint: {hit}; {restored_text}"))
}

/// The outside world's duplicates (`in_window` of them the failover's
/// window: see `OutputAudit::duplicates_in_window`), and what they are.
pub fn duplicates_note(duplicates: usize, in_window: usize, recovered: bool) -> String {
    let outside = match duplicates - in_window.min(duplicates) {
        0 => String::new(),
        n => format!(" ({n} of them NOT records the destination released last)"),
    };
    match (duplicates, recovered) {
        (0, _) => "no duplicates".into(),
        (n, true) => format!(
            "{n} duplicates{outside}: guest output is at-least-once across a failover; the destination's \
             heartbeats say how far it has released, and the VM restored at the source released again only \
             records the destination released after its last heartbeat that got through, so the outside saw \
             those twice (each carries its vCPU and step for the receiver to drop a repeat), and none were lost"
        ),
        (n, false) => format!("{n} duplicates{outside}"),
    }
}

/// What the partition did, in the operator's words.
pub fn partition_line(fail_at: &FailAt, recovered: bool) -> String {
    let when = match fail_at {
        FailAt::After(after) => format!("{} ms after the switchover", after.as_millis()),
        other => format!("at {}", other.name()),
    };
    let after = match recovered {
        true => "; it was healed after the failover, so the destination could reach the source again",
        false => "",
    };
    format!(
        "the network between the two hosts was cut {when} (a partition: each side stopped hearing the other){after}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_checkpoint_in_flight_at_the_failure_explains_the_older_one_restored() {
        // `--fail-at epoch:2`, and checkpoint 2's commit record was lost with the destination.
        let why = restored_why(&FailAt::Point(CrashPoint::Committed(2)), 1).expect("an explanation");
        assert!(why.contains("checkpoint 2 was in flight, not committed, when the failure hit"), "{why}");
        assert!(why.contains("the last committed one, checkpoint 1, was restored"), "{why}");
        // When epoch 2 did commit, it was restored: nothing to explain.
        assert_eq!(restored_why(&FailAt::Point(CrashPoint::Committed(2)), 2), None);
        let why = restored_why(&FailAt::Point(CrashPoint::Committed(1)), 0).expect("an explanation");
        assert!(why.ends_with("no checkpoint had committed, so the VM was restored as it was at the switchover"));
        let why = restored_why(&FailAt::Point(CrashPoint::Pause(3)), 2).expect("an explanation");
        assert!(why.contains("while it was taking checkpoint 3"), "{why}");
        assert!(restored_why(&FailAt::Point(CrashPoint::BeforeFirstCheckpoint), 0).is_some());
        assert_eq!(restored_why(&FailAt::After(Duration::from_millis(400)), 3), None);
    }

    #[test]
    fn duplicates_say_that_output_is_at_least_once() {
        let note = duplicates_note(4, 4, true);
        assert!(note.starts_with("4 duplicates: guest output is at-least-once across a failover"), "{note}");
        assert!(note.contains("none were lost"), "{note}");
        assert_eq!(duplicates_note(0, 0, true), "no duplicates");
        let note = duplicates_note(4, 3, true);
        assert!(note.starts_with("4 duplicates (1 of them NOT records the destination released last)"), "{note}");
    }

    #[test]
    fn a_partition_is_told_in_the_operators_words() {
        let line = partition_line(&FailAt::After(Duration::from_millis(400)), true);
        assert!(line.starts_with("the network between the two hosts was cut 400 ms after the switchover"), "{line}");
        assert!(line.contains("healed after the failover"), "{line}");
    }
}
