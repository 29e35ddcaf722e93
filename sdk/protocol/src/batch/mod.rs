//! The record batch: the unit that producers send, the broker stores and consumers read.
//!
//! Layout (big-endian), 61-byte header then records:
//! ```text
//!  0 base_offset i64      8 batch_length i32 (bytes after this field)
//! 12 leader_epoch i32    16 magic i8 (=2)     17 crc u32 (CRC32C of bytes 21..)
//! 21 attributes i16      23 last_offset_delta i32
//! 27 first_timestamp i64 35 max_timestamp i64
//! 43 producer_id i64     51 producer_epoch i16 53 base_sequence i32
//! 57 record_count i32    61 records (possibly compressed)
//! ```
//! The CRC leaves out the base offset and the leader epoch, so the leader assigns both by
//! rewriting bytes in place ([`set_base_offset`], [`set_leader_epoch`]) without re-encoding.

mod builder;
mod compression;
mod record;

pub use builder::BatchBuilder;
pub use compression::Compression;
pub use record::{Header, Record, RecordIter};

use bytes::Bytes;

use crate::ProtocolError;

/// Bytes before the first record.
pub const BATCH_HEADER_LEN: usize = 61;
/// The only batch format version.
pub const MAGIC: i8 = 2;
const CRC_OFFSET: usize = 17;
const CRC_START: usize = 21;
/// Attribute bit: timestamps are the broker's append time.
pub const ATTR_LOG_APPEND_TIME: i16 = 1 << 3;

/// The decoded header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: i64,
    /// Bytes after the length field.
    pub batch_length: i32,
    /// Leader epoch of the leader that appended it.
    pub leader_epoch: i32,
    /// Format version.
    pub magic: i8,
    /// Stored CRC32C.
    pub crc: u32,
    /// Compression (bits 0–2) and timestamp type (bit 3).
    pub attributes: i16,
    /// Offset of the last record minus `base_offset`.
    pub last_offset_delta: i32,
    /// Timestamp of the first record (ms).
    pub first_timestamp: i64,
    /// Largest timestamp in the batch (ms).
    pub max_timestamp: i64,
    /// Idempotent producer id, or -1.
    pub producer_id: i64,
    /// Producer epoch, or -1.
    pub producer_epoch: i16,
    /// Sequence of the first record for this producer and partition, or -1.
    pub base_sequence: i32,
    /// Number of records.
    pub record_count: i32,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

impl BatchHeader {
    /// Parses the header of the batch at the front of `buf` (no CRC check).
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, ProtocolError> {
        if buf.len() < BATCH_HEADER_LEN {
            return Err(ProtocolError::Truncated {
                needed: BATCH_HEADER_LEN - buf.len(),
            });
        }
        let h = BatchHeader {
            base_offset: be_i64(buf, 0),
            batch_length: be_i32(buf, 8),
            leader_epoch: be_i32(buf, 12),
            magic: buf[16] as i8,
            crc: be_i32(buf, CRC_OFFSET) as u32,
            attributes: be_i16(buf, 21),
            last_offset_delta: be_i32(buf, 23),
            first_timestamp: be_i64(buf, 27),
            max_timestamp: be_i64(buf, 35),
            producer_id: be_i64(buf, 43),
            producer_epoch: be_i16(buf, 51),
            base_sequence: be_i32(buf, 53),
            record_count: be_i32(buf, 57),
        };
        if h.magic != MAGIC {
            return Err(ProtocolError::malformed(
                "batch",
                format!("magic {} is not {MAGIC}", h.magic),
            ));
        }
        if (h.batch_length as i64) < (BATCH_HEADER_LEN as i64 - 12) {
            return Err(ProtocolError::malformed(
                "batch",
                "length shorter than the header",
            ));
        }
        if h.record_count < 0 || h.last_offset_delta < 0 {
            return Err(ProtocolError::malformed(
                "batch",
                "negative record count or offset delta",
            ));
        }
        Ok(h)
    }

    /// Total bytes of the batch, header included.
    pub fn total_len(&self) -> usize {
        self.batch_length as usize + 12
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    /// The offset after this batch.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    /// The compression codec.
    pub fn compression(&self) -> Result<Compression, ProtocolError> {
        Compression::from_attributes(self.attributes)
    }
}

/// Validates a whole batch as a broker does before storing it: header, length, CRC,
/// codec, and that `last_offset_delta == record_count - 1`.
pub fn validate(batch: &[u8], max_batch_bytes: usize) -> Result<BatchHeader, ProtocolError> {
    let h = BatchHeader::parse(batch)?;
    if h.total_len() > max_batch_bytes {
        return Err(ProtocolError::TooLarge {
            what: "batch",
            len: h.total_len() as u64,
            limit: max_batch_bytes as u64,
        });
    }
    if h.total_len() != batch.len() {
        return Err(ProtocolError::malformed(
            "batch",
            format!(
                "length field says {} bytes, got {}",
                h.total_len(),
                batch.len()
            ),
        ));
    }
    if h.record_count == 0 || i64::from(h.last_offset_delta) != i64::from(h.record_count) - 1 {
        return Err(ProtocolError::malformed(
            "batch",
            format!(
                "{} records but last offset delta {}",
                h.record_count, h.last_offset_delta
            ),
        ));
    }
    h.compression()?;
    let computed = crc32c::crc32c(&batch[CRC_START..]);
    if computed != h.crc {
        return Err(ProtocolError::CrcMismatch {
            stored: h.crc,
            computed,
        });
    }
    Ok(h)
}

/// Checks only the CRC of a stored batch (used on read and on recovery).
pub fn check_crc(batch: &[u8]) -> Result<BatchHeader, ProtocolError> {
    let h = BatchHeader::parse(batch)?;
    if h.total_len() != batch.len() {
        return Err(ProtocolError::malformed("batch", "stored length mismatch"));
    }
    let computed = crc32c::crc32c(&batch[CRC_START..]);
    if computed != h.crc {
        return Err(ProtocolError::CrcMismatch {
            stored: h.crc,
            computed,
        });
    }
    Ok(h)
}

/// Rewrites the base offset in place (not covered by the CRC).
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[0..8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Rewrites the leader epoch in place (not covered by the CRC).
pub fn set_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[12..16].copy_from_slice(&epoch.to_be_bytes());
}

/// Rewrites the timestamps to the broker's append time and recomputes the CRC
/// (only for topics with log-append-time timestamps).
pub fn set_log_append_time(batch: &mut [u8], now_ms: i64) {
    let attrs = be_i16(batch, 21) | ATTR_LOG_APPEND_TIME;
    batch[21..23].copy_from_slice(&attrs.to_be_bytes());
    batch[35..43].copy_from_slice(&now_ms.to_be_bytes());
    let crc = crc32c::crc32c(&batch[CRC_START..]);
    batch[CRC_OFFSET..CRC_START].copy_from_slice(&crc.to_be_bytes());
}

/// Splits a buffer of concatenated batches (a produce or fetch payload) into batches,
/// checking each length against `max_batch_bytes`. A trailing partial batch is an error.
pub fn split_batches(buf: &Bytes, max_batch_bytes: usize) -> Result<Vec<Bytes>, ProtocolError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let h = BatchHeader::parse(&buf[pos..])?;
        let len = h.total_len();
        if len > max_batch_bytes {
            return Err(ProtocolError::TooLarge {
                what: "batch",
                len: len as u64,
                limit: max_batch_bytes as u64,
            });
        }
        if pos + len > buf.len() {
            return Err(ProtocolError::Truncated {
                needed: pos + len - buf.len(),
            });
        }
        out.push(buf.slice(pos..pos + len));
        pos += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(compression: Compression) -> Bytes {
        let mut b = BatchBuilder::new(compression);
        b.push(Some(b"k1"), b"value one", 1000, &[]);
        b.push(None, b"value two", 1005, &[("h", b"x")]);
        b.build()
    }

    #[test]
    fn batch_round_trip_all_codecs() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let mut raw = sample(c).to_vec();
            set_base_offset(&mut raw, 40);
            set_leader_epoch(&mut raw, 3);
            let h = validate(&raw, 1 << 20).unwrap();
            assert_eq!((h.base_offset, h.leader_epoch, h.record_count), (40, 3, 2));
            assert_eq!(h.max_timestamp, 1005);
            let recs: Vec<Record> = RecordIter::new(&Bytes::from(raw), 1 << 20)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(recs[0].offset, 40);
            assert_eq!(recs[0].key.as_deref(), Some(&b"k1"[..]));
            assert_eq!(&recs[1].value[..], b"value two");
            assert_eq!(recs[1].offset, 41);
            assert_eq!(recs[1].timestamp, 1005);
            assert_eq!(recs[1].headers[0].key, "h");
        }
    }

    #[test]
    fn flipped_byte_fails_crc() {
        let mut raw = sample(Compression::None).to_vec();
        let n = raw.len() - 1;
        raw[n] ^= 1;
        assert!(matches!(
            validate(&raw, 1 << 20),
            Err(ProtocolError::CrcMismatch { .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let raw = sample(Compression::Lz4);
        for n in 0..raw.len() {
            assert!(validate(&raw[..n], 1 << 20).is_err());
            assert!(
                split_batches(&raw.slice(..n), 1 << 20)
                    .map(|v| v.is_empty())
                    .unwrap_or(true)
                    || n == 0
            );
        }
    }

    #[test]
    fn oversized_batch_is_refused() {
        let raw = sample(Compression::None);
        assert!(matches!(
            validate(&raw, 10),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn records_round_trip(
            recs in proptest::collection::vec(
                (proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
                 proptest::collection::vec(any::<u8>(), 0..200),
                 0i64..1_000_000), 1..40),
            codec in 0usize..3,
        ) {
            let c = [Compression::None, Compression::Lz4, Compression::Zstd][codec];
            let mut b = BatchBuilder::new(c);
            for (k, v, t) in &recs {
                b.push(k.as_deref(), v, *t, &[]);
            }
            let raw = b.build();
            let h = validate(&raw, 1 << 24).unwrap();
            prop_assert_eq!(h.record_count as usize, recs.len());
            let got: Vec<Record> = RecordIter::new(&raw, 1 << 24).unwrap().collect::<Result<_, _>>().unwrap();
            for (i, (r, (k, v, t))) in got.iter().zip(&recs).enumerate() {
                prop_assert_eq!(r.offset, i as i64);
                prop_assert_eq!(r.key.as_deref(), k.as_deref());
                prop_assert_eq!(&r.value[..], &v[..]);
                prop_assert_eq!(r.timestamp, *t);
            }
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let b = Bytes::from(data);
            let _ = validate(&b, 1 << 20);
            let _ = split_batches(&b, 1 << 20);
            if let Ok(it) = RecordIter::new(&b, 1 << 16) {
                for r in it { if r.is_err() { break; } }
            }
        }
    }
}
