//! FetchOffsets: a group's committed offsets.

use bytes::Bytes;
use quiver_protocol::requests::FetchOffsetsRequest;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a fetch-offsets request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<FetchOffsetsRequest>(&body)?;
    Ok(Reply::control(&ctx.groups.fetch_offsets(&req)))
}
