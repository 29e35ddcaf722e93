//! DeployPipeline, ListPipelines, DescribePipeline and StopPipeline: handed to the broker's
//! pipeline host (see [`crate::pipelines`]).

use bytes::Bytes;
use quiver_protocol::requests::{
    DeployPipelineRequest, DescribePipelineRequest, ListPipelinesRequest, ListPipelinesResponse,
    StopPipelineRequest,
};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a deploy-pipeline request.
#[tracing::instrument(name = "deploy_pipeline", skip_all)]
pub async fn deploy(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DeployPipelineRequest>(&body)?;
    let resp = ctx.pipelines.host()?.deploy(req.config_toml).await?;
    tracing::info!(pipeline = %resp.name, instances = resp.instances, replaced = resp.replaced, "pipeline deployed");
    Ok(Reply::control(&resp))
}

/// Handles a list-pipelines request.
#[tracing::instrument(name = "list_pipelines", skip_all)]
pub async fn list(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let _ = decode::<ListPipelinesRequest>(&body)?;
    let pipelines = ctx.pipelines.host()?.list().await?;
    Ok(Reply::control(&ListPipelinesResponse { pipelines }))
}

/// Handles a describe-pipeline request.
#[tracing::instrument(name = "describe_pipeline", skip_all)]
pub async fn describe(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DescribePipelineRequest>(&body)?;
    let status = ctx.pipelines.host()?.status(req.name).await?;
    Ok(Reply::control(&status))
}

/// Handles a stop-pipeline request.
#[tracing::instrument(name = "stop_pipeline", skip_all)]
pub async fn stop(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<StopPipelineRequest>(&body)?;
    let name = req.name.clone();
    let resp = ctx.pipelines.host()?.stop(req.name).await?;
    tracing::info!(pipeline = %name, instances = resp.instances, "pipeline stopped");
    Ok(Reply::control(&resp))
}
