//! CommitOffsets: a member records how far it has processed its partitions. Refused, with
//! nothing changed, when the member id is unknown, its generation is stale, or it does not
//! own one of the partitions. Acknowledged only once the commit is on disk.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// One committed position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetCommit {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// The next offset to read (one past the last processed record).
    pub offset: i64,
    /// Free-form metadata stored with the offset.
    pub metadata: Option<String>,
}

/// Commits offsets of `group` for partitions `member_id` owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOffsetsRequest {
    /// Group name.
    pub group: String,
    /// The committing member.
    pub member_id: String,
    /// The generation the member last saw.
    pub generation: u64,
    /// The positions.
    pub offsets: Vec<OffsetCommit>,
}

/// All offsets were committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOffsetsResponse {
    /// How many offsets were stored.
    pub committed: u32,
}

impl Message for CommitOffsetsRequest {
    const API: ApiKey = ApiKey::CommitOffsets;
    type Response = CommitOffsetsResponse;
}
