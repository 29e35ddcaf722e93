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
//! Byte positions of the header fields are in [`field`].
//!
//! Each record (zigzag varints, Kafka's v2 record):
//! ```text
//! length | attributes i8 | timestamp_delta | offset_delta | key_len (-1: no key) | key
//!        | value_len | value | header_count | header_count × (key_len | key (UTF-8) | value_len | value)
//!        [| number delta, when attributes bit 0: the batch's numbered header]
//! ```
//! A batch with [`ATTR_NUMBERED_HEADER`] (bit 6) starts its records section with the
//! numbered header's preamble (key, value prefix, base number); a record whose attributes
//! have bit 0 set reads back with one more header, last: the key, and the prefix followed by
//! base + its delta in decimal.
//!
//! # Checking a produced batch
//! [`validate`] checks the envelope (header, length, CRC, codec). A broker accepting a
//! produce calls [`validate_produce`] instead, which also walks the records actually present
//! (decompressing within a limit) and refuses, with [`ProtocolError::InvalidRecord`]
//! (wire code [`crate::ErrorCode::InvalidRecord`]), a batch whose header lies about them:
//! - `record_count` must be at least 1 and equal the number of records in the batch, with
//!   no bytes after the last one; `last_offset_delta` must be `record_count - 1`;
//! - offset deltas must be exactly `0, 1, …, n-1` in order;
//! - create-time batches: the first record's timestamp delta must be 0 (so
//!   `first_timestamp` is its time), a record's timestamp is `first_timestamp + delta`, and
//!   `max_timestamp` must be the largest of them. Log-append-time batches (attribute bit 3):
//!   records are read with `max_timestamp` as their time, so their deltas are not compared,
//!   but `max_timestamp` itself is range-checked like a record's timestamp;
//! - every timestamp must lie in `0 ..= MAX_TIMESTAMP_MS` **and** within
//!   [`ProduceLimits::max_timestamp_skew_ms`] of the broker's clock, before or after (Kafka's
//!   `message.timestamp.difference.max.ms`). Negative timestamps are refused, including
//!   Kafka's -1 "no timestamp": Quiver's producers always stamp records, and time retention
//!   and by-time lookup need a real time. `i64::MAX` is refused even with an unbounded skew;
//! - every record's length, key, value, header count and header lengths must lie within
//!   the record; header keys must be UTF-8 (what [`RecordIter`] needs to read them back);
//!   a key length below -1 or a negative value length is refused;
//! - attribute bits other than the codec (0–2), timestamp type (3), transactional flag (4)
//!   and numbered header (6) are refused (control batches, bit 5, are written by the broker
//!   only), and a transactional batch must carry a producer id and epoch;
//! - a numbered header's preamble must be well formed (key 1–255 bytes of UTF-8, prefix at
//!   most 512 bytes, base ≥ 0), only a batch with one may have records carrying it, each
//!   such record's number must be a non-negative i64, and the records decoded with it may
//!   not exceed the decompression limit (each record counted with the key, the prefix and
//!   19 digits).
//!
//! # Transactions
//! A transactional batch ([`ATTR_TRANSACTIONAL`]) belongs to the open transaction of its
//! producer id until the broker writes a marker ([`control_batch`], [`Marker`]) for it in the
//! partition: commit makes the records readable by read-committed consumers, abort voids
//! them. Consumers skip control batches.
//!
//! Tests that forge batches patch header fields in place and call [`recompute_crc`].

mod builder;
mod compression;
mod numbered;
mod record;

pub use builder::BatchBuilder;

/// Producer sequence numbers run from 0 to `i32::MAX` and then wrap to 0 (as Kafka's do):
/// the sequence `n` records after `seq`.
pub fn sequence_after(seq: i32, n: i32) -> i32 {
    (i64::from(seq) + i64::from(n)).rem_euclid(1 << 31) as i32
}

/// How far sequence `seq` is ahead of `from`, counting forward around the wrap (in
/// `0..2^31`: a sequence just behind `from` is nearly 2^31 ahead).
pub fn sequence_distance(from: i32, seq: i32) -> i64 {
    (i64::from(seq) - i64::from(from)).rem_euclid(1 << 31)
}
pub use compression::Compression;
pub use numbered::{MAX_KEY_BYTES, MAX_PREFIX_BYTES, RECORD_ATTR_NUMBERED};
pub use record::{Header, Record, RecordIter};

use bytes::Bytes;

use record::scan_record;

use crate::ProtocolError;

/// Bytes before the first record.
pub const BATCH_HEADER_LEN: usize = 61;
/// The only batch format version.
pub const MAGIC: i8 = 2;
const CRC_OFFSET: usize = 17;
const CRC_START: usize = 21;
/// Attribute bit: timestamps are the broker's append time.
pub const ATTR_LOG_APPEND_TIME: i16 = 1 << 3;
/// Attribute bit: the batch belongs to a transaction of its producer id (Kafka's bit 4); its
/// records are readable by read-committed consumers only once the transaction commits.
pub const ATTR_TRANSACTIONAL: i16 = 1 << 4;
/// Attribute bit: a control batch (Kafka's bit 5) — one transaction marker written by the
/// broker, never by a client; consumers skip it.
pub const ATTR_CONTROL: i16 = 1 << 5;
/// Attribute bit: the records section starts with the batch's numbered header (a header
/// its records carry last, written once as a key and a value prefix; each record that
/// carries it adds only its number). See the `numbered` module for the layout.
pub const ATTR_NUMBERED_HEADER: i16 = 1 << 6;
/// Producer ids with this bit set are handed out by transaction coordinators
/// (InitTransactions) and write only transactional batches; an idempotent producer picks
/// its own random id below it. Keeping the two apart stops a non-transactional batch from
/// touching (and fencing) a transactional producer's state on a partition.
pub const COORDINATOR_PRODUCER_ID_BIT: i64 = 1 << 62;
/// Attribute bits a produced batch may set: the codec (bits 0–2), the timestamp type
/// (bit 3), the transactional flag (bit 4) and the numbered header (bit 6).
const KNOWN_ATTRIBUTES: i16 = 0x1f | ATTR_NUMBERED_HEADER;
/// The latest timestamp a produced record may carry: 9999-12-31T23:59:59.999Z, in ms since
/// the Unix epoch. Anything later is a bug or an attack, whatever the allowed skew.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// Byte positions of the batch header's fields (see the layout above), for code that
/// patches a batch in place, e.g. tests forging a lying batch before [`recompute_crc`].
pub mod field {
    /// `base_offset`, i64 (not covered by the CRC).
    pub const BASE_OFFSET: usize = 0;
    /// `batch_length`, i32 (not covered by the CRC).
    pub const BATCH_LENGTH: usize = 8;
    /// `leader_epoch`, i32 (not covered by the CRC).
    pub const LEADER_EPOCH: usize = 12;
    /// `magic`, i8 (not covered by the CRC).
    pub const MAGIC: usize = 16;
    /// `crc`, u32: CRC32C of every byte from [`ATTRIBUTES`] to the end.
    pub const CRC: usize = 17;
    /// `attributes`, i16.
    pub const ATTRIBUTES: usize = 21;
    /// `last_offset_delta`, i32.
    pub const LAST_OFFSET_DELTA: usize = 23;
    /// `first_timestamp`, i64.
    pub const FIRST_TIMESTAMP: usize = 27;
    /// `max_timestamp`, i64.
    pub const MAX_TIMESTAMP: usize = 35;
    /// `producer_id`, i64.
    pub const PRODUCER_ID: usize = 43;
    /// `producer_epoch`, i16.
    pub const PRODUCER_EPOCH: usize = 51;
    /// `base_sequence`, i32.
    pub const BASE_SEQUENCE: usize = 53;
    /// `record_count`, i32.
    pub const RECORD_COUNT: usize = 57;
    /// The first record.
    pub const RECORDS: usize = 61;
}

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

    /// Part of a transaction.
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    /// A transaction marker written by the broker.
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    /// The records section starts with a numbered header ([`ATTR_NUMBERED_HEADER`]).
    pub fn has_numbered_header(&self) -> bool {
        self.attributes & ATTR_NUMBERED_HEADER != 0
    }
}

/// The batch's numbered header, when `h` says it has one: the preamble at the front of its
/// records section `data` (`*pos` moves past it). A batch whose records, decoded with it,
/// could take more than `limit` bytes (the records' bytes plus what the preamble can add
/// to each) is refused as too large.
fn numbered_preamble(
    h: &BatchHeader,
    data: &[u8],
    pos: &mut usize,
    limit: usize,
) -> Result<Option<numbered::Preamble>, ProtocolError> {
    if !h.has_numbered_header() {
        return Ok(None);
    }
    let preamble = numbered::parse_preamble(data, pos)?;
    let decoded = data
        .len()
        .saturating_add(preamble.expansion_bound(h.record_count));
    if decoded > limit {
        return Err(ProtocolError::TooLarge {
            what: "records decoded with their numbered headers",
            len: decoded as u64,
            limit: limit as u64,
        });
    }
    Ok(Some(preamble))
}

/// What a transaction marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// The producer's transaction was aborted: its records before this marker are void.
    Abort,
    /// The producer's transaction committed.
    Commit,
}

/// A control batch holding one transaction marker of `producer_id`/`epoch`, transactional
/// and control. Its one record's key is version i16 = 0 and type i16 (0 abort, 1 commit);
/// its value is empty, or version i16 = 0 and the coordinator epoch u64 when a transaction
/// coordinator decided the marker (Kafka's control record): a partition refuses a marker
/// from an older coordinator epoch than one it already took for the producer, so a deposed
/// coordinator's marker still in flight cannot end a newer transaction.
pub fn control_batch(
    producer_id: i64,
    epoch: i16,
    marker: Marker,
    coordinator_epoch: Option<u64>,
    now_ms: i64,
) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    let kind: i16 = match marker {
        Marker::Abort => 0,
        Marker::Commit => 1,
    };
    let mut key = [0u8; 4];
    key[2..].copy_from_slice(&kind.to_be_bytes());
    let mut value = Vec::new();
    if let Some(e) = coordinator_epoch {
        value.extend_from_slice(&0i16.to_be_bytes());
        value.extend_from_slice(&e.to_be_bytes());
    }
    b.push(Some(&key), &value, now_ms, &[]);
    b.set_producer(producer_id, epoch, -1);
    let mut raw = b.build().to_vec();
    let attrs = i16::from_be_bytes([raw[field::ATTRIBUTES], raw[field::ATTRIBUTES + 1]])
        | ATTR_TRANSACTIONAL
        | ATTR_CONTROL;
    raw[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
    recompute_crc(&mut raw);
    Bytes::from(raw)
}

/// The marker of a control batch (`None` for any other batch, or one that does not decode).
pub fn marker_of(batch: &Bytes) -> Option<Marker> {
    let h = BatchHeader::parse(batch).ok()?;
    if !h.is_control() {
        return None;
    }
    let r = RecordIter::new(batch, 1024).ok()?.next()?.ok()?;
    match r.key.as_deref() {
        Some([0, 0, 0, 0]) => Some(Marker::Abort),
        Some([0, 0, 0, 1]) => Some(Marker::Commit),
        _ => None,
    }
}

/// The coordinator epoch a control batch's marker carries (`None` for a marker no
/// coordinator decided, one written before markers carried it, or any other batch).
pub fn coordinator_epoch_of(batch: &[u8]) -> Option<u64> {
    let h = BatchHeader::parse(batch).ok()?;
    if !h.is_control() {
        return None;
    }
    // A control batch is one small record: copied only here.
    let r = RecordIter::new(&Bytes::copy_from_slice(batch), 1024)
        .ok()?
        .next()?
        .ok()?;
    match r.value.as_ref() {
        [0, 0, epoch @ ..] => Some(u64::from_be_bytes(epoch.try_into().ok()?)),
        _ => None,
    }
}

/// The header, length, size, codec and CRC of one whole batch.
fn check_envelope(batch: &[u8], max_batch_bytes: usize) -> Result<BatchHeader, ProtocolError> {
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
    h.compression()?;
    verify_crc(batch, &h)?;
    Ok(h)
}

/// Validates a whole batch's envelope: header, length, CRC, codec, and that
/// `last_offset_delta == record_count - 1` with at least one record. It does not look at the
/// records: a broker accepting a produce uses [`validate_produce`].
pub fn validate(batch: &[u8], max_batch_bytes: usize) -> Result<BatchHeader, ProtocolError> {
    let h = check_envelope(batch, max_batch_bytes)?;
    if h.record_count == 0 || i64::from(h.last_offset_delta) != i64::from(h.record_count) - 1 {
        return Err(ProtocolError::malformed(
            "batch",
            format!(
                "{} records but last offset delta {}",
                h.record_count, h.last_offset_delta
            ),
        ));
    }
    Ok(h)
}

/// What [`validate_produce`] checks a batch against: sizes, and the broker's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceLimits {
    /// Largest batch, header included (the topic's `max.message.bytes`).
    pub max_batch_bytes: usize,
    /// Largest records section after decompression (a compressed batch inflating past it
    /// is refused with [`ProtocolError::TooLarge`]).
    pub max_decompressed_bytes: usize,
    /// The broker's time now, ms since the Unix epoch.
    pub now_ms: i64,
    /// How far a record's timestamp may be from `now_ms`, before or after, in ms (Kafka's
    /// `message.timestamp.difference.max.ms`). `i64::MAX` leaves only the absolute range
    /// `0 ..= MAX_TIMESTAMP_MS`; a negative value is taken as 0.
    pub max_timestamp_skew_ms: i64,
}

fn records(n: u64) -> String {
    if n == 1 {
        "1 record".to_string()
    } else {
        format!("{n} records")
    }
}

/// Checks one timestamp against the limits; `what` names it in the error (built only then:
/// this runs for every produced record).
fn check_timestamp(
    ts: i64,
    what: impl Fn() -> String,
    limits: &ProduceLimits,
) -> Result<(), ProtocolError> {
    if ts < 0 {
        let what = what();
        return Err(ProtocolError::invalid_record(format!(
            "{what} has timestamp {ts}; timestamps must be 0 or later (ms since the Unix epoch; \
             -1 \"no timestamp\" is not accepted)"
        )));
    }
    if ts > MAX_TIMESTAMP_MS {
        let what = what();
        return Err(ProtocolError::invalid_record(format!(
            "{what} has timestamp {ts}, after the latest allowed {MAX_TIMESTAMP_MS} (year 9999)"
        )));
    }
    let skew = limits.max_timestamp_skew_ms.max(0) as u64;
    let diff = ts.abs_diff(limits.now_ms);
    if diff > skew {
        let what = what();
        let side = if ts > limits.now_ms {
            "ahead of"
        } else {
            "behind"
        };
        return Err(ProtocolError::invalid_record(format!(
            "{what} has timestamp {ts}, {diff} ms {side} the broker's time {}; \
             the allowed difference is {skew} ms",
            limits.now_ms
        )));
    }
    Ok(())
}

/// The most memory [`validate_produce`] allocates to decompress this batch's records, with
/// `max_decompressed_bytes` as its limit: 0 for an uncompressed batch (read in place) or
/// one too broken to reach decompression. A broker checking many batches at once reserves
/// this much of a shared budget before each.
pub fn decompression_bound(batch: &[u8], max_decompressed_bytes: usize) -> usize {
    let Ok(h) = BatchHeader::parse(batch) else {
        return 0;
    };
    match h.compression() {
        Ok(c) => c.inflated_bound(&batch[BATCH_HEADER_LEN..], max_decompressed_bytes),
        Err(_) => 0,
    }
}

/// Validates a produced batch as a broker must before storing it: everything [`validate`]
/// checks (header, length, size, codec, CRC), then the records actually present, walked
/// (decompressed within [`ProduceLimits::max_decompressed_bytes`]) and compared with what
/// the header says. The rules are listed in the [module documentation](self); a batch that
/// breaks one is refused with [`ProtocolError::InvalidRecord`] naming what is wrong.
///
/// Other errors keep their codes: a bad CRC is [`ProtocolError::CrcMismatch`], a batch or
/// its decompressed records over the limits [`ProtocolError::TooLarge`], an undecodable
/// compressed section [`ProtocolError::Compression`], a broken envelope
/// [`ProtocolError::Malformed`]. The work is linear in the batch's (decompressed) size and
/// allocates nothing per record.
///
/// ```
/// use quiver_protocol::batch::{validate_produce, BatchBuilder, Compression, ProduceLimits};
/// let mut b = BatchBuilder::new(Compression::Lz4);
/// b.push(Some(b"key"), b"value", 1_700_000_000_000, &[("h", b"v")]);
/// let limits = ProduceLimits {
///     max_batch_bytes: 1 << 20,
///     max_decompressed_bytes: 1 << 20,
///     now_ms: 1_700_000_000_500,
///     max_timestamp_skew_ms: 3_600_000,
/// };
/// assert_eq!(validate_produce(&b.build(), &limits).unwrap().record_count, 1);
/// ```
pub fn validate_produce(
    batch: &[u8],
    limits: &ProduceLimits,
) -> Result<BatchHeader, ProtocolError> {
    let h = check_envelope(batch, limits.max_batch_bytes)?;
    if h.attributes & !KNOWN_ATTRIBUTES != 0 {
        return Err(ProtocolError::invalid_record(format!(
            "attributes {:#06x} set bits a producer may not set (only the codec, bits 0-2, \
             the timestamp type, bit 3, the transactional flag, bit 4, and the numbered \
             header, bit 6; control batches are the broker's)",
            h.attributes
        )));
    }
    if h.is_transactional() && (h.producer_id < 0 || h.producer_epoch < 0) {
        return Err(ProtocolError::invalid_record(format!(
            "a transactional batch needs the producer id and epoch its transaction was \
             initialised with; got producer id {} epoch {}",
            h.producer_id, h.producer_epoch
        )));
    }
    let declared = h.record_count as u64; // parse refused negative counts
    if declared == 0 {
        return Err(ProtocolError::invalid_record(
            "header says 0 records; a produced batch holds at least one",
        ));
    }
    if i64::from(h.last_offset_delta) != i64::from(h.record_count) - 1 {
        return Err(ProtocolError::invalid_record(format!(
            "header says {} but last_offset_delta {} (must be {})",
            records(declared),
            h.last_offset_delta,
            declared - 1
        )));
    }
    let body = &batch[BATCH_HEADER_LEN..];
    let inflated;
    let data: &[u8] = match h.compression()? {
        Compression::None => body,
        c => {
            inflated = c.decompress(body, limits.max_decompressed_bytes)?;
            &inflated
        }
    };
    let log_append_time = h.attributes & ATTR_LOG_APPEND_TIME != 0;
    let mut pos = 0;
    let numbered = numbered_preamble(&h, data, &mut pos, limits.max_decompressed_bytes).map_err(
        |e| match e {
            too_large @ ProtocolError::TooLarge { .. } => too_large,
            broken => ProtocolError::invalid_record(broken.to_string()),
        },
    )?;
    let mut n: u64 = 0;
    let mut max_ts = i64::MIN;
    while pos < data.len() {
        let at = pos;
        let raw = scan_record(data, &mut pos, numbered.as_ref()).map_err(|e| {
            if n >= declared {
                ProtocolError::invalid_record(format!(
                    "header says {}, but {} bytes follow the last of them and are not a record ({e})",
                    records(declared),
                    data.len() - at
                ))
            } else {
                ProtocolError::invalid_record(format!(
                    "record {n} (byte {at} of the records section): {e}"
                ))
            }
        })?;
        if raw.offset_delta != n as i64 {
            return Err(ProtocolError::invalid_record(format!(
                "record {n} has offset delta {}; deltas must be 0, 1, 2, … in order",
                raw.offset_delta
            )));
        }
        if raw.key_len < -1 {
            return Err(ProtocolError::invalid_record(format!(
                "record {n} has key length {} (-1 means no key; other negatives are invalid)",
                raw.key_len
            )));
        }
        if !log_append_time {
            if n == 0 && raw.timestamp_delta != 0 {
                return Err(ProtocolError::invalid_record(format!(
                    "record 0 has timestamp delta {}; the first record's must be 0 \
                     (first_timestamp {} is its time)",
                    raw.timestamp_delta, h.first_timestamp
                )));
            }
            let ts = h
                .first_timestamp
                .checked_add(raw.timestamp_delta)
                .ok_or_else(|| {
                    ProtocolError::invalid_record(format!(
                        "record {n}: first_timestamp {} + timestamp delta {} overflows",
                        h.first_timestamp, raw.timestamp_delta
                    ))
                })?;
            check_timestamp(ts, || format!("record {n}"), limits)?;
            max_ts = max_ts.max(ts);
        }
        n += 1;
    }
    if n != declared {
        return Err(ProtocolError::invalid_record(format!(
            "header says {}, the batch holds {n}",
            records(declared)
        )));
    }
    if log_append_time {
        check_timestamp(
            h.max_timestamp,
            || "the max_timestamp of a log-append-time batch".to_string(),
            limits,
        )?;
    } else if h.max_timestamp != max_ts {
        return Err(ProtocolError::invalid_record(format!(
            "header says max_timestamp {}, but the largest record timestamp is {max_ts}",
            h.max_timestamp
        )));
    }
    Ok(h)
}

/// Recomputes and stores the CRC of one whole batch after its bytes were changed in place
/// (e.g. a test forging a header that lies, or [`set_log_append_time`]). `batch` must be
/// exactly one batch; shorter than the CRC field's end, it is left as it is.
pub fn recompute_crc(batch: &mut [u8]) {
    if batch.len() < CRC_START {
        return;
    }
    let crc = crc32c::crc32c(&batch[CRC_START..]);
    batch[CRC_OFFSET..CRC_START].copy_from_slice(&crc.to_be_bytes());
}

/// Compares the CRC32C of everything after the CRC field with the header's.
fn verify_crc(batch: &[u8], h: &BatchHeader) -> Result<(), ProtocolError> {
    let computed = crc32c::crc32c(&batch[CRC_START..]);
    if computed != h.crc {
        return Err(ProtocolError::CrcMismatch {
            stored: h.crc,
            computed,
        });
    }
    Ok(())
}

/// Checks only the CRC of a stored batch (used on read and on recovery).
pub fn check_crc(batch: &[u8]) -> Result<BatchHeader, ProtocolError> {
    let h = BatchHeader::parse(batch)?;
    if h.total_len() != batch.len() {
        return Err(ProtocolError::malformed("batch", "stored length mismatch"));
    }
    verify_crc(batch, &h)?;
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
    recompute_crc(batch);
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
mod produce_tests;

#[cfg(test)]
mod numbered_tests;

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
