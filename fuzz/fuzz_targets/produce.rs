//! What the broker checks at produce (`validate_produce`) and what consumers decode
//! (`RecordIter`). The input is used twice: as a whole batch, and as the records section of
//! a batch whose envelope (length, CRC) is made valid here, so the fuzzer reaches the
//! record walker instead of stopping at the CRC. Oracle: a batch `validate_produce` accepts
//! is read back whole by `RecordIter`, with the offsets and timestamps its header promised.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::batch::{
    field, recompute_crc, validate, validate_produce, Compression, ProduceLimits, Record,
    RecordIter, ATTR_LOG_APPEND_TIME, ATTR_NUMBERED_HEADER, BATCH_HEADER_LEN, MAGIC,
    MAX_TIMESTAMP_MS,
};

const NOW: i64 = 1_700_000_000_000;

const LIMITS: ProduceLimits = ProduceLimits {
    max_batch_bytes: 1 << 20,
    max_decompressed_bytes: 1 << 20,
    now_ms: NOW,
    max_timestamp_skew_ms: 1 << 20,
};

fn check(batch: &[u8]) {
    let bytes = Bytes::copy_from_slice(batch);
    match validate_produce(batch, &LIMITS) {
        Ok(h) => {
            assert!(validate(batch, LIMITS.max_batch_bytes).is_ok());
            let records: Vec<Record> = RecordIter::new(&bytes, LIMITS.max_decompressed_bytes)
                .expect("an accepted batch opens")
                .collect::<Result<_, _>>()
                .expect("every record of an accepted batch decodes");
            assert_eq!(records.len(), h.record_count as usize);
            let append_time = h.attributes & ATTR_LOG_APPEND_TIME != 0;
            let mut max = i64::MIN;
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.offset, h.base_offset + i as i64);
                assert!((0..=MAX_TIMESTAMP_MS).contains(&r.timestamp));
                assert!(r.timestamp.abs_diff(NOW) <= LIMITS.max_timestamp_skew_ms as u64);
                max = max.max(r.timestamp);
            }
            assert_eq!(max, h.max_timestamp);
            if !append_time {
                assert_eq!(records[0].timestamp, h.first_timestamp);
            }
        }
        Err(_) => {
            if let Ok(it) = RecordIter::new(&bytes, LIMITS.max_decompressed_bytes) {
                for r in it {
                    if r.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() < 8 {
        return;
    }
    let (ctl, records) = data.split_at(8);
    let codec = [Compression::None, Compression::Lz4, Compression::Zstd][ctl[0] as usize % 3];
    let mut attrs = codec.attribute_bits();
    if ctl[0] & 0x80 != 0 {
        attrs |= ATTR_LOG_APPEND_TIME;
    }
    if ctl[0] & 0x20 != 0 {
        // The records section starts with a numbered header's preamble.
        attrs |= ATTR_NUMBERED_HEADER;
    }
    // Compress the records when asked, else leave raw bytes for the decompressor to chew.
    let body: Vec<u8> = match (codec, ctl[0] & 0x40 != 0) {
        (Compression::Lz4, true) => lz4_flex::compress_prepend_size(records),
        (Compression::Zstd, true) => zstd::bulk::compress(records, 1).unwrap_or_default(),
        _ => records.to_vec(),
    };
    let count = match ctl[1] {
        255 => i32::MAX,
        n => i32::from(n),
    };
    let first_ts = NOW + i64::from(i16::from_be_bytes([ctl[2], ctl[3]]));
    let max_ts = first_ts + i64::from(u16::from_be_bytes([ctl[4], ctl[5]]));
    let mut b = vec![0u8; BATCH_HEADER_LEN];
    b[field::BATCH_LENGTH..field::BATCH_LENGTH + 4]
        .copy_from_slice(&((BATCH_HEADER_LEN - 12 + body.len()) as i32).to_be_bytes());
    b[field::MAGIC] = MAGIC as u8;
    b[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
    b[field::LAST_OFFSET_DELTA..field::LAST_OFFSET_DELTA + 4]
        .copy_from_slice(&(count - 1).max(0).to_be_bytes());
    b[field::FIRST_TIMESTAMP..field::FIRST_TIMESTAMP + 8].copy_from_slice(&first_ts.to_be_bytes());
    b[field::MAX_TIMESTAMP..field::MAX_TIMESTAMP + 8].copy_from_slice(&max_ts.to_be_bytes());
    b[field::BASE_OFFSET..field::BASE_OFFSET + 8].copy_from_slice(&i64::from(ctl[6]).to_be_bytes());
    b[field::RECORD_COUNT..field::RECORD_COUNT + 4].copy_from_slice(&count.to_be_bytes());
    b.extend_from_slice(&body);
    recompute_crc(&mut b);
    check(&b);
});
