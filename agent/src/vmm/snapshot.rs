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
//! a crash never leaves a half-written snapshot under the final name. They
//! hold guest memory, so only their owner may read them (mode 0600).
//!
//! Format versions are numbered from 1, one more per change: a version field
//! of 0 or above [`MAX_PLAUSIBLE_VERSION`] is damage, not a version some pcft
//! wrote, and reads as a corrupt header.

use crate::vmm::memory::{is_zero, GuestMemory, MemoryError, PAGE_SIZE};
use crate::vmm::state::MachineState;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"PCFTSNAP";
/// 2: the fixture's parameters gained `prefill` (`--prefill`), which changes the state section's encoding.
/// 3: network guests: the configuration names the tap, the fixture's parameters carry the guest's
/// network and TSC frequency, and the device state the virtio-net device's.
pub const FORMAT_VERSION: u32 = 3;
/// The highest version field read as a format version: versions grow by one
/// per format change and will not get near it, while a flipped bit in any
/// but the lowest byte of the field lands far above it.
pub const MAX_PLAUSIBLE_VERSION: u32 = 255;
const TRUNCATED: &str = "file ends early (truncated)";
/// Permissions of a snapshot file: it holds guest memory.
pub const FILE_MODE: u32 = 0o600;
const END_OF_PAGES: u64 = u64::MAX;
/// A state section larger than this is corrupt (a real one is tens of KiB).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// Why a snapshot cannot be written, read or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The OS error is part of the message, not a `source`: a chain printed
    /// with its causes shows it once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path} is not a PostCopyFT snapshot (it does not start with PCFTSNAP)")]
    NotASnapshot { path: PathBuf },
    /// The header is damaged: the file cannot be a snapshot of any version.
    #[error("{path} is corrupt: {damage}; the file cannot be used, restore from another copy")]
    DamagedHeader { path: PathBuf, damage: HeaderDamage },
    #[error(
        "{path} is snapshot format version {found}; this pcft reads version {FORMAT_VERSION} only: restore it with \
         the pcft that wrote it (if none writes version {found}, the file is damaged)"
    )]
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

/// What is wrong with a snapshot file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderDamage {
    /// Most of the magic is there, but not all of it.
    #[error("its magic bytes are damaged")]
    Magic,
    /// A version field no pcft writes (0, or above [`MAX_PLAUSIBLE_VERSION`]).
    #[error("its format version field reads {found} ({found:#010x}), a number no pcft writes")]
    Version { found: u32 },
}

/// Why a snapshot could not be written at a path: found before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum Unwritable {
    #[error("{path} is a directory: name a file in it, e.g. {}", path.join("vm.snap").display())]
    IsDirectory { path: PathBuf },
    #[error("the directory {dir} does not exist: create it, or write the snapshot elsewhere")]
    NoDirectory { dir: PathBuf },
    #[error("{dir} is not a directory: write the snapshot into a directory")]
    NotADirectory { dir: PathBuf },
    #[error("cannot create a file in {dir} ({error}): choose a directory this user can write to")]
    CannotCreate { dir: PathBuf, error: io::Error },
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

/// The temporary name a snapshot is written under before it is renamed to `path`.
fn temporary(path: &Path) -> PathBuf {
    path.with_extension(format!("tmp.{}", std::process::id()))
}

/// Creates (or truncates) `path` readable and writable by its owner only.
fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).open(path)
}

/// Checks, before a run, that [`save`] will be able to write a snapshot to
/// `path`: it is not a directory, and a file can be made in its directory
/// (one is made under the temporary name and removed).
pub fn check_writable(path: &Path) -> Result<(), Unwritable> {
    if path.is_dir() {
        return Err(Unwritable::IsDirectory { path: path.to_path_buf() });
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        // Missing, or a path through a file: no such directory either way.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(Unwritable::NoDirectory { dir })
        }
        Ok(meta) if !meta.is_dir() => return Err(Unwritable::NotADirectory { dir }),
        Err(error) => return Err(Unwritable::CannotCreate { dir, error }),
        Ok(_) => {}
    }
    let probe = temporary(path);
    match create_private(&probe) {
        Ok(file) => {
            drop(file);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(error) => Err(Unwritable::CannotCreate { dir, error }),
    }
}

/// Writes `state` and the non-zero pages of `memory` to `path` (mode 0600).
pub fn save(path: &Path, state: &MachineState, memory: &GuestMemory) -> Result<SnapshotStats, SnapshotError> {
    let io_err = |error| SnapshotError::Io { path: path.to_path_buf(), error };
    let encoded = postcard::to_allocvec(state).map_err(SnapshotError::Encode)?;
    let tmp = temporary(path);
    let file = create_private(&tmp).map_err(|error| SnapshotError::Io { path: tmp.clone(), error })?;
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
        let io_err = |error| SnapshotError::Io { path: path.to_path_buf(), error };
        let corrupt = |what: String| SnapshotError::Corrupt { path: path.to_path_buf(), what };
        let file = File::open(path).map_err(io_err)?;
        let mut input = BufReader::with_capacity(1 << 20, file);

        let mut start = Vec::with_capacity(MAGIC.len());
        input.by_ref().take(MAGIC.len() as u64).read_to_end(&mut start).map_err(io_err)?;
        check_magic(&start).map_err(|e| e.at(path))?;
        let version = u32::from_le_bytes(read_array(&mut input, path)?);
        check_version(version).map_err(|e| e.at(path))?;
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

/// What a header's magic and version field say, before the path is known.
#[derive(Debug, PartialEq, Eq)]
enum HeaderError {
    NotASnapshot,
    Truncated,
    Damaged(HeaderDamage),
    Version(u32),
}

impl HeaderError {
    fn at(self, path: &Path) -> SnapshotError {
        let path = path.to_path_buf();
        match self {
            HeaderError::NotASnapshot => SnapshotError::NotASnapshot { path },
            HeaderError::Truncated => SnapshotError::Corrupt { path, what: TRUNCATED.into() },
            HeaderError::Damaged(damage) => SnapshotError::DamagedHeader { path, damage },
            HeaderError::Version(found) => SnapshotError::Version { path, found },
        }
    }
}

/// Tells a file that is no snapshot from a snapshot whose magic is damaged
/// or cut short: one off by a byte or two is damage (a file that is no
/// snapshot differs in most of them), and a file shorter than the magic is a
/// truncated snapshot only if it starts as one.
fn check_magic(start: &[u8]) -> Result<(), HeaderError> {
    if start.len() < MAGIC.len() {
        return match MAGIC.starts_with(start) {
            true => Err(HeaderError::Truncated),
            false => Err(HeaderError::NotASnapshot),
        };
    }
    match start.iter().zip(MAGIC).filter(|(a, b)| a == b).count() {
        8 => Ok(()),
        6 | 7 => Err(HeaderError::Damaged(HeaderDamage::Magic)),
        _ => Err(HeaderError::NotASnapshot),
    }
}

/// Tells a snapshot of another format version from a damaged version field
/// (0, or a number no pcft will reach).
fn check_version(version: u32) -> Result<(), HeaderError> {
    match version {
        FORMAT_VERSION => Ok(()),
        found @ 1..=MAX_PLAUSIBLE_VERSION => Err(HeaderError::Version(found)),
        found => Err(HeaderError::Damaged(HeaderDamage::Version { found })),
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<(), SnapshotError> {
    input.read_exact(buf).map_err(|source| match source.kind() {
        io::ErrorKind::UnexpectedEof => SnapshotError::Corrupt { path: path.to_path_buf(), what: TRUNCATED.into() },
        _ => SnapshotError::Io { path: path.to_path_buf(), error: source },
    })
}

fn read_array<const N: usize>(input: &mut impl Read, path: &Path) -> Result<[u8; N], SnapshotError> {
    let mut buf = [0u8; N];
    read_exact(input, &mut buf, path)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Opens a file that holds `bytes` and returns the error.
    fn open_error(bytes: &[u8]) -> SnapshotError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        std::fs::write(&path, bytes).unwrap();
        SnapshotReader::open(&path).err().expect("refused")
    }

    fn header(magic: &[u8; 8], version: u32) -> Vec<u8> {
        let mut bytes = magic.to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes
    }

    #[test]
    fn a_flipped_version_bit_reads_as_damage_not_as_a_version() {
        // A bit of the version's top byte flipped: once read as "format version 268435457" (of version 1).
        let flipped = FORMAT_VERSION ^ 0x1000_0000;
        let e = open_error(&header(MAGIC, flipped));
        assert!(
            matches!(e, SnapshotError::DamagedHeader { damage: HeaderDamage::Version { found }, .. } if found == flipped),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("is corrupt: its format version field reads {flipped}")), "{e}");
        assert!(!e.to_string().contains(&format!("format version {flipped};")), "{e}");
        for found in [0, 256, 1 << 8 | 1, u32::MAX] {
            let e = open_error(&header(MAGIC, found));
            assert!(matches!(e, SnapshotError::DamagedHeader { .. }), "{found}: {e:?}");
        }
    }

    #[test]
    fn another_plausible_version_is_named_as_one() {
        let e = open_error(&header(MAGIC, 1));
        assert!(matches!(e, SnapshotError::Version { found: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("format version 1; this pcft reads version 3 only"), "{e}");
    }

    #[test]
    fn a_damaged_magic_is_corruption_and_another_file_is_no_snapshot() {
        let mut magic = *MAGIC;
        magic[3] ^= 0x20;
        let e = open_error(&header(&magic, FORMAT_VERSION));
        assert!(matches!(e, SnapshotError::DamagedHeader { damage: HeaderDamage::Magic, .. }), "{e:?}");
        assert!(matches!(open_error(b"#!/bin/sh\necho hello\n"), SnapshotError::NotASnapshot { .. }));
        // Too short for a header, and nothing like one: still no snapshot.
        assert!(matches!(open_error(b"hello"), SnapshotError::NotASnapshot { .. }));
        // The start of one, cut short: a truncated snapshot.
        let e = open_error(b"PCFT");
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn an_os_error_is_printed_once_in_an_error_chain() {
        let dir = tempfile::tempdir().unwrap();
        let missing = SnapshotReader::open(&dir.path().join("missing.snap")).err().expect("missing");
        let chain = format!("{:#}", anyhow::Error::new(missing).context("cannot restore"));
        assert_eq!(chain.matches("No such file or directory").count(), 1, "{chain}");
    }

    #[test]
    fn snapshot_files_are_private_to_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.snap");
        drop(create_private(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, FILE_MODE);
    }

    #[test]
    fn where_a_snapshot_cannot_go_is_found_before_a_run() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(&dir.path().join("ok.snap")).is_ok());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the probe leaves nothing behind");
        let e = check_writable(dir.path()).unwrap_err();
        assert!(matches!(e, Unwritable::IsDirectory { .. }), "{e:?}");
        let e = check_writable(&dir.path().join("no/such/dir/x.snap")).unwrap_err();
        assert!(matches!(e, Unwritable::NoDirectory { .. }), "{e:?}");
        assert!(e.to_string().contains("does not exist: create it"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let e = check_writable(&file.join("x.snap")).unwrap_err();
        assert!(matches!(e, Unwritable::NotADirectory { .. }), "{e:?}");
    }
}
