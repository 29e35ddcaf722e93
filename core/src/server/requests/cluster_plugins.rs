//! Plugin deploy and removal on a cluster broker. The controller holds every deployed
//! plugin (its canonical archive) and each broker's replica manager installs what it holds
//! into the broker's own plugin store, and removes what it no longer holds; so a plugin
//! deployed through any broker runs on all of them. Deploy validates the bundle here (a
//! build with this broker's limits) before proposing it; both answer once this broker has
//! applied the change.

use bytes::Bytes;
use quiver_protocol::requests::{DeployPluginResponse, RemovePluginResponse};
use quiver_protocol::ErrorCode;

use super::cluster_topics::{propose, replicas_of, until_applied};
use super::{Reply, RequestError};
use crate::cluster::{ControllerCommand, ControllerError, ControllerResponse, PluginArchive};
use crate::server::ServerContext;

/// Largest canonical archive deployed through the controller: its base64 (4/3) and the
/// entry around it must fit one Raft frame (`MAX_FRAME`, 32 MiB).
const MAX_REPLICATED_ARCHIVE: usize = 20 * 1024 * 1024;

fn refused(e: ControllerError) -> RequestError {
    let code = match &e {
        ControllerError::PluginVersionConflict { .. } => ErrorCode::PluginVersionConflict,
        ControllerError::UnknownPlugin { .. } => ErrorCode::PluginNotFound,
        ControllerError::PluginInUse { .. } | ControllerError::PluginUsedByPipeline { .. } => {
            ErrorCode::PluginInUse
        }
        _ => ErrorCode::Internal,
    };
    RequestError::new(code, e.to_string())
}

fn stored_here(ctx: &ServerContext, id: &str, digest: Option<&str>) -> bool {
    ctx.plugins.stored().is_ok_and(|all| {
        all.iter()
            .any(|(i, d)| i == id && digest.is_none_or(|want| want == d))
    })
}

/// DeployPlugin through the controller.
#[tracing::instrument(name = "deploy_plugin", skip_all, fields(bytes = archive.len()))]
pub async fn deploy(ctx: &ServerContext, archive: Bytes) -> Result<Reply, RequestError> {
    let plugins = ctx.plugins.clone();
    let (record, canonical) = tokio::task::spawn_blocking(move || plugins.validate(&archive))
        .await
        .map_err(|e| {
            RequestError::new(ErrorCode::Internal, format!("deploy task failed: {e}"))
        })??;
    if canonical.len() > MAX_REPLICATED_ARCHIVE {
        return Err(RequestError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "the bundle's archive is {} bytes; a cluster replicates plugins of at most {MAX_REPLICATED_ARCHIVE} bytes",
                canonical.len()
            ),
        ));
    }
    let id = record.id();
    let rm = replicas_of(ctx).await?;
    let already = match rm.controller().state().await.plugins.get(&id) {
        Some(p) if p.digest == record.digest => true,
        Some(p) => {
            return Err(refused(ControllerError::PluginVersionConflict {
                id,
                digest: p.digest.clone(),
            }))
        }
        None => false,
    };
    if !already {
        let cmd = ControllerCommand::DeployPlugin {
            id: id.clone(),
            digest: record.digest.clone(),
            archive: PluginArchive(canonical.into()),
        };
        if let ControllerResponse::Refused(e) = propose(ctx, cmd).await? {
            return Err(refused(e));
        }
    }
    until_applied(ctx, "plugin deploy", |ctx| {
        stored_here(ctx, &id, Some(&record.digest))
    })
    .await?;
    let info = ctx
        .plugins
        .describe(&record.name, Some(&record.version))
        .map_err(RequestError::from)?;
    Ok(Reply::control(&DeployPluginResponse {
        plugin: info,
        already_deployed: already,
    }))
}

/// RemovePlugin through the controller: refused while this broker uses it; a broker that
/// still runs it removes it once it stops.
#[tracing::instrument(name = "remove_plugin", skip_all, fields(plugin = %format!("{name}@{version}")))]
pub async fn remove(ctx: &ServerContext, name: &str, version: &str) -> Result<Reply, RequestError> {
    let record = ctx
        .plugins
        .check_removable(name, version)
        .map_err(RequestError::from)?;
    let id = record.id();
    let cmd = ControllerCommand::RemovePlugin { id: id.clone() };
    if let ControllerResponse::Refused(e) = propose(ctx, cmd).await? {
        return Err(refused(e));
    }
    until_applied(ctx, "plugin removal", |ctx| !stored_here(ctx, &id, None)).await?;
    let shared = ctx
        .plugins
        .stored()
        .is_ok_and(|all| all.iter().any(|(_, d)| *d == record.digest));
    Ok(Reply::control(&RemovePluginResponse {
        digest: record.digest,
        blob_deleted: !shared,
    }))
}
