//! Live migration between agents: the source and destination endpoints of
//! pre-copy, post-copy, hybrid and PostCopyFT (post-copy with reverse
//! incremental checkpoints and failover). The endpoints are state machines
//! ([`source`], [`destination`]); post-copy's page path is in [`postcopy`],
//! PostCopyFT in [`ft`]; [`return_path`] carries the destination's frames
//! back; [`progress`] is how far an outgoing migration has got.

pub mod destination;
pub mod error;
pub mod ft;
pub mod postcopy;
pub mod progress;
pub mod return_path;
pub mod source;

/// Reads the endpoints' state diagrams out of docs/architecture.md, so that
/// each endpoint's tests hold its phase table against its diagram.
#[cfg(test)]
pub(crate) mod diagrams {
    const ARCHITECTURE: &str = include_str!("../../../docs/architecture.md");

    /// The `A --> B` arrows (names as written; `[*]` and arrows from a phase
    /// to itself left out) of the first Mermaid block after `heading`.
    pub(crate) fn transitions(heading: &str) -> Vec<(String, String)> {
        let section = &ARCHITECTURE[ARCHITECTURE.find(heading).expect("the heading is in docs/architecture.md")..];
        let block = &section[section.find("```mermaid").expect("a Mermaid block follows")..];
        let block = &block[..block[3..].find("```").expect("the block ends") + 3];
        let mut arrows = Vec::new();
        for line in block.lines() {
            let Some((from, rest)) = line.split_once("-->") else { continue };
            let to = rest.split(':').next().unwrap_or_default();
            let (from, to) = (from.trim().to_string(), to.trim().to_string());
            if from != "[*]" && to != "[*]" && from != to {
                arrows.push((from, to));
            }
        }
        arrows
    }

    /// Asserts that the diagram under `heading` draws exactly the transitions
    /// `may_enter` allows between the phases `all` (named by their `Debug`).
    pub(crate) fn assert_drawn<P: Copy + std::fmt::Debug>(heading: &str, all: &[P], may_enter: impl Fn(P, P) -> bool) {
        use std::collections::BTreeSet;
        let drawn: BTreeSet<(String, String)> = transitions(heading).into_iter().collect();
        let table: BTreeSet<(String, String)> = all
            .iter()
            .flat_map(|&from| all.iter().map(move |&to| (from, to)))
            .filter(|&(from, to)| may_enter(from, to))
            .map(|(from, to)| (format!("{from:?}"), format!("{to:?}")))
            .collect();
        assert_eq!(drawn, table, "docs/architecture.md, {heading:?}: the diagram against the phase table");
    }
}
