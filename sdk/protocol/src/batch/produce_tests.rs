//! `validate_produce`: honest batches pass, every kind of lie is refused with
//! `InvalidRecord` naming what is wrong.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::varint::put_varint;
use crate::ErrorCode;

pub(super) const NOW: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

pub(super) fn limits() -> ProduceLimits {
    ProduceLimits {
        max_batch_bytes: 1 << 20,
        max_decompressed_bytes: 1 << 20,
        now_ms: NOW,
        max_timestamp_skew_ms: 24 * HOUR,
    }
}

const CODECS: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

fn honest(c: Compression) -> Vec<u8> {
    let mut b = BatchBuilder::new(c);
    b.push(Some(b"k0"), b"value zero", NOW - 5, &[("trace", b"abc")]);
    b.push(None, b"value one", NOW + 7, &[]);
    b.push(Some(b""), b"", NOW, &[("a", b""), ("b", b"xy")]);
    b.build().to_vec()
}

fn put_i32(batch: &mut [u8], at: usize, v: i32) {
    batch[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_i64(batch: &mut [u8], at: usize, v: i64) {
    batch[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get_i64(batch: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(batch[at..at + 8].try_into().unwrap())
}

/// Asserts `validate_produce` refuses `batch` with `InvalidRecord` and a message containing
/// `needle`.
#[track_caller]
pub(super) fn refused(batch: &[u8], limits: &ProduceLimits, needle: &str) {
    match validate_produce(batch, limits) {
        Err(e @ ProtocolError::InvalidRecord { .. }) => {
            assert_eq!(e.code(), ErrorCode::InvalidRecord);
            assert!(
                e.to_string().contains(needle),
                "message {:?} lacks {needle:?}",
                e.to_string()
            );
        }
        other => panic!("expected InvalidRecord containing {needle:?}, got {other:?}"),
    }
}

/// One record's bytes from its fields, written as given (lies included); the length
/// prefix is the fields' true length unless `len` overrides it.
pub(super) struct RawRec<'a> {
    ts_delta: i64,
    offset_delta: i64,
    key_len: Option<i64>,
    key: &'a [u8],
    value_len: Option<i64>,
    value: &'a [u8],
    header_count: Option<i64>,
    pub(super) headers: Vec<(&'a [u8], &'a [u8])>,
    /// Bytes after the headers, inside the record.
    pub(super) tail: &'a [u8],
    len: Option<i64>,
    /// The record's attributes byte.
    pub(super) attributes: u8,
}

impl<'a> RawRec<'a> {
    pub(super) fn new(offset_delta: i64, ts_delta: i64, value: &'a [u8]) -> Self {
        RawRec {
            ts_delta,
            offset_delta,
            key_len: None,
            key: b"",
            value_len: None,
            value,
            header_count: None,
            headers: Vec::new(),
            tail: b"",
            len: None,
            attributes: 0,
        }
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let mut f = vec![self.attributes];
        put_varint(&mut f, self.ts_delta);
        put_varint(&mut f, self.offset_delta);
        put_varint(&mut f, self.key_len.unwrap_or(self.key.len() as i64));
        f.extend_from_slice(self.key);
        put_varint(&mut f, self.value_len.unwrap_or(self.value.len() as i64));
        f.extend_from_slice(self.value);
        put_varint(
            &mut f,
            self.header_count.unwrap_or(self.headers.len() as i64),
        );
        for (k, v) in &self.headers {
            put_varint(&mut f, k.len() as i64);
            f.extend_from_slice(k);
            put_varint(&mut f, v.len() as i64);
            f.extend_from_slice(v);
        }
        f.extend_from_slice(self.tail);
        put_varint(out, self.len.unwrap_or(f.len() as i64));
        out.extend_from_slice(&f);
    }
}

/// A batch with exactly these header fields and records section (compressed with `c`),
/// its length and CRC correct.
pub(super) fn forge(
    c: Compression,
    count: i32,
    first_ts: i64,
    max_ts: i64,
    attrs: i16,
    records: &[u8],
) -> Vec<u8> {
    let body = c.compress(records);
    let mut b = vec![0u8; BATCH_HEADER_LEN];
    put_i32(
        &mut b,
        field::BATCH_LENGTH,
        (BATCH_HEADER_LEN - 12 + body.len()) as i32,
    );
    put_i32(&mut b, field::LEADER_EPOCH, -1);
    b[field::MAGIC] = MAGIC as u8;
    b[field::ATTRIBUTES..field::ATTRIBUTES + 2]
        .copy_from_slice(&(attrs | c.attribute_bits()).to_be_bytes());
    put_i32(&mut b, field::LAST_OFFSET_DELTA, (count - 1).max(0));
    put_i64(&mut b, field::FIRST_TIMESTAMP, first_ts);
    put_i64(&mut b, field::MAX_TIMESTAMP, max_ts);
    put_i64(&mut b, field::PRODUCER_ID, -1);
    b[field::PRODUCER_EPOCH..field::PRODUCER_EPOCH + 2].copy_from_slice(&(-1i16).to_be_bytes());
    put_i32(&mut b, field::BASE_SEQUENCE, -1);
    put_i32(&mut b, field::RECORD_COUNT, count);
    b.extend_from_slice(&body);
    recompute_crc(&mut b);
    b
}

fn records_of(recs: &[RawRec]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in recs {
        r.encode(&mut out);
    }
    out
}

#[test]
fn honest_batches_pass_with_every_codec() {
    for c in CODECS {
        let raw = honest(c);
        let h = validate_produce(&raw, &limits()).unwrap();
        assert_eq!((h.record_count, h.max_timestamp), (3, NOW + 7));
        // A forged batch built the honest way passes too (the forger itself is sound).
        let recs = records_of(&[RawRec::new(0, 0, b"a"), RawRec::new(1, 3, b"b")]);
        validate_produce(&forge(c, 2, NOW, NOW + 3, 0, &recs), &limits()).unwrap();
    }
}

#[test]
fn the_crc_helper_makes_patched_batches_pass_their_crc() {
    let mut raw = honest(Compression::None);
    put_i64(&mut raw, field::PRODUCER_ID, 42);
    assert!(matches!(
        validate_produce(&raw, &limits()),
        Err(ProtocolError::CrcMismatch { .. })
    ));
    recompute_crc(&mut raw);
    assert_eq!(validate_produce(&raw, &limits()).unwrap().producer_id, 42);
    recompute_crc(&mut [0u8; 3]); // too short: left alone, no panic
}

#[test]
fn a_count_that_claims_more_records_is_refused() {
    for c in CODECS {
        let mut b = BatchBuilder::new(c);
        b.push(None, b"one real record", NOW, &[]);
        let mut raw = b.build().to_vec();
        put_i32(&mut raw, field::RECORD_COUNT, i32::MAX);
        put_i32(&mut raw, field::LAST_OFFSET_DELTA, i32::MAX - 1);
        recompute_crc(&mut raw);
        refused(
            &raw,
            &limits(),
            "header says 2147483647 records, the batch holds 1",
        );
        // The old envelope check alone accepted it: that is why produce needs the walk.
        assert!(validate(&raw, 1 << 20).is_ok());
    }
}

#[test]
fn a_count_that_claims_fewer_records_is_refused() {
    for c in CODECS {
        let mut raw = honest(c);
        put_i32(&mut raw, field::RECORD_COUNT, 2);
        put_i32(&mut raw, field::LAST_OFFSET_DELTA, 1);
        recompute_crc(&mut raw);
        refused(&raw, &limits(), "header says 2 records, the batch holds 3");
    }
}

#[test]
fn zero_records_are_refused() {
    let raw = BatchBuilder::new(Compression::None).build().to_vec();
    refused(&raw, &limits(), "header says 0 records");
    let raw = forge(Compression::None, 0, NOW, NOW, 0, &[]);
    refused(&raw, &limits(), "header says 0 records");
}

#[test]
fn a_last_offset_delta_other_than_count_minus_one_is_refused() {
    for lod in [0, 1, 3, i32::MAX] {
        let mut raw = honest(Compression::None);
        put_i32(&mut raw, field::LAST_OFFSET_DELTA, lod);
        recompute_crc(&mut raw);
        refused(
            &raw,
            &limits(),
            &format!("last_offset_delta {lod} (must be 2)"),
        );
    }
}

#[test]
fn trailing_bytes_after_the_last_record_are_refused() {
    for c in CODECS {
        let mut recs = records_of(&[RawRec::new(0, 0, b"a")]);
        recs.extend_from_slice(&[0xff, 0xff, 0xff]);
        let raw = forge(c, 1, NOW, NOW, 0, &recs);
        refused(&raw, &limits(), "3 bytes follow the last of them");
        // Trailing zero bytes are a (broken) record too, not padding.
        let mut recs = records_of(&[RawRec::new(0, 0, b"a")]);
        recs.push(0);
        refused(
            &forge(c, 1, NOW, NOW, 0, &recs),
            &limits(),
            "follow the last",
        );
    }
}

#[test]
fn offset_deltas_must_be_dense_and_in_order() {
    for deltas in [[0, 2], [1, 2], [1, 0], [0, 0], [0, -1]] {
        let recs = records_of(&[
            RawRec::new(deltas[0], 0, b"a"),
            RawRec::new(deltas[1], 0, b"b"),
        ]);
        let raw = forge(Compression::Lz4, 2, NOW, NOW, 0, &recs);
        refused(&raw, &limits(), "offset delta");
    }
    // What a consume-time processor writes (sparse deltas) is not a produce batch.
    let mut b = BatchBuilder::new(Compression::None);
    b.push_at(0, None, b"a", NOW, &[]);
    b.push_at(5, None, b"b", NOW, &[]);
    refused(
        &b.build_covering(0, 1),
        &limits(),
        "record 1 has offset delta 5",
    );
}

#[test]
fn the_first_record_must_carry_first_timestamp() {
    let recs = records_of(&[RawRec::new(0, 5, b"a")]);
    let raw = forge(Compression::None, 1, NOW, NOW + 5, 0, &recs);
    refused(&raw, &limits(), "record 0 has timestamp delta 5");
    // Patching first_timestamp of an honest batch moves every record's time, so
    // max_timestamp no longer matches.
    let mut raw = honest(Compression::Zstd);
    put_i64(&mut raw, field::FIRST_TIMESTAMP, NOW - 1000);
    recompute_crc(&mut raw);
    refused(&raw, &limits(), "max_timestamp");
}

#[test]
fn max_timestamp_must_be_the_largest_record_timestamp() {
    for lie in [NOW + 6, NOW + 8, NOW - 5, i64::MAX, -1] {
        let mut raw = honest(Compression::None);
        put_i64(&mut raw, field::MAX_TIMESTAMP, lie);
        recompute_crc(&mut raw);
        refused(
            &raw,
            &limits(),
            &format!(
                "header says max_timestamp {lie}, but the largest record timestamp is {}",
                NOW + 7
            ),
        );
    }
}

#[test]
fn negative_timestamps_are_refused_including_minus_one() {
    let unbounded = ProduceLimits {
        max_timestamp_skew_ms: i64::MAX,
        ..limits()
    };
    for ts in [-1, -2, i64::MIN] {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"x", ts, &[]);
        refused(
            &b.build(),
            &unbounded,
            &format!("record 0 has timestamp {ts}"),
        );
    }
    // A later record going negative through its delta.
    let mut b = BatchBuilder::new(Compression::None);
    b.push(None, b"x", 10, &[]);
    b.push(None, b"y", -1, &[]);
    refused(&b.build(), &unbounded, "record 1 has timestamp -1");
}

#[test]
fn i64_max_is_refused_whatever_the_skew() {
    for skew in [24 * HOUR, i64::MAX] {
        let l = ProduceLimits {
            max_timestamp_skew_ms: skew,
            ..limits()
        };
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"x", i64::MAX, &[]);
        refused(&b.build(), &l, "timestamp 9223372036854775807");
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"x", NOW, &[]);
        b.push(None, b"y", i64::MAX, &[]);
        refused(&b.build(), &l, "record 1 has timestamp 9223372036854775807");
    }
    // Year 9999 is the last one accepted when the skew allows it.
    let l = ProduceLimits {
        max_timestamp_skew_ms: i64::MAX,
        ..limits()
    };
    let mut b = BatchBuilder::new(Compression::None);
    b.push(None, b"x", MAX_TIMESTAMP_MS, &[]);
    validate_produce(&b.build(), &l).unwrap();
    let mut b = BatchBuilder::new(Compression::None);
    b.push(None, b"x", MAX_TIMESTAMP_MS + 1, &[]);
    refused(&b.build(), &l, "after the latest allowed");
}

#[test]
fn timestamps_further_than_the_skew_are_refused() {
    let l = ProduceLimits {
        max_timestamp_skew_ms: HOUR,
        ..limits()
    };
    for (ts, ok) in [
        (NOW + HOUR, true),
        (NOW - HOUR, true),
        (NOW + HOUR + 1, false),
        (NOW - HOUR - 1, false),
        (0, false),
    ] {
        let mut b = BatchBuilder::new(Compression::Zstd);
        b.push(None, b"x", NOW, &[]);
        b.push(None, b"y", ts, &[]);
        let raw = b.build();
        if ok {
            validate_produce(&raw, &l).unwrap();
        } else {
            let side = if ts > NOW { "ahead of" } else { "behind" };
            refused(
                &raw,
                &l,
                &format!(
                    "record 1 has timestamp {ts}, {} ms {side} the broker's time",
                    ts.abs_diff(NOW)
                ),
            );
        }
    }
    // A zero skew allows exactly the broker's time; a negative one is taken as zero.
    for skew in [0, -5] {
        let l = ProduceLimits {
            max_timestamp_skew_ms: skew,
            ..limits()
        };
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"x", NOW, &[]);
        validate_produce(&b.build(), &l).unwrap();
        b.push(None, b"x", NOW + 1, &[]);
        refused(&b.build(), &l, "the allowed difference is 0 ms");
    }
}

#[test]
fn a_delta_that_overflows_is_refused() {
    let recs = records_of(&[RawRec::new(0, 0, b"a"), RawRec::new(1, i64::MAX, b"b")]);
    let raw = forge(Compression::None, 2, NOW, NOW, 0, &recs);
    refused(&raw, &limits(), "overflows");
}

#[test]
fn lengths_beyond_the_bytes_present_are_refused() {
    let mut cases: Vec<(RawRec, &str)> = Vec::new();
    let mut r = RawRec::new(0, 0, b"v");
    r.header_count = Some(1000);
    cases.push((r, "header count 1000"));
    let mut r = RawRec::new(0, 0, b"v");
    r.header_count = Some(i64::MAX);
    cases.push((r, "header count 9223372036854775807"));
    let mut r = RawRec::new(0, 0, b"v");
    r.header_count = Some(-1);
    cases.push((r, "header count -1"));
    let mut r = RawRec::new(0, 0, b"v");
    r.key_len = Some(50);
    cases.push((r, "record key"));
    let mut r = RawRec::new(0, 0, b"v");
    r.key_len = Some(-2);
    cases.push((r, "key length -2"));
    let mut r = RawRec::new(0, 0, b"v");
    r.value_len = Some(1 << 40);
    cases.push((r, "record value"));
    let mut r = RawRec::new(0, 0, b"v");
    r.value_len = Some(-1);
    cases.push((r, "record value"));
    let mut r = RawRec::new(0, 0, b"v");
    r.len = Some(1 << 30);
    cases.push((r, "record 0 (byte 0 of the records section)"));
    let mut r = RawRec::new(0, 0, b"v");
    r.len = Some(0);
    cases.push((r, "length 0"));
    let mut r = RawRec::new(0, 0, b"v");
    r.headers = vec![(b"\xff\xfe", b"x")];
    cases.push((r, "not UTF-8"));
    for (rec, needle) in &cases {
        let mut recs = Vec::new();
        rec.encode(&mut recs);
        for c in CODECS {
            refused(&forge(c, 1, NOW, NOW, 0, &recs), &limits(), needle);
        }
    }
    // A record shorter than its length says, followed by another record.
    let mut recs = Vec::new();
    let mut r = RawRec::new(0, 0, b"v");
    r.len = Some(3);
    r.encode(&mut recs);
    RawRec::new(1, 0, b"w").encode(&mut recs);
    refused(
        &forge(Compression::None, 2, NOW, NOW, 0, &recs),
        &limits(),
        "record 0",
    );
    // A header value running past its record into the next one.
    let mut recs = Vec::new();
    let mut r = RawRec::new(0, 0, b"v");
    r.headers = vec![(b"k", b"vv")];
    r.encode(&mut recs);
    let hv = recs.len() - 3; // the header value's length varint
    recs[hv] = 2 * 40; // zigzag 40
    RawRec::new(1, 0, &[0u8; 60]).encode(&mut recs);
    refused(
        &forge(Compression::None, 2, NOW, NOW, 0, &recs),
        &limits(),
        "header value",
    );
}

#[test]
fn log_append_time_batches_skip_the_record_times_but_not_the_counts() {
    let latt = ATTR_LOG_APPEND_TIME;
    // Deltas that would be lies in a create-time batch do not matter here.
    let recs = records_of(&[RawRec::new(0, 77, b"a"), RawRec::new(1, -5, b"b")]);
    let raw = forge(Compression::Lz4, 2, 0, NOW, latt, &recs);
    validate_produce(&raw, &limits()).unwrap();
    refused(
        &forge(Compression::Lz4, 2, 0, NOW, 0, &recs),
        &limits(),
        "record 0 has timestamp delta 77",
    );
    // Counts and offsets are still checked.
    let mut lying = raw.clone();
    put_i32(&mut lying, field::RECORD_COUNT, i32::MAX);
    put_i32(&mut lying, field::LAST_OFFSET_DELTA, i32::MAX - 1);
    recompute_crc(&mut lying);
    refused(
        &lying,
        &limits(),
        "header says 2147483647 records, the batch holds 2",
    );
    // Every record reads as max_timestamp, so it must be a time the broker accepts.
    for bad in [i64::MAX, -1, NOW + 48 * HOUR] {
        let raw = forge(Compression::None, 2, 0, bad, latt, &recs);
        refused(&raw, &limits(), "max_timestamp of a log-append-time batch");
    }
    // The broker's own stamping yields a batch that passes.
    let mut b = honest(Compression::None);
    set_log_append_time(&mut b, NOW);
    validate_produce(&b, &limits()).unwrap();
}

#[test]
fn unknown_attribute_bits_and_control_batches_are_refused() {
    // Bit 5 is the control flag: markers are the broker's, never a producer's. Bit 6 (the
    // numbered header) is a producer's, but says a preamble starts the records.
    for bit in (5..15).filter(|b| *b != 6) {
        let mut raw = honest(Compression::None);
        let attrs = (1i16 << bit).to_be_bytes();
        raw[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs);
        recompute_crc(&mut raw);
        refused(&raw, &limits(), "set bits a producer may not set");
    }
    let marker = crate::batch::control_batch(7, 0, crate::batch::Marker::Commit, None, NOW);
    refused(&marker, &limits(), "set bits a producer may not set");
    let mut raw = honest(Compression::None);
    let attrs = ATTR_NUMBERED_HEADER.to_be_bytes();
    raw[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs);
    recompute_crc(&mut raw);
    // Its first record then reads as a preamble, and what follows as a broken record.
    refused(&raw, &limits(), "");
}

#[test]
fn a_transactional_batch_needs_a_producer_id_and_epoch() {
    let mut raw = honest(Compression::None);
    let attrs = crate::batch::ATTR_TRANSACTIONAL.to_be_bytes();
    raw[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs);
    recompute_crc(&mut raw);
    refused(
        &raw,
        &limits(),
        "a transactional batch needs the producer id and epoch",
    );
    let mut b = BatchBuilder::new(Compression::None);
    b.push(Some(b"k"), b"v", NOW, &[]);
    b.set_producer(42, 1, 0);
    b.set_transactional(true);
    let h = validate_produce(&b.build(), &limits()).unwrap();
    assert!(h.is_transactional() && !h.is_control());
}

#[test]
fn markers_read_back() {
    use crate::batch::{control_batch, coordinator_epoch_of, marker_of, Marker};
    for m in [Marker::Commit, Marker::Abort] {
        for coordinator in [None, Some(0), Some(7), Some(u64::MAX)] {
            let raw = control_batch(9, 2, m, coordinator, NOW);
            let h = crate::batch::validate(&raw, 1 << 20).unwrap();
            assert!(h.is_control() && h.is_transactional());
            assert_eq!((h.producer_id, h.producer_epoch), (9, 2));
            assert_eq!(marker_of(&raw), Some(m));
            assert_eq!(coordinator_epoch_of(&raw), coordinator);
        }
    }
    let plain = Bytes::from(honest(Compression::None));
    assert_eq!(marker_of(&plain), None);
    assert_eq!(coordinator_epoch_of(&plain), None);
}

#[test]
fn envelope_errors_keep_their_codes() {
    let raw = honest(Compression::None);
    let mut flipped = raw.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert_eq!(
        validate_produce(&flipped, &limits()).unwrap_err().code(),
        ErrorCode::CorruptBatch
    );
    let small = ProduceLimits {
        max_batch_bytes: 10,
        ..limits()
    };
    assert_eq!(
        validate_produce(&raw, &small).unwrap_err().code(),
        ErrorCode::MessageTooLarge
    );
    for c in [Compression::Lz4, Compression::Zstd] {
        let mut b = BatchBuilder::new(c);
        b.push(None, &[0u8; 10_000], NOW, &[]);
        let tight = ProduceLimits {
            max_decompressed_bytes: 1000,
            ..limits()
        };
        assert!(matches!(
            validate_produce(&b.build(), &tight),
            Err(ProtocolError::TooLarge { .. })
        ));
    }
    // Compressed bytes that are not lz4 / zstd at all.
    for c in [Compression::Lz4, Compression::Zstd] {
        let mut raw = forge(Compression::None, 1, NOW, NOW, 0, &[1, 2, 3, 4, 5, 6]);
        raw[field::ATTRIBUTES + 1] = c.attribute_bits() as u8;
        recompute_crc(&mut raw);
        assert!(validate_produce(&raw, &limits()).is_err());
    }
}

#[test]
fn every_cut_of_the_records_is_refused() {
    // Cut the records section anywhere (fixing length and CRC): never accepted, never a panic.
    for c in CODECS {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(Some(b"k"), b"first", NOW, &[("h", b"1")]);
        b.push(None, b"second", NOW + 1, &[]);
        let full = b.build();
        let records = &full[BATCH_HEADER_LEN..];
        for cut in 0..records.len() {
            let raw = forge(c, 2, NOW, NOW + 1, 0, &records[..cut]);
            let e = validate_produce(&raw, &limits()).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidRecord, "{c:?} cut {cut}: {e}");
        }
        validate_produce(&forge(c, 2, NOW, NOW + 1, 0, records), &limits()).unwrap();
    }
}

#[test]
fn record_iter_stops_at_a_lying_count_without_allocating_for_it() {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(None, b"only", NOW, &[]);
    let mut raw = b.build().to_vec();
    put_i32(&mut raw, field::RECORD_COUNT, i32::MAX);
    put_i32(&mut raw, field::LAST_OFFSET_DELTA, i32::MAX - 1);
    recompute_crc(&mut raw);
    let it = RecordIter::new(&Bytes::from(raw), 1 << 20).unwrap();
    assert!(it.size_hint().1.unwrap() <= 16);
    let all: Vec<_> = it.collect();
    assert_eq!(all.len(), 2);
    assert!(all[0].is_ok());
    assert!(all[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("holds fewer"));
}

#[test]
fn a_lying_header_count_is_refused_before_anything_is_reserved() {
    // 900 000 headers claimed over 1 000 000 bytes: each header takes at least 2 bytes, so
    // it cannot hold; the old decoder reserved 900 000 headers (50 MB) before reading one.
    let pad = vec![0u8; 1_000_000];
    let mut r = RawRec::new(0, 0, b"v");
    r.header_count = Some(900_000);
    r.tail = &pad;
    let mut recs = Vec::new();
    r.encode(&mut recs);
    let raw = forge(Compression::None, 1, NOW, NOW, 0, &recs);
    let big = ProduceLimits {
        max_batch_bytes: 1 << 22,
        ..limits()
    };
    refused(&raw, &big, "header count 900000 but only 1000000 bytes");
    let e = RecordIter::new(&Bytes::from(raw), 1 << 22)
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("header count 900000"), "{e}");
    // Exactly 500 000 empty headers do fit, and decode.
    let mut r = RawRec::new(0, 0, b"v");
    r.header_count = Some(500_000);
    r.tail = &pad;
    let mut recs = Vec::new();
    r.encode(&mut recs);
    let raw = forge(Compression::None, 1, NOW, NOW, 0, &recs);
    validate_produce(&raw, &big).unwrap();
    let rec = RecordIter::new(&Bytes::from(raw), 1 << 22)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(rec.headers.len(), 500_000);
}

#[derive(Debug, Clone)]
enum Lie {
    Count(i32),
    LastOffsetDelta(i32),
    FirstTimestamp(i64),
    MaxTimestamp(i64),
    Trailing(Vec<u8>),
    DropLast,
}

/// Key, value, time relative to NOW, headers.
type Rec = (Option<Vec<u8>>, Vec<u8>, i64, Vec<(String, Vec<u8>)>);

fn arb_record() -> impl Strategy<Value = Rec> {
    (
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        proptest::collection::vec(any::<u8>(), 0..64),
        -HOUR..HOUR,
        proptest::collection::vec(
            ("[a-zé]{0,6}", proptest::collection::vec(any::<u8>(), 0..8)),
            0..3,
        ),
    )
}

fn build(recs: &[Rec], c: Compression) -> Vec<u8> {
    let mut b = BatchBuilder::new(c);
    for (k, v, dt, hs) in recs {
        let hs: Vec<(&str, &[u8])> = hs.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        b.push(k.as_deref(), v, NOW + dt, &hs);
    }
    b.build().to_vec()
}

proptest! {
    #[test]
    fn every_honest_batch_passes(
        recs in proptest::collection::vec(arb_record(), 1..30),
        codec in 0usize..3,
        log_append in any::<bool>(),
    ) {
        let mut raw = build(&recs, CODECS[codec]);
        if log_append {
            set_log_append_time(&mut raw, NOW);
        }
        let h = validate_produce(&raw, &limits()).unwrap();
        prop_assert_eq!(h.record_count as usize, recs.len());
        // And what validate_produce accepts, RecordIter reads back in full.
        let got: Vec<Record> = RecordIter::new(&Bytes::from(raw), 1 << 20)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        prop_assert_eq!(got.len(), recs.len());
        for (r, (k, v, dt, hs)) in got.iter().zip(&recs) {
            prop_assert_eq!(r.key.as_deref(), k.as_deref());
            prop_assert_eq!(&r.value[..], &v[..]);
            prop_assert_eq!(r.timestamp, if log_append { NOW } else { NOW + dt });
            prop_assert_eq!(r.headers.len(), hs.len());
        }
    }

    #[test]
    fn every_lie_is_refused(
        recs in proptest::collection::vec(arb_record(), 1..10),
        codec in 0usize..3,
        lie in prop_oneof![
            (1..=i32::MAX).prop_map(Lie::Count),
            (0..=i32::MAX).prop_map(Lie::LastOffsetDelta),
            any::<i64>().prop_map(Lie::FirstTimestamp),
            any::<i64>().prop_map(Lie::MaxTimestamp),
            proptest::collection::vec(any::<u8>(), 1..8).prop_map(Lie::Trailing),
            Just(Lie::DropLast),
        ],
    ) {
        let c = CODECS[codec];
        let raw = build(&recs, c);
        let h = BatchHeader::parse(&raw).unwrap();
        let n = recs.len() as i32;
        let forged = match &lie {
            Lie::Count(v) => {
                prop_assume!(*v != n);
                let mut x = raw.clone();
                put_i32(&mut x, field::RECORD_COUNT, *v);
                put_i32(&mut x, field::LAST_OFFSET_DELTA, *v - 1);
                recompute_crc(&mut x);
                x
            }
            Lie::LastOffsetDelta(v) => {
                prop_assume!(*v != n - 1);
                let mut x = raw.clone();
                put_i32(&mut x, field::LAST_OFFSET_DELTA, *v);
                recompute_crc(&mut x);
                x
            }
            Lie::FirstTimestamp(v) => {
                prop_assume!(*v != h.first_timestamp);
                let mut x = raw.clone();
                put_i64(&mut x, field::FIRST_TIMESTAMP, *v);
                recompute_crc(&mut x);
                x
            }
            Lie::MaxTimestamp(v) => {
                prop_assume!(*v != get_i64(&raw, field::MAX_TIMESTAMP));
                let mut x = raw.clone();
                put_i64(&mut x, field::MAX_TIMESTAMP, *v);
                recompute_crc(&mut x);
                x
            }
            Lie::Trailing(extra) => {
                let mut body = c.decompress(&raw[BATCH_HEADER_LEN..], 1 << 20).unwrap();
                body.extend_from_slice(extra);
                forge(c, n, h.first_timestamp, h.max_timestamp, 0, &body)
            }
            Lie::DropLast => {
                let body = c.decompress(&raw[BATCH_HEADER_LEN..], 1 << 20).unwrap();
                let mut pos = 0;
                for _ in 0..n - 1 {
                    record::scan_record(&body, &mut pos, None).unwrap();
                }
                forge(c, n, h.first_timestamp, h.max_timestamp, 0, &body[..pos])
            }
        };
        let e = validate_produce(&forged, &limits());
        prop_assert!(
            matches!(e, Err(ProtocolError::InvalidRecord { .. })),
            "{:?} accepted or wrong error: {:?}", lie, e
        );
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = validate_produce(&data, &limits());
        // With a valid envelope around them, random records are walked too.
        for c in CODECS {
            let raw = forge(c, 3, NOW, NOW, 0, &data);
            let _ = validate_produce(&raw, &limits());
        }
    }
}
