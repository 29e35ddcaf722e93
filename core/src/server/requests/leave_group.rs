//! LeaveGroup: removes a member at once; its partitions go to the others.

use bytes::Bytes;
use quiver_protocol::requests::{LeaveGroupRequest, LeaveGroupResponse};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a leave.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<LeaveGroupRequest>(&body)?;
    let generation = ctx
        .groups
        .for_group(&req.group)?
        .leave(&req.group, &req.member_id)?;
    Ok(Reply::control(&LeaveGroupResponse { generation }))
}
