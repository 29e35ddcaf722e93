//! Transactions (Kafka's KIP-98, as Quiver's pipelines use them for exactly-once): a
//! producer initialises its transactional id (InitTransactions: a producer id and a new
//! epoch, fencing any older holder of the id and aborting its open transaction), writes
//! transactional batches, adds its consumer group's offsets to the transaction
//! (TxnCommitOffsets, checked against the group's generation like a commit), and ends it
//! (EndTxn): the broker writes a commit or abort marker into every partition the
//! transaction wrote and, on commit, stores the offsets — all or nothing, for consumers
//! reading with `Isolation::ReadCommitted`.

use serde::{Deserialize, Serialize};

use super::OffsetCommit;
use crate::{ApiKey, Message};

/// Gets the producer id and a new epoch for a transactional id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitTransactionsRequest {
    /// The transactional id (stable across restarts of the same logical producer).
    pub transactional_id: String,
    /// An open transaction older than this is aborted by the broker.
    pub timeout_ms: u32,
}

/// The producer id and epoch to stamp transactional batches with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitTransactionsResponse {
    /// Producer id.
    pub producer_id: i64,
    /// Epoch (older epochs of this id are fenced).
    pub producer_epoch: i16,
}

impl Message for InitTransactionsRequest {
    const API: ApiKey = ApiKey::InitTransactions;
    type Response = InitTransactionsResponse;
}

/// Adds a consumer group's offsets to the open transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnCommitOffsetsRequest {
    /// The transactional id.
    pub transactional_id: String,
    /// Its producer id.
    pub producer_id: i64,
    /// Its epoch.
    pub producer_epoch: i16,
    /// Group name.
    pub group: String,
    /// The committing member (checked like a CommitOffsets).
    pub member_id: String,
    /// The generation the member last saw.
    pub generation: u64,
    /// The positions, stored when the transaction commits.
    pub offsets: Vec<OffsetCommit>,
}

/// The offsets are part of the transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnCommitOffsetsResponse {
    /// How many offsets the transaction will store.
    pub pending: u32,
}

impl Message for TxnCommitOffsetsRequest {
    const API: ApiKey = ApiKey::TxnCommitOffsets;
    type Response = TxnCommitOffsetsResponse;
}

/// Commits or aborts the open transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndTxnRequest {
    /// The transactional id.
    pub transactional_id: String,
    /// Its producer id.
    pub producer_id: i64,
    /// Its epoch.
    pub producer_epoch: i16,
    /// True to commit, false to abort.
    pub commit: bool,
}

/// The transaction ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndTxnResponse {
    /// Partitions that got a marker.
    pub partitions: u32,
    /// True when it committed (false: aborted).
    pub committed: bool,
}

impl Message for EndTxnRequest {
    const API: ApiKey = ApiKey::EndTxn;
    type Response = EndTxnResponse;
}
