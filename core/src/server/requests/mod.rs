//! One handler per request type, named after it. Each decodes its request, does the work
//! against the topic registry and the partition logs, and returns a [`Reply`].

pub mod alter_topic_config;
pub mod cluster_plugins;
pub mod cluster_topics;
pub mod commit_offsets;
pub mod create_partitions;
pub mod create_topic;
pub mod delete_group;
pub mod delete_topic;
pub mod deploy_plugin;
pub mod describe_cluster;
pub mod describe_group;
pub mod describe_plugin;
pub mod describe_topic;
pub mod fetch;
pub mod fetch_offsets;
pub mod get_plugin;
pub mod heartbeat;
pub mod join_group;
pub mod leave_group;
pub mod list_groups;
pub mod list_offsets;
pub mod list_plugins;
pub mod metadata;
pub mod pipelines;
pub mod produce;
pub mod remove_plugin;
pub mod replica_fetch;
pub mod reset_offsets;
pub mod subscribe;
pub mod transactions;

use bytes::Bytes;
use quiver_protocol::{encode_control, ErrorCode, Message, ProtocolError};
use serde::Serialize;

use crate::group::{GroupError, GroupServiceError};
use crate::log::LogError;
use crate::plugin::PluginServiceError;
use crate::topic::TopicError;

/// A successful answer: the encoded control part and the raw payload.
pub struct Reply {
    /// postcard-encoded response control.
    pub control: Vec<u8>,
    /// Raw payload (record batches), written after the control without a copy.
    pub payload: Bytes,
    /// Room the payload holds in its connection's budget until it is written.
    pub hold: crate::server::budget::Held,
}

impl Reply {
    /// A reply with a payload.
    pub fn new<T: Serialize>(resp: &T, payload: Bytes) -> Reply {
        Reply {
            control: encode_control(resp),
            payload,
            hold: Default::default(),
        }
    }

    /// A reply without a payload.
    pub fn control<T: Serialize>(resp: &T) -> Reply {
        Self::new(resp, Bytes::new())
    }
}

/// A refused or failed request: the wire code and a message for the user.
#[derive(Debug, Clone)]
pub struct RequestError {
    /// Wire code.
    pub code: ErrorCode,
    /// What went wrong and, where possible, what to do.
    pub message: String,
}

impl RequestError {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            code,
            message: message.into(),
        }
    }
}

/// Every error below the server carries its wire code: a request fails with that code and
/// the error's message.
macro_rules! request_error_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for RequestError {
            fn from(e: $t) -> Self {
                RequestError::new(e.code(), e.to_string())
            }
        }
    )*};
}

request_error_from!(
    ProtocolError,
    LogError,
    TopicError,
    GroupError,
    GroupServiceError,
    PluginServiceError,
    crate::pipelines::PipelineHostError,
    crate::txn::TxnError,
    crate::replica::ReplicaError,
);

/// Decodes the request of a handler.
pub fn decode<M: Message>(body: &Bytes) -> Result<(M, Bytes), RequestError> {
    quiver_protocol::decode_request::<M>(body).map_err(RequestError::from)
}
