//! The controller's Raft types: who the voters are ([`BrokerNode`]), what is proposed
//! ([`ControllerCommand`]), what applying it answers ([`ControllerResponse`]), and the
//! openraft type configuration [`TypeConfig`] that ties them together.
//!
//! These are the controller's *log* format: every broker decodes them from its own copy of the
//! metadata log, so a change to a variant's fields is a change of the on-disk format.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A broker's id (`broker.id`), which is also its Raft node id.
pub type BrokerId = u64;

/// How openraft reaches a controller voter or learner: the broker's QUIC address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerNode {
    /// `host:port` of the broker's QUIC endpoint (the Raft ALPN is served there too).
    pub addr: String,
}

impl fmt::Display for BrokerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// Where one partition's replicas go, as chosen by whoever proposes a topic creation.
/// The first replica is the preferred (and initial) leader; all replicas start in the ISR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionAssignment {
    /// Broker ids holding a copy, preferred leader first; no duplicates.
    pub replicas: Vec<BrokerId>,
}

/// A deployed plugin's bundle archive (canonical bytes). Cloning the metadata shares it
/// rather than copying it; in the JSON of the metadata log and snapshots it is base64.
#[derive(Clone, PartialEq, Eq)]
pub struct PluginArchive(pub Arc<[u8]>);

impl fmt::Debug for PluginArchive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PluginArchive({} bytes)", self.0.len())
    }
}

impl Serialize for PluginArchive {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for PluginArchive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(|b| PluginArchive(b.into()))
            .map_err(serde::de::Error::custom)
    }
}

/// A change to the cluster metadata, proposed through Raft and applied by every broker in
/// log order. Applying is deterministic: a refused command changes nothing and every broker
/// refuses it the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerCommand {
    /// A broker (re)joins with a new incarnation `epoch`; it stays fenced until unfenced.
    /// An epoch lower than the registered one is refused (a stale process); the same epoch
    /// with the same address is an idempotent retry.
    RegisterBroker {
        id: BrokerId,
        addr: String,
        epoch: u64,
        /// This incarnation started on an empty log store (a new disk, or a data directory
        /// whose `log/` was lost): it holds no copy of anything. Where it was the last
        /// in-sync replica, the partition then has none (offline, not led by an empty
        /// log) until an unclean election is allowed. (A voter from before this field
        /// ignores it: upgrade a cluster's brokers together.)
        #[serde(default)]
        empty_log: bool,
    },
    /// The broker missed its heartbeats or is shutting down: it leaves every ISR it can
    /// leave, and partitions it led get a new leader from the ISR (or go offline).
    FenceBroker { id: BrokerId },
    /// Broker `id`, in its incarnation `epoch`, lost its copy of `topic` (the local record
    /// of it is damaged, so its data cannot be reached): it leaves every ISR of the topic,
    /// also where it is the last member (the partition goes offline rather than be led by
    /// a copy that is gone), and gives up the leaderships it had. Once the view shows it
    /// in none of them, the broker replaces its copy with an empty replica, which rejoins
    /// only as its own fetches catch up. (Not known to brokers from before it: upgrade a
    /// cluster's brokers together.)
    ReplicaLost {
        id: BrokerId,
        epoch: u64,
        topic: String,
    },
    /// The broker is caught up again: it may lead, and leaderless partitions whose ISR
    /// holds it get it as leader.
    UnfenceBroker { id: BrokerId },
    /// Create a topic with the given id, partition assignments and config overrides.
    CreateTopic {
        name: String,
        topic_id: u64,
        partitions: Vec<PartitionAssignment>,
        config: BTreeMap<String, String>,
    },
    /// Delete a topic and all its partition assignments.
    DeleteTopic { name: String },
    /// Set and remove config overrides of a topic (removals apply after sets).
    AlterTopicConfig {
        name: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    },
    /// Add partitions after a topic's existing ones (Kafka's CreatePartitions); the new
    /// ones start empty with their whole replica set in sync.
    AddPartitions {
        name: String,
        partitions: Vec<PartitionAssignment>,
        /// The partition count the proposer saw: the new ones go after exactly that many,
        /// so a proposal sent again after it was applied (a lost answer) adds nothing twice.
        #[serde(default)]
        after: Option<u32>,
    },
    /// Start moving a partition to `replicas` (the new ones catch up before the old ones go).
    ReassignPartition {
        topic: String,
        partition: u32,
        replicas: Vec<BrokerId>,
    },
    /// Finish a reassignment whose wanted replicas are all in the ISR (proposed by the
    /// partition's leader with the partition epoch it saw).
    CompleteReassignment {
        topic: String,
        partition: u32,
        partition_epoch: u64,
    },
    /// Kafka's AlterPartition: change a partition's leader and/or ISR. `leader_epoch` and
    /// `partition_epoch` are the values the proposer last saw; a stale one is refused, so two
    /// proposers racing on the same partition cannot both win. A new leader bumps the leader
    /// epoch; every accepted update bumps the partition epoch.
    UpdatePartition {
        topic: String,
        partition: u32,
        leader: Option<BrokerId>,
        leader_epoch: u64,
        partition_epoch: u64,
        isr: Vec<BrokerId>,
        /// The incarnations (broker epochs) of replicas this change adds to the ISR, as
        /// their fetches to the leader reported them (Kafka's KIP-903): an addition whose
        /// broker has registered again since is refused, since the position it was judged
        /// on may describe a log that is gone. Replicas not listed are not checked. (A
        /// voter from before this field would accept what newer ones refuse: upgrade a
        /// cluster's brokers together.)
        #[serde(default)]
        broker_epochs: BTreeMap<BrokerId, u64>,
    },
    /// Deploy a plugin on every broker: `id` is `name@version`, `digest` that of the
    /// canonical `archive` (checked by the proposing broker, which built it once). The same
    /// id with the same digest again is a no-op; with another digest it is refused, since a
    /// deployed version never changes.
    DeployPlugin {
        id: String,
        digest: String,
        archive: PluginArchive,
    },
    /// Remove a deployed plugin from every broker.
    RemovePlugin { id: String },
    /// Deploy a pipeline, or replace a deployed one of that name: the text of its file
    /// (checked by the proposing broker), how many instances it runs across the cluster, and
    /// the plugins (`name@version`) its stages use, which cannot be removed while it is
    /// deployed. Each deploy, of the same text too, takes a new deploy number, which has
    /// the brokers start their failed part again.
    PutPipeline {
        name: String,
        config_toml: String,
        instances: u32,
        plugins: Vec<String>,
    },
    /// Stop a deployed pipeline on every broker and forget it.
    RemovePipeline { name: String },
    /// Where each instance of a pipeline runs (instance number → broker), proposed by the
    /// lowest live broker when the placement is not balanced over the live brokers; every
    /// instance `1..=instances` must be placed on a registered broker.
    PlacePipeline {
        name: String,
        placement: BTreeMap<u32, BrokerId>,
    },
}

/// Why the state machine refused a command. Stable: brokers map these to wire errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControllerError {
    #[error("broker {id} is not registered")]
    UnknownBroker { id: BrokerId },
    #[error("broker {id} registered with epoch {current}, not {given}")]
    StaleBrokerEpoch {
        id: BrokerId,
        current: u64,
        given: u64,
    },
    #[error("topic {name} already exists")]
    TopicAlreadyExists { name: String },
    #[error("topic id {topic_id} is already used by topic {name}")]
    TopicIdInUse { topic_id: u64, name: String },
    #[error("topic {name} does not exist")]
    UnknownTopic { name: String },
    #[error("topic {topic} has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("invalid replica assignment: {reason}")]
    InvalidAssignment { reason: String },
    /// The proposer's leader epoch is older than the partition's: it is a stale leader.
    #[error("leader epoch {given} is fenced: the partition is at leader epoch {current}")]
    FencedLeaderEpoch { current: u64, given: u64 },
    /// The proposer's partition epoch is not the current one: it decided on old metadata.
    #[error("partition epoch {given} is stale: the partition is at epoch {current}")]
    StalePartitionEpoch { current: u64, given: u64 },
    #[error("invalid partition update: {reason}")]
    InvalidUpdate { reason: String },
    #[error("plugin {id} is already deployed with different content (digest {digest}); a deployed version never changes: bump the version in plugin.toml")]
    PluginVersionConflict { id: String, digest: String },
    #[error("plugin {id} is not deployed")]
    UnknownPlugin { id: String },
    #[error("plugin {id} is the partitioner of topic {topic}; detach it first (`quiver topic alter {topic} --partitioner OTHER@VERSION`)")]
    PluginInUse { id: String, topic: String },
    #[error("plugin {id} is a stage of the deployed pipeline {pipeline}; stop it first (`quiver pipeline stop {pipeline}`) or deploy it with another version")]
    PluginUsedByPipeline { id: String, pipeline: String },
    #[error("plugin {id} is not deployed; deploy it before the pipeline that uses it")]
    MissingPlugin { id: String },
    #[error("no pipeline named {name} is deployed")]
    UnknownPipeline { name: String },
}

/// The answer to one applied log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerResponse {
    /// Applied (also the answer for blank and membership entries).
    Ok,
    /// A partition update was applied; these are the partition's new epochs.
    PartitionUpdated {
        leader_epoch: u64,
        partition_epoch: u64,
    },
    /// Refused; the state is unchanged.
    Refused(ControllerError),
}

openraft::declare_raft_types!(
    /// openraft's type configuration for the controller group.
    pub TypeConfig:
        D = ControllerCommand,
        R = ControllerResponse,
        NodeId = BrokerId,
        Node = BrokerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
