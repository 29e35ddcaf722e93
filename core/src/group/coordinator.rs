//! [`GroupCoordinator`]: the deterministic state machine of every group this broker
//! coordinates — membership, session expiry, incremental assignment, committed offsets.
//!
//! It never reads a clock, sleeps, or touches storage: each method takes `now` (ms, any
//! monotonic origin) and a request, mutates the state, and returns an answer (plus, for
//! durable changes, the [`GroupRecord`]s the caller must persist before answering).
//! Partition counts come in as a [`TopicSnapshot`]. What happened is queued as
//! [`GroupEvent`]s, which the service logs and tests inspect.
//!
//! Assignment moves in two steps: when the target says a partition belongs to another
//! member, it goes into its current owner's `revoking` set; only when that owner's
//! heartbeat stops listing it (or the owner leaves or expires) is it granted to the new
//! owner. A partition is therefore never in two members' `assigned` sets.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use quiver_protocol::requests::{
    AutoOffsetReset, CommitOffsetsRequest, CommitOffsetsResponse, CommittedOffset,
    FetchOffsetsRequest, FetchOffsetsResponse, GroupDescription, GroupListing,
    GroupPartitionDescription, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, ListGroupsResponse, MemberDescription, Strategy, Subscription,
    TopicPartition,
};
use quiver_protocol::ErrorCode;

use super::assignor::{self, Assignment, MemberTopics};
use super::records::{GroupMetaValue, GroupRecord, OffsetValue};

/// Longest client id a member may join with (it is part of its member id, kept for its
/// session and shown by `group describe`).
pub const MAX_CLIENT_ID_BYTES: usize = 256;
/// Most topics one member may subscribe to by name (each checked on every rebalance).
pub const MAX_SUBSCRIBED_TOPICS: usize = 10_000;
/// Longest subscription pattern.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Most partitions a heartbeat may say its member holds.
pub const MAX_OWNED_PARTITIONS: usize = 100_000;
/// Longest metadata string stored with a committed offset (Kafka's
/// `offset.metadata.max.bytes` default).
pub const MAX_OFFSET_METADATA_BYTES: usize = 4096;

/// Topic name → partition count, for every topic that exists now.
pub type TopicSnapshot = BTreeMap<String, u32>;

/// `(topic, partition)` → `(log start, log end, high watermark)` of a partition that exists.
pub type LogOffsets<'a> = &'a dyn Fn(&str, u32) -> Option<(i64, i64, i64)>;

/// Default most members of one group (`group_max_size`).
pub const DEFAULT_GROUP_MAX_SIZE: usize = 1000;

/// Limits the coordinator enforces.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Smallest session timeout a member may ask for.
    pub min_session_timeout_ms: u32,
    /// Largest session timeout a member may ask for.
    pub max_session_timeout_ms: u32,
    /// Prefix of member ids (differs per broker start, so ids never repeat across restarts).
    pub member_id_prefix: String,
    /// Most members a group may have (`group_max_size`): each member's subscription is
    /// kept, and each join rebalances over every member.
    pub max_members: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            min_session_timeout_ms: 100,
            max_session_timeout_ms: 600_000,
            member_id_prefix: "m".into(),
            max_members: DEFAULT_GROUP_MAX_SIZE,
        }
    }
}

/// Why a group request was refused. Nothing changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The member id is not (or no longer) a member.
    #[error("member {member:?} is not a member of group {group:?} (it left, expired, or never joined); join again")]
    UnknownMember {
        /// Group.
        group: String,
        /// The id sent.
        member: String,
    },
    /// The generation is older than the member's assignment, or was never issued.
    #[error("generation {sent} is stale for member {member:?} of group {group:?} (its assignment changed at generation {expected}, the group is at {current}); heartbeat to get the new assignment, then retry")]
    StaleGeneration {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Generation sent.
        sent: u64,
        /// The oldest generation accepted from this member.
        expected: u64,
        /// The group's generation.
        current: u64,
    },
    /// The member does not own the partition.
    #[error("member {member:?} of group {group:?} does not own {tp}")]
    NotPartitionOwner {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// The partition.
        tp: TopicPartition,
    },
    /// The group has members.
    #[error("group {group:?} has {members} member(s); stop them first")]
    GroupNotEmpty {
        /// Group.
        group: String,
        /// Members now.
        members: usize,
    },
    /// No such group.
    #[error("group {0:?} does not exist (see `quiver group list`)")]
    UnknownGroup(String),
    /// The group has as many members as allowed.
    #[error("group {group:?} already has {members} members, the most this broker allows (group_max_size); add members when others leave, or raise group_max_size")]
    GroupFull {
        /// Group.
        group: String,
        /// Members now.
        members: usize,
    },
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
}

impl GroupError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            GroupError::UnknownMember { .. } => ErrorCode::UnknownMember,
            GroupError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
            GroupError::NotPartitionOwner { .. } => ErrorCode::NotPartitionOwner,
            GroupError::GroupNotEmpty { .. } => ErrorCode::GroupNotEmpty,
            GroupError::UnknownGroup(_) => ErrorCode::UnknownGroup,
            GroupError::GroupFull { .. } => ErrorCode::GroupMaxSizeReached,
            GroupError::Invalid(_) => ErrorCode::InvalidRequest,
        }
    }
}

/// Something that happened, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// A member joined.
    Joined {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Generation after.
        generation: u64,
    },
    /// A member left (LeaveGroup).
    Left {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Generation after.
        generation: u64,
    },
    /// A member missed its session timeout and was removed.
    Expired {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Generation after.
        generation: u64,
    },
    /// A new target assignment; `moves` lists `(partition, from, to)` changes.
    Rebalanced {
        /// Group.
        group: String,
        /// Generation after.
        generation: u64,
        /// What moves.
        moves: Vec<(TopicPartition, Option<String>, String)>,
    },
    /// Partitions asked back from a member.
    Revoking {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Partitions.
        partitions: Vec<TopicPartition>,
    },
    /// A member confirmed it released revoked partitions.
    Released {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Partitions.
        partitions: Vec<TopicPartition>,
    },
    /// Partitions given to a member.
    Granted {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Partitions.
        partitions: Vec<TopicPartition>,
    },
}

/// A heartbeat's answer, and whether it should be sent now (the member's view is out of
/// date) or may wait for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    /// The response.
    pub response: HeartbeatResponse,
    /// True when the member must hear this now.
    pub ready: bool,
}

#[derive(Debug, Clone)]
struct Member {
    client_id: String,
    subscription: Subscription,
    pattern: Option<regex::Regex>,
    session_timeout_ms: u32,
    last_seen: u64,
    /// Granted and not yet released (includes `revoking`).
    assigned: BTreeSet<TopicPartition>,
    /// Asked back, still owned until released.
    revoking: BTreeSet<TopicPartition>,
    /// Commits and heartbeats with an older generation missed a revocation.
    epoch: u64,
}

impl Member {
    /// The subscribed topics that exist. A topic list is kept sorted without repeats (see
    /// `join`), so this walks the smaller of the list and the snapshot.
    fn topics(&self, snapshot: &TopicSnapshot) -> BTreeSet<String> {
        match (&self.subscription, &self.pattern) {
            (Subscription::Topics(ts), _) if ts.len() <= snapshot.len() => ts
                .iter()
                .filter(|t| snapshot.contains_key(*t))
                .cloned()
                .collect(),
            (Subscription::Topics(ts), _) => snapshot
                .keys()
                .filter(|t| ts.binary_search(t).is_ok())
                .cloned()
                .collect(),
            (Subscription::Pattern(_), Some(re)) => snapshot
                .keys()
                .filter(|t| !t.starts_with("__") && re.is_match(t))
                .cloned()
                .collect(),
            (Subscription::Pattern(_), None) => BTreeSet::new(),
        }
    }

    fn owns(&self, tp: &TopicPartition) -> bool {
        self.assigned.contains(tp)
    }
}

#[derive(Debug, Clone)]
struct Group {
    strategy: Strategy,
    auto_offset_reset: AutoOffsetReset,
    generation: u64,
    members: BTreeMap<String, Member>,
    target: Assignment,
    /// The subscribed topics and their partition counts the target was computed from.
    basis: BTreeMap<String, u32>,
    /// Fingerprint of the topic snapshot `basis` was last checked against: a tick looks at
    /// the members' subscriptions again only when the topics changed since.
    basis_of: u64,
    offsets: BTreeMap<TopicPartition, OffsetValue>,
}

impl Group {
    fn new(strategy: Strategy, auto_offset_reset: AutoOffsetReset) -> Group {
        Group {
            strategy,
            auto_offset_reset,
            generation: 0,
            members: BTreeMap::new(),
            target: Assignment::new(),
            basis: BTreeMap::new(),
            basis_of: 0,
            offsets: BTreeMap::new(),
        }
    }

    fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self.members.values().any(|m| !m.revoking.is_empty())
            || self
                .target
                .iter()
                .any(|(tp, m)| !self.members.get(m).is_some_and(|mm| mm.owns(tp)))
        {
            "rebalancing"
        } else {
            "stable"
        }
    }

    fn member_topics(&self, snapshot: &TopicSnapshot) -> MemberTopics {
        self.members
            .iter()
            .map(|(id, m)| (id.clone(), m.topics(snapshot)))
            .collect()
    }

    fn basis(&self, snapshot: &TopicSnapshot) -> BTreeMap<String, u32> {
        let topics: BTreeSet<String> = self
            .members
            .values()
            .flat_map(|m| m.topics(snapshot))
            .collect();
        topics
            .into_iter()
            .filter_map(|t| snapshot.get(&t).map(|n| (t, *n)))
            .collect()
    }
}

/// A subscription as kept: a topic list sorted, each topic once (a list of one name
/// repeated would otherwise cost every rebalance and tick once per repeat).
fn normalized(subscription: &Subscription) -> Subscription {
    match subscription {
        Subscription::Topics(ts) => {
            let mut ts = ts.clone();
            ts.sort_unstable();
            ts.dedup();
            Subscription::Topics(ts)
        }
        other => other.clone(),
    }
}

/// Identifies a topic snapshot (names and partition counts), so an unchanged one is
/// recognised without walking every group's subscriptions.
fn fingerprint(snapshot: &TopicSnapshot) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    snapshot.hash(&mut h);
    h.finish()
}

/// The coordinator of every group on this broker.
#[derive(Debug)]
pub struct GroupCoordinator {
    config: CoordinatorConfig,
    groups: BTreeMap<String, Group>,
    next_member: u64,
    events: Vec<GroupEvent>,
}

fn sorted(set: &BTreeSet<TopicPartition>) -> Vec<TopicPartition> {
    set.iter().cloned().collect()
}

impl GroupCoordinator {
    /// An empty coordinator.
    pub fn new(config: CoordinatorConfig) -> Self {
        GroupCoordinator {
            config,
            groups: BTreeMap::new(),
            next_member: 0,
            events: Vec::new(),
        }
    }

    /// Takes the events queued since the last call.
    pub fn drain_events(&mut self) -> Vec<GroupEvent> {
        std::mem::take(&mut self.events)
    }

    /// The heartbeat long-poll bound for a session timeout.
    pub fn heartbeat_interval_ms(session_timeout_ms: u32) -> u32 {
        (session_timeout_ms / 3).max(30)
    }

    /// How long a parked heartbeat of `member` may wait (0 when it is not a member).
    pub fn heartbeat_wait_ms(&self, group: &str, member: &str) -> u32 {
        self.groups
            .get(group)
            .and_then(|g| g.members.get(member))
            .map_or(0, |m| Self::heartbeat_interval_ms(m.session_timeout_ms))
    }

    /// Applies a durable record (at recovery, replaying `__consumer_offsets`).
    pub fn apply(&mut self, record: &GroupRecord) {
        match record {
            GroupRecord::Meta { group, value } => {
                let g = self
                    .groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(value.strategy, value.auto_offset_reset));
                g.strategy = value.strategy;
                g.auto_offset_reset = value.auto_offset_reset;
            }
            GroupRecord::MetaDeleted { group } => {
                self.groups.remove(group);
            }
            GroupRecord::Offset { group, tp, value } => {
                self.groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(Strategy::default(), AutoOffsetReset::default()))
                    .offsets
                    .insert(tp.clone(), value.clone());
            }
            GroupRecord::OffsetDeleted { group, tp } => {
                if let Some(g) = self.groups.get_mut(group) {
                    g.offsets.remove(tp);
                }
            }
        }
    }

    fn group(&self, group: &str) -> Result<&Group, GroupError> {
        self.groups
            .get(group)
            .ok_or_else(|| GroupError::UnknownGroup(group.to_string()))
    }

    fn member<'a>(g: &'a Group, group: &str, member: &str) -> Result<&'a Member, GroupError> {
        g.members
            .get(member)
            .ok_or_else(|| GroupError::UnknownMember {
                group: group.to_string(),
                member: member.to_string(),
            })
    }

    /// Adds a member (or re-joins a known member id) and rebalances. Returns the answer and
    /// the records to persist (the group's settings, when new or changed).
    pub fn join(
        &mut self,
        now: u64,
        req: &JoinGroupRequest,
        snapshot: &TopicSnapshot,
    ) -> Result<(JoinGroupResponse, Vec<GroupRecord>), GroupError> {
        quiver_protocol::requests::validate_group_name(&req.group).map_err(GroupError::Invalid)?;
        if req.client_id.len() > MAX_CLIENT_ID_BYTES {
            return Err(GroupError::Invalid(format!(
                "client id of {} bytes; at most {MAX_CLIENT_ID_BYTES} (it becomes part of the member id)",
                req.client_id.len()
            )));
        }
        let (min, max) = (
            self.config.min_session_timeout_ms,
            self.config.max_session_timeout_ms,
        );
        if !(min..=max).contains(&req.session_timeout_ms) {
            return Err(GroupError::Invalid(format!(
                "session timeout {} ms is outside the allowed {min}..={max} ms",
                req.session_timeout_ms
            )));
        }
        let pattern = match &req.subscription {
            Subscription::Pattern(p) if p.len() > MAX_PATTERN_BYTES => {
                return Err(GroupError::Invalid(format!(
                    "subscription pattern of {} bytes; at most {MAX_PATTERN_BYTES}",
                    p.len()
                )))
            }
            Subscription::Topics(ts) if ts.len() > MAX_SUBSCRIBED_TOPICS => {
                return Err(GroupError::Invalid(format!(
                    "a subscription to {} topics; at most {MAX_SUBSCRIBED_TOPICS} (subscribe by pattern instead)",
                    ts.len()
                )))
            }
            Subscription::Pattern(p) => Some(
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| GroupError::Invalid(format!("subscription pattern {p:?}: {e}")))?,
            ),
            Subscription::Topics(ts) if ts.is_empty() => {
                return Err(GroupError::Invalid(
                    "a subscription needs at least one topic".into(),
                ))
            }
            Subscription::Topics(ts) => {
                // As for pattern subscriptions: the broker's own topics are not a group's
                // to read or commit offsets for.
                if let Some(t) = ts.iter().find(|t| crate::topic::is_internal(t)) {
                    return Err(GroupError::Invalid(format!(
                        "{t:?} is an internal topic of the broker; a group cannot subscribe to it"
                    )));
                }
                for t in ts {
                    quiver_protocol::requests::validate_topic_name(t)
                        .map_err(|e| GroupError::Invalid(format!("subscription: {e}")))?;
                }
                None
            }
        };
        let mut records = Vec::new();
        let is_new = !self.groups.contains_key(&req.group);
        let g = self.groups.entry(req.group.clone()).or_insert_with(|| {
            Group::new(
                req.strategy.unwrap_or_default(),
                req.auto_offset_reset.unwrap_or_default(),
            )
        });
        if g.members.is_empty() {
            let strategy = req.strategy.unwrap_or(g.strategy);
            let reset = req.auto_offset_reset.unwrap_or(g.auto_offset_reset);
            if is_new || strategy != g.strategy || reset != g.auto_offset_reset {
                g.strategy = strategy;
                g.auto_offset_reset = reset;
                records.push(GroupRecord::Meta {
                    group: req.group.clone(),
                    value: GroupMetaValue {
                        strategy,
                        auto_offset_reset: reset,
                    },
                });
            }
        }
        let known = req
            .member_id
            .as_ref()
            .filter(|id| g.members.contains_key(*id))
            .cloned();
        let member_id = match known {
            Some(id) => id,
            None if g.members.len() >= self.config.max_members => {
                return Err(GroupError::GroupFull {
                    group: req.group.clone(),
                    members: g.members.len(),
                });
            }
            None => {
                self.next_member += 1;
                format!(
                    "{}-{}-{}",
                    req.client_id, self.config.member_id_prefix, self.next_member
                )
            }
        };
        let rejoin = g.members.contains_key(&member_id);
        let (assigned, revoking) = g
            .members
            .remove(&member_id)
            .map(|m| (m.assigned, m.revoking))
            .unwrap_or_default();
        g.generation += 1;
        g.members.insert(
            member_id.clone(),
            Member {
                client_id: req.client_id.clone(),
                subscription: normalized(&req.subscription),
                pattern,
                session_timeout_ms: req.session_timeout_ms,
                last_seen: now,
                assigned,
                revoking,
                epoch: g.generation,
            },
        );
        let generation = g.generation;
        let (strategy, auto_offset_reset) = (g.strategy, g.auto_offset_reset);
        if !rejoin {
            self.events.push(GroupEvent::Joined {
                group: req.group.clone(),
                member: member_id.clone(),
                generation,
            });
        }
        self.rebalance(&req.group, snapshot);
        let g = &self.groups[&req.group];
        Ok((
            JoinGroupResponse {
                member_id,
                generation: g.generation.max(generation),
                heartbeat_interval_ms: Self::heartbeat_interval_ms(req.session_timeout_ms),
                strategy,
                auto_offset_reset,
            },
            records,
        ))
    }

    /// Processes a heartbeat: keeps the member alive, releases the revoked partitions it no
    /// longer lists (granting them onward), and returns its assignment.
    pub fn heartbeat(
        &mut self,
        now: u64,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatAnswer, GroupError> {
        if req.owned.len() > MAX_OWNED_PARTITIONS {
            return Err(GroupError::Invalid(format!(
                "a heartbeat listing {} owned partitions; at most {MAX_OWNED_PARTITIONS}",
                req.owned.len()
            )));
        }
        let g = self.group(&req.group)?;
        let m = Self::member(g, &req.group, &req.member_id)?;
        if req.generation > g.generation {
            return Err(GroupError::StaleGeneration {
                group: req.group.clone(),
                member: req.member_id.clone(),
                sent: req.generation,
                expected: m.epoch,
                current: g.generation,
            });
        }
        let owned: BTreeSet<&TopicPartition> = req.owned.iter().collect();
        if owned.len() != req.owned.len() {
            // A parked heartbeat is looked at again on every change in the coordinator: a
            // list padded with repeats would make each of those looks long.
            return Err(GroupError::Invalid(
                "a heartbeat listing an owned partition more than once".into(),
            ));
        }
        let Some(g) = self.groups.get_mut(&req.group) else {
            return Err(GroupError::UnknownGroup(req.group.clone()));
        };
        let Some(m) = g.members.get_mut(&req.member_id) else {
            return Err(GroupError::UnknownMember {
                group: req.group.clone(),
                member: req.member_id.clone(),
            });
        };
        m.last_seen = now;
        let released: Vec<TopicPartition> = m
            .revoking
            .iter()
            .filter(|tp| !owned.contains(tp))
            .cloned()
            .collect();
        if !released.is_empty() {
            for tp in &released {
                m.revoking.remove(tp);
                m.assigned.remove(tp);
            }
            self.events.push(GroupEvent::Released {
                group: req.group.clone(),
                member: req.member_id.clone(),
                partitions: released,
            });
            self.reconcile(&req.group);
        }
        self.poll_heartbeat(req)
    }

    /// The answer to a heartbeat without changing anything: used when a parked long-poll
    /// wakes up to see whether it should answer now.
    pub fn poll_heartbeat(&self, req: &HeartbeatRequest) -> Result<HeartbeatAnswer, GroupError> {
        let g = self.group(&req.group)?;
        let m = Self::member(g, &req.group, &req.member_id)?;
        let owned: BTreeSet<&TopicPartition> = req.owned.iter().collect();
        let assignment: Vec<TopicPartition> = m.assigned.difference(&m.revoking).cloned().collect();
        let ready = req.generation < m.epoch
            || owned.iter().any(|tp| !m.assigned.contains(*tp))
            || assignment.iter().any(|tp| !owned.contains(tp));
        Ok(HeartbeatAnswer {
            response: HeartbeatResponse {
                generation: g.generation,
                assignment,
                revoke: sorted(&m.revoking),
            },
            ready,
        })
    }

    /// Removes a member at once; its partitions go to the others.
    pub fn leave(
        &mut self,
        group: &str,
        member: &str,
        snapshot: &TopicSnapshot,
    ) -> Result<u64, GroupError> {
        let g = self.group(group)?;
        Self::member(g, group, member)?;
        let generation = self.remove_member(group, member, snapshot, false);
        Ok(generation)
    }

    fn remove_member(
        &mut self,
        group: &str,
        member: &str,
        snapshot: &TopicSnapshot,
        expired: bool,
    ) -> u64 {
        let Some(g) = self.groups.get_mut(group) else {
            return 0;
        };
        g.members.remove(member);
        g.generation += 1;
        let generation = g.generation;
        let (group, member) = (group.to_string(), member.to_string());
        self.events.push(if expired {
            GroupEvent::Expired {
                group: group.clone(),
                member,
                generation,
            }
        } else {
            GroupEvent::Left {
                group: group.clone(),
                member,
                generation,
            }
        });
        self.rebalance(&group, snapshot);
        self.groups.get(&group).map_or(generation, |g| g.generation)
    }

    /// Expires members whose session ran out, and rebalances groups whose subscribed
    /// topics changed (created, deleted, or given more partitions).
    pub fn tick(&mut self, now: u64, snapshot: &TopicSnapshot) {
        let expired: Vec<(String, String)> = self
            .groups
            .iter()
            .flat_map(|(gname, g)| {
                g.members
                    .iter()
                    .filter(move |(_, m)| {
                        now.saturating_sub(m.last_seen) > u64::from(m.session_timeout_ms)
                    })
                    .map(move |(id, _)| (gname.clone(), id.clone()))
            })
            .collect();
        for (group, member) in expired {
            self.remove_member(&group, &member, snapshot, true);
        }
        let fingerprint = fingerprint(snapshot);
        let mut changed = Vec::new();
        for (name, g) in self.groups.iter_mut() {
            if g.members.is_empty() || g.basis_of == fingerprint {
                continue;
            }
            if g.basis(snapshot) != g.basis {
                changed.push(name.clone());
            } else {
                g.basis_of = fingerprint;
            }
        }
        for group in changed {
            if let Some(g) = self.groups.get_mut(&group) {
                g.generation += 1;
            }
            self.rebalance(&group, snapshot);
        }
    }

    /// Recomputes the target of `group` and moves toward it.
    fn rebalance(&mut self, group: &str, snapshot: &TopicSnapshot) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let members = g.member_topics(snapshot);
        g.basis = g.basis(snapshot);
        g.basis_of = fingerprint(snapshot);
        let target = assignor::assign(g.strategy, &members, &g.basis, &g.target);
        let moves: Vec<(TopicPartition, Option<String>, String)> = target
            .iter()
            .filter(|(tp, m)| g.target.get(*tp) != Some(*m))
            .map(|(tp, m)| (tp.clone(), g.target.get(tp).cloned(), m.clone()))
            .collect();
        g.target = target;
        let generation = g.generation;
        self.events.push(GroupEvent::Rebalanced {
            group: group.to_string(),
            generation,
            moves,
        });
        self.reconcile(group);
    }

    /// Revokes what members hold against the target, and grants free partitions to their
    /// target owners. Bumps the generation once when anything changed.
    fn reconcile(&mut self, group: &str) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let mut changed = false;
        let next_generation = g.generation + 1;
        let mut events = Vec::new();
        // Revoke: owned, but the target says someone else (or no one).
        for (id, m) in g.members.iter_mut() {
            let mut revoke = Vec::new();
            let mut keep = Vec::new();
            for tp in &m.assigned {
                let wanted_here = g.target.get(tp) == Some(id);
                if !wanted_here && !m.revoking.contains(tp) {
                    revoke.push(tp.clone());
                } else if wanted_here && m.revoking.contains(tp) {
                    keep.push(tp.clone());
                }
            }
            for tp in keep {
                m.revoking.remove(&tp);
                changed = true;
            }
            if !revoke.is_empty() {
                m.revoking.extend(revoke.iter().cloned());
                m.epoch = next_generation;
                changed = true;
                events.push(GroupEvent::Revoking {
                    group: group.to_string(),
                    member: id.clone(),
                    partitions: revoke,
                });
            }
        }
        // Grant: target owner present, and no member holds the partition.
        let held: BTreeSet<TopicPartition> = g
            .members
            .values()
            .flat_map(|m| m.assigned.iter().cloned())
            .collect();
        let mut grants: BTreeMap<String, Vec<TopicPartition>> = BTreeMap::new();
        for (tp, owner) in &g.target {
            if !held.contains(tp) && g.members.contains_key(owner) {
                grants.entry(owner.clone()).or_default().push(tp.clone());
            }
        }
        for (owner, tps) in grants {
            if let Some(m) = g.members.get_mut(&owner) {
                m.assigned.extend(tps.iter().cloned());
                changed = true;
                events.push(GroupEvent::Granted {
                    group: group.to_string(),
                    member: owner,
                    partitions: tps,
                });
            }
        }
        if changed {
            g.generation = next_generation;
        }
        self.events.extend(events);
    }

    /// Checks a commit (member known, generation current, every partition owned) and
    /// applies it; returns the records to persist. Refused commits change nothing.
    pub fn commit(
        &mut self,
        req: &CommitOffsetsRequest,
    ) -> Result<(CommitOffsetsResponse, Vec<GroupRecord>), GroupError> {
        let (resp, records) = self.prepare_commit(req)?;
        for r in &records {
            self.apply(r);
        }
        Ok((resp, records))
    }

    /// Checks a commit and returns the records it would store, changing nothing: the
    /// service persists them and only then [`apply`](Self::apply)s them, so a commit is
    /// never visible before it is durable.
    pub fn prepare_commit(
        &self,
        req: &CommitOffsetsRequest,
    ) -> Result<(CommitOffsetsResponse, Vec<GroupRecord>), GroupError> {
        let g = self.group(&req.group)?;
        let m = Self::member(g, &req.group, &req.member_id)?;
        if req.generation < m.epoch || req.generation > g.generation {
            return Err(GroupError::StaleGeneration {
                group: req.group.clone(),
                member: req.member_id.clone(),
                sent: req.generation,
                expected: m.epoch,
                current: g.generation,
            });
        }
        let mut seen = HashSet::with_capacity(req.offsets.len());
        for o in &req.offsets {
            let tp = TopicPartition::new(o.topic.clone(), o.partition);
            if !seen.insert((o.topic.as_str(), o.partition)) {
                return Err(GroupError::Invalid(format!(
                    "{tp} is given more than once in one commit; send each partition's offset once"
                )));
            }
            if !m.owns(&tp) {
                return Err(GroupError::NotPartitionOwner {
                    group: req.group.clone(),
                    member: req.member_id.clone(),
                    tp,
                });
            }
            if o.offset < 0 {
                return Err(GroupError::Invalid(format!(
                    "offset {} for {tp} is negative",
                    o.offset
                )));
            }
            if let Some(m) = o
                .metadata
                .as_ref()
                .filter(|m| m.len() > MAX_OFFSET_METADATA_BYTES)
            {
                return Err(GroupError::Invalid(format!(
                    "the metadata committed with {tp} is {} bytes; at most {MAX_OFFSET_METADATA_BYTES} (Kafka's offset.metadata.max.bytes)",
                    m.len()
                )));
            }
        }
        let records = offset_records(req);
        Ok((
            CommitOffsetsResponse {
                committed: records.len() as u32,
            },
            records,
        ))
    }

    /// Committed offsets of a group (`None` offsets for partitions never committed), each
    /// partition once.
    pub fn fetch_offsets(&self, req: &FetchOffsetsRequest) -> FetchOffsetsResponse {
        let g = self.groups.get(&req.group);
        let entry = |tp: &TopicPartition| {
            let v = g.and_then(|g| g.offsets.get(tp));
            CommittedOffset {
                topic: tp.topic.clone(),
                partition: tp.partition,
                offset: v.map(|v| v.offset),
                metadata: v.and_then(|v| v.metadata.clone()),
            }
        };
        let offsets = match &req.partitions {
            // Each partition answered once, however often it is asked for.
            Some(tps) => {
                let mut seen = HashSet::with_capacity(tps.len());
                tps.iter()
                    .filter(|tp| seen.insert(*tp))
                    .map(entry)
                    .collect()
            }
            None => g
                .map(|g| g.offsets.keys().map(entry).collect())
                .unwrap_or_default(),
        };
        FetchOffsetsResponse { offsets }
    }

    /// Every group, by name.
    pub fn list(&self) -> ListGroupsResponse {
        ListGroupsResponse {
            groups: self
                .groups
                .iter()
                .map(|(name, g)| GroupListing {
                    group: name.clone(),
                    state: g.state().into(),
                    members: g.members.len() as u32,
                    strategy: g.strategy.as_str().into(),
                })
                .collect(),
        }
    }

    /// Describes a group. `offsets(topic, partition)` gives `(log start, log end, high
    /// watermark)` of a partition that exists.
    pub fn describe(
        &self,
        group: &str,
        snapshot: &TopicSnapshot,
        offsets: LogOffsets<'_>,
    ) -> Result<GroupDescription, GroupError> {
        let g = self.group(group)?;
        let mut tps: BTreeSet<TopicPartition> = g.offsets.keys().cloned().collect();
        for (t, n) in g.basis(snapshot) {
            tps.extend((0..n).map(|p| TopicPartition::new(t.clone(), p)));
        }
        for m in g.members.values() {
            tps.extend(m.assigned.iter().cloned());
        }
        let owner = |tp: &TopicPartition| {
            g.members
                .iter()
                .find(|(_, m)| m.owns(tp))
                .map(|(id, _)| id.clone())
        };
        let partitions = tps
            .iter()
            .filter_map(|tp| {
                let (start, end, hw) = offsets(&tp.topic, tp.partition)?;
                let mut d = GroupPartitionDescription {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    owner: owner(tp),
                    committed: g.offsets.get(tp).map(|v| v.offset),
                    log_start_offset: 0,
                    log_end_offset: 0,
                    high_watermark: 0,
                    lag: 0,
                };
                d.set_log_offsets(start, end, hw);
                Some(d)
            })
            .collect();
        Ok(GroupDescription {
            group: group.to_string(),
            state: g.state().into(),
            generation: g.generation,
            strategy: g.strategy.as_str().into(),
            auto_offset_reset: g.auto_offset_reset.as_str().into(),
            members: g
                .members
                .iter()
                .map(|(id, m)| MemberDescription {
                    member_id: id.clone(),
                    client_id: m.client_id.clone(),
                    assigned: sorted(&m.assigned),
                    revoking: sorted(&m.revoking),
                })
                .collect(),
            partitions,
        })
    }

    /// Sets committed offsets of a group without members (creating the group if needed);
    /// returns the records to persist.
    pub fn reset_offsets(
        &mut self,
        group: &str,
        topic: &str,
        offsets: &[(u32, i64)],
    ) -> Result<Vec<GroupRecord>, GroupError> {
        let records = self.prepare_reset_offsets(group, topic, offsets)?;
        for r in &records {
            self.apply(r);
        }
        Ok(records)
    }

    /// The records a reset would store, changing nothing (see [`prepare_commit`](Self::prepare_commit)).
    pub fn prepare_reset_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, i64)],
    ) -> Result<Vec<GroupRecord>, GroupError> {
        quiver_protocol::requests::validate_group_name(group).map_err(GroupError::Invalid)?;
        let mut records = Vec::new();
        match self.groups.get(group) {
            Some(g) if !g.members.is_empty() => {
                return Err(GroupError::GroupNotEmpty {
                    group: group.to_string(),
                    members: g.members.len(),
                })
            }
            Some(_) => {}
            None => records.push(GroupRecord::Meta {
                group: group.to_string(),
                value: GroupMetaValue {
                    strategy: Strategy::default(),
                    auto_offset_reset: AutoOffsetReset::default(),
                },
            }),
        }
        records.extend(offsets.iter().map(|(p, o)| GroupRecord::Offset {
            group: group.to_string(),
            tp: TopicPartition::new(topic, *p),
            value: OffsetValue {
                offset: *o,
                metadata: None,
            },
        }));
        Ok(records)
    }

    /// Deletes a group without members and its offsets; returns how many offsets went and
    /// the tombstones to persist.
    pub fn delete(&mut self, group: &str) -> Result<(u32, Vec<GroupRecord>), GroupError> {
        let (n, records) = self.prepare_delete(group)?;
        for r in &records {
            self.apply(r);
        }
        Ok((n, records))
    }

    /// The tombstones a delete would store, changing nothing (see [`prepare_commit`](Self::prepare_commit)).
    pub fn prepare_delete(&self, group: &str) -> Result<(u32, Vec<GroupRecord>), GroupError> {
        let g = self.group(group)?;
        if !g.members.is_empty() {
            return Err(GroupError::GroupNotEmpty {
                group: group.to_string(),
                members: g.members.len(),
            });
        }
        let mut records: Vec<GroupRecord> = g
            .offsets
            .keys()
            .map(|tp| GroupRecord::OffsetDeleted {
                group: group.to_string(),
                tp: tp.clone(),
            })
            .collect();
        let n = records.len() as u32;
        records.push(GroupRecord::MetaDeleted {
            group: group.to_string(),
        });
        Ok((n, records))
    }

    /// Deletes every group's committed offsets of the topics in `gone` (deleted, or
    /// deleted and created again): Kafka drops a deleted topic's offsets, so a topic of
    /// the same name starts from the group's reset policy, not from the old positions.
    pub fn prepare_forget_topics(&self, gone: &BTreeSet<String>) -> Vec<GroupRecord> {
        self.groups
            .iter()
            .flat_map(|(group, g)| {
                g.offsets
                    .keys()
                    .filter(|tp| gone.contains(&tp.topic))
                    .map(move |tp| GroupRecord::OffsetDeleted {
                        group: group.clone(),
                        tp: tp.clone(),
                    })
            })
            .collect()
    }

    /// The offset-0 commits that start `topic`'s partitions `new` (those it just gained)
    /// for every group that committed offsets of its other partitions, each new partition
    /// the group has no commit for. Every record of a partition added to a topic was
    /// written after the groups reading that topic began: a group that starts partitions
    /// without a commit at the latest records (Kafka's `auto.offset.reset=latest`, a
    /// pipeline's `start = "latest"`) would otherwise skip whatever came before its members
    /// noticed the new partitions (the loss KAFKA-3370 describes).
    pub fn prepare_start_new_partitions(
        &self,
        topic: &str,
        new: std::ops::Range<u32>,
    ) -> Vec<GroupRecord> {
        let mut records = Vec::new();
        for (group, g) in &self.groups {
            let ours = || g.offsets.keys().filter(|tp| tp.topic == topic);
            if !ours().any(|tp| !new.contains(&tp.partition)) {
                continue;
            }
            for p in new.clone() {
                if ours().any(|tp| tp.partition == p) {
                    continue;
                }
                records.push(GroupRecord::Offset {
                    group: group.clone(),
                    tp: TopicPartition::new(topic, p),
                    value: OffsetValue {
                        offset: 0,
                        metadata: None,
                    },
                });
            }
        }
        records
    }

    /// The group's auto-offset-reset, if the group exists.
    pub fn auto_offset_reset(&self, group: &str) -> Option<AutoOffsetReset> {
        self.groups.get(group).map(|g| g.auto_offset_reset)
    }

    /// Checks the invariant that no partition is held by two members of a group (tests
    /// and debug assertions).
    pub fn owners_are_unique(&self) -> bool {
        self.groups.values().all(|g| {
            let mut seen = BTreeSet::new();
            g.members
                .values()
                .flat_map(|m| m.assigned.iter())
                .all(|tp| seen.insert(tp))
        })
    }
}

/// The records a commit of `req`'s offsets stores (no checks: see `prepare_commit`).
pub fn offset_records(req: &CommitOffsetsRequest) -> Vec<GroupRecord> {
    req.offsets
        .iter()
        .map(|o| GroupRecord::Offset {
            group: req.group.clone(),
            tp: TopicPartition::new(o.topic.clone(), o.partition),
            value: OffsetValue {
                offset: o.offset,
                metadata: o.metadata.clone(),
            },
        })
        .collect()
}
