//! ListGroups: every group this broker coordinates.

use bytes::Bytes;
use quiver_protocol::requests::ListGroupsRequest;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a list-groups request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (_req, _) = decode::<ListGroupsRequest>(&body)?;
    Ok(Reply::control(&ctx.groups.list()))
}
