//! [`GroupConsumer`]: a member of a consumer group. The broker assigns it partitions; it
//! reads them with a [`Consumer`], commits how far it got, and gives partitions back when
//! the coordinator asks.
//!
//! A background task runs the heartbeat long-poll. It reports the partitions the member
//! owns (everything granted, plus revoked ones not yet released) and publishes each answer
//! to the consumer side. The consumer side applies changes at the start of every
//! [`poll`](GroupConsumer::poll): for a revoked partition it stops fetching, calls
//! `on_revoked`, commits its position (unless `commit_on_revoke` is off), then marks it
//! released, and the heartbeat task tells the coordinator at once; for a granted partition
//! it looks up the committed offset (else the group's `auto_offset_reset`), starts
//! fetching there and calls `on_assigned`. A partition with no committed offset that starts
//! at the latest records has that start committed at once, whatever `auto_commit` says:
//! "the latest" is the records after the group first read the partition, not after each
//! later owner's grant. When the broker no longer knows the member
//! (session expired, broker restarted), the task joins again and the partitions held are
//! dropped without a commit (`on_lost`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use quiver_protocol::requests::{
    AutoOffsetReset, CommitOffsetsRequest, FetchOffsetsRequest, FetchOffsetsResponse,
    HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, OffsetCommit, OffsetSpec, Strategy,
    Subscription, TopicPartition,
};
use quiver_protocol::ErrorCode;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::admin::list_offset;
use crate::backoff::Backoff;
use crate::{Client, ClientError, ConsumedRecord, Consumer, ConsumerConfig, Result, SeekTo};

/// How soon `poll` asks again for the committed offsets of granted partitions the
/// coordinator could not give yet.
const GRANT_RETRY: Duration = Duration::from_millis(500);
/// How long a call waits for the committed offsets of granted partitions before going on
/// without them (they are looked for again at the next call).
const OFFSETS_FETCH_WAIT: Duration = Duration::from_millis(200);

/// How a [`GroupConsumer`] joins and behaves.
///
/// ```
/// use std::time::Duration;
/// use quiver_client::GroupConfig;
/// let cfg = GroupConfig::new("billing", ["orders"]).auto_commit(Duration::from_secs(1));
/// assert_eq!(cfg.group, "billing");
/// ```
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Group name.
    pub group: String,
    /// Topics (or a pattern) to read.
    pub subscription: Subscription,
    /// The member is removed when the broker hears nothing for this long.
    pub session_timeout: Duration,
    /// Strategy to ask for (applies when the group has no members); `None` keeps the group's.
    pub strategy: Option<Strategy>,
    /// Reset policy to ask for (applies like `strategy`); `None` keeps the group's
    /// (earliest for a new group).
    pub auto_offset_reset: Option<AutoOffsetReset>,
    /// Where this member starts reading a partition the group has no committed offset
    /// for: `Some(Earliest)` is Kafka's `auto.offset.reset=earliest` (what
    /// `kafka-console-consumer --group G --from-beginning` sets). Unlike
    /// `auto_offset_reset`, it is this member's choice and is not stored with the group;
    /// `None` follows the group's setting. A committed offset always wins.
    pub start_without_commit: Option<AutoOffsetReset>,
    /// Commit consumed positions at this interval (checked in `poll`); `None` for manual
    /// (a start at the latest records is committed at its grant either way).
    pub auto_commit: Option<Duration>,
    /// Commit a revoked partition's position before releasing it.
    pub commit_on_revoke: bool,
    /// Commits (explicit, automatic, on revoke and at close) store the offsets given to
    /// [`GroupConsumer::store_offset`], not the positions of the records handed out: for an
    /// application that finishes records after polling the next ones (Kafka's
    /// `enable.auto.offset.store=false`). Off by default.
    pub commit_stored_offsets: bool,
    /// Revoked partitions stop being fetched in `poll` but are held (still this member's,
    /// nothing committed or released) until [`GroupConsumer::release_revoked`]: for an
    /// application with work of those partitions still under way (writes in flight), which
    /// finishes it first, so the next owner starts after it and its late writes never land
    /// after the next owner's. `poll` returns at once when it starts holding partitions;
    /// `records()` releases them itself. Off by default: `poll` releases them at once.
    pub hold_revoked: bool,
    /// A name shown by `group describe`.
    pub client_id: String,
    /// How partitions are fetched (`start` is ignored: the group decides where to start).
    pub fetch: ConsumerConfig,
}

impl GroupConfig {
    /// A config for `group` reading `topics`, with defaults: 10 s session, group strategy
    /// (sticky for a new group), manual commits, commit on revoke.
    pub fn new<T: Into<String>>(group: &str, topics: impl IntoIterator<Item = T>) -> Self {
        GroupConfig {
            group: group.to_string(),
            subscription: Subscription::Topics(topics.into_iter().map(Into::into).collect()),
            session_timeout: Duration::from_secs(10),
            strategy: None,
            auto_offset_reset: None,
            start_without_commit: None,
            auto_commit: None,
            commit_on_revoke: true,
            commit_stored_offsets: false,
            hold_revoked: false,
            client_id: "quiver-client".into(),
            fetch: ConsumerConfig::default(),
        }
    }

    /// Reads every topic whose name matches `pattern` (a regular expression).
    pub fn pattern(mut self, pattern: &str) -> Self {
        self.subscription = Subscription::Pattern(pattern.to_string());
        self
    }

    /// Sets the auto-commit interval.
    pub fn auto_commit(mut self, every: Duration) -> Self {
        self.auto_commit = Some(every);
        self
    }

    /// Sets the session timeout.
    pub fn session_timeout(mut self, t: Duration) -> Self {
        self.session_timeout = t;
        self
    }

    /// Sets where this member starts partitions without a committed offset (see
    /// [`start_without_commit`](Self::start_without_commit)).
    ///
    /// ```
    /// use quiver_client::{AutoOffsetReset, GroupConfig};
    /// let cfg = GroupConfig::new("audit", ["orders"]).start_without_commit_at(AutoOffsetReset::Earliest);
    /// assert_eq!(cfg.start_without_commit, Some(AutoOffsetReset::Earliest));
    /// assert_eq!(cfg.auto_offset_reset, None, "the group's own setting is left alone");
    /// ```
    pub fn start_without_commit_at(mut self, at: AutoOffsetReset) -> Self {
        self.start_without_commit = Some(at);
        self
    }
}

/// Where a member starts a granted partition: its committed offset, else the member's
/// `start_without_commit`, else the group's reset policy.
fn start_position(
    committed: Option<i64>,
    member: Option<AutoOffsetReset>,
    group: AutoOffsetReset,
) -> SeekTo {
    match (committed, member.unwrap_or(group)) {
        (Some(o), _) => SeekTo::Offset(o),
        (None, AutoOffsetReset::Earliest) => SeekTo::Beginning,
        (None, AutoOffsetReset::Latest) => SeekTo::End,
    }
}

/// Callbacks on assignment changes; called from inside `poll`.
pub trait RebalanceListener: Send {
    /// Partitions this member now reads.
    fn on_assigned(&mut self, _partitions: &[TopicPartition]) {}
    /// Partitions being given back; called before their positions are committed.
    fn on_revoked(&mut self, _partitions: &[TopicPartition]) {}
    /// Partitions lost without a chance to commit (the member was expired or re-joined).
    fn on_lost(&mut self, _partitions: &[TopicPartition]) {}
}

/// What the heartbeat task and the consumer side share.
#[derive(Debug, Default)]
struct Shared {
    member_id: String,
    generation: u64,
    /// Granted and not being revoked (last answer).
    assignment: BTreeSet<TopicPartition>,
    /// To give back (last answer).
    revoke: BTreeSet<TopicPartition>,
    /// Revoked partitions the consumer has released.
    released: BTreeSet<TopicPartition>,
    /// Bumped when the member had to join again: everything held is lost.
    incarnation: u64,
    /// Heartbeat answers received (tests and `is_stable`).
    answers: u64,
    closed: bool,
    /// The coordinator took the member's LeaveGroup (or no longer knew it).
    left: bool,
    fatal: Option<ClientError>,
}

impl Shared {
    /// Marks as released every partition asked back that the consumer no longer owns.
    fn release_unowned(&mut self, owned: &BTreeSet<TopicPartition>) {
        let newly: Vec<TopicPartition> = self
            .revoke
            .iter()
            .filter(|tp| !owned.contains(*tp))
            .cloned()
            .collect();
        self.released.extend(newly);
    }

    fn owned(&self) -> Vec<TopicPartition> {
        self.assignment
            .iter()
            .chain(self.revoke.difference(&self.released))
            .cloned()
            .collect()
    }
}

struct Link {
    state: Mutex<Shared>,
    /// Heartbeat task → consumer: a new answer.
    changed: Notify,
    /// Consumer → heartbeat task: something was released (or closing).
    released: Notify,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A consumer-group member.
///
/// ```no_run
/// # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
/// use quiver_client::{GroupConfig, GroupConsumer};
/// let mut member = GroupConsumer::join(client, GroupConfig::new("billing", ["orders"])).await?;
/// for _ in 0..10 {
///     for r in member.poll().await? {
///         println!("{}/{}@{}", r.topic, r.partition, r.offset);
///     }
///     member.commit().await?;
/// }
/// member.close().await?;
/// # Ok(()) }
/// ```
pub struct GroupConsumer {
    client: Client,
    config: GroupConfig,
    consumer: Consumer,
    link: Arc<Link>,
    heartbeats: JoinHandle<()>,
    /// Partitions the consumer reads.
    owned: BTreeSet<TopicPartition>,
    /// Next offset after the records handed out, per partition.
    positions: BTreeMap<TopicPartition, i64>,
    /// Last committed offset, per partition.
    committed: BTreeMap<TopicPartition, i64>,
    /// Metadata stored with the last committed offset, per partition.
    committed_metadata: BTreeMap<TopicPartition, String>,
    /// Metadata to store with the next commit of a partition.
    pending_metadata: BTreeMap<TopicPartition, String>,
    /// Offsets the application says are done (with `commit_stored_offsets`).
    stored: BTreeMap<TopicPartition, i64>,
    /// Per owned partition, which grant of it this is (see [`GroupConsumer::grant_id`]).
    grant_ids: BTreeMap<TopicPartition, u64>,
    grants: u64,
    /// Granted partitions wait for their committed offsets (a retriable `FetchOffsets`
    /// failure): `poll` asks again within [`GRANT_RETRY`].
    grants_waiting: bool,
    /// The committed offsets of granted partitions, being fetched.
    offsets_fetch: Option<OffsetsFetch>,
    /// Revoked partitions held until [`GroupConsumer::release_revoked`] (`hold_revoked`).
    held_revoked: BTreeSet<TopicPartition>,
    /// Partitions were held since `poll` last returned: it returns at once, so the
    /// application can finish their work and release them.
    newly_held: bool,
    incarnation: u64,
    reset: AutoOffsetReset,
    listener: Option<Box<dyn RebalanceListener>>,
    last_commit: Instant,
    /// The commit [`GroupConsumer::commit_in_background`] started, if it has not been
    /// reaped yet: its offsets count as committed only once it succeeded.
    background: Option<BackgroundCommit>,
    /// Records [`GroupConsumer::records`] polled but has not handed out yet; their
    /// partitions' positions stay at the first of them, so a commit never covers them.
    held: VecDeque<ConsumedRecord>,
}

/// A fetch of granted partitions' committed offsets under way.
struct OffsetsFetch {
    partitions: Vec<TopicPartition>,
    /// The membership it was asked for: an answer for an earlier one is not used.
    incarnation: u64,
    task: JoinHandle<Result<FetchOffsetsResponse>>,
}

/// A commit started by [`GroupConsumer::commit_in_background`], and the offsets it carries.
struct BackgroundCommit {
    offsets: Vec<OffsetCommit>,
    task: JoinHandle<Result<u32>>,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("group", &self.config.group)
            .field("member_id", &self.member_id())
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

async fn join_request(
    client: &Client,
    config: &GroupConfig,
    member_id: Option<String>,
) -> Result<quiver_protocol::requests::JoinGroupResponse> {
    let req = JoinGroupRequest {
        group: config.group.clone(),
        member_id,
        client_id: config.client_id.clone(),
        subscription: config.subscription.clone(),
        session_timeout_ms: config.session_timeout.as_millis().min(u128::from(u32::MAX)) as u32,
        strategy: config.strategy,
        auto_offset_reset: config.auto_offset_reset,
    };
    Ok(client
        .request_for_group(&req.group, &req, Bytes::new())
        .await?
        .0)
}

fn is_code(e: &ClientError, codes: &[ErrorCode]) -> bool {
    e.code().is_some_and(|c| codes.contains(&c))
}

impl GroupConsumer {
    /// Joins the group and starts heartbeating. Partitions arrive in later `poll`s.
    pub async fn join(client: Client, config: GroupConfig) -> Result<GroupConsumer> {
        let resp = join_request(&client, &config, None).await?;
        tracing::info!(group = %config.group, member = %resp.member_id, generation = resp.generation, "joined group");
        let link = Arc::new(Link {
            state: Mutex::new(Shared {
                member_id: resp.member_id,
                generation: resp.generation,
                ..Shared::default()
            }),
            changed: Notify::new(),
            released: Notify::new(),
        });
        let span = tracing::debug_span!("heartbeat", group = %config.group);
        let heartbeats = tokio::spawn(
            heartbeat_loop(
                client.clone(),
                config.clone(),
                link.clone(),
                resp.heartbeat_interval_ms,
            )
            .instrument(span),
        );
        let fetch = ConsumerConfig {
            start: SeekTo::End,
            ..config.fetch.clone()
        };
        Ok(GroupConsumer {
            consumer: Consumer::new(client.clone(), fetch),
            client,
            link,
            heartbeats,
            owned: BTreeSet::new(),
            positions: BTreeMap::new(),
            committed: BTreeMap::new(),
            committed_metadata: BTreeMap::new(),
            pending_metadata: BTreeMap::new(),
            stored: BTreeMap::new(),
            grant_ids: BTreeMap::new(),
            grants: 0,
            grants_waiting: false,
            offsets_fetch: None,
            held_revoked: BTreeSet::new(),
            newly_held: false,
            incarnation: 0,
            reset: resp.auto_offset_reset,
            listener: None,
            last_commit: Instant::now(),
            background: None,
            held: VecDeque::new(),
            config,
        })
    }

    /// Sets the rebalance callbacks.
    pub fn set_listener(&mut self, listener: impl RebalanceListener + 'static) {
        self.listener = Some(Box::new(listener));
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.config.group
    }

    /// Notes offsets committed another way (in a transaction, see
    /// [`TransactionalProducer::commit`](crate::TransactionalProducer::commit)): later
    /// commits and `close` do not store them again.
    pub fn mark_committed(&mut self, offsets: &[OffsetCommit]) {
        for o in offsets {
            self.note_committed(o);
        }
        self.last_commit = Instant::now();
    }

    /// This member's id.
    pub fn member_id(&self) -> String {
        self.link.lock().member_id.clone()
    }

    /// The generation last heard.
    pub fn generation(&self) -> u64 {
        self.link.lock().generation
    }

    /// The partitions this member reads now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.iter().cloned().collect()
    }

    /// Moves the positions of a poll's partitions past what follows their last record in
    /// its chunk (a transaction's marker, aborted records): a commit of them then leaves
    /// no lag of 1 behind each transaction of a transactional input.
    fn past_chunk_ends(&mut self, recs: &[ConsumedRecord]) {
        let mut i = 0;
        while i < recs.len() {
            let r = &recs[i];
            let run = recs[i..]
                .iter()
                .take_while(|x| x.partition == r.partition && x.topic == r.topic)
                .count();
            let last = recs[i + run - 1].offset;
            let next = self.consumer.next_after(&r.topic, r.partition, last);
            if let Some(p) = self
                .positions
                .get_mut(&TopicPartition::new(r.topic.to_string(), r.partition))
            {
                *p = (*p).max(next);
            }
            i += run;
        }
    }

    /// Moves the positions of owned partitions that had no record in a poll past the chunks
    /// it decoded for them: a chunk of nothing but a transaction's marker, or of aborted
    /// records a read-committed consumer skips (what a producer that aborted last leaves).
    /// Without this a commit left them as lag until more records came.
    fn past_skipped_chunks(&mut self, recs: &[ConsumedRecord]) {
        // The partitions of the poll, one entry per run of records.
        let mut polled: Vec<(&str, u32)> = Vec::new();
        for r in recs {
            if polled.last() != Some(&(&*r.topic, r.partition)) {
                polled.push((&*r.topic, r.partition));
            }
        }
        for (tp, p) in self.positions.iter_mut() {
            if !self.owned.contains(tp) || polled.contains(&(tp.topic.as_str(), tp.partition)) {
                continue;
            }
            if let Some(now) = self.consumer.decoded_position(&tp.topic, tp.partition) {
                *p = (*p).max(now);
            }
        }
    }

    /// Stores the positions of the records handed out for the next commit, with
    /// [`GroupConfig::commit_stored_offsets`]: for an application that has finished every
    /// record handed out, so that what the positions moved past without records
    /// (transaction markers, aborted records) is committed too.
    pub fn store_positions(&mut self) {
        let positions: Vec<(TopicPartition, i64)> = self
            .positions
            .iter()
            .map(|(tp, p)| (tp.clone(), *p))
            .collect();
        for (tp, p) in positions {
            self.store_offset(&tp.topic, tp.partition, p);
        }
    }

    /// True when a position of an owned partition differs from what this member last
    /// committed for it (or it has never committed there).
    pub fn has_uncommitted_positions(&self) -> bool {
        self.positions
            .iter()
            .any(|(tp, p)| self.owned.contains(tp) && self.committed.get(tp) != Some(p))
    }

    /// The next offset after the records handed out, per partition.
    pub fn positions(&self) -> BTreeMap<TopicPartition, i64> {
        self.positions.clone()
    }

    /// The metadata stored with the committed offset of a partition this member owns (as
    /// found when the partition was granted, or as last committed by this member).
    pub fn committed_metadata(&self, topic: &str, partition: u32) -> Option<String> {
        self.committed_metadata
            .get(&TopicPartition::new(topic, partition))
            .cloned()
    }

    /// Stores `metadata` with the next commit of `topic`/`partition` (committed even when
    /// the position did not move, once the partition has a position). Ignored for a
    /// partition this member does not own, as [`store_offset`](Self::store_offset) is: it
    /// would otherwise wait there and go out with a later grant's commit.
    pub fn set_commit_metadata(&mut self, topic: &str, partition: u32, metadata: String) {
        let tp = TopicPartition::new(topic, partition);
        if !self.owned.contains(&tp) {
            return;
        }
        self.pending_metadata.insert(tp, metadata);
    }

    /// Which grant of `topic`/`partition` this member holds: a different id each time the
    /// partition is granted, so an application that keeps work per partition can tell that
    /// it was lost (or given away) and granted again — reading then restarts from the
    /// committed offset — even when that happened within one poll. `None` when not owned.
    pub fn grant_id(&self, topic: &str, partition: u32) -> Option<u64> {
        self.grant_ids
            .get(&TopicPartition::new(topic, partition))
            .copied()
    }

    /// Marks the records of `topic`/`partition` below `offset` as done: with
    /// [`GroupConfig::commit_stored_offsets`], the next commit stores this offset (never
    /// one lower than stored before). Ignored for a partition this member does not own.
    pub fn store_offset(&mut self, topic: &str, partition: u32, offset: i64) {
        let tp = TopicPartition::new(topic, partition);
        if !self.owned.contains(&tp) {
            return;
        }
        let e = self.stored.entry(tp).or_insert(offset);
        *e = (*e).max(offset);
    }

    /// Treats records of `topic`/`partition` from `offset` on as not consumed: the next
    /// commit stores at most `offset` for it, and the next polls hand them out again (else
    /// a poll would move the position past them, and a commit skip them).
    pub fn rewind(&mut self, topic: &str, partition: u32, offset: i64) {
        let tp = TopicPartition::new(topic, partition);
        let behind = self.positions.get(&tp).is_some_and(|p| *p > offset);
        if let Some(p) = self.positions.get_mut(&tp) {
            *p = (*p).min(offset);
        }
        if let Some(p) = self.stored.get_mut(&tp) {
            *p = (*p).min(offset);
        }
        if behind && self.owned.contains(&tp) {
            if let Err(e) = self.consumer.seek(topic, partition, SeekTo::Offset(offset)) {
                tracing::warn!(group = %self.config.group, %topic, partition, error = %e, "cannot read again from a rewound offset");
            }
        }
    }

    /// Applies the latest heartbeat answer: releases revoked partitions, drops lost ones,
    /// starts granted ones.
    async fn apply_changes(&mut self) -> Result<()> {
        let (assignment, revoke, incarnation, fatal) = {
            let s = self.link.lock();
            (
                s.assignment.clone(),
                s.revoke.clone(),
                s.incarnation,
                s.fatal.clone(),
            )
        };
        if let Some(e) = fatal {
            return Err(e);
        }
        // Lost: re-joined, or no longer ours at all.
        let lost: Vec<TopicPartition> = if incarnation != self.incarnation {
            self.incarnation = incarnation;
            self.owned.iter().cloned().collect()
        } else {
            self.owned
                .iter()
                .filter(|tp| !assignment.contains(*tp) && !revoke.contains(*tp))
                .cloned()
                .collect()
        };
        if !lost.is_empty() {
            tracing::warn!(group = %self.config.group, partitions = lost.len(), "partitions lost without a commit");
            self.drop_partitions(&lost);
            if let Some(l) = self.listener.as_mut() {
                l.on_lost(&lost);
            }
        }
        // Held revoked partitions the coordinator no longer asks back (still granted): read
        // on from where this member is, under the same grant (its work in flight still
        // counts). One never read starts again below from the group's commit.
        let resumed: Vec<TopicPartition> = self
            .held_revoked
            .iter()
            .filter(|tp| !revoke.contains(*tp))
            .cloned()
            .collect();
        for tp in &resumed {
            self.held_revoked.remove(tp);
            match self.positions.get(tp).copied() {
                Some(at) => {
                    self.consumer.assign(&tp.topic, [tp.partition]).await?;
                    self.consumer
                        .seek(&tp.topic, tp.partition, SeekTo::Offset(at))?;
                    tracing::info!(group = %self.config.group, topic = %tp.topic, partition = tp.partition, "a held revoked partition is this member's again");
                }
                None => self.drop_partitions(std::slice::from_ref(tp)),
            }
        }
        // Revoked: stop, tell the user, commit, release (or hold, with `hold_revoked`).
        let revoked: Vec<TopicPartition> = self
            .owned
            .iter()
            .filter(|tp| revoke.contains(*tp))
            .cloned()
            .collect();
        let mut released_now = false;
        if !revoked.is_empty() {
            for tp in &revoked {
                self.consumer.unassign(&tp.topic, [tp.partition]);
            }
            if self.config.hold_revoked {
                let newly: Vec<TopicPartition> = revoked
                    .iter()
                    .filter(|tp| !self.held_revoked.contains(*tp))
                    .cloned()
                    .collect();
                if !newly.is_empty() {
                    tracing::info!(group = %self.config.group, partitions = ?newly, "revoked partitions held until the application releases them");
                    self.held_revoked.extend(newly);
                    self.newly_held = true;
                }
            } else {
                self.release(&revoked).await;
                released_now = true;
            }
        }
        // Revoked ones we never started are released at once. The grants below are read
        // under the same lock, from the answer as it is now: the commit above awaited, and a
        // newer answer may have revoked a partition granted in the one read at the top (it
        // is released here, and must not be started too).
        let (assignment, rejoined) = {
            let mut s = self.link.lock();
            let before = s.released.len();
            s.release_unowned(&self.owned);
            let assignment: BTreeSet<TopicPartition> = s
                .assignment
                .iter()
                .filter(|tp| !s.revoke.contains(*tp))
                .cloned()
                .collect();
            let rejoined = s.incarnation != self.incarnation;
            if s.released.len() != before || released_now {
                drop(s);
                self.link.released.notify_one();
            }
            (assignment, rejoined)
        };
        if rejoined {
            // Joined again meanwhile: the next call starts over from the new membership.
            return Ok(());
        }
        // Granted: start at the committed offset, else this member's start, else the
        // group's reset policy.
        let granted: Vec<TopicPartition> = assignment.difference(&self.owned).cloned().collect();
        self.grants_waiting = false;
        // A fetch asked for another set of grants (one of them revoked or lost before it
        // started, or granted since) is not used: its answer may predate commits of another
        // owner the partition had meanwhile. It runs to its end on its own.
        if self
            .offsets_fetch
            .as_ref()
            .is_some_and(|f| f.partitions != granted || f.incarnation != self.incarnation)
        {
            self.offsets_fetch = None;
        }
        if self.newly_held {
            // `poll` returns now, so the application can finish the held partitions' work
            // and release them; grants start at the next call.
            return Ok(());
        }
        if !granted.is_empty() {
            let Some(resp) = self.granted_offsets(&granted).await? else {
                // Not answered yet: the partitions stay granted and not started (starting
                // them could reprocess what a pending transaction commits), and the
                // partitions this member reads go on meanwhile; `poll` looks again within
                // `GRANT_RETRY`.
                self.grants_waiting = true;
                return Ok(());
            };
            let mut committed: BTreeMap<TopicPartition, i64> = BTreeMap::new();
            for o in resp.offsets {
                let tp = TopicPartition::new(o.topic, o.partition);
                if let Some(off) = o.offset {
                    committed.insert(tp.clone(), off);
                }
                match o.metadata {
                    Some(m) => self.committed_metadata.insert(tp, m),
                    None => self.committed_metadata.remove(&tp),
                };
            }
            let mut started_at_end = Vec::new();
            for tp in &granted {
                self.consumer.assign(&tp.topic, [tp.partition]).await?;
                let known = committed.get(tp).copied();
                if let Some(o) = known {
                    self.committed.insert(tp.clone(), o);
                    self.positions.insert(tp.clone(), o);
                    self.stored.insert(tp.clone(), o);
                }
                let mut to = start_position(known, self.config.start_without_commit, self.reset);
                if to == SeekTo::End {
                    // "The latest records" means those after this grant, once: the offset is
                    // resolved now and committed below, so a later owner of the partition
                    // starts here too instead of at the end of its own grant, skipping what
                    // came between. If it cannot be resolved now, the fetch finds the end
                    // (and the next grant tries again).
                    let spec = self.end_spec();
                    match list_offset(&self.client, &tp.topic, tp.partition, spec).await {
                        Ok(end) => {
                            self.positions.insert(tp.clone(), end);
                            self.stored.insert(tp.clone(), end);
                            started_at_end.push(tp.clone());
                            to = SeekTo::Offset(end);
                        }
                        Err(e) => {
                            tracing::warn!(group = %self.config.group, topic = %tp.topic, partition = tp.partition, error = %e, "cannot resolve the start at the latest records; starting at the end the fetch finds")
                        }
                    }
                }
                self.consumer.seek(&tp.topic, tp.partition, to)?;
                self.owned.insert(tp.clone());
                self.grants += 1;
                self.grant_ids.insert(tp.clone(), self.grants);
            }
            tracing::info!(group = %self.config.group, partitions = ?granted, "assigned");
            if !started_at_end.is_empty() {
                // Best effort: the member's next commit carries these offsets too.
                if let Err(e) = self.commit_partitions(&started_at_end).await {
                    tracing::warn!(group = %self.config.group, error = %e, "commit of the start offsets failed");
                }
            }
            if let Some(l) = self.listener.as_mut() {
                l.on_assigned(&granted);
            }
        }
        Ok(())
    }

    /// Tells the user, commits (as configured) and drops revoked partitions; the caller
    /// then marks them released for the heartbeat task.
    async fn release(&mut self, revoked: &[TopicPartition]) {
        if let Some(l) = self.listener.as_mut() {
            l.on_revoked(revoked);
        }
        if self.config.commit_on_revoke || self.config.auto_commit.is_some() {
            if let Err(e) = self.commit_partitions(revoked).await {
                tracing::warn!(group = %self.config.group, error = %e, "commit of revoked partitions failed");
            }
        }
        self.drop_partitions(revoked);
        tracing::info!(group = %self.config.group, partitions = ?revoked, "released revoked partitions");
    }

    /// True when revoked partitions are held for [`release_revoked`](Self::release_revoked)
    /// (`hold_revoked`).
    pub fn holds_revoked(&self) -> bool {
        !self.held_revoked.is_empty()
    }

    /// Releases the revoked partitions held so far (`hold_revoked`): commits them as a
    /// revoke does (the offsets stored by now, with `commit_stored_offsets`) and gives them
    /// back, so the coordinator can grant them to their next owner.
    pub async fn release_revoked(&mut self) {
        let held: Vec<TopicPartition> = std::mem::take(&mut self.held_revoked)
            .into_iter()
            .filter(|tp| self.owned.contains(tp))
            .collect();
        if held.is_empty() {
            return;
        }
        self.release(&held).await;
        // Only these: a revoked partition never started (its offsets maybe still being
        // fetched) is released by the next `apply_changes`, which drops that fetch first, so
        // its answer is never used for a later grant after another owner's commits.
        self.link.lock().released.extend(held);
        self.link.released.notify_one();
    }

    /// The committed offsets of `granted`, fetched in a task of its own so that a
    /// coordinator waiting for a transaction that holds some of them (up to 20 s a
    /// request) does not hold up this member's other partitions. `None` while the answer
    /// has not come (after a short wait, which covers the usual quick answer) or the
    /// fetch failed in a way worth retrying (it is asked again at the next call).
    async fn granted_offsets(
        &mut self,
        granted: &[TopicPartition],
    ) -> Result<Option<FetchOffsetsResponse>> {
        // The caller dropped a fetch asked for other grants (its task runs to its end on
        // its own, its answer unused).
        let starting = self.offsets_fetch.is_none();
        if starting {
            let req = FetchOffsetsRequest {
                group: self.config.group.clone(),
                partitions: Some(granted.to_vec()),
            };
            let client = self.client.clone();
            let link = self.link.clone();
            let task = tokio::spawn(
                async move {
                    let answer = client
                        .request_for_group(&req.group, &req, Bytes::new())
                        .await
                        .map(|(resp, _)| resp);
                    // A poll waiting for records wakes up to start the grants.
                    link.changed.notify_one();
                    answer
                }
                .in_current_span(),
            );
            self.offsets_fetch = Some(OffsetsFetch {
                partitions: granted.to_vec(),
                incarnation: self.incarnation,
                task,
            });
        }
        let Some(fetch) = self.offsets_fetch.as_mut() else {
            return Ok(None);
        };
        // Only the call that starts the fetch waits (for the usual quick answer); later
        // calls look without waiting, so a long wait of the coordinator does not slow every
        // poll meanwhile (the task wakes `poll` when it ends).
        if !starting && !fetch.task.is_finished() {
            return Ok(None);
        }
        let done = match tokio::time::timeout(OFFSETS_FETCH_WAIT, &mut fetch.task).await {
            Ok(done) => done,
            Err(_) => return Ok(None),
        };
        self.offsets_fetch = None;
        match done {
            Ok(Ok(resp)) => Ok(Some(resp)),
            // A transaction holding some of these offsets has not ended (the coordinator
            // answers "retry" after its wait), or the coordinator is slow or moving.
            Ok(Err(e)) if e.is_retriable() => {
                tracing::info!(group = %self.config.group, partitions = ?granted, error = %e, "committed offsets not available yet; asking again");
                Ok(None)
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(ClientError::Broker {
                code: ErrorCode::Internal,
                message: format!("the offset fetch task failed: {e}"),
            }),
        }
    }

    fn drop_partitions(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.held_revoked.remove(tp);
            self.consumer.unassign(&tp.topic, [tp.partition]);
            self.owned.remove(tp);
            self.positions.remove(tp);
            self.committed.remove(tp);
            self.committed_metadata.remove(tp);
            self.pending_metadata.remove(tp);
            self.stored.remove(tp);
            self.grant_ids.remove(tp);
        }
    }

    /// Waits up to the fetch config's `max_wait_ms` for records of the assigned partitions.
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>> {
        self.poll_timeout(Duration::from_millis(u64::from(
            self.config.fetch.max_wait_ms,
        )))
        .await
    }

    /// Waits up to `timeout` for records; applies assignment changes and auto-commits on
    /// the way. Records handed out count as consumed at the next commit.
    pub async fn poll_timeout(&mut self, timeout: Duration) -> Result<Vec<ConsumedRecord>> {
        // Records a stream polled but did not hand out come first.
        if !self.held.is_empty() {
            let mut recs: Vec<ConsumedRecord> = self.held.drain(..).collect();
            keep_owned(&self.owned, &mut self.positions, &mut recs);
            if !recs.is_empty() {
                return Ok(recs);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            self.apply_changes().await?;
            if std::mem::take(&mut self.newly_held) {
                return Ok(Vec::new());
            }
            if let Some(every) = self.config.auto_commit {
                if self.last_commit.elapsed() >= every {
                    if let Err(e) = self.commit().await {
                        tracing::warn!(group = %self.config.group, error = %e, "auto-commit failed");
                    }
                }
            }
            let link = self.link.clone();
            let changed = link.changed.notified();
            tokio::pin!(changed);
            // Grants waiting for their offsets are asked for again soon, however long
            // this poll may wait.
            let until = if self.grants_waiting {
                deadline.min(Instant::now() + GRANT_RETRY)
            } else {
                deadline
            };
            let records = if self.owned.is_empty() {
                tokio::select! {
                    _ = &mut changed => None,
                    _ = tokio::time::sleep_until(until) => Some(Vec::new()),
                }
            } else {
                tokio::select! {
                    biased;
                    _ = &mut changed => None,
                    r = self.consumer.poll_timeout(until.saturating_duration_since(Instant::now())) => Some(r?),
                }
            };
            match records {
                Some(mut recs) => {
                    keep_owned(&self.owned, &mut self.positions, &mut recs);
                    self.past_chunk_ends(&recs);
                    self.past_skipped_chunks(&recs);
                    if !recs.is_empty() || Instant::now() >= deadline {
                        return Ok(recs);
                    }
                }
                None if Instant::now() >= deadline => return Ok(Vec::new()),
                None => {}
            }
        }
    }

    /// All records as an async stream. A record counts as handed out (and its offset may
    /// be committed) once the stream yields it: records polled but not yet yielded stay
    /// with the consumer, and the next poll or stream returns them first.
    pub fn records(&mut self) -> impl Stream<Item = Result<ConsumedRecord>> + '_ {
        futures::stream::unfold(self, |c| async move {
            loop {
                // A stream's records are done once handed out: nothing to finish before
                // revoked partitions go (with `hold_revoked`).
                c.release_revoked().await;
                if let Some(r) = hand_out(&mut c.held, &c.owned, &mut c.positions) {
                    return Some((Ok(r), c));
                }
                match c.poll_timeout(Duration::from_secs(3600)).await {
                    Ok(v) => hold(&mut c.held, &mut c.positions, v),
                    Err(e) => return Some((Err(e), c)),
                }
            }
        })
    }

    /// Commits the positions of the records handed out so far; returns how many offsets
    /// were stored. Waits until the broker has them on disk.
    pub async fn commit(&mut self) -> Result<u32> {
        let all: Vec<TopicPartition> = self.owned.iter().cloned().collect();
        self.commit_partitions(&all).await
    }

    /// Starts a commit of the current positions in the background; the handle yields its
    /// result.
    pub fn commit_async(&mut self) -> JoinHandle<Result<u32>> {
        let offsets = self.pending_commits(&self.owned.iter().cloned().collect::<Vec<_>>());
        for o in &offsets {
            self.note_committed(o);
        }
        self.spawn_commit(offsets)
    }

    /// Sends `offsets` as this member's commit in a task of its own.
    fn spawn_commit(&mut self, offsets: Vec<OffsetCommit>) -> JoinHandle<Result<u32>> {
        self.last_commit = Instant::now();
        let (client, link, group) = (
            self.client.clone(),
            self.link.clone(),
            self.config.group.clone(),
        );
        let incarnation = self.incarnation;
        tokio::spawn(
            async move { send_commit(&client, &link, &group, incarnation, offsets).await }
                .in_current_span(),
        )
    }

    /// Starts committing, in the background, what [`commit`](Self::commit) would commit
    /// now, and returns at once (Kafka's `commitAsync`, one at a time): an application
    /// that goes on processing while its commit travels. If the last commit started this
    /// way is still running, nothing is started: the next call (or commit) carries these
    /// offsets too. Offsets count as committed only once their commit succeeded; every
    /// other commit of this member (explicit, on revoke, at close) first waits for the one
    /// in the background, so commits land in the order they were made.
    ///
    /// Returns the error of the last background commit if it failed (its offsets go with
    /// the next commit).
    pub fn commit_in_background(&mut self) -> Result<()> {
        use futures::FutureExt;
        if let Some(b) = self.background.as_mut() {
            let Some(done) = (&mut b.task).now_or_never() else {
                return Ok(());
            };
            let b = self.background.take().expect("checked above");
            self.reap(b.offsets, done)?;
        }
        let offsets = self.pending_commits(&self.owned.iter().cloned().collect::<Vec<_>>());
        if offsets.is_empty() {
            return Ok(());
        }
        let task = self.spawn_commit(offsets.clone());
        self.background = Some(BackgroundCommit { offsets, task });
        Ok(())
    }

    /// Waits for the commit running in the background, if any. Its failure is only
    /// logged: its offsets were not noted as committed, so the commit that follows carries
    /// them.
    async fn settle_background_commit(&mut self) {
        let Some(b) = self.background.take() else {
            return;
        };
        let done = b.task.await;
        if let Err(e) = self.reap(b.offsets, done) {
            tracing::warn!(group = %self.config.group, error = %e, "a background commit failed; its offsets go with the next commit");
        }
    }

    /// Notes a finished background commit's offsets as committed if it succeeded (for the
    /// partitions still owned: one lost meanwhile starts afresh from the group's commit
    /// if it is granted again).
    fn reap(
        &mut self,
        offsets: Vec<OffsetCommit>,
        done: std::result::Result<Result<u32>, tokio::task::JoinError>,
    ) -> Result<()> {
        match done {
            Ok(Ok(_)) => {
                for o in &offsets {
                    if self
                        .owned
                        .contains(&TopicPartition::new(o.topic.clone(), o.partition))
                    {
                        self.note_committed(o);
                    }
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(ClientError::Broker {
                code: ErrorCode::Internal,
                message: format!("the background commit task failed: {e}"),
            }),
        }
    }

    fn pending_commits(&self, tps: &[TopicPartition]) -> Vec<OffsetCommit> {
        tps.iter()
            .filter_map(|tp| {
                let pos = if self.config.commit_stored_offsets {
                    *self.stored.get(tp)?
                } else {
                    *self.positions.get(tp)?
                };
                let metadata = self.pending_metadata.get(tp).cloned();
                (self.committed.get(tp) != Some(&pos) || metadata.is_some()).then(|| OffsetCommit {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    offset: pos,
                    metadata: metadata.or_else(|| self.committed_metadata.get(tp).cloned()),
                })
            })
            .collect()
    }

    fn note_committed(&mut self, o: &OffsetCommit) {
        let tp = TopicPartition::new(o.topic.clone(), o.partition);
        self.committed.insert(tp.clone(), o.offset);
        if let Some(m) = &o.metadata {
            if self.pending_metadata.get(&tp) == Some(m) {
                self.pending_metadata.remove(&tp);
            }
            self.committed_metadata.insert(tp, m.clone());
        }
    }

    async fn commit_partitions(&mut self, tps: &[TopicPartition]) -> Result<u32> {
        self.settle_background_commit().await;
        self.last_commit = Instant::now();
        let offsets = self.pending_commits(tps);
        if offsets.is_empty() {
            return Ok(0);
        }
        let n = send_commit(
            &self.client,
            &self.link,
            &self.config.group,
            self.incarnation,
            offsets.clone(),
        )
        .await?;
        for o in &offsets {
            self.note_committed(o);
        }
        Ok(n)
    }

    /// True when every partition this member reads has been consumed up to its end offset
    /// now, and no assignment change is pending.
    pub async fn caught_up(&mut self) -> Result<bool> {
        {
            let s = self.link.lock();
            if s.answers == 0
                || !s.revoke.is_empty()
                || s.assignment != self.owned
                || s.incarnation != self.incarnation
            {
                return Ok(false);
            }
        }
        for tp in &self.owned {
            let end = list_offset(&self.client, &tp.topic, tp.partition, self.end_spec()).await?;
            let pos = match self.positions.get(tp) {
                Some(&p) => p,
                None => self.consumer.position(&tp.topic, tp.partition).await?,
            };
            if pos < end {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Where a partition's readable records end for this member's isolation.
    fn end_spec(&self) -> OffsetSpec {
        match self.config.fetch.isolation {
            crate::Isolation::ReadUncommitted => OffsetSpec::Latest,
            crate::Isolation::ReadCommitted => OffsetSpec::LastStable,
        }
    }

    /// Commits, leaves the group (its partitions go to the others at once), and stops.
    pub async fn close(mut self) -> Result<()> {
        let committed = self.commit().await;
        self.leave_now(committed).await
    }

    /// Leaves the group without committing anything (e.g. after a failed transaction:
    /// the next owner starts from the last commit).
    pub async fn close_without_commit(self) -> Result<()> {
        self.leave_now(Ok(0)).await
    }

    async fn leave_now(self, committed: Result<u32>) -> Result<()> {
        let member_id = {
            let mut s = self.link.lock();
            s.closed = true;
            s.member_id.clone()
        };
        self.link.released.notify_one();
        self.heartbeats.abort();
        let left = send_leave(&self.client, &self.config.group, member_id).await;
        if left.is_ok() {
            self.link.lock().left = true;
        }
        committed?;
        left
    }

    /// A handle that can take this member out of its group after the consumer is gone
    /// without [`close`](GroupConsumer::close): see [`GroupLeaver`].
    pub fn leaver(&self) -> GroupLeaver {
        GroupLeaver {
            client: self.client.clone(),
            group: self.config.group.clone(),
            link: self.link.clone(),
        }
    }
}

/// Takes a member out of its group when its [`GroupConsumer`] went away without leaving:
/// its task was aborted (even in the middle of `close`), or it returned early on an error.
/// Dropping a consumer stops its heartbeats but sends nothing, so without this the member
/// keeps its partitions, and the group stays non-empty, until its session times out. Does
/// nothing for a member that has left; commits nothing.
#[derive(Clone)]
pub struct GroupLeaver {
    client: Client,
    group: String,
    link: Arc<Link>,
}

impl std::fmt::Debug for GroupLeaver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLeaver")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl GroupLeaver {
    /// Leaves as the member the consumer was last (its heartbeats may have joined again
    /// under a new id). Call it once the consumer is dropped: a live one stops
    /// heartbeating.
    pub async fn leave(&self) -> Result<()> {
        let member_id = {
            let mut s = self.link.lock();
            if s.left {
                return Ok(());
            }
            s.closed = true;
            s.member_id.clone()
        };
        self.link.released.notify_one();
        send_leave(&self.client, &self.group, member_id).await?;
        self.link.lock().left = true;
        Ok(())
    }

    /// True once the member has left (by `close` or [`leave`](Self::leave)).
    pub fn has_left(&self) -> bool {
        self.link.lock().left
    }
}

/// Sends LeaveGroup; a member or group the coordinator no longer knows has left already.
async fn send_leave(client: &Client, group: &str, member_id: String) -> Result<()> {
    let req = LeaveGroupRequest {
        group: group.to_string(),
        member_id,
    };
    match client
        .request_for_group(&req.group, &req, Bytes::new())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, &[ErrorCode::UnknownMember, ErrorCode::UnknownGroup]) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

/// Sends a commit of positions read under membership `incarnation`; a stale generation (a
/// revocation not heard yet) is retried with the generation the heartbeat task brings in,
/// for a few seconds. Positions of an earlier membership (the heartbeats joined again since)
/// are refused with `UnknownMember`: the new member may own the same partitions, which
/// another member may have processed further meanwhile, and they would move back.
async fn send_commit(
    client: &Client,
    link: &Link,
    group: &str,
    incarnation: u64,
    offsets: Vec<OffsetCommit>,
) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (member_id, generation) = {
            let s = link.lock();
            if s.incarnation != incarnation {
                return Err(ClientError::Broker {
                    code: ErrorCode::UnknownMember,
                    message: format!(
                        "this member joined group {group} again after these positions were read; they are not committed"
                    ),
                });
            }
            (s.member_id.clone(), s.generation)
        };
        let req = CommitOffsetsRequest {
            group: group.to_string(),
            member_id,
            generation,
            offsets: offsets.clone(),
        };
        match client
            .request_for_group(&req.group, &req, Bytes::new())
            .await
        {
            Ok((r, _)) => return Ok(r.committed),
            Err(e) if is_code(&e, &[ErrorCode::StaleGeneration]) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The heartbeat long-poll loop: keeps the member alive and publishes assignment changes.
async fn heartbeat_loop(client: Client, config: GroupConfig, link: Arc<Link>, interval_ms: u32) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut interval = Duration::from_millis(u64::from(interval_ms));
    loop {
        let req = {
            let s = link.lock();
            if s.closed {
                return;
            }
            HeartbeatRequest {
                group: config.group.clone(),
                member_id: s.member_id.clone(),
                generation: s.generation,
                owned: s.owned(),
            }
        };
        let timeout = client.config().request_timeout + interval;
        let released = link.released.notified();
        tokio::pin!(released);
        let result = tokio::select! {
            r = client.request_for_group_with_timeout(&req.group, &req, Bytes::new(), timeout) => r,
            // Something was released: report it now instead of waiting for this answer.
            _ = &mut released => continue,
        };
        match result {
            Ok((resp, _)) => {
                backoff.reset();
                let mut s = link.lock();
                s.generation = resp.generation;
                s.assignment = resp.assignment.into_iter().collect();
                s.revoke = resp.revoke.into_iter().collect();
                let revoke = s.revoke.clone();
                s.released.retain(|tp| revoke.contains(tp));
                s.answers += 1;
                drop(s);
                tracing::debug!(generation = resp.generation, "heartbeat answered");
                link.changed.notify_one();
            }
            Err(e)
                if is_code(
                    &e,
                    &[
                        ErrorCode::UnknownMember,
                        ErrorCode::UnknownGroup,
                        ErrorCode::StaleGeneration,
                    ],
                ) =>
            {
                tracing::warn!(group = %config.group, error = %e, "no longer a member; joining again");
                match join_request(&client, &config, None).await {
                    Ok(j) => {
                        interval = Duration::from_millis(u64::from(j.heartbeat_interval_ms));
                        let mut s = link.lock();
                        s.member_id = j.member_id;
                        s.generation = j.generation;
                        s.assignment.clear();
                        s.revoke.clear();
                        s.released.clear();
                        s.incarnation += 1;
                        drop(s);
                        link.changed.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(group = %config.group, error = %e, "re-join failed; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
            Err(e) if e.is_retriable() => {
                tracing::debug!(error = %e, "heartbeat failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                tracing::error!(group = %config.group, error = %e, "heartbeat failed");
                let mut s = link.lock();
                s.fatal = Some(e);
                drop(s);
                link.changed.notify_one();
                return;
            }
        }
    }
}

/// Drops the records of partitions not in `owned` and moves each owned partition's
/// position past its last record. A poll holds runs of one partition's records, so each
/// run is looked up once, not each record.
fn keep_owned(
    owned: &BTreeSet<TopicPartition>,
    positions: &mut BTreeMap<TopicPartition, i64>,
    recs: &mut Vec<ConsumedRecord>,
) {
    let mut runs: Vec<(TopicPartition, bool)> = Vec::new();
    let mut start = 0;
    while start < recs.len() {
        let (topic, partition) = (&recs[start].topic, recs[start].partition);
        let end = recs[start..]
            .iter()
            // Records of one fetch share their topic's name: pointers first.
            .position(|r| {
                r.partition != partition || !(Arc::ptr_eq(&r.topic, topic) || r.topic == *topic)
            })
            .map_or(recs.len(), |n| start + n);
        let tp = TopicPartition::new(topic.to_string(), partition);
        let is_owned = owned.contains(&tp);
        if is_owned {
            positions.insert(tp.clone(), recs[end - 1].offset + 1);
        }
        runs.push((tp, is_owned));
        start = end;
    }
    if runs.iter().all(|(_, is_owned)| *is_owned) {
        return;
    }
    recs.retain(|r| {
        runs.iter()
            .any(|(tp, is_owned)| *is_owned && tp.partition == r.partition && *tp.topic == *r.topic)
    });
}

/// Keeps polled records for a stream to hand out one by one: each partition's position
/// goes back to its first kept record.
fn hold(
    held: &mut VecDeque<ConsumedRecord>,
    positions: &mut BTreeMap<TopicPartition, i64>,
    recs: Vec<ConsumedRecord>,
) {
    let mut seen: BTreeSet<(&str, u32)> = BTreeSet::new();
    for r in &recs {
        if seen.insert((&r.topic, r.partition)) {
            positions.insert(
                TopicPartition::new(r.topic.to_string(), r.partition),
                r.offset,
            );
        }
    }
    held.extend(recs);
}

/// The next kept record of a partition still owned (a revoked one's were committed up to
/// its first kept record when it was revoked), with its partition's position moved past it.
fn hand_out(
    held: &mut VecDeque<ConsumedRecord>,
    owned: &BTreeSet<TopicPartition>,
    positions: &mut BTreeMap<TopicPartition, i64>,
) -> Option<ConsumedRecord> {
    while let Some(r) = held.pop_front() {
        let tp = TopicPartition::new(r.topic.to_string(), r.partition);
        if owned.contains(&tp) {
            positions.insert(tp, r.offset + 1);
            return Some(r);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that stops early leaves the records it did not yield uncommitted: the
    /// positions cover exactly what was handed out, and a revoked partition's kept records
    /// are not handed out.
    #[test]
    fn a_stream_commits_only_what_it_handed_out() {
        let tp = |p| TopicPartition::new("t".to_string(), p);
        let mut owned = BTreeSet::from([tp(0), tp(1)]);
        // What a poll leaves: positions past everything it returned.
        let mut positions = BTreeMap::from([(tp(0), 13), (tp(1), 7)]);
        let mut held = VecDeque::new();
        let t: Arc<str> = Arc::from("t");
        let polled = vec![
            rec(&t, 0, 10),
            rec(&t, 1, 5),
            rec(&t, 0, 11),
            rec(&t, 0, 12),
            rec(&t, 1, 6),
        ];
        hold(&mut held, &mut positions, polled);
        assert_eq!(positions, BTreeMap::from([(tp(0), 10), (tp(1), 5)]));
        let first = hand_out(&mut held, &owned, &mut positions).unwrap();
        assert_eq!((first.partition, first.offset), (0, 10));
        assert_eq!(positions[&tp(0)], 11);
        assert_eq!(
            positions[&tp(1)],
            5,
            "nothing of partition 1 handed out yet"
        );
        // Partition 1 is revoked: its kept records are skipped.
        owned.remove(&tp(1));
        let rest: Vec<i64> = std::iter::from_fn(|| hand_out(&mut held, &owned, &mut positions))
            .map(|r| r.offset)
            .collect();
        assert_eq!(rest, vec![11, 12]);
        assert_eq!(positions[&tp(0)], 13);
    }

    #[test]
    fn granted_partitions_start_at_the_commit_else_the_member_choice_else_the_group_policy() {
        use AutoOffsetReset::{Earliest, Latest};
        // A committed offset wins over both settings.
        for member in [None, Some(Earliest), Some(Latest)] {
            for group in [Earliest, Latest] {
                assert_eq!(start_position(Some(42), member, group), SeekTo::Offset(42));
            }
        }
        // No commit: the member's choice (--from-beginning) over the group's policy.
        assert_eq!(
            start_position(None, Some(Earliest), Latest),
            SeekTo::Beginning
        );
        assert_eq!(start_position(None, Some(Latest), Earliest), SeekTo::End);
        assert_eq!(start_position(None, None, Latest), SeekTo::End);
        assert_eq!(start_position(None, None, Earliest), SeekTo::Beginning);
    }

    fn rec(topic: &Arc<str>, partition: u32, offset: i64) -> ConsumedRecord {
        ConsumedRecord {
            topic: topic.clone(),
            partition,
            offset,
            timestamp: 0,
            key: None,
            value: Bytes::new(),
            headers: Vec::new(),
        }
    }

    /// Records of partitions given away are dropped; each kept partition's position is
    /// past its last record, also when its records come in several runs.
    #[test]
    fn a_poll_keeps_owned_partitions_and_moves_their_positions_past_their_last_record() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let tp = |t: &str, p: u32| TopicPartition::new(t.to_string(), p);
        let owned = BTreeSet::from([tp("a", 0), tp("b", 0)]);
        let mut positions = BTreeMap::new();
        let mut recs = vec![
            rec(&a, 0, 5),
            rec(&a, 0, 6),
            rec(&a, 1, 9),
            rec(&b, 0, 1),
            rec(&a, 0, 7),
            rec(&a, 1, 10),
        ];
        keep_owned(&owned, &mut positions, &mut recs);
        let kept: Vec<(String, u32, i64)> = recs
            .iter()
            .map(|r| (r.topic.to_string(), r.partition, r.offset))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("a".into(), 0, 5),
                ("a".into(), 0, 6),
                ("b".into(), 0, 1),
                ("a".into(), 0, 7)
            ]
        );
        assert_eq!(
            positions,
            BTreeMap::from([(tp("a", 0), 8), (tp("b", 0), 2)]),
            "a/1 is not owned: no position"
        );
        // All owned: nothing dropped; an empty poll changes nothing.
        let mut all = vec![rec(&b, 0, 2), rec(&b, 0, 3)];
        keep_owned(&owned, &mut positions, &mut all);
        assert_eq!(all.len(), 2);
        assert_eq!(positions[&tp("b", 0)], 4);
        let before = positions.clone();
        keep_owned(&owned, &mut positions, &mut Vec::new());
        assert_eq!(positions, before);
    }
}
