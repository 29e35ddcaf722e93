//! Transactions as one partition sees them: which producers have a transaction open here
//! (and from which offset), and which aborted transactions' batches are void. The last
//! stable offset — what read-committed consumers may read up to — is the first offset of
//! the oldest open transaction (or the high watermark when none is open). Rebuilt from the
//! batch headers when the partition opens; fed every appended batch afterwards.

use std::collections::{BTreeMap, VecDeque};

use quiver_protocol::batch::{BatchHeader, Marker};
use quiver_protocol::requests::AbortedTxn;

/// A transaction open in the partition.
#[derive(Debug, Clone, Copy)]
struct OpenTxn {
    /// Offset of its first batch here.
    first_offset: i64,
    /// The producer epoch of that batch.
    epoch: i16,
    /// When this index first saw it (ms since the epoch; when the partition opened, for
    /// one rebuilt from the log).
    seen_ms: i64,
}

/// Open and aborted transactions of one partition.
#[derive(Debug, Default)]
pub struct TxnIndex {
    /// Producer id → its open transaction here.
    open: BTreeMap<i64, OpenTxn>,
    /// Aborted transactions, in marker order.
    aborted: VecDeque<AbortedTxn>,
}

impl TxnIndex {
    /// Notes one appended batch; `marker` is its marker when it is a control batch.
    pub fn observe(&mut self, h: &BatchHeader, marker: Option<Marker>) {
        if !h.is_transactional() {
            return;
        }
        if h.is_control() {
            let first = self.open.remove(&h.producer_id);
            if let (Some(Marker::Abort), Some(first)) = (marker, first) {
                self.aborted.push_back(AbortedTxn {
                    producer_id: h.producer_id,
                    first_offset: first.first_offset,
                    last_offset: h.base_offset,
                });
            }
            return;
        }
        self.open.entry(h.producer_id).or_insert(OpenTxn {
            first_offset: h.base_offset,
            epoch: h.producer_epoch,
            seen_ms: crate::clock::now_ms(),
        });
    }

    /// Producers (id, epoch) whose transaction here was first seen before `before_ms`.
    pub fn open_since_before(&self, before_ms: i64) -> Vec<(i64, i16)> {
        self.open
            .iter()
            .filter(|(_, t)| t.seen_ms < before_ms)
            .map(|(id, t)| (*id, t.epoch))
            .collect()
    }

    /// True while `producer_id` has a transaction of `epoch` open here.
    pub fn is_open(&self, producer_id: i64, epoch: i16) -> bool {
        self.open
            .get(&producer_id)
            .is_some_and(|t| t.epoch == epoch)
    }

    /// The first offset of the oldest open transaction, if any.
    pub fn first_unstable(&self) -> Option<i64> {
        self.open.values().map(|t| t.first_offset).min()
    }

    /// Aborted transactions with batches in `from..to`.
    pub fn aborted_in(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        self.aborted
            .iter()
            .filter(|a| a.last_offset >= from && a.first_offset < to)
            .copied()
            .collect()
    }

    /// Forgets aborted transactions wholly before `log_start` (deleted by retention).
    pub fn trim(&mut self, log_start: i64) {
        while self
            .aborted
            .front()
            .is_some_and(|a| a.last_offset < log_start)
        {
            self.aborted.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::{BatchBuilder, Compression, ATTR_CONTROL, ATTR_TRANSACTIONAL};

    fn header(pid: i64, base: i64, control: bool) -> BatchHeader {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"v", 1, &[]);
        let mut h = BatchHeader::parse(&b.build()).unwrap();
        h.base_offset = base;
        h.producer_id = pid;
        h.attributes |= ATTR_TRANSACTIONAL;
        if control {
            h.attributes |= ATTR_CONTROL;
        }
        h
    }

    #[test]
    fn open_transactions_hold_the_stable_offset_and_aborts_are_listed() {
        let mut ix = TxnIndex::default();
        ix.observe(&header(1, 10, false), None);
        ix.observe(&header(2, 11, false), None);
        ix.observe(&header(1, 12, false), None);
        assert_eq!(ix.first_unstable(), Some(10));
        ix.observe(&header(1, 13, true), Some(Marker::Abort));
        assert_eq!(ix.first_unstable(), Some(11));
        ix.observe(&header(2, 14, true), Some(Marker::Commit));
        assert_eq!(ix.first_unstable(), None);
        let aborted = ix.aborted_in(0, 100);
        assert_eq!(
            aborted,
            vec![AbortedTxn {
                producer_id: 1,
                first_offset: 10,
                last_offset: 13
            }]
        );
        assert!(ix.aborted_in(14, 100).is_empty());
        assert_eq!(ix.aborted_in(13, 14).len(), 1);
        ix.trim(14);
        assert!(ix.aborted_in(0, 100).is_empty());
    }

    #[test]
    fn plain_batches_and_stray_markers_change_nothing() {
        let mut ix = TxnIndex::default();
        let mut plain = header(3, 5, false);
        plain.attributes = 0;
        ix.observe(&plain, None);
        ix.observe(&header(4, 6, true), Some(Marker::Abort));
        assert_eq!(ix.first_unstable(), None);
        assert!(ix.aborted_in(0, 100).is_empty());
    }
}
