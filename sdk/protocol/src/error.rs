//! Error codes carried on the wire, and the decoding errors of this crate.
//!
//! Wire codes are stable numbers: a retired code is never reused, new ones are appended.

use serde::{Deserialize, Serialize};

/// A stable error code sent by the broker in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// No error.
    None = 0,
    /// An unexpected server-side failure; the message says more.
    Internal = 1,
    /// A record batch failed its CRC or structural checks.
    CorruptBatch = 2,
    /// The topic or partition does not exist.
    UnknownTopicOrPartition = 3,
    /// The request could not be decoded or broke a protocol rule.
    InvalidRequest = 4,
    /// A batch or frame is larger than the configured limit.
    MessageTooLarge = 5,
    /// A topic with that name already exists.
    TopicAlreadyExists = 6,
    /// The topic name is not valid.
    InvalidTopicName = 7,
    /// A topic or broker config key or value is not valid.
    InvalidConfig = 8,
    /// The requested offset is outside the partition's range.
    OffsetOutOfRange = 9,
    /// This broker is not the leader of the partition.
    NotLeader = 10,
    /// Topic deletion is disabled on this broker (`delete_topic_enable = false`).
    TopicDeletionDisabled = 11,
    /// The request version is not supported.
    UnsupportedVersion = 12,
    /// The API key is not known to this broker.
    UnsupportedApi = 13,
    /// The partition count is not valid.
    InvalidPartitions = 14,
    /// The request did not complete in time.
    RequestTimedOut = 15,
    /// The broker is shutting down.
    BrokerShuttingDown = 16,
    /// `acks` was not one of -1, 0, 1.
    InvalidAcks = 17,
    /// The storage layer failed.
    StorageError = 18,
    /// A produce sequence number was out of order for its producer.
    OutOfOrderSequence = 19,
    /// The consumer-group member id is not known (never joined, left, or expired): re-join.
    UnknownMember = 20,
    /// The generation sent is older than the member's assignment, or not one the group had.
    StaleGeneration = 21,
    /// The member does not own the partition (it was never assigned, or was moved away).
    NotPartitionOwner = 22,
    /// The operation needs a group without members.
    GroupNotEmpty = 23,
    /// No such consumer group.
    UnknownGroup = 24,
    /// No deployed plugin has that name (or `name@version`).
    PluginNotFound = 25,
    /// Different bytes are already deployed under that `name@version`: bump the version.
    PluginVersionConflict = 26,
    /// The bundle was refused at deploy: it does not load or build (the message says why).
    InvalidPlugin = 27,
    /// The plugin is in use (a topic's partitioner or a running processor) and cannot be removed.
    PluginInUse = 28,
    /// A plugin call failed (limit, trap, error, quarantine); the message names the plugin.
    PluginFailed = 29,
    /// A produced record batch is well formed but lies about its records: its header's
    /// record count, offset deltas or timestamps do not match the records it holds, a
    /// timestamp is out of range, or a record's lengths run past its bytes. The message says
    /// exactly what (see [`crate::batch::validate_produce`]). Nothing of the batch is stored.
    InvalidRecord = 30,
    /// No pipeline is deployed under that name.
    PipelineNotFound = 31,
    /// The pipeline file or its plugins were refused (the message names file, line and key,
    /// or the plugin).
    InvalidPipeline = 32,
    /// This broker does not run deployed pipelines (an embedded broker without a host).
    PipelinesUnavailable = 33,
    /// A newer producer holds this transactional id (or producer id): this one is fenced
    /// and must stop.
    ProducerFenced = 34,
    /// The transaction request does not fit the transaction's state (e.g. EndTxn with no
    /// open transaction, or offsets of a group whose generation moved on).
    InvalidTxnState = 35,
    /// Fewer in-sync replicas than the topic's `min.insync.replicas`: an `acks=all` write
    /// cannot be acknowledged (nothing was); retry once replicas are back.
    NotEnoughReplicas = 36,
    /// The request names a leader epoch other than the partition's current one (a stale
    /// leader or follower): refresh metadata.
    FencedLeaderEpoch = 37,
    /// Only brokers of the cluster may make this request (a connection with a certificate
    /// signed by the cluster CA, from a replica of the partition).
    ClusterAuthorizationFailed = 38,
    /// A new leader does not know the partition's high watermark yet (its followers have
    /// not reported since it took over): retry in a moment.
    OffsetNotAvailable = 39,
    /// The group has as many members as the broker allows (`group_max_size`, Kafka's
    /// `group.max.size`): a new member is refused; members leaving make room.
    GroupMaxSizeReached = 40,
}

impl ErrorCode {
    /// Maps a wire number to a code; unknown numbers become `Internal`.
    pub fn from_u16(v: u16) -> ErrorCode {
        use ErrorCode::*;
        match v {
            0 => None,
            2 => CorruptBatch,
            3 => UnknownTopicOrPartition,
            4 => InvalidRequest,
            5 => MessageTooLarge,
            6 => TopicAlreadyExists,
            7 => InvalidTopicName,
            8 => InvalidConfig,
            9 => OffsetOutOfRange,
            10 => NotLeader,
            11 => TopicDeletionDisabled,
            12 => UnsupportedVersion,
            13 => UnsupportedApi,
            14 => InvalidPartitions,
            15 => RequestTimedOut,
            16 => BrokerShuttingDown,
            17 => InvalidAcks,
            18 => StorageError,
            19 => OutOfOrderSequence,
            20 => UnknownMember,
            21 => StaleGeneration,
            22 => NotPartitionOwner,
            23 => GroupNotEmpty,
            24 => UnknownGroup,
            25 => PluginNotFound,
            26 => PluginVersionConflict,
            27 => InvalidPlugin,
            28 => PluginInUse,
            29 => PluginFailed,
            30 => InvalidRecord,
            31 => PipelineNotFound,
            32 => InvalidPipeline,
            33 => PipelinesUnavailable,
            34 => ProducerFenced,
            35 => InvalidTxnState,
            36 => NotEnoughReplicas,
            37 => FencedLeaderEpoch,
            38 => ClusterAuthorizationFailed,
            39 => OffsetNotAvailable,
            40 => GroupMaxSizeReached,
            _ => Internal,
        }
    }

    /// True when retrying the same request later may succeed.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader
                | ErrorCode::RequestTimedOut
                | ErrorCode::BrokerShuttingDown
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::OffsetNotAvailable
        )
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The input ended before the value did.
    #[error("truncated input: needed {needed} more bytes")]
    Truncated {
        /// How many more bytes were needed.
        needed: usize,
    },
    /// A length prefix is larger than the limit.
    #[error("{what} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A varint used more than the maximum number of bytes.
    #[error("varint is longer than 10 bytes")]
    OverlongVarint,
    /// The batch CRC does not match its contents.
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the bytes.
        computed: u32,
    },
    /// A structural rule was broken.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Which rule was broken.
        reason: String,
    },
    /// The API key is unknown.
    #[error("unknown api key {0}")]
    UnknownApi(u16),
    /// The body could not be deserialized.
    #[error("could not decode {what}: {reason}")]
    Body {
        /// The type being decoded.
        what: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// A compression codec failed or is unsupported.
    #[error("compression: {0}")]
    Compression(String),
    /// A record batch is well formed but its header disagrees with the records it holds
    /// (or a record breaks a rule): refused at produce with [`ErrorCode::InvalidRecord`].
    #[error("invalid record batch: {reason}")]
    InvalidRecord {
        /// Exactly what is wrong, e.g. "header says 2147483647 records, the batch holds 1".
        reason: String,
    },
    /// The broker answered with an error code.
    #[error("{code:?}: {message}")]
    Remote {
        /// The code.
        code: ErrorCode,
        /// The broker's message.
        message: String,
    },
}

impl ProtocolError {
    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        ProtocolError::Malformed {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_record(reason: impl Into<String>) -> Self {
        ProtocolError::InvalidRecord {
            reason: reason.into(),
        }
    }

    /// The wire code a broker should answer with for this decoding error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::CrcMismatch { .. } => ErrorCode::CorruptBatch,
            ProtocolError::TooLarge { .. } => ErrorCode::MessageTooLarge,
            ProtocolError::UnknownApi(_) => ErrorCode::UnsupportedApi,
            ProtocolError::Remote { code, .. } => *code,
            ProtocolError::Compression(_) => ErrorCode::CorruptBatch,
            ProtocolError::InvalidRecord { .. } => ErrorCode::InvalidRecord,
            _ => ErrorCode::InvalidRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for v in 0..48u16 {
            let c = ErrorCode::from_u16(v);
            if c != ErrorCode::Internal {
                assert_eq!(c as u16, v);
            }
        }
        // Every code up to the newest is known: a gap would mean a code was forgotten here.
        for v in 0..=ErrorCode::GroupMaxSizeReached as u16 {
            assert!(
                v == 1 || ErrorCode::from_u16(v) != ErrorCode::Internal,
                "{v}"
            );
        }
    }

    #[test]
    fn invalid_record_maps_to_its_code() {
        let e = ProtocolError::invalid_record("header says 2 records, the batch holds 1");
        assert_eq!(e.code(), ErrorCode::InvalidRecord);
        assert_eq!(ErrorCode::InvalidRecord as u16, 30);
        assert!(!ErrorCode::InvalidRecord.is_retriable());
        assert_eq!(
            e.to_string(),
            "invalid record batch: header says 2 records, the batch holds 1"
        );
    }
}
