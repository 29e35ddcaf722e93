//! What a partition log does for replication, and nothing more: it stores and reads; the
//! replica layer (`crate::replica`) decides the high watermark, the ISR and who leads.
//!
//! - a replicated log's appends do not move its high watermark ([`PartitionLog::set_replicated`]);
//!   at that switch the high watermark falls back to the checkpoint written before the
//!   broker stopped (never the log end: what was on disk may never have been committed);
//! - leader epochs: a new leader records `(epoch, log end)` before it accepts writes
//!   ([`PartitionLog::become_leader`]); a follower learns epochs from the batches it copies;
//!   [`PartitionLog::end_offset_for_epoch`] answers a follower's epoch lookup (KIP-101);
//! - [`PartitionLog::append_replicated`] stores a leader's batch at its own offset, keeping
//!   its epoch; [`PartitionLog::truncate_to`] drops a divergent suffix.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use quiver_protocol::batch::{self, BatchHeader};

use super::{
    ts_key, LogError, PartitionLog, ProducerTable, ReadResult, TxnIndex, TIME_INDEX_INTERVAL,
};
use crate::log::{key_offset, offset_key};

impl PartitionLog {
    /// Marks the log as a replica of a cluster partition (idempotent). The high watermark
    /// drops to the checkpoint taken before this open, if it was above it.
    pub fn set_replicated(&self) {
        if self.replicated.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut st = self.lock();
        let hw = st.hw_at_open.min(st.log_end).max(st.log_start);
        st.high_watermark = hw;
        drop(st);
        self.hw.send_replace(hw);
    }

    /// True for a replica of a cluster partition.
    pub fn is_replicated(&self) -> bool {
        self.replicated.load(Ordering::Acquire)
    }

    /// The epoch of the newest stored batch's leader (`-1` for a log that never had one).
    pub fn last_epoch(&self) -> i32 {
        self.lock().epoch_starts.last().map_or(-1, |e| e.0)
    }

    /// This broker now leads the partition at `epoch`: later batches are stamped with it,
    /// and the epoch starts at the current log end. A follower loop of an earlier role can
    /// no longer write.
    pub fn become_leader(&self, epoch: i32) -> Result<(), LogError> {
        self.check_meta()?;
        {
            let mut st = self.lock();
            st.role_generation += 1;
            st.retired = false;
            st.leading = true;
            st.leader_epoch = epoch;
            let end = st.log_end;
            if st.epoch_starts.last().is_none_or(|e| e.0 < epoch) {
                st.epoch_starts.push((epoch, end));
            }
        }
        self.persist_meta()
    }

    /// This broker follows the leader of `epoch` (it stamps nothing itself). Returns the
    /// role generation the new follower loop writes under.
    pub fn become_follower(&self, epoch: i32) -> Result<u64, LogError> {
        self.check_meta()?;
        let generation = {
            let mut st = self.lock();
            st.role_generation += 1;
            st.retired = false;
            st.leading = false;
            st.leader_epoch = epoch;
            st.role_generation
        };
        // Batches waiting for their producer's earlier ones fail now (not leading), not
        // at their timeout.
        self.sequence_waiters.wake_all();
        self.persist_meta()?;
        Ok(generation)
    }

    /// Ends any follower loop's right to write (the partition stopped being followed here).
    pub fn end_role(&self) {
        {
            let mut st = self.lock();
            st.role_generation += 1;
            st.leading = false;
        }
        self.sequence_waiters.wake_all();
    }

    fn check_generation(st: &super::State, generation: u64) -> Result<(), LogError> {
        if st.role_generation != generation {
            return Err(LogError::Fenced(
                "this replica's role changed: the fetch loop that wrote here has ended".into(),
            ));
        }
        Ok(())
    }

    /// The largest epoch at or below `epoch` this log has, and where it ends (the start of
    /// the next epoch, or the log end); `(-1, -1)` when it has none.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> (i32, i64) {
        let st = self.lock();
        let Some(i) = st.epoch_starts.iter().rposition(|e| e.0 <= epoch) else {
            return (-1, -1);
        };
        let end = st
            .epoch_starts
            .get(i + 1)
            .map_or(st.log_end, |next| next.1.min(st.log_end));
        (st.epoch_starts[i].0, end)
    }

    /// Where this log must be cut to agree with a leader that answered `(epoch, end)` to
    /// the lookup of this log's last epoch (KIP-279): below the leader's end of that epoch
    /// and below this log's own end of it, since everything this log wrote under a later
    /// epoch is one the leader does not have. The log start when the leader has no epoch at
    /// or below the one asked for, or this log none at or below the leader's.
    pub fn divergence_point(&self, leader_epoch: i32, leader_end: i64) -> i64 {
        let log_start = self.lock().log_start;
        if leader_epoch < 0 {
            return log_start;
        }
        match self.end_offset_for_epoch(leader_epoch) {
            (mine, _) if mine < 0 => log_start,
            (_, own_end) => leader_end.min(own_end).max(log_start),
        }
    }

    /// Reads whole batches from `offset` up to the log end (a follower's fetch; the high
    /// watermark does not bound it).
    pub fn read_to_log_end(&self, offset: i64, max_bytes: usize) -> Result<ReadResult, LogError> {
        let snapshot = self.snapshot();
        if offset < snapshot.log_start || offset > snapshot.log_end {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start: snapshot.log_start,
                end: snapshot.log_end,
            });
        }
        self.read_below(offset, max_bytes, snapshot.log_end, snapshot)
    }

    /// Stores a batch copied from the leader at its own base offset, which must be this
    /// log's end, keeping its leader epoch; only under the follower's role `generation`.
    pub fn append_replicated(&self, raw: &Bytes, generation: u64) -> Result<(), LogError> {
        self.check_alive()?;
        let h = batch::check_crc(raw)?;
        let mut st = self.lock();
        Self::check_generation(&st, generation)?;
        if h.base_offset != st.log_end {
            return Err(LogError::Corrupt {
                offset: h.base_offset,
                reason: format!(
                    "a replicated batch starts at offset {} but this replica's log ends at {}",
                    h.base_offset, st.log_end
                ),
            });
        }
        // Epochs recorded at the log end with no batch (a leadership that wrote nothing) say
        // nothing about this batch's place: the cache describes the batches it holds.
        while st
            .epoch_starts
            .last()
            .is_some_and(|e| e.1 >= h.base_offset && e.0 > h.leader_epoch)
        {
            st.epoch_starts.pop();
        }
        if st.epoch_starts.last().is_none_or(|e| e.0 < h.leader_epoch) {
            st.epoch_starts.push((h.leader_epoch, h.base_offset));
        }
        self.batches.insert(&offset_key(h.base_offset), raw)?;
        if st.bytes_since_index >= TIME_INDEX_INTERVAL {
            self.time_index
                .insert(&ts_key(st.running_max_ts), offset_key(h.base_offset))?;
            st.bytes_since_index = 0;
        }
        st.bytes_since_index += raw.len() as u64;
        st.running_max_ts = st.running_max_ts.max(h.max_timestamp);
        let st = &mut *st;
        observe(&mut st.producers, &mut st.txns, &h, raw);
        st.log_end = h.next_offset();
        st.size_bytes += raw.len() as u64;
        Ok(())
    }

    /// Drops every batch at or after `offset` (a batch holding `offset` goes whole), rebuilds
    /// the producer and transaction state from what remains, and returns the new log end;
    /// only under the follower's role `generation`.
    pub fn truncate_to(&self, offset: i64, generation: u64) -> Result<i64, LogError> {
        self.check_meta()?;
        let mut st = self.lock();
        Self::check_generation(&st, generation)?;
        if offset >= st.log_end {
            // Nothing to drop, but an epoch that starts at the log end has no batch here:
            // forget it, so the next epoch lookup asks about what the log holds.
            let before = st.epoch_starts.len();
            let end = st.log_end;
            if end == st.log_start {
                // An empty log holds no epoch.
                st.epoch_starts.clear();
            } else if offset == end {
                st.epoch_starts.retain(|e| e.1 < end);
            }
            let changed = st.epoch_starts.len() != before;
            drop(st);
            if changed {
                self.persist_meta()?;
            }
            return Ok(end);
        }
        let from = match self.batches.range_through(&offset_key(offset)).next_back() {
            Some(item) => {
                let (k, v) = item?;
                if BatchHeader::parse(&v)?.next_offset() > offset {
                    key_offset(&k)
                } else {
                    offset
                }
            }
            None => offset,
        };
        let doomed: Vec<_> = self
            .batches
            .range_from(&offset_key(from))
            .collect::<Result<_, _>>()?;
        let dropped = doomed.len();
        // Newest first: a crash part way leaves a shorter log, never one with a hole.
        for (k, _) in doomed.into_iter().rev() {
            self.batches.remove(&k)?;
        }
        let stale: Vec<_> = self
            .time_index
            .iter()
            .filter_map(|item| item.ok())
            .filter(|(_, v)| key_offset(v) >= from)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            self.time_index.remove(&k)?;
        }
        let new_end = from.max(st.log_start);
        let (mut producers, mut txns, mut size) =
            (ProducerTable::default(), TxnIndex::default(), 0u64);
        for item in self.batches.iter() {
            let (_, v) = item?;
            size += v.len() as u64;
            let raw = Bytes::copy_from_slice(&v);
            if let Ok(h) = BatchHeader::parse(&raw) {
                observe(&mut producers, &mut txns, &h, &raw);
            }
        }
        producers.keep_retained(std::mem::take(&mut st.producers), st.log_start);
        st.producers = producers;
        st.txns = txns;
        st.size_bytes = size;
        st.epoch_starts.retain(|e| e.1 < new_end);
        if new_end == st.log_start {
            // Nothing left: no epoch either (entries from before the log start included).
            st.epoch_starts.clear();
        }
        st.log_end = new_end;
        st.high_watermark = st.high_watermark.min(new_end);
        let hw = st.high_watermark;
        drop(st);
        self.hw.send_replace(hw);
        self.persist_meta()?;
        tracing::warn!(topic = %self.topic, partition = self.partition, log_end = new_end, batches = dropped, "truncated a divergent suffix");
        Ok(new_end)
    }

    /// Drops everything and starts the log empty at `offset` (a follower that fell behind
    /// the leader's log start); only under the follower's role `generation`.
    pub fn reset_to(&self, offset: i64, generation: u64) -> Result<(), LogError> {
        Self::check_generation(&self.lock(), generation)?;
        self.clear_to(offset)
    }

    /// Removes every batch and starts the log empty at `offset`, with no producer,
    /// transaction or epoch state. The new bounds are stored before any batch is removed:
    /// a crash in between leaves batches the stored bounds disown (below a log start that
    /// moved up, which opening and retention remove) or that are still whole (a log start
    /// that moved down to 0), never bounds claiming offsets whose batches are gone.
    fn clear_to(&self, offset: i64) -> Result<(), LogError> {
        self.check_meta()?;
        {
            let mut st = self.lock();
            st.producers = ProducerTable::default();
            st.txns = TxnIndex::default();
            st.size_bytes = 0;
            st.epoch_starts.clear();
            st.log_start = offset;
            st.log_end = offset;
            st.high_watermark = offset;
        }
        self.hw.send_replace(offset);
        self.persist_meta()?;
        self.batches.clear()?;
        self.time_index.clear()?;
        Ok(())
    }
}

impl PartitionLog {
    /// True when the log holds (or held) anything: its start or end moved from 0.
    pub fn has_data(&self) -> bool {
        let st = self.lock();
        st.log_end != 0 || st.log_start != 0
    }

    /// Drops every batch of a replica this broker no longer holds (the partition was moved
    /// to other brokers): ends any role (a fetch loop still running can no longer write),
    /// refuses appends until the partition is a replica here again (a produce or group
    /// write that passed its leader check just before cannot land in the dropped log), and
    /// leaves an empty log at offset 0, so that if the partition comes back here its
    /// follower copies it from the leader's log start like a new replica. Returns the number
    /// of bytes dropped. Blocking (removes every key of the partition).
    pub fn drop_moved_replica(&self) -> Result<u64, LogError> {
        let dropped = {
            let mut st = self.lock();
            st.role_generation += 1;
            st.retired = true;
            st.size_bytes
        };
        self.sequence_waiters.wake_all();
        self.clear_to(0)?;
        Ok(dropped)
    }
}

/// Records a stored batch's producer sequence and transaction state.
fn observe(producers: &mut ProducerTable, txns: &mut TxnIndex, h: &BatchHeader, raw: &Bytes) {
    producers.observe(h, raw);
    if h.is_transactional() {
        let marker = h.is_control().then(|| batch::marker_of(raw)).flatten();
        txns.observe(h, marker);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use quiver_protocol::batch::{BatchBuilder, Compression};

    use super::*;

    /// A batch of `n` records stored at `base` by the leader of `epoch`.
    fn leader_batch(base: i64, n: usize, epoch: i32) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..n {
            b.push(
                None,
                format!("e{epoch}-{i}").as_bytes(),
                1_000 + i as i64,
                &[],
            );
        }
        stored_at(b, base, epoch)
    }

    /// The batch `b` builds, as the leader of `epoch` stored it at `base`.
    fn stored_at(mut b: BatchBuilder, base: i64, epoch: i32) -> Bytes {
        let mut raw = b.build().to_vec();
        batch::set_base_offset(&mut raw, base);
        batch::set_leader_epoch(&mut raw, epoch);
        Bytes::from(raw)
    }

    /// A sled database in a fresh directory (kept while the guard lives).
    fn temp_db() -> (tempfile::TempDir, crate::log::Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        (dir, db)
    }

    fn open(db: &crate::log::Database) -> PartitionLog {
        let meta = db.open_tree("meta").unwrap();
        PartitionLog::open(db, meta, &HashSet::new(), 1, "t", 0).unwrap()
    }

    /// A follower log holding `batches` as `(base, records, epoch)`, and its generation.
    fn follower(db: &crate::log::Database, batches: &[(i64, usize, i32)]) -> (PartitionLog, u64) {
        let log = open(db);
        log.set_replicated();
        let generation = log.become_follower(1).unwrap();
        for &(base, n, epoch) in batches {
            log.append_replicated(&leader_batch(base, n, epoch), generation)
                .unwrap();
        }
        (log, generation)
    }

    #[test]
    fn index_entries_a_crash_left_past_the_log_end_are_dropped_at_open() {
        let (_dir, db) = temp_db();
        let (log, generation) = follower(&db, &[]);
        // Batches over the index interval: each gets a time-index entry.
        for base in 0..4i64 {
            let mut b = BatchBuilder::new(Compression::None);
            b.push(None, &vec![b'x'; 300 * 1024], 1_000 + base, &[]);
            log.append_replicated(&stored_at(b, base, 1), generation)
                .unwrap();
        }
        let pointing = |log: &PartitionLog| -> Vec<i64> {
            log.time_index
                .iter()
                .map(|e| key_offset(&e.unwrap().1))
                .collect()
        };
        assert!(
            pointing(&log).iter().any(|&o| o >= 2),
            "{:?}",
            pointing(&log)
        );
        // A truncation to 2 that a crash stopped after removing the batches.
        log.batches.remove(&offset_key(3)).unwrap();
        log.batches.remove(&offset_key(2)).unwrap();
        drop(log);
        let log = open(&db);
        assert_eq!(log.snapshot().log_end, 2);
        let left = pointing(&log);
        assert!(left.iter().all(|&o| o < 2), "{left:?}");
    }

    #[test]
    fn a_follower_with_an_epoch_the_leader_never_had_cuts_where_its_own_epoch_ends() {
        // This log: epoch 12 up to 10, then epoch 13 [10..15). The leader has epoch 12 up to
        // 15 and then epoch 14: asked for epoch 13 it answers (12, 15). Everything this log
        // wrote under 13 diverges, although the leader's answer is beyond this log's end.
        let (_dir, db) = temp_db();
        let (log, generation) = follower(&db, &[(0, 10, 12), (10, 1, 13), (11, 4, 13)]);
        assert_eq!(log.last_epoch(), 13);
        let cut = log.divergence_point(12, 15);
        assert_eq!(cut, 10);
        log.truncate_to(cut, generation).unwrap();
        assert_eq!(log.snapshot().log_end, 10);
        assert_eq!(log.last_epoch(), 12, "the later epoch is forgotten");
        // Asked again for 12, the leader answers (12, 15): nothing more to cut.
        assert_eq!(log.divergence_point(12, 15), 10);
    }

    #[test]
    fn a_follower_behind_the_leaders_epoch_end_keeps_its_log() {
        let (_dir, db) = temp_db();
        let (log, _) = follower(&db, &[(0, 5, 3), (5, 5, 4)]);
        assert_eq!(log.divergence_point(4, 30), 10);
        assert_eq!(log.divergence_point(4, 7), 7);
        assert_eq!(
            log.divergence_point(-1, -1),
            0,
            "the leader has no such epoch"
        );
        assert_eq!(
            log.divergence_point(2, 0),
            0,
            "this log has no epoch at or below the leader's answer"
        );
    }

    #[test]
    fn an_epoch_that_starts_at_the_log_end_is_forgotten_by_a_cut_there() {
        // Elected at epoch 14 and demoted before writing: the cache says 14 starts at 5.
        let (_dir, db) = temp_db();
        let log = open(&db);
        log.set_replicated();
        let g = log.become_follower(12).unwrap();
        log.append_replicated(&leader_batch(0, 5, 12), g).unwrap();
        log.become_leader(14).unwrap();
        let g = log.become_follower(15).unwrap();
        assert_eq!(log.last_epoch(), 14);
        // The new leader never had 14: it answers (13, 9) and this log keeps all it has.
        let cut = log.divergence_point(13, 9);
        assert_eq!(cut, 5);
        assert_eq!(log.truncate_to(cut, g).unwrap(), 5);
        assert_eq!(log.last_epoch(), 12, "the next lookup asks about epoch 12");
    }

    #[test]
    fn an_epoch_led_without_writing_does_not_outrank_the_batches_copied_later() {
        // Elected at epoch 5 while empty, demoted before writing; the new leader's log holds
        // epoch-4 batches this broker never had.
        let (_dir, db) = temp_db();
        let log = open(&db);
        log.set_replicated();
        log.become_leader(5).unwrap();
        let g = log.become_follower(6).unwrap();
        assert_eq!(log.last_epoch(), 5);
        // The epoch lookup of an empty log forgets the empty epoch.
        assert_eq!(log.truncate_to(0, g).unwrap(), 0);
        assert_eq!(log.last_epoch(), -1);
        // And even without it, a copied batch replaces an epoch recorded at its offset.
        log.become_leader(5).unwrap();
        let g = log.become_follower(6).unwrap();
        log.append_replicated(&leader_batch(0, 4, 4), g).unwrap();
        assert_eq!(log.last_epoch(), 4);
        assert_eq!(log.end_offset_for_epoch(4), (4, 4));
        assert_eq!(log.end_offset_for_epoch(5), (4, 4));
    }

    /// A replica restarted twice before its broker applied the cluster metadata (no
    /// controller quorum yet, a crash loop) keeps its high watermark: the metadata written
    /// meanwhile (at open, by the retention tick, at a clean stop) does not turn its log
    /// end into its high watermark, which would serve records that never reached the ISR.
    #[test]
    fn a_replica_restarted_twice_before_its_roles_keeps_its_high_watermark() {
        let (_dir, db) = temp_db();
        let (log, _) = follower(&db, &[(0, 5, 1), (5, 5, 1), (10, 5, 1)]);
        log.advance_high_watermark(5);
        log.persist_meta().unwrap();
        drop(log);
        for _ in 0..2 {
            let log = open(&db);
            assert_eq!(log.snapshot().log_end, 15);
            log.persist_meta().unwrap();
        }
        let log = open(&db);
        log.set_replicated();
        assert_eq!(log.snapshot().high_watermark, 5);
    }

    #[test]
    fn cutting_everything_forgets_every_epoch() {
        let (_dir, db) = temp_db();
        let (log, generation) = follower(&db, &[(0, 5, 7)]);
        log.truncate_to(log.divergence_point(-1, -1), generation)
            .unwrap();
        assert_eq!(log.snapshot().log_end, 0);
        assert_eq!(log.last_epoch(), -1);
    }

    #[test]
    fn reopening_rebuilds_epochs_learnt_from_replicated_batches() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::log::store::open(dir.path()).unwrap();
            // The metadata record is written at the role change (epoch 1 only); the epochs
            // 2 and 3 come with the batches and are not recorded before the crash.
            let (log, _) = follower(&db, &[(0, 3, 1), (3, 3, 2), (6, 2, 3)]);
            assert_eq!(log.last_epoch(), 3);
            db.flush().unwrap();
        }
        let db = crate::log::store::open(dir.path()).unwrap();
        let log = open(&db);
        assert_eq!(log.last_epoch(), 3);
        assert_eq!(log.end_offset_for_epoch(2), (2, 6));
        assert_eq!(log.end_offset_for_epoch(1), (1, 3));
    }
}
