//! CreatePartitions on a lone broker: grows a topic's partition count (a cluster broker goes
//! through the controller: `cluster_topics::add_partitions`).

use bytes::Bytes;
use quiver_protocol::requests::CreatePartitionsRequest;

use super::describe_topic::describe;
use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a create-partitions request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<CreatePartitionsRequest>(&body)?;
    crate::topic::refuse_internal(&req.name, "alter")?;
    let t = ctx.topics.add_partitions(&req.name, req.total)?;
    Ok(Reply::control(&describe(ctx, &t)))
}
