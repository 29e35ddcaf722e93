//! The controller's Raft storage on sled: openraft's storage-v2 [`RaftLogStorage`] (the
//! metadata log and the vote) and [`RaftStateMachine`] (the applied [`ControllerState`] and its
//! snapshot).
//!
//! The controller has its own sled database (a directory such as `<data_dir>/controller`),
//! never the partition log's, with three trees:
//! - `raft_log`: one log entry per key, the index as a big-endian `u64` (so key order is log
//!   order), the entry as JSON;
//! - `raft_meta`: `vote`, `committed` and `last_purged` (JSON);
//! - `state`: the applied state one record per key: `b/<id BE>` a broker, `t/<name>` a topic;
//!   `m/applied` and `m/membership` (last applied log id and membership); `m/snapshot_meta` and
//!   `m/snapshot_data` the current snapshot.
//!
//! **Durability.** Raft's safety rests on two writes surviving a crash: the vote, and every log
//! entry this node reported as stored (a leader counts it towards a quorum). So
//! [`RaftLogStorage::save_vote`] returns, and [`RaftLogStorage::append`] calls openraft's
//! [`LogFlushed`] callback, only after a durable flush of the whole database
//! ([`Database::flush_async`]: sled's flush, then an `fdatasync` of its log file) has
//! completed for those writes; truncation and purge flush too. The state machine is written
//! without waiting: each `apply` writes the records it changed together with the last applied
//! log id in one atomic sled batch, so after a crash it is some consistent earlier point, and
//! openraft re-applies the log from there up to the persisted `committed`. A snapshot is flushed before it is
//! reported built or installed, and (because a flush covers all earlier writes of the
//! database) the state on disk is never older than the snapshot the log was purged up to.
//!
//! Every sled call here is short (an insert, a batch, a range read of the metadata log); the
//! flushes run on tokio's blocking threads, not on a tokio worker.

// openraft's traits return its (large) `StorageError` by value; the helpers here match them.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::state::{BrokerRecord, ControllerState, PipelineRecord, PluginRecord, TopicRecord};
use super::types::{BrokerId, BrokerNode, ControllerResponse, TypeConfig};
use crate::log::Database;

type StorageResult<T> = Result<T, StorageError<BrokerId>>;
type Membership = StoredMembership<BrokerId, BrokerNode>;
type Meta = SnapshotMeta<BrokerId, BrokerNode>;

const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";
const STATE_TREE: &str = "state";
const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
const BROKER_PREFIX: &[u8] = b"b/";
const TOPIC_PREFIX: &[u8] = b"t/";
const PLUGIN_PREFIX: &[u8] = b"p/";
const PIPELINE_PREFIX: &[u8] = b"l/";
const APPLIED: &[u8] = b"m/applied";
const LAST_TOPIC_ID: &[u8] = b"m/last_topic_id";
const PIPELINE_DEPLOYS: &[u8] = b"m/pipeline_deploys";
const MEMBERSHIP: &[u8] = b"m/membership";
const SNAPSHOT_META: &[u8] = b"m/snapshot_meta";
const SNAPSHOT_DATA: &[u8] = b"m/snapshot_data";

/// Opening the controller's database failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerStoreError {
    #[error("controller database: {0}")]
    Sled(#[from] sled::Error),
    #[error("controller database holds an unreadable {what}: {source}")]
    Corrupt {
        what: String,
        source: serde_json::Error,
    },
}

/// Opens (or creates) the controller's database in `dir` and returns its log store and state
/// machine, which share it. The state machine is loaded from what was applied before.
pub fn open(
    dir: &Path,
) -> Result<(ControllerLogStore, ControllerStateMachine), ControllerStoreError> {
    let db =
        Database::new(sled::Config::new().path(dir).open()?, dir).map_err(sled::Error::from)?;
    let log = ControllerLogStore {
        log: db.open_tree(LOG_TREE)?,
        meta: db.open_tree(META_TREE)?,
        db: db.clone(),
    };
    let tree = db.open_tree(STATE_TREE)?;
    let corrupt = |what: &str| {
        let what = what.to_string();
        move |source| ControllerStoreError::Corrupt { what, source }
    };
    let mut state = ControllerState::default();
    for kv in tree.scan_prefix(BROKER_PREFIX) {
        let (_, v) = kv?;
        let b: BrokerRecord = serde_json::from_slice(&v).map_err(corrupt("broker"))?;
        state.brokers.insert(b.id, b);
    }
    for kv in tree.scan_prefix(TOPIC_PREFIX) {
        let (_, v) = kv?;
        let t: TopicRecord = serde_json::from_slice(&v).map_err(corrupt("topic"))?;
        state.topics.insert(t.name.clone(), t);
    }
    for kv in tree.scan_prefix(PLUGIN_PREFIX) {
        let (_, v) = kv?;
        let p: PluginRecord = serde_json::from_slice(&v).map_err(corrupt("plugin"))?;
        state.plugins.insert(p.id.clone(), p);
    }
    for kv in tree.scan_prefix(PIPELINE_PREFIX) {
        let (_, v) = kv?;
        let p: PipelineRecord = serde_json::from_slice(&v).map_err(corrupt("pipeline"))?;
        state.pipelines.insert(p.name.clone(), p);
    }
    if let Some(v) = tree.get(LAST_TOPIC_ID)? {
        state.last_topic_id = serde_json::from_slice(&v).map_err(corrupt("last topic id"))?;
    }
    if let Some(v) = tree.get(PIPELINE_DEPLOYS)? {
        state.pipeline_deploys =
            serde_json::from_slice(&v).map_err(corrupt("pipeline deploy count"))?;
    }
    // Never below a number a pipeline holds (a store written before the count was kept).
    let highest = state.pipelines.values().map(|p| p.deploy_number).max();
    state.pipeline_deploys = state.pipeline_deploys.max(highest.unwrap_or(0));
    let last_applied = match tree.get(APPLIED)? {
        Some(v) => serde_json::from_slice(&v).map_err(corrupt("last applied log id"))?,
        None => None,
    };
    let last_membership = match tree.get(MEMBERSHIP)? {
        Some(v) => serde_json::from_slice(&v).map_err(corrupt("membership"))?,
        None => Membership::default(),
    };
    let sm = ControllerStateMachine {
        db,
        tree,
        state,
        last_applied,
        last_membership,
        snapshot_lock: Arc::new(Mutex::new(())),
    };
    Ok((log, sm))
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn topic_key(name: &str) -> Vec<u8> {
    [TOPIC_PREFIX, name.as_bytes()].concat()
}

fn plugin_key(id: &str) -> Vec<u8> {
    [PLUGIN_PREFIX, id.as_bytes()].concat()
}

fn pipeline_key(name: &str) -> Vec<u8> {
    [PIPELINE_PREFIX, name.as_bytes()].concat()
}

fn broker_key(id: BrokerId) -> Vec<u8> {
    [BROKER_PREFIX, &id.to_be_bytes()[..]].concat()
}

fn any(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("controller records serialize to JSON")
}

fn from_json<T: DeserializeOwned>(
    bytes: &[u8],
    err: fn(AnyError) -> StorageIOError<BrokerId>,
) -> StorageResult<T> {
    serde_json::from_slice(bytes).map_err(|e| err(any(e)).into())
}

/// The Raft log and vote. Cheap to clone; clones share the database (one is the log reader).
#[derive(Clone)]
pub struct ControllerLogStore {
    db: Database,
    log: sled::Tree,
    meta: sled::Tree,
}

impl ControllerLogStore {
    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &[u8],
        err: fn(AnyError) -> StorageIOError<BrokerId>,
    ) -> StorageResult<Option<T>> {
        match self.meta.get(key).map_err(|e| err(any(e)))? {
            Some(v) => from_json(&v, err),
            None => Ok(None),
        }
    }

    /// Removes the log entries of `range` in one batch and flushes before returning
    /// (truncate and purge: openraft assumes both durable once they return).
    async fn remove_flushed(&self, range: sled::Iter) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for kv in range {
            let (k, _) = kv.map_err(|e| StorageIOError::read_logs(any(e)))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for ControllerLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => match i.checked_add(1) {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.checked_add(1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        let iter = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => self.log.range(log_key(start)..log_key(end)),
            None => self.log.range(log_key(start)..),
        };
        iter.map(|kv| {
            let (_, v) = kv.map_err(|e| StorageIOError::read_logs(any(e)))?;
            from_json(&v, StorageIOError::read_logs)
        })
        .collect()
    }
}

impl RaftLogStorage<TypeConfig> for ControllerLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<BrokerId>> =
            self.read_meta(LAST_PURGED, StorageIOError::read_logs)?;
        let last = match self
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(any(e)))?
        {
            Some((_, v)) => {
                Some(from_json::<Entry<TypeConfig>>(&v, StorageIOError::read_logs)?.log_id)
            }
            None => None,
        };
        // Entries at or below the purge point may linger after a crash during a purge.
        let last_log_id = std::cmp::max(last, last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Returns only once the vote is on disk.
    async fn save_vote(&mut self, vote: &Vote<BrokerId>) -> StorageResult<()> {
        self.meta
            .insert(VOTE, to_json(vote))
            .map_err(|e| StorageIOError::write_vote(any(e)))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_vote(any(e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<BrokerId>>> {
        self.read_meta(VOTE, StorageIOError::read_vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<BrokerId>>) -> StorageResult<()> {
        // Not flushed: losing it only means waiting for the leader to say it again.
        self.meta
            .insert(COMMITTED, to_json(&committed))
            .map_err(|e| StorageIOError::write(any(e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<BrokerId>>> {
        Ok(self
            .read_meta::<Option<LogId<BrokerId>>>(COMMITTED, StorageIOError::read)?
            .flatten())
    }

    /// Writes the entries in one atomic batch, then flushes, and only then tells openraft
    /// (through `callback`) that they are durable. Returns after the flush, so appends and
    /// votes reach the disk in the order they were made.
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&log_key(entry.log_id.index), to_json(&entry));
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        match self.db.flush_async().await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(any(e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<BrokerId>) -> StorageResult<()> {
        self.remove_flushed(self.log.range(log_key(log_id.index)..))
            .await
    }

    async fn purge(&mut self, log_id: LogId<BrokerId>) -> StorageResult<()> {
        // The purge point first: entries left below it by a crash are ignored.
        self.meta
            .insert(LAST_PURGED, to_json(&Some(log_id)))
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        self.remove_flushed(self.log.range(..=log_key(log_id.index)))
            .await
    }
}

/// The applied metadata ([`ControllerState`]), the last applied log id and membership, and
/// the current snapshot.
pub struct ControllerStateMachine {
    db: Database,
    tree: sled::Tree,
    state: ControllerState,
    last_applied: Option<LogId<BrokerId>>,
    last_membership: Membership,
    /// Orders snapshot writes: a snapshot built from older state never replaces a newer one.
    snapshot_lock: Arc<Mutex<()>>,
}

impl ControllerStateMachine {
    /// The applied metadata.
    pub fn state(&self) -> &ControllerState {
        &self.state
    }

    /// The id of the last applied log entry.
    pub fn last_applied(&self) -> Option<LogId<BrokerId>> {
        self.last_applied
    }
}

/// Writes `meta` and `data` as the current snapshot unless a newer one is already there.
fn store_snapshot(
    tree: &sled::Tree,
    lock: &Mutex<()>,
    meta: &Meta,
    data: &[u8],
    state_batch: Option<sled::Batch>,
) -> StorageResult<()> {
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let write_err = |e: sled::Error| StorageIOError::write_snapshot(None, any(e));
    if state_batch.is_none() {
        if let Some(v) = tree.get(SNAPSHOT_META).map_err(write_err)? {
            let current: Meta = from_json(&v, |e| StorageIOError::read_snapshot(None, e))?;
            if current.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
    }
    let mut batch = state_batch.unwrap_or_default();
    batch.insert(SNAPSHOT_META, to_json(meta));
    batch.insert(SNAPSHOT_DATA, data);
    tree.apply_batch(batch).map_err(write_err)?;
    Ok(())
}

impl RaftStateMachine<TypeConfig> for ControllerStateMachine {
    type SnapshotBuilder = ControllerSnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<BrokerId>>, Membership)> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    /// Applies the entries in memory, then writes the brokers and topics they touched with the
    /// new last applied id and membership in one atomic batch (not flushed: see the module doc).
    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<ControllerResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut brokers = BTreeSet::new();
        let mut topics = BTreeSet::new();
        let mut plugins = BTreeSet::new();
        let mut pipelines = BTreeSet::new();
        let mut responses = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => ControllerResponse::Ok,
                EntryPayload::Normal(cmd) => {
                    let touched = self.state.touched(&cmd);
                    brokers.extend(touched.broker);
                    topics.extend(touched.topics);
                    plugins.extend(touched.plugins);
                    pipelines.extend(touched.pipelines);
                    self.state.apply(&cmd)
                }
                EntryPayload::Membership(m) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    ControllerResponse::Ok
                }
            };
            responses.push(response);
        }
        if responses.is_empty() {
            return Ok(responses);
        }
        let mut batch = sled::Batch::default();
        for id in brokers {
            match self.state.brokers.get(&id) {
                Some(b) => batch.insert(broker_key(id), to_json(b)),
                None => batch.remove(broker_key(id)),
            }
        }
        for name in topics {
            match self.state.topics.get(&name) {
                Some(t) => batch.insert(topic_key(&name), to_json(t)),
                None => batch.remove(topic_key(&name)),
            }
        }
        for id in plugins {
            match self.state.plugins.get(&id) {
                Some(p) => batch.insert(plugin_key(&id), to_json(p)),
                None => batch.remove(plugin_key(&id)),
            }
        }
        for name in pipelines {
            match self.state.pipelines.get(&name) {
                Some(p) => batch.insert(pipeline_key(&name), to_json(p)),
                None => batch.remove(pipeline_key(&name)),
            }
        }
        batch.insert(APPLIED, to_json(&self.last_applied));
        batch.insert(MEMBERSHIP, to_json(&self.last_membership));
        batch.insert(LAST_TOPIC_ID, to_json(&self.state.last_topic_id));
        batch.insert(PIPELINE_DEPLOYS, to_json(&self.state.pipeline_deploys));
        self.tree
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_state_machine(any(e)))?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        ControllerSnapshotBuilder {
            db: self.db.clone(),
            tree: self.tree.clone(),
            state: self.state.clone(),
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Replaces the state with the snapshot's and keeps the snapshot as the current one, in
    /// one atomic batch, flushed before returning.
    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let state: ControllerState = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), any(e)))?;
        let read_err = |e: sled::Error| StorageIOError::read_state_machine(any(e));
        let mut batch = sled::Batch::default();
        for prefix in [BROKER_PREFIX, TOPIC_PREFIX, PLUGIN_PREFIX, PIPELINE_PREFIX] {
            for kv in self.tree.scan_prefix(prefix) {
                batch.remove(kv.map_err(read_err)?.0);
            }
        }
        for b in state.brokers.values() {
            batch.insert(broker_key(b.id), to_json(b));
        }
        for t in state.topics.values() {
            batch.insert(topic_key(&t.name), to_json(t));
        }
        for p in state.plugins.values() {
            batch.insert(plugin_key(&p.id), to_json(p));
        }
        for p in state.pipelines.values() {
            batch.insert(pipeline_key(&p.name), to_json(p));
        }
        batch.insert(APPLIED, to_json(&meta.last_log_id));
        batch.insert(MEMBERSHIP, to_json(&meta.last_membership));
        batch.insert(LAST_TOPIC_ID, to_json(&state.last_topic_id));
        batch.insert(PIPELINE_DEPLOYS, to_json(&state.pipeline_deploys));
        store_snapshot(&self.tree, &self.snapshot_lock, meta, &data, Some(batch))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?;
        self.state = state;
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let read_err = |e: sled::Error| StorageIOError::read_snapshot(None, any(e));
        let _guard = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(meta) = self.tree.get(SNAPSHOT_META).map_err(read_err)? else {
            return Ok(None);
        };
        let meta: Meta = from_json(&meta, |e| StorageIOError::read_snapshot(None, e))?;
        let data = self
            .tree
            .get(SNAPSHOT_DATA)
            .map_err(read_err)?
            .map(|v| v.to_vec())
            .unwrap_or_default();
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Builds a snapshot from a copy of the state taken when the builder was made, so the state
/// machine keeps applying meanwhile.
pub struct ControllerSnapshotBuilder {
    db: Database,
    tree: sled::Tree,
    state: ControllerState,
    last_applied: Option<LogId<BrokerId>>,
    last_membership: Membership,
    snapshot_lock: Arc<Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for ControllerSnapshotBuilder {
    /// Serializes the state as JSON, stores it as the current snapshot and flushes before
    /// returning (openraft may purge the log up to it next).
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = to_json(&self.state);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let snapshot_id = match self.last_applied {
            Some(id) => format!("{}-{}-{nanos}", id.leader_id, id.index),
            None => format!("none-{nanos}"),
        };
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id,
        };
        store_snapshot(&self.tree, &self.snapshot_lock, &meta, &data, None)?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, Membership as RaftMembership};

    use super::*;
    use crate::cluster::types::{ControllerCommand, PartitionAssignment};

    /// A fresh store in its own temporary directory for every test of the suite.
    struct TempStoreBuilder;

    impl StoreBuilder<TypeConfig, ControllerLogStore, ControllerStateMachine, tempfile::TempDir>
        for TempStoreBuilder
    {
        async fn build(
            &self,
        ) -> StorageResult<(
            tempfile::TempDir,
            ControllerLogStore,
            ControllerStateMachine,
        )> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(any(e)))?;
            let (log, sm) =
                open(&dir.path().join("controller")).map_err(|e| StorageIOError::write(any(e)))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn passes_openraft_storage_suite() -> StorageResult<()> {
        Suite::test_all(TempStoreBuilder)
    }

    fn log_id(term: u64, index: u64) -> LogId<BrokerId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(term: u64, index: u64, cmd: ControllerCommand) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn commands() -> Vec<ControllerCommand> {
        let mut cmds = Vec::new();
        for id in 1..=3 {
            cmds.push(ControllerCommand::RegisterBroker {
                id,
                addr: format!("127.0.0.1:740{id}"),
                epoch: 1,
                empty_log: false,
            });
            cmds.push(ControllerCommand::UnfenceBroker { id });
        }
        cmds.push(ControllerCommand::CreateTopic {
            name: "orders".into(),
            topic_id: 1,
            partitions: vec![
                PartitionAssignment {
                    replicas: vec![1, 2, 3],
                },
                PartitionAssignment {
                    replicas: vec![2, 3, 1],
                },
            ],
            config: BTreeMap::from([("min.insync.replicas".into(), "2".into())]),
        });
        // Deployed twice and removed: only the count of deploys is left of it.
        let put = ControllerCommand::PutPipeline {
            name: "wc".into(),
            config_toml: "name = \"wc\"".into(),
            instances: 1,
            plugins: Vec::new(),
        };
        cmds.push(put.clone());
        cmds.push(put);
        cmds.push(ControllerCommand::RemovePipeline { name: "wc".into() });
        cmds.push(ControllerCommand::CreateTopic {
            name: "gone".into(),
            topic_id: 2,
            partitions: vec![PartitionAssignment { replicas: vec![3] }],
            config: BTreeMap::new(),
        });
        cmds.push(ControllerCommand::FenceBroker { id: 1 });
        cmds.push(ControllerCommand::DeleteTopic {
            name: "gone".into(),
        });
        cmds
    }

    /// Appends through the callback path and waits until openraft would have been told.
    async fn append_all(log: &mut ControllerLogStore, entries: Vec<Entry<TypeConfig>>) {
        use openraft::storage::RaftLogStorageExt;
        log.blocking_append(entries).await.unwrap();
    }

    #[tokio::test]
    async fn everything_is_there_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller");
        let membership = RaftMembership::new(vec![BTreeSet::from([1, 2, 3])], ());
        let mut entries = vec![Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Membership(membership.clone()),
        }];
        for (i, cmd) in commands().into_iter().enumerate() {
            entries.push(entry(1, i as u64 + 2, cmd));
        }
        let last = entries.last().unwrap().log_id;
        let vote = Vote::new_committed(1, 1);
        let (expected_state, responses) = {
            let (mut log, mut sm) = open(&path).unwrap();
            append_all(&mut log, entries.clone()).await;
            log.save_vote(&vote).await.unwrap();
            log.save_committed(Some(last)).await.unwrap();
            // Apply all but the last two, snapshot, apply the rest.
            let n = entries.len();
            let mut responses = sm.apply(entries[..n - 2].to_vec()).await.unwrap();
            let snap = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert_eq!(snap.meta.last_log_id, Some(entries[n - 3].log_id));
            responses.extend(sm.apply(entries[n - 2..].to_vec()).await.unwrap());
            log.purge(log_id(1, 3)).await.unwrap();
            (sm.state().clone(), responses)
        };
        assert!(responses
            .iter()
            .all(|r| !matches!(r, ControllerResponse::Refused(_))));
        assert_eq!(expected_state.topics.len(), 1);
        assert_eq!(expected_state.pipeline_deploys, 2);
        let orders = &expected_state.topics["orders"];
        assert_eq!(orders.partitions[0].leader, Some(2));
        assert_eq!(orders.partitions[0].leader_epoch, 1);

        let (mut log, mut sm) = open(&path).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), Some(last));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
        assert_eq!(state.last_log_id, Some(last));
        let read = log.try_get_log_entries(4..).await.unwrap();
        assert_eq!(read, entries[3..].to_vec());
        assert_eq!(*sm.state(), expected_state);
        let (applied, mem) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(last));
        assert_eq!(mem, StoredMembership::new(Some(log_id(1, 1)), membership));
        let snap = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(
            snap.meta.last_log_id,
            Some(entries[entries.len() - 3].log_id)
        );
        let snap_state: ControllerState = serde_json::from_slice(snap.snapshot.get_ref()).unwrap();
        assert_eq!(
            snap_state.topics.len(),
            2,
            "the snapshot predates the delete"
        );
    }

    #[tokio::test]
    async fn installed_snapshot_replaces_state_and_survives_reopen() {
        let leader_dir = tempfile::tempdir().unwrap();
        let (_, mut leader) = open(leader_dir.path()).unwrap();
        let entries: Vec<_> = commands()
            .into_iter()
            .enumerate()
            .map(|(i, c)| entry(2, i as u64 + 1, c))
            .collect();
        leader.apply(entries).await.unwrap();
        let snap = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        {
            let (_, mut follower) = open(dir.path()).unwrap();
            // Something the snapshot does not have, which must disappear.
            follower
                .apply([entry(
                    1,
                    1,
                    ControllerCommand::RegisterBroker {
                        id: 9,
                        addr: "old:9".into(),
                        epoch: 1,
                        empty_log: false,
                    },
                )])
                .await
                .unwrap();
            let mut rx = follower.begin_receiving_snapshot().await.unwrap();
            *rx = *snap.snapshot;
            follower.install_snapshot(&snap.meta, rx).await.unwrap();
            assert_eq!(follower.state(), leader.state());
        }
        let (_, mut follower) = open(dir.path()).unwrap();
        assert_eq!(follower.state(), leader.state());
        assert!(follower.state().broker(9).is_none());
        assert_eq!(
            follower.applied_state().await.unwrap().0,
            snap.meta.last_log_id
        );
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
    }
}
