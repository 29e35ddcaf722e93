//! [`GroupService`]: the tokio layer around the [`GroupCoordinator`] state machine.
//!
//! It owns the coordinator behind a short mutex, reads the clock (a monotonic origin set at
//! start), takes topic snapshots from the registry, persists durable records to
//! `__consumer_offsets` before answering, parks heartbeat long-polls on a `watch` counter
//! that every change bumps, and runs the 100 ms ticker that expires sessions. It logs the
//! coordinator's events. It never decides anything the coordinator should.
//!
//! It also keeps the group side of transactions: offsets a transaction adds
//! (TxnCommitOffsets) are stored at once in a transactional batch of the producer, held
//! pending, and applied when the transaction's commit marker lands in this partition
//! (dropped on abort); replay does the same from the log. Offset fetches wait while a
//! transaction holds offsets of the partitions asked for.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_protocol::batch::{self, BatchBuilder, BatchHeader, Compression, Marker, RecordIter};
use quiver_protocol::requests::{
    CommitOffsetsRequest, CommitOffsetsResponse, DeleteGroupResponse, FetchOffsetsRequest,
    FetchOffsetsResponse, GroupDescription, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, ListGroupsResponse, OffsetCommit, OffsetSpec, ResetOffsetsRequest,
    ResetOffsetsResponse, ResetTo, TopicPartition, TxnCommitOffsetsRequest,
    TxnCommitOffsetsResponse,
};
use quiver_protocol::ErrorCode;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::coordinator::{CoordinatorConfig, GroupCoordinator, GroupError, GroupEvent};
use super::records::{decode_entry, Entry, GroupRecord, OFFSETS_TOPIC};
use super::TopicSnapshot;
use crate::keyed_locks::KeyedLocks;
use crate::log::{Flusher, LogError, PartitionLog};
use crate::topic::{TopicConfig, TopicError, TopicRegistry};

/// How often sessions are checked.
const TICK: Duration = Duration::from_millis(100);
/// How long a persisted group record may wait for its disk flush.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(30);

/// What bounds a service's work on its offsets log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLogLimits {
    /// Largest decompressed batch when replaying group records.
    pub max_decompressed: usize,
    /// Bytes the log may grow past its last compaction before the next one
    /// (`offsets_compact_bytes`).
    pub compact_bytes: u64,
    /// A group without members whose last record is older than this is deleted, ms
    /// (`offsets_retention_ms`; -1: never).
    pub retention_ms: i64,
    /// Most members of one group (`group_max_size`).
    pub max_members: usize,
}

/// How often groups are checked for expiry.
const EXPIRY_CHECK: Duration = Duration::from_secs(30);

/// Why a group request failed; each maps to a wire code.
#[derive(Debug, thiserror::Error)]
pub enum GroupServiceError {
    /// The coordinator refused it.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// A topic it names is unknown, or its log failed.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// Reading a partition's offsets failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The change could not be stored durably (nothing was applied).
    #[error("could not store the group change durably: {0}")]
    Persist(LogError),
    /// The request is not allowed.
    #[error("{0}")]
    Refused(String),
    /// This broker does not coordinate the group (a cluster: the leader of its partition of
    /// `__consumer_offsets` does).
    #[error("this broker is not the coordinator of group {group:?} (partition {partition} of __consumer_offsets); refresh metadata and ask its leader")]
    NotCoordinator { group: String, partition: u32 },
    /// A transaction's offsets from a producer epoch that a newer one replaced.
    #[error("{0}")]
    Fenced(String),
}

impl GroupServiceError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            GroupServiceError::Group(e) => e.code(),
            GroupServiceError::Topic(e) => e.code(),
            GroupServiceError::Log(e) => e.code(),
            // Led elsewhere now: the client finds the coordinator again and retries.
            GroupServiceError::Persist(LogError::NotLeading(_) | LogError::Moved(_)) => {
                ErrorCode::NotLeader
            }
            GroupServiceError::Persist(_) => ErrorCode::StorageError,
            GroupServiceError::Refused(_) => ErrorCode::InvalidRequest,
            GroupServiceError::NotCoordinator { .. } => ErrorCode::NotLeader,
            GroupServiceError::Fenced(_) => ErrorCode::ProducerFenced,
        }
    }
}

type Result<T, E = GroupServiceError> = std::result::Result<T, E>;

/// Consumer groups of this broker.
pub struct GroupService {
    coord: Mutex<GroupCoordinator>,
    changed: watch::Sender<u64>,
    /// One lock per group serializes "store, then apply" of that group's changes, so its
    /// memory order equals its log order; groups never wait for each other's flushes.
    group_locks: KeyedLocks<String>,
    topics: Arc<TopicRegistry>,
    flusher: Arc<Flusher>,
    log: Arc<PartitionLog>,
    log_config: TopicConfig,
    started: Instant,
    max_decompressed: usize,
    /// Largest batch of group records one request may write: half the largest frame
    /// (`max_decompressed` is the broker's `max_frame_bytes`), so a follower's fetch of the
    /// offsets partition always carries it.
    max_batch_bytes: usize,
    compact_bytes: u64,
    /// The log size at which the next compaction runs.
    compact_at: AtomicU64,
    /// True while a compaction runs (one at a time).
    compacting: AtomicBool,
    /// `offsets_retention_ms`.
    retention_ms: i64,
    /// Per group, when it last stored a record or was seen with members (ms since the
    /// epoch): an empty group expires `retention_ms` after it. Empty at open: membership
    /// is not durable, so a restart cannot tell an idle group from one whose members have
    /// not joined again yet, and every group's clock starts then.
    activity: Mutex<HashMap<String, i64>>,
    /// True while an expiry pass runs (one at a time, beside the ticker).
    expiring: AtomicBool,
    /// A cluster broker's replicas: a group record is acknowledged once the in-sync
    /// replicas of its offsets partition have it (`Weak`: the manager owns the directory).
    replicas: std::sync::Weak<crate::replica::ReplicaManager>,
    /// Offsets of open transactions.
    txn: Mutex<TxnOffsets>,
    /// Bumped whenever a transaction's offsets are resolved (wakes waiting offset fetches).
    txn_ended: watch::Sender<u64>,
    /// One transactional step at a time per producer id: its offsets are stored and held
    /// before or after its marker is written and resolved, never between.
    producer_locks: KeyedLocks<i64>,
    /// The leader epoch at which this broker serves the partition (a cluster broker).
    led_epoch: std::sync::OnceLock<u64>,
    /// Each topic's id as last seen (by the ticker, or by a commit naming it): one gone, or
    /// there under another id (deleted and created again), loses its committed offsets
    /// before anything else is committed for it. The lock is held across that write.
    known_topics: tokio::sync::Mutex<BTreeMap<String, u64>>,
    /// Each topic's id and partition count as last seen (by the ticker, or by a join): a
    /// topic that gained partitions has them started at offset 0 for the groups reading it
    /// ([`GroupCoordinator::prepare_start_new_partitions`]) before any group is given them.
    /// The lock is held across those writes.
    known_partitions: tokio::sync::Mutex<BTreeMap<String, (u64, u32)>>,
}

/// Records of deleted topics' offsets written at once: each about 120 bytes, so a write
/// stays far below the largest batch a request may write.
const FORGET_PER_WRITE: usize = 10_000;

/// The topics a commit names.
fn topics_of(offsets: &[OffsetCommit]) -> BTreeSet<String> {
    offsets.iter().map(|o| o.topic.clone()).collect()
}

/// Offsets added to open transactions, and the fencing of old producer epochs.
#[derive(Debug, Default)]
struct TxnOffsets {
    /// Producer id → its open transaction's offsets.
    pending: HashMap<i64, PendingTxn>,
    /// Producer id → the newest epoch a marker here carried, and when (ms since the
    /// epoch): offsets from older epochs are fenced. A TxnCommitOffsets passes its
    /// coordinator's epoch check before it gets here; this closes the race of a newer
    /// epoch's marker landing in between, so an entry is forgotten once no transaction of
    /// that time can still be open ([`crate::txn::ABANDONED_TXN_MS`]).
    fenced: HashMap<i64, Fence>,
    /// Transactional offsets being stored (group, partition → how many writes): a new
    /// owner's offset fetch waits for them as for held ones, since they are held as soon
    /// as they are stored.
    storing: HashMap<(String, TopicPartition), usize>,
}

/// The newest epoch of a producer a marker carried here, and when it landed.
#[derive(Debug, Clone, Copy)]
struct Fence {
    epoch: i16,
    at_ms: i64,
}

#[derive(Debug)]
struct PendingTxn {
    epoch: i16,
    /// The latest record of each subject (group, partition) the transaction stored here:
    /// committing the same partition again replaces its offset, so a transaction holds at
    /// most one record per partition however often (or however many times in one request)
    /// it commits.
    records: BTreeMap<(String, Option<TopicPartition>), GroupRecord>,
    /// When the first offsets arrived (or were replayed), ms since the epoch.
    since_ms: i64,
}

impl PendingTxn {
    /// The pending records of `group`.
    fn of_group<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a GroupRecord> + 'a {
        self.records
            .range((group.to_string(), None)..)
            .take_while(move |((g, _), _)| g == group)
            .map(|(_, r)| r)
    }
}

impl TxnOffsets {
    /// Holds `records` for `producer_id`'s transaction at `epoch`. Offsets held for an
    /// older epoch belong to a transaction whose marker never came here (it never added
    /// this partition, or its epoch was fenced): they are dropped.
    fn add(&mut self, producer_id: i64, epoch: i16, records: Vec<GroupRecord>) {
        let fresh = || PendingTxn {
            epoch,
            records: BTreeMap::new(),
            since_ms: crate::clock::now_ms(),
        };
        let p = self.pending.entry(producer_id).or_insert_with(fresh);
        if p.epoch < epoch {
            *p = fresh();
        }
        for r in records {
            let (group, tp) = r.subject();
            let subject = (group.to_string(), tp.cloned());
            p.records.insert(subject, r);
        }
    }

    /// A marker of `producer_id` landed: the records to apply (on commit).
    fn resolve(&mut self, producer_id: i64, epoch: i16, commit: bool) -> Vec<GroupRecord> {
        let newest = self
            .fenced_below(producer_id)
            .map_or(epoch, |e| e.max(epoch));
        let fence = Fence {
            epoch: newest,
            at_ms: crate::clock::now_ms(),
        };
        self.fenced.insert(producer_id, fence);
        match self.pending.remove(&producer_id) {
            Some(p) if commit => p.records.into_values().collect(),
            _ => Vec::new(),
        }
    }

    /// The epoch `producer_id`'s offsets must reach, if a marker fenced older ones.
    fn fenced_below(&self, producer_id: i64) -> Option<i16> {
        self.fenced.get(&producer_id).map(|f| f.epoch)
    }

    /// Forgets fences older than the longest a transaction can stay open, as of `now_ms`.
    fn forget_old_fences(&mut self, now_ms: i64) {
        self.fenced
            .retain(|_, f| now_ms.saturating_sub(f.at_ms) <= crate::txn::ABANDONED_TXN_MS);
    }

    /// True while an open transaction holds offsets of `group` for any of `partitions`
    /// (any partition when `None`).
    fn holds(&self, group: &str, partitions: Option<&[TopicPartition]>) -> bool {
        let wanted: Option<HashSet<&TopicPartition>> = partitions.map(|ps| ps.iter().collect());
        let storing = self
            .storing
            .keys()
            .any(|(g, tp)| g == group && wanted.as_ref().is_none_or(|w| w.contains(tp)));
        storing
            || self
                .pending
                .values()
                .flat_map(|p| p.of_group(group))
                .any(|r| match r {
                    GroupRecord::Offset { tp, .. } => {
                        wanted.as_ref().is_none_or(|w| w.contains(tp))
                    }
                    _ => false,
                })
    }

    /// `records` are being stored (see `storing`).
    fn start_storing(&mut self, records: &[GroupRecord]) {
        for r in records {
            if let GroupRecord::Offset { group, tp, .. } = r {
                *self.storing.entry((group.clone(), tp.clone())).or_default() += 1;
            }
        }
    }

    /// `records` were stored, or failed to be.
    fn done_storing(&mut self, records: &[GroupRecord]) {
        for r in records {
            if let GroupRecord::Offset { group, tp, .. } = r {
                let key = (group.clone(), tp.clone());
                if let Some(n) = self.storing.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        self.storing.remove(&key);
                    }
                }
            }
        }
    }
}

/// What replaying an offsets partition found besides group state.
pub struct Replayed {
    /// Transactional ids' stored states (their JSON), for the partition's transaction
    /// coordinator.
    pub txn_states: BTreeMap<String, Vec<u8>>,
}

fn log_event(e: &GroupEvent) {
    let names = |ps: &[quiver_protocol::requests::TopicPartition]| {
        ps.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    match e {
        GroupEvent::Joined {
            group,
            member,
            generation,
        } => {
            info!(%group, %member, generation, "member joined")
        }
        GroupEvent::Left {
            group,
            member,
            generation,
        } => {
            info!(%group, %member, generation, "member left")
        }
        GroupEvent::Expired {
            group,
            member,
            generation,
        } => {
            info!(%group, %member, generation, "member session expired; removed")
        }
        GroupEvent::Rebalanced {
            group,
            generation,
            moves,
        } => {
            let moved: Vec<String> = moves
                .iter()
                .map(|(tp, from, to)| format!("{tp}:{}->{to}", from.as_deref().unwrap_or("-")))
                .collect();
            info!(%group, generation, moves = moves.len(), moved = %moved.join(" "), "rebalanced")
        }
        GroupEvent::Revoking {
            group,
            member,
            partitions,
        } => {
            info!(%group, %member, partitions = %names(partitions), "revoking")
        }
        GroupEvent::Released {
            group,
            member,
            partitions,
        } => {
            info!(%group, %member, partitions = %names(partitions), "released")
        }
        GroupEvent::Granted {
            group,
            member,
            partitions,
        } => {
            info!(%group, %member, partitions = %names(partitions), "granted")
        }
    }
}

impl GroupService {
    /// Opens the service: creates `__consumer_offsets` if missing and rebuilds the group
    /// state by replaying it.
    pub fn open(
        topics: Arc<TopicRegistry>,
        flusher: Arc<Flusher>,
        limits: GroupLogLimits,
    ) -> Result<(Arc<GroupService>, Replayed), TopicError> {
        let topic = match topics.get(OFFSETS_TOPIC) {
            Some(t) => t,
            None => topics.create_internal(
                OFFSETS_TOPIC,
                1,
                &BTreeMap::from([
                    ("retention.ms".to_string(), "-1".to_string()),
                    ("flush".to_string(), "batch".to_string()),
                ]),
            )?,
        };
        let log = topic.partitions.first().cloned().ok_or_else(|| {
            TopicError::InvalidPartitions(format!("{OFFSETS_TOPIC} has no partition"))
        })?;
        Self::open_on(
            topics,
            flusher,
            log,
            topic.config(),
            limits,
            std::sync::Weak::new(),
        )
    }

    /// A service over one partition of `__consumer_offsets` (`log`), its state rebuilt by
    /// replaying it; a cluster broker passes its replica manager so records wait for the
    /// partition's in-sync replicas.
    pub fn open_on(
        topics: Arc<TopicRegistry>,
        flusher: Arc<Flusher>,
        log: Arc<PartitionLog>,
        log_config: TopicConfig,
        limits: GroupLogLimits,
        replicas: std::sync::Weak<crate::replica::ReplicaManager>,
    ) -> Result<(Arc<GroupService>, Replayed), TopicError> {
        let max_decompressed = limits.max_decompressed;
        let nonce = crate::clock::now_ms() as u64 % 0x1_0000_0000;
        let mut coord = GroupCoordinator::new(CoordinatorConfig {
            member_id_prefix: format!("{nonce:08x}"),
            max_members: limits.max_members,
            ..CoordinatorConfig::default()
        });
        let mut txn = TxnOffsets::default();
        let mut txn_states = BTreeMap::new();
        let replayed = replay(
            &log,
            &mut coord,
            &mut txn,
            &mut txn_states,
            max_decompressed,
        )?;
        if log.metadata_damaged() {
            warn!(topic = OFFSETS_TOPIC, partition = log.partition, reason = ?log.offline_reason(), "consumer-group log's metadata record is damaged: its groups are read, and nothing can be stored until `quiver broker repair` rebuilds it");
        } else if let Some(reason) = log.offline_reason() {
            // Replay skipped the damaged batches; the groups' other offsets are good, and
            // new commits go after the damage.
            warn!(topic = OFFSETS_TOPIC, %reason, "consumer-group log has damaged batches; they were skipped and the log stays in service");
            log.accept_damage();
        }
        let groups = coord.list().groups.len();
        info!(
            partition = log.partition,
            records = replayed,
            groups,
            open_transactions = txn.pending.len(),
            "recovered consumer groups"
        );
        let service = Arc::new(GroupService {
            coord: Mutex::new(coord),
            changed: watch::Sender::new(0),
            group_locks: KeyedLocks::default(),
            log_config,
            topics,
            flusher,
            log,
            started: Instant::now(),
            max_decompressed,
            max_batch_bytes: max_decompressed / 2,
            compact_bytes: limits.compact_bytes,
            compact_at: AtomicU64::new(limits.compact_bytes),
            compacting: AtomicBool::new(false),
            retention_ms: limits.retention_ms,
            activity: Mutex::new(HashMap::new()),
            expiring: AtomicBool::new(false),
            replicas,
            txn: Mutex::new(txn),
            txn_ended: watch::Sender::new(0),
            producer_locks: KeyedLocks::default(),
            led_epoch: std::sync::OnceLock::new(),
            known_topics: tokio::sync::Mutex::new(BTreeMap::new()),
            known_partitions: tokio::sync::Mutex::new(BTreeMap::new()),
        });
        Ok((service, Replayed { txn_states }))
    }

    /// A cluster broker serves the partition from `leader_epoch` on.
    pub fn set_led_epoch(&self, leader_epoch: u64) {
        let _ = self.led_epoch.set(leader_epoch);
    }

    /// The epoch of this broker as coordinator of the partition's groups and transactional
    /// ids: the partition's leader epoch when it took the partition over (0 on a lone
    /// broker). Markers carry it, so partitions refuse a deposed coordinator's.
    pub fn coordinator_epoch(&self) -> u64 {
        self.led_epoch.get().copied().unwrap_or(0)
    }

    /// True while this broker still leads the service's partition at the epoch it took it
    /// over (always on a lone broker).
    pub fn still_leads(&self) -> bool {
        let Some(rm) = self.replicas.upgrade() else {
            return true;
        };
        match self.led_epoch.get() {
            Some(&e) => rm
                .check_leader_epoch(OFFSETS_TOPIC, self.log.partition, e)
                .is_ok(),
            None => rm.leader(OFFSETS_TOPIC, self.log.partition).is_ok(),
        }
    }

    async fn lock_producer(&self, producer_id: i64) -> tokio::sync::OwnedMutexGuard<()> {
        self.producer_locks.lock(&producer_id).await
    }

    /// True while offsets of `producer_id`'s transaction at `epoch` are held here.
    pub fn holds_txn(&self, producer_id: i64, epoch: i16) -> bool {
        self.txn_lock()
            .pending
            .get(&producer_id)
            .is_some_and(|p| p.epoch == epoch)
    }

    /// Stores offsets a committed transaction decided (a lone broker's state from before
    /// transactions kept their offsets here).
    pub async fn store_offsets(&self, req: &CommitOffsetsRequest) -> Result<()> {
        let _order = self.lock_group(&req.group).await;
        self.persist_then_apply(&super::coordinator::offset_records(req))
            .await
    }

    /// The offsets partition this service keeps.
    pub fn partition(&self) -> u32 {
        self.log.partition
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, GroupCoordinator> {
        self.coord.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every topic and its partition count now.
    fn snapshot(&self) -> TopicSnapshot {
        self.topics
            .list()
            .iter()
            .map(|t| (t.name(), t.partitions.len() as u32))
            .collect()
    }

    /// Each topic's id and partition count now.
    fn partition_counts(&self) -> BTreeMap<String, (u64, u32)> {
        self.topics
            .list()
            .iter()
            .map(|t| (t.name(), (t.id(), t.partitions.len() as u32)))
            .collect()
    }

    /// Starts the partitions topics gained since the last call at offset 0 for the groups
    /// that read those topics (see [`GroupCoordinator::prepare_start_new_partitions`]), and
    /// returns the topics and partition counts to assign from: the counts just seen, or,
    /// for a topic whose new partitions could not be started (a failed write), the counts
    /// before, so nobody is given them until a later call starts them. Called by the ticker
    /// before it rebalances the groups, and by a join before it assigns (a member that
    /// noticed the new partitions joins again at once): each assigns from what it returns,
    /// so a topic that grows in between is never handed out unstarted. Only the leader of
    /// the offsets partition writes, in parts like the offsets of deleted topics.
    async fn start_new_partitions(&self) -> TopicSnapshot {
        let mut known = self.known_partitions.lock().await;
        let mut now = self.partition_counts();
        if *known != now && !known.is_empty() && self.still_leads() {
            let mut records = Vec::new();
            let mut grown = Vec::new();
            for (topic, &(id, count)) in &now {
                match known.get(topic) {
                    Some(&(old_id, old_count)) if old_id == id && old_count < count => {
                        grown.push((topic.clone(), old_count));
                        records.extend(
                            self.lock()
                                .prepare_start_new_partitions(topic, old_count..count),
                        );
                    }
                    _ => {}
                }
            }
            let mut written = Ok(());
            for part in records.chunks(FORGET_PER_WRITE) {
                written = self.persist_then_apply(part).await;
                if written.is_err() {
                    break;
                }
            }
            match written {
                Ok(()) if !records.is_empty() => {
                    info!(offsets = records.len(), "new partitions of grown topics start at offset 0 for the groups reading them");
                }
                Ok(()) => {}
                Err(e) => {
                    warn!(error = %e, "could not start the new partitions of grown topics at offset 0; they are not assigned until they are");
                    for (topic, old_count) in grown {
                        if let Some(c) = now.get_mut(&topic) {
                            c.1 = old_count;
                        }
                    }
                }
            }
        }
        *known = now.clone();
        now.into_iter().map(|(t, (_, n))| (t, n)).collect()
    }

    /// Each topic's name and the id of its present creation.
    fn topic_ids(&self) -> BTreeMap<String, u64> {
        self.topics
            .list()
            .iter()
            .map(|t| (t.name(), t.id()))
            .collect()
    }

    /// Catches up with topics deleted (or deleted and created again) since they were last
    /// seen: their committed offsets are deleted first (only the leader of the offsets
    /// partition writes; the others hear it from the log). `names`: only these (a
    /// commit's topics, each of which must exist), else every topic. On an error nothing
    /// counts as seen, so the next call tries again.
    async fn catch_up_topics(&self, names: Option<&BTreeSet<String>>) -> Result<()> {
        let mut known = self.known_topics.lock().await;
        let now: BTreeMap<String, u64> = match names {
            None => self.topic_ids(),
            Some(names) => names
                .iter()
                .filter_map(|n| Some((n.clone(), self.topics.topic(n).ok()?.id())))
                .collect(),
        };
        let gone: BTreeSet<String> = known
            .iter()
            .filter(|(name, _)| names.is_none_or(|ns| ns.contains(*name)))
            .filter(|(name, id)| now.get(*name) != Some(*id))
            .map(|(name, _)| name.clone())
            .collect();
        if !gone.is_empty() && self.still_leads() {
            let records = self.lock().prepare_forget_topics(&gone);
            // In parts, each well below the largest batch a request may write.
            for part in records.chunks(FORGET_PER_WRITE) {
                self.persist_then_apply(part).await?;
            }
            if !records.is_empty() {
                info!(topics = ?gone, offsets = records.len(), "deleted the committed offsets of deleted topics");
            }
        }
        match names {
            None => *known = now,
            Some(names) => {
                for n in names {
                    match now.get(n) {
                        Some(id) => known.insert(n.clone(), *id),
                        None => known.remove(n),
                    };
                }
                if let Some(missing) = names.iter().find(|n| !now.contains_key(*n)) {
                    // The topic's name alone: the error's text says how to create it.
                    return Err(TopicError::NotFound(missing.clone()).into());
                }
            }
        }
        Ok(())
    }

    /// Logs queued events and wakes parked heartbeats when anything happened.
    fn after(&self, coord: &mut GroupCoordinator) {
        let events = coord.drain_events();
        if events.is_empty() {
            return;
        }
        for e in &events {
            log_event(e);
        }
        debug_assert!(coord.owners_are_unique());
        self.changed.send_modify(|v| *v += 1);
    }

    /// Takes the lock of `group` (see `group_locks`).
    async fn lock_group(&self, group: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.group_locks.lock(group).await
    }

    async fn persist_records(&self, records: &[GroupRecord]) -> Result<()> {
        let encoded: Vec<_> = records.iter().map(GroupRecord::encode).collect();
        self.persist_encoded(&encoded, None).await?;
        self.touch(records);
        Ok(())
    }

    /// Notes that the groups of `records` were active now.
    fn touch(&self, records: &[GroupRecord]) {
        if records.is_empty() {
            return;
        }
        let now = crate::clock::now_ms();
        let mut activity = lock_map(&self.activity);
        for r in records {
            activity.insert(r.group().to_string(), now);
        }
    }

    /// Deletes the groups that have had no members and stored nothing for
    /// `retention_ms` (Kafka's `offsets.retention.minutes`), as `group delete` would;
    /// returns their names. Groups with members, or with a transaction's offsets held,
    /// are kept and their clock starts again.
    pub async fn expire_groups(&self) -> Result<Vec<String>> {
        if self.retention_ms < 0 || !self.still_leads() {
            return Ok(Vec::new());
        }
        let now = crate::clock::now_ms();
        let listed = self.lock().list().groups;
        let idle: Vec<String> = {
            let mut activity = lock_map(&self.activity);
            activity.retain(|g, _| listed.iter().any(|l| &l.group == g));
            let txn = self.txn_lock();
            listed
                .iter()
                .filter(|l| {
                    let busy = l.members > 0 || txn.holds(&l.group, None);
                    let since = activity.entry(l.group.clone()).or_insert(now);
                    if busy {
                        *since = now;
                    }
                    !busy && now.saturating_sub(*since) > self.retention_ms
                })
                .map(|l| l.group.clone())
                .collect()
        };
        let mut expired = Vec::new();
        for group in idle {
            let _order = self.lock_group(&group).await;
            // A member may have joined, or a commit (plain or transactional) landed,
            // since the list.
            let since = lock_map(&self.activity).get(&group).copied().unwrap_or(now);
            if crate::clock::now_ms().saturating_sub(since) <= self.retention_ms
                || self.txn_lock().holds(&group, None)
            {
                continue;
            }
            let Ok((offsets, records)) = self.lock().prepare_delete(&group) else {
                continue;
            };
            self.persist_then_apply(&records).await?;
            lock_map(&self.activity).remove(&group);
            info!(%group, offsets, idle_ms = now.saturating_sub(since), "expired a group with no members and no commits for offsets_retention_ms");
            expired.push(group);
        }
        Ok(expired)
    }

    /// Stores the state record of transactional id `id` (`value` empty: forgotten), once
    /// durable (and, in a cluster, on the partition's in-sync replicas).
    pub async fn persist_txn_state(&self, id: &str, value: Vec<u8>) -> Result<()> {
        self.persist_encoded(&[(super::records::txn_key(id), value)], None)
            .await
    }

    /// Appends `(key, value)` records as one batch (transactional for `producer`, as
    /// `(id, epoch)`), durably.
    async fn persist_encoded(
        &self,
        records: &[(Vec<u8>, Vec<u8>)],
        producer: Option<(i64, i16)>,
    ) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        // Each record's key, value and at most 32 bytes of framing.
        let size: usize = records.iter().map(|(k, v)| k.len() + v.len() + 32).sum();
        if size > self.max_batch_bytes {
            return Err(GroupError::Invalid(format!(
                "these {} group records take about {size} bytes; at most {} in one write: commit fewer partitions at once, or with less metadata",
                records.len(),
                self.max_batch_bytes
            ))
            .into());
        }
        let mut b = BatchBuilder::new(Compression::None);
        let ts = crate::clock::now_ms();
        for (k, v) in records {
            b.push(Some(k), v, ts, &[]);
        }
        if let Some((id, epoch)) = producer {
            // No sequence: the coordinator writes each batch once.
            b.set_producer(id, epoch, -1);
            b.set_transactional(true);
        }
        self.append_durably(b.build()).await.map(drop)
    }

    /// Appends one batch and waits until it is durable (in a cluster: on the in-sync
    /// replicas); returns its base offset.
    async fn append_durably(&self, raw: Bytes) -> Result<i64> {
        let header = quiver_protocol::batch::validate(&raw, usize::MAX)
            .map_err(|e| GroupServiceError::Persist(LogError::InvalidBatch(e)))?;
        let deadline = tokio::time::Instant::now() + PERSIST_TIMEOUT;
        // A service of an earlier leadership (this broker led the partition again since,
        // and a new service replays it) must not write: the new one would not see it.
        if !self.still_leads() {
            return Err(GroupServiceError::Persist(LogError::NotLeading(format!(
                "{OFFSETS_TOPIC}/{} is led under another epoch now",
                self.log.partition
            ))));
        }
        let appended = self
            .log
            .append(
                vec![(raw, header)],
                &self.log_config,
                &self.flusher,
                PERSIST_TIMEOUT,
            )
            .await
            .map_err(|e| {
                warn!(error = %e, "could not persist group records");
                GroupServiceError::Persist(e)
            })?;
        if let Some(rm) = self.replicas.upgrade() {
            // Acknowledged only once the in-sync replicas have it: a new coordinator
            // (another broker) replays it.
            rm.leader_flushed(&self.log, appended.last_offset + 1);
            rm.wait_committed_under(
                &self.log,
                appended.last_offset,
                self.led_epoch.get().copied(),
                deadline,
            )
            .await
            .map_err(|e| {
                warn!(error = %e, "group records not confirmed by the in-sync replicas");
                GroupServiceError::Persist(LogError::Timeout(e.to_string()))
            })?;
        }
        Ok(appended.base_offset)
    }

    /// Appends the marker ending `producer_id`'s transaction in this partition, then
    /// applies (commit) or drops (abort) the offsets the transaction added here. Returns
    /// the marker's offset.
    pub async fn write_marker(&self, m: crate::txn::TxnMarker) -> Result<i64> {
        let _producer = self.lock_producer(m.producer_id).await;
        let raw = batch::control_batch(
            m.producer_id,
            m.epoch,
            m.marker,
            m.coordinator_epoch,
            crate::clock::now_ms(),
        );
        let offset = self.append_durably(raw).await?;
        self.complete_txn(m.producer_id, m.epoch, m.marker == Marker::Commit);
        Ok(offset)
    }

    /// Stores `records`, then applies them in memory: visible only once durable.
    async fn persist_then_apply(&self, records: &[GroupRecord]) -> Result<()> {
        self.persist_records(records).await?;
        let mut c = self.lock();
        for r in records {
            c.apply(r);
        }
        Ok(())
    }

    /// JoinGroup.
    pub async fn join(&self, req: &JoinGroupRequest) -> Result<JoinGroupResponse> {
        let _order = self.lock_group(&req.group).await;
        // Under the group's lock, as the snapshot was taken before (it takes no group's
        // lock itself, so nothing waits in a circle).
        let snapshot = self.start_new_partitions().await;
        let (resp, records) = {
            let mut c = self.lock();
            let r = c.join(self.now(), req, &snapshot);
            self.after(&mut c);
            r?
        };
        self.persist_records(&records).await?;
        Ok(resp)
    }

    /// Heartbeat: answers at once when the member's view is out of date, else parks until
    /// something changes for it, its heartbeat interval passes, or the broker stops.
    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
        mut stopping: watch::Receiver<bool>,
    ) -> Result<HeartbeatResponse> {
        let mut changes = self.changed.subscribe();
        changes.borrow_and_update();
        let (answer, wait) = {
            let mut c = self.lock();
            let r = c.heartbeat(self.now(), req);
            let wait = c.heartbeat_wait_ms(&req.group, &req.member_id);
            self.after(&mut c);
            (r?, wait)
        };
        debug!(group = %req.group, member = %req.member_id, owned = req.owned.len(), ready = answer.ready, "heartbeat");
        if answer.ready || *stopping.borrow() {
            return Ok(answer.response);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(wait));
        loop {
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        break;
                    }
                    let a = self.lock().poll_heartbeat(req)?;
                    if a.ready {
                        return Ok(a.response);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stopping.wait_for(|s| *s) => break,
            }
        }
        Ok(self.lock().poll_heartbeat(req)?.response)
    }

    /// LeaveGroup; returns the generation after.
    pub fn leave(&self, group: &str, member: &str) -> Result<u64> {
        let snapshot = self.snapshot();
        let mut c = self.lock();
        let r = c.leave(group, member, &snapshot);
        self.after(&mut c);
        Ok(r?)
    }

    /// CommitOffsets: checked, applied, then on disk before the answer.
    pub async fn commit(&self, req: &CommitOffsetsRequest) -> Result<CommitOffsetsResponse> {
        self.catch_up_topics(Some(&topics_of(&req.offsets))).await?;
        let _order = self.lock_group(&req.group).await;
        let (resp, records) = self.lock().prepare_commit(req)?;
        self.persist_then_apply(&records).await?;
        Ok(resp)
    }

    /// TxnCommitOffsets: checks the commit like any (membership, generation, ownership),
    /// stores the offsets in a transactional batch of the producer and holds them until
    /// the transaction's marker lands here. The producer must have added this partition to
    /// its transaction (AddPartitionsToTxn), so the marker comes.
    pub async fn txn_commit(
        &self,
        req: &TxnCommitOffsetsRequest,
    ) -> Result<TxnCommitOffsetsResponse> {
        self.catch_up_topics(Some(&topics_of(&req.offsets))).await?;
        let _producer = self.lock_producer(req.producer_id).await;
        let _order = self.lock_group(&req.group).await;
        if let Some(newer) = self
            .txn_lock()
            .fenced_below(req.producer_id)
            .filter(|&e| req.producer_epoch < e)
        {
            return Err(GroupServiceError::Fenced(format!(
                "producer {} epoch {} was replaced by epoch {newer}; its offsets are refused",
                req.producer_id, req.producer_epoch
            )));
        }
        let commit = CommitOffsetsRequest {
            group: req.group.clone(),
            member_id: req.member_id.clone(),
            generation: req.generation,
            offsets: req.offsets.clone(),
        };
        self.lock().prepare_commit(&commit)?;
        let records = super::coordinator::offset_records(&commit);
        let encoded: Vec<_> = records.iter().map(GroupRecord::encode).collect();
        // Held from the check on: while the write waits for the replicas, the partition may
        // pass to a new owner, whose offset fetch must wait for this transaction's outcome
        // rather than read the offset before it.
        self.txn_lock().start_storing(&records);
        let stored = self
            .persist_encoded(&encoded, Some((req.producer_id, req.producer_epoch)))
            .await;
        if let Err(e) = stored {
            self.txn_lock().done_storing(&records);
            self.txn_ended.send_modify(|n| *n += 1);
            return Err(e);
        }
        self.touch(&records);
        // Stored and held in one step: no fetch sees the offsets neither.
        let mut txn = self.txn_lock();
        txn.done_storing(&records);
        txn.add(req.producer_id, req.producer_epoch, records);
        let pending = txn.pending[&req.producer_id].of_group(&req.group).count() as u32;
        Ok(TxnCommitOffsetsResponse { pending })
    }

    /// A marker of `producer_id`'s transaction was stored in this partition (and, in a
    /// cluster, replicated): its offsets become visible on commit, or are dropped.
    fn complete_txn(&self, producer_id: i64, epoch: i16, commit: bool) {
        let records = self.txn_lock().resolve(producer_id, epoch, commit);
        if !records.is_empty() {
            let mut c = self.lock();
            for r in &records {
                c.apply(r);
            }
        }
        self.touch(&records);
        self.txn_ended.send_modify(|n| *n += 1);
    }

    fn txn_lock(&self) -> MutexGuard<'_, TxnOffsets> {
        self.txn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no open transaction holds offsets of `group` for `partitions` (all
    /// when `None`), at most `limit`; false when some still do.
    pub async fn wait_for_txn_offsets(
        &self,
        group: &str,
        partitions: Option<&[TopicPartition]>,
        limit: Duration,
    ) -> bool {
        let mut rx = self.txn_ended.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if !self.txn_lock().holds(group, partitions) {
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

    /// FetchOffsets.
    pub fn fetch_offsets(&self, req: &FetchOffsetsRequest) -> FetchOffsetsResponse {
        self.lock().fetch_offsets(req)
    }

    /// ListGroups.
    pub fn list(&self) -> ListGroupsResponse {
        self.lock().list()
    }

    /// DescribeGroup, with the partitions' offsets from their logs.
    pub fn describe(&self, group: &str) -> Result<GroupDescription> {
        let snapshot = self.snapshot();
        let offsets = |t: &str, p: u32| {
            self.topics.partition(t, p).ok().map(|(_, log)| {
                let s = log.snapshot();
                (s.log_start, s.log_end, s.high_watermark)
            })
        };
        Ok(self.lock().describe(group, &snapshot, &offsets)?)
    }

    /// ResetOffsets: resolves the target per partition, then stores it (refused while the
    /// group has members).
    pub async fn reset(&self, req: &ResetOffsetsRequest) -> Result<ResetOffsetsResponse> {
        let topic = self.topics.topic(&req.topic)?;
        if crate::topic::is_internal(&req.topic) {
            return Err(GroupServiceError::Refused(format!(
                "{:?} is an internal topic; offsets of internal topics cannot be reset",
                req.topic
            )));
        }
        let offsets = self.resolve_reset(&req.topic, &topic, &req.to).await?;
        let _order = self.lock_group(&req.group).await;
        let records = self
            .lock()
            .prepare_reset_offsets(&req.group, &req.topic, &offsets)?;
        self.persist_then_apply(&records).await?;
        info!(group = %req.group, topic = %req.topic, ?offsets, "offsets reset");
        Ok(ResetOffsetsResponse { offsets })
    }

    /// The `(partition, offset)` pairs `to` resolves to: as given by a client that resolved
    /// them ([`ResetTo::Offsets`]), else from this broker's own copies of `topic`. On a
    /// cluster only a leader's copy is the log's, so a coordinator that does not lead every
    /// partition refuses the second kind.
    async fn resolve_reset(
        &self,
        name: &str,
        topic: &crate::topic::Topic,
        to: &ResetTo,
    ) -> Result<Vec<(u32, i64)>> {
        // What to look up in each log, or (`None`) the offset to clamp into its range.
        let (spec, fixed) = match to {
            ResetTo::Offsets(given) => {
                return resolved_offsets(name, topic.partitions.len(), given)
            }
            ResetTo::Earliest => (Some(OffsetSpec::Earliest), 0),
            ResetTo::Latest => (Some(OffsetSpec::Latest), 0),
            ResetTo::Timestamp(t) => (Some(OffsetSpec::Timestamp(*t)), 0),
            ResetTo::Offset(n) => (None, *n),
        };
        if let Some(rm) = self.replicas.upgrade() {
            if let Some(p) = topic
                .partitions
                .iter()
                .find(|p| rm.leader(name, p.partition).is_err())
            {
                return Err(GroupServiceError::Refused(format!(
                    "this coordinator does not lead {name}/{}: resolve the offsets on the partitions' leaders and send them per partition (the CLI and SDK of this version do)",
                    p.partition
                )));
            }
        }
        let mut offsets = Vec::with_capacity(topic.partitions.len());
        for log in &topic.partitions {
            let o = match spec {
                Some(spec) => log.lookup_async(spec, self.max_decompressed).await?.0,
                None => {
                    let s = log.snapshot();
                    fixed.clamp(s.log_start, s.high_watermark)
                }
            };
            offsets.push((log.partition, o));
        }
        Ok(offsets)
    }

    /// DeleteGroup (refused while the group has members).
    pub async fn delete(&self, group: &str) -> Result<DeleteGroupResponse> {
        let _order = self.lock_group(group).await;
        let (n, records) = self.lock().prepare_delete(group)?;
        self.persist_then_apply(&records).await?;
        info!(%group, offsets = n, "group deleted");
        Ok(DeleteGroupResponse { offsets_deleted: n })
    }

    /// Runs the ticker (session expiry, topic changes) until `stop` turns true.
    pub async fn run_ticker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry_checked = Instant::now();
        *self.known_topics.lock().await = self.topic_ids();
        *self.known_partitions.lock().await = self.partition_counts();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.catch_up_topics(None).await {
                warn!(error = %e, "could not delete the committed offsets of deleted topics; trying again");
            }
            // Before the groups rebalance onto them (`tick`).
            let snapshot = self.start_new_partitions().await;
            {
                let mut c = self.lock();
                c.tick(self.now(), &snapshot);
                self.after(&mut c);
            }
            self.txn_lock().forget_old_fences(crate::clock::now_ms());
            self.maybe_compact();
            if expiry_checked.elapsed() >= EXPIRY_CHECK
                && !self.expiring.swap(true, Ordering::AcqRel)
            {
                expiry_checked = Instant::now();
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.expire_groups().await {
                        warn!(error = %e, "could not expire idle groups; trying again later");
                    }
                    this.expiring.store(false, Ordering::Release);
                });
            }
        }
    }

    /// Starts a compaction of the offsets log once it has grown `compact_bytes` past the
    /// last one (or past the last attempt that found nothing to cut).
    fn maybe_compact(self: &Arc<Self>) {
        if self.log.snapshot().size_bytes < self.compact_at.load(Ordering::Relaxed)
            || self.compacting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            // The next one once the log has grown by as much as this one copied (at least
            // `compact_bytes`): copying costs at most as much as what was written since.
            let copied = match this.compact().await {
                Ok(done) => done.map_or(0, |(_, _, bytes)| bytes),
                Err(e) => {
                    warn!(partition = this.log.partition, error = %e, "compacting the consumer-group log failed; it is tried again after it grows further");
                    0
                }
            };
            let size = this.log.snapshot().size_bytes;
            let next = size.saturating_add(this.compact_bytes.max(copied));
            this.compact_at.store(next, Ordering::Relaxed);
            this.compacting.store(false, Ordering::Release);
        });
    }

    /// Carries the live records of the offsets log forward and deletes the part before
    /// them (see [`super::compaction`]); returns the cut, the records and bytes carried, or `None`
    /// when there was nothing to cut (a transaction's offsets held open at the log start,
    /// or this broker no longer leads the partition).
    pub async fn compact(&self) -> Result<Option<(i64, usize, u64)>> {
        match self.plan_compaction().await? {
            Some(carry) => self.carry_forward(carry).await.map(Some),
            None => Ok(None),
        }
    }

    /// What a compaction would carry now (`None`: nothing to cut, or not the leader).
    async fn plan_compaction(&self) -> Result<Option<super::compaction::Carry>> {
        if !self.still_leads() {
            return Ok(None);
        }
        let until = self.log.snapshot().high_watermark;
        let (log, max) = (self.log.clone(), self.max_decompressed);
        Ok(
            crate::log::partition::blocking(move || super::compaction::plan(&log, until, max))
                .await??,
        )
    }

    /// Appends `carry`'s records, then deletes the log below its cut.
    async fn carry_forward(&self, carry: super::compaction::Carry) -> Result<(i64, usize, u64)> {
        let mut copied = 0;
        for b in carry.batches() {
            copied += b.len() as u64;
            self.append_durably(b).await?;
        }
        let (log, cut) = (self.log.clone(), carry.cut);
        let freed = crate::log::partition::blocking(move || log.trim_before(cut)).await??;
        info!(
            partition = self.log.partition,
            cut,
            carried = carry.records.len(),
            freed_bytes = freed,
            "compacted the consumer-group log"
        );
        Ok((cut, carry.records.len(), copied))
    }

    /// Transactions holding offsets here since before `before_ms` (ms since the epoch), as
    /// (producer id, epoch): held longer than any transaction may stay open, they may
    /// belong to one that will never get its marker here (its producer never added this
    /// partition to it, or lied about its producer id). The janitor asks their coordinator
    /// ([`crate::txn::janitor`]) before it aborts them with [`abort_held_txn`](Self::abort_held_txn).
    pub fn txns_held_before(&self, before_ms: i64) -> Vec<(i64, i16)> {
        self.txn_lock()
            .pending
            .iter()
            .filter(|(_, p)| p.since_ms < before_ms)
            .map(|(id, p)| (*id, p.epoch))
            .collect()
    }

    /// Aborts `producer_id`'s transaction at `epoch` in this partition (a marker), so
    /// offset fetches of its groups stop waiting for it.
    pub async fn abort_held_txn(&self, producer_id: i64, epoch: i16) -> Result<()> {
        let abort = crate::txn::TxnMarker {
            producer_id,
            epoch,
            marker: Marker::Abort,
            coordinator_epoch: None,
        };
        self.write_marker(abort).await.map(drop)
    }
}

/// Replays `__consumer_offsets` into `coord` (transactions' offsets into `txn`, held until
/// their marker; transactional ids' states into `txn_states`); returns how many group
/// records were applied. Nothing in the log can stop the broker from starting: a damaged
/// batch, or a record that does not decode, is logged (topic, partition, offset, reason)
/// and skipped.
fn replay(
    log: &PartitionLog,
    coord: &mut GroupCoordinator,
    txn: &mut TxnOffsets,
    txn_states: &mut BTreeMap<String, Vec<u8>>,
    max_decompressed: usize,
) -> std::result::Result<u64, TopicError> {
    let mut offset = log.snapshot().log_start;
    let mut applied = 0;
    // Carried records (compaction) stand for older writes: each key keeps its newest.
    let mut newest = super::compaction::Newest::default();
    loop {
        let (batches, next) = log.read_recovering(offset, 4 * 1024 * 1024)?;
        for b in &batches {
            let header = BatchHeader::parse(b).ok();
            if let Some(h) = header.filter(|h| h.is_control()) {
                if h.base_offset >= offset && h.is_transactional() {
                    if let Some(m) = batch::marker_of(b) {
                        for r in txn.resolve(h.producer_id, h.producer_epoch, m == Marker::Commit) {
                            newest.admit(&r.encode().0, h.base_offset, ());
                            coord.apply(&r);
                            applied += 1;
                        }
                    }
                }
                continue;
            }
            let in_txn = header
                .filter(|h| h.is_transactional())
                .map(|h| (h.producer_id, h.producer_epoch));
            let records = match RecordIter::new(b, max_decompressed) {
                Ok(r) => r,
                Err(e) => {
                    warn!(topic = OFFSETS_TOPIC, partition = log.partition, offset = header.map(|h| h.base_offset).unwrap_or(offset), error = %e, "skipping an undecodable group batch");
                    continue;
                }
            };
            let mut held = Vec::new();
            for r in records {
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(topic = OFFSETS_TOPIC, partition = log.partition, error = %e, "skipping the rest of an undecodable group batch");
                        break;
                    }
                };
                if r.offset < offset {
                    continue;
                }
                let at = super::compaction::effective_offset(&r);
                let key: Bytes = r.key.clone().unwrap_or_default();
                if in_txn.is_none() && !newest.admit(&key, at, ()) {
                    continue;
                }
                match decode_entry(&key, &r.value) {
                    Ok(Entry::Group(rec)) if in_txn.is_some() => held.push(rec),
                    Ok(Entry::Group(rec)) => {
                        coord.apply(&rec);
                        applied += 1;
                    }
                    Ok(Entry::Txn { id, value }) if value.is_empty() => {
                        txn_states.remove(&id);
                    }
                    Ok(Entry::Txn { id, value }) => {
                        txn_states.insert(id, value);
                    }
                    Err(e) => {
                        warn!(topic = OFFSETS_TOPIC, partition = log.partition, offset = r.offset, error = %e, "skipping an unreadable group record")
                    }
                }
            }
            if let (Some((id, epoch)), false) = (in_txn, held.is_empty()) {
                txn.add(id, epoch, held);
            }
        }
        if next <= offset {
            break;
        }
        offset = next;
    }
    Ok(applied)
}

/// Checks offsets a client resolved itself ([`ResetTo::Offsets`]): partitions of the topic,
/// each once, offsets not negative.
fn resolved_offsets(
    topic: &str,
    partitions: usize,
    given: &[(u32, i64)],
) -> Result<Vec<(u32, i64)>> {
    let mut seen = std::collections::BTreeSet::new();
    for &(p, o) in given {
        if p as usize >= partitions {
            return Err(GroupServiceError::Refused(format!(
                "{topic} has {partitions} partitions; there is no partition {p} to reset"
            )));
        }
        if !seen.insert(p) {
            return Err(GroupServiceError::Refused(format!(
                "partition {p} of {topic} is given twice"
            )));
        }
        if o < 0 {
            return Err(GroupServiceError::Refused(format!(
                "offset {o} for {topic}/{p} is negative"
            )));
        }
    }
    Ok(given.to_vec())
}

/// Limits for tests: small batches, compaction every 64 KiB.
#[cfg(test)]
pub(crate) fn test_group_log() -> GroupLogLimits {
    GroupLogLimits {
        max_decompressed: 1 << 20,
        compact_bytes: 64 * 1024,
        retention_ms: -1,
        max_members: super::coordinator::DEFAULT_GROUP_MAX_SIZE,
    }
}

/// Locks a plain map, whatever a panicking holder left.
fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::requests::OffsetCommit;

    fn commit(group: &str, partition: u32, offset: i64) -> CommitOffsetsRequest {
        CommitOffsetsRequest {
            group: group.to_string(),
            member_id: String::new(),
            generation: 0,
            offsets: vec![OffsetCommit {
                topic: "t".into(),
                partition,
                offset,
                metadata: Some(format!("{group}/{partition} at {offset}")),
            }],
        }
    }

    /// Stores `group`/`partition` = `offset` as the offsets of producer `id`'s open
    /// transaction (epoch 0), held until its marker, as a TxnCommitOffsets does.
    async fn hold_txn_offsets(s: &GroupService, id: i64, group: &str, partition: u32, offset: i64) {
        let records = super::super::coordinator::offset_records(&commit(group, partition, offset));
        let encoded: Vec<_> = records.iter().map(GroupRecord::encode).collect();
        s.persist_encoded(&encoded, Some((id, 0))).await.unwrap();
        s.txn_lock().add(id, 0, records);
    }

    /// Commits producer `id`'s transaction (epoch 0) here.
    async fn commit_txn(s: &GroupService, id: i64) {
        let marker = crate::txn::TxnMarker {
            producer_id: id,
            epoch: 0,
            marker: Marker::Commit,
            coordinator_epoch: None,
        };
        s.write_marker(marker).await.unwrap();
    }

    /// Every group's committed offsets, as (group, partition) → offset.
    fn committed(s: &GroupService, groups: &[String]) -> BTreeMap<(String, u32), i64> {
        let mut out = BTreeMap::new();
        for g in groups {
            let req = FetchOffsetsRequest {
                group: g.clone(),
                partitions: None,
            };
            for o in s.fetch_offsets(&req).offsets {
                if let Some(offset) = o.offset {
                    out.insert((g.clone(), o.partition), offset);
                }
            }
        }
        out
    }

    /// A lone broker's storage in a temporary directory, its flusher running.
    struct Store {
        _dir: tempfile::TempDir,
        topics: Arc<TopicRegistry>,
        flusher: Arc<Flusher>,
        _stop: watch::Sender<bool>,
    }

    impl Store {
        fn new() -> Store {
            let dir = tempfile::tempdir().unwrap();
            let db = crate::log::store::open(dir.path()).unwrap();
            let topics = Arc::new(
                TopicRegistry::open(db.clone(), crate::topic::TopicConfig::default()).unwrap(),
            );
            let flusher = Flusher::new(db);
            let (stop, rx) = watch::channel(false);
            tokio::spawn(flusher.clone().run(Duration::from_millis(2), rx));
            Store {
                _dir: dir,
                topics,
                flusher,
                _stop: stop,
            }
        }

        /// A group service replaying the store's `__consumer_offsets`.
        fn open(&self, limits: GroupLogLimits) -> Arc<GroupService> {
            GroupService::open(self.topics.clone(), self.flusher.clone(), limits)
                .unwrap()
                .0
        }
    }

    /// A deleted topic's offsets go before anything else is committed for its name: a
    /// commit naming it once it is gone (a member's commit on revoke) is refused, and the
    /// first commit of a topic created again under the name deletes the old offsets first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_topics_offsets_go_before_its_name_is_committed_again() {
        let store = Store::new();
        let s = store.open(test_group_log());
        let none = BTreeMap::new();
        let groups = ["g".to_string(), "h".to_string()];
        store.topics.create("t", 1, &none).unwrap();
        s.catch_up_topics(None).await.unwrap();
        s.store_offsets(&commit("g", 0, 5)).await.unwrap();
        s.store_offsets(&commit("h", 0, 6)).await.unwrap();
        store.topics.delete("t").unwrap();
        let e = s.commit(&commit("g", 0, 9)).await.unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(committed(&s, &groups).is_empty(), "the old offsets went");
        // Deleted and created again before anything looked: the first commit naming it
        // deletes the old topic's offsets (of every group) before its own are stored.
        store.topics.create("t", 1, &none).unwrap();
        s.catch_up_topics(None).await.unwrap();
        s.store_offsets(&commit("h", 0, 3)).await.unwrap();
        store.topics.delete("t").unwrap();
        store.topics.create("t", 1, &none).unwrap();
        // (No member: the commit itself is refused after the catch-up.)
        let _ = s.commit(&commit("g", 0, 2)).await;
        assert!(
            committed(&s, &groups).is_empty(),
            "h's offset of the old topic went"
        );
        s.store_offsets(&commit("g", 0, 2)).await.unwrap();
        s.catch_up_topics(None).await.unwrap();
        let only_new = BTreeMap::from([(("g".to_string(), 0), 2)]);
        assert_eq!(
            committed(&s, &groups),
            only_new,
            "the new topic's offsets stay"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_empty_group_expires_and_busy_or_recent_ones_stay() {
        let store = Store::new();
        // Long enough that "fresh" (stored after the sleep) cannot expire before the
        // pass that expires "old", however slow the machine.
        let limits = GroupLogLimits {
            retention_ms: 1500,
            ..test_group_log()
        };
        let s = store.open(limits);
        s.store_offsets(&commit("old", 0, 5)).await.unwrap();
        s.store_offsets(&commit("busy", 0, 6)).await.unwrap();
        let join = JoinGroupRequest {
            group: "busy".into(),
            member_id: None,
            client_id: "c".into(),
            subscription: quiver_protocol::requests::Subscription::Topics(vec!["t".into()]),
            session_timeout_ms: 60_000,
            strategy: None,
            auto_offset_reset: None,
        };
        s.join(&join).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1700)).await;
        s.store_offsets(&commit("fresh", 0, 7)).await.unwrap();
        // A compaction in between changes no group's clock.
        s.compact().await.unwrap();
        assert_eq!(s.expire_groups().await.unwrap(), ["old"]);
        let groups = ["old", "busy", "fresh"].map(String::from);
        let kept = BTreeMap::from([(("busy".into(), 0), 6), (("fresh".into(), 0), 7)]);
        assert_eq!(committed(&s, &groups), kept);
        // After a restart (no members now) every group's clock starts again: members
        // that have not joined yet are not taken for an idle group.
        drop(s);
        let again = store.open(limits);
        assert_eq!(committed(&again, &groups), kept, "the expiry is durable");
        assert!(again.expire_groups().await.unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(1700)).await;
        let mut expired = again.expire_groups().await.unwrap();
        expired.sort();
        assert_eq!(expired, ["busy", "fresh"]);
        // With retention -1 nothing expires.
        again.store_offsets(&commit("kept", 0, 1)).await.unwrap();
        drop(again);
        let forever = store.open(test_group_log());
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert!(forever.expire_groups().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_larger_than_half_a_frame_is_refused_and_stores_nothing() {
        let store = Store::new();
        // test_group_log: frames of 1 MiB, so writes of at most 512 KiB.
        let s = store.open(test_group_log());
        let mut big = commit("g", 0, 1);
        big.offsets = (0..200)
            .map(|p| OffsetCommit {
                topic: "t".into(),
                partition: p,
                offset: 1,
                metadata: Some("m".repeat(4096)),
            })
            .collect();
        let e = s.store_offsets(&big).await.unwrap_err().to_string();
        assert!(e.contains("commit fewer partitions at once"), "{e}");
        let groups = ["g".to_string()];
        assert!(committed(&s, &groups).is_empty());
        big.offsets.truncate(100);
        s.store_offsets(&big).await.unwrap();
        assert_eq!(committed(&s, &groups).len(), 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_holds_one_offset_per_partition_however_often_it_commits() {
        let store = Store::new();
        let s = store.open(test_group_log());
        for offset in 1..=500 {
            hold_txn_offsets(&s, 9, "g", 0, offset).await;
        }
        hold_txn_offsets(&s, 9, "g", 1, 70).await;
        hold_txn_offsets(&s, 9, "other", 0, 3).await;
        {
            let txn = s.txn_lock();
            assert_eq!(txn.pending[&9].records.len(), 3, "one record per partition");
            assert_eq!(txn.pending[&9].of_group("g").count(), 2);
            let tp = |p| TopicPartition::new("t", p);
            // A long list naming none of the held partitions, then one naming one.
            assert!(!txn.holds("g", Some(&vec![tp(5); 100_000])));
            assert!(txn.holds("g", Some(&[tp(5), tp(1)])));
            assert!(txn.holds("g", None));
            assert!(!txn.holds("absent", None));
        }
        commit_txn(&s, 9).await;
        let want = BTreeMap::from([
            (("g".into(), 0), 500),
            (("g".into(), 1), 70),
            (("other".into(), 0), 3),
        ]);
        let groups = ["g", "other"].map(String::from);
        assert_eq!(
            committed(&s, &groups),
            want,
            "the latest offset of each partition"
        );
        drop(s);
        let again = store.open(test_group_log());
        assert_eq!(committed(&again, &groups), want, "after replay");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleted_groups_stay_deleted_through_compactions() {
        let store = Store::new();
        let s = store.open(test_group_log());
        let groups = ["gone", "lost", "kept"].map(String::from);
        s.store_offsets(&commit("gone", 0, 1)).await.unwrap();
        s.store_offsets(&commit("kept", 0, 2)).await.unwrap();
        // A plan copies "gone"; the group is deleted before the copy lands, and a
        // transaction's offsets are held open in between.
        let first = s.plan_compaction().await.unwrap().expect("a cut");
        s.delete("gone").await.unwrap();
        hold_txn_offsets(&s, 7, "kept", 1, 3).await;
        s.carry_forward(first).await.unwrap();
        // A second compaction may not cut between the deletion and the stale copy.
        s.compact().await.unwrap();
        // An offset stored but never applied (its write failed), then its group deleted.
        s.store_offsets(&commit("lost", 0, 4)).await.unwrap();
        let orphan = [GroupRecord::encode(&GroupRecord::Offset {
            group: "lost".into(),
            tp: TopicPartition::new("t", 1),
            value: super::super::records::OffsetValue {
                offset: 5,
                metadata: None,
            },
        })];
        s.persist_encoded(&orphan, None).await.unwrap();
        s.delete("lost").await.unwrap();
        commit_txn(&s, 7).await;
        s.compact().await.unwrap();
        let want = BTreeMap::from([(("kept".into(), 0), 2), (("kept".into(), 1), 3)]);
        assert_eq!(committed(&s, &groups), want);
        drop(s);
        let again = store.open(test_group_log());
        assert_eq!(committed(&again, &groups), want, "after replay");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_keeps_every_groups_latest_offsets_through_a_restart() {
        let store = Store::new();
        let s = store.open(test_group_log());
        let groups: Vec<String> = (0..5).map(|g| format!("g{g}")).collect();
        let mut model = BTreeMap::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut cuts = Vec::new();
        let mut held_from = None;
        for i in 0..1500i64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let g = &groups[(rng % 5) as usize];
            let p = ((rng >> 8) % 4) as u32;
            match (rng >> 16) % 100 {
                0..=3 if model.keys().any(|(mg, _): &(String, u32)| mg == g) => {
                    s.delete(g).await.unwrap();
                    model.retain(|(mg, _), _| mg != g);
                }
                4..=6 => {
                    // A commit lands between the plan and its carried copy: the copy
                    // (of an older value of the same key) must not win on replay.
                    if let Some(carry) = s.plan_compaction().await.unwrap() {
                        s.store_offsets(&commit(g, p, i)).await.unwrap();
                        model.insert((g.clone(), p), i);
                        let (cut, _, _) = s.carry_forward(carry).await.unwrap();
                        assert!(
                            held_from.is_none_or(|from| cut <= from),
                            "cut {cut} passed held offsets"
                        );
                        cuts.push(cut);
                    }
                }
                7..=8 => {
                    if let Some((cut, _, _)) = s.compact().await.unwrap() {
                        cuts.push(cut);
                        if let Some(from) = held_from {
                            assert!(cut <= from, "cut {cut} passed held offsets at {from}");
                        }
                    }
                }
                _ => {
                    s.store_offsets(&commit(g, p, i)).await.unwrap();
                    model.insert((g.clone(), p), i);
                }
            }
            if i == 500 {
                // A transaction's offsets held open across compactions.
                held_from = Some(s.log.snapshot().log_end);
                hold_txn_offsets(&s, 7, "g0", 9, 1).await;
            }
            if i == 1000 {
                commit_txn(&s, 7).await;
                model.insert(("g0".into(), 9), 1);
                held_from = None;
            }
        }
        s.compact().await.unwrap();
        assert!(cuts.len() > 10, "compactions that cut: {cuts:?}");
        // Last, with nothing after it: a commit between a plan and its carried copy.
        s.store_offsets(&commit("g1", 0, 4999)).await.unwrap();
        let carry = s.plan_compaction().await.unwrap().expect("a cut");
        s.store_offsets(&commit("g1", 0, 5000)).await.unwrap();
        model.insert(("g1".into(), 0), 5000);
        s.carry_forward(carry).await.unwrap();
        assert_eq!(committed(&s, &groups), model);
        let snap = s.log.snapshot();
        assert!(snap.log_start > 0, "nothing was deleted");
        assert!(
            snap.size_bytes < 64 * 1024,
            "{} bytes left after compacting",
            snap.size_bytes
        );
        drop(s);
        let again = store.open(test_group_log());
        assert_eq!(committed(&again, &groups), model, "state after replay");
    }

    #[test]
    fn transactional_offsets_being_stored_hold_the_partition_like_held_ones() {
        let mut txn = TxnOffsets::default();
        let tp = TopicPartition::new("in", 0);
        let records = vec![GroupRecord::Offset {
            group: "g".into(),
            tp: tp.clone(),
            value: super::super::records::OffsetValue {
                offset: 7,
                metadata: None,
            },
        }];
        let other = [TopicPartition::new("in", 1)];
        assert!(!txn.holds("g", Some(std::slice::from_ref(&tp))));
        // Two writes of the same partition in flight (a retry beside the first).
        txn.start_storing(&records);
        txn.start_storing(&records);
        assert!(txn.holds("g", Some(std::slice::from_ref(&tp))));
        assert!(txn.holds("g", None));
        assert!(!txn.holds("g", Some(&other)));
        assert!(!txn.holds("h", None));
        txn.done_storing(&records);
        assert!(txn.holds("g", None), "one write is still in flight");
        // Stored: held as pending from the same step on.
        txn.done_storing(&records);
        txn.add(5, 0, records);
        assert!(txn.holds("g", Some(std::slice::from_ref(&tp))));
        assert!(txn.storing.is_empty());
    }

    #[test]
    fn a_markers_fence_holds_then_is_forgotten_after_the_longest_transaction() {
        let mut txn = TxnOffsets::default();
        txn.resolve(42, 3, false);
        txn.resolve(42, 2, true); // a late, older marker never lowers the fence
        assert_eq!(txn.fenced_below(42), Some(3));
        let now = crate::clock::now_ms();
        txn.forget_old_fences(now);
        assert_eq!(txn.fenced_below(42), Some(3), "a fresh fence was forgotten");
        for id in 0..10_000 {
            txn.resolve(1_000 + id, 0, true);
        }
        txn.forget_old_fences(now + crate::txn::ABANDONED_TXN_MS + 60_000);
        assert!(
            txn.fenced.is_empty(),
            "{} old fences kept",
            txn.fenced.len()
        );
    }
}
