//! ReassignPartition: moves a partition's replicas to a new set of brokers. The new
//! replicas join first and copy the log from the leader; once all of them are in the ISR the
//! old ones are dropped (and leadership moves if the leader is one of them). The answer comes
//! when the move has started; `topic describe` shows its progress.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Moves `topic`/`partition` to `replicas` (broker ids, preferred leader first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReassignPartitionRequest {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// The wanted replica set.
    pub replicas: Vec<u32>,
}

/// The partition's replicas while the move runs: the old and the new ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReassignPartitionResponse {
    /// Replicas now (old and new until the move ends).
    pub replicas: Vec<u32>,
    /// The wanted replica set.
    pub target: Vec<u32>,
}

impl Message for ReassignPartitionRequest {
    const API: ApiKey = ApiKey::ReassignPartition;
    type Response = ReassignPartitionResponse;
}
