//! Where the source keeps the open checkpoint epoch's pages until its commit
//! record arrives: in memory up to a budget, and past it in a file (unlinked,
//! in the staging directory), so that a destination sending an epoch larger
//! than the budget costs disk, not an OOM. Spilled pages are kept as frames,
//! each with its checksum, and are all read back and checked before the first
//! of them is handed out, so a bad disk makes the commit fail before it has
//! touched guest memory.

use crate::vmm::memory::MemoryError;
use crate::wire::frame::{decode_header, decode_payload, encode_pages, Frame, PageBatch, HEADER_BYTES};
use crate::wire::migration::MigrationMessage;
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
    /// Writing a batch into guest memory failed.
    #[error("{0}")]
    Apply(MemoryError),
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
    /// Tests: this many reads of spilled frames fail from now on (one each).
    #[cfg(test)]
    failing_reads: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

/// How often the apply pass over the spilled file is tried before the epoch
/// counts as torn. Applying an epoch again from its first batch is harmless
/// (the same pages, in the same order), so a read that fails half-way is retried whole.
const APPLY_ATTEMPTS: usize = 3;

struct Spill {
    file: File,
    bytes: u64,
}

impl Staging {
    pub fn new(limits: StagingLimits) -> Self {
        Staging {
            limits,
            in_memory: Vec::new(),
            memory_bytes: 0,
            spill: None,
            torn: false,
            #[cfg(test)]
            failing_reads: Default::default(),
        }
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
    /// time), so a bad file fails before any batch is handed out. A read that
    /// fails during the apply pass is retried from the epoch's first batch (up
    /// to `APPLY_ATTEMPTS` passes). If `apply` fails, or every pass does,
    /// [`torn`](Self::torn) says some batches were applied. Once every batch
    /// is applied the epoch is whole, whatever happens to the file after.
    pub fn drain(&mut self, mut apply: impl FnMut(&PageBatch) -> Result<(), MemoryError>) -> Result<(), StagingError> {
        let spilled = self.spill.as_ref().is_some_and(|s| s.bytes > 0);
        if spilled {
            self.each_spilled(|_| Ok(()))?;
        }
        let in_memory = std::mem::take(&mut self.in_memory);
        self.memory_bytes = 0;
        let mut handed_out = false;
        let mut apply = |batch: &PageBatch| {
            handed_out = true;
            apply(batch)
        };
        let mut result = Ok(());
        for attempt in 1..=APPLY_ATTEMPTS {
            result = self.apply_pass(&in_memory, spilled, &mut apply);
            match &result {
                Err(StagingError::Read { reason, .. }) if attempt < APPLY_ATTEMPTS => {
                    tracing::warn!(
                        attempt,
                        "reading the checkpoint staging file failed ({reason}); applying the epoch again"
                    );
                }
                _ => break,
            }
        }
        if let Err(e) = result {
            self.torn = handed_out;
            return Err(e);
        }
        if let Err(e) = self.clear_file() {
            // The epoch is applied; only the file cannot be reused. Never read it again:
            // the next epoch that spills gets a new one.
            tracing::warn!("cannot empty the checkpoint staging file ({e}); the next epoch uses a new one");
            self.spill = None;
        }
        Ok(())
    }

    /// One pass over the epoch's batches, the ones in memory first.
    fn apply_pass(
        &mut self,
        in_memory: &[PageBatch],
        spilled: bool,
        apply: &mut impl FnMut(&PageBatch) -> Result<(), MemoryError>,
    ) -> Result<(), StagingError> {
        for batch in in_memory {
            apply(batch).map_err(StagingError::Apply)?;
        }
        if spilled {
            self.each_spilled(|batch| apply(&batch).map_err(StagingError::Apply))?;
        }
        Ok(())
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
            #[cfg(test)]
            if self
                .failing_reads
                .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                    n.checked_sub(1)
                })
                .is_ok()
            {
                return Err(read("injected read failure".into()));
            }
            let mut header = [0u8; HEADER_BYTES];
            reader.read_exact(&mut header).map_err(|e| read(e.to_string()))?;
            let header = decode_header(&header).map_err(|e| read(e.to_string()))?;
            let mut payload = vec![0u8; header.payload_len()];
            reader.read_exact(&mut payload).map_err(|e| read(e.to_string()))?;
            left = left.saturating_sub((HEADER_BYTES + header.payload_len()) as u64);
            match decode_payload::<MigrationMessage>(header, payload).map_err(|e| read(e.to_string()))? {
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
    use crate::vmm::memory::PAGE_SIZE;
    use crate::wire::frame::PageData;
    use std::sync::Arc;

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

    /// Five batches, all but the first in the file.
    fn spilled_staging(dir: &std::path::Path) -> Staging {
        let budget = batch(0, 0).payload_len() as u64;
        let mut staging = Staging::new(StagingLimits { memory_bytes: budget, dir: dir.into(), ..Default::default() });
        for i in 0..5u8 {
            staging.push(batch(u64::from(i) * 0x2000, i + 1)).unwrap();
        }
        staging
    }

    #[test]
    fn a_read_that_fails_while_applying_is_retried_and_the_epoch_applies_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut staging = spilled_staging(dir.path());
        let failing = Arc::clone(&staging.failing_reads);
        let mut applied = Vec::new();
        let drained = staging.drain(|b| {
            if applied.len() == 2 {
                // The apply pass has handed out batches: its next read fails, once.
                failing.store(1, std::sync::atomic::Ordering::SeqCst);
            }
            applied.push(b.clone());
            Ok(())
        });
        drained.expect("retried");
        assert!(!staging.torn());
        // The retry applies the epoch again from its first batch: the last pass is whole and in order.
        let firsts = |batches: &[PageBatch]| pages(batches).iter().filter_map(|(_, b)| *b).collect::<Vec<_>>();
        assert_eq!(firsts(&applied), vec![1, 2, 3, 1, 2, 3, 4, 5], "3 batches, then all 5 again");
    }

    #[test]
    fn an_epoch_whose_file_cannot_be_emptied_is_whole_and_the_file_is_not_read_again() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let mut staging = spilled_staging(dir.path());
        // The same (unlinked) file, opened read-only: it reads back, but cannot be truncated.
        let spill = staging.spill.as_mut().unwrap();
        let read_only = File::open(format!("/proc/self/fd/{}", spill.file.as_raw_fd())).unwrap();
        spill.file = read_only;
        let taken = take(&mut staging).expect("the epoch applied whole");
        assert_eq!(taken.len(), 5);
        assert!(!staging.torn(), "applied whole: not torn");
        // The next epoch spills to a new file and never sees the old one's frames.
        for i in 0..3u8 {
            staging.push(batch(0x100000 + u64::from(i) * 0x2000, 50 + i)).unwrap();
        }
        let next = take(&mut staging).unwrap();
        assert_eq!(pages(&next).iter().filter_map(|(_, b)| *b).collect::<Vec<_>>(), vec![50, 51, 52]);
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
