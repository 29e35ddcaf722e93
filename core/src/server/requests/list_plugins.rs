//! ListPlugins: every deployed plugin.

use bytes::Bytes;
use quiver_protocol::requests::{ListPluginsRequest, ListPluginsResponse};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a list-plugins request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (_req, _) = decode::<ListPluginsRequest>(&body)?;
    Ok(Reply::control(&ListPluginsResponse {
        plugins: ctx.plugins.list()?,
    }))
}
