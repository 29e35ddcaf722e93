//! ListOffsets: the earliest, latest, or first-at-a-timestamp offset of a partition.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Which offset to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The high watermark (the next offset to be read at the end).
    Latest,
    /// The first offset whose timestamp is at or after this time (ms); latest if none.
    Timestamp(i64),
    /// The last stable offset: the end for read-committed consumers (below it no
    /// transaction is open).
    LastStable,
}

/// Looks up an offset of `topic`/`partition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListOffsetsRequest {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// What to look up.
    pub spec: OffsetSpec,
}

/// The offset found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListOffsetsResponse {
    /// The offset.
    pub offset: i64,
    /// The timestamp of the record at that offset, or -1 when not looked up by time.
    pub timestamp: i64,
}

impl Message for ListOffsetsRequest {
    const API: ApiKey = ApiKey::ListOffsets;
    type Response = ListOffsetsResponse;
}
