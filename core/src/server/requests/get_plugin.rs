//! GetPlugin: the archive of a deployed bundle, as payload.

use bytes::Bytes;
use quiver_protocol::requests::{GetPluginRequest, GetPluginResponse};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a get-plugin request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<GetPluginRequest>(&body)?;
    let (plugin, archive) = ctx.plugins.archive(&req.name, req.version.as_deref())?;
    Ok(Reply::new(&GetPluginResponse { plugin }, archive))
}
