//! Micro-benchmarks of the page path, each beside a baseline measured in the
//! same run: what a migration does per page, against a plain memory copy.
//! Run with `cargo bench -p pcft-agent --bench page_path` (or `cargo xtask bench`).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pcft_agent::vmm::memory::{is_zero, GuestMemory, PAGE_SIZE};
use pcft_agent::vmm::page_set::PageSet;
use pcft_agent::wire::frame::{decode_header, decode_payload, Frame, PageBatchWriter, HEADER_BYTES};
use pcft_agent::wire::migration::MigrationMessage;
use std::hint::black_box;

const PAGES: u64 = 64;
const BYTES: u64 = PAGES * PAGE_SIZE;

/// Guest memory whose first `PAGES` pages hold data, and the next `PAGES` are zero.
fn memory() -> GuestMemory {
    let memory = GuestMemory::new(4 << 20, 4 << 20).unwrap();
    for page in 0..PAGES {
        let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i as u8) ^ (page as u8) | 1).collect();
        memory.write(page * PAGE_SIZE, &data).unwrap();
    }
    memory
}

fn batch(memory: &GuestMemory, first_page: u64) -> Vec<u8> {
    let mut writer = PageBatchWriter::new();
    for page in first_page..first_page + PAGES {
        let gpa = page * PAGE_SIZE;
        writer.push_with(gpa, |buf| memory.read(gpa, buf)).unwrap();
    }
    writer.finish()
}

fn encode(c: &mut Criterion) {
    let memory = memory();
    let mut group = c.benchmark_group("encode 64 pages");
    group.throughput(Throughput::Bytes(BYTES));
    group.bench_function("baseline: memcpy from guest memory", |b| {
        let mut buf = vec![0u8; BYTES as usize];
        b.iter(|| memory.read(0, black_box(&mut buf)).unwrap())
    });
    group.bench_function("data pages into a batch frame", |b| b.iter(|| black_box(batch(&memory, 0))));
    group.bench_function("zero pages into a batch frame", |b| b.iter(|| black_box(batch(&memory, PAGES))));
    // The page path keeps one writer: no allocation, no page fault per batch.
    group.bench_function("data pages into a reused batch writer (the page path)", |b| {
        let mut writer = PageBatchWriter::new();
        b.iter(|| {
            writer.clear();
            for page in 0..PAGES {
                let gpa = page * PAGE_SIZE;
                writer.push_with(gpa, |buf| memory.read(gpa, buf)).unwrap();
            }
            black_box(writer.payload_bytes())
        })
    });
    group.finish();
}

fn decode(c: &mut Criterion) {
    let memory = memory();
    let frame = batch(&memory, 0);
    let mut group = c.benchmark_group("decode 64 pages");
    group.throughput(Throughput::Bytes(BYTES));
    group.bench_function("baseline: copy the frame", |b| b.iter(|| black_box(frame.clone())));
    group.bench_function("part: CRC-32C of the frame", |b| b.iter(|| crc32c::crc32c(black_box(&frame))));
    group.bench_function("check, decode and split into runs", |b| {
        b.iter_batched(
            || frame.clone(),
            |bytes| {
                let header = decode_header(bytes[..HEADER_BYTES].try_into().unwrap()).unwrap();
                match decode_payload::<MigrationMessage>(header, bytes[HEADER_BYTES..].to_vec()).unwrap() {
                    Frame::Pages(batch) => black_box(batch.runs().len()),
                    _ => unreachable!(),
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Authentication's cost on the page path: tagging (sender) a 64-page frame,
/// beside the CRC-32C an untagged frame has and keyed BLAKE3 (the tag before
/// GMAC; HMAC-SHA256 before that measured 2.0 GB/s here).
fn authenticate(c: &mut Criterion) {
    use pcft_agent::wire::auth::Psk;
    let memory = memory();
    let frame = batch(&memory, 0);
    let key = Psk::from_bytes(&[7u8; 32]).expect("32 bytes");
    let mut sender = key.session(true, &[1; 16], &[2; 16]).send;
    let mut group = c.benchmark_group("authenticate 64 pages");
    group.throughput(Throughput::Bytes(BYTES));
    group.bench_function("baseline: CRC-32C of the frame", |b| b.iter(|| crc32c::crc32c(black_box(&frame))));
    group.bench_function("keyed BLAKE3 of the frame", |b| b.iter(|| blake3::keyed_hash(&[7u8; 32], black_box(&frame))));
    group.bench_function("GMAC tag of the frame (FrameMac, AWS-LC)", |b| b.iter(|| sender.tag(black_box(&frame))));
    // The frame as the post-copy push tags it: header, each page where it is, entries and count.
    let (header, rest) = frame.split_at(16);
    let (pages, trailer) = rest.split_at(PAGES as usize * PAGE_SIZE as usize);
    group.bench_function("GMAC tag of the frame in 66 pieces (FrameMac::tag_pieces)", |b| {
        b.iter(|| {
            let pieces =
                std::iter::once(header).chain(pages.chunks(PAGE_SIZE as usize)).chain(std::iter::once(trailer));
            sender.tag_pieces(black_box(pieces))
        })
    });
    group.finish();
}

fn zero_check(c: &mut Criterion) {
    let page = vec![0u8; PAGE_SIZE as usize];
    let mut group = c.benchmark_group("zero check of a 4 KiB page");
    group.throughput(Throughput::Bytes(PAGE_SIZE));
    group.bench_function("baseline: iter().all(== 0)", |b| b.iter(|| black_box(&page).iter().all(|&x| x == 0)));
    group.bench_function("memory::is_zero", |b| b.iter(|| is_zero(black_box(&page))));
    group.finish();
}

fn page_set(c: &mut Criterion) {
    let mem = 1u64 << 30;
    let mut group = c.benchmark_group("drain 1 GiB of unsent pages");
    group.throughput(Throughput::Elements(mem / PAGE_SIZE));
    group.bench_function("baseline: walk a Vec<bool>", |b| {
        b.iter_batched(
            || vec![true; (mem / PAGE_SIZE) as usize],
            |mut v| {
                let mut n = 0u64;
                for slot in v.iter_mut().filter(|s| **s) {
                    *slot = false;
                    n += 1;
                }
                n
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("PageSet::next_from + remove", |b| {
        b.iter_batched(
            || PageSet::full(mem),
            |mut set| {
                let mut cursor = 0;
                while let Some(gpa) = set.next_from(cursor) {
                    set.remove(gpa);
                    cursor = gpa + PAGE_SIZE;
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, encode, decode, authenticate, zero_check, page_set);
criterion_main!(benches);
