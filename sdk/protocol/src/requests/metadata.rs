//! Metadata: brokers, topics and who leads each partition; clients cache it.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Asks for the metadata of some topics, or of all (`None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataRequest {
    /// Topics wanted; `None` for all.
    pub topics: Option<Vec<String>>,
}

/// A broker of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// `broker.id`.
    pub id: u32,
    /// Address clients connect to.
    pub addr: String,
}

/// One partition's placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMetadata {
    /// Partition index.
    pub partition: u32,
    /// Leader broker id.
    pub leader: u32,
    /// Leader epoch.
    pub leader_epoch: u32,
    /// Replica broker ids.
    pub replicas: Vec<u32>,
    /// In-sync replica broker ids.
    pub isr: Vec<u32>,
}

/// One topic's placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMetadata {
    /// Topic name.
    pub name: String,
    /// Its partitions, by index.
    pub partitions: Vec<PartitionMetadata>,
    /// The topic's partitioner plugin (`name@version`), when it has one: producers must
    /// run it for records without an explicit partition.
    pub partitioner: Option<String>,
}

/// The cluster as the answering broker knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataResponse {
    /// Brokers.
    pub brokers: Vec<BrokerInfo>,
    /// Topics asked for that exist.
    pub topics: Vec<TopicMetadata>,
}

impl Message for MetadataRequest {
    const API: ApiKey = ApiKey::Metadata;
    type Response = MetadataResponse;
}
