//! Compaction of a `__consumer_offsets` partition: the live records of its older part are
//! carried forward (appended again, each marked with the offset it was current at) and
//! that part is deleted, so a restart replays the groups' state, not their history.
//!
//! A carried record stands for its key's value just before the offset C named in its
//! `quiver.carried_from` header: its *effective offset* is C − 1. Replay applies a record
//! only when its effective offset is later than that of the record of the same key applied
//! before it (a plain record's effective offset is its own). So writers never wait for a
//! compaction: a key written after C keeps its newer value whether that write lands before
//! or after the carried copy, and a crash at any step leaves a log that replays to the same
//! state. The cut C is a batch boundary below the high watermark at which no transaction's
//! offsets are held open, so held offsets and their marker are never split.

use std::collections::HashMap;

use bytes::Bytes;
use quiver_protocol::batch::{
    self, BatchBuilder, BatchHeader, Compression, Marker, Record, RecordIter,
};

use super::records::RecordKey;
use crate::log::{LogError, PartitionLog};

/// The header of a carried record: the offset (decimal) its value was current before.
pub const CARRIED_FROM: &str = "quiver.carried_from";

/// A record's key and value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// A carried record: key, value, and the timestamp of the write it copies (a group's
/// records date its last activity, which its expiry counts from).
pub type Carried = (Vec<u8>, Vec<u8>, i64);

/// Largest batch of carried records.
const CARRIED_BATCH_BYTES: usize = 1024 * 1024;

/// The cut a carried record was copied at; `None` for a plain record.
fn carried_from(r: &Record) -> Option<i64> {
    r.headers
        .iter()
        .find(|h| h.key == CARRIED_FROM)
        .and_then(|h| std::str::from_utf8(&h.value).ok()?.parse::<i64>().ok())
}

/// The offset at which replay takes `r` to have been written (see the module docs).
pub fn effective_offset(r: &Record) -> i64 {
    carried_from(r).map_or(r.offset, |from| from - 1)
}

/// Per key, the effective offset of the record replay last applied, and what it keeps of
/// that record (`()` when replaying into the coordinator, the value when planning).
#[derive(Debug)]
pub struct Newest<V>(HashMap<Vec<u8>, (i64, V)>);

impl<V> Default for Newest<V> {
    fn default() -> Self {
        Newest(HashMap::new())
    }
}

impl<V> Newest<V> {
    /// True, and `value` kept, when a record of `key` at effective offset `at` is newer
    /// than the key's record applied before it.
    pub fn admit(&mut self, key: &[u8], at: i64, value: V) -> bool {
        match self.0.get_mut(key) {
            Some((last, _)) if *last >= at => false,
            Some(kept) => {
                *kept = (at, value);
                true
            }
            None => {
                self.0.insert(key.to_vec(), (at, value));
                true
            }
        }
    }
}

/// What a compaction carries forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carry {
    /// The log may be deleted below this offset once the records are durable.
    pub cut: i64,
    /// The live records current just before `cut`, in key order.
    pub records: Vec<Carried>,
}

impl Carry {
    /// The records as batches of about 1 MiB, each record marked with the cut.
    pub fn batches(&self) -> Vec<Bytes> {
        let from = self.cut.to_string();
        let mut out = Vec::new();
        let mut b = BatchBuilder::new(Compression::None);
        for (k, v, ts) in &self.records {
            b.push(Some(k), v, *ts, &[(CARRIED_FROM, from.as_bytes())]);
            if b.size_bytes() >= CARRIED_BATCH_BYTES {
                out.push(b.build());
                b = BatchBuilder::new(Compression::None);
            }
        }
        if !b.is_empty() {
            out.push(b.build());
        }
        out
    }
}

/// Reads `log` from its start up to `until` (its high watermark) and lists what a
/// compaction would carry; `None` when no cut lies past the log start. Replays exactly as
/// a coordinator's start does: held transactional offsets count once their commit marker
/// is read, a group's deletion deletes its offsets, and an unreadable batch or record is
/// skipped.
///
/// Deletions are not carried, so the cut never leaves part of an earlier compaction's
/// copies after it: a copy surviving the cut could hold a key that a deletion below the
/// cut, now gone, had removed. The cut is the last batch boundary with no transaction's
/// offsets held that is not past an earlier copy's cut and before that copy's end.
pub fn plan(
    log: &PartitionLog,
    until: i64,
    max_decompressed: usize,
) -> Result<Option<Carry>, LogError> {
    let start = log.snapshot().log_start;
    let mut offset = start;
    // Key → (effective offset, (value, empty once deleted; timestamp)).
    let mut latest = Newest::<(Vec<u8>, i64)>::default();
    // Producer id → (epoch, its held records), as the coordinator holds them.
    let mut held: HashMap<i64, (i16, Vec<KeyValue>)> = HashMap::new();
    // Batch boundaries with no transaction's offsets held: where a cut may go.
    let mut boundaries = Vec::new();
    // The cut of each earlier compaction whose copies were read → the end of those copies.
    let mut copies: HashMap<i64, i64> = HashMap::new();
    'read: loop {
        let (batches, next) = log.read_recovering(offset, 4 * 1024 * 1024)?;
        for b in &batches {
            let Ok(h) = BatchHeader::parse(b) else {
                continue;
            };
            if h.next_offset() > until {
                break 'read;
            }
            if h.is_control() {
                let marker = batch::marker_of(b).filter(|_| h.is_transactional());
                if let (Some(m), true) = (marker, h.base_offset >= offset) {
                    if let Some((_, records)) = held.remove(&h.producer_id) {
                        if m == Marker::Commit {
                            for (k, v) in records {
                                latest.admit(&k, h.base_offset, (v, h.max_timestamp));
                            }
                        }
                    }
                }
            } else if let Ok(records) = RecordIter::new(b, max_decompressed) {
                let mut in_txn = Vec::new();
                for r in records.map_while(Result::ok) {
                    if r.offset < offset {
                        continue;
                    }
                    let at = effective_offset(&r);
                    if let Some(from) = carried_from(&r) {
                        let end = copies.entry(from).or_insert(r.offset + 1);
                        *end = (*end).max(r.offset + 1);
                    }
                    let key = r.key.map(|k| k.to_vec()).unwrap_or_default();
                    if h.is_transactional() {
                        in_txn.push((key, r.value.to_vec()));
                    } else {
                        latest.admit(&key, at, (r.value.to_vec(), r.timestamp));
                    }
                }
                if h.is_transactional() && !in_txn.is_empty() {
                    let entry = held
                        .entry(h.producer_id)
                        .or_insert((h.producer_epoch, Vec::new()));
                    if entry.0 < h.producer_epoch {
                        *entry = (h.producer_epoch, Vec::new());
                    }
                    entry.1.extend(in_txn);
                }
            }
            if held.is_empty() {
                boundaries.push(h.next_offset());
            }
        }
        if next <= offset {
            break;
        }
        offset = next;
    }
    let splits_copies = |c: i64| copies.iter().any(|(&from, &end)| from < c && c < end);
    let Some(cut) = boundaries
        .into_iter()
        .rev()
        .find(|&c| c > start && !splits_copies(c))
    else {
        return Ok(None);
    };
    // A group's deletion removes all its offsets, also those whose own key saw no
    // deletion (a record stored but never applied, its write having failed).
    let group_deleted: HashMap<String, i64> = latest
        .0
        .iter()
        .filter(|(_, (at, (v, _)))| *at < cut && v.is_empty())
        .filter_map(|(k, (at, _))| match serde_json::from_slice(k) {
            Ok(RecordKey::Group { group }) => Some((group, *at)),
            _ => None,
        })
        .collect();
    let outlived_its_group = |k: &[u8], at: i64| match serde_json::from_slice(k) {
        Ok(RecordKey::Offset { group, .. }) => group_deleted.get(&group).is_some_and(|&d| d > at),
        _ => false,
    };
    let mut records: Vec<Carried> = latest
        .0
        .into_iter()
        .filter(|(k, (at, (v, _)))| *at < cut && !v.is_empty() && !outlived_its_group(k, *at))
        .map(|(k, (_, (v, ts)))| (k, v, ts))
        .collect();
    records.sort_unstable();
    Ok(Some(Carry { cut, records }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, carried_from: Option<i64>) -> Record {
        let headers = carried_from
            .map(|c| quiver_protocol::batch::Header {
                key: CARRIED_FROM.to_string(),
                value: Bytes::from(c.to_string()),
            })
            .into_iter()
            .collect();
        Record {
            offset,
            timestamp: 0,
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::new(),
            headers,
        }
    }

    #[test]
    fn a_carried_record_counts_as_written_just_before_its_cut() {
        assert_eq!(effective_offset(&record(40, None)), 40);
        assert_eq!(effective_offset(&record(40, Some(10))), 9);
    }

    #[test]
    fn replay_keeps_a_write_made_after_the_cut_over_the_carried_copy() {
        // Written at 12 (after cut 10), then the carried copy of its older value lands at 20.
        let mut a = Newest::default();
        assert!(a.admit(b"k", 12, ()));
        assert!(!a.admit(b"k", effective_offset(&record(20, Some(10))), ()));
        // Two compactions: an older carried copy (cut 10) read after a newer one (cut 30)
        // was written, then the newer one: the newer one wins.
        let mut a = Newest::default();
        assert!(a.admit(b"k", effective_offset(&record(31, Some(10))), ()));
        assert!(a.admit(b"k", effective_offset(&record(50, Some(30))), ()));
        assert!(!a.admit(b"k", effective_offset(&record(51, Some(10))), ()));
    }
}
