//! Running a processor over a fetch payload: decode each stored batch, hand its records
//! (from the requested offset on) to the plugin in one call, and re-encode the output as a
//! batch whose header covers the same offset range as the source batch. Output records
//! keep their source offsets (offset delta = source offset − base offset), so a consumer
//! sees the offsets it would have seen without the processor; a batch whose records were
//! all dropped goes out with no records, so the consumer still advances past it.

use bytes::{Bytes, BytesMut};
use quiver_plugins::{PluginError, Processor, Record};
use quiver_protocol::batch::{split_batches, BatchBuilder, RecordIter};
use quiver_protocol::ProtocolError;

/// Why a payload could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    /// A stored batch could not be decoded.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The plugin call failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The instance was quarantined while the call waited for it.
    #[error("the processor instance was quarantined")]
    Abandoned,
}

/// Runs `processor` over every batch of `payload` (records before `from` are left out)
/// and returns the re-encoded batches.
pub fn process_payload(
    processor: &mut dyn Processor,
    payload: &Bytes,
    from: i64,
    partition: u32,
    max_decompressed: usize,
) -> Result<Bytes, TransformError> {
    let mut out = BytesMut::with_capacity(payload.len());
    for batch in split_batches(payload, usize::MAX)? {
        if let Some(b) = process_batch(processor, &batch, from, partition, max_decompressed)? {
            out.extend_from_slice(&b);
        }
    }
    Ok(out.freeze())
}

/// Runs `processor` over one stored batch (records before `from` left out) in one call and
/// returns the re-encoded batch, or `None` when the whole batch lies before `from`.
pub fn process_batch(
    processor: &mut dyn Processor,
    batch: &Bytes,
    from: i64,
    partition: u32,
    max_decompressed: usize,
) -> Result<Option<Bytes>, TransformError> {
    let iter = RecordIter::new(batch, max_decompressed)?;
    let h = *iter.header();
    let numbered = iter.numbered_header().map(str::to_string);
    if h.next_offset() <= from {
        return Ok(None);
    }
    if h.is_control() {
        // Transaction markers are not records: they go through untouched (consumers skip
        // them), never into a plugin.
        return Ok(Some(batch.clone()));
    }
    // The header's count is only a claim: never reserve more than the bytes can hold.
    let mut input = Vec::with_capacity((h.record_count.max(0) as usize).min(batch.len() / 8));
    for r in iter {
        let r = r?;
        if r.offset < from {
            continue;
        }
        input.push(Record {
            key: r.key,
            value: r.value,
            headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
            timestamp: r.timestamp,
            offset: r.offset,
            partition: partition as i32,
        });
    }
    let output = if input.is_empty() {
        Vec::new()
    } else {
        processor.process_batch(input)?
    };
    let bytes: usize = output.iter().map(Record::encoded_len).sum();
    let mut b = BatchBuilder::with_capacity(h.compression()?, bytes + 16 * output.len());
    // The batch keeps its producer and transaction: a read-committed consumer drops the
    // records of an aborted transaction by them.
    b.set_producer(h.producer_id, h.producer_epoch, h.base_sequence);
    b.set_transactional(h.is_transactional());
    // And writes a header the source batch held compactly (a pipeline's `quiver.source`)
    // compactly again.
    b.set_numbered_header(numbered.as_deref());
    let last = h.last_offset();
    for r in &output {
        // A plugin may return offsets it made up (e.g. from `process_batch` without a
        // source record): keep every record inside the source batch's range.
        let delta = (r.offset.clamp(h.base_offset.max(from), last) - h.base_offset) as i32;
        let headers: Vec<(&str, &[u8])> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        b.push_at(delta, r.key.as_deref(), &r.value, r.timestamp, &headers);
    }
    Ok(Some(b.build_covering(h.base_offset, h.last_offset_delta)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::{set_base_offset, Compression};

    struct KeepEven;
    impl Processor for KeepEven {
        fn process_batch(&mut self, records: Vec<Record>) -> Result<Vec<Record>, PluginError> {
            Ok(records.into_iter().filter(|r| r.offset % 2 == 0).collect())
        }
    }

    fn batch(base: i64, n: usize) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..n {
            b.push(None, format!("v{}", base + i as i64).as_bytes(), 1000, &[]);
        }
        let mut raw = b.build().to_vec();
        set_base_offset(&mut raw, base);
        Bytes::from(raw)
    }

    fn decode(payload: &Bytes) -> Vec<(i64, i64, Vec<i64>)> {
        split_batches(payload, usize::MAX)
            .unwrap()
            .iter()
            .map(|b| {
                let it = RecordIter::new(b, 1 << 20).unwrap();
                let h = *it.header();
                (
                    h.base_offset,
                    h.next_offset(),
                    it.map(|r| r.unwrap().offset).collect(),
                )
            })
            .collect()
    }

    /// A processed batch keeps its producer and transaction marks: a read-committed
    /// consumer drops an aborted transaction's records by them (it received them all).
    #[test]
    fn output_keeps_the_batchs_producer_and_transaction() {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..4 {
            b.push(None, format!("v{i}").as_bytes(), 1000, &[]);
        }
        b.set_producer(77, 3, 10);
        b.set_transactional(true);
        let mut raw = b.build().to_vec();
        set_base_offset(&mut raw, 20);
        let out = process_payload(&mut KeepEven, &Bytes::from(raw), 20, 0, 1 << 20).unwrap();
        let it = RecordIter::new(&out, 1 << 20).unwrap();
        let h = *it.header();
        assert_eq!((h.producer_id, h.producer_epoch), (77, 3));
        assert!(h.is_transactional());
        assert_eq!(
            it.map(|r| r.unwrap().offset).collect::<Vec<_>>(),
            vec![20, 22]
        );
    }

    /// A pipeline's output read through a consume-time processor: the records keep their
    /// `quiver.source` headers, and the rebuilt batch writes them compactly again.
    #[test]
    fn output_keeps_a_numbered_header_compact() {
        let mut b = BatchBuilder::new(Compression::None);
        b.set_numbered_header(Some("quiver.source"));
        for i in 0..4 {
            let source = format!("in/2/{}", 500 + i);
            b.push(None, b"v", 1000, &[("quiver.source", source.as_bytes())]);
        }
        let out = process_payload(&mut KeepEven, &b.build(), 0, 0, 1 << 20).unwrap();
        let it = RecordIter::new(&out, 1 << 20).unwrap();
        assert_eq!(it.numbered_header(), Some("quiver.source"));
        let sources: Vec<_> = it.map(|r| r.unwrap().headers[0].value.clone()).collect();
        assert_eq!(sources, vec![&b"in/2/500"[..], b"in/2/502"]);
    }

    #[test]
    fn output_keeps_source_offsets_and_batch_ranges() {
        let mut payload = batch(10, 5).to_vec();
        payload.extend_from_slice(&batch(15, 1));
        let out = process_payload(&mut KeepEven, &Bytes::from(payload), 11, 0, 1 << 20).unwrap();
        assert_eq!(decode(&out), vec![(10, 15, vec![12, 14]), (15, 16, vec![])]);
    }
}
