//! DescribeTopic: a topic's config and each partition's offsets and size.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Describes one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribeTopicRequest {
    /// Topic name.
    pub name: String,
}

/// One partition's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionDescription {
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
    /// First offset still stored.
    pub log_start_offset: i64,
    /// Offsets below this are readable.
    pub high_watermark: i64,
    /// The next offset to be assigned.
    pub log_end_offset: i64,
    /// Bytes of stored batches.
    pub size_bytes: u64,
    /// `"online"`, or `"offline"` when the partition's stored data is damaged (it serves
    /// nothing until `quiver broker repair` truncates it).
    pub status: String,
    /// Why the partition is offline and how to repair it.
    pub offline_reason: Option<String>,
}

/// A topic, its effective config and its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicDescription {
    /// Topic name.
    pub name: String,
    /// Effective config (defaults filled in).
    pub config: BTreeMap<String, String>,
    /// Partitions, by index.
    pub partitions: Vec<PartitionDescription>,
}

impl Message for DescribeTopicRequest {
    const API: ApiKey = ApiKey::DescribeTopic;
    type Response = TopicDescription;
}
