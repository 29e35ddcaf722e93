//! AlterTopicConfig and IncrementalAlterTopicConfig on a lone broker: set config keys on a
//! topic and remove overrides, all or nothing.

use bytes::Bytes;
use quiver_protocol::requests::{AlterTopicConfigRequest, IncrementalAlterTopicConfigRequest};
use quiver_protocol::ErrorCode;

use super::describe_topic::describe;
use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles an alter-topic-config request (sets keys only).
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<AlterTopicConfigRequest>(&body)?;
    alter(ctx, req.into())
}

/// Handles an incremental alter: keys to set and overrides to remove.
pub fn handle_incremental(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<IncrementalAlterTopicConfigRequest>(&body)?;
    alter(ctx, req)
}

fn alter(
    ctx: &ServerContext,
    req: IncrementalAlterTopicConfigRequest,
) -> Result<Reply, RequestError> {
    crate::topic::refuse_internal(&req.name, "alter")?;
    check_partitioner(ctx, &req)?;
    let t = ctx.topics.alter(&req.name, &req.set, &req.remove)?;
    Ok(Reply::control(&describe(ctx, &t)))
}

/// A partitioner being set must be a deployed plugin ("" goes back to the default).
pub(super) fn check_partitioner(
    ctx: &ServerContext,
    req: &IncrementalAlterTopicConfigRequest,
) -> Result<(), RequestError> {
    match req.set.get("partitioner").filter(|p| !p.trim().is_empty()) {
        Some(p) => ctx
            .plugins
            .check_partitioner(p.trim())
            .map_err(|e| RequestError::new(ErrorCode::InvalidConfig, format!("partitioner: {e}"))),
        None => Ok(()),
    }
}
