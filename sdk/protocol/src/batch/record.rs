//! Decoding the records of a batch. Uncompressed values are zero-copy slices of the batch.

use bytes::Bytes;

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
        Ok(RecordIter {
            header,
            data,
            pos: 0,
            remaining: header.record_count,
            log_append_time: header.attributes & super::ATTR_LOG_APPEND_TIME != 0,
        })
    }

    /// The batch header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    fn bytes(&mut self, len: i64, what: &'static str) -> Result<Bytes, ProtocolError> {
        if len < 0 || len as usize > self.data.len() - self.pos {
            return Err(ProtocolError::malformed(
                what,
                format!("length {len} beyond the batch"),
            ));
        }
        let b = self.data.slice(self.pos..self.pos + len as usize);
        self.pos += len as usize;
        Ok(b)
    }

    fn next_record(&mut self) -> Result<Record, ProtocolError> {
        let len = get_varint(&self.data, &mut self.pos)?;
        if len < 1 || len as usize > self.data.len() - self.pos {
            return Err(ProtocolError::malformed(
                "record",
                format!("length {len} beyond the batch"),
            ));
        }
        let end = self.pos + len as usize;
        self.pos += 1; // attributes
        let ts_delta = get_varint(&self.data, &mut self.pos)?;
        let offset_delta = get_varint(&self.data, &mut self.pos)?;
        let key_len = get_varint(&self.data, &mut self.pos)?;
        let key = if key_len < 0 {
            None
        } else {
            Some(self.bytes(key_len, "record key")?)
        };
        let value_len = get_varint(&self.data, &mut self.pos)?;
        let value = self.bytes(value_len, "record value")?;
        let header_count = get_varint(&self.data, &mut self.pos)?;
        if header_count < 0 || header_count as usize > self.data.len() - self.pos {
            return Err(ProtocolError::malformed(
                "record",
                "header count beyond the batch",
            ));
        }
        let mut headers = Vec::with_capacity(header_count as usize);
        for _ in 0..header_count {
            let kl = get_varint(&self.data, &mut self.pos)?;
            let k = self.bytes(kl, "header key")?;
            let key = String::from_utf8(k.to_vec())
                .map_err(|_| ProtocolError::malformed("header key", "not UTF-8"))?;
            let vl = get_varint(&self.data, &mut self.pos)?;
            let value = self.bytes(vl, "header value")?;
            headers.push(Header { key, value });
        }
        if self.pos != end {
            return Err(ProtocolError::malformed(
                "record",
                "length does not match its fields",
            ));
        }
        let timestamp = if self.log_append_time {
            self.header.max_timestamp
        } else {
            self.header.first_timestamp.wrapping_add(ts_delta)
        };
        Ok(Record {
            offset: self.header.base_offset.wrapping_add(offset_delta),
            timestamp,
            key,
            value,
            headers,
        })
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining <= 0 {
            return None;
        }
        self.remaining -= 1;
        let r = self.next_record();
        if r.is_err() {
            self.remaining = 0;
        }
        Some(r)
    }
}
