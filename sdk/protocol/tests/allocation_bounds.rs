//! No decoder allocates by a count or length it read from the input: with a counting
//! allocator, inputs that lie (a record count of 2^31, a header count of 900 000, an lz4
//! size prefix of 60 MiB, a zstd frame declaring 60 MiB, a sequence of 2^32 topics) are
//! decoded or refused without any single allocation near what they claim.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use quiver_protocol::batch::{
    field, recompute_crc, validate_produce, BatchBuilder, Compression, ProduceLimits, RecordIter,
    BATCH_HEADER_LEN,
};
use quiver_protocol::decode_request;
use quiver_protocol::requests::MetadataRequest;
use quiver_protocol::varint::put_varint;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ARMED.try_with(|a| {
            if a.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
            }
        });
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ARMED.try_with(|a| {
            if a.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
            }
        });
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The largest single allocation `f` makes on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    LARGEST.with(|l| l.get())
}

/// Generous for the decoders' own buffers (a zstd context is ~160 KiB), far below every
/// lie below.
const BOUND: usize = 1 << 20;

const NOW: i64 = 1_700_000_000_000;

fn limits() -> ProduceLimits {
    ProduceLimits {
        max_batch_bytes: 64 << 20,
        max_decompressed_bytes: 64 << 20,
        now_ms: NOW,
        max_timestamp_skew_ms: 3_600_000,
    }
}

fn put_i32(b: &mut [u8], at: usize, v: i32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// A batch around `records` (already compressed as `c` says), length and CRC correct.
fn wrap(c: Compression, count: i32, records: &[u8]) -> Bytes {
    let mut b = BatchBuilder::new(c);
    b.push(None, b"x", NOW, &[]);
    let mut raw = b.build()[..BATCH_HEADER_LEN].to_vec();
    raw.extend_from_slice(records);
    put_i32(
        &mut raw,
        field::BATCH_LENGTH,
        (BATCH_HEADER_LEN - 12 + records.len()) as i32,
    );
    put_i32(&mut raw, field::RECORD_COUNT, count);
    put_i32(&mut raw, field::LAST_OFFSET_DELTA, count - 1);
    recompute_crc(&mut raw);
    Bytes::from(raw)
}

fn drain(batch: &Bytes, max: usize) {
    if let Ok(it) = RecordIter::new(batch, max) {
        let _ = it.collect::<Vec<_>>();
    }
}

#[test]
fn lying_inputs_never_allocate_what_they_claim() {
    // A record count of 2^31 - 1 over one record, each codec: collect() must not size
    // itself by the count.
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let mut b = BatchBuilder::new(c);
        b.push(None, b"one", NOW, &[]);
        let mut raw = b.build().to_vec();
        put_i32(&mut raw, field::RECORD_COUNT, i32::MAX);
        put_i32(&mut raw, field::LAST_OFFSET_DELTA, i32::MAX - 1);
        recompute_crc(&mut raw);
        let raw = Bytes::from(raw);
        let n = largest_allocation(|| {
            assert!(validate_produce(&raw, &limits()).is_err());
            drain(&raw, 64 << 20);
        });
        assert!(n < BOUND, "{c:?}: record count lie allocated {n} bytes");
    }

    // A header count of 900 000 in a record of 1 MB.
    let mut rec = vec![0u8];
    for v in [0i64, 0, -1, 1] {
        put_varint(&mut rec, v);
    }
    rec.push(b'v');
    put_varint(&mut rec, 900_000);
    rec.extend_from_slice(&vec![0u8; 1_000_000]);
    let mut records = Vec::new();
    put_varint(&mut records, rec.len() as i64);
    records.extend_from_slice(&rec);
    let raw = wrap(Compression::None, 1, &records);
    let n = largest_allocation(|| {
        assert!(validate_produce(&raw, &limits()).is_err());
        drain(&raw, 64 << 20);
    });
    assert!(n < BOUND, "header count lie allocated {n} bytes");

    // An lz4 size prefix of 60 MiB in front of a few bytes.
    let mut lz = (60u32 << 20).to_le_bytes().to_vec();
    lz.extend_from_slice(&[0x10, b'a', 0, 0]);
    let raw = wrap(Compression::Lz4, 1, &lz);
    let n = largest_allocation(|| {
        assert!(validate_produce(&raw, &limits()).is_err());
        drain(&raw, 64 << 20);
    });
    assert!(n < BOUND, "lz4 size prefix lie allocated {n} bytes");

    // A zstd frame declaring 60 MiB of content, cut short; and a tiny honest zstd batch
    // under a 64 MiB limit (which used to reserve the whole limit).
    let big = zstd::bulk::compress(&vec![0u8; 60 << 20], 1).unwrap();
    let cut = &big[..big.len().min(40)];
    let raw = wrap(Compression::Zstd, 1, cut);
    let mut b = BatchBuilder::new(Compression::Zstd);
    b.push(None, b"small", NOW, &[]);
    let small = b.build();
    let n = largest_allocation(|| {
        assert!(validate_produce(&raw, &limits()).is_err());
        drain(&raw, 64 << 20);
        validate_produce(&small, &limits()).unwrap();
        drain(&small, 64 << 20);
    });
    // 40 bytes of zstd can honestly inflate to 10 blocks of 128 KiB (RLE blocks of 4 bytes),
    // so the buffer may be sized up to that, never by the 60 MiB declared.
    assert!(
        n <= 40 / 4 * (128 << 10) + 1024,
        "zstd lie allocated {n} bytes"
    );

    // A postcard sequence of u32::MAX topics in a 12-byte control.
    let mut control = vec![1u8, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, b'a'];
    control.extend_from_slice(&[1, b'b']);
    let mut body = (control.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(&control);
    let body = Bytes::from(body);
    let n = largest_allocation(|| {
        assert!(decode_request::<MetadataRequest>(&body).is_err());
    });
    assert!(n < BOUND, "postcard sequence lie allocated {n} bytes");
}
