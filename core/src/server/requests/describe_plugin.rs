//! DescribePlugin: one plugin, by `name@version` or its highest version.

use bytes::Bytes;
use quiver_protocol::requests::{DescribePluginRequest, DescribePluginResponse};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a describe-plugin request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DescribePluginRequest>(&body)?;
    Ok(Reply::control(&DescribePluginResponse {
        plugin: ctx.plugins.describe(&req.name, req.version.as_deref())?,
    }))
}
