//! The wire protocol between agents and between the CLI and an agent:
//! framed, versioned, checksummed. See docs/protocol.md.
//!
//! ```text
//! frame header (16 bytes, little endian)
//!   magic    4  "PCFT"
//!   version  u16 the version of the kind's message set (see `message_set`)
//!   kind     u16 1 = greeting, 3 = control message, 4 = migration message
//!                (each a postcard-encoded enum), 2 = page batch (migration)
//!   length   u32 payload bytes (at most MAX_PAYLOAD)
//!   crc      u32 CRC-32C over the header's first 12 bytes and the payload
//! payload
//! ```
//! A page batch is the 4096 bytes of every page that is not all zero, then
//! one entry per page (`gpa u64, flags u8`, in the order of the data), then
//! `count u32`: the data first, so that the sender builds the whole frame in
//! one buffer as it reads pages, or (post-copy, the source's VM paused) sends
//! the pages straight from guest memory in one vectored write, tagged in
//! pieces ([`PageBatchParts`]): the same bytes on the wire either way.
//!
//! The codec is generic over the message set a connection carries
//! ([`WireMessage`]): a reader asked for one set refuses frames of another.
//! It is pure (bytes in, values out); [`FrameReader`] and
//! [`FrameWriter`] move frames over any tokio stream, with their tags once a
//! connection is authenticated (see `auth`).

use crate::vmm::memory::{is_zero, PAGE_SIZE};
use crate::wire::auth::{FrameMac, TAG_BYTES};
use crate::wire::message_set::{MessageSet, PayloadError, WireMessage};
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub const MAGIC: [u8; 4] = *b"PCFT";
pub const HEADER_BYTES: usize = 16;
/// No frame carries more: a larger length field is corruption, not a reason to allocate.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// No greeting frame (`Hello`, `Welcome`, a refusal) carries more: before a
/// peer has authenticated, a length field may claim at most this.
pub const GREETING_MAX_PAYLOAD: u32 = 16 << 10;
/// A payload is read in pieces of at most this, so memory grows with the
/// bytes that really arrive, not with what a length field claims.
pub const READ_CHUNK: usize = 256 << 10;
/// PostCopyFT flow control: payload bytes of checkpoint frames (pages and
/// commit records) the destination may have sent and the source not yet
/// handled. The source returns credit (`CheckpointCredit`) as it handles them,
/// so it never has to stop reading the connection, which also carries
/// heartbeats and page requests.
pub const CHECKPOINT_WINDOW: u64 = 8 << 20;
/// Frame buffers a [`FrameReader`] keeps for later frames (enough for a
/// reader whose frames are handled a few behind, see `read_ahead`).
pub const SPARE_BUFFERS: usize = 4;
const KIND_GREETING: u16 = 1;
const KIND_PAGES: u16 = 2;
const KIND_CONTROL: u16 = 3;
const KIND_MIGRATION: u16 = 4;
const FLAG_ZERO: u8 = 1;
const PAGE: usize = PAGE_SIZE as usize;
const ENTRY_BYTES: usize = 9;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("the peer is not a PostCopyFT agent (bad frame magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A frame of `set` whose version is not the one this build speaks.
    #[error("the peer speaks {set} protocol version {peer}, this agent speaks version {}: run the same pcft version on both hosts", set.version())]
    Version { set: MessageSet, peer: u16 },
    /// A frame of another message set than the connection carries.
    #[error("the peer sent a {got} message where {expected} messages belong")]
    WrongSet { expected: MessageSet, got: MessageSet },
    #[error("frame of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(u32, u32),
    #[error("frame checksum mismatch (computed {computed:#010x}, frame says {stored:#010x}): the stream is corrupt")]
    Checksum { computed: u32, stored: u32 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("the connection closed in the middle of a frame (truncated)")]
    Truncated,
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame authentication failed (MAC mismatch): the peer does not hold this agent's pre-shared key (--psk-file), or the stream was tampered with")]
    Unauthenticated,
    /// An agent refused its peer: a frame failed its tag on the agent's side of
    /// a connection (see [`FrameReader::refuse_as_agent`]); counted in `pcft_auth_refusals_total`.
    #[error("refused {peer} ({}): {}", reason.label(), reason.explain())]
    Refused { peer: String, reason: TagRefusal },
    /// The connection failed under the frames; `kind` says how (a reset is
    /// `ConnectionReset`), `detail` is the system's message.
    #[error("connection error: {detail}")]
    Io { kind: std::io::ErrorKind, detail: String },
}

/// Why an agent refused a peer whose frame failed its tag: the `reason` label
/// of `pcft_auth_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagRefusal {
    /// The peer's first tagged frame failed: it holds another key (or none of
    /// this one). A client that finds the agent's `Welcome` wrong still sends
    /// one frame under its own key before it hangs up, so that the agent learns it.
    WrongKey,
    /// A later frame failed, after earlier ones passed: the stream was tampered with.
    BadMac,
}

impl TagRefusal {
    pub fn label(self) -> &'static str {
        match self {
            TagRefusal::WrongKey => "wrong-key",
            TagRefusal::BadMac => "bad-mac",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            TagRefusal::WrongKey => {
                "its first frame failed the MAC check: it holds another pre-shared key than this agent; give both ends the same --psk-file"
            }
            TagRefusal::BadMac => {
                "a frame failed the MAC check after its first ones passed: the stream was tampered with"
            }
        }
    }
}

impl ProtocolError {
    fn io(e: std::io::Error) -> ProtocolError {
        ProtocolError::Io { kind: e.kind(), detail: e.to_string() }
    }

    /// The peer's kernel (or something in between) reset the connection.
    pub fn is_reset(&self) -> bool {
        matches!(self, ProtocolError::Io { kind: std::io::ErrorKind::ConnectionReset, .. })
    }
}

/// One page in a batch: its contents, or "all zero".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageData {
    Zero,
    Bytes(Vec<u8>),
}

/// A received batch of pages. It keeps the frame's bytes and indexes into
/// them, so decoding copies no page data.
#[derive(Clone, Default)]
pub struct PageBatch {
    /// Per page: its address and where its data starts in `bytes` (None: a zero page).
    entries: Vec<(u64, Option<usize>)>,
    /// The frame as read (header, then payload), or for a batch made by
    /// [`PageBatch::from_pages`], the pages' data.
    bytes: Vec<u8>,
    /// Where the payload starts in `bytes`.
    payload_at: usize,
}

/// Consecutive pages of a batch that are all zero or all data, contiguous both
/// in guest memory and in the batch: one install call for the lot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun<'a> {
    pub gpa: u64,
    pub pages: usize,
    /// The run's data (`pages` × 4096 bytes), or None for zero pages.
    pub data: Option<&'a [u8]>,
}

impl<'a> PageRun<'a> {
    /// The run in pieces of at most `max_pages` pages, in order.
    pub fn pieces(self, max_pages: usize) -> impl Iterator<Item = PageRun<'a>> {
        let max_pages = max_pages.max(1);
        (0..self.pages).step_by(max_pages).map(move |first| {
            let pages = max_pages.min(self.pages - first);
            PageRun {
                gpa: self.gpa + first as u64 * PAGE_SIZE,
                pages,
                data: self.data.map(|d| &d[first * PAGE..(first + pages) * PAGE]),
            }
        })
    }
}

/// Two batches are equal when they carry the same pages in the same order,
/// however their bytes are laid out.
impl PartialEq for PageBatch {
    fn eq(&self, other: &Self) -> bool {
        self.pages().eq(other.pages())
    }
}

impl Eq for PageBatch {}

impl std::fmt::Debug for PageBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let zero = self.entries.iter().filter(|(_, at)| at.is_none()).count();
        let first = self.entries.first().map(|(gpa, _)| format!("{gpa:#x}"));
        write!(f, "PageBatch {{ pages: {}, zero: {zero}, first: {first:?} }}", self.entries.len())
    }
}

impl PageBatch {
    /// A batch of the given pages (for tests and tools; the hot path uses [`PageBatchWriter`]).
    pub fn from_pages(pages: Vec<(u64, PageData)>) -> Self {
        let mut batch = PageBatch::default();
        for (gpa, data) in pages {
            match data {
                PageData::Zero => batch.entries.push((gpa, None)),
                PageData::Bytes(b) => {
                    batch.entries.push((gpa, Some(batch.bytes.len())));
                    batch.bytes.extend_from_slice(&b);
                }
            }
        }
        batch
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the batch's payload (of page data, for a batch made by
    /// [`PageBatch::from_pages`]: zero pages hold none).
    pub fn payload_len(&self) -> usize {
        self.bytes.len() - self.payload_at
    }

    /// Where the batch's bytes are (for tests to see a buffer used again).
    #[cfg(test)]
    pub(crate) fn payload_ptr(&self) -> *const u8 {
        self.bytes.as_ptr()
    }

    /// Every page: its address and data (None: all zero).
    pub fn pages(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> + '_ {
        self.entries.iter().map(|&(gpa, at)| (gpa, at.map(|at| &self.bytes[at..at + PAGE])))
    }

    /// The batch as maximal runs (see [`PageRun`]), in order.
    pub fn runs(&self) -> Vec<PageRun<'_>> {
        let mut runs: Vec<PageRun<'_>> = Vec::new();
        let mut start: Option<(u64, Option<usize>, usize)> = None;
        for &(gpa, at) in &self.entries {
            if let Some((run_gpa, run_at, n)) = start.as_mut() {
                // None past the top of the address space: a peer's addresses may be anything.
                let next_gpa = run_gpa.checked_add(*n as u64 * PAGE_SIZE);
                let continues = match (*run_at, at) {
                    (None, None) => true,
                    (Some(a), Some(b)) => b == a + *n * PAGE,
                    _ => false,
                };
                if next_gpa == Some(gpa) && continues {
                    *n += 1;
                    continue;
                }
                runs.push(self.run(*run_gpa, *run_at, *n));
            }
            start = Some((gpa, at, 1));
        }
        if let Some((gpa, at, n)) = start {
            runs.push(self.run(gpa, at, n));
        }
        runs
    }

    fn run(&self, gpa: u64, at: Option<usize>, pages: usize) -> PageRun<'_> {
        PageRun { gpa, pages, data: at.map(|at| &self.bytes[at..at + pages * PAGE]) }
    }
}

/// What a frame carries: a message of the set `M`, or pages.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame<M> {
    Message(M),
    Pages(PageBatch),
}

/// The frame kind of a message set.
fn kind_of(set: MessageSet) -> u16 {
    match set {
        MessageSet::Greeting => KIND_GREETING,
        MessageSet::Control => KIND_CONTROL,
        MessageSet::Migration => KIND_MIGRATION,
    }
}

/// The message set of a frame kind, and the set whose version a page batch carries.
fn set_of(kind: u16) -> Option<MessageSet> {
    match kind {
        KIND_GREETING => Some(MessageSet::Greeting),
        KIND_CONTROL => Some(MessageSet::Control),
        KIND_MIGRATION | KIND_PAGES => Some(MessageSet::Migration),
        _ => None,
    }
}

/// Builds a page-batch frame directly from guest memory, detecting zero
/// pages, in one buffer (header, data, entries, count) that it keeps: a writer
/// used for batch after batch allocates (and page-faults) only while its
/// buffers grow to a batch's size.
pub struct PageBatchWriter {
    /// The frame: header (filled by [`seal`](Self::seal)), then the data of
    /// every page that is not all zero; sealing appends the entries and count.
    frame: Vec<u8>,
    /// One entry per page so far.
    entries: Vec<u8>,
    count: u32,
    zero: u32,
}

impl Default for PageBatchWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PageBatchWriter {
    pub fn new() -> Self {
        PageBatchWriter { frame: vec![0; HEADER_BYTES], entries: Vec::new(), count: 0, zero: 0 }
    }

    /// Adds the page at `gpa` with contents `page` (4096 bytes).
    pub fn push(&mut self, gpa: u64, page: &[u8]) {
        self.push_with(gpa, |buf| {
            buf.copy_from_slice(page);
            Ok::<_, std::convert::Infallible>(())
        })
        .unwrap_or_else(|never| match never {});
    }

    /// Adds the page at `gpa`, letting `fill` write its 4096 bytes straight
    /// into the frame (one copy from guest memory, no staging buffer).
    pub fn push_with<E>(&mut self, gpa: u64, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<(), E> {
        self.unseal();
        let at = self.frame.len();
        self.frame.resize(at + PAGE, 0);
        if let Err(e) = fill(&mut self.frame[at..]) {
            self.frame.truncate(at);
            return Err(e);
        }
        let zero = is_zero(&self.frame[at..]);
        if zero {
            self.frame.truncate(at);
            self.zero += 1;
        }
        self.entries.extend_from_slice(&gpa.to_le_bytes());
        self.entries.push(if zero { FLAG_ZERO } else { 0 });
        self.count += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn zero_pages(&self) -> u32 {
        self.zero
    }

    /// Bytes of page data so far.
    fn data_bytes(&self) -> usize {
        (self.count - self.zero) as usize * PAGE
    }

    /// Payload bytes so far (to cut batches at a size).
    pub fn payload_bytes(&self) -> usize {
        self.data_bytes() + self.entries.len() + 4
    }

    /// Drops the entries and count a [`seal`](Self::seal) appended (to add pages after it).
    fn unseal(&mut self) {
        self.frame.truncate(HEADER_BYTES + self.data_bytes());
    }

    /// Completes the frame: appends the entries and count and fills in the
    /// header, with a CRC-32C if `crc` (else 0: for a tagged connection).
    fn seal(&mut self, crc: bool) -> &[u8] {
        self.unseal();
        self.frame.extend_from_slice(&self.entries);
        self.frame.extend_from_slice(&self.count.to_le_bytes());
        put_header(&mut self.frame, KIND_PAGES, crc);
        &self.frame
    }

    /// Empties the writer for the next batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.frame.truncate(HEADER_BYTES);
        self.entries.clear();
        self.count = 0;
        self.zero = 0;
    }

    /// The encoded frame (with its CRC-32C); the writer is left empty for reuse.
    pub fn finish(&mut self) -> Vec<u8> {
        let frame = self.seal(true).to_vec();
        self.clear();
        frame
    }
}

/// A page-batch frame whose page data stays where it is (guest memory, while
/// its VM is paused) until the frame is written: its header, the data of
/// every page that is not all zero as slices (one per stretch of such pages
/// consecutive in memory), then its entries and count. The same frame as
/// [`PageBatchWriter`] builds, without copying the pages into it.
pub struct PageBatchParts<'a> {
    header: [u8; HEADER_BYTES],
    data: Vec<&'a [u8]>,
    /// Entries, then (once sealed) the count.
    trailer: Vec<u8>,
    count: u32,
    zero: u32,
    data_bytes: usize,
}

impl Default for PageBatchParts<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> PageBatchParts<'a> {
    pub fn new() -> Self {
        PageBatchParts {
            header: [0; HEADER_BYTES],
            data: Vec::new(),
            trailer: Vec::new(),
            count: 0,
            zero: 0,
            data_bytes: 0,
        }
    }

    /// Adds the pages at `gpa` and after, whose bytes are `pages` (a whole
    /// number of pages, consecutive in guest memory), left where they are:
    /// each stretch of pages that are not all zero is one slice of `pages`.
    pub fn push_run(&mut self, gpa: u64, pages: &'a [u8]) {
        assert!(pages.len().is_multiple_of(PAGE), "a run is whole pages");
        let mut stretch: Option<usize> = None;
        for (i, page) in pages.chunks_exact(PAGE).enumerate() {
            let zero = is_zero(page);
            match (zero, stretch) {
                (true, Some(start)) => {
                    self.data.push(&pages[start * PAGE..i * PAGE]);
                    stretch = None;
                }
                (false, None) => stretch = Some(i),
                _ => {}
            }
            if zero {
                self.zero += 1;
            } else {
                self.data_bytes += PAGE;
            }
            self.trailer.extend_from_slice(&(gpa + (i * PAGE) as u64).to_le_bytes());
            self.trailer.push(if zero { FLAG_ZERO } else { 0 });
            self.count += 1;
        }
        if let Some(start) = stretch {
            self.data.push(&pages[start * PAGE..]);
        }
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn zero_pages(&self) -> u32 {
        self.zero
    }

    /// Completes the frame (appends the count, fills in the header, with a
    /// CRC-32C if `crc`) and returns its pieces in order.
    fn seal(&mut self, crc: bool) -> impl Iterator<Item = &[u8]> + Clone {
        self.trailer.extend_from_slice(&self.count.to_le_bytes());
        let length = self.data_bytes + self.trailer.len();
        let payload = self.data.iter().copied().chain(std::iter::once(&self.trailer[..]));
        put_header_of(&mut self.header, KIND_PAGES, length, crc.then_some(payload));
        std::iter::once(&self.header[..]).chain(self.data.iter().copied()).chain(std::iter::once(&self.trailer[..]))
    }
}

fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&[0; HEADER_BYTES]);
    out.extend_from_slice(payload);
    put_header(&mut out, kind, true);
    out
}

/// Fills in the header of `frame` (its first [`HEADER_BYTES`], then the
/// payload): magic, the kind's version, the payload's length, and its
/// CRC-32C if `crc` (else 0: for a tagged connection).
fn put_header(frame: &mut [u8], kind: u16, crc: bool) {
    let (header, payload) = frame.split_at_mut(HEADER_BYTES);
    let header: &mut [u8; HEADER_BYTES] = header.try_into().expect("HEADER_BYTES");
    put_header_of(header, kind, payload.len(), crc.then_some([&*payload]));
}

/// Fills in `header` for a payload of `length` bytes of `kind`, with the
/// CRC-32C of the payload whose bytes are `crc_over` one after the other
/// (None: 0, for a tagged connection).
fn put_header_of<'a>(
    header: &mut [u8; HEADER_BYTES],
    kind: u16,
    length: usize,
    crc_over: Option<impl IntoIterator<Item = &'a [u8]>>,
) {
    assert!(length <= MAX_PAYLOAD as usize, "frame payload of {length} bytes is over the limit");
    let version = set_of(kind).expect("a kind this codec sends").version();
    header[..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&version.to_le_bytes());
    header[6..8].copy_from_slice(&kind.to_le_bytes());
    header[8..12].copy_from_slice(&(length as u32).to_le_bytes());
    let crc =
        crc_over.map_or(0, |pieces| pieces.into_iter().fold(crc32c::crc32c(&header[..12]), crc32c::crc32c_append));
    header[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes a message (of any set: its frame kind and version are its set's) as one frame.
pub fn encode_message<M: WireMessage>(message: &M) -> Vec<u8> {
    frame(kind_of(message.set()), &message.to_payload())
}

/// Encodes a page batch as one frame.
pub fn encode_pages(batch: &PageBatch) -> Vec<u8> {
    let mut writer = PageBatchWriter::new();
    for (gpa, data) in batch.pages() {
        writer.push(gpa, data.unwrap_or(&[0u8; PAGE]));
    }
    writer.finish()
}

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    kind: u16,
    length: u32,
    crc: u32,
    prefix_crc: u32,
}

impl Header {
    pub fn payload_len(&self) -> usize {
        self.length as usize
    }
}

/// Checks a frame header: magic, kind, the version of the kind's message set, and length.
pub fn decode_header(bytes: &[u8; HEADER_BYTES]) -> Result<Header, ProtocolError> {
    let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    let kind = u16::from_le_bytes([bytes[6], bytes[7]]);
    let Some(set) = set_of(kind) else {
        return Err(ProtocolError::UnknownKind(kind));
    };
    if version != set.version() {
        return Err(ProtocolError::Version { set, peer: version });
    }
    let length = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if length > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(length, MAX_PAYLOAD));
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    Ok(Header { kind, length, crc, prefix_crc: crc32c::crc32c(&bytes[..12]) })
}

/// Checks the payload's checksum and decodes it as a message of `M` or pages
/// (a page batch keeps the payload).
pub fn decode_payload<M: WireMessage>(header: Header, payload: Vec<u8>) -> Result<Frame<M>, ProtocolError> {
    check_crc(&header, &payload)?;
    decode_checked(header, payload, 0)
}

fn check_crc(header: &Header, payload: &[u8]) -> Result<(), ProtocolError> {
    let computed = crc32c::crc32c_append(header.prefix_crc, payload);
    if computed != header.crc {
        return Err(ProtocolError::Checksum { computed, stored: header.crc });
    }
    Ok(())
}

/// Decodes a payload (`bytes[payload_at..]`) whose checksum or tag has been checked.
fn decode_checked<M: WireMessage>(
    header: Header,
    bytes: Vec<u8>,
    payload_at: usize,
) -> Result<Frame<M>, ProtocolError> {
    if header.kind == KIND_PAGES {
        return decode_pages(bytes, payload_at).map(Frame::Pages);
    }
    decode_message(header, &bytes[payload_at..])
}

/// Decodes a checked payload that is not a page batch (as a message of `M`).
fn decode_message<M: WireMessage>(header: Header, payload: &[u8]) -> Result<Frame<M>, ProtocolError> {
    let set = set_of(header.kind).expect("a checked header's kind");
    M::from_payload(set, payload).map(Frame::Message).map_err(|e| match e {
        PayloadError::WrongSet { expected, got } => ProtocolError::WrongSet { expected, got },
        PayloadError::Malformed { set, detail } => ProtocolError::Malformed { what: malformed_what(set), detail },
    })
}

/// What a malformed message of `set` is called in errors.
fn malformed_what(set: MessageSet) -> &'static str {
    match set {
        MessageSet::Greeting => "greeting",
        MessageSet::Control => "control message",
        MessageSet::Migration => "migration message",
    }
}

/// Decodes the page batch in `bytes[payload_at..]` (data, entries, count).
fn decode_pages(bytes: Vec<u8>, payload_at: usize) -> Result<PageBatch, ProtocolError> {
    let malformed = |detail: String| ProtocolError::Malformed { what: "page batch", detail };
    let payload = &bytes[payload_at..];
    let count_at = payload.len().checked_sub(4).ok_or_else(|| malformed("shorter than its count".into()))?;
    let count = u32::from_le_bytes(payload[count_at..].try_into().expect("4 bytes")) as usize;
    let entries_at = count
        .checked_mul(ENTRY_BYTES)
        .and_then(|n| count_at.checked_sub(n))
        .ok_or_else(|| malformed(format!("{count} entries do not fit in {} bytes", payload.len())))?;
    let mut next_data = 0;
    let mut entries = Vec::with_capacity(count);
    for entry in payload[entries_at..count_at].chunks_exact(ENTRY_BYTES) {
        let gpa = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(malformed(format!("page address {gpa:#x} is not page aligned")));
        }
        match entry[8] {
            FLAG_ZERO => entries.push((gpa, None)),
            0 => {
                if next_data + PAGE > entries_at {
                    return Err(malformed(format!("data for page {gpa:#x} is missing")));
                }
                entries.push((gpa, Some(payload_at + next_data)));
                next_data += PAGE;
            }
            flags => return Err(malformed(format!("page {gpa:#x} has unknown flags {flags:#x}"))),
        }
    }
    if next_data != entries_at {
        return Err(malformed(format!("{} bytes of data that no entry names", entries_at - next_data)));
    }
    Ok(PageBatch { entries, bytes, payload_at })
}

/// Whether a frame's CRC-32C is checked: always on a connection without
/// tags, and on greeting frames (read before the keys are known); a tagged
/// frame's tag covers every byte, so its sender need not compute one.
fn crc_checked(header: &Header, tagged: bool) -> bool {
    !tagged || header.kind == KIND_GREETING
}

/// Reads one frame, header and payload, into `frame` (whose buffer is
/// reused) and checks its checksum (see [`crc_checked`]). A clean end of
/// stream before a header is `Closed`; an end inside a frame is `Truncated`.
async fn read_checked<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_payload: u32,
    tagged: bool,
    mut frame: Vec<u8>,
) -> Result<(Header, Vec<u8>), ProtocolError> {
    let mut header_bytes = [0u8; HEADER_BYTES];
    let mut filled = 0;
    while filled < HEADER_BYTES {
        match reader.read(&mut header_bytes[filled..]).await {
            Ok(0) if filled == 0 => return Err(ProtocolError::Closed),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => filled += n,
            Err(e) => return Err(ProtocolError::io(e)),
        }
    }
    let header = decode_header(&header_bytes)?;
    if header.length > max_payload {
        return Err(ProtocolError::TooLarge(header.length, max_payload));
    }
    frame.clear();
    frame.extend_from_slice(&header_bytes);
    read_payload(reader, header.payload_len(), &mut frame).await?;
    if crc_checked(&header, tagged) {
        check_crc(&header, &frame[HEADER_BYTES..])?;
    }
    Ok((header, frame))
}

/// Reads `len` payload bytes onto the end of `frame`, growing it as they
/// arrive: a peer that claims a large frame and sends little costs little.
/// Bytes land in the buffer's spare room, which is never zeroed first.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: usize,
    frame: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    use bytes::BufMut;
    let end = frame.len() + len;
    while frame.len() < end {
        let piece = (end - frame.len()).min(READ_CHUNK);
        frame.reserve(piece);
        match reader.read_buf(&mut (&mut *frame).limit(piece)).await {
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(_) => {}
            Err(e) => return Err(ProtocolError::io(e)),
        }
    }
    Ok(())
}

async fn read_exactly<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> Result<(), ProtocolError> {
    reader.read_exact(buf).await.map(drop).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::io(e),
    })
}

/// The receiving half of a connection: frames in order, each followed by
/// its tag (checked) once the connection is authenticated.
pub struct FrameReader<R = OwnedReadHalf> {
    inner: R,
    mac: Option<FrameMac>,
    /// On an agent's side of a connection: the peer (its greeting's name), refused
    /// and counted when a frame fails its tag (see [`refuse_as_agent`](Self::refuse_as_agent)).
    refusing: Option<String>,
    /// The largest payload a frame may claim now (small until the greeting is done).
    max_payload: u32,
    /// The payload bytes of the last frame read (for flow control).
    last_payload: usize,
    /// Buffers to read the next frames into (see [`recycle`](Self::recycle)).
    spare: Vec<Vec<u8>>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of untagged frames (until [`authenticate`](Self::authenticate)).
    pub fn new(inner: R) -> Self {
        FrameReader { inner, mac: None, refusing: None, max_payload: MAX_PAYLOAD, last_payload: 0, spare: Vec::new() }
    }

    /// A reader for a connection's greeting: frames larger than a greeting
    /// are refused until [`greeted`](Self::greeted) or an authentication.
    pub fn for_greeting(inner: R) -> Self {
        FrameReader {
            inner,
            mac: None,
            refusing: None,
            max_payload: GREETING_MAX_PAYLOAD,
            last_payload: 0,
            spare: Vec::new(),
        }
    }

    /// The greeting is done (without a key): frames up to [`MAX_PAYLOAD`] from now on.
    pub fn greeted(&mut self) {
        self.max_payload = MAX_PAYLOAD;
    }

    /// From now on every frame must carry a tag that `mac` accepts.
    pub fn authenticate(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
        self.max_payload = MAX_PAYLOAD;
    }

    /// This reader is an agent's side of a connection from `peer` (the name in
    /// its greeting): a frame that fails its tag refuses the peer. The refusal
    /// is counted in `pcft_auth_refusals_total` (`wrong-key` for the peer's
    /// first frame, `bad-mac` for a later one) and returned as
    /// [`ProtocolError::Refused`], whose text names the reason and the fix.
    pub fn refuse_as_agent(&mut self, peer: &str) {
        self.refusing = Some(peer.to_string());
    }

    /// The payload bytes of the frame [`read`](Self::read) returned last.
    pub fn last_payload_len(&self) -> usize {
        self.last_payload
    }

    /// Gives a handled batch's buffer back, to read a later frame into: a
    /// reader whose batches come back allocates nothing per frame (it keeps
    /// up to [`SPARE_BUFFERS`]).
    pub fn recycle(&mut self, batch: PageBatch) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(batch.bytes);
        }
    }

    /// The next frame (checked: checksum or tag), a message of `M` or pages.
    pub async fn read<M: WireMessage>(&mut self) -> Result<Frame<M>, ProtocolError> {
        let spare = self.spare.pop().unwrap_or_default();
        let tagged = self.mac.is_some();
        let (header, bytes) = read_checked(&mut self.inner, self.max_payload, tagged, spare).await?;
        self.last_payload = header.payload_len();
        if let Some(mac) = &mut self.mac {
            let mut tag = [0u8; TAG_BYTES];
            read_exactly(&mut self.inner, &mut tag).await?;
            let first = mac.frames() == 0;
            if !mac.verify(&bytes, &tag) {
                return Err(self.unauthenticated(first));
            }
        }
        if header.kind == KIND_PAGES {
            return decode_pages(bytes, HEADER_BYTES).map(Frame::Pages);
        }
        // A message is decoded out of its payload: keep the buffer.
        let frame = decode_message(header, &bytes[HEADER_BYTES..]);
        self.spare.push(bytes);
        frame
    }

    /// The error for a frame that failed its tag (the peer's first, if `first`):
    /// on an agent's side, the peer is refused and the refusal counted.
    fn unauthenticated(&self, first: bool) -> ProtocolError {
        let Some(peer) = &self.refusing else { return ProtocolError::Unauthenticated };
        let reason = if first { TagRefusal::WrongKey } else { TagRefusal::BadMac };
        crate::metrics::get().auth_refused(reason.label());
        ProtocolError::Refused { peer: peer.clone(), reason }
    }

    /// The greeting's answer, read before the connection is authenticated,
    /// with its raw bytes (header and payload) so that its tag can be checked
    /// once the keys are known.
    pub(crate) async fn read_untagged<M: WireMessage>(&mut self) -> Result<(Frame<M>, Vec<u8>), ProtocolError> {
        let (header, bytes) = read_checked(&mut self.inner, self.max_payload, false, Vec::new()).await?;
        let frame = decode_checked(header, bytes.clone(), HEADER_BYTES)?;
        Ok((frame, bytes))
    }

    /// Reads the tag that follows a frame read by [`read_untagged`](Self::read_untagged)
    /// (its bytes: `frame`) and checks it with `mac`, which then checks every later frame.
    pub(crate) async fn verify_greeting(&mut self, mut mac: FrameMac, frame: &[u8]) -> Result<(), ProtocolError> {
        let mut tag = [0u8; TAG_BYTES];
        read_exactly(&mut self.inner, &mut tag).await?;
        if !mac.verify(frame, &tag) {
            return Err(ProtocolError::Unauthenticated);
        }
        self.authenticate(mac);
        Ok(())
    }
}

/// The sending half of a connection: frames, each followed by its tag once
/// the connection is authenticated.
pub struct FrameWriter<W = OwnedWriteHalf> {
    inner: W,
    mac: Option<FrameMac>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner, mac: None }
    }

    /// From now on every frame is followed by its tag from `mac`.
    pub fn authenticate(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    /// The stream the frames went to.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Ends the stream: the peer reads to its end, then `Closed`.
    pub async fn shutdown(&mut self) -> Result<(), ProtocolError> {
        self.inner.shutdown().await.map_err(ProtocolError::io)
    }

    /// Writes one encoded frame (header and payload), and its tag.
    pub async fn write(&mut self, frame: &[u8]) -> Result<(), ProtocolError> {
        let tag = self.mac.as_mut().map(|mac| mac.tag(frame));
        write_all_vectored(&mut self.inner, &mut [IoSlice::new(frame), IoSlice::new(tag.as_ref().map_or(&[], |t| t))])
            .await
    }

    /// Writes the batch in `batch` as one frame (straight from its buffer, in
    /// one vectored write with its tag), empties it and returns the bytes written.
    /// On a tagged connection the frame carries no CRC-32C: the tag covers it.
    pub async fn write_pages(&mut self, batch: &mut PageBatchWriter) -> Result<u64, ProtocolError> {
        let frame = batch.seal(self.mac.is_none());
        let tag = self.mac.as_mut().map(|mac| mac.tag(frame));
        let tag: &[u8] = tag.as_ref().map_or(&[], |t| t);
        let bytes = (frame.len() + tag.len()) as u64;
        write_all_vectored(&mut self.inner, &mut [IoSlice::new(frame), IoSlice::new(tag)]).await?;
        batch.clear();
        Ok(bytes)
    }

    /// Writes the batch in `batch` as one frame straight from where its pages
    /// are (tagged in pieces, then one vectored write) and returns the bytes
    /// written. The pages must not change until this returns (or is dropped):
    /// their tag is taken before they are written.
    pub async fn write_page_parts(&mut self, mut batch: PageBatchParts<'_>) -> Result<u64, ProtocolError> {
        let tag: [u8; TAG_BYTES];
        let pieces = batch.seal(self.mac.is_none());
        let tag: &[u8] = match self.mac.as_mut() {
            Some(mac) => {
                tag = mac.tag_pieces(pieces.clone());
                &tag
            }
            None => &[],
        };
        let mut slices: Vec<IoSlice<'_>> = pieces.map(IoSlice::new).chain(std::iter::once(IoSlice::new(tag))).collect();
        let bytes = slices.iter().map(|s| s.len() as u64).sum();
        write_all_vectored(&mut self.inner, &mut slices).await?;
        Ok(bytes)
    }
}

/// Writes every byte of `parts`, in order, in as few system calls as the socket takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut parts: &mut [IoSlice<'_>],
) -> Result<(), ProtocolError> {
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        // (A socket's write_vectored passes at most IOV_MAX slices itself.)
        match writer.write_vectored(parts).await {
            Ok(0) => return Err(ProtocolError::io(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) => return Err(ProtocolError::io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::ControlMessage;
    use crate::wire::greeting::Greeting;
    use crate::wire::migration::MigrationMessage;

    fn decode(bytes: &[u8]) -> Result<Frame<ControlMessage>, ProtocolError> {
        let header = decode_header(bytes[..HEADER_BYTES].try_into().unwrap())?;
        decode_payload(header, bytes[HEADER_BYTES..].to_vec())
    }

    fn sample_batch() -> PageBatch {
        let mut page = vec![0u8; PAGE];
        page[100] = 7;
        PageBatch::from_pages(vec![(0x1000, PageData::Bytes(page)), (0x5000, PageData::Zero), (0x2000, PageData::Zero)])
    }

    #[test]
    fn messages_and_pages_round_trip() {
        let msg = ControlMessage::Refuse { reason: "no".into() };
        assert_eq!(decode(&encode_message(&msg)), Ok(Frame::Message(msg)));
        let batch = sample_batch();
        let bytes = encode_pages(&batch);
        // Zero pages travel as a flag: one data page, not three.
        assert_eq!(bytes.len(), HEADER_BYTES + 4 + 3 * ENTRY_BYTES + PAGE);
        assert_eq!(decode(&bytes), Ok(Frame::Pages(batch)));
    }

    #[test]
    fn each_set_has_its_kind_and_version_and_a_reader_takes_only_its_own() {
        let greeting = encode_message(&Greeting::Refuse { reason: "no".into() });
        let control = encode_message(&ControlMessage::Ping);
        let migration = encode_message(&MigrationMessage::Go);
        let pages = encode_pages(&sample_batch());
        let kind_version = |b: &[u8]| (u16::from_le_bytes([b[6], b[7]]), u16::from_le_bytes([b[4], b[5]]));
        assert_eq!(kind_version(&greeting), (KIND_GREETING, crate::wire::message_set::GREETING_VERSION));
        assert_eq!(kind_version(&control), (KIND_CONTROL, crate::wire::message_set::CONTROL_VERSION));
        assert_eq!(kind_version(&migration), (KIND_MIGRATION, crate::wire::message_set::MIGRATION_VERSION));
        assert_eq!(kind_version(&pages), (KIND_PAGES, crate::wire::message_set::MIGRATION_VERSION));
        assert_eq!(
            decode(&migration),
            Err(ProtocolError::WrongSet { expected: MessageSet::Control, got: MessageSet::Migration })
        );
        let header = decode_header(migration[..HEADER_BYTES].try_into().unwrap()).unwrap();
        let frame = decode_payload::<MigrationMessage>(header, migration[HEADER_BYTES..].to_vec());
        assert_eq!(frame, Ok(Frame::Message(MigrationMessage::Go)));
        // Pages go with any set's reader (the control connection refuses them itself).
        assert!(matches!(decode(&pages), Ok(Frame::Pages(_))));
        // Another migration version leaves the control set alone.
        let mut newer = migration.clone();
        newer[4] = newer[4].wrapping_add(1);
        let header = decode_header(newer[..HEADER_BYTES].try_into().unwrap());
        assert!(matches!(header, Err(ProtocolError::Version { set: MessageSet::Migration, .. })));
    }

    #[test]
    fn runs_group_consecutive_pages_of_one_kind() {
        let data = |b: u8| PageData::Bytes(vec![b; PAGE]);
        let batch = PageBatch::from_pages(vec![
            (0x1000, data(1)),
            (0x2000, data(2)),
            (0x3000, PageData::Zero),
            (0x4000, PageData::Zero),
            (0x5000, data(3)),
            (0x7000, data(4)),
        ]);
        let decoded = match decode(&encode_pages(&batch)).unwrap() {
            Frame::Pages(b) => b,
            other => panic!("{other:?}"),
        };
        let runs: Vec<(u64, usize, Option<u8>)> =
            decoded.runs().iter().map(|r| (r.gpa, r.pages, r.data.map(|d| d[d.len() - 1]))).collect();
        // The last byte of a run is its last page's fill byte: 2 for the first run.
        assert_eq!(runs[0], (0x1000, 2, Some(2)));
        assert_eq!(runs[1], (0x3000, 2, None));
        assert_eq!((runs[2].0, runs[2].1), (0x5000, 1));
        assert_eq!((runs[3].0, runs[3].1), (0x7000, 1), "a gap ends a run");
        assert_eq!(runs.len(), 4);
        assert_eq!(decoded.runs()[0].data.unwrap().len(), 2 * PAGE);
    }

    #[test]
    fn a_run_splits_into_pieces_of_its_pages_in_order() {
        let data: Vec<u8> = (0..5 * PAGE).map(|i| (i / PAGE) as u8).collect();
        let run = PageRun { gpa: 0x10000, pages: 5, data: Some(&data) };
        let pieces: Vec<(u64, usize, u8)> = run.pieces(2).map(|p| (p.gpa, p.pages, p.data.unwrap()[0])).collect();
        assert_eq!(pieces, [(0x10000, 2, 0), (0x12000, 2, 2), (0x14000, 1, 4)]);
        assert!(run.pieces(2).all(|p| p.data.unwrap().len() == p.pages * PAGE));
        let zero = PageRun { gpa: 0, pages: 3, data: None };
        assert_eq!(zero.pieces(8).count(), 1);
    }

    #[test]
    fn runs_never_wrap_past_the_top_of_the_address_space() {
        let top = !(PAGE_SIZE - 1); // the last page below 2^64
        let batch = PageBatch::from_pages(vec![(top, PageData::Zero), (0, PageData::Zero)]);
        let runs: Vec<(u64, usize)> = batch.runs().iter().map(|r| (r.gpa, r.pages)).collect();
        assert_eq!(runs, vec![(top, 1), (0, 1)]);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = encode_pages(&sample_batch());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn refuses_garbage_other_versions_and_huge_lengths() {
        let mut bytes = encode_message(&ControlMessage::Ping);
        assert!(matches!(decode(b"GET / HTTP/1.1\r\n\r\n"), Err(ProtocolError::BadMagic(_))));
        bytes[4] = 99;
        let other = decode(&bytes);
        assert_eq!(other, Err(ProtocolError::Version { set: MessageSet::Control, peer: 99 }));
        let text = other.unwrap_err().to_string();
        assert!(text.contains("control protocol version 99") && text.contains("run the same pcft"), "{text}");
        let mut huge = encode_message(&ControlMessage::Ping);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), Err(ProtocolError::TooLarge(u32::MAX, MAX_PAYLOAD)));
    }

    #[test]
    fn malformed_batches_are_refused_not_trusted() {
        // A payload of data pages, then entries, then the count.
        let payload = |data_pages: usize, entries: &[(u64, u8)], count: u32| {
            let mut payload = vec![7u8; data_pages * PAGE];
            for &(gpa, flags) in entries {
                payload.extend_from_slice(&gpa.to_le_bytes());
                payload.push(flags);
            }
            payload.extend_from_slice(&count.to_le_bytes());
            payload
        };
        let refused = |payload: Vec<u8>| match decode(&frame(KIND_PAGES, &payload)) {
            Err(ProtocolError::Malformed { detail, .. }) => detail,
            other => panic!("accepted {other:?}"),
        };
        assert_eq!(refused(vec![1, 2, 3]), "shorter than its count");
        assert_eq!(refused(payload(0, &[], 1_000_000)), "1000000 entries do not fit in 4 bytes");
        assert_eq!(refused(payload(0, &[(0x1000, 0)], 1)), "data for page 0x1000 is missing");
        assert_eq!(refused(payload(0, &[(0x1001, FLAG_ZERO)], 1)), "page address 0x1001 is not page aligned");
        assert_eq!(refused(payload(0, &[(0x1000, 2)], 1)), "page 0x1000 has unknown flags 0x2");
        assert_eq!(refused(payload(2, &[(0x1000, 0)], 1)), "4096 bytes of data that no entry names");
        // And the well-formed one: two data pages and a zero page.
        let good = payload(2, &[(0x1000, 0), (0x3000, FLAG_ZERO), (0x2000, 0)], 3);
        let Ok(Frame::Pages(batch)) = decode(&frame(KIND_PAGES, &good)) else { panic!("refused") };
        let pages: Vec<(u64, bool)> = batch.pages().map(|(gpa, data)| (gpa, data.is_some())).collect();
        assert_eq!(pages, [(0x1000, true), (0x3000, false), (0x2000, true)]);
    }

    fn session_macs() -> (FrameMac, FrameMac) {
        let key = crate::wire::auth::Psk::from_bytes(&[9; 32]).unwrap();
        let (client, server) = ([1; 16], [2; 16]);
        (key.session(true, &client, &server).send, key.session(false, &client, &server).recv)
    }

    fn filled_batch(writer: &mut PageBatchWriter, first: u64, fill: u8) {
        for i in 0..3u64 {
            let page = vec![fill.wrapping_add(i as u8) | 1; PAGE];
            writer.push((first + i) * PAGE_SIZE, &page);
        }
        writer.push((first + 3) * PAGE_SIZE, &[0; PAGE]);
    }

    /// Pages sent where they are (post-copy's push) make the very bytes the
    /// copying writer makes, tags included: zero pages inside and at the ends
    /// of runs, runs that are not consecutive, one page alone.
    #[tokio::test]
    async fn pages_written_in_place_are_the_frames_the_copying_writer_writes() {
        let (send, recv) = session_macs();
        // Guest memory of 12 pages: page i holds i+1, except the zero pages 2, 5, 6, 11.
        let memory: Vec<u8> =
            (0..12u8).flat_map(|i| [if [2, 5, 6, 11].contains(&i) { 0 } else { i + 1 }; PAGE]).collect();
        let page = |i: u64| &memory[i as usize * PAGE..(i as usize + 1) * PAGE];
        let layouts: [&[(u64, usize)]; 4] =
            [&[(0, 12)], &[(1, 3), (7, 1), (9, 3)], &[(5, 2)], &[(4, 1), (0, 1), (10, 2), (3, 1)]];
        for tagged in [false, true] {
            let (mut in_place, mut copied) = (FrameWriter::new(Vec::new()), FrameWriter::new(Vec::new()));
            if tagged {
                in_place.authenticate(send.clone());
                copied.authenticate(send.clone());
            }
            for runs in layouts {
                let mut parts = PageBatchParts::new();
                let mut copy = PageBatchWriter::new();
                for &(first, pages) in runs {
                    parts.push_run(first * PAGE_SIZE, &memory[first as usize * PAGE..(first as usize + pages) * PAGE]);
                    for i in first..first + pages as u64 {
                        copy.push(i * PAGE_SIZE, page(i));
                    }
                }
                assert_eq!((parts.len(), parts.zero_pages()), (copy.len(), copy.zero_pages()));
                let sent = in_place.write_page_parts(parts).await.unwrap();
                assert_eq!(sent, copied.write_pages(&mut copy).await.unwrap());
            }
            let stream = in_place.into_inner();
            assert_eq!(stream, copied.into_inner(), "tagged {tagged}: the same bytes on the wire");
            // And the reader takes them: every page where it was.
            let mut input = &stream[..];
            let mut reader = FrameReader::new(&mut input);
            if tagged {
                reader.authenticate(recv.clone());
            }
            for runs in layouts {
                let Ok(Frame::Pages(got)) = reader.read::<MigrationMessage>().await else { panic!("a batch") };
                let want = runs.iter().flat_map(|&(first, pages)| first..first + pages as u64);
                assert!(got.pages().map(|(gpa, _)| gpa / PAGE_SIZE).eq(want));
                for (gpa, data) in got.pages() {
                    assert_eq!(data.unwrap_or(&[0; PAGE]), page(gpa / PAGE_SIZE));
                }
            }
            assert_eq!(reader.read::<MigrationMessage>().await, Err(ProtocolError::Closed));
        }
    }

    /// A frame of more pieces than one writev takes (Linux's IOV_MAX, 1024)
    /// goes out whole over a real socket.
    #[tokio::test]
    async fn a_frame_of_more_pieces_than_a_writev_takes_goes_out_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // 2,100 pages, every other one zero: 1,050 data slices.
        let memory: Vec<u8> =
            (0..2100u32).flat_map(|i| [if i % 2 == 0 { 0 } else { (i % 251) as u8 | 1 }; PAGE]).collect();
        let mut parts = PageBatchParts::new();
        parts.push_run(0, &memory);
        let mut writer = FrameWriter::new(client.into_split().1);
        let reading = tokio::spawn(async move {
            let mut reader = FrameReader::new(server.into_split().0);
            reader.read::<MigrationMessage>().await
        });
        writer.write_page_parts(parts).await.unwrap();
        let Ok(Frame::Pages(got)) = reading.await.unwrap() else { panic!("a batch") };
        assert_eq!(got.len(), 2100);
        for (gpa, data) in got.pages() {
            let at = gpa as usize;
            assert_eq!(data.unwrap_or(&[0; PAGE]), &memory[at..at + PAGE], "page {gpa:#x}");
        }
    }

    #[tokio::test]
    async fn the_page_path_writes_batches_from_reused_buffers_and_tagged_ones_without_a_crc() {
        let (send, recv) = session_macs();
        for tagged in [false, true] {
            let mut writer = FrameWriter::new(Vec::new());
            if tagged {
                writer.authenticate(send.clone());
            }
            let mut batch = PageBatchWriter::new();
            let mut expected = Vec::new();
            for round in 0..3u8 {
                filled_batch(&mut batch, u64::from(round) * 8, round * 40);
                // The same pages through the allocating encoder, decoded: what the reader must see.
                let mut copy = PageBatchWriter::new();
                filled_batch(&mut copy, u64::from(round) * 8, round * 40);
                let Ok(Frame::Pages(want)) = decode(&copy.finish()) else { panic!("a batch") };
                expected.push(want);
                let bytes = writer.write_pages(&mut batch).await.unwrap();
                assert!(batch.is_empty(), "written batches are emptied for the next one");
                assert_eq!(
                    bytes,
                    (HEADER_BYTES + 4 + 4 * ENTRY_BYTES + 3 * PAGE + if tagged { TAG_BYTES } else { 0 }) as u64
                );
            }
            let stream = writer.into_inner();
            // A tagged frame leaves its CRC field 0: the tag covers every byte.
            let crc = u32::from_le_bytes(stream[12..16].try_into().unwrap());
            assert_eq!(crc == 0, tagged, "tagged {tagged}: crc {crc:#x}");
            let mut input = &stream[..];
            let mut reader = FrameReader::new(&mut input);
            if tagged {
                reader.authenticate(recv.clone());
            }
            let mut buffers = Vec::new();
            for want in &expected {
                let Ok(Frame::Pages(got)) = reader.read::<MigrationMessage>().await else { panic!("a batch") };
                assert_eq!(&got, want);
                buffers.push(got.bytes.as_ptr());
                reader.recycle(got);
            }
            assert_eq!(reader.read::<MigrationMessage>().await, Err(ProtocolError::Closed));
            // Read into the first frame's buffer again and again: no allocation per frame.
            assert!(buffers.windows(2).all(|w| w[0] == w[1]), "a recycled buffer was not reused");
            if tagged {
                // Every byte is under the tag, the zero CRC field included.
                for at in (0..stream.len()).step_by(97).chain(12..16) {
                    let mut bad = stream.clone();
                    bad[at] ^= 0x10;
                    let mut input = &bad[..];
                    let mut reader = FrameReader::new(&mut input);
                    reader.authenticate(recv.clone());
                    let mut outcome = Ok(());
                    for _ in 0..3 {
                        if let Err(e) = reader.read::<MigrationMessage>().await {
                            outcome = Err(e);
                            break;
                        }
                    }
                    assert!(outcome.is_err(), "flip at byte {at} went unnoticed");
                }
            }
        }
    }

    #[tokio::test]
    async fn an_untagged_reader_still_checks_the_crc_and_a_tagged_one_the_greetings() {
        // Without a tag, a zero CRC is corruption.
        let mut batch = PageBatchWriter::new();
        filled_batch(&mut batch, 0, 1);
        let mut frame = batch.finish();
        frame[12..16].copy_from_slice(&[0; 4]);
        let mut input = &frame[..];
        assert!(matches!(
            FrameReader::new(&mut input).read::<MigrationMessage>().await,
            Err(ProtocolError::Checksum { .. })
        ));
        // A greeting frame is read before the keys are known: its CRC is checked even on a tagged reader.
        let (mut send, recv) = session_macs();
        let mut greeting = encode_message(&Greeting::Refuse { reason: "no".into() });
        greeting[12] ^= 1;
        let tag = send.tag(&greeting);
        let stream = [greeting, tag.to_vec()].concat();
        let mut input = &stream[..];
        let mut reader = FrameReader::new(&mut input);
        reader.authenticate(recv);
        assert!(matches!(reader.read::<Greeting>().await, Err(ProtocolError::Checksum { .. })));
    }

    #[tokio::test]
    async fn stream_ends_are_closed_or_truncated() {
        let bytes = encode_message(&ControlMessage::Ping);
        let mut empty: &[u8] = &[];
        assert_eq!(FrameReader::new(&mut empty).read::<ControlMessage>().await, Err(ProtocolError::Closed));
        for cut in [3, HEADER_BYTES, bytes.len() - 1] {
            let mut short = &bytes[..cut];
            assert_eq!(
                FrameReader::new(&mut short).read::<ControlMessage>().await,
                Err(ProtocolError::Truncated),
                "cut at {cut}"
            );
        }
        let mut whole = &bytes[..];
        assert_eq!(
            FrameReader::new(&mut whole).read::<ControlMessage>().await,
            Ok(Frame::Message(ControlMessage::Ping))
        );
    }

    #[tokio::test]
    async fn a_length_field_is_only_a_claim() {
        // A header that claims the largest frame, followed by a few bytes: truncated, not an allocation of 32 MiB.
        let mut claim = encode_message(&ControlMessage::Ping);
        claim[8..12].copy_from_slice(&MAX_PAYLOAD.to_le_bytes());
        let mut short = &claim[..];
        assert_eq!(FrameReader::new(&mut short).read::<ControlMessage>().await, Err(ProtocolError::Truncated));
        // Before the greeting is done, a frame may not claim more than a greeting needs.
        let big = frame(KIND_PAGES, &vec![0u8; GREETING_MAX_PAYLOAD as usize + 1]);
        let mut stream = &big[..];
        assert_eq!(
            FrameReader::for_greeting(&mut stream).read::<ControlMessage>().await,
            Err(ProtocolError::TooLarge(GREETING_MAX_PAYLOAD + 1, GREETING_MAX_PAYLOAD))
        );
        let mut stream = &big[..];
        let mut reader = FrameReader::for_greeting(&mut stream);
        reader.greeted();
        assert!(
            matches!(reader.read::<ControlMessage>().await, Err(ProtocolError::Malformed { .. })),
            "read whole once greeted"
        );
    }
}
