//! CommitOffsets: checked against membership, generation and ownership; answered once on disk.

use bytes::Bytes;
use quiver_protocol::requests::CommitOffsetsRequest;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a commit.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<CommitOffsetsRequest>(&body)?;
    let resp = ctx.groups.for_group(&req.group)?.commit(&req).await?;
    Ok(Reply::control(&resp))
}
