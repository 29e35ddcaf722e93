//! Fetch: read stored batches from an offset; long-polls until `min_bytes` or `max_wait_ms`.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Reads batches of `topic`/`partition` starting with the one holding `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// First offset wanted; the first batch returned may start earlier.
    pub offset: i64,
    /// Upper bound of payload bytes (at least one batch is returned if one is available).
    pub max_bytes: u32,
    /// How long to wait for `min_bytes` to be available.
    pub max_wait_ms: u32,
    /// Answer as soon as this many bytes are available.
    pub min_bytes: u32,
    /// A consume-time processor the leader runs on the batches before sending them;
    /// records it drops never cross the network, and offsets stay the source offsets.
    /// Appended after the first release: absent from an older client's request.
    #[serde(default)]
    pub processor: Option<super::plugin::ProcessorSpec>,
    /// Which records are readable: everything below the high watermark, or only those
    /// of committed transactions (below the last stable offset). Appended after the
    /// first release: an older client's request reads uncommitted.
    #[serde(default)]
    pub isolation: Isolation,
}

/// What a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Isolation {
    /// Every record below the high watermark, including those of open and aborted
    /// transactions.
    #[default]
    ReadUncommitted,
    /// Only records below the last stable offset (no open transaction before them); the
    /// answer lists the aborted transactions in the range, whose records the client drops.
    ReadCommitted,
}

/// An aborted transaction of one producer in a partition: its batches with offsets in
/// `first_offset..=last_offset` (the abort marker) are void.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortedTxn {
    /// Producer id.
    pub producer_id: i64,
    /// Offset of the transaction's first batch in the partition.
    pub first_offset: i64,
    /// Offset of its abort marker.
    pub last_offset: i64,
}

/// Partition offsets at the time of the answer; the payload holds the batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchResponse {
    /// Offsets below this are readable.
    pub high_watermark: i64,
    /// The first offset still stored.
    pub log_start_offset: i64,
    /// The offset the next append will get.
    pub log_end_offset: i64,
    /// Below this, no transaction is open (read-committed consumers read up to here).
    pub last_stable_offset: i64,
    /// Read-committed: the aborted transactions overlapping the payload.
    pub aborted: Vec<AbortedTxn>,
}

impl Message for FetchRequest {
    const API: ApiKey = ApiKey::Fetch;
    type Response = FetchResponse;
}
