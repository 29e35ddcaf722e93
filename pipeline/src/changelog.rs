//! Keyed state that moves with its input partition: every change a stage makes is written to
//! the pipeline's changelog topic `quiver.state.<pipeline>` (one changelog partition per input
//! partition number), and the commit of the input offset carries a [`StateMark`] saying which
//! changelog range holds the state as of that offset. Whoever owns the partition next reads
//! exactly that range back, so state and committed input agree even after a crash.
//!
//! Restore time grows with the state, not with its history: on taking a partition an owner
//! writes a snapshot of the whole state under a fresh epoch (a marker record, then every key),
//! and writes a new snapshot whenever the changes since the last one outgrow the state. A
//! mark names its epoch: records of any other epoch in the range — a crashed attempt's, or a
//! fenced owner's still in flight — are ignored on restore.
//!
//! Changelog records: key = stage index (u32, big endian) then the state key; value = the
//! new value; headers `quiver.state.epoch`, `quiver.state.scope` (`topic/partition` of the
//! input), and `quiver.state.delete` for a deleted key. The snapshot marker has an empty key
//! and the header `quiver.state.snapshot`.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_client::{
    Admin, Client, Consumer, ConsumerConfig, Isolation, OffsetReset, ProducerRecord, SeekTo,
    TopicPartition,
};
use quiver_plugins::{MemoryStateStore, StateChange, StateStore};
use quiver_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::progress::CommitMetadata;
use crate::stages::fresh_stores;

/// Header with the writer's epoch.
pub const EPOCH_HEADER: &str = "quiver.state.epoch";
/// Header with the input partition the state belongs to.
pub const SCOPE_HEADER: &str = "quiver.state.scope";
/// Header marking a deleted key.
pub const DELETE_HEADER: &str = "quiver.state.delete";
/// Header of a snapshot's first record.
pub const SNAPSHOT_HEADER: &str = "quiver.state.snapshot";

/// Changes since the last snapshot may grow to this, or to the state's size if larger,
/// before a new snapshot is written.
const MIN_RESNAPSHOT_BYTES: usize = 1024 * 1024;
/// A snapshot older than this is rewritten (well inside the changelog's retention).
const MAX_SNAPSHOT_AGE: Duration = Duration::from_secs(24 * 3600);
/// The changelog's retention: a week, far longer than any snapshot lives.
const CHANGELOG_RETENTION_MS: &str = "604800000";

/// The changelog topic of a pipeline.
pub fn changelog_topic(pipeline: &str) -> String {
    format!("quiver.state.{pipeline}")
}

/// Where the state of an input partition is, stored with its committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMark {
    /// The epoch whose records count.
    pub epoch: u64,
    /// Changelog partition.
    pub partition: u32,
    /// Offset of the snapshot marker.
    pub from: i64,
    /// End of the range (exclusive).
    pub to: i64,
}

impl StateMark {
    /// The commit metadata text carrying this mark (and no counters).
    pub fn to_metadata(&self) -> String {
        CommitMetadata {
            state: Some(*self),
            ..CommitMetadata::default()
        }
        .to_text()
    }

    /// The mark in a pipeline's commit metadata ([`CommitMetadata`]), if any.
    pub fn from_metadata(text: &str) -> Option<StateMark> {
        CommitMetadata::parse(text)?.state
    }
}

/// Makes sure the changelog topic exists (created with `partitions` partitions of
/// `replicas` copies); returns its partition count.
pub async fn ensure_changelog(
    client: &Client,
    pipeline: &str,
    partitions: u32,
    replicas: u16,
) -> Result<u32, RuntimeError> {
    let admin = Admin::new(client.clone());
    let topic = changelog_topic(pipeline);
    match admin.describe_topic(&topic).await {
        Ok(d) => return Ok(d.partitions.len() as u32),
        Err(e) if e.code() == Some(ErrorCode::UnknownTopicOrPartition) => {}
        Err(e) => return Err(e.into()),
    }
    // Both set: a broker-wide default `retention.bytes` must not delete the snapshot range
    // a committed mark points to (the state could then never be restored).
    let config = BTreeMap::from([
        ("retention.ms".to_string(), CHANGELOG_RETENTION_MS.into()),
        ("retention.bytes".to_string(), "-1".to_string()),
    ]);
    match admin
        .create_replicated_topic(&topic, partitions.max(1), replicas.max(1), config)
        .await
    {
        Ok(d) => Ok(d.partitions.len() as u32),
        Err(e) if e.code() == Some(ErrorCode::TopicAlreadyExists) => {
            Ok(admin.describe_topic(&topic).await?.partitions.len() as u32)
        }
        Err(e) => Err(e.into()),
    }
}

fn new_epoch() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn scope_text(tp: &TopicPartition) -> String {
    format!("{}/{}", tp.topic, tp.partition)
}

fn header<'a>(headers: &'a [quiver_client::Header], name: &str) -> Option<&'a Bytes> {
    headers.iter().find(|h| h.key == name).map(|h| &h.value)
}

/// The state of one input partition: one store per stage, and where its changelog is.
///
/// Writing is the caller's: it sends the records of a [`StateWrite`]
/// ([`PartitionState::next_write`]; plainly or in a transaction), then reports the offsets
/// they landed at in the changelog partition with [`PartitionState::landed`], in the order
/// the writes were taken; [`PartitionState::metadata`] is then what to commit with the input
/// offset. Writes may be in flight while later ones are taken: the mark moves only as they
/// land.
pub struct PartitionState {
    /// One store per stage, in stage order.
    pub stores: Vec<Arc<MemoryStateStore>>,
    tp: TopicPartition,
    topic: String,
    mark: StateMark,
    /// The epoch records are written under now: a snapshot starts a new one, which the mark
    /// takes when the snapshot lands.
    writing_epoch: u64,
    /// Snapshots sent that have not landed yet.
    snapshots_in_flight: usize,
    since_snapshot: usize,
    snapshot_at: Instant,
}

impl PartitionState {
    /// Reads the state `metadata` (the committed offset's) points at. The caller writes a
    /// snapshot ([`PartitionState::snapshot_records`]) before committing again.
    pub async fn restore(
        client: &Client,
        pipeline: &str,
        stages: usize,
        tp: &TopicPartition,
        changelog_partitions: u32,
        metadata: Option<&str>,
    ) -> Result<PartitionState, RuntimeError> {
        let topic = changelog_topic(pipeline);
        let stores = fresh_stores(pipeline, stages, &tp.topic, tp.partition);
        let restored = metadata.and_then(StateMark::from_metadata);
        if let Some(mark) = restored {
            let changes = read_range(client, &topic, tp, mark, stages).await?;
            for (store, changes) in stores.iter().zip(changes) {
                store.restore(changes).map_err(|e| {
                    RuntimeError::Failed(format!(
                        "cannot restore the state of {}: {e}",
                        scope_text(tp)
                    ))
                })?;
            }
            tracing::info!(partition = %scope_text(tp), keys = stores.iter().map(|s| s.len()).sum::<usize>(), "state restored");
        }
        let mark = restored.unwrap_or(StateMark {
            epoch: 0,
            partition: tp.partition % changelog_partitions.max(1),
            from: 0,
            to: 0,
        });
        Ok(PartitionState {
            stores,
            tp: tp.clone(),
            topic,
            mark,
            writing_epoch: mark.epoch,
            snapshots_in_flight: 0,
            since_snapshot: 0,
            snapshot_at: Instant::now(),
        })
    }

    /// The changelog topic and partition this state is written to.
    pub fn changelog(&self) -> (String, u32) {
        (self.topic.clone(), self.mark.partition)
    }

    /// Where the state stands, for the metadata committed with the input offset.
    pub fn mark(&self) -> StateMark {
        self.mark
    }

    fn record(&self, key: Vec<u8>, value: Vec<u8>, extra: Option<&str>) -> ProducerRecord {
        let mut headers = vec![
            (
                EPOCH_HEADER.to_string(),
                Bytes::from(self.writing_epoch.to_string()),
            ),
            (SCOPE_HEADER.to_string(), Bytes::from(scope_text(&self.tp))),
        ];
        if let Some(h) = extra {
            headers.push((h.to_string(), Bytes::from_static(b"1")));
        }
        ProducerRecord {
            topic: self.topic.clone(),
            partition: Some(self.mark.partition),
            key: Some(Bytes::from(key)),
            value: Bytes::from(value),
            headers,
            timestamp: None,
        }
    }

    /// The records to write for the changes the stages made since the last write, preceded
    /// by a snapshot of the whole state under a new epoch when `snapshot` is set.
    pub fn next_write(&mut self, snapshot: bool) -> StateWrite {
        let mut records = Vec::new();
        let mut snapshot_epoch = None;
        if snapshot {
            let epoch = new_epoch();
            self.writing_epoch = epoch;
            self.snapshots_in_flight += 1;
            snapshot_epoch = Some(epoch);
            records.extend(self.snapshot_records());
        }
        records.extend(self.change_records());
        StateWrite {
            records,
            snapshot_epoch,
        }
    }

    /// The whole state under the writing epoch: a marker, then every key.
    fn snapshot_records(&mut self) -> Vec<ProducerRecord> {
        let mut out = vec![self.record(Vec::new(), Vec::new(), Some(SNAPSHOT_HEADER))];
        for (i, store) in self.stores.iter().enumerate() {
            store.drain_changes(); // the snapshot holds them
            for (k, v) in store.entries() {
                out.push(self.record(stage_key(i, &k), v, None));
            }
        }
        out
    }

    /// The changes the stages made since the last call.
    fn change_records(&mut self) -> Vec<ProducerRecord> {
        let mut out = Vec::new();
        for i in 0..self.stores.len() {
            for (k, v) in self.stores[i].drain_changes() {
                self.since_snapshot += k.len() + v.as_ref().map_or(0, Vec::len);
                out.push(match v {
                    Some(v) => self.record(stage_key(i, &k), v, None),
                    None => self.record(stage_key(i, &k), Vec::new(), Some(DELETE_HEADER)),
                });
            }
        }
        out
    }

    /// Reports that the oldest write not yet reported (one with records; `snapshot_epoch`
    /// as [`StateWrite::snapshot_epoch`] said) landed in the changelog partition within
    /// `first..=last` (other writers' records may lie in between: restore filters by scope
    /// and epoch).
    pub fn landed(&mut self, first: i64, last: i64, snapshot_epoch: Option<u64>) {
        match snapshot_epoch {
            Some(epoch) => {
                self.snapshots_in_flight = self.snapshots_in_flight.saturating_sub(1);
                self.mark.epoch = epoch;
                self.mark.from = first;
                self.mark.to = last + 1;
                self.since_snapshot = 0;
                self.snapshot_at = Instant::now();
            }
            None => self.mark.to = self.mark.to.max(last + 1),
        }
    }

    /// True when the changes since the last snapshot outgrew the state (or it is old): a
    /// new snapshot keeps restore time bounded by the state's size.
    pub fn needs_snapshot(&self) -> bool {
        if self.snapshots_in_flight > 0 {
            return false;
        }
        let size: usize = self.stores.iter().map(|s| s.used_bytes()).sum();
        self.since_snapshot > size.max(MIN_RESNAPSHOT_BYTES)
            || self.snapshot_at.elapsed() > MAX_SNAPSHOT_AGE
    }
}

/// One write of a partition's state: its records, and whether they start a snapshot.
pub struct StateWrite {
    /// The records to send to the changelog partition, in order.
    pub records: Vec<ProducerRecord>,
    /// The new epoch, when the records start with a snapshot.
    pub snapshot_epoch: Option<u64>,
}

fn stage_key(stage: usize, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&(stage as u32).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// Reads `[mark.from, mark.to)` of the changelog partition and returns, per stage, the changes
/// of `tp` written under `mark.epoch`, in order.
async fn read_range(
    client: &Client,
    topic: &str,
    tp: &TopicPartition,
    mark: StateMark,
    stages: usize,
) -> Result<Vec<Vec<StateChange>>, RuntimeError> {
    let mut changes: Vec<Vec<StateChange>> = vec![Vec::new(); stages];
    if mark.to <= mark.from {
        return Ok(changes);
    }
    let scope = scope_text(tp);
    let epoch = mark.epoch.to_string();
    // Read-committed: records of aborted transactions (an exactly-once attempt that failed)
    // never come back as state. A range no longer stored is an error, never a jump to what
    // is left (that would restore part of the state, or none, as if it were all).
    let mut consumer = Consumer::new(
        client.clone(),
        ConsumerConfig {
            isolation: Isolation::ReadCommitted,
            reset: OffsetReset::Error,
            ..ConsumerConfig::default()
        },
    );
    consumer.assign(topic, [mark.partition]).await?;
    consumer.seek(topic, mark.partition, SeekTo::Offset(mark.from))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let records = match consumer.poll_timeout(Duration::from_millis(500)).await {
            Ok(r) => r,
            Err(e) if e.code() == Some(ErrorCode::OffsetOutOfRange) => {
                return Err(RuntimeError::Failed(format!(
                    "cannot restore the state of {scope}: offsets {}..{} of {topic}/{} are no longer stored ({e}); the changelog's retention removed them (was the pipeline stopped longer than the changelog's retention.ms?). To start over without that state, stop the pipeline and reset its group's offsets",
                    mark.from, mark.to, mark.partition
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let mut done = false;
        for r in records {
            if r.offset >= mark.to {
                done = true;
                break;
            }
            if header(&r.headers, SCOPE_HEADER).is_none_or(|s| s.as_ref() != scope.as_bytes())
                || header(&r.headers, EPOCH_HEADER).is_none_or(|e| e.as_ref() != epoch.as_bytes())
                || header(&r.headers, SNAPSHOT_HEADER).is_some()
            {
                continue;
            }
            let key = r.key.unwrap_or_default();
            if key.len() < 4 {
                continue;
            }
            let stage = u32::from_be_bytes([key[0], key[1], key[2], key[3]]) as usize;
            let Some(list) = changes.get_mut(stage) else {
                continue;
            };
            let value = if header(&r.headers, DELETE_HEADER).is_some() {
                None
            } else {
                Some(r.value.to_vec())
            };
            list.push((key[4..].to_vec(), value));
        }
        if done || consumer.position(topic, mark.partition).await? >= mark.to {
            return Ok(changes);
        }
        if Instant::now() > deadline {
            // Possibly passing (the changelog partition without a leader, or its last stable
            // offset held by a transaction not yet ended): the instance joins again and
            // tries once more, rather than failing the pipeline for good.
            return Err(RuntimeError::Retry(format!(
                "cannot read the state of {scope} back from {topic}/{}: offsets {}..{} did not arrive within 120 s; joining again",
                mark.partition, mark.from, mark.to
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed mark naming changelog offsets that are no longer stored (retention removed
    /// them while the pipeline was stopped, or the changelog was deleted and made again) fails
    /// the restore at once with a clear reason: it never restores whatever is left (part of
    /// the state, or none) as if it were the state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_range_no_longer_stored_fails_the_restore_instead_of_restoring_part_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, client) = crate::test_broker::start(dir.path()).await;
        let partitions = ensure_changelog(&client, "gone", 1, 1).await.unwrap();
        let tp = TopicPartition::new("lines".to_string(), 0);
        let mark = StateMark {
            epoch: 1,
            partition: 0,
            from: 5,
            to: 9,
        };
        let restored = PartitionState::restore(
            &client,
            "gone",
            1,
            &tp,
            partitions,
            Some(&mark.to_metadata()),
        )
        .await;
        match restored {
            Err(RuntimeError::Failed(reason)) => {
                assert!(reason.contains("no longer stored"), "{reason}");
                assert!(reason.contains("5..9"), "{reason}");
            }
            Err(e) => panic!("expected the pipeline to fail with a reason, got {e}"),
            Ok(_) => panic!("state that is not stored was restored"),
        }
        broker.shutdown().await;
    }

    #[test]
    fn marks_round_trip_through_commit_metadata_and_other_metadata_is_no_mark() {
        let m = StateMark {
            epoch: u64::MAX,
            partition: 3,
            from: 10,
            to: 42,
        };
        assert_eq!(StateMark::from_metadata(&m.to_metadata()), Some(m));
        assert_eq!(StateMark::from_metadata("written by a person"), None);
        assert_eq!(StateMark::from_metadata("{\"other\": 1}"), None);
    }

    fn state_of(tp: &TopicPartition) -> PartitionState {
        let mark = StateMark {
            epoch: 7,
            partition: 0,
            from: 100,
            to: 120,
        };
        PartitionState {
            stores: fresh_stores("p", 1, &tp.topic, tp.partition),
            tp: tp.clone(),
            topic: changelog_topic("p"),
            mark,
            writing_epoch: mark.epoch,
            snapshots_in_flight: 0,
            since_snapshot: 0,
            snapshot_at: Instant::now(),
        }
    }

    fn epoch_of(r: &ProducerRecord) -> String {
        let (_, v) = r.headers.iter().find(|(k, _)| k == EPOCH_HEADER).unwrap();
        String::from_utf8_lossy(v).into_owned()
    }

    #[test]
    fn the_mark_moves_only_as_writes_land_in_order_while_later_ones_are_in_flight() {
        let tp = TopicPartition::new("in", 0);
        let mut st = state_of(&tp);
        st.stores[0].put(b"a", b"1").unwrap();
        let changes = st.next_write(false);
        assert_eq!(changes.records.len(), 1);
        assert_eq!(epoch_of(&changes.records[0]), "7");
        st.stores[0].put(b"b", b"2").unwrap();
        let snapshot = st.next_write(true);
        let new = snapshot.snapshot_epoch.expect("a snapshot");
        assert_eq!(snapshot.records.len(), 3, "marker and both keys");
        assert!(snapshot
            .records
            .iter()
            .all(|r| epoch_of(r) == new.to_string()));
        assert!(!st.needs_snapshot(), "one is in flight");
        // The earlier write lands first: the mark keeps its epoch and grows.
        st.landed(125, 125, changes.snapshot_epoch);
        let m = st.mark();
        assert_eq!((m.epoch, m.from, m.to), (7, 100, 126));
        // Then the snapshot: the mark starts at it, under its epoch.
        st.landed(130, 132, snapshot.snapshot_epoch);
        let m = st.mark();
        assert_eq!((m.epoch, m.from, m.to), (new, 130, 133));
    }

    #[test]
    fn epochs_differ() {
        assert_ne!(new_epoch(), new_epoch());
    }
}
