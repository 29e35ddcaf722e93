//! DeleteGroup: forgets a memberless group and its offsets.

use bytes::Bytes;
use quiver_protocol::requests::DeleteGroupRequest;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a delete-group request.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DeleteGroupRequest>(&body)?;
    Ok(Reply::control(
        &ctx.groups.for_group(&req.group)?.delete(&req.group).await?,
    ))
}
