//! The partition log, stored in sled.
//!
//! One sled `Db` per broker; every partition's batches in one shared tree keyed by
//! (topic id, partition, base offset), every sparse time index in another
//! ([`keyspace`]), and a metadata record per partition (log start offset,
//! high-watermark checkpoint, leader-epoch starts). Batches are stored exactly as the
//! producer sent them, with the base offset and leader epoch rewritten in place.
//!
//! - [`partition`]: one partition's append/read/offset logic;
//! - [`keyspace`]: partitions' slices of the shared trees;
//! - [`flush`]: group commit: concurrent appends share one durable flush;
//! - [`producers`]: per-producer sequence tracking (ordering of pipelined requests, dedupe);
//! - [`retention`]: which batches to delete, as a pure decision over batch summaries;
//! - [`store`]: how the broker's sled database is opened (cache, segment size), and the
//!   one durable flush ([`Database::flush`]);
//! - [`txn_index`]: open and aborted transactions of a partition, and its last stable offset.

pub mod flush;
pub mod keyspace;
pub mod partition;
pub mod producers;
pub mod retention;
pub mod store;
pub mod txn_index;

pub use flush::{FlushFailed, Flusher};
pub use partition::{
    AppendResult, PartitionLog, PartitionSnapshot, ReadResult, RepairReport, TxnGuard,
};
pub use store::Database;

use quiver_protocol::{ErrorCode, ProtocolError};

/// A storage-level failure, with the wire code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// sled failed.
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// A batch failed validation.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] ProtocolError),
    /// A stored batch failed its CRC check.
    #[error("stored batch at offset {offset} is corrupt: {reason}")]
    Corrupt {
        /// Base offset of the damaged batch.
        offset: i64,
        /// What failed.
        reason: String,
    },
    /// The offset is outside `[log_start, log_end]`.
    #[error("offset {offset} is out of range [{start}, {end}]")]
    OffsetOutOfRange {
        /// Requested.
        offset: i64,
        /// Log start.
        start: i64,
        /// Log end.
        end: i64,
    },
    /// A producer sequence did not fit.
    #[error("{0}")]
    Sequence(String),
    /// An older epoch of a producer id than one this partition has seen.
    #[error("{0}")]
    Fenced(String),
    /// Waiting for durability or ordering took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// This broker no longer holds a replica of the partition.
    #[error("not a replica here any more: {0}; refresh metadata")]
    Moved(String),
    /// This broker's replica does not lead the partition (any more): a write checked while
    /// it led landed after it stepped down.
    #[error("not the leader: {0}; refresh metadata")]
    NotLeading(String),
    /// A transaction's batch whose transaction ended here while the batch was checked
    /// against its coordinator (it belongs to an attempt already aborted or committed).
    #[error("{0}")]
    TxnEnded(String),
    /// The partition was deleted while in use.
    #[error("partition was deleted")]
    Deleted,
    /// A disk flush failed: nothing more is acknowledged until the broker restarts.
    #[error(transparent)]
    FlushFailed(#[from] FlushFailed),
    /// A storage task on a blocking thread failed to complete.
    #[error("storage task failed: {0}")]
    Worker(String),
    /// The partition's storage is damaged; it serves nothing until repaired.
    #[error("partition {topic}/{partition} is offline: {reason}")]
    Offline {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// What is damaged and how to repair it.
        reason: String,
    },
}

impl LogError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            LogError::Sled(_) => ErrorCode::StorageError,
            LogError::InvalidBatch(e) => e.code(),
            LogError::Corrupt { .. } => ErrorCode::StorageError,
            LogError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            LogError::Sequence(_) => ErrorCode::OutOfOrderSequence,
            LogError::Fenced(_) => ErrorCode::ProducerFenced,
            LogError::Timeout(_) => ErrorCode::RequestTimedOut,
            LogError::Moved(_) | LogError::NotLeading(_) => ErrorCode::NotLeader,
            LogError::TxnEnded(_) => ErrorCode::InvalidTxnState,
            LogError::Deleted => ErrorCode::UnknownTopicOrPartition,
            LogError::Offline { .. } | LogError::FlushFailed(_) => ErrorCode::StorageError,
            LogError::Worker(_) => ErrorCode::Internal,
        }
    }
}

/// Encodes an offset as a sled key.
pub fn offset_key(offset: i64) -> [u8; 8] {
    (offset as u64).to_be_bytes()
}

/// Decodes a sled key into an offset.
pub fn key_offset(key: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    let n = key.len().min(8);
    a[8 - n..].copy_from_slice(&key[..n]);
    u64::from_be_bytes(a) as i64
}
