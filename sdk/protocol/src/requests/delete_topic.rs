//! DeleteTopic: drops a topic and its data (only where `delete_topic_enable = true`).

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Deletes a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteTopicRequest {
    /// Topic name.
    pub name: String,
}

/// Confirms the deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteTopicResponse {
    /// Partitions whose data was dropped.
    pub partitions_deleted: u32,
}

impl Message for DeleteTopicRequest {
    const API: ApiKey = ApiKey::DeleteTopic;
    type Response = DeleteTopicResponse;
}
