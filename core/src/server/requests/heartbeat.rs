//! Heartbeat: the member long-poll that carries assignment changes (see `crate::group`).

use bytes::Bytes;
use quiver_protocol::requests::HeartbeatRequest;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a heartbeat; may wait up to the member's heartbeat interval.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<HeartbeatRequest>(&body)?;
    let resp = ctx
        .groups
        .for_group(&req.group)?
        .heartbeat(&req, ctx.stopping.clone())
        .await?;
    Ok(Reply::control(&resp))
}
