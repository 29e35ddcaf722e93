//! Produce: append one or more record batches (the payload) to one partition.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// How many acknowledgements the producer waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acks {
    /// Fire and forget: the broker still answers, the producer does not wait.
    None,
    /// The leader appended the batch (and flushed it when the topic's `flush = "batch"`).
    Leader,
    /// Every in-sync replica has the batch (with one broker, the same as `Leader`).
    All,
}

impl Acks {
    /// Parses the CLI / Kafka spelling: `0`, `1`, `all` or `-1`.
    pub fn parse(s: &str) -> Result<Acks, String> {
        match s {
            "0" => Ok(Acks::None),
            "1" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            other => Err(format!("acks must be 0, 1 or all, got {other:?}")),
        }
    }
}

/// Appends the payload's batches to `topic`/`partition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceRequest {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// Acknowledgement level.
    pub acks: Acks,
    /// How long the broker may wait for durability before answering `RequestTimedOut`.
    pub timeout_ms: u32,
}

/// Where the batches landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceResponse {
    /// Offset of the first record appended.
    pub base_offset: i64,
    /// Offset of the last record appended.
    pub last_offset: i64,
    /// Broker time of the append (ms since the epoch).
    pub append_time_ms: i64,
}

impl Message for ProduceRequest {
    const API: ApiKey = ApiKey::Produce;
    type Response = ProduceResponse;
}
