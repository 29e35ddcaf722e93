//! ListOffsets: earliest, latest (high watermark), or the first offset at a timestamp. On
//! a cluster broker only the partition's leader answers: a follower's (or a former
//! replica's) offsets may lag or be gone, and a client must not take them for the log's.

use bytes::Bytes;
use quiver_protocol::requests::{ListOffsetsRequest, ListOffsetsResponse};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a list-offsets request.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<ListOffsetsRequest>(&body)?;
    let (_, log) = ctx.partition(&req.topic, req.partition)?;
    if let Some(rm) = ctx.replicas() {
        rm.leader(&req.topic, req.partition)?;
    }
    let (offset, timestamp) = log
        .lookup_async(req.spec, ctx.config.limits.max_frame_bytes as usize)
        .await?;
    Ok(Reply::control(&ListOffsetsResponse { offset, timestamp }))
}
