//! Broker-to-broker replication requests: a follower's fetch from its partition leader
//! ([`ReplicaFetchRequest`]) and the epoch lookup a follower makes before fetching
//! ([`OffsetForLeaderEpochRequest`], Kafka's KIP-101/KIP-279), so that it can truncate a
//! suffix the new leader never had.
//!
//! Brokers accept these only on connections that presented a certificate signed by the
//! cluster CA, and only from a broker listed among the partition's replicas.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// A follower's fetch: batches from `offset` up to the leader's log end (not its high
/// watermark), kept byte for byte with their offsets and leader epochs. `flushed_offset`
/// is how far the follower's log is durable, from which the leader computes the high
/// watermark; the follower flushes what it appended while it fetches again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaFetchRequest {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// The fetching broker's id.
    pub replica_id: u32,
    /// The leader epoch the follower believes current; a leader on another epoch refuses.
    pub leader_epoch: u64,
    /// The follower's log end: where this fetch reads from.
    pub offset: i64,
    /// Upper bound of payload bytes (at least one batch when any is available).
    pub max_bytes: u32,
    /// How long to wait for new batches when none is available.
    pub max_wait_ms: u32,
    /// Everything below this is flushed on the follower (at most `offset`). Added last, as
    /// the wire format asks; brokers from before it cannot run beside newer ones (they took
    /// `offset` as flushed): upgrade a cluster's brokers together.
    pub flushed_offset: i64,
    /// The incarnation the fetching broker registered with (Kafka's KIP-903): a position
    /// reported by an earlier incarnation, which may have lost its log since (a wiped or
    /// restored data directory), stops counting once a later one fetches, and the leader
    /// proposes a replica back into the ISR only with the epoch its fetches carried. 0: a
    /// follower from before this field (its positions are taken as before).
    #[serde(default)]
    pub broker_epoch: u64,
}

/// The leader's answer; the payload holds whole stored batches from the fetch offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaFetchResponse {
    /// The leader's high watermark (the follower's is the smaller of this and its log end).
    pub high_watermark: i64,
    /// The leader's log start.
    pub log_start_offset: i64,
    /// The leader's log end.
    pub log_end_offset: i64,
}

impl Message for ReplicaFetchRequest {
    const API: ApiKey = ApiKey::ReplicaFetch;
    type Response = ReplicaFetchResponse;
}

/// "Where does my last epoch end in your log?": asked of the leader by a follower before it
/// fetches under a new leader epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetForLeaderEpochRequest {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// The asking broker's id.
    pub replica_id: u32,
    /// The leader epoch the follower believes current.
    pub current_leader_epoch: u64,
    /// The epoch of the follower's last stored batch.
    pub epoch: i32,
}

/// The largest epoch the leader has that is not above the one asked for, and the offset at
/// which it ends in the leader's log (the start of the next epoch, or the log end). A
/// follower truncates its log to `min(end_offset, its log end)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetForLeaderEpochResponse {
    /// The epoch answered for (`-1` when the leader has none at or below it).
    pub epoch: i32,
    /// Where that epoch ends in the leader's log.
    pub end_offset: i64,
}

impl Message for OffsetForLeaderEpochRequest {
    const API: ApiKey = ApiKey::OffsetForLeaderEpoch;
    type Response = OffsetForLeaderEpochResponse;
}
