//! [`ReplicaManager`]: a cluster broker acting on the controller's metadata.
//!
//! Every [`RECONCILE_INTERVAL`] it reads the metadata this broker applied and makes the
//! broker match it: its copies of the controller's topics exist (and local topics the
//! controller no longer has go), and every partition it holds a replica of has the right
//! role — leader (its log records the new epoch first, see
//! [`PartitionLog::become_leader`]) or follower (a [`follow`] task copying from the
//! leader). As leader it keeps each partition's [`LeaderState`], moves the high watermark
//! when the ISR's positions allow, and proposes ISR changes to the controller with the
//! partition epoch it saw (Kafka's AlterPartition). Nothing is done before the metadata
//! holds this process's own registration: until then this broker's copy may be behind.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::follower::{follow, FollowTarget};
use super::leader::LeaderState;
use super::peers::PeerClients;
use crate::cluster::{
    BrokerId, Controller, ControllerCommand, ControllerResponse, ControllerState,
    PartitionAssignment, PartitionRecord,
};
use crate::group::{GroupDirectory, GroupService, OFFSETS_TOPIC};
use crate::log::{Flusher, PartitionLog};
use crate::topic::{is_internal, TopicRegistry};
use quiver_protocol::ErrorCode;

/// How often a leader hands leaderships back to preferred replicas that are in sync again.
pub const PREFERRED_LEADER_CHECK: Duration = Duration::from_secs(10);

/// How often the broker applies the controller's metadata.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(100);

/// Why a replication request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("broker {me} is not the leader of {topic}/{partition} (the leader is {leader}); refresh metadata and retry there")]
    NotLeader {
        me: BrokerId,
        topic: String,
        partition: u32,
        leader: String,
    },
    #[error("{topic}/{partition} is at leader epoch {current}, not {given}")]
    FencedLeaderEpoch {
        topic: String,
        partition: u32,
        current: u64,
        given: u64,
    },
    #[error("{topic}/{partition} has {isr} in-sync replicas, fewer than min.insync.replicas = {min}: an acks=all write cannot be acknowledged (nothing was written); retry when replicas are back")]
    NotEnoughReplicas {
        topic: String,
        partition: u32,
        isr: usize,
        min: usize,
    },
    #[error("broker {broker} holds no replica of {topic}/{partition}")]
    NotReplica {
        broker: BrokerId,
        topic: String,
        partition: u32,
    },
    #[error("{0}")]
    Timeout(String),
}

impl ReplicaError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReplicaError::NotLeader { .. } => ErrorCode::NotLeader,
            ReplicaError::FencedLeaderEpoch { .. } => ErrorCode::FencedLeaderEpoch,
            ReplicaError::NotEnoughReplicas { .. } => ErrorCode::NotEnoughReplicas,
            ReplicaError::NotReplica { .. } => ErrorCode::ClusterAuthorizationFailed,
            ReplicaError::Timeout(_) => ErrorCode::RequestTimedOut,
        }
    }
}

enum Role {
    Leader {
        epoch: u64,
        state: Arc<Mutex<LeaderState>>,
        /// The log this role is of: a topic deleted and made again under the same name has
        /// a new log (and starts at epoch 0 again), which needs a role of its own.
        log: std::sync::Weak<PartitionLog>,
    },
    Follower {
        leader: BrokerId,
        epoch: u64,
        stop: watch::Sender<bool>,
        log: std::sync::Weak<PartitionLog>,
    },
}

impl Role {
    /// Whether this role is of `log` (not of an earlier log of the same name).
    fn is_of(&self, log: &Arc<PartitionLog>) -> bool {
        let (Role::Leader { log: of, .. } | Role::Follower { log: of, .. }) = self;
        std::ptr::eq(of.as_ptr(), Arc::as_ptr(log))
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Role::Follower { stop, .. } = self {
            let _ = stop.send(true);
        }
    }
}

type PartitionKey = (String, u32);

/// What a [`ReplicaManager`] needs from its broker.
pub struct ReplicaSetup {
    /// This broker's id and the epoch it registered with.
    pub me: BrokerId,
    pub registered_epoch: u64,
    pub topics: Arc<TopicRegistry>,
    pub flusher: Arc<Flusher>,
    pub controller: Arc<Controller>,
    pub peers: PeerClients,
    /// `replica.lag.max.ms`.
    pub lag_max_ms: i64,
    /// Largest batch a follower accepts from its leader.
    pub max_batch_bytes: usize,
    /// The consumer groups this broker coordinates (those of the offsets partitions it leads).
    pub groups: Arc<GroupDirectory>,
    /// What the transaction coordinators of the offsets partitions share.
    pub txn_env: Arc<crate::txn::TxnEnv>,
    /// Replicas of each `__consumer_offsets` partition.
    pub offsets_replication: usize,
    /// Largest decompressed batch when replaying group records, and when to compact them.
    pub group_log: crate::group::GroupLogLimits,
    /// The broker's plugins (installed and removed as the controller says).
    pub plugins: Arc<crate::plugin::PluginService>,
    /// The broker's pipeline host, told which deployed pipeline instances to run here.
    pub pipelines: crate::pipelines::PipelineSlot,
}

/// Partitions of `__consumer_offsets` in a cluster (a group's coordinator is the leader of
/// the partition its name hashes to).
pub const OFFSETS_PARTITIONS: u32 = 6;

/// A cluster broker's replicas: see the module documentation.
pub struct ReplicaManager {
    this: std::sync::Weak<ReplicaManager>,
    me: BrokerId,
    registered_epoch: u64,
    topics: Arc<TopicRegistry>,
    flusher: Arc<Flusher>,
    controller: Arc<Controller>,
    peers: Arc<PeerClients>,
    lag_max_ms: i64,
    max_batch_bytes: usize,
    groups: Arc<GroupDirectory>,
    txn_env: Arc<crate::txn::TxnEnv>,
    offsets_replication: usize,
    group_log: crate::group::GroupLogLimits,
    view: RwLock<Arc<ControllerState>>,
    plugin_sync: Arc<super::plugins::PluginSync>,
    pipelines: crate::pipelines::PipelineSlot,
    /// The pipeline assignment last passed to the host (passed again only when it changes).
    assigned: Mutex<Option<Vec<crate::pipelines::AssignedPipeline>>>,
    ready: AtomicBool,
    roles: Mutex<HashMap<PartitionKey, Role>>,
    proposing: Arc<Mutex<HashSet<PartitionKey>>>,
    /// Topics whose lost copy (a damaged local record) is being reported to the controller.
    reporting_lost: Arc<Mutex<HashSet<String>>>,
    /// When leaderships last went back to preferred replicas.
    last_balance: Mutex<std::time::Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplicaManager {
    /// Starts applying the controller's metadata until `stop`.
    pub fn start(setup: ReplicaSetup, stop: watch::Receiver<bool>) -> Arc<ReplicaManager> {
        let rm = Arc::new_cyclic(|this| ReplicaManager {
            this: this.clone(),
            me: setup.me,
            registered_epoch: setup.registered_epoch,
            topics: setup.topics,
            flusher: setup.flusher,
            controller: setup.controller,
            peers: Arc::new(setup.peers),
            lag_max_ms: setup.lag_max_ms,
            max_batch_bytes: setup.max_batch_bytes,
            groups: setup.groups,
            txn_env: setup.txn_env,
            offsets_replication: setup.offsets_replication,
            group_log: setup.group_log,
            view: RwLock::new(Arc::new(ControllerState::default())),
            plugin_sync: Arc::new(super::plugins::PluginSync::new(setup.plugins)),
            pipelines: setup.pipelines,
            assigned: Mutex::new(None),
            ready: AtomicBool::new(false),
            roles: Mutex::new(HashMap::new()),
            proposing: Arc::default(),
            reporting_lost: Arc::default(),
            last_balance: Mutex::new(std::time::Instant::now()),
        });
        tokio::spawn(rm.clone().run(stop));
        rm
    }

    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            self.reconcile().await;
        }
        lock(&self.roles).clear();
    }

    /// Clients of the other brokers.
    pub fn peers(&self) -> &PeerClients {
        &self.peers
    }

    /// The controller's metadata as this broker last applied it.
    pub fn view(&self) -> Arc<ControllerState> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True once this broker acts on metadata that includes its own registration.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// This broker's id.
    pub fn id(&self) -> BrokerId {
        self.me
    }

    /// The controller (to propose topic changes).
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    fn not_leader(&self, topic: &str, partition: u32) -> ReplicaError {
        let leader = self
            .view()
            .partition(topic, partition)
            .map(|p| match p.leader {
                Some(l) => format!("broker {l}"),
                None => "none: the partition is offline".to_string(),
            })
            .unwrap_or_else(|| "unknown".into());
        ReplicaError::NotLeader {
            me: self.me,
            topic: topic.to_string(),
            partition,
            leader,
        }
    }

    /// Maps a failed local lookup of a partition to `NotLeader`, which clients retry after
    /// refreshing metadata: a client only asks this broker because some broker's metadata
    /// named it the leader, so the topic is one this broker has not applied yet (or one
    /// deleted meanwhile, which the refreshed metadata will say).
    pub fn not_ready(
        &self,
        topic: &str,
        partition: u32,
        e: crate::topic::TopicError,
    ) -> crate::server::requests::RequestError {
        match e {
            crate::topic::TopicError::NotFound(_) | crate::topic::TopicError::NoPartition { .. } => {
                crate::server::requests::RequestError::new(
                    ErrorCode::NotLeader,
                    format!(
                        "broker {} has no {topic}/{partition} (yet): its metadata may be behind; refresh metadata and retry",
                        self.me
                    ),
                )
            }
            other => other.into(),
        }
    }

    /// This broker's leadership of the partition, or `NotLeader`.
    pub fn leader(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Arc<Mutex<LeaderState>>, ReplicaError> {
        match lock(&self.roles).get(&(topic.to_string(), partition)) {
            Some(Role::Leader { state, .. }) => Ok(state.clone()),
            _ => Err(self.not_leader(topic, partition)),
        }
    }

    /// Checks that this broker leads the partition at `epoch`.
    pub fn check_leader_epoch(
        &self,
        topic: &str,
        partition: u32,
        epoch: u64,
    ) -> Result<(), ReplicaError> {
        match lock(&self.roles).get(&(topic.to_string(), partition)) {
            Some(Role::Leader { epoch: e, .. }) if *e == epoch => Ok(()),
            Some(Role::Leader { epoch: e, .. }) => Err(ReplicaError::FencedLeaderEpoch {
                topic: topic.to_string(),
                partition,
                current: *e,
                given: epoch,
            }),
            _ => Err(self.not_leader(topic, partition)),
        }
    }

    /// Refuses an `acks=all` write while the ISR is below `min.insync.replicas`.
    pub fn check_enough_replicas(&self, topic: &str, partition: u32) -> Result<(), ReplicaError> {
        let leader = self.leader(topic, partition)?;
        let st = lock(&leader);
        let (isr, min) = st.isr_size(crate::clock::now_ms(), self.lag_max_ms);
        if isr < min {
            return Err(ReplicaError::NotEnoughReplicas {
                topic: topic.to_string(),
                partition,
                isr,
                min,
            });
        }
        Ok(())
    }

    /// The leader flushed its log up to `end`: the high watermark may move.
    pub fn leader_flushed(&self, log: &PartitionLog, end: i64) {
        if let Ok(state) = self.leader(&log.topic, log.partition) {
            let mut st = lock(&state);
            st.leader_flushed(end);
            if let Some(hw) = st.high_watermark() {
                log.advance_high_watermark(hw);
            }
        }
    }

    /// Follower `replica` (in its incarnation `broker_epoch`) fetches from `offset` at
    /// leader epoch `epoch`, its log durable below `flushed`.
    pub fn follower_fetched(
        &self,
        log: &PartitionLog,
        replica: BrokerId,
        broker_epoch: u64,
        epoch: u64,
        offset: i64,
        flushed: i64,
    ) -> Result<(), ReplicaError> {
        self.check_leader_epoch(&log.topic, log.partition, epoch)?;
        let state = self.leader(&log.topic, log.partition)?;
        let mut st = lock(&state);
        let log_end = log.snapshot().log_end;
        let now = crate::clock::now_ms();
        if !st.follower_position(replica, broker_epoch, offset, flushed, log_end, now) {
            return Err(ReplicaError::NotReplica {
                broker: replica,
                topic: log.topic.clone(),
                partition: log.partition,
            });
        }
        if let Some(hw) = st.high_watermark() {
            log.advance_high_watermark(hw);
        }
        Ok(())
    }

    /// Waits until the high watermark passes `last_offset` (an `acks=all` write), failing
    /// at once when this broker stops leading or the ISR falls below its minimum. `led` is
    /// the leader epoch the write was appended under (or at which a coordinator's service
    /// took the partition over): a leadership taken again later, at another epoch, is not
    /// the writer's (the write may have been truncated and replaced in between), and its
    /// high watermark acknowledges nothing. `None` takes the leadership current now.
    pub async fn wait_committed_under(
        &self,
        log: &PartitionLog,
        last_offset: i64,
        led: Option<u64>,
        deadline: tokio::time::Instant,
    ) -> Result<(), ReplicaError> {
        let epoch = match lock(&self.roles).get(&(log.topic.clone(), log.partition)) {
            Some(Role::Leader { epoch, .. }) if led.is_none_or(|l| l == *epoch) => *epoch,
            _ => return Err(self.not_leader(&log.topic, log.partition)),
        };
        loop {
            // The high watermark belongs to the log, not to this leadership: once this broker
            // follows, it takes the new leader's, over records that replaced this write. Read
            // it first, then require the same leadership (epochs only grow; the follower's
            // fetches start after its role changed): only then did this leadership set it.
            let high_watermark = log.snapshot().high_watermark;
            self.check_leader_epoch(&log.topic, log.partition, epoch)
                .map_err(|_| self.not_leader(&log.topic, log.partition))?;
            if high_watermark > last_offset {
                return Ok(());
            }
            self.check_enough_replicas(&log.topic, log.partition)?;
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ReplicaError::Timeout(format!(
                    "the in-sync replicas of {}/{} did not confirm offset {last_offset} in time",
                    log.topic, log.partition
                )));
            }
            log.wait_beyond(last_offset, deadline.min(now + Duration::from_millis(100)))
                .await;
        }
    }

    /// One pass: make this broker match the controller's metadata.
    async fn reconcile(self: &Arc<Self>) {
        let state = self.controller.state().await;
        let ready = state
            .broker(self.me)
            .is_some_and(|b| b.broker_epoch == self.registered_epoch);
        let state = Arc::new(state);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = state.clone();
        if !ready {
            return;
        }
        self.ready.store(true, Ordering::Release);
        let this = self.clone();
        let st2 = state.clone();
        let synced = tokio::task::spawn_blocking(move || this.sync_topics(&st2)).await;
        if let Ok(Err(e)) = synced {
            tracing::warn!(error = %e, "cannot apply the controller's topics");
        }
        let plugins = self.plugin_sync.clone();
        let st2 = state.clone();
        let _ = tokio::task::spawn_blocking(move || plugins.apply(&st2)).await;
        let moved_away = self.sync_roles(&state);
        if !moved_away.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for (topic, partition, log) in moved_away {
                    match log.drop_moved_replica() {
                        Ok(bytes) => tracing::info!(%topic, partition, bytes, "dropped the local copy of a partition moved to other brokers"),
                        Err(e) => tracing::warn!(%topic, partition, error = %e, "cannot drop the local copy of a partition moved away; retrying"),
                    }
                }
            })
            .await;
        }
        self.check_isr(&state);
        self.ensure_offsets_topic(&state).await;
        self.sync_groups(&state).await;
        self.place_pipelines(&state).await;
        self.assign_pipelines(&state);
    }

    /// The lowest live broker proposes a new placement for each deployed pipeline whose
    /// instances are not balanced over the live brokers (see [`crate::cluster::placement`]).
    async fn place_pipelines(&self, state: &ControllerState) {
        let lowest = state.brokers.values().find(|b| !b.fenced).map(|b| b.id);
        if lowest != Some(self.me) {
            return;
        }
        for name in state.pipelines.keys() {
            let Some(placement) = state.pipeline_placement_due(name) else {
                continue;
            };
            let cmd = ControllerCommand::PlacePipeline {
                name: name.clone(),
                placement: placement.clone(),
            };
            match self.controller.propose(cmd).await {
                Ok(ControllerResponse::Refused(e)) => {
                    tracing::debug!(pipeline = %name, error = %e, "pipeline placement refused")
                }
                Ok(_) => {
                    tracing::info!(pipeline = %name, ?placement, "placed the pipeline's instances")
                }
                Err(e) => {
                    tracing::debug!(pipeline = %name, error = %e, "pipeline placement failed; retrying")
                }
            }
        }
    }

    /// Tells the pipeline host (once installed) which deployed instances run here, when
    /// that changes.
    fn assign_pipelines(&self, state: &ControllerState) {
        let Ok(host) = self.pipelines.host() else {
            return;
        };
        let wanted: Vec<crate::pipelines::AssignedPipeline> = state
            .pipelines
            .values()
            .map(|p| crate::pipelines::AssignedPipeline {
                name: p.name.clone(),
                config_toml: p.config_toml.clone(),
                instances: state.pipeline_instances(&p.name, self.me),
                deploy_number: p.deploy_number,
            })
            .collect();
        let mut last = lock(&self.assigned);
        if last.as_ref() != Some(&wanted) {
            host.assign(wanted.clone());
            *last = Some(wanted);
        }
    }

    /// The lowest live broker creates `__consumer_offsets` once enough brokers are live to
    /// give it its replication.
    async fn ensure_offsets_topic(&self, state: &ControllerState) {
        if state.topic(OFFSETS_TOPIC).is_some() {
            return;
        }
        let live = state.live_brokers();
        if live.first() != Some(&self.me) || live.len() < self.offsets_replication {
            return;
        }
        let partitions = (0..OFFSETS_PARTITIONS as usize)
            .map(|p| PartitionAssignment {
                replicas: (0..self.offsets_replication)
                    .map(|i| live[(p + i) % live.len()])
                    .collect(),
            })
            .collect();
        let cmd = ControllerCommand::CreateTopic {
            name: OFFSETS_TOPIC.to_string(),
            topic_id: state.next_topic_id(),
            partitions,
            config: BTreeMap::from([
                ("retention.ms".to_string(), "-1".to_string()),
                ("flush".to_string(), "batch".to_string()),
            ]),
        };
        match self.controller.propose(cmd).await {
            Ok(ControllerResponse::Refused(e)) => {
                tracing::debug!(error = %e, "creating the offsets topic refused")
            }
            Ok(_) => tracing::info!(
                partitions = OFFSETS_PARTITIONS,
                replicas = self.offsets_replication,
                "created {OFFSETS_TOPIC}"
            ),
            Err(e) => tracing::debug!(error = %e, "creating the offsets topic failed; retrying"),
        }
    }

    /// Serves the groups of every offsets partition this broker leads (replaying a
    /// partition when it takes it over), and no others.
    async fn sync_groups(&self, state: &ControllerState) {
        let Some(topic) = state.topic(OFFSETS_TOPIC) else {
            return;
        };
        self.groups.set_partitions(topic.partitions.len() as u32);
        let led: Vec<(u32, u64)> = {
            let roles = lock(&self.roles);
            (0..topic.partitions.len() as u32)
                .filter_map(|p| match roles.get(&(OFFSETS_TOPIC.to_string(), p)) {
                    Some(Role::Leader { epoch, .. }) => Some((p, *epoch)),
                    _ => None,
                })
                .collect()
        };
        self.groups.retain(|p| led.iter().any(|(l, _)| *l == p));
        for (p, epoch) in led {
            if self.groups.led_epoch(p) == Some(epoch) {
                continue;
            }
            let Ok((t, log)) = self.topics.partition(OFFSETS_TOPIC, p) else {
                continue;
            };
            let (topics, flusher, config, limits) = (
                self.topics.clone(),
                self.flusher.clone(),
                t.config(),
                self.group_log,
            );
            let replicas = self.me_weak();
            let opened = tokio::task::spawn_blocking(move || {
                GroupService::open_on(topics, flusher, log, config, limits, replicas)
            })
            .await;
            match opened {
                Ok(Ok((service, replayed))) => {
                    tracing::info!(
                        partition = p,
                        epoch,
                        transactional_ids = replayed.txn_states.len(),
                        "coordinating the groups and transactions of {OFFSETS_TOPIC} partition {p}"
                    );
                    let txns = crate::txn::TxnCoordinator::new(
                        service.clone(),
                        replayed.txn_states,
                        self.txn_env.clone(),
                    );
                    self.groups.install(p, epoch, service, txns);
                }
                Ok(Err(e)) => {
                    tracing::error!(partition = p, error = %e, "cannot load the groups of an offsets partition")
                }
                Err(e) => {
                    tracing::error!(partition = p, error = %e, "loading the groups of an offsets partition failed")
                }
            }
        }
    }

    fn me_weak(&self) -> std::sync::Weak<ReplicaManager> {
        self.this.clone()
    }

    /// Creates, replaces and deletes local topics to match the controller's.
    fn sync_topics(&self, state: &ControllerState) -> Result<(), crate::topic::TopicError> {
        for t in state.topics.values() {
            match self.topics.ensure_replica(
                &t.name,
                t.partitions.len() as u32,
                &t.config,
                t.topic_id,
            ) {
                // Unreadable here (its open logged why): the copy is gone. Replaced by an
                // empty replica only once no ISR counts on this broker's copy (after a
                // restart it has left every ISR but those it was the last member of; the
                // controller takes it out of those too when told, leaving such a partition
                // offline rather than led by an empty log). Its leaders then count only
                // this incarnation's fetches (KIP-903), so it rejoins once caught up.
                // (A damaged record of an internal topic stops the start: not seen here.)
                Err(crate::topic::TopicError::Damaged { .. }) if is_internal(&t.name) => continue,
                Err(crate::topic::TopicError::Damaged { .. }) => {
                    let counted = t
                        .partitions
                        .iter()
                        .any(|p| p.isr.contains(&self.me) || p.leader == Some(self.me));
                    if counted {
                        self.report_lost(&t.name);
                        continue;
                    }
                    tracing::warn!(topic = %t.name, "replacing the damaged local record of a topic with an empty replica, copied from its leaders");
                    self.topics.replace_damaged(
                        &t.name,
                        t.partitions.len() as u32,
                        &t.config,
                        t.topic_id,
                    )?
                }
                r => r?,
            };
        }
        for local in self.topics.list() {
            let name = local.name();
            if !is_internal(&name) && state.topic(&name).is_none() {
                tracing::info!(topic = %name, "the controller has no such topic; deleting the local copy");
                self.topics.delete(&name)?;
            }
        }
        // A damaged record of a topic the cluster no longer holds is dropped too: nothing
        // of it is needed, and it would keep a topic of that name created later from
        // having a replica here.
        for name in self.topics.damaged() {
            if !is_internal(&name) && state.topic(&name).is_none() {
                tracing::info!(topic = %name, "the controller has no such topic; dropping its damaged local record");
                self.topics.delete(&name)?;
            }
        }
        Ok(())
    }

    /// Takes the right role for every partition this broker holds a replica of.
    /// Gives every partition this broker holds a replica of its role, and returns the
    /// partitions it holds a copy of without being a replica (moved away), to be dropped.
    fn sync_roles(&self, state: &ControllerState) -> Vec<(String, u32, Arc<PartitionLog>)> {
        let now = crate::clock::now_ms();
        let mut roles = lock(&self.roles);
        let mut seen = HashSet::new();
        let mut moved_away = Vec::new();
        for t in state.topics.values() {
            let Some(local) = self.topics.get(&t.name) else {
                continue;
            };
            for (i, p) in t.partitions.iter().enumerate() {
                let Some(log) = local.partitions.get(i) else {
                    continue;
                };
                if !p.replicas.contains(&self.me) {
                    // Not (or no longer) a replica here: a partition moved away leaves no
                    // copy behind (its role, if any, ends with it; the copy goes after this
                    // pass, off the async threads and without the roles lock).
                    let had_role = roles.remove(&(t.name.clone(), i as u32)).is_some();
                    if had_role || log.has_data() {
                        moved_away.push((t.name.clone(), i as u32, log.clone()));
                    }
                    continue;
                }
                let key = (t.name.clone(), i as u32);
                seen.insert(key.clone());
                log.set_replicated();
                let min_isr = local.config().min_insync_replicas;
                match p.leader {
                    Some(l) if l == self.me => {
                        if let Some(role @ Role::Leader { epoch, state, .. }) = roles.get(&key) {
                            if *epoch == p.leader_epoch && role.is_of(log) {
                                lock(state).update(p, min_isr, now);
                                continue;
                            }
                        }
                        if let Err(e) = log.become_leader(p.leader_epoch as i32) {
                            tracing::error!(topic = %t.name, partition = i, error = %e, "cannot take leadership");
                            continue;
                        }
                        let end = log.snapshot().log_end;
                        tracing::info!(topic = %t.name, partition = i, epoch = p.leader_epoch, log_end = end, isr = ?p.isr, "leading");
                        roles.insert(
                            key,
                            Role::Leader {
                                epoch: p.leader_epoch,
                                state: Arc::new(Mutex::new(LeaderState::new(
                                    self.me, p, min_isr, end, now,
                                ))),
                                log: Arc::downgrade(log),
                            },
                        );
                    }
                    Some(l) => {
                        if let Some(role @ Role::Follower { leader, epoch, .. }) = roles.get(&key) {
                            if *leader == l && *epoch == p.leader_epoch && role.is_of(log) {
                                continue;
                            }
                        }
                        let Some(addr) = state.broker(l).map(|b| b.addr.clone()) else {
                            continue;
                        };
                        roles.remove(&key);
                        let generation = match log.become_follower(p.leader_epoch as i32) {
                            Ok(g) => g,
                            Err(e) => {
                                tracing::error!(topic = %t.name, partition = i, error = %e, "cannot follow");
                                continue;
                            }
                        };
                        tracing::info!(topic = %t.name, partition = i, leader = l, epoch = p.leader_epoch, "following");
                        let (stop_tx, stop_rx) = watch::channel(false);
                        tokio::spawn(follow(
                            log.clone(),
                            FollowTarget {
                                me: self.me,
                                broker_epoch: self.registered_epoch,
                                leader: l,
                                leader_addr: addr,
                                leader_epoch: p.leader_epoch,
                                generation,
                            },
                            self.peers.clone(),
                            self.flusher.clone(),
                            self.max_batch_bytes,
                            stop_rx,
                        ));
                        roles.insert(
                            key,
                            Role::Follower {
                                leader: l,
                                epoch: p.leader_epoch,
                                stop: stop_tx,
                                log: Arc::downgrade(log),
                            },
                        );
                    }
                    None => {
                        if roles.remove(&key).is_some() {
                            log.end_role();
                        }
                    }
                }
            }
        }
        roles.retain(|k, _| seen.contains(k));
        moved_away
    }

    /// Tells the controller that this broker's copy of `topic` is lost (once at a time).
    fn report_lost(&self, topic: &str) {
        if !lock(&self.reporting_lost).insert(topic.to_string()) {
            return;
        }
        let cmd = ControllerCommand::ReplicaLost {
            id: self.me,
            epoch: self.registered_epoch,
            topic: topic.to_string(),
        };
        tracing::warn!(topic, "this broker's copy of the topic is lost (its record is damaged); asking the controller to take it out of the topic's ISRs");
        let controller = self.controller.clone();
        let reporting = self.reporting_lost.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            match controller.propose(cmd).await {
                Ok(crate::cluster::ControllerResponse::Refused(e)) => {
                    tracing::info!(%topic, error = %e, "the report of a lost copy was refused")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%topic, error = %e, "the report of a lost copy was not delivered")
                }
            }
            // Give the change time to reach this broker's view before asking again.
            tokio::time::sleep(Duration::from_millis(500)).await;
            lock(&reporting).remove(&topic);
        });
    }

    /// As leader: moves high watermarks the ISR allows and proposes ISR changes.
    fn check_isr(&self, state: &ControllerState) {
        let now = crate::clock::now_ms();
        let balance = {
            let mut last = lock(&self.last_balance);
            let due = last.elapsed() >= PREFERRED_LEADER_CHECK;
            if due {
                *last = std::time::Instant::now();
            }
            due
        };
        let leaders: Vec<(PartitionKey, Arc<Mutex<LeaderState>>)> = lock(&self.roles)
            .iter()
            .filter_map(|(k, r)| match r {
                Role::Leader { state, .. } => Some((k.clone(), state.clone())),
                _ => None,
            })
            .collect();
        for ((topic, partition), leader) in leaders {
            let Ok((_, log)) = self.topics.partition(&topic, partition) else {
                continue;
            };
            let (wanted, epochs, broker_epochs) = {
                let st = lock(&leader);
                if let Some(hw) = st.high_watermark() {
                    log.advance_high_watermark(hw);
                }
                let hw = log.snapshot().high_watermark;
                let registered = |id| state.broker(id).map(|b| b.broker_epoch);
                let wanted = st.wanted_isr(now, hw, self.lag_max_ms, registered);
                let broker_epochs = wanted
                    .as_deref()
                    .map(|isr| st.added_broker_epochs(isr))
                    .unwrap_or_default();
                (wanted, (st.leader_epoch, st.partition_epoch), broker_epochs)
            };
            let Some(record) = state
                .partition(&topic, partition)
                .filter(|p| p.partition_epoch == epochs.1)
            else {
                continue;
            };
            // A reassignment whose wanted replicas are all in sync is finished; otherwise an
            // ISR that should change is proposed.
            // Replicas a proposal adds count for the high watermark once it is sent (below).
            let mut adds: Option<Vec<BrokerId>> = None;
            let cmd = match (&record.target, wanted) {
                (Some(target), _) if target.iter().all(|r| record.isr.contains(r)) => {
                    ControllerCommand::CompleteReassignment {
                        topic: topic.clone(),
                        partition,
                        partition_epoch: epochs.1,
                    }
                }
                // Only live brokers are proposed into the ISR (a dead one's last fetch may
                // still look caught up).
                (_, Some(isr))
                    if isr.iter().all(|r| {
                        record.isr.contains(r) || state.broker(*r).is_some_and(|b| !b.fenced)
                    }) =>
                {
                    adds = Some(isr.clone());
                    ControllerCommand::UpdatePartition {
                        topic: topic.clone(),
                        partition,
                        leader: Some(self.me),
                        leader_epoch: epochs.0,
                        partition_epoch: epochs.1,
                        isr,
                        broker_epochs,
                    }
                }
                // Preferred-leader election: once the first replica is back in sync, the
                // leadership it was given at creation returns to it (checked every
                // PREFERRED_LEADER_CHECK, like Kafka's auto leader rebalance).
                (None, None)
                    if balance
                        && record.replicas.first().is_some_and(|&r| {
                            r != self.me
                                && record.isr.contains(&r)
                                && state.broker(r).is_some_and(|b| !b.fenced)
                        }) =>
                {
                    ControllerCommand::UpdatePartition {
                        topic: topic.clone(),
                        partition,
                        leader: record.replicas.first().copied(),
                        leader_epoch: epochs.0,
                        partition_epoch: epochs.1,
                        isr: record.isr.clone(),
                        broker_epochs: BTreeMap::new(),
                    }
                }
                _ => continue,
            };
            let key = (topic.clone(), partition);
            if !lock(&self.proposing).insert(key.clone()) {
                // One in flight: its additions keep counting, whatever this pass wanted.
                continue;
            }
            if let Some(isr) = &adds {
                lock(&leader).proposing(isr);
            }
            tracing::info!(%topic, partition, ?cmd, "proposing a partition change");
            let controller = self.controller.clone();
            let proposing = self.proposing.clone();
            let state_of_leader = leader.clone();
            tokio::spawn(async move {
                // Proposed additions stop counting for the high watermark only when the change
                // was definitely not made. A stale partition epoch means this broker's view is
                // behind (the recorded ISR may already hold them), and a proposal not known
                // to be delivered may have been applied: in both, they keep counting until
                // the view's next partition record says who is in (`LeaderState::update`).
                // Dropping them early let the high watermark pass a replica the controller
                // had in the ISR, and might elect.
                match controller.propose(cmd).await {
                    Ok(crate::cluster::ControllerResponse::Refused(
                        e @ crate::cluster::ControllerError::StalePartitionEpoch { .. },
                    )) => {
                        tracing::debug!(%topic, partition, error = %e, "partition change decided on an old view");
                    }
                    Ok(crate::cluster::ControllerResponse::Refused(e)) => {
                        tracing::info!(%topic, partition, error = %e, "partition change refused");
                        lock(&state_of_leader).proposal_failed();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(%topic, partition, error = %e, "partition change not known to be delivered");
                    }
                }
                // Give the applied change time to reach this broker's view.
                tokio::time::sleep(Duration::from_millis(200)).await;
                lock(&proposing).remove(&key);
            });
        }
    }

    /// The number of partitions whose ISR is smaller than their replica set, and of those
    /// with no leader, in `state`.
    pub fn health(state: &ControllerState) -> (u64, u64) {
        let parts = || state.topics.values().flat_map(|t| t.partitions.iter());
        let under = parts()
            .filter(|p: &&PartitionRecord| p.isr.len() < p.replicas.len())
            .count();
        let offline = parts().filter(|p| p.leader.is_none()).count();
        (under as u64, offline as u64)
    }
}
