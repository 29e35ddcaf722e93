//! The transaction coordinator (Kafka's KIP-98, on one broker): transactional ids, their
//! producer id and epoch, the partitions and group offsets of each open transaction, and how
//! a transaction ends. State lives in the sled tree `transactions` and is written before the
//! step it describes, so a crash mid-way is finished at the next start:
//!
//! 1. `InitTransactions`: a new id gets a producer id; a known one gets its epoch bumped
//!    (fencing the previous holder) after its open transaction, if any, is aborted.
//! 2. A transactional produce first registers its partition with the open transaction
//!    ([`TxnCoordinator::register_partition`]; a stale epoch is `ProducerFenced`).
//! 3. `TxnCommitOffsets` checks the group commit (member, generation, ownership) and keeps
//!    the offsets pending: `FetchOffsets` of those partitions waits until the transaction
//!    ends, so a new owner starts from the outcome, never from before it.
//! 4. `EndTxn` marks the transaction `PrepareCommit`/`PrepareAbort` (durable), writes a
//!    marker batch into each partition, stores the offsets on commit, and clears it.
//!
//! An open transaction older than its timeout is aborted by [`TxnCoordinator::run_ticker`],
//! with the epoch bumped so its producer is fenced.
//!
//! One broker owns every partition here, so the coordinator writes the markers itself; in a
//! cluster the markers go to each partition's leader (a later step of the cluster work).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use quiver_protocol::batch::{self, Marker};
use quiver_protocol::requests::{
    CommitOffsetsRequest, EndTxnRequest, EndTxnResponse, InitTransactionsRequest,
    InitTransactionsResponse, TopicPartition, TxnCommitOffsetsRequest, TxnCommitOffsetsResponse,
};
use quiver_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::group::{GroupDirectory, GroupServiceError};
use crate::log::{Flusher, LogError};
use crate::topic::{TopicError, TopicRegistry};

/// The sled tree of transaction state.
pub const TRANSACTIONS_TREE: &str = "transactions";
/// Producer ids the coordinator hands out have this bit set, apart from the random ids of
/// idempotent producers.
const PRODUCER_ID_BIT: i64 = 1 << 62;
/// Longest transaction timeout accepted.
const MAX_TIMEOUT_MS: u32 = 15 * 60 * 1000;
/// How long a marker write may take.
const MARKER_TIMEOUT: Duration = Duration::from_secs(30);
/// A transactional id with no transaction open and no use for this long is forgotten
/// (Kafka's `transactional.id.expiration.ms`, 7 days).
const ID_EXPIRATION_MS: i64 = 7 * 24 * 3600 * 1000;
/// Most transactional ids one broker keeps: past it, new ids are refused (until old ones
/// expire), so a client cannot grow the coordinator's memory without bound.
pub const MAX_TRANSACTIONAL_IDS: usize = 100_000;

/// Why a transaction request failed.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// A newer producer holds the id (or the producer id is unknown).
    #[error("{0}")]
    Fenced(String),
    /// The request does not fit the transaction's state.
    #[error("{0}")]
    State(String),
    /// The group refused the offsets.
    #[error(transparent)]
    Group(#[from] GroupServiceError),
    /// Writing a marker failed.
    #[error("writing a transaction marker failed: {0}")]
    Log(#[from] LogError),
    /// A partition of the transaction is gone.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The state could not be stored.
    #[error("transaction state storage: {0}")]
    Storage(String),
}

impl TxnError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            TxnError::Fenced(_) => ErrorCode::ProducerFenced,
            TxnError::State(_) => ErrorCode::InvalidTxnState,
            TxnError::Group(e) => e.code(),
            TxnError::Log(e) => e.code(),
            TxnError::Topic(e) => e.code(),
            TxnError::Storage(_) => ErrorCode::StorageError,
        }
    }
}

type Result<T> = std::result::Result<T, TxnError>;

/// Where a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    /// No transaction open.
    Empty,
    /// Open: batches or offsets were added.
    Ongoing,
    /// Committing: markers and offsets are being written.
    PrepareCommit,
    /// Aborting: markers are being written.
    PrepareAbort,
}

/// One transactional id's state, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TxnState {
    producer_id: i64,
    epoch: i16,
    status: Status,
    timeout_ms: u32,
    /// When the open transaction started (ms since the epoch).
    started_ms: i64,
    /// Last request for this id (ms since the epoch); idle ids expire.
    #[serde(default)]
    last_used_ms: i64,
    partitions: BTreeSet<(String, u32)>,
    /// Group offsets to store on commit.
    offsets: Vec<CommitOffsetsRequest>,
}

/// Runs every transaction of this broker.
pub struct TxnCoordinator {
    db: sled::Db,
    tree: sled::Tree,
    topics: Arc<TopicRegistry>,
    flusher: Arc<Flusher>,
    groups: Arc<GroupDirectory>,
    state: Mutex<BTreeMap<String, TxnState>>,
    /// Producer id → transactional id, so a transactional produce finds its transaction
    /// without scanning every id.
    by_pid: Mutex<HashMap<i64, String>>,
    /// One transaction request at a time per transactional id.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped whenever a transaction ends (wakes offset fetches waiting for it).
    ended: watch::Sender<u64>,
    /// Most transactional ids kept ([`MAX_TRANSACTIONAL_IDS`]).
    max_ids: usize,
}

impl TxnCoordinator {
    /// Loads the stored state. Transactions caught mid-end are finished by
    /// [`TxnCoordinator::recover`].
    pub fn open(
        db: &sled::Db,
        topics: Arc<TopicRegistry>,
        flusher: Arc<Flusher>,
        groups: Arc<GroupDirectory>,
    ) -> Result<Arc<TxnCoordinator>> {
        Self::open_with_limit(db, topics, flusher, groups, MAX_TRANSACTIONAL_IDS)
    }

    /// [`open`](Self::open) keeping at most `max_ids` transactional ids.
    pub fn open_with_limit(
        db: &sled::Db,
        topics: Arc<TopicRegistry>,
        flusher: Arc<Flusher>,
        groups: Arc<GroupDirectory>,
        max_ids: usize,
    ) -> Result<Arc<TxnCoordinator>> {
        let tree = db
            .open_tree(TRANSACTIONS_TREE)
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        let mut state = BTreeMap::new();
        for item in tree.iter() {
            let (k, v) = item.map_err(|e| TxnError::Storage(e.to_string()))?;
            let id = String::from_utf8_lossy(&k).into_owned();
            match serde_json::from_slice::<TxnState>(&v) {
                Ok(mut s) => {
                    if s.last_used_ms == 0 {
                        s.last_used_ms = crate::clock::now_ms();
                    }
                    state.insert(id, s);
                }
                Err(e) => {
                    tracing::error!(transactional_id = %id, error = %e, "stored transaction state does not decode; dropped");
                }
            }
        }
        Ok(Arc::new(TxnCoordinator {
            db: db.clone(),
            tree,
            topics,
            flusher,
            groups,
            by_pid: Mutex::new(
                state
                    .iter()
                    .map(|(id, s)| (s.producer_id, id.clone()))
                    .collect(),
            ),
            state: Mutex::new(state),
            locks: Mutex::new(HashMap::new()),
            ended: watch::Sender::new(0),
            max_ids,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, TxnState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn lock_id(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    fn store(&self, id: &str, s: &TxnState) -> Result<()> {
        let mut s = s.clone();
        s.last_used_ms = crate::clock::now_ms();
        let s = &s;
        let bytes = serde_json::to_vec(s).map_err(|e| TxnError::Storage(e.to_string()))?;
        self.tree
            .insert(id.as_bytes(), bytes)
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        self.tree
            .flush()
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.producer_id, id.to_string());
        self.lock().insert(id.to_string(), s.clone());
        Ok(())
    }

    fn get(&self, id: &str) -> Option<TxnState> {
        self.lock().get(id).cloned()
    }

    /// Checks that `producer_id`/`epoch` holds `id` now.
    fn current(&self, id: &str, producer_id: i64, epoch: i16) -> Result<TxnState> {
        let s = self.get(id).ok_or_else(|| {
            TxnError::Fenced(format!(
                "transactional id {id:?} is not initialised; call InitTransactions first"
            ))
        })?;
        if s.producer_id != producer_id || s.epoch != epoch {
            return Err(TxnError::Fenced(format!(
                "transactional id {id:?} is held by producer {} epoch {}; this producer ({producer_id}, epoch {epoch}) is fenced and must stop",
                s.producer_id, s.epoch
            )));
        }
        Ok(s)
    }

    /// InitTransactions.
    pub async fn init(&self, req: &InitTransactionsRequest) -> Result<InitTransactionsResponse> {
        let id = &req.transactional_id;
        if id.is_empty() || id.len() > 249 {
            return Err(TxnError::State(
                "a transactional id must be 1 to 249 bytes".into(),
            ));
        }
        let _one = self.lock_id(id).await;
        let timeout_ms = req.timeout_ms.clamp(1000, MAX_TIMEOUT_MS);
        let next = match self.get(id) {
            Some(mut s) => {
                if s.status != Status::Empty {
                    // The previous holder's transaction never ended: abort it first.
                    self.finish(id, &mut s, false).await?;
                }
                if s.epoch == i16::MAX {
                    s.producer_id = self.new_producer_id()?;
                    s.epoch = 0;
                } else {
                    s.epoch += 1;
                }
                s.timeout_ms = timeout_ms;
                s
            }
            None if self.lock().len() >= self.max_ids => {
                return Err(TxnError::State(format!(
                    "this broker already keeps {} transactional ids; reuse an id (one per producer, stable across restarts) or wait until idle ones expire (7 days)",
                    self.max_ids
                )))
            }
            None => TxnState {
                producer_id: self.new_producer_id()?,
                epoch: 0,
                status: Status::Empty,
                timeout_ms,
                started_ms: 0,
                last_used_ms: 0,
                partitions: BTreeSet::new(),
                offsets: Vec::new(),
            },
        };
        self.store(id, &next)?;
        tracing::info!(transactional_id = %id, producer_id = next.producer_id, epoch = next.epoch, "transactions initialised");
        Ok(InitTransactionsResponse {
            producer_id: next.producer_id,
            producer_epoch: next.epoch,
        })
    }

    fn new_producer_id(&self) -> Result<i64> {
        let n = self
            .db
            .generate_id()
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        Ok(PRODUCER_ID_BIT | (n as i64 & (PRODUCER_ID_BIT - 1)))
    }

    fn id_of(&self, producer_id: i64) -> Option<String> {
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&producer_id)
            .cloned()
    }

    /// Before a transactional batch of `producer_id`/`epoch` is appended to `topic`/
    /// `partition`: opens the transaction if needed and records the partition.
    pub async fn register_partition(
        &self,
        producer_id: i64,
        epoch: i16,
        topic: &str,
        partition: u32,
    ) -> Result<()> {
        let id = self.id_of(producer_id).ok_or_else(|| {
            TxnError::Fenced(format!(
                "producer id {producer_id} holds no transactional id; call InitTransactions first"
            ))
        })?;
        let _one = self.lock_id(&id).await;
        let mut s = self.current(&id, producer_id, epoch)?;
        let tp = (topic.to_string(), partition);
        match s.status {
            Status::Ongoing if s.partitions.contains(&tp) => return Ok(()),
            Status::PrepareCommit | Status::PrepareAbort => {
                return Err(TxnError::State(format!(
                    "the transaction of {id:?} is ending; write after EndTxn answers"
                )))
            }
            Status::Empty => {
                s.status = Status::Ongoing;
                s.started_ms = crate::clock::now_ms();
            }
            Status::Ongoing => {}
        }
        s.partitions.insert(tp);
        self.store(&id, &s)
    }

    /// TxnCommitOffsets.
    pub async fn commit_offsets(
        &self,
        req: &TxnCommitOffsetsRequest,
    ) -> Result<TxnCommitOffsetsResponse> {
        let id = &req.transactional_id;
        let _one = self.lock_id(id).await;
        let mut s = self.current(id, req.producer_id, req.producer_epoch)?;
        if matches!(s.status, Status::PrepareCommit | Status::PrepareAbort) {
            return Err(TxnError::State(format!(
                "the transaction of {id:?} is ending"
            )));
        }
        let commit = CommitOffsetsRequest {
            group: req.group.clone(),
            member_id: req.member_id.clone(),
            generation: req.generation,
            offsets: req.offsets.clone(),
        };
        self.groups
            .for_group(&commit.group)?
            .check_commit(&commit)
            .await?;
        if s.status == Status::Empty {
            s.status = Status::Ongoing;
            s.started_ms = crate::clock::now_ms();
        }
        s.offsets.push(commit);
        let pending = s.offsets.iter().map(|c| c.offsets.len() as u32).sum();
        self.store(id, &s)?;
        Ok(TxnCommitOffsetsResponse { pending })
    }

    /// EndTxn.
    pub async fn end(&self, req: &EndTxnRequest) -> Result<EndTxnResponse> {
        let id = &req.transactional_id;
        let _one = self.lock_id(id).await;
        let mut s = self.current(id, req.producer_id, req.producer_epoch)?;
        let partitions = s.partitions.len() as u32;
        self.finish(id, &mut s, req.commit).await?;
        Ok(EndTxnResponse {
            partitions,
            committed: req.commit,
        })
    }

    /// Ends the open transaction of `id` (the caller holds its lock): durable intent,
    /// markers, offsets on commit, cleared state.
    async fn finish(&self, id: &str, s: &mut TxnState, commit: bool) -> Result<()> {
        match (s.status, commit) {
            (Status::Empty, _) => return Ok(()),
            (Status::PrepareCommit, false) | (Status::PrepareAbort, true) => {
                return Err(TxnError::State(format!(
                    "the transaction of {id:?} is already being {}",
                    if commit { "aborted" } else { "committed" }
                )))
            }
            _ => {}
        }
        s.status = if commit {
            Status::PrepareCommit
        } else {
            Status::PrepareAbort
        };
        self.store(id, s)?;
        let marker = if commit {
            Marker::Commit
        } else {
            Marker::Abort
        };
        for (topic, partition) in &s.partitions {
            let (t, log) = match self.topics.partition(topic, *partition) {
                Ok(p) => p,
                Err(e) => {
                    // A deleted topic has nothing left to mark.
                    tracing::warn!(transactional_id = %id, %topic, partition, error = %e, "no marker for a partition that is gone");
                    continue;
                }
            };
            let raw = batch::control_batch(s.producer_id, s.epoch, marker, crate::clock::now_ms());
            let header = batch::validate(&raw, usize::MAX).map_err(LogError::InvalidBatch)?;
            log.append(
                vec![(raw, header)],
                &t.config(),
                &self.flusher,
                MARKER_TIMEOUT,
            )
            .await?;
        }
        if commit {
            for offsets in &s.offsets {
                self.groups
                    .for_group(&offsets.group)?
                    .store_transactional(offsets)
                    .await?;
            }
        }
        s.status = Status::Empty;
        s.partitions.clear();
        s.offsets.clear();
        self.store(id, s)?;
        self.ended.send_modify(|n| *n += 1);
        tracing::debug!(transactional_id = %id, commit, "transaction ended");
        Ok(())
    }

    /// Finishes transactions a crash caught between their intent and their end.
    pub async fn recover(&self) {
        let ending: Vec<(String, bool)> = self
            .lock()
            .iter()
            .filter_map(|(id, s)| match s.status {
                Status::PrepareCommit => Some((id.clone(), true)),
                Status::PrepareAbort => Some((id.clone(), false)),
                _ => None,
            })
            .collect();
        for (id, commit) in ending {
            let _one = self.lock_id(&id).await;
            let Some(mut s) = self.get(&id) else { continue };
            match self.finish(&id, &mut s, commit).await {
                Ok(()) => {
                    tracing::info!(transactional_id = %id, commit, "finished a transaction interrupted by a restart")
                }
                Err(e) => {
                    tracing::error!(transactional_id = %id, error = %e, "cannot finish an interrupted transaction")
                }
            }
        }
    }

    /// True while an open transaction holds offsets of `group` for one of `partitions`.
    pub fn has_pending_offsets(&self, group: &str, partitions: Option<&[TopicPartition]>) -> bool {
        self.lock().values().any(|s| {
            s.offsets.iter().any(|c| {
                c.group == group
                    && c.offsets.iter().any(|o| {
                        partitions.is_none_or(|ps| {
                            ps.iter()
                                .any(|tp| tp.topic == o.topic && tp.partition == o.partition)
                        })
                    })
            })
        })
    }

    /// Waits until no open transaction holds offsets of `group` for `partitions`, at most
    /// `limit`; false when some still do.
    pub async fn wait_for_offsets(
        &self,
        group: &str,
        partitions: Option<&[TopicPartition]>,
        limit: Duration,
    ) -> bool {
        let mut rx = self.ended.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if !self.has_pending_offsets(group, partitions) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Forgets ids with no open transaction and no request for [`ID_EXPIRATION_MS`].
    fn expire_idle(&self, now: i64) {
        let idle: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, s)| {
                s.status == Status::Empty && now.saturating_sub(s.last_used_ms) > ID_EXPIRATION_MS
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            if let Err(e) = self.tree.remove(id.as_bytes()) {
                tracing::warn!(transactional_id = %id, error = %e, "cannot forget an idle transactional id");
                continue;
            }
            if let Some(s) = self.lock().remove(&id) {
                self.by_pid
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&s.producer_id);
            }
            tracing::debug!(transactional_id = %id, "idle transactional id forgotten");
        }
    }

    /// Aborts (and fences) transactions open longer than their timeout, until `stop`.
    pub async fn run_ticker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        self.recover().await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = crate::clock::now_ms();
            self.expire_idle(now);
            let expired: Vec<String> = self
                .lock()
                .iter()
                .filter(|(_, s)| {
                    s.status == Status::Ongoing
                        && now.saturating_sub(s.started_ms) > i64::from(s.timeout_ms)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                let _one = self.lock_id(&id).await;
                let Some(mut s) = self.get(&id) else { continue };
                if s.status != Status::Ongoing {
                    continue;
                }
                tracing::warn!(transactional_id = %id, producer_id = s.producer_id, "transaction timed out; aborting it and fencing its producer");
                if let Err(e) = self.finish(&id, &mut s, false).await {
                    tracing::error!(transactional_id = %id, error = %e, "cannot abort a timed-out transaction");
                    continue;
                }
                s.epoch = s.epoch.saturating_add(1);
                if let Err(e) = self.store(&id, &s) {
                    tracing::error!(transactional_id = %id, error = %e, "cannot fence a timed-out producer");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicConfig;

    async fn coordinator(max_ids: usize) -> (tempfile::TempDir, Arc<TxnCoordinator>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let topics = Arc::new(TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap());
        let flusher = Flusher::new(db.clone());
        let groups = crate::group::GroupDirectory::lone(
            crate::group::GroupService::open(topics.clone(), flusher.clone(), 1 << 20).unwrap(),
        );
        let c = TxnCoordinator::open_with_limit(&db, topics, flusher, groups, max_ids).unwrap();
        (dir, c)
    }

    fn init(id: &str) -> InitTransactionsRequest {
        InitTransactionsRequest {
            transactional_id: id.into(),
            timeout_ms: 60_000,
        }
    }

    #[tokio::test]
    async fn a_second_init_fences_the_first_epoch() {
        let (_d, c) = coordinator(10).await;
        let a = c.init(&init("app")).await.unwrap();
        let b = c.init(&init("app")).await.unwrap();
        assert_eq!(a.producer_id, b.producer_id);
        assert_eq!(b.producer_epoch, a.producer_epoch + 1);
        let e = c
            .register_partition(a.producer_id, a.producer_epoch, "t", 0)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProducerFenced, "{e}");
        let e = c.register_partition(12345, 0, "t", 0).await.unwrap_err();
        assert_eq!(
            e.code(),
            ErrorCode::ProducerFenced,
            "an unknown producer id: {e}"
        );
        let e = c
            .end(&EndTxnRequest {
                transactional_id: "nobody".into(),
                producer_id: b.producer_id,
                producer_epoch: b.producer_epoch,
                commit: true,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProducerFenced, "{e}");
    }

    #[tokio::test]
    async fn ids_are_capped_and_idle_ones_expire() {
        let (_d, c) = coordinator(2).await;
        c.init(&init("a")).await.unwrap();
        c.init(&init("b")).await.unwrap();
        let e = c.init(&init("c")).await.unwrap_err();
        assert!(
            e.to_string().contains("already keeps 2 transactional ids"),
            "{e}"
        );
        // Known ids still work.
        c.init(&init("a")).await.unwrap();
        // "b" has an open transaction: it never expires while open; "a" is idle.
        let b = c.get("b").unwrap();
        c.register_partition(b.producer_id, b.epoch, "t", 0)
            .await
            .unwrap();
        c.expire_idle(crate::clock::now_ms() + ID_EXPIRATION_MS + 1);
        assert!(c.get("a").is_none(), "the idle id is forgotten");
        assert!(c.get("b").is_some(), "an open transaction keeps its id");
        c.init(&init("c")).await.unwrap();
    }
}
