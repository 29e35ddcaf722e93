//! One partition's log: offset assignment, append in producer-sequence order, reads up to
//! the high watermark, long-poll waits, offset lookups (earliest, latest, by time), the
//! sparse time index, retention, and recovery at open.
//!
//! The in-memory state (log start, log end, high watermark, size, leader epoch, producer
//! sequences) sits behind one short mutex; sled does the storing. The high watermark is
//! published on a `watch` channel so long-polls and subscriptions wake when it moves.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quiver_protocol::batch::{self, BatchHeader, RecordIter};
use quiver_protocol::requests::{AbortedTxn, Isolation, OffsetSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::flush::Flusher;
use super::keyspace::{migrate_legacy, PartitionKeys, BATCHES_TREE, TIME_INDEX_TREE};
use super::producers::{ProducerSnapshot, ProducerTable, SequenceCheck};
use super::retention::{batches_to_delete, BatchSummary};
use super::store::Database;
use super::txn_index::TxnIndex;
use super::{key_offset, offset_key, LogError};
use crate::topic::{FlushPolicy, TopicConfig};

/// Bytes of batches between two time-index entries.
const TIME_INDEX_INTERVAL: u64 = 256 * 1024;
/// Longest wait of a batch for its producer's earlier batches before the request fails.
const SEQUENCE_WAIT: Duration = Duration::from_secs(5);

/// The durable per-partition metadata record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartitionMeta {
    /// First offset still stored.
    pub log_start: i64,
    /// Last high watermark written (a seam for replication: followers restart from it).
    pub hw_checkpoint: i64,
    /// Current leader epoch.
    pub leader_epoch: i32,
    /// `(epoch, first offset)` for every epoch this log has seen.
    pub epoch_starts: Vec<(i32, i64)>,
    /// The producers' sequence state as of `producers_end`: at open only the batches after
    /// it are scanned to complete it.
    #[serde(default)]
    pub producers: Vec<ProducerSnapshot>,
    /// The log end the producer snapshot covers (-1: no snapshot).
    #[serde(default = "no_snapshot")]
    pub producers_end: i64,
    /// A replica's high watermark, kept apart from `hw_checkpoint` (which a log not yet
    /// known to be replicated writes as its log end: everything a lone broker stored is
    /// committed). Until the broker applies its cluster metadata, a replica restarting
    /// again keeps this as it was, so records that never reached the ISR are not served as
    /// committed after two quick restarts. Older records: `hw_checkpoint`.
    #[serde(default)]
    pub replica_hw: Option<i64>,
}

fn no_snapshot() -> i64 {
    -1
}

#[derive(Debug)]
struct State {
    log_start: i64,
    log_end: i64,
    high_watermark: i64,
    size_bytes: u64,
    leader_epoch: i32,
    epoch_starts: Vec<(i32, i64)>,
    running_max_ts: i64,
    bytes_since_index: u64,
    producers: ProducerTable,
    txns: TxnIndex,
    /// The high watermark checkpointed before this open (a replica starts from it).
    hw_at_open: i64,
    /// Bumped at every change of replica role: a follower's fetch loop may write only under
    /// the generation it started with, so a loop that has not noticed its role ended yet
    /// cannot append to (or truncate) a log that now leads or follows someone else.
    role_generation: u64,
    /// This broker no longer holds a replica of the partition (moved to other brokers): its
    /// copy is being dropped and nothing may be appended until it is a replica again.
    retired: bool,
    /// This replica leads the partition (a replicated log takes appends only then: a write
    /// checked while it led must not land after it stepped down).
    leading: bool,
}

/// What a transaction's check against its coordinator saw of the producer here
/// ([`PartitionLog::txn_guard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnGuard {
    producer_id: i64,
    markers: u64,
}

impl TxnGuard {
    /// The producer it is of.
    pub fn producer_id(&self) -> i64 {
        self.producer_id
    }
}

/// Offsets and size at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSnapshot {
    /// First stored offset.
    pub log_start: i64,
    /// Readable below this.
    pub high_watermark: i64,
    /// Next offset to assign.
    pub log_end: i64,
    /// Stored bytes.
    pub size_bytes: u64,
    /// Current leader epoch.
    pub leader_epoch: i32,
    /// Below this no transaction is open: read-committed consumers read up to here.
    pub last_stable: i64,
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// Offset of the first record.
    pub base_offset: i64,
    /// Offset of the last record.
    pub last_offset: i64,
    /// Records appended (0 when every batch was a duplicate).
    pub records: u64,
    /// Bytes appended.
    pub bytes: u64,
    /// The leader epoch the batches were stamped with (for a duplicate, the epoch when it
    /// was recognised): an `acks=all` write is acknowledged only by that leadership.
    pub leader_epoch: i32,
}

/// Batches read, with the offsets at the time of the read.
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// Whole stored batches, concatenated.
    pub payload: Bytes,
    /// Batches in the payload.
    pub batches: usize,
    /// The offset after the last batch in the payload (the read's offset when empty).
    pub end: i64,
    /// Offsets when read.
    pub snapshot: PartitionSnapshot,
    /// Read-committed reads: the aborted transactions with batches in the payload.
    pub aborted: Vec<AbortedTxn>,
}

/// One partition's log.
pub struct PartitionLog {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    batches: PartitionKeys,
    time_index: PartitionKeys,
    meta: sled::Tree,
    meta_key: Vec<u8>,
    state: Mutex<State>,
    hw: watch::Sender<i64>,
    /// Signalled on every append: replica fetches wait on it for the log end to move.
    log_end_moved: Notify,
    /// Batches waiting for their producer's earlier batches, by producer.
    sequence_waiters: SequenceWaiters,
    deleted: AtomicBool,
    /// Why the partition is offline (damaged storage), if it is.
    offline: Mutex<Option<String>>,
    /// The metadata record did not decode at open: the partition stays offline, and the
    /// record is left as it is for `quiver broker repair` (nothing rewrites it).
    meta_damaged: bool,
    /// How often a batch had to wait for its producer's earlier batches (overtaking).
    sequence_waits: AtomicU64,
    /// A replica of a cluster partition: appends do not move the high watermark (the
    /// partition's leader decides it from the in-sync replicas).
    replicated: AtomicBool,
}

/// Runs storage work on tokio's blocking threads, never on the async runtime.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, LogError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| LogError::Worker(e.to_string()))
}

/// What is wrong with a stored batch, if anything: its CRC, its length, or a base offset
/// that differs from the key it is stored under.
fn stored_batch_problem(key: &[u8], value: &[u8]) -> Option<String> {
    match batch::check_crc(value) {
        Err(e) => Some(e.to_string()),
        Ok(h) if h.base_offset != key_offset(key) => Some(format!(
            "stored under offset {} but its header says {}",
            key_offset(key),
            h.base_offset
        )),
        Ok(_) => None,
    }
}

/// What `quiver broker repair` did to one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    /// Offset of the first damaged batch, or `None` when nothing was damaged.
    pub first_damaged_offset: Option<i64>,
    /// Batches removed (the damaged one and every one after it).
    pub dropped_batches: u64,
    /// Records in the removed batches whose headers could still be read.
    pub dropped_records: u64,
    /// Bytes removed.
    pub dropped_bytes: u64,
    /// The log end before the repair.
    pub log_end_before: i64,
    /// The log end after it (the next offset to be assigned).
    pub log_end_after: i64,
    /// The partition's metadata record did not decode and was removed: the broker
    /// rebuilds it from the stored batches when it opens the partition.
    pub metadata_rebuilt: bool,
}

fn ts_key(ts: i64) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

impl PartitionLog {
    /// Names of the trees a partition of the topic with internal id `topic_id` had of its
    /// own before partitions shared trees (moved at open, see [`keyspace`](super::keyspace)).
    pub fn legacy_tree_names(topic_id: u64, partition: u32) -> (String, String) {
        (
            format!("log/{topic_id}/{partition}"),
            format!("tidx/{topic_id}/{partition}"),
        )
    }

    /// Opens (or creates) the partition and recovers its state from disk: drops a damaged
    /// tail, finds the log end, rebuilds producer sequences from the newest batches.
    pub fn open(
        db: &Database,
        meta: sled::Tree,
        legacy: &HashSet<Vec<u8>>,
        topic_id: u64,
        topic: &str,
        partition: u32,
    ) -> Result<PartitionLog, LogError> {
        let batches = PartitionKeys::new(db.open_tree(BATCHES_TREE)?, topic_id, partition);
        let time_index = PartitionKeys::new(db.open_tree(TIME_INDEX_TREE)?, topic_id, partition);
        let (bname, tname) = Self::legacy_tree_names(topic_id, partition);
        migrate_legacy(db, legacy, &bname, &batches)?;
        migrate_legacy(db, legacy, &tname, &time_index)?;
        let meta_key = format!("{topic_id}/{partition}").into_bytes();
        let fresh = || PartitionMeta {
            epoch_starts: vec![(0, 0)],
            producers_end: -1,
            ..Default::default()
        };
        // A metadata record that does not decode (only damage makes one: sled writes a
        // value whole) takes this partition offline, not the broker: the rest of the open
        // only reads, so the batches and the record stay as they are for the repair.
        let mut meta_damage = None;
        let mut pm: PartitionMeta = match meta.get(&meta_key)? {
            Some(v) => serde_json::from_slice(&v).unwrap_or_else(|e| {
                let reason = format!(
                    "the partition's metadata record is damaged ({e}); the partition is offline until `quiver broker repair --topic {topic} --partition {partition}` rebuilds it from the stored batches"
                );
                tracing::error!(topic, partition, %reason, "partition offline");
                meta_damage = Some(reason);
                fresh()
            }),
            None => fresh(),
        };
        let meta_damaged = meta_damage.is_some();
        // A damaged newest batch is a torn write: drop it. Damage anywhere else is not
        // something a crash explains; the partition goes offline (the broker still starts
        // and serves every other partition) until `quiver broker repair` truncates it.
        // (Not with damaged metadata: nothing is written then.)
        while let Some((k, v)) = batches.last()?.filter(|_| !meta_damaged) {
            match stored_batch_problem(&k, &v) {
                None => break,
                Some(reason) => {
                    tracing::warn!(topic, partition, offset = key_offset(&k), %reason, "dropping damaged batch at the log tail");
                    batches.remove(&k)?;
                }
            }
        }
        let mut size_bytes = 0u64;
        let mut running_max_ts = i64::MIN;
        let mut offline = None;
        let mut txns = TxnIndex::default();
        // Where each leader epoch starts among the stored batches: the cache in the metadata
        // record is written at role changes, not at every replicated append, so after a crash
        // the batches may hold newer epochs than it does.
        let mut stored_epochs: Vec<(i32, i64)> = Vec::new();
        for item in batches.iter() {
            let (k, v) = item?;
            size_bytes += v.len() as u64;
            if offline.is_some() {
                continue;
            }
            match stored_batch_problem(&k, &v) {
                None => {
                    if let Ok(h) = BatchHeader::parse(&v) {
                        if stored_epochs.last().is_none_or(|e| e.0 < h.leader_epoch) {
                            stored_epochs.push((h.leader_epoch, h.base_offset));
                        }
                        running_max_ts = running_max_ts.max(h.max_timestamp);
                        if h.is_transactional() {
                            let marker = h
                                .is_control()
                                .then(|| batch::marker_of(&Bytes::copy_from_slice(&v)))
                                .flatten();
                            txns.observe(&h, marker);
                        }
                    }
                }
                Some(reason) => {
                    let reason = format!(
                        "the stored batch at offset {} is damaged ({reason}); the partition is offline until `quiver broker repair --topic {topic} --partition {partition}` truncates it to its last good batch",
                        key_offset(&k)
                    );
                    tracing::error!(topic, partition, %reason, "partition offline");
                    offline = Some(reason);
                }
            }
        }
        let log_end = match batches.last()? {
            // A damaged last batch is still here when nothing may be written (damaged
            // metadata): its key says where it starts.
            Some((k, v)) => BatchHeader::parse(&v)
                .map(|h| h.next_offset())
                .unwrap_or(key_offset(&k) + 1),
            None => pm.log_start.max(pm.hw_checkpoint),
        };
        pm.epoch_starts = merge_epoch_starts(&pm.epoch_starts, &stored_epochs, log_end);
        // Batches are removed before their index entries (truncation, a torn tail): entries
        // a crash left at or past the log end would send a timestamp lookup past the
        // records stored again at those offsets.
        if !meta_damaged {
            drop_index_entries_from(&time_index, log_end)?;
        }
        if let Some((k, _)) = batches.first()? {
            pm.log_start = pm.log_start.max(key_offset(&k)).min(log_end);
        }
        // Producer state: the snapshot in the metadata record, completed by every batch
        // after it; without a usable snapshot (none yet, or taken beyond a log end that a
        // crash or truncation moved back), every batch.
        let usable = pm.producers_end >= 0 && pm.producers_end <= log_end;
        let (mut producers, scan_from) = if usable {
            (
                ProducerTable::from_snapshot(&pm.producers),
                pm.producers_end,
            )
        } else {
            (ProducerTable::default(), i64::MIN)
        };
        let from_key = offset_key(scan_from.max(0));
        let scan = if usable {
            batches.range_from(&from_key)
        } else {
            batches.range_from(&offset_key(0))
        };
        for item in scan {
            let (_, v) = item?;
            // Damaged batches were reported above; they carry no producer state to trust.
            let Ok(h) = BatchHeader::parse(&v) else {
                continue;
            };
            if h.base_offset < scan_from {
                continue;
            }
            producers.observe(&h, &v);
        }
        if !usable {
            // Producers whose batches retention deleted are in no batch left to scan.
            producers.keep_retained(ProducerTable::from_snapshot(&pm.producers), pm.log_start);
        }
        let leader_epoch = pm.leader_epoch;
        let hw_at_open = pm.replica_hw.unwrap_or(pm.hw_checkpoint).min(log_end);
        pm.replica_hw = Some(hw_at_open);
        pm.hw_checkpoint = log_end;
        if !meta_damaged {
            meta.insert(&meta_key, serde_json::to_vec(&pm).unwrap_or_default())?;
        }
        let state = State {
            log_start: pm.log_start,
            log_end,
            // A single replica: everything that survived on disk is committed.
            high_watermark: log_end,
            size_bytes,
            leader_epoch,
            epoch_starts: pm.epoch_starts.clone(),
            running_max_ts,
            bytes_since_index: TIME_INDEX_INTERVAL,
            producers,
            txns,
            hw_at_open,
            role_generation: 0,
            retired: false,
            leading: false,
        };
        Ok(PartitionLog {
            topic: topic.to_string(),
            partition,
            batches,
            time_index,
            meta,
            meta_key,
            state: Mutex::new(state),
            hw: watch::Sender::new(log_end),
            log_end_moved: Notify::new(),
            sequence_waiters: SequenceWaiters::default(),
            deleted: AtomicBool::new(false),
            offline: Mutex::new(meta_damage.or(offline)),
            meta_damaged,
            sequence_waits: AtomicU64::new(0),
            replicated: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug; keep serving with the state as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Producers (id, epoch) with a transaction open here since before `before_ms`.
    pub fn txns_open_before(&self, before_ms: i64) -> Vec<(i64, i16)> {
        self.lock().txns.open_since_before(before_ms)
    }

    /// True while this broker takes appends to the partition: it leads it, or the
    /// partition is not replicated.
    pub fn takes_appends(&self) -> bool {
        !self.is_replicated() || self.lock().leading
    }

    /// True while `producer_id` has a transaction of `epoch` open in this partition.
    pub fn txn_open(&self, producer_id: i64, epoch: i16) -> bool {
        self.lock().txns.is_open(producer_id, epoch)
    }

    /// Notes, before a transaction's first batch here is checked against its coordinator,
    /// how many of the producer's markers this log has taken: given to
    /// [`append_guarded`](Self::append_guarded), the batch is refused if its transaction
    /// ended here meanwhile (Kafka's verification guard).
    pub fn txn_guard(&self, producer_id: i64) -> TxnGuard {
        TxnGuard {
            producer_id,
            markers: self.lock().producers.markers(producer_id),
        }
    }

    /// Offsets and size now.
    pub fn snapshot(&self) -> PartitionSnapshot {
        Self::snapshot_of(&self.lock())
    }

    fn snapshot_of(s: &State) -> PartitionSnapshot {
        PartitionSnapshot {
            log_start: s.log_start,
            high_watermark: s.high_watermark,
            log_end: s.log_end,
            size_bytes: s.size_bytes,
            leader_epoch: s.leader_epoch,
            // Never below the log start: retention may have removed the first batches of a
            // transaction still open, and an offset that is not stored is no place to read
            // from (Kafka's rule).
            last_stable: s
                .txns
                .first_unstable()
                .map_or(s.high_watermark, |f| f.min(s.high_watermark))
                .max(s.log_start),
        }
    }

    /// How often a batch waited for its producer's earlier batches since open.
    pub fn sequence_waits(&self) -> u64 {
        self.sequence_waits.load(Ordering::Relaxed)
    }

    /// A receiver that changes whenever the high watermark moves.
    pub fn watch_high_watermark(&self) -> watch::Receiver<i64> {
        self.hw.subscribe()
    }

    fn check_alive(&self) -> Result<(), LogError> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(LogError::Deleted);
        }
        if let Some(reason) = self.offline_reason() {
            return Err(LogError::Offline {
                topic: self.topic.clone(),
                partition: self.partition,
                reason,
            });
        }
        Ok(())
    }

    /// True when the partition's metadata record did not decode at open (see
    /// `meta_damaged`): it stays offline whatever is accepted.
    pub fn metadata_damaged(&self) -> bool {
        self.meta_damaged
    }

    /// Why the partition is offline, when its storage is damaged.
    pub fn offline_reason(&self) -> Option<String> {
        self.offline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes a partition with damaged batches back online without repairing it (internal
    /// topics, whose replay skips damaged batches). Reads of a damaged batch still fail.
    pub fn accept_damage(&self) {
        if self.meta_damaged {
            // Its bounds and producer state are unknown: nothing may be written to it.
            return;
        }
        *self.offline.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Refuses a change of a partition whose metadata record is damaged (it would be
    /// written over, with bounds made up at open).
    fn check_meta(&self) -> Result<(), LogError> {
        if !self.meta_damaged {
            return Ok(());
        }
        Err(LogError::Offline {
            topic: self.topic.clone(),
            partition: self.partition,
            reason: self.offline_reason().unwrap_or_default(),
        })
    }

    fn take_offline(&self, offset: i64, reason: &str) {
        let mut o = self.offline.lock().unwrap_or_else(|p| p.into_inner());
        if o.is_none() {
            let msg = format!(
                "the stored batch at offset {offset} is damaged ({reason}); the partition is offline until `quiver broker repair --topic {} --partition {}` truncates it to its last good batch",
                self.topic, self.partition
            );
            tracing::error!(topic = %self.topic, partition = self.partition, reason = %msg, "partition offline");
            *o = Some(msg);
        }
    }

    /// Appends `batches` (already checked: [`TopicConfig::check_produced`] for a client's,
    /// [`batch::validate`] for the broker's own) with their headers, in producer-sequence
    /// order, and returns once they are durable as the topic's flush policy requires.
    pub async fn append(
        self: &Arc<Self>,
        checked: Vec<(Bytes, BatchHeader)>,
        config: &TopicConfig,
        flusher: &Flusher,
        timeout: Duration,
    ) -> Result<AppendResult, LogError> {
        self.append_guarded(checked, &[], config, flusher, timeout)
            .await
    }

    /// [`append`](Self::append) of batches whose transactions were checked against their
    /// coordinators under `guards`: a transaction's data batch whose transaction is not open
    /// here, and that took a marker of its producer since its guard, is refused.
    pub async fn append_guarded(
        self: &Arc<Self>,
        checked: Vec<(Bytes, BatchHeader)>,
        guards: &[TxnGuard],
        config: &TopicConfig,
        flusher: &Flusher,
        timeout: Duration,
    ) -> Result<AppendResult, LogError> {
        self.check_alive()?;
        let (batches, headers): (Vec<Bytes>, Vec<BatchHeader>) = checked.into_iter().unzip();
        let now = tokio::time::Instant::now();
        let deadline = now + timeout;
        let mut result: Option<AppendResult> = None;
        for (raw, h) in batches.iter().zip(&headers) {
            let sequence_deadline = now + SEQUENCE_WAIT.min(timeout);
            let waiting = self.sequence_waiters.join(h.producer_id);
            let appended = loop {
                let moved = waiting.signal().notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                let (this, raw2, h2) = (self.clone(), raw.clone(), *h);
                let guard = guards
                    .iter()
                    .find(|g| g.producer_id == h.producer_id)
                    .copied();
                let tried = blocking(move || this.try_append(&raw2, &h2, guard)).await?;
                let waiting_for = match tried? {
                    Ok(done) => break done,
                    Err(check) => check,
                };
                self.sequence_waits.fetch_add(1, Ordering::Relaxed);
                if tokio::time::timeout_at(sequence_deadline, moved)
                    .await
                    .is_err()
                {
                    return Err(if waiting_for == SequenceCheck::WaitUnknown {
                        // Not an overtaken first batch (it would have arrived by now): the
                        // producer's earlier batches are not in this log. Never a silent
                        // fresh start, which could hide lost records.
                        LogError::Sequence(format!(
                            "producer {} is unknown to this partition and its batch starts at sequence {}: its earlier batches are not here (lost with an acks=0/1 leader, or expired); the producer must start a new sequence",
                            h.producer_id, h.base_sequence
                        ))
                    } else {
                        LogError::Timeout(format!(
                            "batch with sequence {} of producer {} waited {} ms for the producer's earlier batches",
                            h.base_sequence,
                            h.producer_id,
                            SEQUENCE_WAIT.min(timeout).as_millis()
                        ))
                    });
                }
            };
            drop(waiting);
            self.sequence_waiters.moved(h.producer_id);
            self.log_end_moved.notify_waiters();
            result = Some(match result {
                None => appended,
                Some(r) => AppendResult {
                    base_offset: r.base_offset,
                    last_offset: appended.last_offset,
                    records: r.records + appended.records,
                    bytes: r.bytes + appended.bytes,
                    // Batches appended under different leaderships: the older one's is no
                    // longer current, so the write is not acknowledged and is sent again.
                    leader_epoch: r.leader_epoch.min(appended.leader_epoch),
                },
            });
        }
        let result = result.ok_or_else(|| {
            LogError::InvalidBatch(quiver_protocol::ProtocolError::Malformed {
                what: "produce",
                reason: "no batch in the request".into(),
            })
        })?;
        match config.flush {
            FlushPolicy::Batch => {
                let ticket = flusher.ticket();
                match tokio::time::timeout_at(deadline, flusher.wait(ticket)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(failed)) => return Err(failed.into()),
                    Err(_) => {
                        return Err(LogError::Timeout(
                            "the disk flush did not complete in time".into(),
                        ))
                    }
                }
                if !self.is_replicated() {
                    self.advance_high_watermark(result.last_offset + 1);
                }
            }
            FlushPolicy::Interval => {
                flusher.mark_dirty();
                if !self.is_replicated() {
                    self.advance_high_watermark(result.last_offset + 1);
                }
            }
        }
        Ok(result)
    }

    /// Appends `raw` if its producer sequence allows; otherwise says what to wait for.
    fn try_append(
        &self,
        raw: &Bytes,
        h: &BatchHeader,
        guard: Option<TxnGuard>,
    ) -> Result<Result<AppendResult, SequenceCheck>, LogError> {
        let mut st = self.lock();
        if self.deleted.load(Ordering::Acquire) {
            return Err(LogError::Deleted);
        }
        if st.retired {
            return Err(LogError::Moved(format!(
                "{}/{} moved to other brokers",
                self.topic, self.partition
            )));
        }
        if !st.leading && self.is_replicated() {
            return Err(LogError::NotLeading(format!(
                "{}/{} is led by another broker now",
                self.topic, self.partition
            )));
        }
        match st
            .producers
            .check(h.producer_id, h.producer_epoch, h.base_sequence, h.record_count)
        {
            SequenceCheck::Fenced => {
                return Err(LogError::Fenced(format!(
                    "producer {} epoch {} is fenced: a newer epoch of it wrote here",
                    h.producer_id, h.producer_epoch
                )))
            }
            SequenceCheck::Wait => return Ok(Err(SequenceCheck::Wait)),
            SequenceCheck::WaitUnknown => return Ok(Err(SequenceCheck::WaitUnknown)),
            SequenceCheck::Reject => {
                return Err(LogError::Sequence(format!(
                    "sequence {} of producer {} is older than any batch remembered; it was either stored long ago or lost",
                    h.base_sequence, h.producer_id
                )))
            }
            SequenceCheck::Duplicate(b) => {
                tracing::debug!(producer = h.producer_id, seq = h.base_sequence, "duplicate batch answered with its first offsets");
                return Ok(Ok(AppendResult {
                    base_offset: b.base_offset,
                    last_offset: b.last_offset,
                    records: 0,
                    bytes: 0,
                    leader_epoch: st.leader_epoch,
                }));
            }
            SequenceCheck::Append => {}
        }
        if let Some(g) = guard.filter(|_| h.is_transactional() && !h.is_control()) {
            if !st.txns.is_open(h.producer_id, h.producer_epoch)
                && st.producers.markers(h.producer_id) != g.markers
            {
                return Err(LogError::TxnEnded(format!(
                    "the transaction of producer {} ended on {}/{} while this batch was checked against its coordinator; the batch belongs to an attempt already ended",
                    h.producer_id, self.topic, self.partition
                )));
            }
        }
        if h.is_control() {
            if let Err(newer) = st
                .producers
                .check_marker(h.producer_id, batch::coordinator_epoch_of(raw))
            {
                return Err(LogError::Fenced(format!(
                    "a marker of producer {} from a deposed transaction coordinator: one at coordinator epoch {newer} already wrote here",
                    h.producer_id
                )));
            }
        }
        let base = st.log_end;
        let epoch = st.leader_epoch;
        // Stamped in sled's copy: the batch is copied once on its way in.
        self.batches
            .insert_patched(&offset_key(base), raw, |stored| {
                batch::set_base_offset(stored, base);
                batch::set_leader_epoch(stored, epoch);
            })?;
        if st.bytes_since_index >= TIME_INDEX_INTERVAL {
            self.time_index
                .insert(&ts_key(st.running_max_ts), offset_key(base))?;
            st.bytes_since_index = 0;
        }
        st.bytes_since_index += raw.len() as u64;
        st.running_max_ts = st.running_max_ts.max(h.max_timestamp);
        let last = base + i64::from(h.last_offset_delta);
        let mut stamped = *h;
        stamped.base_offset = base;
        st.producers.observe(&stamped, raw);
        if h.is_transactional() {
            let marker = h.is_control().then(|| batch::marker_of(raw)).flatten();
            st.txns.observe(&stamped, marker);
        }
        st.log_end = last + 1;
        st.size_bytes += raw.len() as u64;
        Ok(Ok(AppendResult {
            base_offset: base,
            last_offset: last,
            records: h.record_count as u64,
            bytes: raw.len() as u64,
            leader_epoch: epoch,
        }))
    }

    /// Moves the high watermark up to `to` (never past the log end, never down).
    pub fn advance_high_watermark(&self, to: i64) {
        let mut st = self.lock();
        let to = to.min(st.log_end);
        if to > st.high_watermark {
            st.high_watermark = to;
            drop(st);
            self.hw.send_if_modified(|h| {
                if to > *h {
                    *h = to;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Reads whole batches from the one holding `offset`, below the high watermark, up to
    /// `max_bytes` (at least one batch when any is readable). CRCs are checked on the way.
    pub fn read(&self, offset: i64, max_bytes: usize) -> Result<ReadResult, LogError> {
        self.read_with(offset, max_bytes, Isolation::ReadUncommitted)
    }

    /// [`read`](Self::read) for `isolation`: read-committed reads stop at the last stable
    /// offset and list the aborted transactions among the batches returned.
    pub fn read_with(
        &self,
        offset: i64,
        max_bytes: usize,
        isolation: Isolation,
    ) -> Result<ReadResult, LogError> {
        // Read-committed: the aborted transactions are listed with the snapshot, under one
        // lock. Listed after the read, retention could have forgotten one whose records the
        // read still copied (its marker fell below a new log start meanwhile), and they would
        // be delivered as committed.
        let (snapshot, aborted) = {
            let s = self.lock();
            let snapshot = Self::snapshot_of(&s);
            let aborted = match isolation {
                Isolation::ReadCommitted => s.txns.aborted_in(offset, snapshot.last_stable),
                Isolation::ReadUncommitted => Vec::new(),
            };
            (snapshot, aborted)
        };
        let bound = match isolation {
            Isolation::ReadUncommitted => snapshot.high_watermark,
            Isolation::ReadCommitted => snapshot.last_stable,
        };
        let mut read = self.read_below(offset, max_bytes, bound, snapshot)?;
        if read.batches > 0 {
            read.aborted = aborted
                .into_iter()
                .filter(|a| a.first_offset < read.end)
                .collect();
        }
        Ok(read)
    }

    /// Reads whole batches from the one holding `offset` whose base offset is below `bound`.
    fn read_below(
        &self,
        offset: i64,
        max_bytes: usize,
        bound: i64,
        snapshot: PartitionSnapshot,
    ) -> Result<ReadResult, LogError> {
        self.check_alive()?;
        if offset < snapshot.log_start || offset > snapshot.log_end {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start: snapshot.log_start,
                end: snapshot.log_end,
            });
        }
        let mut out = BytesMut::new();
        let mut count = 0;
        let mut end = offset;
        if offset < bound {
            let at = offset_key(offset);
            // A read from a batch's first offset (as consumers read) needs no look at it.
            let from_a_batch_start = self.batches.last_suffix_through(&at)? == Some(at);
            let through = if from_a_batch_start {
                None
            } else {
                self.batches.range_through(&at).next_back()
            };
            let start = match through {
                Some(item) => {
                    let (k, v) = item?;
                    let h = BatchHeader::parse(&v)?;
                    if h.next_offset() > offset {
                        key_offset(&k)
                    } else {
                        offset
                    }
                }
                None => offset,
            };
            for item in self
                .batches
                .stored_from_within(&offset_key(start), max_bytes)
            {
                let (k, stored) = item?;
                let base = key_offset(&k);
                if base >= bound {
                    break;
                }
                let len = stored.len();
                if !out.is_empty() && out.len() + len > max_bytes {
                    break;
                }
                if out.is_empty() {
                    out.reserve(max_bytes.min(len.max(64 * 1024) * 4).max(len));
                }
                // Copied once, from sled's slots into the response, and checked there.
                let at = out.len();
                stored.append_to(&mut out);
                let v = &out[at..];
                if let Some(reason) = stored_batch_problem(&k, v) {
                    self.take_offline(base, &reason);
                    return Err(LogError::Corrupt {
                        offset: base,
                        reason,
                    });
                }
                count += 1;
                end = BatchHeader::parse(v)?.next_offset();
            }
        }
        Ok(ReadResult {
            payload: out.freeze(),
            batches: count,
            end,
            snapshot,
            aborted: Vec::new(),
        })
    }

    /// [`read`](Self::read) on a blocking thread (sled reads and CRC checks of large
    /// reads never run on the async runtime).
    pub async fn read_async(
        self: &Arc<Self>,
        offset: i64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError> {
        self.read_async_with(offset, max_bytes, Isolation::ReadUncommitted)
            .await
    }

    /// [`read_with`](Self::read_with) on a blocking thread.
    pub async fn read_async_with(
        self: &Arc<Self>,
        offset: i64,
        max_bytes: usize,
        isolation: Isolation,
    ) -> Result<ReadResult, LogError> {
        let this = self.clone();
        blocking(move || this.read_with(offset, max_bytes, isolation)).await?
    }

    /// [`lookup`](Self::lookup) on a blocking thread.
    pub async fn lookup_async(
        self: &Arc<Self>,
        spec: OffsetSpec,
        max_decompressed: usize,
    ) -> Result<(i64, i64), LogError> {
        let this = self.clone();
        blocking(move || this.lookup(spec, max_decompressed)).await?
    }

    /// Waits until the log end passes `offset` or `deadline`; true if it did.
    pub async fn wait_for_append(&self, offset: i64, deadline: tokio::time::Instant) -> bool {
        loop {
            let moved = self.log_end_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.lock().log_end > offset {
                return true;
            }
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until the high watermark passes `offset` or `deadline`; true if it did.
    pub async fn wait_beyond(&self, offset: i64, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.hw.subscribe();
        let res = tokio::time::timeout_at(deadline, rx.wait_for(|h| *h > offset)).await;
        matches!(res, Ok(Ok(_)))
    }

    /// Resolves an offset spec.
    pub fn lookup(
        &self,
        spec: OffsetSpec,
        max_decompressed: usize,
    ) -> Result<(i64, i64), LogError> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(LogError::Deleted);
        }
        let snap = self.snapshot();
        match spec {
            // Known without reading data, so answered even while the partition is offline.
            OffsetSpec::Earliest => Ok((snap.log_start, -1)),
            OffsetSpec::Latest => Ok((snap.high_watermark, -1)),
            OffsetSpec::LastStable => Ok((snap.last_stable, -1)),
            OffsetSpec::Timestamp(t) => {
                self.check_alive()?;
                let from = match self.time_index.range_before(&ts_key(t)).next_back() {
                    Some(item) => key_offset(&item?.1),
                    None => snap.log_start,
                }
                .max(snap.log_start);
                for item in self.batches.range_from(&offset_key(from)) {
                    let (k, v) = item?;
                    if key_offset(&k) >= snap.high_watermark {
                        break;
                    }
                    let h = BatchHeader::parse(&v)?;
                    if h.max_timestamp < t {
                        continue;
                    }
                    let bytes = Bytes::copy_from_slice(&v);
                    for r in RecordIter::new(&bytes, max_decompressed)? {
                        let r = r?;
                        if r.timestamp >= t {
                            return Ok((r.offset, r.timestamp));
                        }
                    }
                }
                Ok((snap.high_watermark, -1))
            }
        }
    }

    /// Deletes batches from the front as the topic's retention says; returns bytes freed.
    pub fn apply_retention(&self, config: &TopicConfig, now_ms: i64) -> Result<u64, LogError> {
        match self.plan_retention(config, now_ms)? {
            Some(plan) => self.carry_out_retention(plan, "retention deleted old batches"),
            None => Ok(0),
        }
    }

    /// What retention would delete now, listed without the partition's lock (`None`:
    /// nothing).
    fn plan_retention(
        &self,
        config: &TopicConfig,
        now_ms: i64,
    ) -> Result<Option<RetentionPlan>, LogError> {
        if self.deleted.load(Ordering::Acquire) || self.offline_reason().is_some() {
            return Ok(None);
        }
        if config.retention_ms < 0 && config.retention_bytes < 0 {
            return Ok(None);
        }
        let snap = self.snapshot();
        let generation = self.lock().role_generation;
        let mut summaries = Vec::new();
        for item in self.batches.iter().take(100_000) {
            let (_, v) = item?;
            let h = BatchHeader::parse(&v)?;
            let expired = config.retention_ms > 0
                && h.max_timestamp < now_ms.saturating_sub(config.retention_ms);
            summaries.push(BatchSummary {
                base_offset: h.base_offset,
                next_offset: h.next_offset(),
                max_timestamp: h.max_timestamp,
                size: v.len() as u64,
            });
            if !expired && config.retention_bytes < 0 {
                break;
            }
        }
        let n = batches_to_delete(
            &summaries,
            snap.size_bytes,
            now_ms,
            config.retention_ms,
            config.retention_bytes,
            snap.high_watermark,
        );
        if n == 0 {
            return Ok(None);
        }
        summaries.truncate(n);
        Ok(Some(RetentionPlan {
            generation,
            log_start: snap.log_start,
            batches: summaries,
        }))
    }

    /// Deletes the whole batches that end at or before `before` (and below the high
    /// watermark) from the front, as a compacted internal topic does once its live records
    /// are carried past them; returns bytes freed.
    pub fn trim_before(&self, before: i64) -> Result<u64, LogError> {
        if self.deleted.load(Ordering::Acquire) || self.offline_reason().is_some() {
            return Ok(0);
        }
        let snap = self.snapshot();
        let generation = self.lock().role_generation;
        let mut batches = Vec::new();
        for item in self.batches.iter() {
            let (_, v) = item?;
            let h = BatchHeader::parse(&v)?;
            if h.next_offset() > before || h.next_offset() > snap.high_watermark {
                break;
            }
            batches.push(BatchSummary {
                base_offset: h.base_offset,
                next_offset: h.next_offset(),
                max_timestamp: h.max_timestamp,
                size: v.len() as u64,
            });
        }
        if batches.is_empty() {
            return Ok(0);
        }
        self.carry_out_retention(
            RetentionPlan {
                generation,
                log_start: snap.log_start,
                batches,
            },
            "deleted batches below the log's new start",
        )
    }

    /// Deletes what `plan` listed, unless the log changed since: a follower reset or
    /// truncation (a new role) or another pass moved the log start, and this pass gives
    /// way to the next one.
    fn carry_out_retention(&self, plan: RetentionPlan, what: &str) -> Result<u64, LogError> {
        let RetentionPlan {
            generation,
            log_start,
            batches: summaries,
        } = plan;
        let n = summaries.len();
        let new_start = summaries[n - 1].next_offset;
        let freed: u64 = summaries.iter().map(|b| b.size).sum();
        // Move the log start first so no reader is sent to a batch being removed.
        {
            let mut st = self.lock();
            if st.role_generation != generation
                || st.log_start != log_start
                || new_start > st.high_watermark
            {
                return Ok(0);
            }
            // Batches a crash left below the log start are removed without moving it back.
            st.log_start = st.log_start.max(new_start);
            st.size_bytes = st.size_bytes.saturating_sub(freed);
            let start = st.log_start;
            st.txns.trim(start);
        }
        self.persist_meta()?;
        for b in &summaries[..n] {
            self.batches.remove(&offset_key(b.base_offset))?;
        }
        tracing::info!(topic = %self.topic, partition = self.partition, batches = n, bytes = freed, log_start = new_start, "{what}");
        Ok(freed)
    }

    /// Recovery reads of internal topics: the whole batches from `offset` below the high
    /// watermark (the log end on a replicated log, read by its new leader: everything in a
    /// leader's log becomes committed), up to `max_bytes`, skipping (and logging) damaged
    /// ones; works while the partition is offline. Returns the batches and the offset after
    /// the last batch seen.
    pub fn read_recovering(
        &self,
        offset: i64,
        max_bytes: usize,
    ) -> Result<(Vec<Bytes>, i64), LogError> {
        let snap = self.snapshot();
        let bound = if self.is_replicated() {
            snap.log_end
        } else {
            snap.high_watermark
        };
        let start = match self.batches.range_through(&offset_key(offset)).next_back() {
            Some(item) => key_offset(&item?.0),
            None => offset,
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut next = offset;
        for item in self.batches.range_from(&offset_key(start)) {
            let (k, v) = item?;
            let base = key_offset(&k);
            if base >= bound || (bytes > 0 && bytes + v.len() > max_bytes) {
                break;
            }
            match stored_batch_problem(&k, &v) {
                Some(reason) => {
                    tracing::error!(topic = %self.topic, partition = self.partition, offset = base, %reason, "skipping a damaged batch");
                    next = next.max(base + 1);
                }
                None => {
                    let h = BatchHeader::parse(&v)?;
                    if h.next_offset() <= offset {
                        continue;
                    }
                    next = next.max(h.next_offset());
                    bytes += v.len();
                    out.push(Bytes::copy_from_slice(&v));
                }
            }
        }
        Ok((out, next))
    }

    /// Truncates a partition (of a stopped broker) at its first damaged batch: that batch
    /// and every one after it are removed, and what was dropped is reported.
    pub fn repair(
        db: &Database,
        meta: &sled::Tree,
        topic_id: u64,
        partition: u32,
    ) -> Result<RepairReport, LogError> {
        let batches = PartitionKeys::new(db.open_tree(BATCHES_TREE)?, topic_id, partition);
        let time_index = PartitionKeys::new(db.open_tree(TIME_INDEX_TREE)?, topic_id, partition);
        let log_end_before = match batches.last()? {
            Some((k, v)) => BatchHeader::parse(&v)
                .map(|h| h.next_offset())
                .unwrap_or(key_offset(&k) + 1),
            None => 0,
        };
        let mut first_damaged = None;
        for item in batches.iter() {
            let (k, v) = item?;
            if stored_batch_problem(&k, &v).is_some() {
                first_damaged = Some(key_offset(&k));
                break;
            }
        }
        // A metadata record that does not decode is removed: the next open rebuilds it
        // from the batches (bounds, epochs, producers still in the log).
        let meta_key = format!("{topic_id}/{partition}").into_bytes();
        let damaged_meta = meta
            .get(&meta_key)?
            .is_some_and(|v| serde_json::from_slice::<PartitionMeta>(&v).is_err());
        if damaged_meta {
            meta.remove(&meta_key)?;
        }
        let mut report = RepairReport {
            first_damaged_offset: first_damaged,
            dropped_batches: 0,
            dropped_records: 0,
            dropped_bytes: 0,
            log_end_before,
            log_end_after: log_end_before,
            metadata_rebuilt: damaged_meta,
        };
        let Some(from) = first_damaged else {
            db.flush()?;
            return Ok(report);
        };
        let doomed: Vec<_> = batches
            .range_from(&offset_key(from))
            .collect::<Result<_, _>>()?;
        // Newest first, the damaged batch last: a repair cut short by a crash leaves the
        // damage in place for the next repair to find, never a hole.
        for (k, v) in doomed.into_iter().rev() {
            report.dropped_batches += 1;
            report.dropped_bytes += v.len() as u64;
            if let Ok(h) = BatchHeader::parse(&v) {
                report.dropped_records += h.record_count.max(0) as u64;
            }
            batches.remove(&k)?;
        }
        // Every entry is read: a repair may follow older crashes that left entries out of
        // order.
        let stale: Vec<_> = time_index
            .iter()
            .filter_map(|item| item.ok())
            .filter(|(_, v)| key_offset(v) >= from)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            time_index.remove(&k)?;
        }
        report.log_end_after = from;
        if let Some(v) = meta.get(&meta_key)? {
            if let Ok(mut pm) = serde_json::from_slice::<PartitionMeta>(&v) {
                pm.hw_checkpoint = pm.hw_checkpoint.min(from);
                pm.replica_hw = pm.replica_hw.map(|hw| hw.min(from));
                pm.log_start = pm.log_start.min(from);
                meta.insert(&meta_key, serde_json::to_vec(&pm).unwrap_or_default())?;
            }
        }
        db.flush()?;
        Ok(report)
    }

    /// Writes the metadata record (log start, high-watermark checkpoint, epochs).
    pub fn persist_meta(&self) -> Result<(), LogError> {
        self.check_meta()?;
        let pm = {
            let st = self.lock();
            PartitionMeta {
                log_start: st.log_start,
                hw_checkpoint: st.high_watermark,
                leader_epoch: st.leader_epoch,
                epoch_starts: st.epoch_starts.clone(),
                producers: st.producers.snapshot(),
                producers_end: st.log_end,
                // Before the log is known to be replicated its high watermark is its log
                // end; the replica's own stays as it was at open.
                replica_hw: Some(if self.is_replicated() {
                    st.high_watermark
                } else {
                    st.hw_at_open
                }),
            }
        };
        self.meta
            .insert(&self.meta_key, serde_json::to_vec(&pm).unwrap_or_default())?;
        Ok(())
    }

    /// Marks the partition deleted and removes its batches and time index.
    pub fn delete(&self) -> Result<(), LogError> {
        {
            // Under the state lock: an append either stored its batch before (erased
            // below) or sees the partition deleted.
            let _st = self.lock();
            self.deleted.store(true, Ordering::Release);
        }
        self.sequence_waiters.wake_all();
        self.log_end_moved.notify_waiters();
        self.batches.erase()?;
        self.time_index.erase()?;
        self.meta.remove(&self.meta_key)?;
        Ok(())
    }
}

/// Removes the time-index entries pointing at `from` or later. An entry's key is the
/// largest timestamp before its offset, which grows with the offset, so they are the last
/// entries: read from the end until one points below `from`.
fn drop_index_entries_from(time_index: &PartitionKeys, from: i64) -> Result<(), LogError> {
    let mut stale = Vec::new();
    for item in time_index.iter().rev() {
        let (k, v) = item?;
        if key_offset(&v) < from {
            break;
        }
        stale.push(k);
    }
    for k in stale {
        time_index.remove(&k)?;
    }
    Ok(())
}

/// Erases what is stored of a partition no topic owns any more (a deletion a crash
/// interrupted): its batches, its time index and its metadata record.
pub fn erase_stored(
    db: &Database,
    meta: &sled::Tree,
    topic_id: u64,
    partition: u32,
) -> Result<(), LogError> {
    PartitionKeys::new(db.open_tree(BATCHES_TREE)?, topic_id, partition).erase()?;
    PartitionKeys::new(db.open_tree(TIME_INDEX_TREE)?, topic_id, partition).erase()?;
    meta.remove(format!("{topic_id}/{partition}").into_bytes())?;
    Ok(())
}

/// The epoch cache of a log reopened at `log_end`, rebuilt from the stored batches (the
/// cache in the metadata record is written at role changes, not at every replicated append,
/// so after a crash it may be older or newer than the batches): the recorded epochs that
/// start below the first stored batch (history whose batches retention deleted), every
/// epoch change among the stored batches, then recorded epochs at the log end newer than
/// any batch (a leadership that had not written yet).
fn merge_epoch_starts(
    recorded: &[(i32, i64)],
    stored: &[(i32, i64)],
    log_end: i64,
) -> Vec<(i32, i64)> {
    let first_batch = stored.first().map_or(log_end, |e| e.1);
    let mut merged: Vec<(i32, i64)> = recorded
        .iter()
        .copied()
        .filter(|e| e.1 < first_batch)
        .collect();
    let newest_stored = stored.last().map(|e| e.0);
    for &(epoch, start) in stored {
        if merged.last().is_none_or(|e| e.0 < epoch) {
            merged.push((epoch, start));
        }
    }
    for &(epoch, start) in recorded {
        if start == log_end
            && newest_stored.is_none_or(|n| epoch > n)
            && merged.last().is_none_or(|e| e.0 < epoch)
        {
            merged.push((epoch, start));
        }
    }
    merged
}

mod replication;
mod sequence_waits;

use sequence_waits::SequenceWaiters;

/// Batches a retention pass decided to delete, and the log it listed them from.
struct RetentionPlan {
    /// The role generation at listing time.
    generation: u64,
    /// The log start at listing time.
    log_start: i64,
    /// The batches, oldest first (never empty).
    batches: Vec<BatchSummary>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::{BatchBuilder, Compression};

    fn batch(n: usize, ts: i64, producer: i64, seq: i32) -> (Bytes, BatchHeader) {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..n {
            b.push(None, format!("v{i}").as_bytes(), ts + i as i64, &[]);
        }
        b.set_producer(producer, 0, seq);
        let raw = b.build();
        let h = batch::validate(&raw, 1 << 20).unwrap();
        (raw, h)
    }

    /// Appends `b` to `p` in a task of its own (a batch that will wait for its producer's
    /// earlier ones), within `timeout`.
    fn spawn_append(
        p: &Arc<PartitionLog>,
        f: &Arc<Flusher>,
        cfg: &TopicConfig,
        b: (Bytes, BatchHeader),
        timeout: Duration,
    ) -> tokio::task::JoinHandle<Result<AppendResult, LogError>> {
        let (p, f, cfg) = (p.clone(), f.clone(), cfg.clone());
        tokio::spawn(async move { p.append(vec![b], &cfg, &f, timeout).await })
    }

    /// Polls until a batch of `p` is parked waiting for its producer's earlier batches, so
    /// a test really exercises the overtaking path.
    async fn wait_until_parked(p: &PartitionLog) {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while p.sequence_waits() == 0 {
            assert!(
                tokio::time::Instant::now() < until,
                "the batch never waited"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn a_reopened_epoch_cache_follows_the_stored_batches() {
        // Recorded cache newer than the batches at their start (an epoch led without
        // writing, then epoch-4 batches copied): the batches win.
        assert_eq!(
            merge_epoch_starts(&[(0, 0), (5, 0)], &[(4, 0)], 10),
            vec![(4, 0)]
        );
        // Recorded cache older than the batches (epochs learnt from copies after the last
        // record): the batches add them; a leadership at the log end that wrote nothing stays.
        assert_eq!(
            merge_epoch_starts(&[(1, 0), (7, 30)], &[(1, 0), (2, 10), (3, 20)], 30),
            vec![(1, 0), (2, 10), (3, 20), (7, 30)]
        );
        // History below the first batch (retention deleted it) stays; an entry beyond the
        // log end (its batches lost in a crash) goes.
        assert_eq!(
            merge_epoch_starts(&[(1, 0), (2, 50), (3, 120)], &[(2, 100)], 110),
            vec![(1, 0), (2, 50)]
        );
        // An empty log keeps what it recorded at its end.
        assert_eq!(merge_epoch_starts(&[(0, 0)], &[], 0), vec![(0, 0)]);
    }

    /// Partition 0 of topic id 1 in `db`, with its metadata in the tree "meta".
    fn open_partition(db: &crate::log::Database) -> Arc<PartitionLog> {
        let meta = db.open_tree("meta").unwrap();
        Arc::new(PartitionLog::open(db, meta, &HashSet::new(), 1, "t", 0).unwrap())
    }

    async fn setup() -> (
        tempfile::TempDir,
        crate::log::Database,
        Arc<Flusher>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        let f = Flusher::new(db.clone());
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(f.clone().run(Duration::from_millis(100), rx));
        (dir, db, f, tx)
    }

    #[tokio::test]
    async fn append_read_and_recover() {
        let (dir, db, f, _stop) = setup().await;
        let meta = db.open_tree("meta").unwrap();
        let p =
            Arc::new(PartitionLog::open(&db, meta.clone(), &HashSet::new(), 1, "t", 0).unwrap());
        let cfg = TopicConfig::default();
        let r1 = p
            .append(
                vec![batch(3, 1000, -1, -1)],
                &cfg,
                &f,
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        let r2 = p
            .append(
                vec![batch(2, 2000, -1, -1)],
                &cfg,
                &f,
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!((r1.base_offset, r1.last_offset, r2.base_offset), (0, 2, 3));
        let read = p.read(4, 1 << 20).unwrap();
        assert_eq!(read.batches, 1, "the batch holding offset 4");
        assert_eq!(p.lookup(OffsetSpec::Timestamp(2001), 1 << 20).unwrap().0, 4);
        assert_eq!(p.lookup(OffsetSpec::Timestamp(0), 1 << 20).unwrap().0, 0);
        assert_eq!(p.lookup(OffsetSpec::Timestamp(9999), 1 << 20).unwrap().0, 5);
        assert!(matches!(
            p.read(9, 100),
            Err(LogError::OffsetOutOfRange { .. })
        ));
        drop(p);
        db.flush().unwrap();
        let p = PartitionLog::open(&db, meta, &HashSet::new(), 1, "t", 0).unwrap();
        assert_eq!(p.snapshot().log_end, 5);
        assert_eq!(p.read(0, 1 << 20).unwrap().batches, 2);
        drop(dir);
    }

    /// A transactional batch of producer 1<<62 at `seq`.
    fn txn_batch(seq: i32) -> (Bytes, BatchHeader) {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"in a transaction", 1, &[]);
        b.set_producer(1 << 62, 0, seq);
        b.set_transactional(true);
        let raw = b.build();
        let h = batch::validate(&raw, 1 << 20).unwrap();
        (raw, h)
    }

    /// A commit marker of producer 1<<62 decided by a coordinator at `coordinator` epoch.
    fn commit_from(coordinator: Option<u64>) -> (Bytes, BatchHeader) {
        let raw = batch::control_batch(1 << 62, 0, batch::Marker::Commit, coordinator, 2);
        let h = batch::validate(&raw, 1 << 20).unwrap();
        (raw, h)
    }

    /// A transaction's batch checked against its coordinator while the transaction ended
    /// here (the producer gave up on the request and aborted) is refused: stored after the
    /// marker it would open a transaction nobody ends (the last stable offset stuck), or be
    /// made visible by the producer's next commit.
    #[tokio::test]
    async fn a_transactions_batch_checked_while_it_ended_here_is_refused() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        let t = Duration::from_secs(5);
        p.append(vec![txn_batch(0)], &cfg, &f, t).await.unwrap();
        // The next batch is checked; meanwhile the transaction ends here.
        let guard = p.txn_guard(1 << 62);
        p.append(vec![commit_from(None)], &cfg, &f, t)
            .await
            .unwrap();
        let e = p
            .append_guarded(vec![txn_batch(1)], &[guard], &cfg, &f, t)
            .await;
        assert!(matches!(e, Err(LogError::TxnEnded(_))), "{e:?}");
        assert_eq!(
            p.snapshot().last_stable,
            p.snapshot().log_end,
            "nothing left open"
        );
        // Checked after the marker, the next transaction's first batch goes in.
        let guard = p.txn_guard(1 << 62);
        p.append_guarded(vec![txn_batch(1)], &[guard], &cfg, &f, t)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_deposed_coordinators_late_marker_cannot_end_the_next_transaction() {
        let (_dir, db, f, _stop) = setup().await;
        let meta = db.open_tree("meta").unwrap();
        let p =
            Arc::new(PartitionLog::open(&db, meta.clone(), &HashSet::new(), 1, "t", 0).unwrap());
        let cfg = TopicConfig::default();
        let t = Duration::from_secs(5);
        // Transaction 1, ended by the coordinator that took over at epoch 5.
        p.append(vec![txn_batch(0)], &cfg, &f, t).await.unwrap();
        p.append(vec![commit_from(Some(5))], &cfg, &f, t)
            .await
            .unwrap();
        // Transaction 2 of the same producer epoch begins.
        let open = p.append(vec![txn_batch(1)], &cfg, &f, t).await.unwrap();
        assert_eq!(p.snapshot().last_stable, open.base_offset);
        // The deposed coordinator (epoch 4) still had its commit of transaction 1 in flight.
        let late = p.append(vec![commit_from(Some(4))], &cfg, &f, t).await;
        assert!(matches!(late, Err(LogError::Fenced(_))), "{late:?}");
        let s = p.snapshot();
        assert_eq!(s.log_end, open.base_offset + 1, "nothing stored");
        assert_eq!(s.last_stable, open.base_offset, "transaction 2 still open");
        // Reopened without a producer snapshot (the batches are scanned), and with one.
        for persisted in [false, true] {
            if persisted {
                p.persist_meta().unwrap();
            }
            let again = Arc::new(
                PartitionLog::open(&db, meta.clone(), &HashSet::new(), 1, "t", 0).unwrap(),
            );
            let late = again.append(vec![commit_from(Some(4))], &cfg, &f, t).await;
            assert!(matches!(late, Err(LogError::Fenced(_))), "{late:?}");
        }
        // The coordinator at epoch 5 (or a later one) ends transaction 2.
        p.append(vec![commit_from(Some(5))], &cfg, &f, t)
            .await
            .unwrap();
        assert_eq!(p.snapshot().last_stable, p.snapshot().log_end);
    }

    /// A replicated log takes appends only while it leads: a write checked while it led that
    /// lands after it stepped down is refused (it would be stamped with the new leader's
    /// epoch, beside that leader's own records).
    #[tokio::test]
    async fn a_replicated_log_takes_appends_only_while_it_leads() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        let t = Duration::from_secs(5);
        p.set_replicated();
        let e = p.append(vec![batch(1, 0, -1, -1)], &cfg, &f, t).await;
        assert!(matches!(e, Err(LogError::NotLeading(_))), "{e:?}");
        p.become_leader(5).unwrap();
        p.append(vec![batch(1, 0, -1, -1)], &cfg, &f, t)
            .await
            .unwrap();
        p.become_follower(6).unwrap();
        let e = p.append(vec![batch(1, 0, -1, -1)], &cfg, &f, t).await;
        assert!(matches!(e, Err(LogError::NotLeading(_))), "{e:?}");
        assert_eq!(e.unwrap_err().code(), quiver_protocol::ErrorCode::NotLeader);
        assert_eq!(p.snapshot().log_end, 1, "nothing stored while following");
        p.become_leader(7).unwrap();
        p.end_role();
        let e = p.append(vec![batch(1, 0, -1, -1)], &cfg, &f, t).await;
        assert!(matches!(e, Err(LogError::NotLeading(_))), "{e:?}");
        // A batch waiting for its producer's earlier ones when the log steps down fails
        // then with NotLeading, not at the end of its wait with a sequence error.
        p.become_leader(8).unwrap();
        let long = Duration::from_secs(30);
        let parked = spawn_append(&p, &f, &cfg, batch(1, 0, 77, 3), long);
        wait_until_parked(&p).await;
        p.become_follower(9).unwrap();
        let e = parked.await.unwrap();
        assert!(matches!(e, Err(LogError::NotLeading(_))), "{e:?}");
    }

    #[tokio::test]
    async fn pipelined_sequences_are_ordered_and_deduplicated() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        p.append(vec![batch(2, 0, 9, 0)], &cfg, &f, Duration::from_secs(5))
            .await
            .unwrap();
        // Sequence 4 arrives before 2: it waits for 2, then lands after it.
        let later = spawn_append(&p, &f, &cfg, batch(2, 0, 9, 4), Duration::from_secs(5));
        wait_until_parked(&p).await;
        let mid = p
            .append(vec![batch(2, 0, 9, 2)], &cfg, &f, Duration::from_secs(5))
            .await
            .unwrap();
        let later = later.await.unwrap().unwrap();
        assert_eq!((mid.base_offset, later.base_offset), (2, 4));
        // A retry of sequence 2 gets its first offsets back and stores nothing.
        let dup = p
            .append(vec![batch(2, 0, 9, 2)], &cfg, &f, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((dup.base_offset, dup.records), (2, 0));
        assert_eq!(p.snapshot().log_end, 6);
    }

    #[tokio::test]
    async fn a_new_producers_second_batch_overtaking_its_first_waits_for_it() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        let second = spawn_append(&p, &f, &cfg, batch(3, 0, 42, 3), Duration::from_secs(5));
        wait_until_parked(&p).await;
        let first = p
            .append(vec![batch(3, 0, 42, 0)], &cfg, &f, Duration::from_secs(5))
            .await
            .unwrap();
        let second = second.await.unwrap().unwrap();
        assert_eq!((first.base_offset, second.base_offset), (0, 3));
    }

    /// Batches parked under made-up producers are not retried by other producers' appends:
    /// each waits for its own producer only, so parking many cannot multiply the work of
    /// every append (with one signal for all, each of the 10 appends below retried all 20).
    #[tokio::test]
    async fn parked_batches_are_not_retried_by_other_producers_appends() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        let parked: Vec<_> = (0..20)
            .map(|i| {
                let t = Duration::from_secs(2);
                spawn_append(&p, &f, &cfg, batch(1, 0, 1000 + i, 7), t)
            })
            .collect();
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while p.sequence_waits() < 20 {
            assert!(
                tokio::time::Instant::now() < until,
                "the batches never parked"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for seq in 0..10 {
            p.append(vec![batch(1, 0, 9, seq)], &cfg, &f, Duration::from_secs(5))
                .await
                .unwrap();
        }
        for parked in parked {
            let e = parked.await.unwrap().unwrap_err();
            assert!(e.to_string().contains("unknown to this partition"), "{e}");
        }
        assert_eq!(p.sequence_waits(), 20, "each parked batch waited once");
        assert_eq!(p.sequence_waiters.producers(), 0, "every waiter left");
    }

    /// A batch waiting for its producer's earlier ones when its partition is deleted fails
    /// then as deleted (the topic is gone), not at the end of its wait.
    #[tokio::test]
    async fn a_waiting_batch_fails_as_deleted_when_its_partition_goes() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        let parked = spawn_append(&p, &f, &cfg, batch(1, 0, 55, 4), Duration::from_secs(5));
        wait_until_parked(&p).await;
        p.delete().unwrap();
        let e = parked.await.unwrap();
        assert!(matches!(e, Err(LogError::Deleted)), "{e:?}");
        assert!(
            p.read(0, 1 << 20).is_err(),
            "nothing readable after the delete"
        );
    }

    /// A metadata record that does not decode takes its partition offline, not the broker;
    /// nothing rewrites the record or the batches until a repair removes the record, and
    /// the next open rebuilds it from the batches.
    #[tokio::test]
    async fn a_damaged_metadata_record_takes_only_its_partition_offline_until_repaired() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        let t = Duration::from_secs(5);
        for _ in 0..3 {
            p.append(vec![batch(10, 0, -1, -1)], &cfg, &f, t)
                .await
                .unwrap();
        }
        let stored = p.read(0, 1 << 20).unwrap().payload;
        p.persist_meta().unwrap();
        drop(p);
        let meta = db.open_tree("meta").unwrap();
        let garbage = b"\xffnot json".to_vec();
        meta.insert(b"1/0", garbage.clone()).unwrap();

        let p = open_partition(&db);
        let reason = p.offline_reason().expect("offline");
        assert!(
            reason.contains("metadata record is damaged") && reason.contains("broker repair"),
            "{reason}"
        );
        let offline = |r: Result<(), LogError>| matches!(r, Err(LogError::Offline { .. }));
        assert!(offline(
            p.append(vec![batch(10, 0, -1, -1)], &cfg, &f, t)
                .await
                .map(drop)
        ));
        assert!(offline(p.persist_meta()));
        // Its bounds come from the batches, which the open read: still answered.
        assert_eq!(p.lookup(OffsetSpec::Latest, usize::MAX).unwrap().0, 30);
        assert!(offline(p.truncate_to(0, 0).map(drop)));
        p.accept_damage();
        assert!(
            p.offline_reason().is_some(),
            "a group service cannot take it back"
        );
        drop(p);
        assert_eq!(meta.get(b"1/0").unwrap().unwrap().to_vec(), garbage);

        let report = PartitionLog::repair(&db, &meta, 1, 0).unwrap();
        assert!(report.metadata_rebuilt);
        assert_eq!(report.first_damaged_offset, None);
        assert_eq!(report.log_end_after, 30);
        let p = open_partition(&db);
        assert_eq!(p.offline_reason(), None);
        let snap = p.snapshot();
        assert_eq!((snap.log_start, snap.log_end), (0, 30));
        assert_eq!(p.read(0, 1 << 20).unwrap().payload, stored);
        p.append(vec![batch(10, 0, -1, -1)], &cfg, &f, t)
            .await
            .unwrap();
    }

    /// With its metadata record damaged, a partition whose last batch is damaged too still
    /// opens (offline, its end taken from that batch's key), and takes no role: leading
    /// or following would write metadata and truncate batches the repair has to see.
    #[tokio::test]
    async fn a_damaged_last_batch_beside_damaged_metadata_opens_offline_and_takes_no_role() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        for _ in 0..3 {
            p.append(vec![batch(10, 0, -1, -1)], &cfg, &f, Duration::from_secs(5))
                .await
                .unwrap();
        }
        p.persist_meta().unwrap();
        drop(p);
        let meta = db.open_tree("meta").unwrap();
        meta.insert(b"1/0", b"\xffnot json".to_vec()).unwrap();
        let batches = PartitionKeys::new(db.open_tree(BATCHES_TREE).unwrap(), 1, 0);
        batches.insert(&offset_key(20), b"not a batch").unwrap();

        let p = open_partition(&db);
        assert!(p.metadata_damaged());
        assert!(p.offline_reason().is_some());
        assert_eq!(p.lookup(OffsetSpec::Latest, usize::MAX).unwrap().0, 21);
        let offline = |r: Result<(), LogError>| matches!(r, Err(LogError::Offline { .. }));
        assert!(offline(p.become_leader(1)));
        assert!(offline(p.become_follower(1).map(drop)));
        drop(p);

        let report = PartitionLog::repair(&db, &meta, 1, 0).unwrap();
        assert!(report.metadata_rebuilt);
        assert_eq!(report.first_damaged_offset, Some(20));
        assert_eq!(report.log_end_after, 20);
        let p = open_partition(&db);
        assert_eq!(p.offline_reason(), None);
        p.become_leader(1).unwrap();
    }

    /// A partition opened with a producer snapshot it cannot use (taken beyond a log end
    /// that a repair or a crash moved back) rebuilds producer state from its batches, and
    /// keeps the producers whose batches retention deleted: their next batch appends.
    #[tokio::test]
    async fn a_rebuild_at_open_keeps_producers_only_retention_remembers() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        let t = Duration::from_secs(5);
        p.append(vec![batch(10, 0, 7, 0)], &cfg, &f, t)
            .await
            .unwrap();
        for _ in 0..3 {
            p.append(vec![batch(10, 0, -1, -1)], &cfg, &f, t)
                .await
                .unwrap();
        }
        let one = p.read(10, 1 << 20).unwrap().payload.len() / 3;
        let mut rc = cfg.clone();
        rc.retention_ms = -1;
        rc.retention_bytes = (one * 3) as i64;
        p.apply_retention(&rc, 0).unwrap();
        assert_eq!(p.snapshot().log_start, 10);
        p.persist_meta().unwrap();
        drop(p);
        // What a repair leaves: the snapshot's end beyond the log end.
        let meta = db.open_tree("meta").unwrap();
        let mut pm: PartitionMeta =
            serde_json::from_slice(&meta.get(b"1/0").unwrap().unwrap()).unwrap();
        pm.producers_end = 1_000;
        meta.insert(b"1/0", serde_json::to_vec(&pm).unwrap())
            .unwrap();
        let p = open_partition(&db);
        let r = p
            .append(vec![batch(1, 0, 7, 10)], &cfg, &f, t)
            .await
            .unwrap();
        assert_eq!(r.base_offset, 40);
    }

    #[tokio::test]
    async fn retention_past_an_open_transaction_keeps_the_last_stable_offset_stored() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        let t = Duration::from_secs(5);
        p.append(vec![txn_batch(0)], &cfg, &f, t).await.unwrap();
        for _ in 0..3 {
            p.append(vec![batch(10, 0, -1, -1)], &cfg, &f, t)
                .await
                .unwrap();
        }
        assert_eq!(p.snapshot().last_stable, 0, "the open transaction holds it");
        let one = p.read(1, 1 << 20).unwrap().payload.len() / 3;
        let mut rc = cfg.clone();
        rc.retention_ms = -1;
        rc.retention_bytes = (one * 2) as i64;
        p.apply_retention(&rc, 0).unwrap();
        let s = p.snapshot();
        assert!(s.log_start > 0, "{s:?}");
        assert_eq!(s.last_stable, s.log_start, "{s:?}");
        let read = p.read_with(s.last_stable, 1 << 20, Isolation::ReadCommitted);
        assert_eq!(read.unwrap().batches, 0);
    }

    /// Five equal batches of 10 records (offsets 0..50).
    async fn append_five_batches_of_ten(p: &Arc<PartitionLog>, cfg: &TopicConfig, f: &Flusher) {
        for _ in 0..5 {
            p.append(vec![batch(10, 0, -1, -1)], cfg, f, Duration::from_secs(5))
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn retention_by_size_moves_log_start() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        append_five_batches_of_ten(&p, &cfg, &f).await;
        let one = p.snapshot().size_bytes / 5;
        let mut rc = cfg.clone();
        rc.retention_ms = -1;
        rc.retention_bytes = (one * 2) as i64;
        p.apply_retention(&rc, 0).unwrap();
        let s = p.snapshot();
        assert_eq!(s.log_start, 30);
        assert!(matches!(
            p.read(0, 100),
            Err(LogError::OffsetOutOfRange { .. })
        ));
        assert_eq!(p.read(30, 1 << 20).unwrap().batches, 2);
    }

    /// Retention lists batches without the partition's lock. A role change (a follower
    /// reset) or another pass between its listing and its deletion makes the list stale:
    /// the pass deletes nothing, and the log start and size stay right (before, a stale
    /// pass could move the log start back and wrap the size below zero).
    #[tokio::test]
    async fn a_retention_pass_gives_way_when_the_log_changed_after_its_listing() {
        let (_dir, db, f, _stop) = setup().await;
        let p = open_partition(&db);
        let cfg = TopicConfig::default();
        append_five_batches_of_ten(&p, &cfg, &f).await;
        let size = p.snapshot().size_bytes;
        let mut rc = cfg.clone();
        rc.retention_ms = -1;
        rc.retention_bytes = (size / 5 * 2) as i64;
        let stale = p
            .plan_retention(&rc, 0)
            .unwrap()
            .expect("batches to delete");
        p.become_follower(3).unwrap();
        assert_eq!(p.carry_out_retention(stale, "test").unwrap(), 0);
        let s = p.snapshot();
        assert_eq!((s.log_start, s.size_bytes), (0, size), "{s:?}");
        assert_eq!(p.read(0, 1 << 20).unwrap().batches, 5);
        // Two passes listed the same batches; the first deletes them, the second gives way.
        let first = p.plan_retention(&rc, 0).unwrap().unwrap();
        let second = p.plan_retention(&rc, 0).unwrap().unwrap();
        assert!(p.carry_out_retention(first, "test").unwrap() > 0);
        assert_eq!(p.carry_out_retention(second, "test").unwrap(), 0);
        let s = p.snapshot();
        assert_eq!((s.log_start, s.size_bytes), (30, size / 5 * 2), "{s:?}");
    }
}
