//! Where the source keeps the open checkpoint epoch's pages until its commit
//! record arrives: in memory up to a budget, and past it in a file (unlinked,
//! in the staging directory), so that a destination sending an epoch larger
//! than the budget costs disk, not an OOM. Spilled pages are kept as frames,
//! each with its checksum, and are all read back and checked before the first
//! of them is handed out, so a bad disk makes the commit fail before it has
//! touched guest memory.

use super::protocol::{decode_header, decode_payload, encode_pages, Frame, PageBatch, HEADER_BYTES};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Default for `pcft agent --staging-memory`.
pub const DEFAULT_STAGING_MEMORY: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error(
        "cannot create a checkpoint staging file in {dir}: {reason}; give the agent a writable --staging-dir with room for one epoch"
    )]
    Create { dir: PathBuf, reason: String },
    #[error("cannot write the checkpoint staging file in {dir}: {reason}")]
    Write { dir: PathBuf, reason: String },
    #[error("the checkpoint staging file in {dir} does not read back: {reason}")]
    Read { dir: PathBuf, reason: String },
    #[error("{0}")]
    Apply(String),
}

/// Where staged pages go once the memory budget is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagingLimits {
    /// Payload bytes of staged pages kept in memory at most.
    pub memory_bytes: u64,
    /// Where the overflow file is created.
    pub dir: PathBuf,
    /// Fault injection (`pcft agent --staging-delay-ms`): every write to the
    /// file takes this much longer, a slow disk.
    pub write_delay: std::time::Duration,
}

impl Default for StagingLimits {
    fn default() -> Self {
        StagingLimits {
            memory_bytes: DEFAULT_STAGING_MEMORY,
            dir: std::env::temp_dir(),
            write_delay: std::time::Duration::ZERO,
        }
    }
}

/// The pages of one open epoch, in arrival order.
pub struct Staging {
    limits: StagingLimits,
    in_memory: Vec<PageBatch>,
    memory_bytes: u64,
    /// Once a batch went to the file, every later one of the epoch does too (order matters:
    /// a page may come twice, and the later copy wins).
    spill: Option<Spill>,
    /// A drain failed after applying part of the epoch.
    torn: bool,
}

struct Spill {
    file: File,
    bytes: u64,
}

impl Staging {
    pub fn new(limits: StagingLimits) -> Self {
        Staging { limits, in_memory: Vec::new(), memory_bytes: 0, spill: None, torn: false }
    }

    /// Payload bytes staged in memory now.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Bytes staged in the file now.
    pub fn file_bytes(&self) -> u64 {
        self.spill.as_ref().map_or(0, |s| s.bytes)
    }

    /// Adds a batch of the open epoch.
    pub fn push(&mut self, batch: PageBatch) -> Result<(), StagingError> {
        let bytes = batch.payload_len() as u64;
        let spilling = self.spill.as_ref().is_some_and(|s| s.bytes > 0);
        if !spilling && self.memory_bytes + bytes <= self.limits.memory_bytes {
            self.memory_bytes += bytes;
            self.in_memory.push(batch);
            return Ok(());
        }
        let dir = &self.limits.dir;
        if self.spill.is_none() {
            let file = tempfile::tempfile_in(dir)
                .map_err(|e| StagingError::Create { dir: dir.clone(), reason: e.to_string() })?;
            self.spill = Some(Spill { file, bytes: 0 });
        }
        let spill = self.spill.as_mut().expect("just made");
        let frame = encode_pages(&batch);
        spill.file.write_all(&frame).map_err(|e| StagingError::Write { dir: dir.clone(), reason: e.to_string() })?;
        spill.bytes += frame.len() as u64;
        if !self.limits.write_delay.is_zero() {
            // Blocks as a slow disk's write would.
            std::thread::sleep(self.limits.write_delay);
        }
        Ok(())
    }

    /// Hands the epoch's batches to `apply`, in order; the staging is empty after.
    /// The file is read and checked whole first (one frame in memory at a
    /// time), so a bad file fails before any batch is handed out. If reading
    /// or `apply` fails later, [`torn`](Self::torn) says some batches were applied.
    pub fn drain(&mut self, mut apply: impl FnMut(&PageBatch) -> Result<(), String>) -> Result<(), StagingError> {
        let spilled = self.spill.as_ref().is_some_and(|s| s.bytes > 0);
        if spilled {
            self.each_spilled(|_| Ok(()))?;
        }
        let mut handed_out = false;
        let result = (|| {
            for batch in std::mem::take(&mut self.in_memory) {
                handed_out = true;
                apply(&batch).map_err(StagingError::Apply)?;
            }
            self.memory_bytes = 0;
            if spilled {
                self.each_spilled(|batch| {
                    handed_out = true;
                    apply(&batch).map_err(StagingError::Apply)
                })?;
            }
            self.clear_file()
        })();
        self.torn = result.is_err() && handed_out;
        result
    }

    /// Whether a failed [`drain`](Self::drain) applied part of the epoch.
    pub fn torn(&self) -> bool {
        self.torn
    }

    /// Reads the file's frames in order, one at a time, checking each.
    fn each_spilled(
        &mut self,
        mut each: impl FnMut(PageBatch) -> Result<(), StagingError>,
    ) -> Result<(), StagingError> {
        let dir = self.limits.dir.clone();
        let read = |e: String| StagingError::Read { dir: dir.clone(), reason: e };
        let spill = self.spill.as_mut().expect("called with a file");
        spill.file.flush().map_err(|e| read(e.to_string()))?;
        spill.file.seek(SeekFrom::Start(0)).map_err(|e| read(e.to_string()))?;
        let mut reader = BufReader::new((&spill.file).take(spill.bytes));
        let mut left = spill.bytes;
        while left > 0 {
            let mut header = [0u8; HEADER_BYTES];
            reader.read_exact(&mut header).map_err(|e| read(e.to_string()))?;
            let header = decode_header(&header).map_err(|e| read(e.to_string()))?;
            let mut payload = vec![0u8; header.payload_len()];
            reader.read_exact(&mut payload).map_err(|e| read(e.to_string()))?;
            left = left.saturating_sub((HEADER_BYTES + header.payload_len()) as u64);
            match decode_payload(header, payload).map_err(|e| read(e.to_string()))? {
                Frame::Pages(batch) => each(batch)?,
                Frame::Message(m) => return Err(read(format!("a message where pages were written: {m:?}"))),
            }
        }
        // Further writes append after what was read.
        spill.file.seek(SeekFrom::End(0)).map_err(|e| read(e.to_string()))?;
        Ok(())
    }

    /// Drops the open epoch (it will never commit).
    pub fn clear(&mut self) -> Result<(), StagingError> {
        self.in_memory.clear();
        self.memory_bytes = 0;
        self.clear_file()
    }

    fn clear_file(&mut self) -> Result<(), StagingError> {
        if let Some(spill) = self.spill.as_mut() {
            let write = |e: std::io::Error| StagingError::Write { dir: self.limits.dir.clone(), reason: e.to_string() };
            spill.file.set_len(0).map_err(write)?;
            spill.file.seek(SeekFrom::Start(0)).map_err(write)?;
            spill.bytes = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;
    use crate::migration::protocol::PageData;

    fn batch(gpa: u64, byte: u8) -> PageBatch {
        PageBatch::from_pages(vec![
            (gpa, PageData::Bytes(vec![byte; PAGE_SIZE as usize])),
            (gpa + 0x1000, PageData::Zero),
        ])
    }

    fn take(staging: &mut Staging) -> Result<Vec<PageBatch>, StagingError> {
        let mut batches = Vec::new();
        staging.drain(|b| {
            batches.push(b.clone());
            Ok(())
        })?;
        Ok(batches)
    }

    fn pages(batches: &[PageBatch]) -> Vec<(u64, Option<u8>)> {
        batches.iter().flat_map(|b| b.pages().map(|(gpa, data)| (gpa, data.map(|d| d[0])))).collect::<Vec<_>>()
    }

    #[test]
    fn past_the_budget_pages_go_to_a_file_and_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two batches in memory.
        let budget = 2 * batch(0, 0).payload_len() as u64;
        let mut staging =
            Staging::new(StagingLimits { memory_bytes: budget, dir: dir.path().into(), ..Default::default() });
        for i in 0..5u8 {
            staging.push(batch(u64::from(i) * 0x2000, i + 1)).unwrap();
        }
        assert_eq!(staging.memory_bytes(), budget);
        assert!(staging.file_bytes() > 0);
        let taken = take(&mut staging).unwrap();
        let expected: Vec<_> = (0..5u8)
            .flat_map(|i| [(u64::from(i) * 0x2000, Some(i + 1)), (u64::from(i) * 0x2000 + 0x1000, None)])
            .collect();
        assert_eq!(pages(&taken), expected);
        assert_eq!((staging.memory_bytes(), staging.file_bytes()), (0, 0));
        // The next epoch starts in memory again.
        staging.push(batch(0, 9)).unwrap();
        assert_eq!((staging.file_bytes(), pages(&take(&mut staging).unwrap())[0]), (0, (0, Some(9))));
    }

    #[test]
    fn a_corrupted_file_hands_out_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut staging = Staging::new(StagingLimits { memory_bytes: 0, dir: dir.path().into(), ..Default::default() });
        staging.push(batch(0, 1)).unwrap();
        staging.push(batch(0x2000, 2)).unwrap();
        // Flip a byte of the second frame's page data on "disk".
        let spill = staging.spill.as_mut().unwrap();
        let at = spill.bytes - 10;
        spill.file.seek(SeekFrom::Start(at)).unwrap();
        spill.file.write_all(&[0xee]).unwrap();
        spill.file.seek(SeekFrom::End(0)).unwrap();
        let mut handed_out = 0;
        let drained = staging.drain(|_| {
            handed_out += 1;
            Ok(())
        });
        assert!(matches!(drained, Err(StagingError::Read { .. })));
        assert_eq!((handed_out, staging.torn()), (0, false));
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let mut staging = Staging::new(StagingLimits {
            memory_bytes: 0,
            dir: PathBuf::from("/nonexistent/pcft-staging"),
            ..Default::default()
        });
        let e = staging.push(batch(0, 1)).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/pcft-staging") && e.contains("--staging-dir"), "{e}");
    }
}
