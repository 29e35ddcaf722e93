//! JoinGroup: adds a member to a consumer group (see `crate::group`).

use bytes::Bytes;
use quiver_protocol::requests::JoinGroupRequest;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a join.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<JoinGroupRequest>(&body)?;
    let resp = ctx.groups.for_group(&req.group)?.join(&req).await?;
    Ok(Reply::control(&resp))
}
