//! ResetOffsets: moves a memberless group's committed offsets of one topic.

use bytes::Bytes;
use quiver_protocol::requests::ResetOffsetsRequest;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a reset-offsets request.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<ResetOffsetsRequest>(&body)?;
    Ok(Reply::control(
        &ctx.groups.for_group(&req.group)?.reset(&req).await?,
    ))
}
