//! ListPlugins: every deployed plugin, with who uses it (pipelines included).

use bytes::Bytes;
use quiver_protocol::requests::{ListPluginsRequest, ListPluginsResponse};

use super::describe_plugin::{add_pipeline_users, on_plugins, pipeline_users};
use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a list-plugins request.
#[tracing::instrument(name = "list_plugins", skip_all)]
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (_req, _) = decode::<ListPluginsRequest>(&body)?;
    let users = pipeline_users(ctx).await;
    let mut plugins = on_plugins(ctx, |p| p.list()).await?;
    for p in &mut plugins {
        add_pipeline_users(p, &users);
    }
    Ok(Reply::control(&ListPluginsResponse { plugins }))
}
