//! Decoding the records of a batch. Uncompressed values are zero-copy slices of the batch.

use std::ops::Range;

use bytes::Bytes;

use super::numbered::{self, Preamble, RECORD_ATTR_NUMBERED};
use super::{BatchHeader, Compression, BATCH_HEADER_LEN};
use crate::varint::get_varint;
use crate::ProtocolError;

/// A record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name (UTF-8).
    pub key: String,
    /// Header value.
    pub value: Bytes,
}

/// One decoded record with its absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Offset in the partition.
    pub offset: i64,
    /// Timestamp (ms since the epoch).
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Bytes,
    /// Headers.
    pub headers: Vec<Header>,
}

/// Iterates the records of one batch.
#[derive(Debug)]
pub struct RecordIter {
    header: BatchHeader,
    data: Bytes,
    pos: usize,
    remaining: i32,
    log_append_time: bool,
    /// The batch's numbered header: its key, and its values' prefix and base.
    numbered: Option<Numbered>,
}

/// A batch's numbered header, ready to build each record's copy.
#[derive(Debug)]
struct Numbered {
    preamble: Preamble,
    key: String,
}

impl RecordIter {
    /// Starts decoding `batch`; compressed records are inflated up to `max_decompressed` bytes.
    pub fn new(batch: &Bytes, max_decompressed: usize) -> Result<RecordIter, ProtocolError> {
        let header = BatchHeader::parse(batch)?;
        let end = header.total_len();
        if end > batch.len() {
            return Err(ProtocolError::Truncated {
                needed: end - batch.len(),
            });
        }
        let body = batch.slice(BATCH_HEADER_LEN..end);
        let data = match header.compression()? {
            Compression::None => body,
            c => Bytes::from(c.decompress(&body, max_decompressed)?),
        };
        let mut pos = 0;
        let numbered =
            super::numbered_preamble(&header, &data, &mut pos, max_decompressed)?.map(|preamble| {
                // The preamble's key was checked to be UTF-8.
                let key = String::from_utf8_lossy(&data[preamble.key.clone()]).into_owned();
                Numbered { preamble, key }
            });
        Ok(RecordIter {
            header,
            data,
            pos,
            remaining: header.record_count,
            log_append_time: header.attributes & super::ATTR_LOG_APPEND_TIME != 0,
            numbered,
        })
    }

    /// The batch header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The key of the batch's numbered header, if it has one (see
    /// [`BatchBuilder::set_numbered_header`](super::BatchBuilder::set_numbered_header)):
    /// a builder given it writes that header of the records compactly again (the same
    /// headers, though the prefix it picks from its own first record may differ).
    pub fn numbered_header(&self) -> Option<&str> {
        self.numbered.as_ref().map(|n| n.key.as_str())
    }

    fn next_record(&mut self) -> Result<Record, ProtocolError> {
        let numbered = self.numbered.as_ref();
        let raw = scan_record(&self.data, &mut self.pos, numbered.map(|n| &n.preamble))?;
        let key = raw.key.map(|r| self.data.slice(r));
        let value = self.data.slice(raw.value.clone());
        // Bounded by the bytes present (a header takes at least 2), and small at first:
        // the vector grows with headers actually decoded, never with the count alone.
        let explicit = raw.header_count.min(raw.headers.len() / 2).min(8);
        let mut headers = Vec::with_capacity(explicit + usize::from(raw.number.is_some()));
        let mut pos = raw.headers.start;
        for _ in 0..raw.header_count {
            let (k, v) = scan_header(&self.data, &mut pos, raw.headers.end)?;
            let key = std::str::from_utf8(&self.data[k])
                .map_err(|_| ProtocolError::malformed("header key", "not UTF-8"))?
                .to_string();
            headers.push(Header {
                key,
                value: self.data.slice(v),
            });
        }
        if let (Some(n), Some(number)) = (numbered, raw.number) {
            let prefix = &self.data[n.preamble.prefix.clone()];
            headers.push(Header {
                key: n.key.clone(),
                value: Bytes::from(numbered::value_of(prefix, number)),
            });
        }
        let timestamp = if self.log_append_time {
            self.header.max_timestamp
        } else {
            self.header
                .first_timestamp
                .wrapping_add(raw.timestamp_delta)
        };
        Ok(Record {
            offset: self.header.base_offset.wrapping_add(raw.offset_delta),
            timestamp,
            key,
            value,
            headers,
        })
    }
}

/// One record's fields, as positions in the records section (no copy, no allocation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawRecord {
    /// Where the record starts (its length varint).
    pub start: usize,
    /// The record's attributes byte: bit 0 ([`RECORD_ATTR_NUMBERED`]) when the record
    /// carries the batch's numbered header; other bits unused (0 when written by this
    /// crate).
    pub attributes: u8,
    /// Timestamp minus the batch's first timestamp.
    pub timestamp_delta: i64,
    /// Offset minus the batch's base offset.
    pub offset_delta: i64,
    /// The key length as written (-1 for no key).
    pub key_len: i64,
    /// The key's bytes, if any.
    pub key: Option<Range<usize>>,
    /// The value's bytes.
    pub value: Range<usize>,
    /// Number of headers.
    pub header_count: usize,
    /// The headers' bytes (every header checked: lengths within the record, UTF-8 keys),
    /// not counting the numbered header.
    pub headers: Range<usize>,
    /// The number of the batch's numbered header this record carries last, if it does.
    pub number: Option<i64>,
}

/// Reads the varint at `*pos`, which must end before `end` (the record's end).
#[inline(always)]
fn varint_in(
    data: &[u8],
    pos: &mut usize,
    end: usize,
    what: &'static str,
) -> Result<i64, ProtocolError> {
    get_varint(&data[..end], pos).map_err(|e| past_record_end(e, what))
}

#[cold]
fn past_record_end(e: ProtocolError, what: &'static str) -> ProtocolError {
    match e {
        ProtocolError::Truncated { .. } => {
            ProtocolError::malformed(what, "runs past the end of its record")
        }
        other => other,
    }
}

/// Takes `len` bytes at `*pos` if they lie before `end`.
#[inline]
fn take(
    len: i64,
    pos: &mut usize,
    end: usize,
    what: &'static str,
) -> Result<Range<usize>, ProtocolError> {
    let avail = end - *pos;
    if len < 0 || len as u64 > avail as u64 {
        return Err(too_long(what, len, avail));
    }
    let r = *pos..*pos + len as usize;
    *pos = r.end;
    Ok(r)
}

#[cold]
fn too_long(what: &'static str, len: i64, avail: usize) -> ProtocolError {
    ProtocolError::malformed(
        what,
        format!("length {len} but only {avail} bytes are left in the record"),
    )
}

/// Reads one header at `*pos` (which must be before `end`): its key and value ranges.
#[inline]
pub(crate) fn scan_header(
    data: &[u8],
    pos: &mut usize,
    end: usize,
) -> Result<(Range<usize>, Range<usize>), ProtocolError> {
    let kl = varint_in(data, pos, end, "header key length")?;
    let k = take(kl, pos, end, "header key")?;
    let vl = varint_in(data, pos, end, "header value length")?;
    let v = take(vl, pos, end, "header value")?;
    Ok((k, v))
}

/// Parses the record at `*pos` of a records section, checking every length against the
/// record's own length and that length against the bytes present; advances `*pos` past it.
/// `numbered` is the batch's numbered header, if it has one: a record may carry it only
/// then, and its number must be a non-negative i64.
pub(crate) fn scan_record(
    data: &[u8],
    pos: &mut usize,
    numbered: Option<&Preamble>,
) -> Result<RawRecord, ProtocolError> {
    let start = *pos;
    let len = get_varint(data, pos)?;
    let avail = data.len() - *pos;
    if len < 1 || len as u64 > avail as u64 {
        return Err(ProtocolError::malformed(
            "record",
            format!("length {len} but {avail} bytes are left in the batch"),
        ));
    }
    let end = *pos + len as usize;
    let attributes = data[*pos];
    *pos += 1;
    let timestamp_delta = varint_in(data, pos, end, "record timestamp delta")?;
    let offset_delta = varint_in(data, pos, end, "record offset delta")?;
    let key_len = varint_in(data, pos, end, "record key length")?;
    let key = if key_len < 0 {
        None
    } else {
        Some(take(key_len, pos, end, "record key")?)
    };
    let value_len = varint_in(data, pos, end, "record value length")?;
    let value = take(value_len, pos, end, "record value")?;
    let count = varint_in(data, pos, end, "record header count")?;
    let left = end - *pos;
    // Each header takes at least two bytes (two length varints).
    if count < 0 || count as u64 > (left / 2) as u64 {
        return Err(ProtocolError::malformed(
            "record",
            format!("header count {count} but only {left} bytes are left in the record"),
        ));
    }
    let header_count = count as usize;
    let headers_start = *pos;
    for _ in 0..header_count {
        let (k, _) = scan_header(data, pos, end)?;
        if std::str::from_utf8(&data[k]).is_err() {
            return Err(ProtocolError::malformed("header key", "not UTF-8"));
        }
    }
    let headers_end = *pos;
    let number = if attributes & RECORD_ATTR_NUMBERED == 0 {
        None
    } else {
        let Some(preamble) = numbered else {
            return Err(ProtocolError::malformed(
                "record",
                "its attributes say it carries the batch's numbered header, but the batch has none",
            ));
        };
        let delta = varint_in(data, pos, end, "record's numbered header")?;
        Some(preamble.number(delta)?)
    };
    if *pos != end {
        return Err(ProtocolError::malformed(
            "record",
            format!(
                "length says {len} bytes but its fields take {}",
                *pos - (end - len as usize)
            ),
        ));
    }
    Ok(RawRecord {
        start,
        attributes,
        timestamp_delta,
        offset_delta,
        key_len,
        key,
        value,
        header_count,
        headers: headers_start..headers_end,
        number,
    })
}

impl Iterator for RecordIter {
    type Item = Result<Record, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining <= 0 {
            return None;
        }
        self.remaining -= 1;
        if self.pos >= self.data.len() {
            // The header promised more records than the batch holds.
            self.remaining = 0;
            return Some(Err(ProtocolError::malformed(
                "batch",
                format!(
                    "header says {} records, the batch holds fewer",
                    self.header.record_count
                ),
            )));
        }
        let r = self.next_record();
        if r.is_err() {
            self.remaining = 0;
        }
        Some(r)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Never more than the header says, nor than the bytes left can hold (a record
        // takes at least 2 bytes): a lying count cannot make `collect` over-allocate.
        let left = (self.data.len() - self.pos) / 2;
        (0, Some((self.remaining.max(0) as usize).min(left)))
    }
}
