//! CreatePartitions: grows a topic to `total` partitions (Kafka's CreatePartitions); the new
//! partitions start empty. Keys that hashed to a partition may hash to another afterwards.

use serde::{Deserialize, Serialize};

use crate::requests::TopicDescription;
use crate::{ApiKey, Message};

/// Grows `name` to `total` partitions (more than it has).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePartitionsRequest {
    /// Topic name.
    pub name: String,
    /// The partition count wanted.
    pub total: u32,
}

impl Message for CreatePartitionsRequest {
    const API: ApiKey = ApiKey::CreatePartitions;
    type Response = TopicDescription;
}
