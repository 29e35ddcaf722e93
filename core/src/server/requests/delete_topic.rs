//! DeleteTopic: refused unless `delete_topic_enable = true`; drops the topic's data.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use quiver_protocol::requests::{DeleteTopicRequest, DeleteTopicResponse};
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a delete-topic request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DeleteTopicRequest>(&body)?;
    crate::topic::refuse_internal(&req.name, "delete")?;
    if !ctx.config.delete_topic_enable {
        return Err(RequestError::new(
            ErrorCode::TopicDeletionDisabled,
            "topic deletion is disabled on this broker; set delete_topic_enable = true in its config to allow it",
        ));
    }
    let n = ctx.topics.delete(&req.name)?;
    ctx.metrics
        .partitions
        .fetch_sub(i64::from(n), Ordering::Relaxed);
    ctx.metrics.remove_topic(&req.name);
    Ok(Reply::control(&DeleteTopicResponse {
        partitions_deleted: n,
    }))
}
