//! `pcft agent --frame-trace FILE` (hidden; tests and the demo): the agent
//! writes a line to FILE for every network frame a guest of it transmits
//! (`frame SEQ HASH`: its number in the device's `tx_frames` count and
//! [`frame_hash`] of its bytes) and for every checkpoint it sends
//! (`epoch N frames F`: the frames numbered below F belong to epochs up to
//! N). With the report's restored epoch, a test can then tell, for a frame it
//! captured on the wire, whether an epoch that never committed produced it:
//! output commit must never let one out. Each line is flushed as written, so
//! the trace survives a SIGKILL. Nothing is written unless armed.

use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

static TRACE: OnceLock<Mutex<std::fs::File>> = OnceLock::new();

/// Starts tracing to a new file at `path` (once per process).
pub fn open(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    TRACE
        .set(Mutex::new(file))
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the frame trace is already open"))
}

fn write_line(line: std::fmt::Arguments) {
    if let Some(file) = TRACE.get() {
        let mut file = file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A test instrument: a failed write shows up as a frame the test cannot place.
        let _ = writeln!(file, "{line}");
    }
}

/// The guest transmitted frame number `seq` with these bytes (an Ethernet frame).
pub fn frame(seq: u64, bytes: &[u8]) {
    if TRACE.get().is_some() {
        write_line(format_args!("frame {seq} {:016x}", frame_hash(bytes)));
    }
}

/// Checkpoint `epoch` went out with the guest's transmit count at `frames`.
pub fn epoch(epoch: u64, frames: u64) {
    write_line(format_args!("epoch {epoch} frames {frames}"));
}

/// FNV-1a 64 of a frame's bytes: the same frame captured on the wire hashes the same.
pub fn frame_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A trace read back: each frame's number by hash, and each epoch's frame count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FrameTrace {
    /// Frame numbers by hash (the same bytes may go out more than once).
    pub frames: std::collections::HashMap<u64, Vec<u64>>,
    /// For each checkpoint sent, the transmit count at it.
    pub epochs: std::collections::BTreeMap<u64, u64>,
}

impl FrameTrace {
    /// Parses a trace (lines it does not know are skipped: a line cut by a crash).
    pub fn parse(text: &str) -> FrameTrace {
        let mut trace = FrameTrace::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["frame", seq, hash] => {
                    if let (Ok(seq), Ok(hash)) = (seq.parse(), u64::from_str_radix(hash, 16)) {
                        trace.frames.entry(hash).or_default().push(seq);
                    }
                }
                ["epoch", epoch, "frames", frames] => {
                    if let (Ok(epoch), Ok(frames)) = (epoch.parse(), frames.parse()) {
                        trace.epochs.insert(epoch, frames);
                    }
                }
                _ => {}
            }
        }
        trace
    }

    /// Whether a frame with bytes of `hash` came only from epochs after
    /// `committed` (the last checkpoint that committed; 0: none did, and every
    /// frame the trace has is uncommitted). A frame the trace does not have is not.
    pub fn uncommitted(&self, hash: u64, committed: u64) -> bool {
        let below = if committed == 0 { 0 } else { self.epochs.get(&committed).copied().unwrap_or(u64::MAX) };
        self.frames.get(&hash).is_some_and(|seqs| seqs.iter().all(|&seq| seq >= below))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_uncommitted_only_if_every_copy_of_it_came_after_the_committed_epoch() {
        let (a, b, c) = (frame_hash(b"a"), frame_hash(b"b"), frame_hash(b"c"));
        let text = format!(
            "frame 10 {a:016x}\nepoch 1 frames 11\nframe 11 {b:016x}\nframe 12 {a:016x}\nepoch 2 frames 13\n\
             frame 13 {c:016x}\nframe 14 {b:016x}\nfra"
        );
        let trace = FrameTrace::parse(&text);
        assert_eq!(trace.epochs, [(1, 11), (2, 13)].into());
        // Epoch 1 committed: b (11, 14) and c (13) came after it; a went out in epoch 1 too.
        assert!(!trace.uncommitted(a, 1));
        assert!(trace.uncommitted(b, 1) && trace.uncommitted(c, 1));
        // Epoch 2 committed: only c came after it (b's first copy is committed).
        assert!(!trace.uncommitted(b, 2) && trace.uncommitted(c, 2));
        // None committed: all of them; a frame the trace never had: never.
        assert!(trace.uncommitted(a, 0));
        assert!(!trace.uncommitted(frame_hash(b"d"), 0));
    }
}
