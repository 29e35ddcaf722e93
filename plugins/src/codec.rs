//! The plugin batch encoding, host side: how a batch of [`Record`]s crosses into a WASM
//! guest as one `list<u8>` and back. Layout (all integers little-endian; the guest SDK's
//! `codec.rs` implements the same layout, documented in `sdk/plugin/ENCODING.md`):
//!
//! ```text
//! batch  := count:u32 record{count}
//! record := flags:u8 [key_len:u32 key]   -- key present iff flags bit 0; other bits 0
//!           value_len:u32 value timestamp:i64 offset:i64 partition:i32
//!           header_count:u32 (name_len:u32 name:utf8 value_len:u32 value){header_count}
//! ```
//!
//! Decoding never trusts a length: each is checked against the bytes that remain, counts
//! are checked against the smallest possible encoding before anything is allocated, and
//! trailing bytes are an error. Decoded keys and values are zero-copy slices of the input.

use bytes::{BufMut, Bytes};

use crate::Record;

/// Smallest encoded record: flags, value_len, timestamp, offset, partition, header_count.
pub const MIN_RECORD_LEN: usize = 1 + 4 + 8 + 8 + 4 + 4;

/// Smallest encoded header: name_len and value_len.
const MIN_HEADER_LEN: usize = 4 + 4;

/// Append `records` to `out` as one encoded batch.
pub fn encode_batch_into(records: &[Record], out: &mut Vec<u8>) {
    let total: usize = 4 + records.iter().map(Record::encoded_len).sum::<usize>();
    out.reserve(total);
    out.put_u32_le(records.len() as u32);
    for r in records {
        match &r.key {
            Some(k) => {
                out.put_u8(1);
                out.put_u32_le(k.len() as u32);
                out.put_slice(k);
            }
            None => out.put_u8(0),
        }
        out.put_u32_le(r.value.len() as u32);
        out.put_slice(&r.value);
        out.put_i64_le(r.timestamp);
        out.put_i64_le(r.offset);
        out.put_i32_le(r.partition);
        out.put_u32_le(r.headers.len() as u32);
        for (n, v) in &r.headers {
            out.put_u32_le(n.len() as u32);
            out.put_slice(n.as_bytes());
            out.put_u32_le(v.len() as u32);
            out.put_slice(v);
        }
    }
}

/// Encode `records` as one batch.
pub fn encode_batch(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch_into(records, &mut out);
    out
}

/// Decode a batch; keys and values share `buf`'s allocation.
pub fn decode_batch(buf: Bytes) -> Result<Vec<Record>, String> {
    let mut pos = 0usize;
    let count = read_u32(&buf, &mut pos)? as usize;
    if count.saturating_mul(MIN_RECORD_LEN) > buf.len() - pos {
        return Err("record count larger than the batch".into());
    }
    // The count comes from the guest: reserve only what the bytes present can hold.
    let mut out = Vec::with_capacity(count.min((buf.len() - pos) / MIN_RECORD_LEN));
    for _ in 0..count {
        let flags = take(&buf, &mut pos, 1)?[0];
        if flags & !1 != 0 {
            return Err("unknown record flags".into());
        }
        let key = if flags & 1 == 1 {
            let n = read_u32(&buf, &mut pos)? as usize;
            Some(slice(&buf, &mut pos, n)?)
        } else {
            None
        };
        let n = read_u32(&buf, &mut pos)? as usize;
        let value = slice(&buf, &mut pos, n)?;
        let timestamp = i64::from_le_bytes(array(&buf, &mut pos)?);
        let offset = i64::from_le_bytes(array(&buf, &mut pos)?);
        let partition = i32::from_le_bytes(array(&buf, &mut pos)?);
        let hc = read_u32(&buf, &mut pos)? as usize;
        if hc.saturating_mul(MIN_HEADER_LEN) > buf.len() - pos {
            return Err("header count larger than the batch".into());
        }
        let mut headers = Vec::with_capacity(hc.min((buf.len() - pos) / MIN_HEADER_LEN));
        for _ in 0..hc {
            let n = read_u32(&buf, &mut pos)? as usize;
            let name = std::str::from_utf8(take(&buf, &mut pos, n)?)
                .map_err(|_| "header name is not UTF-8".to_string())?
                .to_owned();
            let n = read_u32(&buf, &mut pos)? as usize;
            headers.push((name, slice(&buf, &mut pos, n)?));
        }
        out.push(Record {
            key,
            value,
            headers,
            timestamp,
            offset,
            partition,
        });
    }
    if pos != buf.len() {
        return Err("trailing bytes after the last record".into());
    }
    Ok(out)
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| "length runs past the end of the batch".to_string())?;
    let s = &buf[*pos..end];
    *pos = end;
    Ok(s)
}

fn slice(buf: &Bytes, pos: &mut usize, n: usize) -> Result<Bytes, String> {
    let start = *pos;
    take(buf, pos, n)?;
    Ok(buf.slice(start..*pos))
}

fn array<const N: usize>(buf: &[u8], pos: &mut usize) -> Result<[u8; N], String> {
    let mut a = [0u8; N];
    a.copy_from_slice(take(buf, pos, N)?);
    Ok(a)
}

fn read_u32(buf: &[u8], pos: &mut usize) -> Result<u32, String> {
    Ok(u32::from_le_bytes(array(buf, pos)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record {
                key: Some(Bytes::from_static(b"k1")),
                value: Bytes::from_static(b"hello"),
                headers: vec![("h".into(), Bytes::from_static(b"x"))],
                timestamp: 1_700_000_000_000,
                offset: 42,
                partition: 3,
            },
            Record::from_value("second"),
        ]
    }

    #[test]
    fn batch_round_trips() {
        let recs = sample();
        let enc = encode_batch(&recs);
        assert_eq!(
            enc.len(),
            4 + recs.iter().map(Record::encoded_len).sum::<usize>()
        );
        assert_eq!(decode_batch(Bytes::from(enc)).unwrap(), recs);
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_rejected() {
        let enc = encode_batch(&sample());
        for cut in 0..enc.len() {
            assert!(decode_batch(Bytes::copy_from_slice(&enc[..cut])).is_err());
        }
        let mut long = enc.clone();
        long.push(0);
        assert!(decode_batch(Bytes::from(long)).is_err());
    }

    /// `sample()` encoded with its record count (and the first record's header count) set.
    fn lying(count: u32, header_count: Option<u32>) -> Vec<u8> {
        let mut enc = encode_batch(&sample());
        enc[..4].copy_from_slice(&count.to_le_bytes());
        if let Some(hc) = header_count {
            // flags, key_len, "k1", value_len, "hello", timestamp, offset, partition
            let at = 4 + 1 + 4 + 2 + 4 + 5 + 8 + 8 + 4;
            enc[at..at + 4].copy_from_slice(&hc.to_le_bytes());
        }
        enc
    }

    #[test]
    fn lying_counts_are_refused() {
        assert!(decode_batch(Bytes::from(lying(2, Some(1)))).is_ok());
        for (count, hc) in [
            (3, None),
            (1, None),
            (2, Some(2)),
            (2, Some(0)),
            (2, Some(9)),
            (2, Some(u32::MAX)),
            (u32::MAX, None),
            (1 << 20, None),
        ] {
            let bytes = lying(count, hc);
            // A count the bytes could hold passes the up-front check and fails when the
            // records run out (or the rest is trailing bytes); a larger one is refused first.
            assert!(
                decode_batch(Bytes::from(bytes)).is_err(),
                "count {count}, header count {hc:?}"
            );
        }
        // Many tiny records claimed, few bytes present: refused before any allocation.
        let mut b = 1_000_000u32.to_le_bytes().to_vec();
        b.extend_from_slice(&[0; MIN_RECORD_LEN * 3]);
        assert_eq!(
            decode_batch(Bytes::from(b)).unwrap_err(),
            "record count larger than the batch"
        );
    }

    #[test]
    fn huge_counts_and_lengths_are_rejected_without_allocating() {
        let mut b = u32::MAX.to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 40]);
        assert!(decode_batch(Bytes::from(b)).is_err());
        let mut b = 1u32.to_le_bytes().to_vec();
        b.push(1);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&[0; 40]);
        assert!(decode_batch(Bytes::from(b)).is_err());
    }
}
