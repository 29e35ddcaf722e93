//! The transaction coordinator (Kafka's KIP-98): transactional ids, their producer id and
//! epoch, the partitions of each open transaction, and how a transaction ends.
//!
//! A transactional id is coordinated by the leader of the `__consumer_offsets` partition it
//! hashes to (as a group is; a lone broker coordinates every id), and its state is a record
//! of that partition, written (acks=all in a cluster) before the step it describes. So the
//! partition's next leader replays it and finishes what a crash or failover interrupted:
//!
//! 1. `InitTransactions`: a new id gets a producer id; a known one gets its epoch bumped
//!    (fencing the previous holder) after its open transaction, if any, is aborted.
//! 2. `AddPartitionsToTxn`: before its first write to a partition in a transaction, the
//!    producer adds it here (a stale epoch is `ProducerFenced`). A lone broker also
//!    registers a transactional produce's partition itself.
//! 3. `TxnCommitOffsets` goes to the group's coordinator (see
//!    [`GroupService::txn_commit`](crate::group::GroupService::txn_commit)), which holds the
//!    offsets until the marker; the producer adds the group's offsets partition first.
//! 4. `EndTxn` marks the transaction `PrepareCommit`/`PrepareAbort` (durable), has each
//!    partition's leader append the marker ([`markers`]), and clears it.
//!
//! An open transaction older than its timeout is aborted by [`TxnCoordinator::run_ticker`],
//! with the epoch bumped so its producer is fenced; the ticker also finishes prepared
//! transactions whose markers could not all be written yet.

pub mod janitor;
pub mod markers;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use quiver_protocol::batch::Marker;
use quiver_protocol::requests::{
    AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, EndTxnRequest, EndTxnResponse,
    InitTransactionsRequest, InitTransactionsResponse, VerifyTxnPartitionRequest,
    VerifyTxnPartitionResponse,
};
use quiver_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use markers::{MarkerWriter, TxnMarker};

use crate::group::{GroupService, GroupServiceError, OFFSETS_TOPIC};
use crate::keyed_locks::KeyedLocks;
use crate::log::LogError;
use crate::topic::TopicError;

/// The sled tree where a lone broker kept transaction state before it moved into
/// `__consumer_offsets` (read once, then emptied).
pub const LEGACY_TRANSACTIONS_TREE: &str = "transactions";
/// Producer ids the coordinator hands out have this bit set, apart from the random ids of
/// idempotent producers (which stay below it).
const PRODUCER_ID_BIT: i64 = quiver_protocol::batch::COORDINATOR_PRODUCER_ID_BIT;
/// Longest transaction timeout accepted.
const MAX_TIMEOUT_MS: u32 = 15 * 60 * 1000;
/// A transactional id with no transaction open and no use for this long is forgotten
/// (Kafka's `transactional.id.expiration.ms`, 7 days).
const ID_EXPIRATION_MS: i64 = 7 * 24 * 3600 * 1000;
/// Prepared transactions a coordinator finishes at once (each writes its markers to all
/// its partitions at once).
const PREPARED_IN_PARALLEL: usize = 16;
/// Most transactional ids one coordinator keeps: past it, new ids are refused (until old
/// ones expire), so a client cannot grow the coordinator's memory without bound.
pub const MAX_TRANSACTIONAL_IDS: usize = 100_000;
/// A transaction still open this long after it began can be none any coordinator knows
/// (they abort at their timeout, 15 min at most): partitions abort it themselves.
pub const ABANDONED_TXN_MS: i64 = 20 * 60 * 1000;
/// Most partitions one transaction may write.
pub const MAX_TXN_PARTITIONS: usize = 10_000;

/// Why a transaction request failed.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// A newer producer holds the id (or the producer id is unknown).
    #[error("{0}")]
    Fenced(String),
    /// The request does not fit the transaction's state.
    #[error("{0}")]
    State(String),
    /// The group refused the offsets, or its partition could not store state.
    #[error(transparent)]
    Group(#[from] GroupServiceError),
    /// Writing a marker failed.
    #[error("writing a transaction marker failed: {0}")]
    Log(#[from] LogError),
    /// A partition of the transaction is gone.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// A partition's leader or a coordinator on another broker could not be reached, or
    /// refused (a marker not taken yet, a batch not verified).
    #[error("{reason}")]
    Route { code: ErrorCode, reason: String },
    /// The state could not be stored.
    #[error("transaction state storage: {0}")]
    Storage(String),
    /// This broker does not coordinate the id (a cluster: the leader of its partition of
    /// `__consumer_offsets` does).
    #[error("this broker is not the coordinator of transactional id {id:?} (partition {partition} of __consumer_offsets); refresh metadata and ask its leader")]
    NotCoordinator { id: String, partition: u32 },
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
            TxnError::Route { code, .. } => *code,
            TxnError::Storage(_) => ErrorCode::StorageError,
            TxnError::NotCoordinator { .. } => ErrorCode::NotLeader,
        }
    }
}

type Result<T> = std::result::Result<T, TxnError>;

/// Hands out producer ids unique in the cluster: the coordinator's offsets partition in
/// bits 48–55 (so a partition leader knows whom to ask about a transactional batch), this
/// broker's id in bits 32–47 and a number from its sled counter below.
pub struct ProducerIds {
    db: sled::Db,
    broker: u32,
}

impl ProducerIds {
    /// Ids of broker `broker`, counted in `db`.
    pub fn new(db: sled::Db, broker: u32) -> ProducerIds {
        ProducerIds { db, broker }
    }

    fn next(&self, partition: u32) -> Result<i64> {
        let n = self
            .db
            .generate_id()
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        Ok(PRODUCER_ID_BIT
            | (i64::from(partition & 0xff) << 48)
            | (i64::from(self.broker & 0xffff) << 32)
            | (n as i64 & 0xffff_ffff))
    }
}

/// The `__consumer_offsets` partition whose coordinator issued `producer_id` (`None`: no
/// coordinator did, e.g. an idempotent producer's own id).
pub fn coordinator_partition_of(producer_id: i64) -> Option<u32> {
    (producer_id >= 0 && producer_id & PRODUCER_ID_BIT != 0)
        .then_some(((producer_id >> 48) & 0xff) as u32)
}

/// What every transaction coordinator of a broker shares.
pub struct TxnEnv {
    /// Writes markers through partition leaders.
    pub markers: Arc<MarkerWriter>,
    /// Producer ids.
    pub ids: ProducerIds,
    /// Most transactional ids one coordinator keeps.
    pub max_ids: usize,
}

/// Where a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    /// No transaction open.
    Empty,
    /// Open: partitions were added.
    Ongoing,
    /// Committing: markers are being written.
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
    /// How the last transaction ended (true: committed), until the next one opens: a
    /// retried EndTxn is answered from it, and one asking for the other outcome is refused.
    #[serde(default)]
    last_commit: Option<bool>,
    /// The epoch whose transaction the coordinator aborted past its timeout (fencing it),
    /// until the id is initialised again: its producer may take the id back by naming it
    /// (KIP-588), where one fenced by another producer's init may not.
    #[serde(default)]
    timed_out_epoch: Option<i16>,
}

/// A transactional id's state as a lone broker stored it before it moved into
/// `__consumer_offsets`: with the group offsets of the open transaction.
#[derive(Deserialize)]
struct LegacyTxnState {
    #[serde(flatten)]
    state: TxnState,
    #[serde(default)]
    offsets: Vec<quiver_protocol::requests::CommitOffsetsRequest>,
}

/// The transaction coordinator of one `__consumer_offsets` partition (a lone broker's of
/// every transactional id).
pub struct TxnCoordinator {
    /// The offsets partition holding the state.
    store: Arc<GroupService>,
    env: Arc<TxnEnv>,
    state: Mutex<BTreeMap<String, TxnState>>,
    /// Producer id → transactional id, so a transactional produce finds its transaction
    /// without scanning every id.
    by_pid: Mutex<HashMap<i64, String>>,
    /// One transaction request at a time per transactional id.
    locks: KeyedLocks<String>,
}

impl TxnCoordinator {
    /// The coordinator of the ids whose state `store`'s partition holds (`states`, as
    /// replayed). Transactions caught mid-end are finished by the ticker's first pass.
    pub fn new(
        store: Arc<GroupService>,
        states: BTreeMap<String, Vec<u8>>,
        env: Arc<TxnEnv>,
    ) -> Arc<TxnCoordinator> {
        let mut state = BTreeMap::new();
        for (id, v) in states {
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
        Arc::new(TxnCoordinator {
            store,
            env,
            by_pid: Mutex::new(
                state
                    .iter()
                    .map(|(id, s)| (s.producer_id, id.clone()))
                    .collect(),
            ),
            state: Mutex::new(state),
            locks: KeyedLocks::default(),
        })
    }

    /// A lone broker that kept transaction state in the sled tree
    /// [`LEGACY_TRANSACTIONS_TREE`] moves it into the offsets partition, then empties the
    /// tree.
    pub async fn adopt_legacy(&self, db: &sled::Db) -> Result<usize> {
        let tree = db
            .open_tree(LEGACY_TRANSACTIONS_TREE)
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        let mut moved = 0;
        for item in tree.iter() {
            let (k, v) = item.map_err(|e| TxnError::Storage(e.to_string()))?;
            let id = String::from_utf8_lossy(&k).into_owned();
            if self.get(&id).is_some() {
                continue;
            }
            match serde_json::from_slice::<LegacyTxnState>(&v) {
                Ok(LegacyTxnState { mut state, offsets }) => {
                    match state.status {
                        // Decided: its offsets are stored now, its markers by the ticker.
                        Status::PrepareCommit => {
                            for o in &offsets {
                                self.store.store_offsets(o).await?;
                            }
                        }
                        // Its offsets were never added to the offsets partition's
                        // transaction: abort it rather than commit without them.
                        Status::Ongoing if !offsets.is_empty() => {
                            state.status = Status::PrepareAbort;
                        }
                        _ => {}
                    }
                    self.store(&id, &state).await?;
                    moved += 1;
                }
                Err(e) => {
                    tracing::error!(transactional_id = %id, error = %e, "stored transaction state does not decode; dropped")
                }
            }
        }
        tree.clear().map_err(|e| TxnError::Storage(e.to_string()))?;
        Ok(moved)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, TxnState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn lock_id(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.locks.lock(id).await
    }

    /// Stores `s` as `id`'s state (durably; in a cluster on the in-sync replicas), then
    /// makes it current.
    async fn store(&self, id: &str, s: &TxnState) -> Result<()> {
        let mut s = s.clone();
        s.last_used_ms = crate::clock::now_ms();
        let bytes = serde_json::to_vec(&s).map_err(|e| TxnError::Storage(e.to_string()))?;
        self.store.persist_txn_state(id, bytes).await?;
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.producer_id, id.to_string());
        self.lock().insert(id.to_string(), s);
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
        let current = self.get(id);
        if let Some((producer_id, epoch)) = req.held {
            check_held(id, current.as_ref(), producer_id, epoch)?;
        }
        let next = match current {
            Some(mut s) => {
                if s.status != Status::Empty {
                    // The previous holder's transaction never ended: abort it first, at a
                    // bumped epoch so its batches still in flight are fenced where the
                    // markers land (one already prepared to commit is finished as a
                    // commit: its outcome is decided).
                    if s.status == Status::Ongoing {
                        bump_in_place(&mut s);
                    }
                    let commit = s.status == Status::PrepareCommit;
                    self.finish(id, &mut s, commit).await?;
                }
                // The last epoch is never handed out: a transaction of the last one given
                // must still be fenceable by a bump when it times out.
                if s.epoch >= i16::MAX - 1 {
                    s.producer_id = self.env.ids.next(self.store.partition())?;
                    s.epoch = 0;
                } else {
                    s.epoch += 1;
                }
                s.timeout_ms = timeout_ms;
                s.last_commit = None;
                s.timed_out_epoch = None;
                s
            }
            None if self.lock().len() >= self.env.max_ids => {
                return Err(TxnError::State(format!(
                    "this coordinator already keeps {} transactional ids; reuse an id (one per producer, stable across restarts) or wait until idle ones expire (7 days)",
                    self.env.max_ids
                )))
            }
            None => TxnState {
                producer_id: self.env.ids.next(self.store.partition())?,
                epoch: 0,
                status: Status::Empty,
                timeout_ms,
                started_ms: 0,
                last_used_ms: 0,
                partitions: BTreeSet::new(),
                last_commit: None,
                timed_out_epoch: None,
            },
        };
        self.store(id, &next).await?;
        tracing::info!(transactional_id = %id, producer_id = next.producer_id, epoch = next.epoch, "transactions initialised");
        Ok(InitTransactionsResponse {
            producer_id: next.producer_id,
            producer_epoch: next.epoch,
        })
    }

    fn id_of(&self, producer_id: i64) -> Option<String> {
        self.by_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&producer_id)
            .cloned()
    }

    /// AddPartitionsToTxn: opens the transaction if needed and records the partitions (the
    /// caller checked that they exist).
    pub async fn add_partitions(
        &self,
        req: &AddPartitionsToTxnRequest,
    ) -> Result<AddPartitionsToTxnResponse> {
        let id = &req.transactional_id;
        let _one = self.lock_id(id).await;
        let s = self.current(id, req.producer_id, req.producer_epoch)?;
        let tps: Vec<(String, u32)> = req
            .partitions
            .iter()
            .map(|tp| (tp.topic.clone(), tp.partition))
            .collect();
        let s = self.add_locked(id, s, tps).await?;
        Ok(AddPartitionsToTxnResponse {
            partitions: s.partitions.len() as u32,
        })
    }

    /// Adds `tps` to `id`'s transaction (the caller holds its lock and checked its epoch).
    async fn add_locked(
        &self,
        id: &str,
        mut s: TxnState,
        tps: Vec<(String, u32)>,
    ) -> Result<TxnState> {
        match s.status {
            Status::Ongoing if tps.iter().all(|tp| s.partitions.contains(tp)) => return Ok(s),
            Status::PrepareCommit | Status::PrepareAbort => {
                return Err(TxnError::State(format!(
                    "the transaction of {id:?} is ending; write after EndTxn answers"
                )))
            }
            Status::Empty => {
                s.status = Status::Ongoing;
                s.started_ms = crate::clock::now_ms();
                s.last_commit = None;
            }
            Status::Ongoing => {}
        }
        s.partitions.extend(tps);
        if s.partitions.len() > MAX_TXN_PARTITIONS {
            return Err(TxnError::State(format!(
                "a transaction may write at most {MAX_TXN_PARTITIONS} partitions; commit more often"
            )));
        }
        self.store(id, &s).await?;
        Ok(s)
    }

    /// A lone broker, before a transactional batch of `producer_id`/`epoch` is appended to
    /// `topic`/`partition`: opens the transaction if needed and records the partition.
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
        let s = self.current(&id, producer_id, epoch)?;
        self.add_locked(&id, s, vec![(topic.to_string(), partition)])
            .await
            .map(drop)
    }

    /// VerifyTxnPartition: the batch's producer holds its id at this epoch, and its open
    /// transaction (or, with `include_ending`, one whose markers are being written) added
    /// the partition.
    pub fn verify(&self, req: &VerifyTxnPartitionRequest) -> Result<VerifyTxnPartitionResponse> {
        let id = self.id_of(req.producer_id).ok_or_else(|| {
            TxnError::Fenced(format!(
                "producer id {} holds no transactional id; call InitTransactions first",
                req.producer_id
            ))
        })?;
        let s = self.current(&id, req.producer_id, req.producer_epoch)?;
        let tp = (req.topic.clone(), req.partition);
        let ending = matches!(s.status, Status::PrepareCommit | Status::PrepareAbort);
        let holds = s.status == Status::Ongoing || (req.include_ending && ending);
        if !holds || !s.partitions.contains(&tp) {
            return Err(TxnError::State(format!(
                "{}/{} is not part of an open transaction of {id:?}; add it first (AddPartitionsToTxn)",
                req.topic, req.partition
            )));
        }
        Ok(VerifyTxnPartitionResponse {
            transactional_id: id,
        })
    }

    /// EndTxn.
    pub async fn end(&self, req: &EndTxnRequest) -> Result<EndTxnResponse> {
        let id = &req.transactional_id;
        let _one = self.lock_id(id).await;
        let mut s = self.current(id, req.producer_id, req.producer_epoch)?;
        if s.status == Status::Empty && s.last_commit.is_some_and(|c| c != req.commit) {
            // A retried EndTxn whose transaction ended the other way (its coordinator
            // failed over mid-way and the transaction was aborted).
            return Err(TxnError::State(format!(
                "the last transaction of {id:?} was {}; nothing is open to {}",
                if req.commit { "aborted" } else { "committed" },
                if req.commit { "commit" } else { "abort" }
            )));
        }
        let partitions = s.partitions.len() as u32;
        self.finish(id, &mut s, req.commit).await?;
        Ok(EndTxnResponse {
            partitions,
            committed: req.commit,
        })
    }

    /// Ends the open transaction of `id` (the caller holds its lock): durable intent,
    /// a marker in every partition (offsets partitions resolve the offsets), cleared state.
    async fn finish(&self, id: &str, s: &mut TxnState, commit: bool) -> Result<()> {
        match (s.status, commit) {
            (Status::Empty, _) => return Ok(()),
            (Status::PrepareCommit, false) | (Status::PrepareAbort, true) => {
                return Err(TxnError::State(format!(
                    "the transaction of {id:?} is already being {}",
                    if commit { "aborted" } else { "committed" }
                )))
            }
            (Status::Ongoing, _) => {
                s.status = if commit {
                    Status::PrepareCommit
                } else {
                    Status::PrepareAbort
                };
                self.store(id, s).await?;
            }
            _ => {}
        }
        let marker = if commit {
            Marker::Commit
        } else {
            Marker::Abort
        };
        // Every partition at once. A failure leaves the transaction prepared with only the
        // partitions still lacking their marker, and the ticker (or the producer's retry)
        // writes those again.
        let coordinating = || self.store.still_leads();
        let m = TxnMarker {
            producer_id: s.producer_id,
            epoch: s.epoch,
            marker,
            coordinator_epoch: Some(self.store.coordinator_epoch()),
        };
        let writes = s
            .partitions
            .iter()
            .map(|(topic, partition)| self.env.markers.write(topic, *partition, m, &coordinating));
        let results = futures::future::join_all(writes).await;
        let mut first_error = None;
        let mut done = Vec::new();
        for (tp, r) in s.partitions.iter().zip(results) {
            match r {
                Ok(()) => done.push(tp.clone()),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            if !done.is_empty() {
                for tp in &done {
                    s.partitions.remove(tp);
                }
                self.store(id, s).await?;
            }
            return Err(e);
        }
        s.status = Status::Empty;
        s.partitions.clear();
        s.last_commit = Some(commit);
        self.store(id, s).await?;
        tracing::debug!(transactional_id = %id, commit, "transaction ended");
        Ok(())
    }

    /// Finishes prepared transactions (interrupted by a crash, a failover, or a marker
    /// that could not be written yet).
    async fn finish_prepared(&self) {
        let ending: Vec<(String, bool)> = self
            .lock()
            .iter()
            .filter_map(|(id, s)| match s.status {
                Status::PrepareCommit => Some((id.clone(), true)),
                Status::PrepareAbort => Some((id.clone(), false)),
                _ => None,
            })
            .collect();
        // Side by side (each under its id's lock): one transaction whose partition cannot be
        // reached yet holds up none of the others.
        use futures::StreamExt;
        futures::stream::iter(ending)
            .for_each_concurrent(PREPARED_IN_PARALLEL, |(id, commit)| async move {
                let _one = self.lock_id(&id).await;
                let Some(mut s) = self.get(&id) else { return };
                if !matches!(s.status, Status::PrepareCommit | Status::PrepareAbort) {
                    return;
                }
                match self.finish(&id, &mut s, commit).await {
                    Ok(()) => {
                        tracing::info!(transactional_id = %id, commit, "finished an interrupted transaction")
                    }
                    Err(e) => {
                        tracing::warn!(transactional_id = %id, error = %e, "cannot finish an interrupted transaction yet; retrying")
                    }
                }
            })
            .await;
    }

    /// Forgets ids with no open transaction and no request for [`ID_EXPIRATION_MS`].
    async fn expire_idle(&self, now: i64) {
        let idle: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, s)| {
                s.status == Status::Empty && now.saturating_sub(s.last_used_ms) > ID_EXPIRATION_MS
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            let _one = self.lock_id(&id).await;
            // Used again while this waited for its lock?
            if self.get(&id).is_none_or(|s| {
                s.status != Status::Empty || now.saturating_sub(s.last_used_ms) <= ID_EXPIRATION_MS
            }) {
                continue;
            }
            if let Err(e) = self.store.persist_txn_state(&id, Vec::new()).await {
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

    /// Finishes prepared transactions, aborts (and fences) transactions open longer than
    /// their timeout, and forgets idle ids, until `stop` (or its sender goes).
    pub async fn run_ticker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.finish_prepared().await;
            let now = crate::clock::now_ms();
            self.expire_idle(now).await;
            self.abort_expired(now).await;
        }
    }

    /// Aborts (and fences) the transactions open longer than their timeout at `now`.
    async fn abort_expired(&self, now: i64) {
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
            // The bumped epoch is stored with the intent and stamped on the markers:
            // the producer is fenced here and in every partition, even if the abort
            // is finished later by the ticker or the next coordinator.
            let fenced = s.epoch;
            bump_in_place(&mut s);
            s.timed_out_epoch = Some(fenced);
            if let Err(e) = self.finish(&id, &mut s, false).await {
                tracing::error!(transactional_id = %id, error = %e, "cannot abort a timed-out transaction yet; retrying");
            }
        }
    }
}

/// Checks an init that names the producer id and epoch it last held `id` with: they must
/// still hold it, or be the epoch the coordinator fenced when it aborted that epoch's
/// transaction past its timeout. An id initialised by another producer since (or
/// forgotten) is not taken back: that would fence whoever holds it now.
fn check_held(id: &str, current: Option<&TxnState>, producer_id: i64, epoch: i16) -> Result<()> {
    match current {
        Some(s)
            if s.producer_id == producer_id
                && (s.epoch == epoch || s.timed_out_epoch == Some(epoch)) =>
        {
            Ok(())
        }
        Some(s) => Err(TxnError::Fenced(format!(
            "transactional id {id:?} was initialised by another producer since (it is held by producer {} epoch {}); this producer ({producer_id}, epoch {epoch}) stays fenced; only initialising the id afresh takes it over, fencing that producer",
            s.producer_id, s.epoch
        ))),
        None => Err(TxnError::Fenced(format!(
            "transactional id {id:?} is no longer known (idle ids expire after 7 days); initialise it afresh"
        ))),
    }
}

/// Moves `s` to the next epoch of its producer id. Inits hand out at most `i16::MAX - 1`,
/// so a fence always reaches a higher epoch (the saturation is only a guard); the id is
/// replaced when the producer initialises again.
fn bump_in_place(s: &mut TxnState) {
    s.epoch = s.epoch.saturating_add(1);
}

/// Checks the partitions a producer adds to its transaction: each must exist, and the only
/// internal topic a transaction may write is `__consumer_offsets` (its group's offsets).
pub fn check_partitions(
    req: &AddPartitionsToTxnRequest,
    exists: impl Fn(&str, u32) -> bool,
) -> Result<()> {
    if req.partitions.len() > MAX_TXN_PARTITIONS {
        return Err(TxnError::State(format!(
            "a transaction may write at most {MAX_TXN_PARTITIONS} partitions"
        )));
    }
    for tp in &req.partitions {
        if tp.topic != OFFSETS_TOPIC {
            crate::topic::refuse_internal(&tp.topic, "write in a transaction to")?;
        }
        if !exists(&tp.topic, tp.partition) {
            // The topic's name alone: the error's text says how to create it.
            return Err(TxnError::Topic(if exists(&tp.topic, 0) {
                // Partitions are numbered from 0 without gaps: the count is the first
                // missing one (found in at most 32 probes, whatever a client asks for).
                let (mut present, mut missing) = (0, tp.partition);
                while missing - present > 1 {
                    let mid = present + (missing - present) / 2;
                    if exists(&tp.topic, mid) {
                        present = mid;
                    } else {
                        missing = mid;
                    }
                }
                TopicError::NoPartition {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    count: present + 1,
                }
            } else {
                TopicError::NotFound(tp.topic.clone())
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{TopicConfig, TopicRegistry};

    /// A lone broker's coordinator over `dir` (its flusher runs until the sender drops).
    fn open_at(
        dir: &std::path::Path,
        max_ids: usize,
    ) -> (Flushing, crate::log::Database, Arc<TxnCoordinator>) {
        let db = crate::log::store::open(dir).unwrap();
        let topics = Arc::new(TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap());
        let flusher = crate::log::Flusher::new(db.clone());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(flusher.clone().run(Duration::from_millis(5), rx));
        let (service, replayed) = GroupService::open(
            topics.clone(),
            flusher.clone(),
            crate::group::service::test_group_log(),
        )
        .unwrap();
        let env = Arc::new(TxnEnv {
            markers: MarkerWriter::new(topics, flusher),
            ids: ProducerIds::new(db.sled().clone(), 1),
            max_ids,
        });
        let c = TxnCoordinator::new(service, replayed.txn_states, env);
        (Flushing(stop, task), db, c)
    }

    /// A test's running flusher.
    struct Flushing(watch::Sender<bool>, tokio::task::JoinHandle<()>);

    impl Flushing {
        async fn stop(self) {
            let _ = self.0.send(true);
            let _ = self.1.await;
        }
    }

    async fn coordinator(max_ids: usize) -> (tempfile::TempDir, Flushing, Arc<TxnCoordinator>) {
        let dir = tempfile::tempdir().unwrap();
        let (stop, _db, c) = open_at(dir.path(), max_ids);
        (dir, stop, c)
    }

    #[tokio::test]
    async fn state_lives_in_the_offsets_partition_and_comes_back_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (stop, db, c) = open_at(dir.path(), 10);
        let a = c.init(&init("app")).await.unwrap();
        assert_eq!(
            (a.producer_id >> 32) & 0xffff,
            1,
            "broker 1's ids carry its number"
        );
        assert_eq!(coordinator_partition_of(a.producer_id), Some(0));
        assert_eq!(coordinator_partition_of(12345), None);
        c.register_partition(a.producer_id, a.producer_epoch, "t", 0)
            .await
            .unwrap();
        drop(c);
        stop.stop().await;
        db.flush().unwrap();
        drop(db);
        let (_stop, _db, c) = open_at(dir.path(), 10);
        let s = c.get("app").expect("replayed");
        assert_eq!((s.producer_id, s.epoch), (a.producer_id, a.producer_epoch));
        assert_eq!(s.status, Status::Ongoing);
        assert!(s.partitions.contains(&("t".to_string(), 0)));
        let b = c.init(&init("app")).await.unwrap();
        assert_eq!(
            b.producer_epoch,
            a.producer_epoch + 2,
            "the abort's markers carry a bumped epoch (fencing the old producer's batches in flight), the new producer the next"
        );
        assert_eq!(
            c.get("app").unwrap().status,
            Status::Empty,
            "the open one was aborted"
        );
    }

    #[tokio::test]
    async fn a_transaction_ending_still_holds_its_partitions_when_asked_so() {
        let (_dir, _stop, c) = coordinator(10).await;
        let a = c.init(&init("app")).await.unwrap();
        c.register_partition(a.producer_id, a.producer_epoch, "t", 0)
            .await
            .unwrap();
        let ask = |topic: &str, include_ending| VerifyTxnPartitionRequest {
            producer_id: a.producer_id,
            producer_epoch: a.producer_epoch,
            topic: topic.into(),
            partition: 0,
            include_ending,
        };
        assert!(c.verify(&ask("t", false)).is_ok(), "open");
        // Its commit decided, its markers not all written yet.
        c.lock().get_mut("app").unwrap().status = Status::PrepareCommit;
        let e = c.verify(&ask("t", false)).unwrap_err();
        assert_eq!(
            e.code(),
            ErrorCode::InvalidTxnState,
            "a new batch may not join it"
        );
        assert!(
            c.verify(&ask("t", true)).is_ok(),
            "the janitor must leave it alone"
        );
        let e = c.verify(&ask("other", true)).unwrap_err();
        assert_eq!(
            e.code(),
            ErrorCode::InvalidTxnState,
            "a partition it never added"
        );
        let stale = VerifyTxnPartitionRequest {
            producer_epoch: a.producer_epoch - 1,
            ..ask("t", true)
        };
        assert_eq!(
            c.verify(&stale).unwrap_err().code(),
            ErrorCode::ProducerFenced
        );
    }

    fn init(id: &str) -> InitTransactionsRequest {
        InitTransactionsRequest {
            transactional_id: id.into(),
            timeout_ms: 60_000,
            held: None,
        }
    }

    #[tokio::test]
    async fn a_second_init_fences_the_first_epoch() {
        let (_d, _stop, c) = coordinator(10).await;
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

    fn end(id: &str, (producer_id, producer_epoch): (i64, i16), commit: bool) -> EndTxnRequest {
        EndTxnRequest {
            transactional_id: id.into(),
            producer_id,
            producer_epoch,
            commit,
        }
    }

    /// Near the end of a producer id's epochs: an init never hands out the last one, so a
    /// transaction of the last epoch given is still fenced when it times out (the producer
    /// cannot go on in a new transaction), and the next init takes a new producer id.
    #[tokio::test]
    async fn a_producer_at_the_last_epoch_given_is_fenced_at_its_timeout() {
        let (_d, _stop, c) = coordinator(10).await;
        let a = c.init(&init("app")).await.unwrap();
        c.lock().get_mut("app").unwrap().epoch = i16::MAX - 2;
        let b = c.init(&init("app")).await.unwrap();
        assert_eq!(
            (b.producer_id, b.producer_epoch),
            (a.producer_id, i16::MAX - 1)
        );
        let me = (b.producer_id, b.producer_epoch);
        c.register_partition(me.0, me.1, "t", 0).await.unwrap();
        let started = c.get("app").unwrap().started_ms;
        c.abort_expired(started + 60_001).await;
        let e = c.register_partition(me.0, me.1, "t", 0).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProducerFenced, "{e}");
        let n = c.init(&init("app")).await.unwrap();
        assert_ne!(n.producer_id, a.producer_id);
        assert_eq!(n.producer_epoch, 0);
        // One init short of the last epoch: a new producer id, not the last epoch.
        let o = c.init(&init("other")).await.unwrap();
        c.lock().get_mut("other").unwrap().epoch = i16::MAX - 1;
        let p = c.init(&init("other")).await.unwrap();
        assert_ne!(p.producer_id, o.producer_id);
        assert_eq!(p.producer_epoch, 0);
    }

    #[tokio::test]
    async fn a_retried_end_gets_the_outcome_and_a_timed_out_producer_is_fenced() {
        let (_d, _stop, c) = coordinator(10).await;
        let a = c.init(&init("app")).await.unwrap();
        let me = (a.producer_id, a.producer_epoch);
        c.register_partition(me.0, me.1, "t", 0).await.unwrap();
        c.end(&end("app", me, false)).await.unwrap();
        // The abort's answer was lost; the producer retries, or (wrongly) asks to commit.
        c.end(&end("app", me, false)).await.unwrap();
        let e = c.end(&end("app", me, true)).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidTxnState, "{e}");
        assert!(e.to_string().contains("was aborted"), "{e}");
        // A transaction past its timeout is aborted at a bumped epoch: the producer's
        // commit is fenced, never answered as committed.
        c.register_partition(me.0, me.1, "t", 0).await.unwrap();
        let started = c.get("app").unwrap().started_ms;
        c.abort_expired(started + 60_001).await;
        let s = c.get("app").unwrap();
        assert_eq!((s.status, s.epoch), (Status::Empty, me.1 + 1));
        let e = c.end(&end("app", me, true)).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProducerFenced, "{e}");
    }

    #[tokio::test]
    async fn a_producer_fenced_by_its_timeout_takes_its_id_back_and_one_fenced_by_an_init_does_not()
    {
        let (_d, _stop, c) = coordinator(10).await;
        let held = |r: &InitTransactionsResponse| InitTransactionsRequest {
            held: Some((r.producer_id, r.producer_epoch)),
            ..init("app")
        };
        let a = c.init(&init("app")).await.unwrap();
        c.register_partition(a.producer_id, a.producer_epoch, "t", 0)
            .await
            .unwrap();
        let started = c.get("app").unwrap().started_ms;
        c.abort_expired(started + 60_001).await;
        // Fenced by the timeout: naming its epoch, it gets the id back at a new one.
        let back = c.init(&held(&a)).await.unwrap();
        assert_eq!(back.producer_id, a.producer_id);
        assert_eq!(back.producer_epoch, a.producer_epoch + 2);
        assert_eq!(c.get("app").unwrap().timed_out_epoch, None);
        // Naming an epoch it held before does not work twice.
        let e = c.init(&held(&a)).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProducerFenced, "{e}");
        // Another producer initialises the id: the holder's later try is refused, however
        // its own transaction ended, and the newcomer keeps the id.
        let newcomer = c.init(&init("app")).await.unwrap();
        c.register_partition(newcomer.producer_id, newcomer.producer_epoch, "t", 0)
            .await
            .unwrap();
        let e = c.init(&held(&back)).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProducerFenced, "{e}");
        assert!(e.to_string().contains("another producer"), "{e}");
        let s = c.get("app").unwrap();
        assert_eq!(
            (s.epoch, s.status),
            (newcomer.producer_epoch, Status::Ongoing)
        );
        // Its own epoch is accepted (a producer starting over after a failed flush).
        let again = c.init(&held(&newcomer)).await.unwrap();
        assert_eq!(again.producer_epoch, newcomer.producer_epoch + 2);
        // An id nobody initialised is not created by a producer naming an epoch.
        let e = c
            .init(&InitTransactionsRequest {
                held: Some((a.producer_id, 0)),
                ..init("unknown")
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::ProducerFenced, "{e}");
        assert!(c.get("unknown").is_none());
    }

    #[tokio::test]
    async fn ids_are_capped_and_idle_ones_expire() {
        let (_d, _stop, c) = coordinator(2).await;
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
        c.expire_idle(crate::clock::now_ms() + ID_EXPIRATION_MS + 1)
            .await;
        assert!(c.get("a").is_none(), "the idle id is forgotten");
        assert!(c.get("b").is_some(), "an open transaction keeps its id");
        c.init(&init("c")).await.unwrap();
    }
}
