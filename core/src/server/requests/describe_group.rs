//! DescribeGroup: members, assignment, committed offsets, log ends and lag.

use bytes::Bytes;
use quiver_protocol::requests::DescribeGroupRequest;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a describe-group request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DescribeGroupRequest>(&body)?;
    Ok(Reply::control(
        &ctx.groups.for_group(&req.group)?.describe(&req.group)?,
    ))
}
