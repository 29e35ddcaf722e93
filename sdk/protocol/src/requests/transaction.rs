//! Transactions (Kafka's KIP-98, as Quiver's pipelines use them for exactly-once): a
//! producer initialises its transactional id (InitTransactions: a producer id and a new
//! epoch, fencing any older holder of the id and aborting its open transaction), writes
//! transactional batches, adds its consumer group's offsets to the transaction
//! (TxnCommitOffsets, checked against the group's generation like a commit), and ends it
//! (EndTxn): the broker writes a commit or abort marker into every partition the
//! transaction wrote and, on commit, stores the offsets — all or nothing, for consumers
//! reading with `Isolation::ReadCommitted`.
//!
//! A transactional id's coordinator is the leader of the `__consumer_offsets` partition the
//! id hashes to (as a group's). Before its first write to a partition in a transaction the
//! producer adds it there (AddPartitionsToTxn), including the group's offsets partition
//! before TxnCommitOffsets, which goes to the group's coordinator. EndTxn has the
//! coordinator send WriteTxnMarker to each partition's leader.

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
    /// The producer id and epoch the caller last held the id with. Set, the id is taken
    /// back only if no other producer initialised it since: the caller's transaction may
    /// have been aborted past its timeout (Kafka's KIP-588), but a producer that took the
    /// id over is never fenced by it. Unset, whoever holds the id is fenced. Appended
    /// later: an older client's request fences whoever holds the id, as it did then.
    #[serde(default)]
    pub held: Option<(i64, i16)>,
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
    /// How many offsets of this group the transaction holds in the group's offsets
    /// partition so far (stored when it commits).
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

/// Adds partitions to the open transaction (opening it if none is): the coordinator writes
/// a marker into each when the transaction ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddPartitionsToTxnRequest {
    /// The transactional id.
    pub transactional_id: String,
    /// Its producer id.
    pub producer_id: i64,
    /// Its epoch.
    pub producer_epoch: i16,
    /// The partitions the transaction will write (a group's offsets partition included).
    pub partitions: Vec<super::TopicPartition>,
}

/// The partitions are part of the transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddPartitionsToTxnResponse {
    /// Partitions the transaction holds now.
    pub partitions: u32,
}

impl Message for AddPartitionsToTxnRequest {
    const API: ApiKey = ApiKey::AddPartitionsToTxn;
    type Response = AddPartitionsToTxnResponse;
}

/// From a transaction coordinator to a partition's leader: append the marker ending the
/// transaction of `producer_id` in this partition, and answer once the in-sync replicas
/// have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteTxnMarkerRequest {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// The transaction's producer id.
    pub producer_id: i64,
    /// Its epoch.
    pub producer_epoch: i16,
    /// True for a commit marker, false for an abort marker.
    pub commit: bool,
    /// The deciding coordinator's epoch; the partition refuses a marker from an older one
    /// than it already took for the producer (`ProducerFenced`).
    pub coordinator_epoch: Option<u64>,
}

/// The marker is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteTxnMarkerResponse {
    /// Offset of the marker.
    pub offset: i64,
}

impl Message for WriteTxnMarkerRequest {
    const API: ApiKey = ApiKey::WriteTxnMarker;
    type Response = WriteTxnMarkerResponse;
}

/// From a partition's leader to a transaction's coordinator: may this transactional batch
/// of `producer_id`/`producer_epoch` open a transaction in `topic`/`partition`? Yes only when
/// the producer's transaction is open and added the partition (AddPartitionsToTxn), so a
/// batch can never leave a transaction open that no coordinator would end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyTxnPartitionRequest {
    /// The batch's producer id.
    pub producer_id: i64,
    /// Its epoch.
    pub producer_epoch: i16,
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// Also yes for a transaction that is ending (its commit or abort decided, its markers
    /// on their way) and holds the partition: a partition's leader asks this before it
    /// aborts a transaction open there for too long, which the coordinator may be
    /// finishing. Appended later: an older broker's question is without it (`false`).
    #[serde(default)]
    pub include_ending: bool,
}

/// The batch belongs to an open transaction holding the partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyTxnPartitionResponse {
    /// The producer's transactional id.
    pub transactional_id: String,
}

impl Message for VerifyTxnPartitionRequest {
    const API: ApiKey = ApiKey::VerifyTxnPartition;
    type Response = VerifyTxnPartitionResponse;
}
