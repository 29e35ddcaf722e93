//! AlterTopicConfig: sets config keys on a topic, all or nothing.

use bytes::Bytes;
use quiver_protocol::requests::AlterTopicConfigRequest;

use super::describe_topic::describe;
use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles an alter-topic-config request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<AlterTopicConfigRequest>(&body)?;
    crate::topic::refuse_internal(&req.name, "alter")?;
    if let Some(p) = req.set.get("partitioner").filter(|p| !p.trim().is_empty()) {
        ctx.plugins.check_partitioner(p.trim()).map_err(|e| {
            RequestError::new(
                quiver_protocol::ErrorCode::InvalidConfig,
                format!("partitioner: {e}"),
            )
        })?;
    }
    let t = ctx.topics.alter(&req.name, &req.set)?;
    Ok(Reply::control(&describe(ctx, &t)))
}
