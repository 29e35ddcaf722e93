//! The Quiver plugin batch encoding, guest side (the host has its own copy over
//! `bytes::Bytes`; both follow `ENCODING.md` and are tested against each other).
//!
//! ```text
//! batch  := count:u32 record{count}
//! record := flags:u8 [key_len:u32 key]   -- key present iff flags bit 0; other bits 0
//!           value_len:u32 value timestamp:i64 offset:i64 partition:i32
//!           header_count:u32 (name_len:u32 name:utf8 value_len:u32 value){header_count}
//! ```
//! All integers little-endian. Decoding checks every length against what remains and
//! rejects trailing bytes.

use crate::Record;

/// Smallest possible encoded record: flags, value_len, timestamp, offset, partition, header_count.
pub const MIN_RECORD_LEN: usize = 1 + 4 + 8 + 8 + 4 + 4;

/// Why a batch could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad record batch: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Reads records one at a time from an encoded batch.
pub struct BatchReader<'a> {
    buf: &'a [u8],
    remaining: u32,
}

impl<'a> BatchReader<'a> {
    /// Check the header of `buf` and prepare to read its records.
    pub fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = BatchReader { buf, remaining: 0 };
        let count = r.u32()?;
        if (count as usize).saturating_mul(MIN_RECORD_LEN) > r.buf.len() {
            return Err(DecodeError("record count larger than the batch"));
        }
        r.remaining = count;
        Ok(r)
    }

    /// Number of records not read yet.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// The next record, or `None` after the last one.
    pub fn next_record(&mut self) -> Result<Option<Record>, DecodeError> {
        if self.remaining == 0 {
            if !self.buf.is_empty() {
                return Err(DecodeError("trailing bytes after the last record"));
            }
            return Ok(None);
        }
        self.remaining -= 1;
        let flags = self.take(1)?[0];
        if flags & !1 != 0 {
            return Err(DecodeError("unknown record flags"));
        }
        let key = if flags & 1 == 1 {
            let n = self.u32()? as usize;
            Some(self.take(n)?.to_vec())
        } else {
            None
        };
        let n = self.u32()? as usize;
        let value = self.take(n)?.to_vec();
        let timestamp = i64::from_le_bytes(self.array()?);
        let offset = i64::from_le_bytes(self.array()?);
        let partition = i32::from_le_bytes(self.array()?);
        let count = self.u32()? as usize;
        if count.saturating_mul(8) > self.buf.len() {
            return Err(DecodeError("header count larger than the batch"));
        }
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let n = self.u32()? as usize;
            let name = std::str::from_utf8(self.take(n)?)
                .map_err(|_| DecodeError("header name is not UTF-8"))?
                .to_owned();
            let n = self.u32()? as usize;
            headers.push((name, self.take(n)?.to_vec()));
        }
        Ok(Some(Record {
            key,
            value,
            headers,
            timestamp,
            offset,
            partition,
        }))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError("length runs past the end of the batch"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
}

/// Decode a whole batch.
pub fn decode_batch(buf: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let mut r = BatchReader::new(buf)?;
    let mut out = Vec::with_capacity(r.remaining() as usize);
    while let Some(rec) = r.next_record()? {
        out.push(rec);
    }
    Ok(out)
}

/// Appends records to an encoded batch.
pub struct BatchWriter {
    buf: Vec<u8>,
    count: u32,
}

impl BatchWriter {
    /// An empty batch with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        let mut buf = Vec::with_capacity(cap.max(4));
        buf.extend_from_slice(&0u32.to_le_bytes());
        BatchWriter { buf, count: 0 }
    }

    /// Append one record.
    pub fn push(&mut self, r: &Record) {
        let b = &mut self.buf;
        match &r.key {
            Some(k) => {
                b.push(1);
                b.extend_from_slice(&(k.len() as u32).to_le_bytes());
                b.extend_from_slice(k);
            }
            None => b.push(0),
        }
        b.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
        b.extend_from_slice(&r.value);
        b.extend_from_slice(&r.timestamp.to_le_bytes());
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&r.partition.to_le_bytes());
        b.extend_from_slice(&(r.headers.len() as u32).to_le_bytes());
        for (name, value) in &r.headers {
            b.extend_from_slice(&(name.len() as u32).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(value.len() as u32).to_le_bytes());
            b.extend_from_slice(value);
        }
        self.count += 1;
    }

    /// The encoded batch.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

/// Encode a whole batch.
pub fn encode_batch(records: &[Record]) -> Vec<u8> {
    let mut w = BatchWriter::with_capacity(records.len() * 64);
    records.iter().for_each(|r| w.push(r));
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let recs = vec![
            Record {
                key: Some(b"k".to_vec()),
                value: b"v".to_vec(),
                headers: vec![("h".into(), b"x".to_vec())],
                timestamp: -1,
                offset: 7,
                partition: 3,
            },
            Record::default(),
        ];
        let enc = encode_batch(&recs);
        assert_eq!(decode_batch(&enc).unwrap(), recs);
        for cut in 0..enc.len() {
            assert!(decode_batch(&enc[..cut]).is_err(), "cut at {cut}");
        }
    }
}
