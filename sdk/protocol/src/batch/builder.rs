//! Builds a record batch from records, ready to send (offsets are relative; the broker
//! assigns the base offset).

use bytes::{BufMut, Bytes};

use super::numbered::{self, RECORD_ATTR_NUMBERED};
use super::{Compression, BATCH_HEADER_LEN, CRC_OFFSET, CRC_START, MAGIC};
use crate::varint::{put_varint, varint_len};

/// Accumulates records and encodes them as one batch. The records are written after room
/// for the batch header, so an uncompressed batch is finished in place: its buffer becomes
/// the batch, never copied.
///
/// ```
/// use quiver_protocol::batch::{BatchBuilder, Compression, validate};
/// let mut b = BatchBuilder::new(Compression::None);
/// b.push(Some(b"key"), b"value", 1_700_000_000_000, &[]);
/// let batch = b.build();
/// assert_eq!(validate(&batch, 1 << 20).unwrap().record_count, 1);
/// ```
#[derive(Debug)]
pub struct BatchBuilder {
    compression: Compression,
    /// `BATCH_HEADER_LEN` bytes of room for the header, then the records.
    records: Vec<u8>,
    count: i32,
    first_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
    transactional: bool,
    /// The header to write as the batch's numbered header, when records carry it last
    /// (see [`set_numbered_header`](Self::set_numbered_header)).
    numbered_key: Option<Box<str>>,
    /// The open batch's numbered header: the key its preamble names (the key set when its
    /// first record came), its values' prefix and base, once that record gave them.
    /// record gave them.
    numbered: Option<(Box<str>, Vec<u8>, i64)>,
}

impl BatchBuilder {
    /// A new, empty batch.
    pub fn new(compression: Compression) -> Self {
        Self::with_capacity(compression, 4096)
    }

    /// A new batch with room for `bytes` of records.
    pub fn with_capacity(compression: Compression, bytes: usize) -> Self {
        BatchBuilder {
            compression,
            records: header_room(BATCH_HEADER_LEN + bytes),
            count: 0,
            first_timestamp: 0,
            max_timestamp: i64::MIN,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            transactional: false,
            numbered_key: None,
            numbered: None,
        }
    }

    /// Writes header `key` compactly when a record carries it last with a value that ends
    /// in a number ([`super::ATTR_NUMBERED_HEADER`]): the first record of each batch gives
    /// the value's prefix and the number to count from, and every record whose value has
    /// the same prefix then stores only its number's distance from it (one to three bytes
    /// for nearby numbers instead of the key and the whole value). Records that do not fit
    /// are written as they are; readers see the same headers either way. Kept for every
    /// later batch of this builder; `None` stops it from the next batch on.
    pub fn set_numbered_header(&mut self, key: Option<&str>) {
        self.numbered_key = key
            .filter(|k| !k.is_empty() && k.len() <= numbered::MAX_KEY_BYTES)
            .map(Into::into);
    }

    /// Sets the idempotent-producer fields.
    pub fn set_producer(&mut self, producer_id: i64, epoch: i16, base_sequence: i32) {
        self.producer_id = producer_id;
        self.producer_epoch = epoch;
        self.base_sequence = base_sequence;
    }

    /// Marks the batch as part of its producer's transaction
    /// ([`super::ATTR_TRANSACTIONAL`]).
    pub fn set_transactional(&mut self, transactional: bool) {
        self.transactional = transactional;
    }

    /// Number of records so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True when no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Uncompressed bytes so far, header included.
    pub fn size_bytes(&self) -> usize {
        self.records.len()
    }

    /// Appends a record.
    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        timestamp: i64,
        headers: &[(&str, &[u8])],
    ) {
        self.push_at(self.count, key, value, timestamp, headers);
    }

    /// Appends a record with an explicit offset delta (its offset minus the batch's base
    /// offset), for batches whose offsets are not dense: a consume-time processor's output
    /// keeps each record's source offset. Pair with [`build_covering`](Self::build_covering).
    pub fn push_at(
        &mut self,
        offset_delta: i32,
        key: Option<&[u8]>,
        value: &[u8],
        timestamp: i64,
        headers: &[(&str, &[u8])],
    ) {
        if self.count == 0 {
            self.first_timestamp = timestamp;
            self.open_numbered(headers);
        }
        let (headers, number_delta) = self.numbered_of(headers);
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let ts_delta = timestamp.wrapping_sub(self.first_timestamp);
        let offset_delta = i64::from(offset_delta);
        let key_len = key.map_or(-1, |k| k.len() as i64);
        let mut body_len = 1
            + varint_len(ts_delta)
            + varint_len(offset_delta)
            + varint_len(key_len)
            + key.map_or(0, |k| k.len())
            + varint_len(value.len() as i64)
            + value.len()
            + varint_len(headers.len() as i64)
            + number_delta.map_or(0, varint_len);
        for (hk, hv) in headers {
            body_len +=
                varint_len(hk.len() as i64) + hk.len() + varint_len(hv.len() as i64) + hv.len();
        }
        let r = &mut self.records;
        put_varint(r, body_len as i64);
        r.push(if number_delta.is_some() {
            RECORD_ATTR_NUMBERED
        } else {
            0
        });
        put_varint(r, ts_delta);
        put_varint(r, offset_delta);
        put_varint(r, key_len);
        if let Some(k) = key {
            r.extend_from_slice(k);
        }
        put_varint(r, value.len() as i64);
        r.extend_from_slice(value);
        put_varint(r, headers.len() as i64);
        for (hk, hv) in headers {
            put_varint(r, hk.len() as i64);
            r.extend_from_slice(hk.as_bytes());
            put_varint(r, hv.len() as i64);
            r.extend_from_slice(hv);
        }
        if let Some(delta) = number_delta {
            put_varint(r, delta);
        }
        self.count += 1;
    }

    /// At a batch's first record: when it carries the numbered header last with a value
    /// that splits into prefix and number, writes the batch's preamble (the records
    /// section is still empty) with that prefix and number.
    fn open_numbered(&mut self, headers: &[(&str, &[u8])]) {
        self.numbered = None;
        let (Some(key), Some((k, v))) = (self.numbered_key.as_deref(), headers.last()) else {
            return;
        };
        if *k != key {
            return;
        }
        let Some((prefix_len, base)) = numbered::split_value(v) else {
            return;
        };
        debug_assert_eq!(
            self.records.len(),
            BATCH_HEADER_LEN,
            "no record written yet"
        );
        let prefix = v[..prefix_len].to_vec();
        numbered::put_preamble(&mut self.records, key, &prefix, base);
        self.numbered = Some((key.into(), prefix, base));
    }

    /// A record's headers to write in full, and its number's distance from the batch's
    /// base when its last header is the batch's numbered header with the batch's prefix.
    fn numbered_of<'h, 'a>(
        &self,
        headers: &'h [(&'a str, &'a [u8])],
    ) -> (&'h [(&'a str, &'a [u8])], Option<i64>) {
        // The key the batch's preamble names, whatever the builder was told since.
        let Some((key, prefix, base)) = &self.numbered else {
            return (headers, None);
        };
        let Some(((k, v), rest)) = headers.split_last() else {
            return (headers, None);
        };
        if *k != &**key || !v.starts_with(prefix) {
            return (headers, None);
        }
        match numbered::number_in(&v[prefix.len()..]) {
            Some(n) => (rest, Some(n - base)),
            None => (headers, None),
        }
    }

    /// Encodes the batch (base offset 0, leader epoch -1) and resets the builder.
    pub fn build(&mut self) -> Bytes {
        self.encode(0, (self.count - 1).max(0))
    }

    /// Encodes a batch whose header covers `base_offset ..= base_offset + last_offset_delta`
    /// whatever records it holds (possibly none), so a reader advances past the whole range;
    /// records must have been pushed with [`push_at`](Self::push_at) deltas in that range.
    pub fn build_covering(&mut self, base_offset: i64, last_offset_delta: i32) -> Bytes {
        self.encode(base_offset, last_offset_delta)
    }

    fn encode(&mut self, base_offset: i64, last_offset_delta: i32) -> Bytes {
        let mut batch = if self.compression == Compression::None {
            // The records already follow the header's room. A batch that fills most of
            // the buffer takes it as it is; a small one (a linger ran out) is copied out,
            // so it does not hold the whole buffer while it waits for its acknowledgement.
            let capacity = self.records.capacity();
            if self.records.len() * 2 >= capacity {
                std::mem::replace(&mut self.records, header_room(capacity))
            } else {
                let small = self.records.clone();
                self.records.truncate(BATCH_HEADER_LEN);
                small
            }
        } else {
            let compressed = self.compression.compress(&self.records[BATCH_HEADER_LEN..]);
            self.records.truncate(BATCH_HEADER_LEN);
            let mut b = Vec::with_capacity(BATCH_HEADER_LEN + compressed.len());
            b.resize(BATCH_HEADER_LEN, 0);
            b.extend_from_slice(&compressed);
            b
        };
        let body_len = batch.len() - BATCH_HEADER_LEN;
        let txn = if self.transactional {
            super::ATTR_TRANSACTIONAL
        } else {
            0
        };
        let numbered = match self.numbered.take() {
            Some(_) => super::ATTR_NUMBERED_HEADER,
            None => 0,
        };
        let mut h = &mut batch[..BATCH_HEADER_LEN];
        h.put_i64(base_offset);
        h.put_i32((BATCH_HEADER_LEN - 12 + body_len) as i32);
        h.put_i32(-1);
        h.put_i8(MAGIC);
        h.put_u32(0); // CRC, filled below
        h.put_i16(self.compression.attribute_bits() | txn | numbered);
        h.put_i32(last_offset_delta);
        h.put_i64(self.first_timestamp);
        h.put_i64(if self.count == 0 {
            self.first_timestamp
        } else {
            self.max_timestamp
        });
        h.put_i64(self.producer_id);
        h.put_i16(self.producer_epoch);
        h.put_i32(self.base_sequence);
        h.put_i32(self.count);
        debug_assert!(h.is_empty(), "the header fills its room exactly");
        let crc = crc32c::crc32c(&batch[CRC_START..]);
        batch[CRC_OFFSET..CRC_START].copy_from_slice(&crc.to_be_bytes());
        self.count = 0;
        self.max_timestamp = i64::MIN;
        Bytes::from(batch)
    }
}

/// An empty record buffer of `capacity` bytes in all: room for the batch header, then for
/// records.
fn header_room(capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(capacity.max(BATCH_HEADER_LEN));
    v.resize(BATCH_HEADER_LEN, 0);
    v
}

#[cfg(test)]
mod covering_tests {
    use super::*;
    use crate::batch::{check_crc, RecordIter};

    #[test]
    fn a_covering_batch_keeps_sparse_offsets_and_its_range() {
        let mut b = BatchBuilder::new(Compression::None);
        b.push_at(1, None, b"one", 10, &[]);
        b.push_at(4, Some(b"k"), b"four", 11, &[]);
        let batch = b.build_covering(100, 7);
        let h = check_crc(&batch).unwrap();
        assert_eq!(
            (h.base_offset, h.next_offset(), h.record_count),
            (100, 108, 2)
        );
        let offsets: Vec<i64> = RecordIter::new(&batch, 1 << 20)
            .unwrap()
            .map(|r| r.unwrap().offset)
            .collect();
        assert_eq!(offsets, vec![101, 104]);
    }

    /// A batch filling most of the buffer takes it as is; a small one is copied out. Either
    /// way the batch is valid, and the builder starts afresh for the next one.
    #[test]
    fn batches_finished_in_place_or_copied_out_are_valid_and_the_builder_starts_afresh() {
        for compression in [Compression::None, Compression::Lz4] {
            let mut b = BatchBuilder::with_capacity(compression, 4096);
            b.push(None, b"small", 7, &[]);
            let small = b.build();
            assert!(small.len() < 128, "{compression:?}: {} bytes", small.len());
            let big_value = [b'v'; 90];
            for _ in 0..40 {
                b.push(Some(b"k"), &big_value, 8, &[("h", b"x")]);
            }
            assert!(
                b.size_bytes() * 2 >= 4096,
                "the second batch fills most of the buffer"
            );
            let big = b.build();
            b.push(None, b"again", 9, &[]);
            let again = b.build();
            for (batch, count, first_value) in [
                (&small, 1, &b"small"[..]),
                (&big, 40, &big_value[..]),
                (&again, 1, &b"again"[..]),
            ] {
                let h = check_crc(batch).unwrap();
                assert_eq!(
                    (h.base_offset, h.record_count),
                    (0, count),
                    "{compression:?}"
                );
                let records: Vec<_> = RecordIter::new(batch, 1 << 20)
                    .unwrap()
                    .map(|r| r.unwrap())
                    .collect();
                assert_eq!(records.len(), count as usize);
                assert_eq!(&records[0].value[..], first_value);
                assert_eq!(records.last().unwrap().offset, i64::from(count) - 1);
            }
        }
    }

    /// A key set while a batch is open applies from the next batch: the open one keeps the
    /// key its preamble names, so its records read back with the headers they were given.
    #[test]
    fn a_numbered_key_changed_mid_batch_applies_from_the_next_batch() {
        let mut b = BatchBuilder::new(Compression::None);
        b.set_numbered_header(Some("a"));
        b.push(None, b"1", 7, &[("a", b"p/1")]);
        b.set_numbered_header(Some("b"));
        b.push(None, b"2", 7, &[("b", b"p/2")]);
        b.push(None, b"3", 7, &[("a", b"p/3")]);
        let first = b.build();
        b.push(None, b"4", 7, &[("b", b"p/4")]);
        b.push(None, b"5", 7, &[("b", b"p/5")]);
        let second = b.build();
        let headers = |batch: &Bytes| -> Vec<(String, Vec<u8>)> {
            RecordIter::new(batch, 1 << 20)
                .unwrap()
                .flat_map(|r| r.unwrap().headers)
                .map(|h| (h.key, h.value.to_vec()))
                .collect()
        };
        let h = |k: &str, v: &[u8]| (k.to_string(), v.to_vec());
        assert_eq!(
            headers(&first),
            vec![h("a", b"p/1"), h("b", b"p/2"), h("a", b"p/3")]
        );
        assert_eq!(headers(&second), vec![h("b", b"p/4"), h("b", b"p/5")]);
        let second_iter = RecordIter::new(&second, 1 << 20).unwrap();
        assert_eq!(second_iter.numbered_header(), Some("b"));
    }

    #[test]
    fn an_empty_covering_batch_still_advances_a_reader() {
        let batch = BatchBuilder::new(Compression::None).build_covering(5, 9);
        let h = check_crc(&batch).unwrap();
        assert_eq!((h.record_count, h.next_offset()), (0, 15));
        assert_eq!(RecordIter::new(&batch, 1 << 20).unwrap().count(), 0);
    }
}
