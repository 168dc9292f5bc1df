//! The snapshot file: a paused machine's whole state, versioned and checksummed.
//!
//! ```text
//! magic    8 bytes  "PCFTSNAP"
//! version  u32 LE   FORMAT_VERSION
//! length   u64 LE   length of the state section
//! state    postcard-encoded MachineState (vCPUs, in-kernel devices, device model, config)
//! crc      u32 LE   CRC-32C of the state section
//! pages    repeated: gpa u64 LE, 4096 bytes   (only pages that are not all zero)
//! end      u64 LE   u64::MAX
//! crc      u32 LE   CRC-32C of the page records and the end marker
//! ```
//! Files are written to a temporary name, synced, then renamed into place, so
//! a crash never leaves a half-written snapshot under the final name.

use crate::vmm::memory::{is_zero, GuestMemory, MemoryError, PAGE_SIZE};
use crate::vmm::state::MachineState;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"PCFTSNAP";
pub const FORMAT_VERSION: u32 = 1;
const END_OF_PAGES: u64 = u64::MAX;
/// A state section larger than this is corrupt (a real one is tens of KiB).
const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a PostCopyFT snapshot (bad magic)")]
    NotASnapshot { path: PathBuf },
    #[error("{path} is snapshot format version {found}; this pcft reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: page at {gpa:#x} is outside the snapshot's {size}-byte guest memory")]
    PageOutOfRange { path: PathBuf, gpa: u64, size: u64 },
    #[error("cannot encode the machine state: {0}")]
    Encode(postcard::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Counts from writing a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotStats {
    pub file_bytes: u64,
    pub pages_written: u64,
    pub zero_pages_skipped: u64,
}

/// A writer that keeps a running CRC-32C of what passes through it.
struct Crc<W> {
    inner: W,
    crc: u32,
    bytes: u64,
}

impl<W> Crc<W> {
    fn new(inner: W) -> Self {
        Crc { inner, crc: 0, bytes: 0 }
    }
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Writes `state` and the non-zero pages of `memory` to `path`.
pub fn save(path: &Path, state: &MachineState, memory: &GuestMemory) -> Result<SnapshotStats, SnapshotError> {
    let io_err = |source| SnapshotError::Io { path: path.to_path_buf(), source };
    let encoded = postcard::to_allocvec(state).map_err(SnapshotError::Encode)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let file = File::create(&tmp).map_err(|source| SnapshotError::Io { path: tmp.clone(), source })?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut stats = SnapshotStats { file_bytes: 0, pages_written: 0, zero_pages_skipped: 0 };

    out.write_all(MAGIC).map_err(io_err)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes()).map_err(io_err)?;
    out.write_all(&(encoded.len() as u64).to_le_bytes()).map_err(io_err)?;
    out.write_all(&encoded).map_err(io_err)?;
    out.write_all(&crc32c::crc32c(&encoded).to_le_bytes()).map_err(io_err)?;

    let mut pages = Crc::new(&mut out);
    memory.for_each_chunk::<SnapshotError>(0..memory.size(), 1 << 20, |base, chunk| {
        for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
            if is_zero(page) {
                stats.zero_pages_skipped += 1;
                continue;
            }
            pages.write_all(&(base + i as u64 * PAGE_SIZE).to_le_bytes()).map_err(io_err)?;
            pages.write_all(page).map_err(io_err)?;
            stats.pages_written += 1;
        }
        Ok(())
    })?;
    pages.write_all(&END_OF_PAGES.to_le_bytes()).map_err(io_err)?;
    let crc = pages.crc;
    out.write_all(&crc.to_le_bytes()).map_err(io_err)?;

    let file = out.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)?;
    stats.file_bytes = file.metadata().map_err(io_err)?.len();
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_err)?;
    Ok(stats)
}

/// An opened snapshot whose state section has been read and checked.
pub struct SnapshotReader {
    path: PathBuf,
    input: BufReader<File>,
}

impl SnapshotReader {
    /// Opens `path` and reads its state section; guest memory stays unread
    /// until [`load_memory`](Self::load_memory).
    pub fn open(path: &Path) -> Result<(MachineState, SnapshotReader), SnapshotError> {
        let io_err = |source| SnapshotError::Io { path: path.to_path_buf(), source };
        let corrupt = |what: String| SnapshotError::Corrupt { path: path.to_path_buf(), what };
        let file = File::open(path).map_err(io_err)?;
        let mut input = BufReader::with_capacity(1 << 20, file);

        let mut magic = [0u8; 8];
        read_exact(&mut input, &mut magic, path)?;
        if &magic != MAGIC {
            return Err(SnapshotError::NotASnapshot { path: path.to_path_buf() });
        }
        let version = u32::from_le_bytes(read_array(&mut input, path)?);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version { path: path.to_path_buf(), found: version });
        }
        let len = u64::from_le_bytes(read_array(&mut input, path)?);
        if len > MAX_STATE_BYTES {
            return Err(corrupt(format!("state section claims {len} bytes")));
        }
        let mut encoded = vec![0u8; len as usize];
        read_exact(&mut input, &mut encoded, path)?;
        let crc = u32::from_le_bytes(read_array(&mut input, path)?);
        if crc != crc32c::crc32c(&encoded) {
            return Err(corrupt("state section checksum mismatch".into()));
        }
        let state: MachineState =
            postcard::from_bytes(&encoded).map_err(|e| corrupt(format!("state section does not decode: {e}")))?;
        Ok((state, SnapshotReader { path: path.to_path_buf(), input }))
    }

    /// Copies the snapshot's pages into `memory` and checks the page checksum.
    /// On error, `memory` holds a partial image and must be discarded.
    pub fn load_memory(mut self, memory: &GuestMemory) -> Result<u64, SnapshotError> {
        let path = self.path.clone();
        let mut pages = Crc::new(&mut self.input);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut count = 0u64;
        loop {
            let gpa = u64::from_le_bytes(read_array(&mut pages, &path)?);
            if gpa == END_OF_PAGES {
                break;
            }
            if gpa % PAGE_SIZE != 0 || memory.check(gpa, PAGE_SIZE).is_err() {
                return Err(SnapshotError::PageOutOfRange { path, gpa, size: memory.size() });
            }
            read_exact(&mut pages, &mut page, &path)?;
            memory.write(gpa, &page)?;
            count += 1;
        }
        let computed = pages.crc;
        let stored = u32::from_le_bytes(read_array(&mut self.input, &path)?);
        if stored != computed {
            return Err(SnapshotError::Corrupt { path, what: "guest memory checksum mismatch".into() });
        }
        Ok(count)
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<(), SnapshotError> {
    input.read_exact(buf).map_err(|source| match source.kind() {
        io::ErrorKind::UnexpectedEof => {
            SnapshotError::Corrupt { path: path.to_path_buf(), what: "file ends early (truncated)".into() }
        }
        _ => SnapshotError::Io { path: path.to_path_buf(), source },
    })
}

fn read_array<const N: usize>(input: &mut impl Read, path: &Path) -> Result<[u8; N], SnapshotError> {
    let mut buf = [0u8; N];
    read_exact(input, &mut buf, path)?;
    Ok(buf)
}
