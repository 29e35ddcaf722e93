//! DescribePlugin: one plugin, by `name@version` or its highest version; with ListPlugins,
//! who uses a plugin, pipelines included.

use bytes::Bytes;
use quiver_protocol::requests::{DescribePluginRequest, DescribePluginResponse, PluginInfo};
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::plugin::PluginService;
use crate::server::ServerContext;

/// How long a plugin listing waits for the pipelines running here (see [`pipeline_users`]).
const PIPELINES_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Handles a describe-plugin request.
#[tracing::instrument(name = "describe_plugin", skip_all)]
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DescribePluginRequest>(&body)?;
    let users = pipeline_users(ctx).await;
    let mut plugin =
        on_plugins(ctx, move |p| p.describe(&req.name, req.version.as_deref())).await?;
    add_pipeline_users(&mut plugin, &users);
    Ok(Reply::control(&DescribePluginResponse { plugin }))
}

/// The pipelines that load plugins, as `(name@version, pipeline name)`: the controller's
/// records in a cluster (every broker's instances), this broker's host otherwise.
pub(super) async fn pipeline_users(ctx: &ServerContext) -> Vec<(String, String)> {
    match ctx.replicas() {
        Some(rm) => rm
            .view()
            .pipelines
            .values()
            .flat_map(|p| p.plugins.iter().map(|id| (id.clone(), p.name.clone())))
            .collect(),
        // Bounded: the host's pipelines are locked through a deploy or a roll, and a
        // listing must not hang behind one; it then answers without them.
        None => match ctx.pipelines.host() {
            Ok(host) => tokio::time::timeout(PIPELINES_WAIT, host.plugins_in_use())
                .await
                .unwrap_or_else(|_| {
                    tracing::debug!("pipelines busy: plugin users listed without them");
                    Vec::new()
                }),
            Err(_) => Vec::new(),
        },
    }
}

/// Adds `pipeline NAME` to what uses `plugin`, for each pipeline of `users` that loads it.
pub(super) fn add_pipeline_users(plugin: &mut PluginInfo, users: &[(String, String)]) {
    let id = format!("{}@{}", plugin.name, plugin.version);
    let mut names: Vec<&String> = users
        .iter()
        .filter(|(p, _)| *p == id)
        .map(|(_, name)| name)
        .collect();
    names.sort();
    names.dedup();
    plugin
        .used_by
        .extend(names.into_iter().map(|n| format!("pipeline {n}")));
}

/// Runs `f` on the plugin store on a blocking thread (it reads sled).
pub(super) async fn on_plugins<T: Send + 'static>(
    ctx: &ServerContext,
    f: impl FnOnce(&PluginService) -> Result<T, crate::plugin::PluginServiceError> + Send + 'static,
) -> Result<T, RequestError> {
    let plugins = ctx.plugins.clone();
    let span = tracing::Span::current();
    Ok(
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&plugins)))
            .await
            .map_err(|e| {
                RequestError::new(ErrorCode::Internal, format!("plugin task failed: {e}"))
            })??,
    )
}
