//! FetchOffsets: the committed offsets of a group, for some partitions or all of them.

use serde::{Deserialize, Serialize};

use super::group::TopicPartition;
use crate::{ApiKey, Message};

/// Reads committed offsets of `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchOffsetsRequest {
    /// Group name.
    pub group: String,
    /// The partitions to look up; `None` for every committed one.
    pub partitions: Option<Vec<TopicPartition>>,
}

/// One partition's committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedOffset {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// The committed offset, `None` when nothing was committed.
    pub offset: Option<i64>,
    /// The metadata stored with it.
    pub metadata: Option<String>,
}

/// The committed offsets found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchOffsetsResponse {
    /// One entry per partition asked for (or per committed partition).
    pub offsets: Vec<CommittedOffset>,
}

impl Message for FetchOffsetsRequest {
    const API: ApiKey = ApiKey::FetchOffsets;
    type Response = FetchOffsetsResponse;
}
