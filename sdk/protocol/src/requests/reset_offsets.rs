//! ResetOffsets: moves a group's committed offsets of one topic (refused while the group
//! has members), to the earliest, the latest, an offset, or the first record at a time.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Where to move the offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetTo {
    /// The log start of each partition.
    Earliest,
    /// The high watermark of each partition.
    Latest,
    /// This offset in every partition (clamped to the partition's range).
    Offset(i64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
    /// These `(partition, offset)` pairs, already resolved on the partitions' leaders (how
    /// a client resets a cluster's group: the coordinator's own copy of a partition may lag,
    /// or be empty); the other partitions keep their offsets. Brokers older than this
    /// variant cannot decode it.
    Offsets(Vec<(u32, i64)>),
}

/// Resets the offsets of `group` on `topic`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetOffsetsRequest {
    /// Group name.
    pub group: String,
    /// Topic name.
    pub topic: String,
    /// Target.
    pub to: ResetTo,
}

/// The new offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetOffsetsResponse {
    /// `(partition, offset)` pairs.
    pub offsets: Vec<(u32, i64)>,
}

impl Message for ResetOffsetsRequest {
    const API: ApiKey = ApiKey::ResetOffsets;
    type Response = ResetOffsetsResponse;
}
