//! [`ControllerState`]: the cluster metadata as a pure, deterministic state machine.
//!
//! It owns the registered brokers, the topics with their ids and config, and every partition's
//! assignment {replicas, leader, leader epoch, partition epoch, ISR}. [`ControllerState::apply`]
//! is the only way to change it: it takes one [`ControllerCommand`] from the Raft log and returns
//! a [`ControllerResponse`]. It never reads a clock, the disk or the network, and it iterates
//! only ordered maps, so every broker that applies the same log reaches the same state.
//!
//! Rules kept here (from Kafka's KRaft controller):
//! - a leader epoch never decreases; it grows by one each time a partition's leader changes;
//! - the partition epoch grows by one with every accepted change of leader or ISR, and an
//!   [`UpdatePartition`](ControllerCommand::UpdatePartition) based on an older epoch is refused;
//! - leaders are elected from the ISR among unfenced brokers; only a topic with
//!   `unclean.leader.election.enable=true` may elect a replica outside the ISR;
//! - fencing a broker removes it from every ISR except where it is the last member (the
//!   partition then goes offline, keeping the one replica known to hold everything);
//! - a broker registering again is fenced first (a new incarnation); one that says its log
//!   store is empty, or that its copy of a topic is lost, also leaves the ISRs it was the
//!   last member of (offline until an unclean election: an empty log must not lead; an
//!   internal topic takes another live replica at once), and unclean elections take a
//!   replica that did not lose its copy first;
//! - an ISR addition judged on the fetches of an earlier incarnation of the broker is
//!   refused (Kafka's KIP-903).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::{
    BrokerId, ControllerCommand, ControllerError, ControllerResponse, PartitionAssignment,
    PluginArchive,
};

/// The topic config key that allows electing a leader from outside the ISR.
pub const UNCLEAN_LEADER_ELECTION: &str = "unclean.leader.election.enable";

/// A registered broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRecord {
    pub id: BrokerId,
    /// Its QUIC address, as it registered.
    pub addr: String,
    /// The incarnation it registered with; a registration with a lower one is refused.
    pub broker_epoch: u64,
    /// A fenced broker leads nothing and joins no ISR.
    pub fenced: bool,
}

/// One partition's replica set and leadership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    /// Brokers holding a copy, preferred leader first.
    pub replicas: Vec<BrokerId>,
    /// `None` while the partition is offline (no eligible replica).
    pub leader: Option<BrokerId>,
    pub leader_epoch: u64,
    pub partition_epoch: u64,
    /// In-sync replicas, a subset of `replicas`. Empty only where the last one lost its
    /// copy (the partition is offline until an unclean election).
    pub isr: Vec<BrokerId>,
    /// A reassignment in progress: the replica set wanted. `replicas` holds the old and the
    /// new ones until every new one is in the ISR; then the old ones are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<BrokerId>>,
    /// Replicas that lost their copy (back on an empty log store, or a damaged record)
    /// and have not been in sync since: an unclean election takes any other live replica
    /// first. A replica leaves this list when it rejoins the ISR.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<BrokerId>,
}

impl PartitionRecord {
    /// The replica an unclean election takes among `live`: the first that has not lost
    /// its copy, else the first.
    fn unclean_choice(&self, live: &[BrokerId]) -> Option<BrokerId> {
        let mut candidates = self.replicas.iter().copied().filter(|r| live.contains(r));
        let first = candidates.clone().next();
        candidates.find(|r| !self.lost.contains(r)).or(first)
    }

    /// Broker `id` lost its copy: it is marked so and leaves the ISR, also as its last
    /// member, and its leadership. With no in-sync replica left, a topic allowing unclean
    /// elections, or an internal one (which no operator can alter), takes another live
    /// replica; otherwise the partition stays offline. An internal topic with no other live
    /// replica keeps `id` in sync (it leads again with what it has: a broker cannot run
    /// without its internal topics). Returns whether anything changed.
    fn lose_copy(
        &mut self,
        id: BrokerId,
        live: &[BrokerId],
        unclean: bool,
        internal: bool,
    ) -> bool {
        let before = self.clone();
        if self.replicas.contains(&id) && !self.lost.contains(&id) {
            self.lost.push(id);
        }
        if self.leader == Some(id) || self.isr.contains(&id) {
            let leader = self.leader;
            self.isr.retain(|&r| r != id);
            if self.leader == Some(id) || self.leader.is_none() {
                self.leader = self
                    .replicas
                    .iter()
                    .copied()
                    .find(|r| self.isr.contains(r) && live.contains(r));
            }
            if self.isr.is_empty() && (unclean || internal) {
                let others: Vec<BrokerId> = live.iter().copied().filter(|r| *r != id).collect();
                match self.unclean_choice(&others) {
                    Some(r) => {
                        self.leader = Some(r);
                        self.isr = vec![r];
                    }
                    None if internal => {
                        // Its copy is what there is: in sync again, leading once live.
                        self.isr = vec![id];
                        self.leader = live.contains(&id).then_some(id);
                        self.lost.retain(|r| *r != id);
                    }
                    None => {}
                }
            }
            if self.leader != leader {
                self.leader_epoch += 1;
            }
        }
        let changed = *self != before;
        if changed {
            self.partition_epoch += 1;
        }
        changed
    }
}

/// A topic: its id, config overrides and partitions (index = partition number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub name: String,
    pub topic_id: u64,
    pub config: BTreeMap<String, String>,
    pub partitions: Vec<PartitionRecord>,
}

impl TopicRecord {
    fn unclean_election(&self) -> bool {
        self.config
            .get(UNCLEAN_LEADER_ELECTION)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// A broker's own topic (`__consumer_offsets`, …), which clients cannot alter.
    fn is_internal(&self) -> bool {
        crate::topic::is_internal(&self.name)
    }
}

/// A plugin deployed cluster-wide: every broker keeps a copy in its own plugin store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    /// `name@version`.
    pub id: String,
    /// Digest of the canonical archive.
    pub digest: String,
    /// The canonical archive.
    pub archive: PluginArchive,
}

/// A pipeline deployed in the cluster: its instances are placed on the live brokers
/// (see [`super::placement`] and [`ControllerState::pipeline_instances`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRecord {
    pub name: String,
    /// The pipeline file's text, as deployed.
    pub config_toml: String,
    /// Instances across the cluster.
    pub instances: u32,
    /// Plugins (`name@version`) its stages use.
    pub plugins: Vec<String>,
    /// Where each instance runs (see [`super::placement`]); instances not in it run nowhere
    /// until the next placement.
    #[serde(default)]
    pub placement: super::placement::Placement,
    /// The number of its latest deploy (see [`ControllerState::pipeline_deploys`]): a new
    /// one, of the same file too, asks the brokers to start their part again where it
    /// failed (its `stop` policy, a quarantined plugin), as a lone broker does when a file
    /// is deployed again.
    #[serde(default)]
    pub deploy_number: u64,
}

/// The controller's metadata: brokers, topics and deployed plugins, changed only by
/// [`ControllerState::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerState {
    pub brokers: BTreeMap<BrokerId, BrokerRecord>,
    pub topics: BTreeMap<String, TopicRecord>,
    /// By id (`name@version`); absent from snapshots written before plugins were kept here.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginRecord>,
    /// Deployed pipelines by name; absent from snapshots written before they were kept here.
    #[serde(default)]
    pub pipelines: BTreeMap<String, PipelineRecord>,
    /// The largest topic id ever used, deleted topics' included: an id is never used twice,
    /// so a topic deleted and made again under its name is another topic to every broker
    /// (with the same id, a broker that missed the deletion kept the old log and served its
    /// records as the new topic's).
    #[serde(default)]
    pub last_topic_id: u64,
    /// Pipeline deploys applied so far: each `PutPipeline` takes the next number, so a
    /// pipeline removed and deployed again between two of a broker's passes still looks
    /// deployed again to it.
    #[serde(default)]
    pub pipeline_deploys: u64,
}

/// What applying a command may change, so that a persistent store rewrites only that.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub broker: Option<BrokerId>,
    pub topics: Vec<String>,
    pub plugins: Vec<String>,
    pub pipelines: Vec<String>,
}

type Outcome = Result<ControllerResponse, ControllerError>;

impl ControllerState {
    /// Applies one command. A refused command leaves the state exactly as it was.
    pub fn apply(&mut self, cmd: &ControllerCommand) -> ControllerResponse {
        let outcome = match cmd {
            ControllerCommand::RegisterBroker {
                id,
                addr,
                epoch,
                empty_log,
            } => self.register_broker(*id, addr, *epoch, *empty_log),
            ControllerCommand::FenceBroker { id } => self.fence_broker(*id),
            ControllerCommand::ReplicaLost { id, epoch, topic } => {
                self.replica_lost(*id, *epoch, topic)
            }
            ControllerCommand::UnfenceBroker { id } => self.unfence_broker(*id),
            ControllerCommand::CreateTopic {
                name,
                topic_id,
                partitions,
                config,
            } => self.create_topic(name, *topic_id, partitions, config),
            ControllerCommand::AddPartitions {
                name,
                partitions,
                after,
            } => self.add_partitions(name, partitions, *after),
            ControllerCommand::ReassignPartition {
                topic,
                partition,
                replicas,
            } => self.reassign(topic, *partition, replicas),
            ControllerCommand::CompleteReassignment {
                topic,
                partition,
                partition_epoch,
            } => self.complete_reassignment(topic, *partition, *partition_epoch),
            ControllerCommand::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => Ok(ControllerResponse::Ok),
                None => Err(ControllerError::UnknownTopic { name: name.clone() }),
            },
            ControllerCommand::AlterTopicConfig { name, set, remove } => {
                let live = self.live_brokers();
                match self.topics.get_mut(name) {
                    Some(topic) => {
                        topic
                            .config
                            .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                        for key in remove {
                            topic.config.remove(key);
                        }
                        if topic.unclean_election() {
                            // Allowed now: partitions already without a leader (their whole
                            // ISR gone) get a live replica, as a fence would have given them.
                            for p in &mut topic.partitions {
                                if p.leader.is_some() {
                                    continue;
                                }
                                if let Some(r) = p.unclean_choice(&live) {
                                    p.leader = Some(r);
                                    p.isr = vec![r];
                                    p.leader_epoch += 1;
                                    p.partition_epoch += 1;
                                }
                            }
                        }
                        Ok(ControllerResponse::Ok)
                    }
                    None => Err(ControllerError::UnknownTopic { name: name.clone() }),
                }
            }
            ControllerCommand::UpdatePartition {
                topic,
                partition,
                leader,
                leader_epoch,
                partition_epoch,
                isr,
                broker_epochs,
            } => self.update_partition(
                topic,
                *partition,
                *leader,
                (*leader_epoch, *partition_epoch),
                isr,
                broker_epochs,
            ),
            ControllerCommand::DeployPlugin {
                id,
                digest,
                archive,
            } => self.deploy_plugin(id, digest, archive),
            ControllerCommand::RemovePlugin { id } => self.remove_plugin(id),
            ControllerCommand::PutPipeline {
                name,
                config_toml,
                instances,
                plugins,
            } => self.put_pipeline(name, config_toml, *instances, plugins),
            ControllerCommand::RemovePipeline { name } => match self.pipelines.remove(name) {
                Some(_) => Ok(ControllerResponse::Ok),
                None => Err(ControllerError::UnknownPipeline { name: name.clone() }),
            },
            ControllerCommand::PlacePipeline { name, placement } => {
                self.place_pipeline(name, placement)
            }
        };
        outcome.unwrap_or_else(ControllerResponse::Refused)
    }

    /// A registered broker.
    pub fn broker(&self, id: BrokerId) -> Option<&BrokerRecord> {
        self.brokers.get(&id)
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<&TopicRecord> {
        self.topics.get(name)
    }

    /// One partition of a topic.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<&PartitionRecord> {
        self.topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
    }

    /// A topic id no topic uses (one more than the largest), for proposers of `CreateTopic`.
    pub fn next_topic_id(&self) -> u64 {
        self.topics
            .values()
            .map(|t| t.topic_id)
            .chain([self.last_topic_id])
            .max()
            .unwrap_or(0)
            + 1
    }

    /// The broker, topics and plugins that `apply(cmd)` may change (a superset), so that a
    /// persistent store rewrites only those. Ask before applying: a fence touches the topics
    /// the broker holds replicas of, which it still holds afterwards.
    pub fn touched(&self, cmd: &ControllerCommand) -> Touched {
        let (broker, topics) = match cmd {
            ControllerCommand::RegisterBroker { id, .. }
            | ControllerCommand::FenceBroker { id }
            | ControllerCommand::UnfenceBroker { id } => {
                let topics = self
                    .topics
                    .values()
                    .filter(|t| t.partitions.iter().any(|p| p.replicas.contains(id)))
                    .map(|t| t.name.clone())
                    .collect();
                (Some(*id), topics)
            }
            ControllerCommand::CreateTopic { name, .. }
            | ControllerCommand::DeleteTopic { name }
            | ControllerCommand::AlterTopicConfig { name, .. }
            | ControllerCommand::AddPartitions { name, .. } => (None, vec![name.clone()]),
            ControllerCommand::ReassignPartition { topic, .. }
            | ControllerCommand::CompleteReassignment { topic, .. } => (None, vec![topic.clone()]),
            ControllerCommand::UpdatePartition { topic, .. }
            | ControllerCommand::ReplicaLost { topic, .. } => (None, vec![topic.clone()]),
            ControllerCommand::DeployPlugin { id, .. } | ControllerCommand::RemovePlugin { id } => {
                return Touched {
                    plugins: vec![id.clone()],
                    ..Touched::default()
                }
            }
            ControllerCommand::PutPipeline { name, .. }
            | ControllerCommand::RemovePipeline { name }
            | ControllerCommand::PlacePipeline { name, .. } => {
                return Touched {
                    pipelines: vec![name.clone()],
                    ..Touched::default()
                }
            }
        };
        Touched {
            broker,
            topics,
            ..Touched::default()
        }
    }

    fn put_pipeline(
        &mut self,
        name: &str,
        config_toml: &str,
        instances: u32,
        plugins: &[String],
    ) -> Outcome {
        if name.is_empty() || instances == 0 {
            return Err(ControllerError::InvalidUpdate {
                reason: format!("pipeline {name:?} needs a name and at least one instance"),
            });
        }
        if let Some(id) = plugins.iter().find(|id| !self.plugins.contains_key(*id)) {
            return Err(ControllerError::MissingPlugin { id: id.clone() });
        }
        self.pipeline_deploys += 1;
        let deploy_number = self.pipeline_deploys;
        // The same file again changes nothing else (its plugins are those it runs now).
        if let Some(same) = self
            .pipelines
            .get_mut(name)
            .filter(|p| p.config_toml == config_toml)
        {
            same.deploy_number = deploy_number;
            same.plugins = plugins.to_vec();
            return Ok(ControllerResponse::Ok);
        }
        // A replaced pipeline keeps where its remaining instances run.
        let placement = self
            .pipelines
            .get(name)
            .map(|p| {
                p.placement
                    .range(1..=instances)
                    .map(|(k, b)| (*k, *b))
                    .collect()
            })
            .unwrap_or_default();
        self.pipelines.insert(
            name.to_string(),
            PipelineRecord {
                name: name.to_string(),
                config_toml: config_toml.to_string(),
                instances,
                plugins: plugins.to_vec(),
                placement,
                deploy_number,
            },
        );
        Ok(ControllerResponse::Ok)
    }

    fn place_pipeline(&mut self, name: &str, placement: &super::placement::Placement) -> Outcome {
        let brokers = &self.brokers;
        let p = self
            .pipelines
            .get_mut(name)
            .ok_or_else(|| ControllerError::UnknownPipeline {
                name: name.to_string(),
            })?;
        let whole = placement.keys().copied().eq(1..=p.instances);
        if !whole || placement.values().any(|b| !brokers.contains_key(b)) {
            return Err(ControllerError::InvalidUpdate {
                reason: format!(
                    "a placement of pipeline {name} must put each of its {} instances on a registered broker",
                    p.instances
                ),
            });
        }
        p.placement = placement.clone();
        Ok(ControllerResponse::Ok)
    }

    /// The brokers not fenced, in id order.
    pub fn live_brokers(&self) -> Vec<BrokerId> {
        self.brokers
            .values()
            .filter(|b| !b.fenced)
            .map(|b| b.id)
            .collect()
    }

    /// A better placement of pipeline `name` over the live brokers, when its placement has
    /// instances on brokers that are not live, unplaced instances, or uneven shares; `None`
    /// when it is fine as it is (or no broker is live).
    pub fn pipeline_placement_due(&self, name: &str) -> Option<super::placement::Placement> {
        let p = self.pipelines.get(name)?;
        let live = self.live_brokers();
        let better = super::placement::rebalance(&p.placement, p.instances, &live);
        (!better.is_empty() && better != p.placement).then_some(better)
    }

    /// The instance numbers (1-based) of pipeline `name` that broker `me` runs: those its
    /// placement puts on `me`, while `me` is live (a fenced broker runs none; the lowest
    /// live broker then proposes a new placement, see [`Self::pipeline_placement_due`]).
    pub fn pipeline_instances(&self, name: &str, me: BrokerId) -> Vec<u32> {
        let Some(p) = self.pipelines.get(name) else {
            return Vec::new();
        };
        if !self.is_live(me) {
            return Vec::new();
        }
        p.placement
            .iter()
            .filter(|(_, b)| **b == me)
            .map(|(k, _)| *k)
            .collect()
    }

    fn remove_plugin(&mut self, id: &str) -> Outcome {
        if !self.plugins.contains_key(id) {
            return Err(ControllerError::UnknownPlugin { id: id.to_string() });
        }
        if let Some(t) = self
            .topics
            .values()
            .find(|t| t.config.get("partitioner").map(|p| p.trim()) == Some(id))
        {
            return Err(ControllerError::PluginInUse {
                id: id.to_string(),
                topic: t.name.clone(),
            });
        }
        if let Some(p) = self
            .pipelines
            .values()
            .find(|p| p.plugins.iter().any(|u| u == id))
        {
            return Err(ControllerError::PluginUsedByPipeline {
                id: id.to_string(),
                pipeline: p.name.clone(),
            });
        }
        self.plugins.remove(id);
        Ok(ControllerResponse::Ok)
    }

    fn deploy_plugin(&mut self, id: &str, digest: &str, archive: &PluginArchive) -> Outcome {
        if let Some(existing) = self.plugins.get(id) {
            if existing.digest == digest {
                return Ok(ControllerResponse::Ok);
            }
            return Err(ControllerError::PluginVersionConflict {
                id: id.to_string(),
                digest: existing.digest.clone(),
            });
        }
        self.plugins.insert(
            id.to_string(),
            PluginRecord {
                id: id.to_string(),
                digest: digest.to_string(),
                archive: archive.clone(),
            },
        );
        Ok(ControllerResponse::Ok)
    }

    fn is_live(&self, id: BrokerId) -> bool {
        self.brokers.get(&id).is_some_and(|b| !b.fenced)
    }

    fn register_broker(
        &mut self,
        id: BrokerId,
        addr: &str,
        epoch: u64,
        empty_log: bool,
    ) -> Outcome {
        if let Some(b) = self.brokers.get(&id) {
            if epoch == b.broker_epoch && addr == b.addr {
                return Ok(ControllerResponse::Ok);
            }
            if epoch <= b.broker_epoch {
                return Err(ControllerError::StaleBrokerEpoch {
                    id,
                    current: b.broker_epoch,
                    given: epoch,
                });
            }
            // A new incarnation: whatever the old one held in memory is gone, so it starts
            // fenced and out of the ISRs it can leave, like a broker that missed heartbeats.
            self.fence_broker(id)?;
        }
        self.brokers.insert(
            id,
            BrokerRecord {
                id,
                addr: addr.to_string(),
                broker_epoch: epoch,
                fenced: true,
            },
        );
        if empty_log {
            // Where it was the last in-sync replica (a fence keeps the last one), it is
            // not one any more: electing it would make an empty log the one every other
            // replica copies. The partition stays offline until an unclean election is
            // allowed (nothing more is lost without the operator saying so).
            let live = self.live_brokers();
            for topic in self.topics.values_mut() {
                let (unclean, internal) = (topic.unclean_election(), topic.is_internal());
                for p in &mut topic.partitions {
                    p.lose_copy(id, &live, unclean, internal);
                }
            }
        }
        Ok(ControllerResponse::Ok)
    }

    fn fence_broker(&mut self, id: BrokerId) -> Outcome {
        let Some(b) = self.brokers.get_mut(&id) else {
            return Err(ControllerError::UnknownBroker { id });
        };
        b.fenced = true;
        let live = self.live_brokers();
        for topic in self.topics.values_mut() {
            let unclean = topic.unclean_election();
            for p in &mut topic.partitions {
                if p.leader != Some(id) && !p.isr.contains(&id) {
                    continue;
                }
                let before = p.clone();
                if p.isr.len() > 1 {
                    p.isr.retain(|&r| r != id);
                }
                if p.leader == Some(id) {
                    p.leader = p
                        .replicas
                        .iter()
                        .copied()
                        .find(|r| p.isr.contains(r) && live.contains(r));
                    if p.leader.is_none() && unclean {
                        if let Some(r) = p.unclean_choice(&live) {
                            p.leader = Some(r);
                            p.isr = vec![r];
                        }
                    }
                    p.leader_epoch += 1;
                }
                if *p != before {
                    p.partition_epoch += 1;
                }
            }
        }
        Ok(ControllerResponse::Ok)
    }

    fn replica_lost(&mut self, id: BrokerId, epoch: u64, topic: &str) -> Outcome {
        let current = self.brokers.get(&id).map_or(0, |b| b.broker_epoch);
        if current != epoch {
            return Err(ControllerError::StaleBrokerEpoch {
                id,
                current,
                given: epoch,
            });
        }
        let live = self.live_brokers();
        let Some(t) = self.topics.get_mut(topic) else {
            return Err(ControllerError::UnknownTopic {
                name: topic.to_string(),
            });
        };
        let (unclean, internal) = (t.unclean_election(), t.is_internal());
        for p in &mut t.partitions {
            p.lose_copy(id, &live, unclean, internal);
        }
        Ok(ControllerResponse::Ok)
    }

    fn unfence_broker(&mut self, id: BrokerId) -> Outcome {
        let Some(b) = self.brokers.get_mut(&id) else {
            return Err(ControllerError::UnknownBroker { id });
        };
        b.fenced = false;
        let live = self.live_brokers();
        for topic in self.topics.values_mut() {
            let unclean = topic.unclean_election();
            for p in &mut topic.partitions {
                if p.leader.is_some() || !p.replicas.contains(&id) {
                    continue;
                }
                if p.isr.contains(&id) {
                    p.leader = Some(id);
                } else if let Some(r) = p.unclean_choice(&live).filter(|_| unclean) {
                    p.leader = Some(r);
                    p.isr = vec![r];
                } else {
                    continue;
                }
                p.leader_epoch += 1;
                p.partition_epoch += 1;
            }
        }
        Ok(ControllerResponse::Ok)
    }

    fn create_topic(
        &mut self,
        name: &str,
        topic_id: u64,
        partitions: &[PartitionAssignment],
        config: &BTreeMap<String, String>,
    ) -> Outcome {
        if self.topics.contains_key(name) {
            return Err(ControllerError::TopicAlreadyExists {
                name: name.to_string(),
            });
        }
        if let Some(t) = self.topics.values().find(|t| t.topic_id == topic_id) {
            return Err(ControllerError::TopicIdInUse {
                topic_id,
                name: t.name.clone(),
            });
        }
        if topic_id <= self.last_topic_id {
            return Err(ControllerError::TopicIdInUse {
                topic_id,
                name: "a deleted topic".into(),
            });
        }
        let invalid = |reason: String| Err(ControllerError::InvalidAssignment { reason });
        if name.is_empty() {
            return invalid("the topic name is empty".into());
        }
        if partitions.is_empty() {
            return invalid("a topic needs at least one partition".into());
        }
        let records = self.new_partitions(0, partitions)?;
        self.topics.insert(
            name.to_string(),
            TopicRecord {
                name: name.to_string(),
                topic_id,
                config: config.clone(),
                partitions: records,
            },
        );
        self.last_topic_id = self.last_topic_id.max(topic_id);
        Ok(ControllerResponse::Ok)
    }

    /// Records of new, empty partitions numbered from `first`, checked.
    fn new_partitions(
        &self,
        first: usize,
        partitions: &[PartitionAssignment],
    ) -> Result<Vec<PartitionRecord>, ControllerError> {
        let invalid = |reason: String| Err(ControllerError::InvalidAssignment { reason });
        let mut records = Vec::with_capacity(partitions.len());
        for (i, a) in partitions.iter().enumerate() {
            let i = first + i;
            if a.replicas.is_empty() {
                return invalid(format!("partition {i} has no replicas"));
            }
            if has_duplicates(&a.replicas) {
                return invalid(format!("partition {i} names a broker twice"));
            }
            if let Some(&id) = a.replicas.iter().find(|r| !self.brokers.contains_key(r)) {
                return Err(ControllerError::UnknownBroker { id });
            }
            records.push(PartitionRecord {
                replicas: a.replicas.clone(),
                leader: a.replicas.iter().copied().find(|&r| self.is_live(r)),
                leader_epoch: 0,
                partition_epoch: 0,
                // An empty log is caught up everywhere.
                isr: a.replicas.clone(),
                target: None,
                lost: Vec::new(),
            });
        }
        Ok(records)
    }

    fn add_partitions(
        &mut self,
        name: &str,
        partitions: &[PartitionAssignment],
        after: Option<u32>,
    ) -> Outcome {
        let Some(first) = self.topics.get(name).map(|t| t.partitions.len()) else {
            return Err(ControllerError::UnknownTopic {
                name: name.to_string(),
            });
        };
        if after.is_some_and(|n| n as usize != first) {
            return Err(ControllerError::InvalidAssignment {
                reason: format!(
                    "topic {name} has {first} partitions now, not the {} the change was decided on",
                    after.unwrap_or_default()
                ),
            });
        }
        if partitions.is_empty() {
            return Err(ControllerError::InvalidAssignment {
                reason: "no partition to add".into(),
            });
        }
        let records = self.new_partitions(first, partitions)?;
        if let Some(t) = self.topics.get_mut(name) {
            t.partitions.extend(records);
        }
        Ok(ControllerResponse::Ok)
    }

    /// Starts moving a partition to `replicas`: the new ones join the replica set (outside
    /// the ISR: they start empty and catch up from the leader); the old ones stay until
    /// [`complete_reassignment`](Self::complete_reassignment).
    fn reassign(&mut self, topic: &str, partition: u32, replicas: &[BrokerId]) -> Outcome {
        let invalid = |reason: String| Err(ControllerError::InvalidAssignment { reason });
        if replicas.is_empty() {
            return invalid("a partition needs at least one replica".into());
        }
        if has_duplicates(replicas) {
            return invalid("the new replica set names a broker twice".into());
        }
        if let Some(&id) = replicas.iter().find(|r| !self.brokers.contains_key(r)) {
            return Err(ControllerError::UnknownBroker { id });
        }
        let p = self.partition_mut(topic, partition)?;
        // A reassignment in progress is replaced (Kafka's cancel and move): one to a broker
        // that never catches up (it died during the move) could otherwise neither complete
        // nor be undone. Replicas it added stay until the new one completes, which drops
        // every replica outside its target.
        if p.target.as_deref() == Some(replicas) {
            return invalid(format!(
                "a reassignment to {replicas:?} is already in progress"
            ));
        }
        let mut all = p.replicas.clone();
        all.extend(replicas.iter().filter(|r| !p.replicas.contains(r)));
        if all == p.replicas && replicas.len() == p.replicas.len() {
            return invalid(format!("the partition is already on {replicas:?}"));
        }
        p.replicas = all;
        p.target = Some(replicas.to_vec());
        p.partition_epoch += 1;
        Ok(ControllerResponse::Ok)
    }

    /// Ends a reassignment once every wanted replica is in the ISR: the replica set becomes
    /// the wanted one, the ISR drops the others, and a leader outside it hands over to an
    /// in-sync wanted replica (a new leader epoch).
    fn complete_reassignment(
        &mut self,
        topic: &str,
        partition: u32,
        partition_epoch: u64,
    ) -> Outcome {
        let live = self.live_brokers();
        let p = self.partition_mut(topic, partition)?;
        if partition_epoch != p.partition_epoch {
            return Err(ControllerError::StalePartitionEpoch {
                current: p.partition_epoch,
                given: partition_epoch,
            });
        }
        let Some(target) = p.target.clone() else {
            return Err(ControllerError::InvalidUpdate {
                reason: "no reassignment in progress".into(),
            });
        };
        if let Some(missing) = target.iter().find(|r| !p.isr.contains(r)) {
            return Err(ControllerError::InvalidUpdate {
                reason: format!("broker {missing} has not caught up yet"),
            });
        }
        p.isr.retain(|r| target.contains(r));
        p.lost.retain(|r| target.contains(r));
        if p.leader.is_none_or(|l| !target.contains(&l)) {
            p.leader = p.isr.iter().copied().find(|r| live.contains(r));
            p.leader_epoch += 1;
        }
        p.replicas = target;
        p.target = None;
        p.partition_epoch += 1;
        Ok(ControllerResponse::PartitionUpdated {
            leader_epoch: p.leader_epoch,
            partition_epoch: p.partition_epoch,
        })
    }

    fn partition_mut(
        &mut self,
        topic: &str,
        partition: u32,
    ) -> Result<&mut PartitionRecord, ControllerError> {
        self.topics
            .get_mut(topic)
            .ok_or_else(|| ControllerError::UnknownTopic {
                name: topic.to_string(),
            })?
            .partitions
            .get_mut(partition as usize)
            .ok_or_else(|| ControllerError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            })
    }

    fn update_partition(
        &mut self,
        topic: &str,
        partition: u32,
        leader: Option<BrokerId>,
        (leader_epoch, partition_epoch): (u64, u64),
        isr: &[BrokerId],
        broker_epochs: &BTreeMap<BrokerId, u64>,
    ) -> Outcome {
        let Some(t) = self.topics.get(topic) else {
            return Err(ControllerError::UnknownTopic {
                name: topic.to_string(),
            });
        };
        let Some(p) = t.partitions.get(partition as usize) else {
            return Err(ControllerError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            });
        };
        let invalid = |reason: String| Err(ControllerError::InvalidUpdate { reason });
        if leader_epoch < p.leader_epoch {
            return Err(ControllerError::FencedLeaderEpoch {
                current: p.leader_epoch,
                given: leader_epoch,
            });
        }
        if leader_epoch > p.leader_epoch {
            return invalid(format!(
                "leader epoch {leader_epoch} is ahead of the partition's {}",
                p.leader_epoch
            ));
        }
        if partition_epoch != p.partition_epoch {
            if partition_epoch < p.partition_epoch {
                return Err(ControllerError::StalePartitionEpoch {
                    current: p.partition_epoch,
                    given: partition_epoch,
                });
            }
            return invalid(format!(
                "partition epoch {partition_epoch} is ahead of the partition's {}",
                p.partition_epoch
            ));
        }
        if isr.is_empty() {
            return invalid("the ISR cannot be empty".into());
        }
        if has_duplicates(isr) {
            return invalid("the ISR names a broker twice".into());
        }
        if let Some(r) = isr.iter().find(|r| !p.replicas.contains(r)) {
            return invalid(format!("broker {r} is not a replica"));
        }
        if let Some(r) = isr
            .iter()
            .find(|r| !p.isr.contains(r) && !self.is_live(**r))
        {
            return invalid(format!("fenced or unknown broker {r} cannot join the ISR"));
        }
        // An addition judged on the fetches of an incarnation that has registered again
        // since (its log may be gone) waits for the new one to catch up.
        for (r, given) in broker_epochs {
            let current = self.brokers.get(r).map_or(0, |b| b.broker_epoch);
            if isr.contains(r) && !p.isr.contains(r) && current != *given {
                return Err(ControllerError::StaleBrokerEpoch {
                    id: *r,
                    current,
                    given: *given,
                });
            }
        }
        if let Some(l) = leader {
            if !isr.contains(&l) {
                return invalid(format!("leader {l} is not in the ISR"));
            }
            if !self.is_live(l) {
                return invalid(format!("leader {l} is fenced or unknown"));
            }
        }
        let new_leader_epoch = if leader != p.leader {
            p.leader_epoch + 1
        } else {
            p.leader_epoch
        };
        let new_partition_epoch = p.partition_epoch + 1;
        let p = &mut self
            .topics
            .get_mut(topic)
            .expect("checked above")
            .partitions[partition as usize];
        p.leader = leader;
        p.leader_epoch = new_leader_epoch;
        p.partition_epoch = new_partition_epoch;
        p.isr = isr.to_vec();
        p.lost.retain(|r| !isr.contains(r));
        Ok(ControllerResponse::PartitionUpdated {
            leader_epoch: new_leader_epoch,
            partition_epoch: new_partition_epoch,
        })
    }
}

fn has_duplicates(ids: &[BrokerId]) -> bool {
    ids.iter().enumerate().any(|(i, id)| ids[..i].contains(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(s: &mut ControllerState, id: BrokerId, epoch: u64) -> ControllerResponse {
        s.apply(&ControllerCommand::RegisterBroker {
            id,
            addr: format!("127.0.0.1:74{id:02}"),
            epoch,
            empty_log: false,
        })
    }

    /// Three live brokers and topic "t" with one partition on replicas [1, 2, 3].
    fn cluster(config: &[(&str, &str)]) -> ControllerState {
        let mut s = ControllerState::default();
        for id in 1..=3 {
            assert_eq!(register(&mut s, id, 1), ControllerResponse::Ok);
            assert_eq!(
                s.apply(&ControllerCommand::UnfenceBroker { id }),
                ControllerResponse::Ok
            );
        }
        let resp = s.apply(&ControllerCommand::CreateTopic {
            name: "t".into(),
            topic_id: s.next_topic_id(),
            partitions: vec![PartitionAssignment {
                replicas: vec![1, 2, 3],
            }],
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        assert_eq!(resp, ControllerResponse::Ok);
        s
    }

    fn update(
        s: &mut ControllerState,
        leader: Option<BrokerId>,
        leader_epoch: u64,
        partition_epoch: u64,
        isr: &[BrokerId],
    ) -> ControllerResponse {
        s.apply(&ControllerCommand::UpdatePartition {
            topic: "t".into(),
            partition: 0,
            leader,
            leader_epoch,
            partition_epoch,
            isr: isr.to_vec(),
            broker_epochs: BTreeMap::new(),
        })
    }

    /// Applies `cmd`, expects a refusal, and checks that nothing changed.
    fn refused(s: &mut ControllerState, cmd: ControllerCommand) -> ControllerError {
        let before = s.clone();
        match s.apply(&cmd) {
            ControllerResponse::Refused(e) => {
                assert_eq!(*s, before, "a refused {cmd:?} changed the state");
                e
            }
            other => panic!("{cmd:?} was not refused: {other:?}"),
        }
    }

    fn p0(s: &ControllerState) -> &PartitionRecord {
        s.partition("t", 0).unwrap()
    }

    #[test]
    fn new_topic_leads_on_first_live_replica_with_full_isr() {
        let s = cluster(&[]);
        let t = s.topic("t").unwrap();
        assert_eq!(t.topic_id, 1);
        assert_eq!(
            *p0(&s),
            PartitionRecord {
                replicas: vec![1, 2, 3],
                leader: Some(1),
                leader_epoch: 0,
                partition_epoch: 0,
                isr: vec![1, 2, 3],
                target: None,
                lost: vec![],
            }
        );
        assert_eq!(s.next_topic_id(), 2);
    }

    #[test]
    fn registration_is_fenced_and_stale_epochs_are_refused() {
        let mut s = ControllerState::default();
        assert_eq!(register(&mut s, 7, 5), ControllerResponse::Ok);
        assert!(s.broker(7).unwrap().fenced);
        // The same registration again is a retry, not an error.
        assert_eq!(register(&mut s, 7, 5), ControllerResponse::Ok);
        let e = refused(
            &mut s,
            ControllerCommand::RegisterBroker {
                id: 7,
                addr: "127.0.0.1:9999".into(),
                epoch: 4,
                empty_log: false,
            },
        );
        assert_eq!(
            e,
            ControllerError::StaleBrokerEpoch {
                id: 7,
                current: 5,
                given: 4
            }
        );
        assert!(matches!(
            refused(&mut s, ControllerCommand::FenceBroker { id: 8 }),
            ControllerError::UnknownBroker { id: 8 }
        ));
    }

    #[test]
    fn reregistration_with_a_new_epoch_fences_and_moves_leadership() {
        let mut s = cluster(&[]);
        assert_eq!(register(&mut s, 1, 2), ControllerResponse::Ok);
        let b = s.broker(1).unwrap();
        assert!(b.fenced);
        assert_eq!(b.broker_epoch, 2);
        assert_eq!(p0(&s).leader, Some(2));
        assert_eq!(p0(&s).isr, vec![2, 3]);
        assert_eq!(p0(&s).leader_epoch, 1);
    }

    #[test]
    fn partitions_are_added_after_the_existing_ones_and_checked() {
        let mut s = cluster(&[]);
        let add = |s: &mut ControllerState, replicas: Vec<Vec<u64>>| {
            s.apply(&ControllerCommand::AddPartitions {
                name: "t".into(),
                partitions: replicas
                    .into_iter()
                    .map(|replicas| PartitionAssignment { replicas })
                    .collect(),
                after: None,
            })
        };
        let before = s.topic("t").unwrap().partitions.clone();
        assert_eq!(add(&mut s, vec![vec![2, 3, 1]]), ControllerResponse::Ok);
        let t = s.topic("t").unwrap();
        assert_eq!(
            t.partitions[..before.len()],
            before[..],
            "existing partitions untouched"
        );
        let p = t.partitions.last().unwrap();
        assert_eq!((p.leader, p.isr.clone()), (Some(2), vec![2, 3, 1]));
        let unchanged = s.clone();
        assert!(matches!(
            add(&mut s, vec![vec![2, 2]]),
            ControllerResponse::Refused(ControllerError::InvalidAssignment { .. })
        ));
        assert!(matches!(
            add(&mut s, vec![vec![9]]),
            ControllerResponse::Refused(ControllerError::UnknownBroker { id: 9 })
        ));
        assert!(matches!(
            add(&mut s, vec![]),
            ControllerResponse::Refused(ControllerError::InvalidAssignment { .. })
        ));
        assert_eq!(s, unchanged, "a refused command changes nothing");
        // A change decided on a count the topic no longer has (sent again after it was
        // applied) adds nothing.
        let twice = ControllerCommand::AddPartitions {
            name: "t".into(),
            partitions: vec![PartitionAssignment {
                replicas: vec![1, 2, 3],
            }],
            after: Some(2),
        };
        assert_eq!(s.apply(&twice), ControllerResponse::Ok);
        assert!(matches!(
            s.apply(&twice),
            ControllerResponse::Refused(ControllerError::InvalidAssignment { .. })
        ));
        assert_eq!(s.topic("t").unwrap().partitions.len(), 3);
    }

    /// Moves t/0 to `replicas`.
    fn reassign(s: &mut ControllerState, replicas: Vec<u64>) -> ControllerResponse {
        s.apply(&ControllerCommand::ReassignPartition {
            topic: "t".into(),
            partition: 0,
            replicas,
        })
    }

    /// A move to a broker that never catches up (it died during the move) is replaced by
    /// another: here, back to where the partition was; completing it drops the dead one.
    #[test]
    fn a_reassignment_in_progress_is_replaced_by_a_new_one() {
        let mut s = cluster(&[]);
        assert_eq!(register(&mut s, 4, 1), ControllerResponse::Ok);
        assert_eq!(reassign(&mut s, vec![2, 3, 4]), ControllerResponse::Ok);
        assert_eq!(reassign(&mut s, vec![1, 2, 3]), ControllerResponse::Ok);
        let p = p0(&s).clone();
        assert_eq!(p.target, Some(vec![1, 2, 3]));
        let done = s.apply(&ControllerCommand::CompleteReassignment {
            topic: "t".into(),
            partition: 0,
            partition_epoch: p.partition_epoch,
        });
        assert!(
            matches!(done, ControllerResponse::PartitionUpdated { .. }),
            "{done:?}"
        );
        let p = p0(&s);
        assert_eq!(
            (p.replicas.clone(), p.target.clone()),
            (vec![1, 2, 3], None)
        );
    }

    #[test]
    fn a_reassignment_adds_the_new_replicas_first_and_drops_the_old_ones_once_in_sync() {
        let mut s = cluster(&[]);
        // t/0 is on [1, 2, 3]; move it to [2, 3, 4] (broker 4 joins).
        assert_eq!(register(&mut s, 4, 1), ControllerResponse::Ok);
        s.apply(&ControllerCommand::UnfenceBroker { id: 4 });
        assert_eq!(reassign(&mut s, vec![2, 3, 4]), ControllerResponse::Ok);
        let p = p0(&s).clone();
        assert_eq!(p.replicas, vec![1, 2, 3, 4]);
        assert_eq!(
            p.isr,
            vec![1, 2, 3],
            "the new replica starts outside the ISR"
        );
        assert_eq!(p.target, Some(vec![2, 3, 4]));
        // The same move again, or finishing early, is refused.
        assert!(matches!(
            reassign(&mut s, vec![2, 3, 4]),
            ControllerResponse::Refused(_)
        ));
        let complete = |s: &mut ControllerState, pe| {
            s.apply(&ControllerCommand::CompleteReassignment {
                topic: "t".into(),
                partition: 0,
                partition_epoch: pe,
            })
        };
        assert!(matches!(
            complete(&mut s, p.partition_epoch),
            ControllerResponse::Refused(ControllerError::InvalidUpdate { .. })
        ));
        // Broker 4 caught up: the leader (1) adds it to the ISR.
        let resp = update(
            &mut s,
            Some(1),
            p.leader_epoch,
            p.partition_epoch,
            &[1, 2, 3, 4],
        );
        assert!(matches!(resp, ControllerResponse::PartitionUpdated { .. }));
        let p = p0(&s).clone();
        assert!(matches!(
            complete(&mut s, p.partition_epoch - 1),
            ControllerResponse::Refused(ControllerError::StalePartitionEpoch { .. })
        ));
        assert!(matches!(
            complete(&mut s, p.partition_epoch),
            ControllerResponse::PartitionUpdated { .. }
        ));
        let done = p0(&s);
        assert_eq!(
            (done.replicas.clone(), done.isr.clone(), done.target.clone()),
            (vec![2, 3, 4], vec![2, 3, 4], None)
        );
        assert_eq!(
            done.leader,
            Some(2),
            "the old leader left: an in-sync new replica leads"
        );
        assert_eq!(done.leader_epoch, p.leader_epoch + 1);
    }

    #[test]
    fn create_topic_is_validated() {
        let mut s = cluster(&[]);
        let create =
            |name: &str, topic_id: u64, replicas: Vec<BrokerId>| ControllerCommand::CreateTopic {
                name: name.into(),
                topic_id,
                partitions: vec![PartitionAssignment { replicas }],
                config: BTreeMap::new(),
            };
        assert!(matches!(
            refused(&mut s, create("t", 9, vec![1])),
            ControllerError::TopicAlreadyExists { .. }
        ));
        assert!(matches!(
            refused(&mut s, create("u", 1, vec![1])),
            ControllerError::TopicIdInUse { topic_id: 1, .. }
        ));
        assert!(matches!(
            refused(&mut s, create("u", 2, vec![1, 4])),
            ControllerError::UnknownBroker { id: 4 }
        ));
        assert!(matches!(
            refused(&mut s, create("u", 2, vec![1, 2, 1])),
            ControllerError::InvalidAssignment { .. }
        ));
        assert!(matches!(
            refused(&mut s, create("u", 2, vec![])),
            ControllerError::InvalidAssignment { .. }
        ));
        assert_eq!(s.apply(&create("u", 2, vec![3, 1])), ControllerResponse::Ok);
        assert_eq!(s.partition("u", 0).unwrap().leader, Some(3));
        // A deleted topic's id is never used again, even for a topic of the same name.
        assert_eq!(
            s.apply(&ControllerCommand::DeleteTopic { name: "u".into() }),
            ControllerResponse::Ok
        );
        assert_eq!(s.next_topic_id(), 3);
        assert!(matches!(
            refused(&mut s, create("u", 2, vec![1])),
            ControllerError::TopicIdInUse { topic_id: 2, .. }
        ));
        assert_eq!(s.apply(&create("u", 3, vec![1])), ControllerResponse::Ok);
    }

    #[test]
    fn isr_update_with_an_old_partition_epoch_is_refused() {
        let mut s = cluster(&[]);
        // The leader shrinks the ISR: the partition epoch moves to 1, the leader epoch stays.
        assert_eq!(
            update(&mut s, Some(1), 0, 0, &[1, 2]),
            ControllerResponse::PartitionUpdated {
                leader_epoch: 0,
                partition_epoch: 1
            }
        );
        // A second proposal decided on the old metadata loses.
        let e = refused(
            &mut s,
            ControllerCommand::UpdatePartition {
                topic: "t".into(),
                partition: 0,
                leader: Some(1),
                leader_epoch: 0,
                partition_epoch: 0,
                isr: vec![1],
                broker_epochs: BTreeMap::new(),
            },
        );
        assert_eq!(
            e,
            ControllerError::StalePartitionEpoch {
                current: 1,
                given: 0
            }
        );
        assert_eq!(p0(&s).isr, vec![1, 2]);
    }

    /// KIP-903: a leader that judged a replica caught up on the fetches of its earlier
    /// incarnation cannot bring it back into the ISR once the broker registered again.
    #[test]
    fn an_isr_addition_from_an_earlier_broker_incarnation_is_refused() {
        let mut s = cluster(&[]);
        update(&mut s, Some(1), 0, 0, &[1, 2]);
        // Broker 3 restarts (incarnation 2), say with a wiped data directory.
        assert_eq!(register(&mut s, 3, 2), ControllerResponse::Ok);
        s.apply(&ControllerCommand::UnfenceBroker { id: 3 });
        let add = |epoch: u64, pe: u64| ControllerCommand::UpdatePartition {
            topic: "t".into(),
            partition: 0,
            leader: Some(1),
            leader_epoch: 0,
            partition_epoch: pe,
            isr: vec![1, 2, 3],
            broker_epochs: BTreeMap::from([(3, epoch)]),
        };
        let e = refused(&mut s, add(1, 1));
        assert_eq!(
            e,
            ControllerError::StaleBrokerEpoch {
                id: 3,
                current: 2,
                given: 1
            }
        );
        assert!(matches!(
            s.apply(&add(2, 1)),
            ControllerResponse::PartitionUpdated { .. }
        ));
        assert_eq!(p0(&s).isr, vec![1, 2, 3]);
        // Members already in the ISR are not checked (their epochs are not additions).
        assert!(matches!(
            s.apply(&ControllerCommand::UpdatePartition {
                topic: "t".into(),
                partition: 0,
                leader: Some(1),
                leader_epoch: 0,
                partition_epoch: 2,
                isr: vec![1, 3],
                broker_epochs: BTreeMap::from([(3, 1)]),
            }),
            ControllerResponse::PartitionUpdated { .. }
        ));
    }

    #[test]
    fn a_stale_leader_epoch_is_fenced_and_leader_epoch_only_grows() {
        let mut s = cluster(&[]);
        let mut last_leader_epoch = p0(&s).leader_epoch;
        // Elect 2, then 3, then shrink and expand the ISR under 3.
        let steps: [(Option<BrokerId>, &[BrokerId]); 4] = [
            (Some(2), &[1, 2, 3]),
            (Some(3), &[2, 3]),
            (Some(3), &[3]),
            (Some(3), &[3, 1]),
        ];
        for (leader, isr) in steps {
            let p = p0(&s).clone();
            let resp = update(&mut s, leader, p.leader_epoch, p.partition_epoch, isr);
            assert!(matches!(resp, ControllerResponse::PartitionUpdated { .. }));
            let now = p0(&s);
            assert!(now.leader_epoch >= last_leader_epoch);
            assert_eq!(now.partition_epoch, p.partition_epoch + 1);
            assert_eq!(
                now.leader_epoch,
                p.leader_epoch + u64::from(leader != p.leader)
            );
            last_leader_epoch = now.leader_epoch;
        }
        assert_eq!(p0(&s).leader_epoch, 2);
        // The leader of epoch 1 (broker 2) tries to change the ISR: fenced.
        let pe = p0(&s).partition_epoch;
        let e = refused(
            &mut s,
            ControllerCommand::UpdatePartition {
                topic: "t".into(),
                partition: 0,
                leader: Some(2),
                leader_epoch: 1,
                partition_epoch: pe,
                isr: vec![2, 3],
                broker_epochs: BTreeMap::new(),
            },
        );
        assert_eq!(
            e,
            ControllerError::FencedLeaderEpoch {
                current: 2,
                given: 1
            }
        );
    }

    #[test]
    fn partition_updates_are_validated() {
        let mut s = cluster(&[]);
        let bad = |s: &mut ControllerState, leader, isr: &[BrokerId]| {
            refused(
                s,
                ControllerCommand::UpdatePartition {
                    topic: "t".into(),
                    partition: 0,
                    leader,
                    leader_epoch: 0,
                    partition_epoch: 0,
                    isr: isr.to_vec(),
                    broker_epochs: BTreeMap::new(),
                },
            )
        };
        for (leader, isr) in [
            (Some(1), &[][..]),
            (Some(1), &[1, 1][..]),
            (Some(1), &[1, 4][..]),
            (Some(2), &[1, 3][..]),
        ] {
            assert!(matches!(
                bad(&mut s, leader, isr),
                ControllerError::InvalidUpdate { .. }
            ));
        }
        // A fenced broker can neither lead nor rejoin the ISR.
        assert_eq!(update(&mut s, Some(1), 0, 0, &[1, 2]), {
            ControllerResponse::PartitionUpdated {
                leader_epoch: 0,
                partition_epoch: 1,
            }
        });
        s.apply(&ControllerCommand::FenceBroker { id: 3 });
        let p = p0(&s).clone();
        for (leader, isr) in [(Some(1), &[1, 2, 3][..]), (Some(3), &[1, 2, 3][..])] {
            let e = refused(
                &mut s,
                ControllerCommand::UpdatePartition {
                    topic: "t".into(),
                    partition: 0,
                    leader,
                    leader_epoch: p.leader_epoch,
                    partition_epoch: p.partition_epoch,
                    isr: isr.to_vec(),
                    broker_epochs: BTreeMap::new(),
                },
            );
            assert!(matches!(e, ControllerError::InvalidUpdate { .. }), "{e}");
        }
        assert!(matches!(
            refused(
                &mut s,
                ControllerCommand::UpdatePartition {
                    topic: "t".into(),
                    partition: 1,
                    leader: Some(1),
                    leader_epoch: 0,
                    partition_epoch: 0,
                    isr: vec![1],
                    broker_epochs: BTreeMap::new(),
                }
            ),
            ControllerError::UnknownPartition { partition: 1, .. }
        ));
    }

    #[test]
    fn fencing_the_leader_elects_the_next_isr_replica() {
        let mut s = cluster(&[]);
        s.apply(&ControllerCommand::FenceBroker { id: 1 });
        let p = p0(&s);
        assert_eq!(p.leader, Some(2));
        assert_eq!(p.isr, vec![2, 3]);
        assert_eq!((p.leader_epoch, p.partition_epoch), (1, 1));
        // Fencing a follower only shrinks the ISR.
        s.apply(&ControllerCommand::FenceBroker { id: 3 });
        let p = p0(&s);
        assert_eq!(p.leader, Some(2));
        assert_eq!(p.isr, vec![2]);
        assert_eq!((p.leader_epoch, p.partition_epoch), (1, 2));
        // Fencing again changes nothing.
        let before = s.clone();
        assert_eq!(
            s.apply(&ControllerCommand::FenceBroker { id: 3 }),
            ControllerResponse::Ok
        );
        assert_eq!(s, before);
    }

    #[test]
    fn losing_the_last_isr_member_goes_offline_until_it_returns() {
        let mut s = cluster(&[]);
        assert!(matches!(
            update(&mut s, Some(1), 0, 0, &[1]),
            ControllerResponse::PartitionUpdated { .. }
        ));
        s.apply(&ControllerCommand::FenceBroker { id: 1 });
        let p = p0(&s);
        // 2 and 3 are live but not in the ISR: no clean leader.
        assert_eq!(p.leader, None);
        assert_eq!(p.isr, vec![1]);
        assert_eq!(p.leader_epoch, 1);
        // Another replica coming back does not lead either.
        s.apply(&ControllerCommand::UnfenceBroker { id: 2 });
        assert_eq!(p0(&s).leader, None);
        // The ISR member does.
        s.apply(&ControllerCommand::UnfenceBroker { id: 1 });
        let p = p0(&s);
        assert_eq!(p.leader, Some(1));
        assert_eq!(p.leader_epoch, 2);
        assert_eq!(p.isr, vec![1]);
    }

    /// The last in-sync replica back on an empty log store must not lead: every other
    /// replica would then truncate to its empty log.
    #[test]
    fn the_last_isr_member_back_without_its_log_does_not_lead() {
        let mut s = cluster(&[]);
        update(&mut s, Some(1), 0, 0, &[1]);
        s.apply(&ControllerCommand::FenceBroker { id: 1 });
        let before = p0(&s).clone();
        // Broker 1 returns on a new disk.
        assert_eq!(
            s.apply(&ControllerCommand::RegisterBroker {
                id: 1,
                addr: "127.0.0.1:7401".into(),
                epoch: 2,
                empty_log: true,
            }),
            ControllerResponse::Ok
        );
        let p = p0(&s).clone();
        assert_eq!(
            (p.leader, p.isr.clone(), p.lost.clone()),
            (None, vec![], vec![1])
        );
        assert_eq!(p.partition_epoch, before.partition_epoch + 1);
        for id in [1, 2, 3] {
            s.apply(&ControllerCommand::UnfenceBroker { id });
        }
        assert_eq!(p0(&s).leader, None, "no clean leader: offline");
        // The operator accepts the loss: a live replica that kept its copy is elected, not
        // broker 1 (first in the replica list, but empty).
        s.apply(&ControllerCommand::AlterTopicConfig {
            name: "t".into(),
            set: [(UNCLEAN_LEADER_ELECTION.to_string(), "true".to_string())].into(),
            remove: vec![],
        });
        let p = p0(&s).clone();
        assert_eq!((p.leader, p.isr.clone()), (Some(2), vec![2]));
        // Broker 1 catches up and rejoins: no longer marked.
        update(&mut s, Some(2), p.leader_epoch, p.partition_epoch, &[2, 1]);
        assert_eq!(p0(&s).lost, Vec::<BrokerId>::new());
    }

    /// An internal topic cannot be altered: where its last in-sync replica comes back
    /// empty, another live replica is taken at once, and with none the empty one leads
    /// again (a broker cannot run without its internal topics).
    #[test]
    fn an_internal_topics_last_isr_member_back_empty_gives_way_to_a_live_replica() {
        let mut s = cluster(&[]);
        for (name, replicas) in [("__a", vec![1, 2, 3]), ("__b", vec![1])] {
            let topic_id = s.next_topic_id();
            s.apply(&ControllerCommand::CreateTopic {
                name: name.into(),
                topic_id,
                partitions: vec![PartitionAssignment { replicas }],
                config: BTreeMap::new(),
            });
        }
        let pe = s.topic("__a").unwrap().partitions[0].partition_epoch;
        s.apply(&ControllerCommand::UpdatePartition {
            topic: "__a".into(),
            partition: 0,
            leader: Some(1),
            leader_epoch: 0,
            partition_epoch: pe,
            isr: vec![1],
            broker_epochs: BTreeMap::new(),
        });
        s.apply(&ControllerCommand::FenceBroker { id: 1 });
        s.apply(&ControllerCommand::RegisterBroker {
            id: 1,
            addr: "127.0.0.1:7401".into(),
            epoch: 2,
            empty_log: true,
        });
        let a = &s.topic("__a").unwrap().partitions[0];
        assert_eq!((a.leader, a.isr.clone()), (Some(2), vec![2]));
        let b = &s.topic("__b").unwrap().partitions[0];
        assert_eq!(b.isr, vec![1]);
        s.apply(&ControllerCommand::UnfenceBroker { id: 1 });
        assert_eq!(s.topic("__b").unwrap().partitions[0].leader, Some(1));
        // A lost copy reported by the live, only replica: it keeps leading, not marked.
        s.apply(&ControllerCommand::ReplicaLost {
            id: 1,
            epoch: 2,
            topic: "__b".into(),
        });
        let b = &s.topic("__b").unwrap().partitions[0];
        assert_eq!(
            (b.leader, b.isr.clone(), b.lost.clone()),
            (Some(1), vec![1], vec![])
        );
    }

    /// On an empty log store, a broker that shares the ISR with others just leaves it (as
    /// any new incarnation does); partitions it was not the last of keep their leaders.
    #[test]
    fn a_broker_back_without_its_log_leaves_shared_isrs_as_any_restart_does() {
        let mut s = cluster(&[]);
        assert_eq!(
            s.apply(&ControllerCommand::RegisterBroker {
                id: 2,
                addr: "127.0.0.1:7402".into(),
                epoch: 2,
                empty_log: true,
            }),
            ControllerResponse::Ok
        );
        let p = p0(&s);
        assert_eq!((p.leader, p.isr.clone()), (Some(1), vec![1, 3]));
        assert_eq!(p.lost, vec![2]);
    }

    /// A broker whose copy of a topic is lost (a damaged record) leaves its ISRs and
    /// leaderships, the last membership too; a report from an earlier incarnation is
    /// refused.
    #[test]
    fn a_lost_copy_leaves_the_topics_isrs_and_leaderships() {
        let mut s = cluster(&[]);
        let lost = |id, epoch| ControllerCommand::ReplicaLost {
            id,
            epoch,
            topic: "t".into(),
        };
        let e = refused(&mut s, lost(1, 7));
        assert!(
            matches!(e, ControllerError::StaleBrokerEpoch { id: 1, .. }),
            "{e}"
        );
        let before = p0(&s).clone();
        assert_eq!(s.apply(&lost(1, 1)), ControllerResponse::Ok);
        let p = p0(&s).clone();
        assert_eq!((p.leader, p.isr.clone()), (Some(2), vec![2, 3]));
        assert_eq!(p.leader_epoch, before.leader_epoch + 1);
        assert_eq!(p.partition_epoch, before.partition_epoch + 1);
        // Broker 2 alone in sync, then its copy is lost too: offline, nobody in sync.
        update(&mut s, Some(2), p.leader_epoch, p.partition_epoch, &[2]);
        assert_eq!(s.apply(&lost(2, 1)), ControllerResponse::Ok);
        let p = p0(&s);
        assert_eq!((p.leader, p.isr.clone()), (None, vec![]));
        assert!(matches!(
            refused(
                &mut s,
                ControllerCommand::ReplicaLost {
                    id: 3,
                    epoch: 1,
                    topic: "nope".into()
                }
            ),
            ControllerError::UnknownTopic { .. }
        ));
    }

    #[test]
    fn unclean_election_only_where_the_topic_allows_it() {
        let mut s = cluster(&[(UNCLEAN_LEADER_ELECTION, "true")]);
        assert!(matches!(
            update(&mut s, Some(1), 0, 0, &[1]),
            ControllerResponse::PartitionUpdated { .. }
        ));
        s.apply(&ControllerCommand::FenceBroker { id: 1 });
        let p = p0(&s);
        assert_eq!(p.leader, Some(2));
        assert_eq!(p.isr, vec![2]);
        // Allowed only after the partition lost its leader: it gets one then.
        let mut s = cluster(&[]);
        update(&mut s, Some(1), 0, 0, &[1]);
        s.apply(&ControllerCommand::FenceBroker { id: 1 });
        assert_eq!(p0(&s).leader, None, "no unclean election unless allowed");
        let epoch = p0(&s).leader_epoch;
        s.apply(&ControllerCommand::AlterTopicConfig {
            name: "t".into(),
            set: [(UNCLEAN_LEADER_ELECTION.to_string(), "true".to_string())].into(),
            remove: Vec::new(),
        });
        let p = p0(&s);
        assert_eq!((p.leader, p.isr.clone()), (Some(2), vec![2]));
        assert_eq!(p.leader_epoch, epoch + 1);
    }

    #[test]
    fn topic_config_alter_and_delete() {
        let mut s = cluster(&[("retention.ms", "1000"), ("cleanup.policy", "delete")]);
        let resp = s.apply(&ControllerCommand::AlterTopicConfig {
            name: "t".into(),
            set: [("retention.ms".to_string(), "2000".to_string())].into(),
            remove: vec!["cleanup.policy".into()],
        });
        assert_eq!(resp, ControllerResponse::Ok);
        assert_eq!(
            s.topic("t").unwrap().config,
            BTreeMap::from([("retention.ms".to_string(), "2000".to_string())])
        );
        assert_eq!(
            s.apply(&ControllerCommand::DeleteTopic { name: "t".into() }),
            ControllerResponse::Ok
        );
        assert!(s.topic("t").is_none());
        assert!(matches!(
            refused(&mut s, ControllerCommand::DeleteTopic { name: "t".into() }),
            ControllerError::UnknownTopic { .. }
        ));
    }

    #[test]
    fn touched_covers_every_change() {
        let mut s = cluster(&[]);
        let cmds = [
            ControllerCommand::FenceBroker { id: 1 },
            ControllerCommand::RegisterBroker {
                id: 2,
                addr: "x:2".into(),
                epoch: 9,
                empty_log: false,
            },
            ControllerCommand::UnfenceBroker { id: 1 },
            ControllerCommand::UnfenceBroker { id: 2 },
            ControllerCommand::AlterTopicConfig {
                name: "t".into(),
                set: [("a".to_string(), "b".to_string())].into(),
                remove: vec![],
            },
            ControllerCommand::CreateTopic {
                name: "u".into(),
                topic_id: 5,
                partitions: vec![PartitionAssignment { replicas: vec![2] }],
                config: BTreeMap::new(),
            },
            ControllerCommand::DeleteTopic { name: "t".into() },
            ControllerCommand::DeployPlugin {
                id: "p@1.0.0".into(),
                digest: "d1".into(),
                archive: PluginArchive(b"zip".to_vec().into()),
            },
            ControllerCommand::PutPipeline {
                name: "wc".into(),
                config_toml: "name = 'wc'".into(),
                instances: 2,
                plugins: vec!["p@1.0.0".into()],
            },
            ControllerCommand::PlacePipeline {
                name: "wc".into(),
                placement: [(1, 1), (2, 3)].into(),
            },
            ControllerCommand::RemovePipeline { name: "wc".into() },
            ControllerCommand::RemovePlugin {
                id: "p@1.0.0".into(),
            },
        ];
        for cmd in cmds {
            let before = s.clone();
            let Touched {
                broker,
                topics,
                plugins,
                pipelines,
            } = s.touched(&cmd);
            let resp = s.apply(&cmd);
            assert!(
                !matches!(resp, ControllerResponse::Refused(_)),
                "{cmd:?}: {resp:?}"
            );
            for (id, b) in &s.brokers {
                if before.brokers.get(id) != Some(b) {
                    assert_eq!(broker, Some(*id), "{cmd:?}");
                }
            }
            let names = before.topics.keys().chain(s.topics.keys());
            for name in names {
                if before.topics.get(name) != s.topics.get(name) {
                    assert!(topics.contains(name), "{cmd:?} changed {name}");
                }
            }
            for id in before.plugins.keys().chain(s.plugins.keys()) {
                if before.plugins.get(id) != s.plugins.get(id) {
                    assert!(plugins.contains(id), "{cmd:?} changed {id}");
                }
            }
            for name in before.pipelines.keys().chain(s.pipelines.keys()) {
                if before.pipelines.get(name) != s.pipelines.get(name) {
                    assert!(pipelines.contains(name), "{cmd:?} changed {name}");
                }
            }
        }
    }

    #[test]
    fn pipeline_instances_spread_over_live_brokers_and_hold_their_plugins() {
        let mut s = cluster(&[]);
        let put = |instances: u32, plugins: &[&str]| ControllerCommand::PutPipeline {
            name: "wc".into(),
            config_toml: format!("instances = {instances}"),
            instances,
            plugins: plugins.iter().map(|p| p.to_string()).collect(),
        };
        assert!(matches!(
            refused(&mut s, put(3, &["split@1.0.0"])),
            ControllerError::MissingPlugin { .. }
        ));
        assert!(matches!(
            refused(&mut s, put(0, &[])),
            ControllerError::InvalidUpdate { .. }
        ));
        s.apply(&ControllerCommand::DeployPlugin {
            id: "split@1.0.0".into(),
            digest: "d".into(),
            archive: PluginArchive(b"zip".to_vec().into()),
        });
        assert_eq!(s.apply(&put(4, &["split@1.0.0"])), ControllerResponse::Ok);
        let shares = |s: &ControllerState| -> Vec<Vec<u32>> {
            (1..=3).map(|b| s.pipeline_instances("wc", b)).collect()
        };
        // Nothing runs until it is placed; the placement the lowest live broker proposes
        // spreads it.
        assert!(shares(&s).iter().all(Vec::is_empty));
        let place = |s: &mut ControllerState| {
            let placement = s.pipeline_placement_due("wc").expect("a placement is due");
            let resp = s.apply(&ControllerCommand::PlacePipeline {
                name: "wc".into(),
                placement,
            });
            assert_eq!(resp, ControllerResponse::Ok);
            assert_eq!(s.pipeline_placement_due("wc"), None, "placed for good");
        };
        place(&mut s);
        assert_eq!(shares(&s), vec![vec![1, 2], vec![3], vec![4]]);
        // A fenced broker runs none at once; the new placement moves only its instance.
        s.apply(&ControllerCommand::FenceBroker { id: 2 });
        assert!(shares(&s)[1].is_empty());
        place(&mut s);
        assert_eq!(shares(&s), vec![vec![1, 2], vec![], vec![3, 4]]);
        s.apply(&ControllerCommand::UnfenceBroker { id: 2 });
        place(&mut s);
        assert_eq!(
            shares(&s).iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 1, 1]
        );
        // A placement must cover every instance, on registered brokers.
        assert!(matches!(
            refused(
                &mut s,
                ControllerCommand::PlacePipeline {
                    name: "wc".into(),
                    placement: [(1, 1), (2, 9), (3, 1), (4, 1)].into(),
                }
            ),
            ControllerError::InvalidUpdate { .. }
        ));
        assert!(matches!(
            refused(
                &mut s,
                ControllerCommand::PlacePipeline {
                    name: "wc".into(),
                    placement: [(1, 1)].into(),
                }
            ),
            ControllerError::InvalidUpdate { .. }
        ));
        // The same file again changes nothing but its deploy number (which has brokers
        // start their failed part again); a changed file takes a new number too.
        let placed = s.pipelines["wc"].clone();
        assert_eq!(s.apply(&put(4, &["split@1.0.0"])), ControllerResponse::Ok);
        assert!(s.pipelines["wc"].deploy_number > placed.deploy_number);
        assert_eq!(
            PipelineRecord {
                deploy_number: placed.deploy_number,
                ..s.pipelines["wc"].clone()
            },
            placed,
            "only the deploy number moved"
        );
        let again = s.pipelines["wc"].deploy_number;
        // Replaced in place, its remaining instances stay where they ran; its plugin cannot
        // be removed while it is deployed.
        let before = s.pipelines["wc"].placement.clone();
        assert_eq!(s.apply(&put(2, &["split@1.0.0"])), ControllerResponse::Ok);
        assert_eq!(
            s.pipelines["wc"].placement,
            before.range(1..=2).map(|(k, b)| (*k, *b)).collect()
        );
        assert!(s.pipelines["wc"].deploy_number > again);
        assert!(matches!(
            refused(
                &mut s,
                ControllerCommand::RemovePlugin {
                    id: "split@1.0.0".into()
                }
            ),
            ControllerError::PluginUsedByPipeline { .. }
        ));
        assert_eq!(
            s.apply(&ControllerCommand::RemovePipeline { name: "wc".into() }),
            ControllerResponse::Ok
        );
        assert!(shares(&s).iter().all(Vec::is_empty));
        assert!(matches!(
            refused(
                &mut s,
                ControllerCommand::RemovePipeline { name: "wc".into() }
            ),
            ControllerError::UnknownPipeline { .. }
        ));
        assert_eq!(
            s.apply(&ControllerCommand::RemovePlugin {
                id: "split@1.0.0".into()
            }),
            ControllerResponse::Ok
        );
    }

    #[test]
    fn a_deployed_plugin_version_never_changes() {
        let mut s = ControllerState::default();
        let deploy = |digest: &str| ControllerCommand::DeployPlugin {
            id: "grep@1.0.0".into(),
            digest: digest.into(),
            archive: PluginArchive(digest.as_bytes().to_vec().into()),
        };
        assert_eq!(s.apply(&deploy("d1")), ControllerResponse::Ok);
        assert_eq!(
            s.apply(&deploy("d1")),
            ControllerResponse::Ok,
            "same bytes again"
        );
        assert!(matches!(
            refused(&mut s, deploy("d2")),
            ControllerError::PluginVersionConflict { .. }
        ));
        assert_eq!(&*s.plugins["grep@1.0.0"].archive.0, b"d1");
        // The archive survives the JSON of snapshots and the log.
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(serde_json::from_slice::<ControllerState>(&json).unwrap(), s);
        let remove = || ControllerCommand::RemovePlugin {
            id: "grep@1.0.0".into(),
        };
        // Not while a topic names it as its partitioner (checked here, so two brokers
        // racing an alter and a removal cannot both win).
        let mut with_topic = cluster(&[("partitioner", "grep@1.0.0")]);
        with_topic.plugins = s.plugins.clone();
        assert!(matches!(
            refused(&mut with_topic, remove()),
            ControllerError::PluginInUse { .. }
        ));
        assert_eq!(s.apply(&remove()), ControllerResponse::Ok);
        assert!(matches!(
            refused(&mut s, remove()),
            ControllerError::UnknownPlugin { .. }
        ));
    }

    #[test]
    fn same_log_same_state_and_it_round_trips() {
        let log = [
            ControllerCommand::RegisterBroker {
                id: 2,
                addr: "b:2".into(),
                epoch: 1,
                empty_log: false,
            },
            ControllerCommand::RegisterBroker {
                id: 1,
                addr: "b:1".into(),
                epoch: 1,
                empty_log: false,
            },
            ControllerCommand::UnfenceBroker { id: 1 },
            ControllerCommand::UnfenceBroker { id: 2 },
            ControllerCommand::CreateTopic {
                name: "x".into(),
                topic_id: 10,
                partitions: vec![
                    PartitionAssignment {
                        replicas: vec![1, 2],
                    },
                    PartitionAssignment {
                        replicas: vec![2, 1],
                    },
                ],
                config: BTreeMap::new(),
            },
            ControllerCommand::FenceBroker { id: 2 },
            ControllerCommand::DeleteTopic {
                name: "nope".into(),
            },
        ];
        let run = || {
            let mut s = ControllerState::default();
            let responses: Vec<_> = log.iter().map(|c| s.apply(c)).collect();
            (s, responses)
        };
        let (a, ra) = run();
        let (b, rb) = run();
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        let json = serde_json::to_vec(&a).unwrap();
        assert_eq!(serde_json::from_slice::<ControllerState>(&json).unwrap(), a);
        assert_eq!(a.partition("x", 1).unwrap().leader, Some(1));
    }
}
