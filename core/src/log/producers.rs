//! Producer sequence state of one partition.
//!
//! A producer stamps each batch with its producer id and the sequence of its first record.
//! Because every request travels on its own QUIC stream, two pipelined requests of one
//! producer may arrive in either order; the partition appends them in sequence order
//! (a batch ahead of its turn waits), and answers a retried batch it already stored with
//! the offsets it got the first time, so retries never duplicate. A producer id seen with a
//! higher epoch (a transactional producer initialised again) starts its sequences afresh;
//! a lower epoch than the one seen is fenced. Batches without a sequence (transaction
//! markers, the coordinator's own transactional batches) are not sequenced, but their epoch
//! counts: a marker written at a producer's bumped epoch fences the batches of its older
//! epochs still in flight, and a marker from an epoch older than one seen is refused.
//! A marker a coordinator decided carries that coordinator's epoch (the leader epoch of its
//! offsets partition); a marker from an older coordinator epoch than one already taken for
//! the producer comes from a deposed coordinator and is refused (Kafka's coordinator fence).

use std::collections::{HashMap, VecDeque};

use quiver_protocol::batch::{self, sequence_after, sequence_distance, BatchHeader};

/// How many recent batches per producer are remembered for duplicate detection.
const REMEMBERED: usize = 8;

/// A batch already appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppendedBatch {
    /// Sequence of the first record.
    pub first_seq: i32,
    /// Sequence of the last record.
    pub last_seq: i32,
    /// Offset of the first record.
    pub base_offset: i64,
    /// Offset of the last record.
    pub last_offset: i64,
}

/// What to do with an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Append it.
    Append,
    /// Already stored: answer with these offsets.
    Duplicate(AppendedBatch),
    /// Its predecessors have not arrived yet: wait and check again.
    Wait,
    /// An unknown producer that does not start at sequence 0: its earlier batches may
    /// still be in flight, so wait for them; if they never come, the batch is refused
    /// (`OutOfOrderSequence`), never taken as a silent fresh start.
    WaitUnknown,
    /// It can never fit (an old sequence no longer remembered).
    Reject,
    /// An older epoch of the producer id than one already seen.
    Fenced,
}

#[derive(Debug, Default)]
struct ProducerEntry {
    epoch: i16,
    recent: VecDeque<AppendedBatch>,
    /// Newest coordinator epoch of a marker taken for the producer.
    coordinator_epoch: Option<u64>,
    /// Markers taken for the producer since the log was opened (a transaction's check
    /// against its coordinator notes this, and its batch is refused if one came meanwhile).
    markers: u64,
    /// Offset of the last batch of any kind stored for it (markers too): which producers
    /// wrote last when the table must forget some.
    last_offset: i64,
}

/// Most producers a snapshot keeps (those that wrote last); older ones are forgotten, like
/// Kafka's expired producer ids: their next batch must start a new sequence.
pub const SNAPSHOT_PRODUCERS: usize = 10_000;

/// Most producers the table holds in memory: past this, it keeps the
/// [`SNAPSHOT_PRODUCERS`] that wrote last (what a restart would keep anyway), so producer
/// ids a client makes up one batch at a time cannot grow it without bound.
pub const MEMORY_PRODUCERS: usize = 2 * SNAPSHOT_PRODUCERS;

/// One producer's state as persisted in the partition's metadata record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProducerSnapshot {
    /// Producer id.
    pub id: i64,
    /// Its epoch.
    pub epoch: i16,
    /// Its newest batches, oldest first.
    pub recent: Vec<AppendedBatch>,
    /// Newest coordinator epoch of a marker taken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_epoch: Option<u64>,
}

/// Sequence state of every producer of one partition.
#[derive(Debug, Default)]
pub struct ProducerTable {
    producers: HashMap<i64, ProducerEntry>,
}

impl ProducerTable {
    /// Decides what to do with a batch of `count` records from `producer_id`/`epoch` at
    /// `first_seq`.
    pub fn check(&self, producer_id: i64, epoch: i16, first_seq: i32, count: i32) -> SequenceCheck {
        if producer_id < 0 {
            return SequenceCheck::Append;
        }
        let known = self.producers.get(&producer_id);
        if known.is_some_and(|e| epoch < e.epoch) {
            return SequenceCheck::Fenced;
        }
        if first_seq < 0 {
            return SequenceCheck::Append;
        }
        let Some(last) = known
            .filter(|e| e.epoch == epoch)
            .and_then(|e| e.recent.back())
        else {
            // A new producer starts at 0. Any other start is either a batch that overtook
            // the producer's first one on another stream, or a producer whose state aged out.
            return if first_seq == 0 {
                SequenceCheck::Append
            } else {
                SequenceCheck::WaitUnknown
            };
        };
        let entry = &self.producers[&producer_id];
        // Sequences wrap from i32::MAX to 0; "ahead" is less than half the range forward.
        let expected = sequence_after(last.last_seq, 1);
        if first_seq == expected {
            return SequenceCheck::Append;
        }
        let last_seq = sequence_after(first_seq, count - 1);
        if let Some(b) = entry
            .recent
            .iter()
            .find(|b| b.first_seq == first_seq && b.last_seq == last_seq)
        {
            return SequenceCheck::Duplicate(*b);
        }
        if sequence_distance(expected, first_seq) < 1 << 30 {
            SequenceCheck::Wait
        } else {
            SequenceCheck::Reject
        }
    }

    /// Markers taken for `producer_id` since the log was opened.
    pub fn markers(&self, producer_id: i64) -> u64 {
        self.producers.get(&producer_id).map_or(0, |e| e.markers)
    }

    /// The state of the producers that wrote last (at most [`SNAPSHOT_PRODUCERS`]).
    pub fn snapshot(&self) -> Vec<ProducerSnapshot> {
        let mut all: Vec<ProducerSnapshot> = self
            .producers
            .iter()
            .filter(|(_, e)| !e.recent.is_empty() || e.epoch > 0 || e.coordinator_epoch.is_some())
            .map(|(id, e)| ProducerSnapshot {
                id: *id,
                epoch: e.epoch,
                recent: e.recent.iter().copied().collect(),
                coordinator_epoch: e.coordinator_epoch,
            })
            .collect();
        all.sort_unstable_by_key(|p| {
            std::cmp::Reverse(p.recent.last().map_or(i64::MIN, |b| b.last_offset))
        });
        all.truncate(SNAPSHOT_PRODUCERS);
        all.sort_unstable_by_key(|p| p.id);
        all
    }

    /// A table holding `snapshot`.
    pub fn from_snapshot(snapshot: &[ProducerSnapshot]) -> ProducerTable {
        ProducerTable {
            producers: snapshot
                .iter()
                .map(|p| {
                    (
                        p.id,
                        ProducerEntry {
                            epoch: p.epoch,
                            recent: p.recent.iter().copied().collect(),
                            coordinator_epoch: p.coordinator_epoch,
                            markers: 0,
                            last_offset: p.recent.last().map_or(0, |b| b.last_offset),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Takes from `before` (this partition's table before its log was cut back and this
    /// table rebuilt from the batches left) the producers whose every remembered batch lies
    /// below `log_start`: retention deleted their batches, so no rebuild can find them, yet
    /// their sequences and epochs still hold (DESIGN: retention keeps producer state).
    pub fn keep_retained(&mut self, before: ProducerTable, log_start: i64) {
        for (id, entry) in before.producers {
            let below = entry
                .recent
                .back()
                .is_none_or(|b| b.last_offset < log_start);
            if below && !self.producers.contains_key(&id) {
                self.producers.insert(id, entry);
            }
        }
    }

    /// Whether a marker of `producer_id` from `coordinator_epoch` may be appended: not when
    /// a marker of a newer coordinator epoch was taken for the producer (the error names
    /// that epoch). A marker no coordinator decided (`None`) is not fenced.
    pub fn check_marker(
        &self,
        producer_id: i64,
        coordinator_epoch: Option<u64>,
    ) -> Result<(), u64> {
        let known = self
            .producers
            .get(&producer_id)
            .and_then(|e| e.coordinator_epoch);
        match (known, coordinator_epoch) {
            (Some(k), Some(c)) if c < k => Err(k),
            _ => Ok(()),
        }
    }

    /// Records a stored batch whose header carries its offsets in the log: its producer
    /// sequence, and for a marker its coordinator epoch.
    pub fn observe(&mut self, h: &BatchHeader, raw: &[u8]) {
        self.record(
            h.producer_id,
            h.producer_epoch,
            AppendedBatch {
                first_seq: h.base_sequence,
                last_seq: sequence_after(h.base_sequence, h.record_count - 1),
                base_offset: h.base_offset,
                last_offset: h.last_offset(),
            },
        );
        if h.is_control() && h.producer_id >= 0 {
            let e = self.producers.entry(h.producer_id).or_default();
            e.markers += 1;
            if let Some(c) = batch::coordinator_epoch_of(raw) {
                e.coordinator_epoch = Some(e.coordinator_epoch.map_or(c, |k| k.max(c)));
            }
        }
        self.bound();
    }

    /// Past [`MEMORY_PRODUCERS`], forgets all but the [`SNAPSHOT_PRODUCERS`] that wrote
    /// last, as a restart would (amortised: it then takes as many new producers again
    /// before the next pass).
    fn bound(&mut self) {
        if self.producers.len() <= MEMORY_PRODUCERS {
            return;
        }
        let mut last: Vec<(i64, i64)> = self
            .producers
            .iter()
            .map(|(id, e)| (e.last_offset, *id))
            .collect();
        last.sort_unstable_by_key(|&(offset, _)| std::cmp::Reverse(offset));
        for (_, id) in &last[SNAPSHOT_PRODUCERS..] {
            self.producers.remove(id);
        }
    }

    /// Records an appended batch.
    pub fn record(&mut self, producer_id: i64, epoch: i16, batch: AppendedBatch) {
        if producer_id < 0 {
            return;
        }
        let e = self.producers.entry(producer_id).or_default();
        e.last_offset = e.last_offset.max(batch.last_offset);
        if epoch > e.epoch {
            e.epoch = epoch;
            e.recent.clear();
        }
        if batch.first_seq < 0 {
            // Not sequenced: only its epoch counts.
            self.bound();
            return;
        }
        e.recent.push_back(batch);
        while e.recent.len() > REMEMBERED {
            e.recent.pop_front();
        }
        self.bound();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(first: i32, last: i32, off: i64) -> AppendedBatch {
        AppendedBatch {
            first_seq: first,
            last_seq: last,
            base_offset: off,
            last_offset: off + i64::from(last - first),
        }
    }

    /// A log cut back (a follower's truncation) rebuilds its table from the batches left;
    /// producers whose batches retention had deleted are kept from the table before, and
    /// the rebuild's own view wins for the others.
    #[test]
    fn a_rebuild_after_truncation_keeps_producers_only_retention_remembers() {
        let mut before = ProducerTable::default();
        before.record(1, 0, b(0, 9, 0)); // retained away: below the log start of 50
        before.record(2, 3, b(0, 4, 60)); // its batches are still stored
        before.record(3, 0, b(0, 4, 40));
        before.record(3, 0, b(5, 9, 70)); // in the cut suffix
        let mut rebuilt = ProducerTable::default();
        rebuilt.record(2, 3, b(0, 4, 60));
        rebuilt.keep_retained(before, 50);
        assert_eq!(rebuilt.check(1, 0, 10, 1), SequenceCheck::Append);
        assert_eq!(
            rebuilt.check(1, 0, 0, 10),
            SequenceCheck::Duplicate(b(0, 9, 0))
        );
        assert_eq!(rebuilt.check(2, 3, 5, 1), SequenceCheck::Append);
        // Producer 3's newest batch was cut: the rebuild (which did not see it) decides.
        assert!(!rebuilt.producers.contains_key(&3));
    }

    /// Sequences wrap from i32::MAX to 0: a producer past 2^31 records to one partition
    /// goes on (it waited 5 s per batch and failed before), a batch may straddle the wrap,
    /// and "ahead" and "behind" hold across it.
    #[test]
    fn sequences_wrap_from_max_to_zero() {
        let max = i32::MAX;
        let mut t = ProducerTable::default();
        t.record(1, 0, b(max - 9, max, 0));
        assert_eq!(t.check(1, 0, 0, 5), SequenceCheck::Append);
        assert_eq!(
            t.check(1, 0, 5, 5),
            SequenceCheck::Wait,
            "ahead across the wrap"
        );
        assert_eq!(t.check(1, 0, max - 20, 5), SequenceCheck::Reject);
        assert!(matches!(
            t.check(1, 0, max - 9, 10),
            SequenceCheck::Duplicate(_)
        ));
        // A batch straddling the wrap: MAX-2..=1; the next starts at 2.
        let mut t = ProducerTable::default();
        t.record(2, 0, b(max - 10, max - 3, 0));
        assert_eq!(t.check(2, 0, max - 2, 5), SequenceCheck::Append);
        let mut raw = {
            let mut bb = quiver_protocol::batch::BatchBuilder::new(
                quiver_protocol::batch::Compression::None,
            );
            for _ in 0..5 {
                bb.push(None, b"v", 0, &[]);
            }
            bb.set_producer(2, 0, max - 2);
            bb.build().to_vec()
        };
        batch::set_base_offset(&mut raw, 8);
        let h = BatchHeader::parse(&raw).unwrap();
        t.observe(&h, &raw);
        assert_eq!(t.check(2, 0, 2, 3), SequenceCheck::Append);
        assert!(matches!(
            t.check(2, 0, max - 2, 5),
            SequenceCheck::Duplicate(_)
        ));
    }

    #[test]
    fn in_order_duplicate_and_ahead() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(7, 0, 0, 10), SequenceCheck::Append);
        t.record(7, 0, b(0, 9, 100));
        assert_eq!(t.check(7, 0, 10, 5), SequenceCheck::Append);
        assert_eq!(t.check(7, 0, 0, 10), SequenceCheck::Duplicate(b(0, 9, 100)));
        assert_eq!(t.check(7, 0, 20, 5), SequenceCheck::Wait);
        assert_eq!(t.check(8, 0, 20, 5), SequenceCheck::WaitUnknown);
        assert_eq!(t.check(8, 0, 0, 5), SequenceCheck::Append);
        assert_eq!(t.check(-1, 0, 3, 5), SequenceCheck::Append);
    }

    #[test]
    fn forgotten_old_sequence_is_rejected() {
        let mut t = ProducerTable::default();
        for i in 0..20 {
            t.record(1, 0, b(i * 10, i * 10 + 9, i64::from(i) * 10));
        }
        assert_eq!(t.check(1, 0, 0, 10), SequenceCheck::Reject);
    }

    #[test]
    fn a_snapshot_restores_the_same_decisions() {
        let mut t = ProducerTable::default();
        t.record(1, 0, b(0, 9, 0));
        t.record(2, 3, b(0, 4, 10));
        t.record(1, 0, b(10, 19, 15));
        let back = ProducerTable::from_snapshot(&t.snapshot());
        for (id, epoch, seq, count) in [
            (1, 0, 20, 5),
            (1, 0, 10, 10),
            (2, 3, 5, 1),
            (2, 2, 5, 1),
            (3, 0, 7, 1),
        ] {
            assert_eq!(
                back.check(id, epoch, seq, count),
                t.check(id, epoch, seq, count)
            );
        }
        assert_eq!(
            back.check(1, 0, 10, 10),
            SequenceCheck::Duplicate(b(10, 19, 15))
        );
    }

    #[test]
    fn a_new_epoch_starts_afresh_and_an_old_one_is_fenced() {
        let mut t = ProducerTable::default();
        t.record(5, 0, b(0, 9, 100));
        // Re-initialised: sequence 0 again is a new start, not a duplicate of the old batch.
        assert_eq!(t.check(5, 1, 0, 10), SequenceCheck::Append);
        t.record(5, 1, b(0, 4, 200));
        assert_eq!(t.check(5, 1, 5, 1), SequenceCheck::Append);
        assert_eq!(t.check(5, 0, 10, 1), SequenceCheck::Fenced);
    }

    #[test]
    fn a_marker_at_a_bumped_epoch_fences_the_older_epochs_batches() {
        let mut t = ProducerTable::default();
        t.record(5, 2, b(0, 9, 100));
        // A marker (no sequence) at epoch 3: an abort that fenced the producer.
        assert_eq!(t.check(5, 3, -1, 1), SequenceCheck::Append);
        t.record(5, 3, b(-1, -1, 110));
        assert_eq!(
            t.check(5, 2, 10, 1),
            SequenceCheck::Fenced,
            "a late batch of epoch 2"
        );
        assert_eq!(
            t.check(5, 2, -1, 1),
            SequenceCheck::Fenced,
            "a stale marker"
        );
        assert_eq!(
            t.check(5, 3, 0, 1),
            SequenceCheck::Append,
            "epoch 3 starts afresh"
        );
        let restored = ProducerTable::from_snapshot(&t.snapshot());
        assert_eq!(
            restored.check(5, 2, 10, 1),
            SequenceCheck::Fenced,
            "kept in the snapshot"
        );
    }

    /// The header a stored marker of `producer_id`/`epoch` at `offset` has.
    fn stored_marker(
        producer_id: i64,
        epoch: i16,
        coordinator: Option<u64>,
        offset: i64,
    ) -> (BatchHeader, bytes::Bytes) {
        let raw = batch::control_batch(producer_id, epoch, batch::Marker::Commit, coordinator, 0);
        let mut h = BatchHeader::parse(&raw).unwrap();
        h.base_offset = offset;
        (h, raw)
    }

    #[test]
    fn a_marker_from_an_older_coordinator_epoch_is_refused_and_the_snapshot_keeps_it() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check_marker(5, Some(3)), Ok(()), "nothing known yet");
        let (h, raw) = stored_marker(5, 0, Some(3), 10);
        t.observe(&h, &raw);
        assert_eq!(
            t.check_marker(5, Some(3)),
            Ok(()),
            "the same coordinator again"
        );
        assert_eq!(t.check_marker(5, Some(4)), Ok(()), "a newer coordinator");
        assert_eq!(t.check_marker(5, Some(2)), Err(3), "a deposed coordinator");
        assert_eq!(
            t.check_marker(5, None),
            Ok(()),
            "a marker no coordinator decided"
        );
        assert_eq!(t.check_marker(6, Some(0)), Ok(()), "another producer");
        // Markers without a coordinator epoch (written before markers carried one) leave
        // the fence where it is; a newer coordinator's marker raises it.
        let (h, raw) = stored_marker(5, 0, None, 11);
        t.observe(&h, &raw);
        assert_eq!(t.check_marker(5, Some(2)), Err(3));
        let (h, raw) = stored_marker(5, 0, Some(9), 12);
        t.observe(&h, &raw);
        assert_eq!(t.check_marker(5, Some(8)), Err(9));
        let restored = ProducerTable::from_snapshot(&t.snapshot());
        assert_eq!(
            restored.check_marker(5, Some(8)),
            Err(9),
            "kept in the snapshot"
        );
        // A snapshot written before the field existed reads as no fence.
        let old: Vec<ProducerSnapshot> =
            serde_json::from_str(r#"[{"id":5,"epoch":0,"recent":[]}]"#).unwrap();
        assert_eq!(
            ProducerTable::from_snapshot(&old).check_marker(5, Some(0)),
            Ok(())
        );
    }

    /// Producer ids made up one batch at a time do not grow the table without bound: past
    /// the limit it keeps those that wrote last, which still get their duplicates answered.
    #[test]
    fn made_up_producer_ids_do_not_grow_the_table_without_bound() {
        let mut t = ProducerTable::default();
        let n = MEMORY_PRODUCERS as i64 + 5_000;
        for id in 0..n {
            t.record(id, 0, b(0, 0, id));
            assert!(t.producers.len() <= MEMORY_PRODUCERS);
        }
        // The newest producer: its batch is known (a retry is a duplicate).
        assert_eq!(
            t.check(n - 1, 0, 0, 1),
            SequenceCheck::Duplicate(b(0, 0, n - 1))
        );
        // The oldest was forgotten: its next batch waits, as after a restart.
        assert_eq!(t.check(0, 0, 1, 1), SequenceCheck::WaitUnknown);
        // A producer whose last batch was a marker at a bumped epoch (no sequenced batch
        // left) counts by that batch: written last, it keeps its fence.
        t.record(7, 5, b(-1, -1, 3 * n));
        for id in 3 * n..3 * n + MEMORY_PRODUCERS as i64 {
            t.record(id, 0, b(0, 0, id - 3 * n));
        }
        assert_eq!(t.check(7, 4, 0, 1), SequenceCheck::Fenced);
        // Unsequenced batches are bounded too.
        for id in n..2 * n {
            t.record(id, 1, b(-1, -1, id));
        }
        assert!(t.producers.len() <= MEMORY_PRODUCERS);
    }
}
