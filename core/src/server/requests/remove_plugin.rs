//! RemovePlugin: delete one `name@version`, refused while it is in use.

use bytes::Bytes;
use quiver_protocol::requests::{RemovePluginRequest, RemovePluginResponse};

use super::{decode, Reply, RequestError};
use crate::plugin::PluginServiceError;
use crate::server::ServerContext;

/// A lone broker's check before the removal: refused while a pipeline deployed here
/// loads the plugin (it would fail to start again after a restart).
pub async fn refuse_if_a_pipeline_uses(
    ctx: &ServerContext,
    body: &Bytes,
) -> Result<(), RequestError> {
    let (req, _) = decode::<RemovePluginRequest>(body)?;
    let Ok(host) = ctx.pipelines.host() else {
        return Ok(());
    };
    let id = format!("{}@{}", req.name, req.version);
    let users: Vec<String> = host
        .plugins_in_use()
        .await
        .into_iter()
        .filter(|(plugin, _)| *plugin == id)
        .map(|(_, pipeline)| pipeline)
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    Err(PluginServiceError::InUse(format!(
        "{id} is in use by pipeline {}; stop it first (`quiver pipeline stop NAME`), or deploy the pipeline again with another version of the plugin",
        users.join(", ")
    ))
    .into())
}

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
