//! The in-tree protocol fuzzer: bounded and deterministic, part of `cargo test
//! -p pcft-agent`. It replays every input of the corpus kept in fuzz/corpus/,
//! then checks the properties of `pcft_agent::fuzzing` over mutated frames,
//! frame streams and checkpoint sequences from a seeded PRNG, and bounds what
//! decoding allocates. cargo-fuzz runs the same properties for longer
//! (`cargo xtask fuzz`).
//!
//! - `PCFT_FUZZ_ITERATIONS` (default 2000): rounds of each randomized test.
//! - `PCFT_FUZZ_SEED`: another seed (each round's seed is printed if it fails).
//! - `PCFT_FUZZ_WRITE_CORPUS=1`: (re)write the corpus's seed files.

use pcft_agent::fuzzing::{self, Rng, Source};
use pcft_agent::vmm::memory::PAGE_SIZE;
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::frame::{
    encode_message, encode_pages, PageBatch, PageData, ProtocolError, HEADER_BYTES, MAGIC, MAX_PAYLOAD, READ_CHUNK,
};
use pcft_agent::wire::greeting::{Greeting, Role};
use pcft_agent::wire::message_set::CONTROL_VERSION;
use pcft_agent::wire::migration::MigrationMessage;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

// ---- the largest allocation ------------------------------------------------

/// The system allocator, noting the largest single allocation of each thread.
struct Largest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call goes to `System` unchanged; `note` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's `layout` contract is passed to `System` unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's `layout` contract is passed to `System` unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from `System` (every allocation here does), with this `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` (every allocation here does), with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// `f`'s result and the largest single allocation it made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|largest| largest.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// Slack for what decoding allocates besides the input's size: postcard (serde)
/// preallocates at most 1 MiB for a sequence whatever its length field says.
const SLACK: usize = 2 << 20;

// ---- the harness -----------------------------------------------------------

fn iterations() -> u64 {
    std::env::var("PCFT_FUZZ_ITERATIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(2000)
}

fn seed() -> u64 {
    std::env::var("PCFT_FUZZ_SEED").ok().and_then(|n| n.parse().ok()).unwrap_or(0x5eed_f022)
}

/// Says, if a round panics, how to run it again and where its input is.
struct Round<'a> {
    test: &'a str,
    seed: u64,
    input: Option<Vec<u8>>,
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        eprintln!(
            "{}: a round failed; run it alone with PCFT_FUZZ_SEED={} PCFT_FUZZ_ITERATIONS=1",
            self.test, self.seed
        );
        if let Some(input) = &self.input {
            let path = std::env::temp_dir().join(format!("pcft-fuzz-{}-{:x}", self.test, self.seed));
            if std::fs::write(&path, input).is_ok() {
                eprintln!(
                    "{}: its input is in {} (replay it with `cargo xtask fuzz` or the corpus)",
                    self.test,
                    path.display()
                );
            }
        }
    }
}

/// Runs `round` with each round's PRNG.
fn rounds(test: &str, mut round: impl FnMut(&mut Rng, &mut Round)) {
    let base = seed();
    for i in 0..iterations() {
        let seed = base.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut guard = Round { test, seed, input: None };
        round(&mut Rng::new(seed), &mut guard);
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let name = path.file_name().expect("a file name").to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("a readable corpus file"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    files
}

// ---- the corpus ------------------------------------------------------------

fn page(fill: u8) -> PageData {
    PageData::Bytes(vec![fill; PAGE_SIZE as usize])
}

fn commit(epoch: u64, pages: u64, records: u64) -> Vec<u8> {
    let mut state = fuzzing::sample_state(&mut Rng::new(records), fuzzing::machine_config());
    state.devices.output_log.truncate(1);
    encode_message(&MigrationMessage::CheckpointCommit { epoch, pages, state: state.to_bytes() })
}

/// The corpus's seed inputs: small valid frames and streams, and a few just off.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let batch = PageBatch::from_pages(vec![
        (0x1000, page(1)),
        (0x2000, page(2)),
        (0x3000, PageData::Zero),
        (0x4000, PageData::Zero),
        (0x9000, page(3)),
    ]);
    let frames = vec![
        encode_message(&ControlMessage::Ping),
        encode_pages(&batch),
        encode_message(&MigrationMessage::Heartbeat { seq: 7, released: 40 }),
        commit(1, 5, 1),
    ];
    let mut too_large = encode_message(&ControlMessage::Ping);
    too_large[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let top = !(PAGE_SIZE - 1); // the last page below 2^64
    let wrap = encode_pages(&PageBatch::from_pages(vec![(top, PageData::Zero), (0, PageData::Zero)]));
    let one = |gpa: u64, data: PageData| encode_pages(&PageBatch::from_pages(vec![(gpa, data)]));
    let epochs = [
        one(0x1000, page(0xa1)),
        one(0x2000, PageData::Zero),
        commit(1, 2, 1),
        encode_message(&MigrationMessage::Heartbeat { seq: 1, released: 0 }),
        one(0x1000, page(0xa2)),
        commit(2, 1, 2),
        one(0xf000, page(0xa3)),
        commit(3, 1, 3),
    ]
    .concat();
    vec![
        ("frame", "seed-ping", encode_message(&ControlMessage::Ping)),
        (
            "frame",
            "seed-hello",
            encode_message(&Greeting::Hello { role: Role::Migration, agent: "seed".into(), nonce: None }),
        ),
        ("frame", "seed-pages", encode_pages(&batch)),
        ("frame", "seed-commit", commit(2, 3, 2)),
        ("frame", "seed-request", encode_message(&MigrationMessage::PageRequest { gpas: vec![0x1000, 0x5000] })),
        ("frame", "seed-stream", frames.concat()),
        ("frame", "seed-tagged", fuzzing::tag_stream(&[], &frames)),
        ("frame", "seed-too-large", too_large),
        // A run ending at the top of the address space (it once overflowed computing the next address).
        ("frame", "seed-wrap", wrap.clone()),
        ("checkpoint", "seed-epochs", epochs),
        ("checkpoint", "seed-unfinished", [one(0x3000, page(0xb1)), commit(1, 1, 1), one(0x3000, page(0xb2))].concat()),
        ("checkpoint", "seed-wrong-count", [one(0x3000, page(0xc1)), commit(1, 2, 1)].concat()),
        ("checkpoint", "seed-wrong-epoch", [one(0x3000, page(0xd1)), commit(2, 1, 1)].concat()),
        ("checkpoint", "seed-outside", [one(fuzzing::MEM_BYTES, page(0xe1)), commit(1, 1, 1)].concat()),
        ("checkpoint", "seed-wrap", [wrap, commit(1, 2, 1)].concat()),
    ]
}

/// The seed files in fuzz/corpus/ are what `seeds()` makes (so that they
/// follow the protocol); `PCFT_FUZZ_WRITE_CORPUS=1` writes them.
#[test]
fn corpus_seeds_are_current() {
    let write = std::env::var_os("PCFT_FUZZ_WRITE_CORPUS").is_some_and(|v| v == "1");
    let mut total = 0;
    for (target, name, bytes) in seeds() {
        let path = corpus_dir(target).join(name);
        total += bytes.len();
        if write {
            std::fs::create_dir_all(path.parent().expect("a corpus directory")).expect("the corpus directory");
            std::fs::write(&path, &bytes).expect("a corpus file");
        } else {
            let stored = std::fs::read(&path).unwrap_or_default();
            assert!(
                stored == bytes,
                "{} is not current: PCFT_FUZZ_WRITE_CORPUS=1 cargo test -p pcft-agent --test fuzz_protocol corpus",
                path.display()
            );
        }
    }
    assert!(total < 256 << 10, "the seed corpus is {total} bytes: keep it small");
}

/// Replays every input of the corpus `kind` through `fuzz` (a failing one is named by `Round`).
fn replay(kind: &'static str, test: &'static str, fuzz: fn(&[u8])) {
    for (name, bytes) in corpus(kind) {
        let mut round = Round { test, seed: 0, input: Some(bytes.clone()) };
        fuzz(&bytes);
        round.input = None;
        eprintln!("replayed {kind}/{name}");
    }
}

#[test]
fn the_frame_corpus_replays() {
    replay("frame", "frame-corpus", fuzzing::fuzz_frame);
}

#[test]
fn the_checkpoint_corpus_replays() {
    replay("checkpoint", "checkpoint-corpus", fuzzing::fuzz_checkpoint);
}

// ---- frames ----------------------------------------------------------------

/// Mutated streams, from the corpus or freshly encoded: the codec and readers
/// with and without a MAC never panic, and allocate no more than about the
/// input's size (a reader: plus one read chunk) whatever a length field says.
#[test]
fn mutated_frames_are_refused_or_decoded_never_a_panic() {
    let corpus = corpus("frame");
    rounds("frame", |rng, round| {
        let mut bytes = match rng.one_in(2) {
            true => corpus[rng.index(corpus.len())].1.clone(),
            false => fuzzing::sample_frames(rng, 4).concat(),
        };
        let donor = &corpus[rng.index(corpus.len())].1;
        for _ in 0..1 + rng.below(4) {
            fuzzing::mutate(rng, &mut bytes, donor);
        }
        round.input = Some(bytes.clone());
        let ((), codec) = largest_allocation(|| fuzzing::check_codec(&bytes));
        assert!(codec <= 4 * bytes.len() + SLACK, "decoding {} bytes allocated {codec} at once", bytes.len());
        for mac in [None, Some(fuzzing::macs(&[]).1)] {
            let (_, reader) = largest_allocation(|| fuzzing::read_stream(&bytes, mac));
            assert!(
                reader <= 2 * (READ_CHUNK + bytes.len()) + 4 * bytes.len() + SLACK,
                "reading {} bytes allocated {reader} at once",
                bytes.len()
            );
        }
        fuzzing::fuzz_frame(&bytes);
    });
}

/// A reader with a MAC accepts from a mutated tagged stream only the frames sent.
#[test]
fn a_reader_with_a_mac_never_accepts_a_mutated_frame() {
    rounds("mac", |rng, round| {
        let context = round.seed.to_le_bytes();
        let sent = fuzzing::sample_frames(rng, 5);
        let tagged = fuzzing::tag_stream(&context, &sent);
        let mut stream = tagged.clone();
        for _ in 0..rng.below(5) {
            fuzzing::mutate(rng, &mut stream, &tagged);
        }
        round.input = Some(stream.clone());
        fuzzing::check_authenticated(&context, &sent, &stream);
    });
}

/// A header with a length over MAX_PAYLOAD is refused before its payload is
/// allocated; one of MAX_PAYLOAD followed by nothing costs one read chunk, not
/// the 32 MiB it claims (and that chunk is seen: the check can see allocations).
#[test]
fn lengths_over_the_limit_are_refused_before_allocating() {
    let header = |length: u32| {
        let mut h = encode_message(&ControlMessage::Ping)[..HEADER_BYTES].to_vec();
        h[8..12].copy_from_slice(&length.to_le_bytes());
        h
    };
    let mut rng = Rng::new(seed());
    let lengths = [MAX_PAYLOAD + 1, MAX_PAYLOAD + 4096, u32::MAX / 2, u32::MAX];
    for length in lengths
        .into_iter()
        .chain((0..64).map(|_| MAX_PAYLOAD + 1 + rng.below(u64::from(u32::MAX - MAX_PAYLOAD)) as u32))
    {
        let bytes = header(length);
        for mac in [None, Some(fuzzing::macs(&[]).1)] {
            let (results, largest) = largest_allocation(|| fuzzing::read_stream(&bytes, mac));
            assert_eq!(results[0], Err(ProtocolError::TooLarge(length, MAX_PAYLOAD)));
            assert!(largest < 64 << 10, "a header of length {length} allocated {largest} bytes");
        }
    }
    assert_eq!(&header(0)[..4], &MAGIC);
    assert_eq!(u16::from_le_bytes([header(0)[4], header(0)[5]]), CONTROL_VERSION);
    let (results, largest) = largest_allocation(|| fuzzing::read_stream(&header(MAX_PAYLOAD), None));
    assert_eq!(results[0], Err(ProtocolError::Truncated));
    assert!(
        (READ_CHUNK..2 * READ_CHUNK).contains(&largest),
        "a claim of {MAX_PAYLOAD} bytes with none sent allocated {largest}: one read chunk expected"
    );
}

/// The checks are not vacuous: a reader's frames compared with other sent
/// frames, or a store compared with a model that expects another epoch, fail.
#[test]
fn the_checks_fail_when_they_should() {
    let sent = fuzzing::sample_frames(&mut Rng::new(1), 3);
    let other = vec![encode_message(&ControlMessage::Pong)];
    let stream = fuzzing::tag_stream(b"context", &sent);
    assert!(std::panic::catch_unwind(|| fuzzing::check_authenticated(b"context", &other, &stream)).is_err());
    // The same frames tagged for another connection are refused.
    let elsewhere = fuzzing::tag_stream(b"elsewhere", &sent);
    let read = fuzzing::read_stream(&elsewhere, Some(fuzzing::macs(b"context").1));
    assert_eq!(read[0], Err(ProtocolError::Unauthenticated));
    let mut model = fuzzing::StoreModel::new(&mut Rng::new(2));
    model.epoch = 1;
    let staged = model.staged_pages();
    assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || model.commit(2, staged, &[]))).is_err());
}

// ---- checkpoints -----------------------------------------------------------

/// Arbitrary operation sequences on a checkpoint store match the shadow model.
#[test]
fn checkpoint_operations_match_the_model() {
    rounds("store", |rng, _| fuzzing::check_store_ops(rng));
}

/// Mutated tagged checkpoint streams never make a corrupted epoch current;
/// mutated untagged ones (from the corpus) keep the store and the model together.
#[test]
fn a_corrupted_checkpoint_never_becomes_current() {
    let corpus = corpus("checkpoint");
    rounds("checkpoint", |rng, round| {
        fuzzing::check_checkpoint_stream(rng, &round.seed.to_le_bytes());
        let mut bytes = corpus[rng.index(corpus.len())].1.clone();
        for _ in 0..1 + rng.below(3) {
            fuzzing::mutate(rng, &mut bytes, &[]);
        }
        round.input = Some(bytes.clone());
        fuzzing::fuzz_checkpoint(&bytes);
    });
}
