//! Property checks for fuzzing the wire protocol and the checkpoint store,
//! shared by the bounded in-tree harness (`agent/tests/fuzz_protocol.rs`, part
//! of `cargo test -p pcft-agent`) and the cargo-fuzz targets in `fuzz/`
//! (`cargo xtask fuzz`). Built with the `fuzzing` feature only (the tests turn
//! it on). Every check panics when a property fails, and only then.
//!
//! Frames ([`fuzz_frame`]):
//! - the codec and a [`FrameReader`] (with and without a [`FrameMac`]) never
//!   panic on any bytes, and a reader reaches the end of any stream;
//! - `decode_header` accepts exactly the headers whose fields are sound, and
//!   refuses every length over [`MAX_PAYLOAD`] (so no payload is allocated for it);
//! - whatever decodes is well formed (aligned pages of 4096 bytes, runs that
//!   cover the batch in order) and encodes and decodes to itself;
//! - with a MAC, the frames a reader accepts from a mutated stream are frames
//!   that were sent, at their place: never a mutated one.
//!
//! Checkpoints ([`fuzz_checkpoint`]): a [`CheckpointStore`] beside a shadow
//! model ([`StoreModel`]: a plain image, the staged pages, the committed epoch
//! and state). Guest memory and the committed epoch change only at a commit
//! that succeeds, and then exactly as the model says (the staged pages applied
//! in order); a commit refused (wrong epoch, wrong page count, a state that does
//! not decode or is of another machine) changes neither, and keeps the staged
//! pages staged, as the store does; a batch with a page outside memory is
//! refused whole. With a MAC, a mutated checkpoint stream leaves the store at
//! one of the epochs that were sent, with that epoch's memory and state: a
//! corrupted checkpoint never becomes current.

use crate::migration::ft::store::{CheckpointError, CheckpointStore};
use crate::vmm::devices::DeviceState;
use crate::vmm::kvm::state::VmKernelState;
use crate::vmm::machine::{MachineConfig, MachineState};
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::wire::auth::{FrameMac, Psk, NONCE_BYTES};
use crate::wire::control::ControlMessage;
use crate::wire::frame::{
    decode_header, decode_payload, encode_message, encode_pages, Frame, FrameReader, FrameWriter, PageBatch,
    PageBatchParts, PageBatchWriter, PageData, ProtocolError, HEADER_BYTES, MAGIC, MAX_PAYLOAD,
};
use crate::wire::greeting::{Greeting, Role, DEMAND_TOKEN_BYTES};
use crate::wire::message_set::{
    MessageSet, PayloadError, WireMessage, CONTROL_VERSION, GREETING_VERSION, MIGRATION_VERSION,
};
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{MigrationOptions, Mode};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use vm_fixtures::{FixtureKind, FixtureParams, OutputRecord};

const PAGE: usize = PAGE_SIZE as usize;
/// Guest memory of the checkpoint store under test.
pub const MEM_PAGES: u64 = 16;
pub const MEM_BYTES: u64 = MEM_PAGES * PAGE_SIZE;
/// The pre-shared key of fuzzed connections (the corpus's tagged streams use it).
pub const KEY: [u8; 32] = *b"pcft fuzzing key, not a secret!!";
/// Frame kinds and their versions (docs/protocol.md): 1 the greeting, 2 a
/// page batch, 3 a control message, 4 a migration message.
const KINDS: [(u16, u16); 4] =
    [(1, GREETING_VERSION), (2, MIGRATION_VERSION), (3, CONTROL_VERSION), (4, MIGRATION_VERSION)];
/// Mutations never grow an input past this.
const MAX_INPUT: usize = 1 << 20;

/// Where the choices of a generator come from: a seeded PRNG ([`Rng`]), or
/// the fuzzer's input ([`Tape`]).
pub trait Source {
    /// A value of `bytes` (1 to 8) bytes.
    fn bits(&mut self, bytes: usize) -> u64;

    fn next_u64(&mut self) -> u64 {
        self.bits(8)
    }

    fn byte(&mut self) -> u8 {
        self.bits(1) as u8
    }

    /// A value below `n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        let bytes = (64 - (n - 1).leading_zeros() as usize).div_ceil(8);
        self.bits(bytes) % n
    }

    /// An index into something `len` long, or 0 for nothing.
    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// splitmix64: small, seeded, the same on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
}

impl Source for Rng {
    fn bits(&mut self, bytes: usize) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        match bytes {
            8.. => z,
            n => z & ((1u64 << (8 * n)) - 1),
        }
    }
}

/// A fuzzer's input read as a sequence of choices (zeros once it runs out,
/// which every generator here takes as its smallest choice, so all end).
pub struct Tape<'a> {
    data: &'a [u8],
}

impl<'a> Tape<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Tape { data }
    }
}

impl Source for Tape<'_> {
    fn bits(&mut self, bytes: usize) -> u64 {
        let n = bytes.clamp(1, 8).min(self.data.len());
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        taken.iter().rev().fold(0u64, |acc, &b| acc << 8 | u64::from(b))
    }
}

/// Runs a future that never waits (a reader over bytes in memory) to its end.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a frame reader over bytes in memory waited"),
    }
}

// ---- generators ------------------------------------------------------------

/// The machine of every fuzzed checkpoint.
pub fn machine_config() -> MachineConfig {
    MachineConfig {
        mem_bytes: MEM_BYTES,
        slot_bytes: 2 << 20,
        fixture: FixtureParams::new(FixtureKind::Ledger, 1, 8),
        dirty_rate: None,
        net: None,
    }
}

/// A machine state of `config` (no vCPUs: the store never looks at them) with a few output records.
pub fn sample_state(src: &mut impl Source, config: MachineConfig) -> MachineState {
    let mut devices = DeviceState::new(1);
    for step in 0..src.below(4) {
        devices.output_log.push(OutputRecord { vcpu: 0, step, digest: src.next_u64() });
    }
    MachineState { config, vcpus: Vec::new(), kernel: VmKernelState { irqchips: Vec::new(), clock: None }, devices }
}

/// A page-aligned address: mostly inside the store's memory, sometimes just
/// past its end or where an end wraps past `u64::MAX`.
fn page_address(src: &mut impl Source, in_range: bool) -> u64 {
    match if in_range { 2 } else { src.below(12) } {
        0 => (MEM_PAGES + src.below(3)) * PAGE_SIZE,
        // The last pages below 2^64.
        1 => !(PAGE_SIZE - 1) - src.below(2) * PAGE_SIZE,
        _ => src.below(MEM_PAGES) * PAGE_SIZE,
    }
}

fn page_data(src: &mut impl Source) -> PageData {
    if src.one_in(3) {
        return PageData::Zero;
    }
    let mut page = vec![src.byte(); PAGE];
    let at = src.index(PAGE);
    page[at] = src.byte();
    PageData::Bytes(page)
}

/// A batch of up to 6 pages; `in_range`: all inside the store's memory. Runs
/// of consecutive addresses are likely, so that batches have runs to merge.
pub fn sample_batch(src: &mut impl Source, in_range: bool) -> PageBatch {
    let mut pages = Vec::new();
    let mut gpa = page_address(src, in_range);
    for _ in 0..src.below(7) {
        pages.push((gpa, page_data(src)));
        gpa = match src.below(3) {
            0 => page_address(src, in_range),
            _ if in_range => (gpa + PAGE_SIZE) % MEM_BYTES,
            // The next page, wrapping past the top as a peer's addresses may.
            _ => gpa.wrapping_add(PAGE_SIZE),
        };
    }
    PageBatch::from_pages(pages)
}

fn sample_text(src: &mut impl Source) -> String {
    (0..src.below(12)).map(|_| char::from(b'a' + src.below(26) as u8)).collect()
}

fn sample_gpas(src: &mut impl Source) -> Vec<u64> {
    (0..src.below(5)).map(|_| page_address(src, false)).collect()
}

/// A message of any set: the fuzzer's streams mix them, and its reader takes them all.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyMessage {
    Greeting(Greeting),
    Control(ControlMessage),
    Migration(MigrationMessage),
}

impl WireMessage for AnyMessage {
    fn set(&self) -> MessageSet {
        match self {
            AnyMessage::Greeting(m) => m.set(),
            AnyMessage::Control(m) => m.set(),
            AnyMessage::Migration(m) => m.set(),
        }
    }

    fn to_payload(&self) -> Vec<u8> {
        match self {
            AnyMessage::Greeting(m) => m.to_payload(),
            AnyMessage::Control(m) => m.to_payload(),
            AnyMessage::Migration(m) => m.to_payload(),
        }
    }

    fn from_payload(set: MessageSet, payload: &[u8]) -> Result<Self, PayloadError> {
        match set {
            MessageSet::Greeting => Greeting::from_payload(set, payload).map(AnyMessage::Greeting),
            MessageSet::Control => ControlMessage::from_payload(set, payload).map(AnyMessage::Control),
            MessageSet::Migration => MigrationMessage::from_payload(set, payload).map(AnyMessage::Migration),
        }
    }
}

/// One of the protocol's messages (of any set), with small sampled fields.
pub fn sample_message(src: &mut impl Source) -> AnyMessage {
    use AnyMessage::{Control, Greeting as Greet, Migration};
    match src.below(19) {
        0 => Control(ControlMessage::Ping),
        1 => Control(ControlMessage::Pong),
        2 => Greet(Greeting::Refuse { reason: sample_text(src) }),
        3 => Migration(MigrationMessage::PageRequest { gpas: sample_gpas(src) }),
        4 => Migration(MigrationMessage::CheckpointCommit {
            epoch: src.below(4),
            pages: src.below(8),
            state: sample_state(src, machine_config()).to_bytes(),
        }),
        5 => Migration(MigrationMessage::CheckpointAck { epoch: src.below(4) }),
        6 => Migration(MigrationMessage::Heartbeat { seq: src.next_u64(), released: src.next_u64() }),
        7 => Migration(MigrationMessage::HeartbeatAck { seq: src.next_u64() }),
        8 => Greet(Greeting::Hello {
            role: match src.below(3) {
                0 => Role::Control,
                1 => Role::Migration,
                _ => Role::DemandChannel { token: [src.byte(); DEMAND_TOKEN_BYTES] },
            },
            agent: sample_text(src),
            nonce: src.one_in(2).then(|| [src.byte(); NONCE_BYTES]),
        }),
        9 => Migration(MigrationMessage::Switchover {
            state: sample_state(src, machine_config()).to_bytes(),
            stale: sample_gpas(src),
        }),
        10 => Migration(MigrationMessage::Begin {
            name: sample_text(src),
            config: Box::new(machine_config()),
            mode: Mode::PostcopyFt,
            options: MigrationOptions::default(),
            demand_token: src.one_in(2).then(|| [src.byte(); DEMAND_TOKEN_BYTES]),
        }),
        11 => Migration(MigrationMessage::AllSent {
            pages: src.next_u64(),
            demand_pages: src.one_in(2).then(|| src.next_u64()),
        }),
        12 => Migration(MigrationMessage::Discard { gpas: sample_gpas(src) }),
        13 => Migration(MigrationMessage::Finish),
        14 => Control(ControlMessage::Status),
        15 => Migration(MigrationMessage::Finished),
        16 => Migration(MigrationMessage::CheckpointCredit { bytes: src.next_u64() }),
        17 => Control(ControlMessage::RunLog { name: sample_text(src) }),
        _ => Migration(MigrationMessage::Abort { reason: sample_text(src), paused: src.one_in(2) }),
    }
}

/// 1 to `max` encoded frames, messages and page batches.
pub fn sample_frames(src: &mut impl Source, max: u64) -> Vec<Vec<u8>> {
    (0..1 + src.below(max))
        .map(|_| match src.one_in(2) {
            true => encode_pages(&sample_batch(src, false)),
            false => encode_message(&sample_message(src)),
        })
        .collect()
}

/// The two ends of a fuzzed authenticated connection (the sender's and the
/// receiver's MAC), whose greeting nonces come from `context`. A check whose
/// stream derives from the fuzzer's input uses the input as its context: as a
/// frame of one connection never verifies on another, a tagged frame the
/// fuzzer learned from an earlier input never verifies here (the corpus's
/// tagged stream uses the empty context).
pub fn macs(context: &[u8]) -> (FrameMac, FrameMac) {
    let psk = Psk::from_bytes(&KEY).expect("a 32-byte key");
    let digest = blake3::hash(context);
    let (client, server) = digest.as_bytes().split_at(NONCE_BYTES);
    let client: [u8; NONCE_BYTES] = client.try_into().expect("16 bytes");
    let server: [u8; NONCE_BYTES] = server.try_into().expect("16 bytes");
    (psk.session(true, &client, &server).send, psk.session(false, &client, &server).recv)
}

/// `frames` as a [`FrameWriter`] with [`macs`]`(context)` writes them: each
/// frame, then its tag (a page batch as the page path sends it, with no CRC:
/// every other one copied into the frame, the others left in place and
/// tagged in pieces, as post-copy sends them).
pub fn tag_stream(context: &[u8], frames: &[Vec<u8>]) -> Vec<u8> {
    let (mac, _) = macs(context);
    let mut writer = FrameWriter::new(Vec::new());
    writer.authenticate(mac);
    let mut batch = PageBatchWriter::new();
    let mut in_place = false;
    for frame in frames {
        match decode_frame(frame) {
            Ok(Frame::Pages(pages)) if in_place => {
                let data: Vec<Vec<u8>> = pages.pages().map(|(_, d)| d.unwrap_or(&[0; PAGE]).to_vec()).collect();
                let mut parts = PageBatchParts::new();
                for ((gpa, _), page) in pages.pages().zip(&data) {
                    parts.push_run(gpa, page);
                }
                block_on(writer.write_page_parts(parts)).expect("writing to memory");
                in_place = false;
            }
            Ok(Frame::Pages(pages)) => {
                for (gpa, data) in pages.pages() {
                    batch.push(gpa, data.unwrap_or(&[0; PAGE]));
                }
                block_on(writer.write_pages(&mut batch)).expect("writing to memory");
                in_place = true;
            }
            _ => block_on(writer.write(frame)).expect("writing to memory"),
        }
    }
    writer.into_inner()
}

// ---- mutations -------------------------------------------------------------

/// Where frames seem to start in `bytes` (at the magic), or 0.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let starts: Vec<usize> =
        bytes.windows(MAGIC.len()).enumerate().filter(|(_, w)| *w == MAGIC).map(|(i, _)| i).collect();
    if starts.is_empty() {
        vec![0]
    } else {
        starts
    }
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    if let Some(field) = bytes.get_mut(at..at + 4) {
        field.copy_from_slice(&value.to_le_bytes());
    }
}

fn get_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Makes the CRC of the frame at `at` match its payload (as much of it as
/// there is), so that a mutated payload gets past the checksum to the decoder.
fn fix_crc(bytes: &mut [u8], at: usize) {
    let Some(length) = get_u32(bytes, at + 8) else { return };
    let start = at + HEADER_BYTES;
    if start > bytes.len() {
        return;
    }
    let end = start.saturating_add(length as usize).min(bytes.len());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[at..at + 12]), &bytes[start..end]);
    put_u32(bytes, at + 12, crc);
}

/// A value a length or count field is likely to go wrong at.
fn interesting_u32(src: &mut impl Source, current: u32) -> u32 {
    match src.below(12) {
        0 => 0,
        1 => 1,
        2 => current.wrapping_sub(1),
        3 => current.wrapping_add(1),
        4 => current.wrapping_add(9),
        5 => current.wrapping_add(PAGE as u32),
        6 => MAX_PAYLOAD,
        7 => MAX_PAYLOAD + 1,
        8 => u32::MAX,
        9 => u32::MAX / 9 + 1,
        10 => MAX_PAYLOAD + 1 + src.bits(4) as u32 % (u32::MAX - MAX_PAYLOAD),
        _ => src.bits(4) as u32,
    }
}

/// One mutation of `bytes`: a bit flip, a byte set, a truncation, a cut, an
/// insertion, an edit of a length or batch-count field (its CRC fixed or
/// not), a splice from `donor`, a fixed CRC, or a repeated frame.
pub fn mutate(src: &mut impl Source, bytes: &mut Vec<u8>, donor: &[u8]) {
    let len = bytes.len();
    match src.below(10) {
        0 if len > 0 => {
            let at = src.index(len);
            bytes[at] ^= 1 << src.below(8);
        }
        1 if len > 0 => {
            let at = src.index(len);
            bytes[at] = [0, 1, 0x7f, 0x80, 0xff, src.byte()][src.index(6)];
        }
        2 => bytes.truncate(src.index(len + 1)),
        3 if len > 0 => {
            let start = src.index(len);
            let end = start + 1 + src.index((len - start).min(64));
            bytes.drain(start..end);
        }
        4 => {
            let at = src.index(len + 1);
            let insert: Vec<u8> = match len > 0 && src.one_in(2) {
                true => {
                    let from = src.index(len);
                    bytes[from..len.min(from + 1 + src.index(32))].to_vec()
                }
                false => (0..1 + src.below(32)).map(|_| src.byte()).collect(),
            };
            bytes.splice(at..at, insert);
        }
        5 | 6 => {
            let starts = frame_starts(bytes);
            let frame = starts[src.index(starts.len())];
            // The header's length, or a page batch's count (right after the header).
            let field = frame + if src.below(10) < 5 { 8 } else { HEADER_BYTES };
            if let Some(current) = get_u32(bytes, field) {
                put_u32(bytes, field, interesting_u32(src, current));
                if src.one_in(2) {
                    fix_crc(bytes, frame);
                }
            }
        }
        7 if !donor.is_empty() => {
            let from = src.index(donor.len());
            let piece = &donor[from..donor.len().min(from + 1 + src.index(256))];
            let at = src.index(len + 1);
            let end = at + src.index((len - at).min(256) + 1);
            bytes.splice(at..end, piece.iter().copied());
        }
        8 => {
            let starts = frame_starts(bytes);
            fix_crc(bytes, starts[src.index(starts.len())]);
        }
        _ => {
            let starts = frame_starts(bytes);
            let i = src.index(starts.len());
            let (start, end) = (starts[i], starts.get(i + 1).copied().unwrap_or(len));
            if start < end {
                let frame = bytes[start..end].to_vec();
                let at = starts[src.index(starts.len())].min(len);
                bytes.splice(at..at, frame);
            }
        }
    }
    bytes.truncate(MAX_INPUT);
}

// ---- frame properties ------------------------------------------------------

/// A decoded frame encoded again (canonical: how an agent sends it).
pub fn encode_frame(frame: &Frame<AnyMessage>) -> Vec<u8> {
    match frame {
        Frame::Message(message) => encode_message(message),
        Frame::Pages(batch) => encode_pages(batch),
    }
}

fn decode_frame(bytes: &[u8]) -> Result<Frame<AnyMessage>, ProtocolError> {
    let header = bytes.first_chunk::<HEADER_BYTES>().ok_or(ProtocolError::Truncated)?;
    decode_payload(decode_header(header)?, bytes[HEADER_BYTES..].to_vec())
}

/// A decoded batch is well formed and survives encoding.
fn check_batch(batch: &PageBatch) {
    let pages: Vec<(u64, Option<&[u8]>)> = batch.pages().collect();
    assert_eq!(pages.len(), batch.len());
    for (gpa, data) in &pages {
        assert!(gpa.is_multiple_of(PAGE_SIZE), "page {gpa:#x} is not aligned");
        assert!(data.is_none_or(|d| d.len() == PAGE), "page {gpa:#x} is not 4096 bytes");
    }
    let data_pages = pages.iter().filter(|(_, d)| d.is_some()).count();
    assert!(batch.payload_len() >= PAGE * data_pages, "a batch holds less than its pages");
    let mut from_runs = Vec::new();
    for run in batch.runs() {
        assert!(run.pages > 0, "an empty run");
        assert!(run.data.is_none_or(|d| d.len() == run.pages * PAGE), "a run's data is not its pages");
        for i in 0..run.pages {
            let gpa = (i as u64 * PAGE_SIZE)
                .checked_add(run.gpa)
                .unwrap_or_else(|| panic!("the run at {:#x} of {} pages wraps past the top", run.gpa, run.pages));
            from_runs.push((gpa, run.data.map(|d| &d[i * PAGE..(i + 1) * PAGE])));
        }
    }
    assert!(from_runs == pages, "a batch's runs are not its pages in order");
    let again = decode_frame(&encode_pages(batch)).expect("an encoded batch decodes");
    assert!(again == Frame::Pages(batch.clone()), "a batch does not survive encoding");
}

/// A decoded frame is well formed and encodes and decodes to itself.
pub fn check_decoded(frame: &Frame<AnyMessage>) {
    match frame {
        Frame::Pages(batch) => check_batch(batch),
        Frame::Message(message) => {
            let bytes = encode_message(message);
            let again =
                decode_frame(&bytes).unwrap_or_else(|e| panic!("{message:?} encodes to a frame that fails: {e}"));
            assert_eq!(encode_frame(&again), bytes, "{message:?} does not survive encoding");
        }
    }
}

/// The pure codec on the first frame of `bytes`: `decode_header` against its
/// specification, then the payload if it is all there.
pub fn check_codec(bytes: &[u8]) {
    let Some(header) = bytes.first_chunk::<HEADER_BYTES>() else { return };
    let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    let length = get_u32(header, 8).expect("a header has a length");
    let sound = header[..4] == MAGIC && KINDS.contains(&(u16_at(6), u16_at(4)));
    match decode_header(header) {
        Ok(decoded) => {
            assert!(sound, "decode_header accepted {header:02x?}");
            assert!(length <= MAX_PAYLOAD, "decode_header accepted a length of {length}, over MAX_PAYLOAD");
            assert_eq!(decoded.payload_len(), length as usize);
            if let Some(payload) = bytes[HEADER_BYTES..].get(..decoded.payload_len()) {
                if let Ok(frame) = decode_payload(decoded, payload.to_vec()) {
                    check_decoded(&frame);
                }
            }
        }
        Err(ProtocolError::TooLarge(n, _)) => {
            assert!(sound && n == length && length > MAX_PAYLOAD, "TooLarge({n}) for {header:02x?}")
        }
        Err(e) => assert!(!sound, "decode_header refused the sound header {header:02x?}: {e}"),
    }
}

/// Reads `stream` to its end with a [`FrameReader`] (with `mac`: one that
/// checks tags), going on after errors: every read a frame or an error, every
/// frame well formed, and the end reached (each read but the last consumes a header).
pub fn read_stream(stream: &[u8], mac: Option<FrameMac>) -> Vec<Result<Frame<AnyMessage>, ProtocolError>> {
    let mut reader = FrameReader::new(stream);
    if let Some(mac) = mac {
        reader.authenticate(mac);
    }
    let mut results = Vec::new();
    for _ in 0..=stream.len() / HEADER_BYTES {
        let result = block_on(reader.read::<AnyMessage>());
        if let Ok(frame) = &result {
            check_decoded(frame);
        }
        let end = matches!(result, Err(ProtocolError::Closed | ProtocolError::Truncated));
        results.push(result);
        if end {
            return results;
        }
    }
    panic!("{} reads of a {}-byte stream did not reach its end", results.len(), stream.len());
}

/// A reader with the receiver's MAC over `stream`, a mutation of the `sent`
/// frames tagged in `context`, accepts only frames that were sent, and before
/// its first error exactly the sent ones in order; over the stream as sent it accepts all.
pub fn check_authenticated(context: &[u8], sent: &[Vec<u8>], stream: &[u8]) {
    let results = read_stream(stream, Some(macs(context).1));
    let first_error = results.iter().position(Result::is_err).expect("a read stream ends in an error");
    for (i, result) in results.iter().enumerate() {
        let Ok(frame) = result else { continue };
        let bytes = encode_frame(frame);
        if i < first_error {
            assert!(
                sent.get(i) == Some(&bytes),
                "a reader with a MAC accepted a frame {i} that was not sent as frame {i}"
            );
        } else {
            assert!(sent.contains(&bytes), "a reader with a MAC accepted a frame that was never sent");
        }
    }
    if stream == tag_stream(context, sent) {
        assert_eq!(first_error, sent.len(), "the stream as sent was refused: {:?}", results[first_error]);
        assert_eq!(results[first_error], Err(ProtocolError::Closed));
    }
}

/// The frame target: `data` as a stream (the codec, readers with and without
/// a MAC), then as the choices of sent frames and mutations of their tagged stream.
pub fn fuzz_frame(data: &[u8]) {
    check_codec(data);
    read_stream(data, None);
    read_stream(data, Some(macs(&[]).1));
    let mut tape = Tape::new(data);
    let sent = sample_frames(&mut tape, 4);
    let mut stream = tag_stream(data, &sent);
    for _ in 0..tape.below(4) {
        mutate(&mut tape, &mut stream, data);
    }
    check_authenticated(data, &sent, &stream);
}

// ---- checkpoint properties -------------------------------------------------

/// A [`CheckpointStore`] over [`MEM_BYTES`] of guest memory and its shadow:
/// every operation goes to both, and then memory, the committed epoch and the
/// staged page count must agree.
pub struct StoreModel {
    memory: Arc<GuestMemory>,
    store: CheckpointStore,
    pub image: Vec<u8>,
    /// Pages staged for the open epoch, in order (None: a zero page).
    staged: Vec<(u64, Option<Vec<u8>>)>,
    pub epoch: u64,
    /// The committed state, encoded.
    pub state: Vec<u8>,
}

impl StoreModel {
    /// A store whose memory has some pages filled (from `src`) and whose epoch 0 is a sampled state.
    pub fn new(src: &mut impl Source) -> Self {
        let memory = Arc::new(GuestMemory::new(MEM_BYTES, 2 << 20).expect("a small guest memory maps"));
        let mut image = vec![0u8; MEM_BYTES as usize];
        for (i, page) in image.chunks_exact_mut(PAGE).enumerate() {
            if src.one_in(2) {
                page.fill(src.byte());
                memory.write(i as u64 * PAGE_SIZE, page).expect("inside memory");
            }
        }
        let switchover = sample_state(src, machine_config());
        let state = switchover.to_bytes();
        // Half the time every staged page goes through the staging file.
        let budget = if src.one_in(2) { 0 } else { crate::migration::ft::staging::DEFAULT_STAGING_MEMORY };
        let limits = crate::migration::ft::staging::StagingLimits { memory_bytes: budget, ..Default::default() };
        let store = CheckpointStore::new(Arc::clone(&memory), switchover, limits);
        let model = StoreModel { memory, store, image, staged: Vec::new(), epoch: 0, state };
        model.check("new");
        model
    }

    pub fn staged_pages(&self) -> u64 {
        self.staged.len() as u64
    }

    fn check(&self, after: &str) {
        let mut memory = vec![0u8; MEM_BYTES as usize];
        self.memory.read(0, &mut memory).expect("inside memory");
        if let Some(page) =
            (0..MEM_PAGES as usize).find(|&p| memory[p * PAGE..][..PAGE] != self.image[p * PAGE..][..PAGE])
        {
            panic!("after {after}: guest page {:#x} is not what the model says", page * PAGE);
        }
        assert_eq!(self.store.committed_epoch(), self.epoch, "after {after}: the committed epoch");
        assert_eq!(self.store.staged_pages(), self.staged_pages(), "after {after}: the staged page count");
    }

    /// Stages `batch` in the store: refused whole if a page is outside memory.
    pub fn stage(&mut self, batch: PageBatch) -> Result<(), CheckpointError> {
        let fits = batch.pages().all(|(gpa, _)| gpa.checked_add(PAGE_SIZE).is_some_and(|end| end <= MEM_BYTES));
        let pages: Vec<(u64, Option<Vec<u8>>)> = batch.pages().map(|(gpa, d)| (gpa, d.map(<[u8]>::to_vec))).collect();
        let result = self.store.stage(batch);
        match &result {
            Ok(()) => assert!(fits, "a batch with a page outside memory was staged"),
            Err(CheckpointError::OutOfRange { .. }) => assert!(!fits, "a batch inside memory was refused: {result:?}"),
            Err(e) => panic!("stage failed with {e}"),
        }
        if fits {
            self.staged.extend(pages);
        }
        self.check("stage");
        result
    }

    /// What `commit(epoch, pages, state)` must do: the decoded state, or the error.
    fn expect_commit(&self, epoch: u64, pages: u64, state: &[u8]) -> Result<MachineState, CheckpointError> {
        if epoch != self.epoch + 1 {
            return Err(CheckpointError::Epoch { expected: self.epoch + 1, got: epoch });
        }
        if pages != self.staged_pages() {
            return Err(CheckpointError::PageCount { epoch, claimed: pages, staged: self.staged_pages() });
        }
        let refused = || CheckpointError::State { epoch, reason: String::new() };
        let state = MachineState::from_bytes(state).map_err(|_| refused())?;
        if state.config != machine_config() {
            return Err(refused());
        }
        Ok(state)
    }

    /// Commits in the store; the model applies its staged pages, in order, only if the commit must succeed.
    pub fn commit(&mut self, epoch: u64, pages: u64, state: &[u8]) -> Result<u64, CheckpointError> {
        let expected = self.expect_commit(epoch, pages, state);
        let result = self.store.commit(epoch, pages, state);
        match (expected, &result) {
            (Ok(decoded), Ok(committed)) => {
                assert_eq!(*committed, epoch);
                for (gpa, data) in self.staged.drain(..) {
                    let page = &mut self.image[gpa as usize..][..PAGE];
                    match data {
                        Some(data) => page.copy_from_slice(&data),
                        None => page.fill(0),
                    }
                }
                self.epoch = epoch;
                self.state = decoded.to_bytes();
            }
            (Err(CheckpointError::State { .. }), Err(CheckpointError::State { .. })) => {}
            (Err(want), Err(got)) => assert_eq!(&want, got, "commit({epoch}, {pages}) failed otherwise"),
            (Ok(_), Err(e)) => panic!("commit({epoch}, {pages}) of a whole epoch failed: {e}"),
            (Err(want), Ok(_)) => panic!("commit({epoch}, {pages}) succeeded, but must fail with: {want}"),
        }
        self.check("commit");
        result
    }

    /// Ends the store: its last committed checkpoint is the model's, and the staged pages never reached memory.
    pub fn finish(self) {
        let StoreModel { memory, store, image, epoch, state, .. } = self;
        let committed = store.into_committed().expect("no commit fails half-way");
        assert_eq!(committed.epoch, epoch, "the last committed epoch");
        assert!(committed.state.to_bytes() == state, "the last committed state is not the model's");
        let mut now = vec![0u8; MEM_BYTES as usize];
        memory.read(0, &mut now).expect("inside memory");
        assert!(now == image, "guest memory changed after the last commit");
    }

    /// What a source does with a stream from its destination: stage page
    /// frames, commit commit records, skip heartbeats; anything else, or any
    /// error, ends the connection.
    pub fn drive(&mut self, stream: &[u8], mac: Option<FrameMac>) {
        let mut reader = FrameReader::new(stream);
        if let Some(mac) = mac {
            reader.authenticate(mac);
        }
        for _ in 0..=stream.len() / HEADER_BYTES {
            match block_on(reader.read::<MigrationMessage>()) {
                Ok(Frame::Pages(batch)) => {
                    if self.stage(batch).is_err() {
                        return;
                    }
                }
                Ok(Frame::Message(MigrationMessage::CheckpointCommit { epoch, pages, state })) => {
                    if self.commit(epoch, pages, &state).is_err() {
                        return;
                    }
                }
                Ok(Frame::Message(MigrationMessage::Heartbeat { .. })) => {}
                Ok(Frame::Message(_)) | Err(_) => return,
            }
        }
        panic!("a {}-byte stream did not end", stream.len());
    }
}

/// Arbitrary operations on a store, checked against the model: batches in and
/// out of memory; commits that are right, or off in epoch or page count, or
/// whose state is mutated, of another machine, or noise.
pub fn check_store_ops(src: &mut impl Source) {
    let mut model = StoreModel::new(src);
    for _ in 0..1 + src.below(24) {
        let next = model.epoch + 1;
        let _ = match src.below(8) {
            0..=2 => {
                let in_range = !src.one_in(4);
                model.stage(sample_batch(src, in_range)).map(drop)
            }
            3 | 4 => {
                let state = sample_state(src, machine_config()).to_bytes();
                model.commit(next, model.staged_pages(), &state).map(drop)
            }
            5 => {
                let epoch = if src.one_in(8) { u64::MAX } else { model.epoch.wrapping_add(src.below(4)) };
                let pages = model.staged_pages().wrapping_add(src.below(3)).wrapping_sub(1);
                let state = sample_state(src, machine_config()).to_bytes();
                model.commit(epoch, pages, &state).map(drop)
            }
            6 => {
                let config = match src.one_in(3) {
                    true => MachineConfig { mem_bytes: 2 * MEM_BYTES, ..machine_config() },
                    false => machine_config(),
                };
                let mut state = sample_state(src, config).to_bytes();
                for _ in 0..src.below(3) {
                    mutate(src, &mut state, &[]);
                }
                model.commit(next, model.staged_pages(), &state).map(drop)
            }
            _ => {
                let noise: Vec<u8> = (0..src.below(64)).map(|_| src.byte()).collect();
                model.commit(next, model.staged_pages(), &noise).map(drop)
            }
        };
    }
    model.finish();
}

/// A checkpoint stream as a destination sends it: epochs 1 to `epochs()`, each
/// its page frames then its commit record, heartbeats between; with the image
/// and the state after each epoch (0: before any).
pub struct CheckpointStream {
    pub frames: Vec<Vec<u8>>,
    pub images: Vec<Vec<u8>>,
    pub states: Vec<Vec<u8>>,
}

impl CheckpointStream {
    /// Epochs over `image`, committed on top of `state`.
    pub fn sample(src: &mut impl Source, image: &[u8], state: &[u8]) -> Self {
        let mut stream =
            CheckpointStream { frames: Vec::new(), images: vec![image.to_vec()], states: vec![state.to_vec()] };
        for epoch in 1..=1 + src.below(3) {
            let mut image = stream.images.last().expect("epoch 0").clone();
            let mut pages = 0;
            for _ in 0..1 + src.below(3) {
                let batch = sample_batch(src, true);
                for (gpa, data) in batch.pages() {
                    let page = &mut image[gpa as usize..][..PAGE];
                    match data {
                        Some(data) => page.copy_from_slice(data),
                        None => page.fill(0),
                    }
                }
                pages += batch.len() as u64;
                stream.frames.push(encode_pages(&batch));
                if src.one_in(3) {
                    stream.frames.push(encode_message(&MigrationMessage::Heartbeat {
                        seq: src.next_u64(),
                        released: src.below(1 << 20),
                    }));
                }
            }
            let state = sample_state(src, machine_config()).to_bytes();
            stream.frames.push(encode_message(&MigrationMessage::CheckpointCommit {
                epoch,
                pages,
                state: state.clone(),
            }));
            stream.images.push(image);
            stream.states.push(state);
        }
        stream
    }

    pub fn epochs(&self) -> u64 {
        self.images.len() as u64 - 1
    }
}

/// A checkpoint stream tagged in `context` (see [`macs`]), mutated (or not),
/// read with the receiver's MAC into a store: the store ends at an epoch that
/// was sent, with that epoch's memory and state; at the last one if nothing was mutated.
pub fn check_checkpoint_stream(src: &mut impl Source, context: &[u8]) {
    let mut model = StoreModel::new(src);
    let sent = CheckpointStream::sample(src, &model.image, &model.state);
    let tagged = tag_stream(context, &sent.frames);
    let mut stream = tagged.clone();
    for _ in 0..src.below(4) {
        mutate(src, &mut stream, &tagged);
    }
    model.drive(&stream, Some(macs(context).1));
    let epoch = model.epoch;
    assert!(epoch <= sent.epochs(), "the store committed epoch {epoch}, of {} sent", sent.epochs());
    assert!(model.image == sent.images[epoch as usize], "the memory of epoch {epoch} is not the memory sent");
    assert!(model.state == sent.states[epoch as usize], "the state of epoch {epoch} is not the state sent");
    if stream == tagged {
        assert_eq!(epoch, sent.epochs(), "a stream as sent did not commit its last epoch");
    }
    model.finish();
}

/// The checkpoint target: `data` as a destination's untagged stream into a
/// store; then as the choices of store operations; then of a tagged checkpoint
/// stream and its mutations.
pub fn fuzz_checkpoint(data: &[u8]) {
    let mut model = StoreModel::new(&mut Rng::new(0));
    model.drive(data, None);
    model.finish();
    check_store_ops(&mut Tape::new(data));
    check_checkpoint_stream(&mut Tape::new(data), data);
}

/// A checkpoint stream as [`fuzz_checkpoint`] reads it untagged from its
/// input, over the memory of `StoreModel::new(&mut Rng::new(0))`: for the corpus.
pub fn sample_checkpoint_input(src: &mut impl Source) -> Vec<u8> {
    let model = StoreModel::new(&mut Rng::new(0));
    CheckpointStream::sample(src, &model.image, &model.state).frames.concat()
}
