//! RemovePlugin: delete one `name@version`, refused while it is in use.

use bytes::Bytes;
use quiver_protocol::requests::{RemovePluginRequest, RemovePluginResponse};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a remove-plugin request.
#[tracing::instrument(name = "remove_plugin", skip_all)]
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<RemovePluginRequest>(&body)?;
    let (record, blob_deleted) = ctx.plugins.remove(&req.name, &req.version)?;
    Ok(Reply::control(&RemovePluginResponse {
        // Empty for a damaged record (its digest was in it).
        digest: record.map(|r| r.digest).unwrap_or_default(),
        blob_deleted,
    }))
}
