//! CreateTopic: a new topic with its partition count and config overrides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::requests::TopicDescription;
use crate::{ApiKey, Message};

/// Creates a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTopicRequest {
    /// Topic name (see [`crate::requests::validate_topic_name`]).
    pub name: String,
    /// Number of partitions; 0 leaves it to the broker (its `topic_defaults.partitions`).
    pub partitions: u32,
    /// Copies of each partition (1 on a single broker).
    pub replication_factor: u16,
    /// Topic config overrides (`retention.ms`, `retention.bytes`, `flush`, `max.message.bytes`).
    pub config: BTreeMap<String, String>,
}

impl Message for CreateTopicRequest {
    const API: ApiKey = ApiKey::CreateTopic;
    type Response = TopicDescription;
}
