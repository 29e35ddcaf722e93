//! Subscribe: the broker pushes batches from an offset as they arrive, on one stream.
//!
//! The request is answered by a sequence of response frames, each a [`SubscribeChunk`]
//! with batches as payload, until the client stops reading. The client's QUIC receive
//! window is the backpressure: a slow consumer slows the push, never overruns.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Starts a push stream of `topic`/`partition` from `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeRequest {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// First offset wanted.
    pub offset: i64,
    /// Upper bound of payload bytes per chunk.
    pub max_bytes: u32,
    /// A consume-time processor the leader runs on the batches before pushing them.
    /// Appended after the first release: absent from an older client's request.
    #[serde(default)]
    pub processor: Option<super::plugin::ProcessorSpec>,
}

/// One pushed chunk; the payload holds batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeChunk {
    /// High watermark when the chunk was sent.
    pub high_watermark: i64,
    /// First offset still stored.
    pub log_start_offset: i64,
}

impl Message for SubscribeRequest {
    const API: ApiKey = ApiKey::Subscribe;
    type Response = SubscribeChunk;
}
