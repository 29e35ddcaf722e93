//! CreateTopic: validates name, partition count, replication factor and config, then creates.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use quiver_protocol::requests::CreateTopicRequest;
use quiver_protocol::ErrorCode;

use super::describe_topic::describe;
use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a create-topic request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<CreateTopicRequest>(&body)?;
    if req.replication_factor > 1 {
        let why = if ctx.config.cluster.enabled() {
            "this cluster does not replicate partitions yet: every topic has one replica, on the broker that created it"
                .to_string()
        } else {
            "it is larger than the number of brokers (1)".to_string()
        };
        return Err(RequestError::new(
            ErrorCode::InvalidConfig,
            format!("replication factor {}: {why}", req.replication_factor),
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
