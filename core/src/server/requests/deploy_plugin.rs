//! DeployPlugin: validate the bundle archive in the payload (load and build it once with
//! the broker's limits) and store it durably; same bytes again are a no-op.

use bytes::Bytes;
use quiver_protocol::requests::{DeployPluginRequest, DeployPluginResponse};
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a deploy-plugin request.
#[tracing::instrument(name = "deploy_plugin", skip_all, fields(bytes = body.len()))]
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (_req, archive) = decode::<DeployPluginRequest>(&body)?;
    let plugins = ctx.plugins.clone();
    let deployed = tokio::task::spawn_blocking(move || plugins.deploy(&archive))
        .await
        .map_err(|e| {
            RequestError::new(ErrorCode::Internal, format!("deploy task failed: {e}"))
        })??;
    Ok(Reply::control(&DeployPluginResponse {
        plugin: deployed.info,
        already_deployed: deployed.already_deployed,
    }))
}
