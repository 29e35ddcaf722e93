//! CreateTopic on a lone broker: validates name, partition count, replication factor and
//! config, then creates (a cluster broker creates through the controller: `cluster_topics`).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use quiver_protocol::requests::CreateTopicRequest;
use quiver_protocol::ErrorCode;

use super::describe_topic::describe;
use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a create-topic request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (mut req, _) = decode::<CreateTopicRequest>(&body)?;
    req.partitions = partitions_or_default(ctx, req.partitions);
    if req.replication_factor > 1 {
        return Err(RequestError::new(
            ErrorCode::InvalidConfig,
            format!(
                "replication factor {}: it is larger than the number of brokers (1); run a cluster (`quiver cluster start`) to replicate",
                req.replication_factor
            ),
        ));
    }
    if let Some(p) = req
        .config
        .get("partitioner")
        .filter(|p| !p.trim().is_empty())
    {
        ctx.plugins.check_partitioner(p.trim()).map_err(|e| {
            RequestError::new(ErrorCode::InvalidConfig, format!("partitioner: {e}"))
        })?;
    }
    let t = ctx.topics.create(&req.name, req.partitions, &req.config)?;
    ctx.metrics
        .partitions
        .fetch_add(i64::from(req.partitions), Ordering::Relaxed);
    Ok(Reply::control(&describe(ctx, &t)))
}

/// A request's partition count, where 0 (a client that left the choice to the broker)
/// means the broker's `topic_defaults.partitions`.
pub(super) fn partitions_or_default(ctx: &ServerContext, asked: u32) -> u32 {
    if asked == 0 {
        ctx.config.topic_defaults.partitions
    } else {
        asked
    }
}
