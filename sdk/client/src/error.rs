//! The client's error type: every way a request can fail, typed so callers can match on it.
//!
//! Broker answers ([`ProtocolError::Remote`]) are mapped to one variant per error code a
//! caller is likely to handle; transport failures keep their message as a string so the
//! type stays `Clone` (one failure is shared by every record of a failed batch).

use std::time::Duration;

use quiver_protocol::{ErrorCode, ProtocolError};

/// Result alias of this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Why a client operation failed.
///
/// ```
/// use quiver_client::ClientError;
/// let e = ClientError::TopicNotFound("orders".into());
/// assert!(!e.is_retriable());
/// ```
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The configuration is not usable.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// No connection could be made to a broker.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The broker address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The connection or stream failed while a request was under way.
    #[error("connection to {addr} failed during a request: {reason}")]
    Transport {
        /// The broker address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The operation did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// A response could not be decoded.
    #[error("protocol: {0}")]
    Protocol(ProtocolError),
    /// The topic or partition does not exist.
    #[error("unknown topic or partition: {0}")]
    TopicNotFound(String),
    /// A topic with that name exists already.
    #[error("topic already exists: {0}")]
    TopicAlreadyExists(String),
    /// The topic name is not valid.
    #[error("invalid topic name: {0}")]
    InvalidTopicName(String),
    /// A config key or value, or a partition count, is not valid.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The offset is outside the partition's range.
    #[error("offset out of range: {0}")]
    OffsetOutOfRange(String),
    /// The broker is not the partition's leader (metadata is refreshed; retry).
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// The broker does not allow deleting topics.
    #[error("topic deletion is disabled: {0}")]
    TopicDeletionDisabled(String),
    /// A batch or frame was larger than the broker accepts.
    #[error("message too large: {0}")]
    MessageTooLarge(String),
    /// Any other broker error.
    #[error("broker error {code:?}: {message}")]
    Broker {
        /// The wire code.
        code: ErrorCode,
        /// The broker's message.
        message: String,
    },
    /// A partition index beyond the topic's partition count.
    #[error("topic {topic} has {partitions} partitions; partition {partition} does not exist")]
    InvalidPartition {
        /// Topic name.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many the topic has.
        partitions: u32,
    },
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
    /// A plugin could not be loaded or failed on this side (a topic's partitioner).
    #[error("plugin: {0}")]
    Plugin(String),
    /// The topic routes records without an explicit partition with a partitioner plugin,
    /// and this build of the SDK cannot run plugins (it was built without the `plugins`
    /// cargo feature). Records that name their partition are not affected.
    #[error(
        "topic {topic} routes records with the partitioner plugin {plugin}, which this build \
         of quiver-client cannot run: enable the `plugins` cargo feature of quiver-client \
         (quiver-client = {{ features = [\"plugins\"] }}), or give each record an explicit partition"
    )]
    PartitionerUnavailable {
        /// The topic.
        topic: String,
        /// Its partitioner, `name@version`.
        plugin: String,
    },
}

impl ClientError {
    /// True when the same operation may succeed if tried again (after a reconnect or a
    /// metadata refresh).
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Transport { .. }
            | ClientError::Timeout { .. }
            | ClientError::NotLeader(_) => true,
            ClientError::Broker { code, .. } => code.is_retriable(),
            _ => false,
        }
    }

    /// The broker's error code, when the broker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            ClientError::TopicNotFound(_) => ErrorCode::UnknownTopicOrPartition,
            ClientError::TopicAlreadyExists(_) => ErrorCode::TopicAlreadyExists,
            ClientError::InvalidTopicName(_) => ErrorCode::InvalidTopicName,
            ClientError::OffsetOutOfRange(_) => ErrorCode::OffsetOutOfRange,
            ClientError::NotLeader(_) => ErrorCode::NotLeader,
            ClientError::TopicDeletionDisabled(_) => ErrorCode::TopicDeletionDisabled,
            ClientError::MessageTooLarge(_) => ErrorCode::MessageTooLarge,
            ClientError::Broker { code, .. } => *code,
            _ => return None,
        })
    }
}

impl From<ProtocolError> for ClientError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Remote { code, message } => match code {
                ErrorCode::UnknownTopicOrPartition => ClientError::TopicNotFound(message),
                ErrorCode::TopicAlreadyExists => ClientError::TopicAlreadyExists(message),
                ErrorCode::InvalidTopicName => ClientError::InvalidTopicName(message),
                ErrorCode::InvalidConfig | ErrorCode::InvalidPartitions => {
                    ClientError::InvalidConfig(message)
                }
                ErrorCode::OffsetOutOfRange => ClientError::OffsetOutOfRange(message),
                ErrorCode::NotLeader => ClientError::NotLeader(message),
                ErrorCode::TopicDeletionDisabled => ClientError::TopicDeletionDisabled(message),
                ErrorCode::MessageTooLarge => ClientError::MessageTooLarge(message),
                code => ClientError::Broker { code, message },
            },
            other => ClientError::Protocol(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_errors_become_typed_variants() {
        let e: ClientError = ProtocolError::Remote {
            code: ErrorCode::UnknownTopicOrPartition,
            message: "no topic x".into(),
        }
        .into();
        assert!(matches!(e, ClientError::TopicNotFound(_)));
        assert_eq!(e.code(), Some(ErrorCode::UnknownTopicOrPartition));
        let e: ClientError = ProtocolError::Remote {
            code: ErrorCode::RequestTimedOut,
            message: String::new(),
        }
        .into();
        assert!(e.is_retriable());
    }
}
