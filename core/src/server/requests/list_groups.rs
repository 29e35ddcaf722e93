//! ListGroups: every group this broker coordinates (in a cluster, those of the
//! `__consumer_offsets` partitions it leads).

use bytes::Bytes;
use quiver_protocol::requests::{ListGroupsRequest, ListGroupsResponse};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a list-groups request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (_req, _) = decode::<ListGroupsRequest>(&body)?;
    let mut groups = Vec::new();
    for service in ctx.groups.all() {
        groups.extend(service.list().groups);
    }
    groups.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(Reply::control(&ListGroupsResponse { groups }))
}
