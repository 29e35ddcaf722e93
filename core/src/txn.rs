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

use crate::group::{GroupService, GroupServiceError};
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
    groups: Arc<GroupService>,
    state: Mutex<BTreeMap<String, TxnState>>,
    /// One transaction request at a time per transactional id.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped whenever a transaction ends (wakes offset fetches waiting for it).
    ended: watch::Sender<u64>,
}

impl TxnCoordinator {
    /// Loads the stored state. Transactions caught mid-end are finished by
    /// [`TxnCoordinator::recover`].
    pub fn open(
        db: &sled::Db,
        topics: Arc<TopicRegistry>,
        flusher: Arc<Flusher>,
        groups: Arc<GroupService>,
    ) -> Result<Arc<TxnCoordinator>> {
        let tree = db
            .open_tree(TRANSACTIONS_TREE)
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        let mut state = BTreeMap::new();
        for item in tree.iter() {
            let (k, v) = item.map_err(|e| TxnError::Storage(e.to_string()))?;
            let id = String::from_utf8_lossy(&k).into_owned();
            match serde_json::from_slice::<TxnState>(&v) {
                Ok(s) => {
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
            state: Mutex::new(state),
            locks: Mutex::new(HashMap::new()),
            ended: watch::Sender::new(0),
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
        let bytes = serde_json::to_vec(s).map_err(|e| TxnError::Storage(e.to_string()))?;
        self.tree
            .insert(id.as_bytes(), bytes)
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        self.tree
            .flush()
            .map_err(|e| TxnError::Storage(e.to_string()))?;
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
            None => TxnState {
                producer_id: self.new_producer_id()?,
                epoch: 0,
                status: Status::Empty,
                timeout_ms,
                started_ms: 0,
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
        self.lock()
            .iter()
            .find(|(_, s)| s.producer_id == producer_id)
            .map(|(id, _)| id.clone())
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
        self.groups.check_commit(&commit).await?;
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
                self.groups.store_transactional(offsets).await?;
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
