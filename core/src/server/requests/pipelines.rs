//! DeployPipeline, ListPipelines, DescribePipeline and StopPipeline. A lone broker hands
//! them to its pipeline host (see [`crate::pipelines`]). A cluster broker goes through the
//! controller: deploy has the local host check the file, then proposes it; stop removes it;
//! every broker's host then runs the instances placed on it (see [`crate::cluster::placement`]).
//! A status in a cluster gathers each live broker's part (DescribePipeline with `local`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::requests::{
    DeployPipelineRequest, DeployPipelineResponse, DescribePipelineRequest, ListPipelinesRequest,
    ListPipelinesResponse, PipelineStatus, StopPipelineRequest, StopPipelineResponse,
};
use quiver_protocol::ErrorCode;

use super::cluster_topics::{propose, replicas_of, until_applied};
use super::{decode, Reply, RequestError};
use crate::cluster::{ControllerCommand, ControllerError, ControllerResponse};
use crate::replica::ReplicaManager;
use crate::server::ServerContext;

/// Largest pipeline file a broker takes: a file is a few hundred bytes, and in a cluster it
/// is kept in the controller's replicated metadata.
const MAX_PIPELINE_FILE_BYTES: usize = 256 * 1024;
/// How long a cluster deploy or stop waits for this broker's host to follow it (a stop
/// includes its instances committing and leaving their group).
const LOCAL_FOLLOW_WAIT: Duration = Duration::from_secs(40);
/// How long a cluster status waits for each peer's part.
const PEER_STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// Handles a deploy-pipeline request.
#[tracing::instrument(name = "deploy_pipeline", skip_all)]
pub async fn deploy(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DeployPipelineRequest>(&body)?;
    if req.config_toml.len() > MAX_PIPELINE_FILE_BYTES {
        return Err(RequestError::new(
            ErrorCode::InvalidPipeline,
            format!(
                "the pipeline file is {} bytes; a broker takes pipeline files of at most {MAX_PIPELINE_FILE_BYTES} bytes",
                req.config_toml.len()
            ),
        ));
    }
    let resp = match ctx.replicas() {
        Some(_) => deploy_in_cluster(ctx, req.config_toml).await?,
        None => ctx.pipelines.host()?.deploy(req.config_toml).await?,
    };
    tracing::info!(pipeline = %resp.name, instances = resp.instances, replaced = resp.replaced, "pipeline deployed");
    Ok(Reply::control(&resp))
}

fn refused(e: ControllerError) -> RequestError {
    let code = match &e {
        ControllerError::UnknownPipeline { .. } => ErrorCode::PipelineNotFound,
        ControllerError::MissingPlugin { .. } => ErrorCode::PluginNotFound,
        _ => ErrorCode::InvalidPipeline,
    };
    RequestError::new(code, e.to_string())
}

async fn deploy_in_cluster(
    ctx: &ServerContext,
    config_toml: String,
) -> Result<DeployPipelineResponse, RequestError> {
    let rm = replicas_of(ctx).await?;
    let running = rm
        .view()
        .pipelines
        .iter()
        .map(|(name, p)| (name.clone(), p.config_toml.clone()))
        .collect();
    let checked = ctx
        .pipelines
        .host()?
        .check(config_toml.clone(), running)
        .await?;
    let replaced = rm.view().pipelines.contains_key(&checked.name);
    // Every deploy takes a new number (the same file again asks for a failed part to
    // start again): wait for this file under a number past the one seen here.
    let number_before = rm
        .view()
        .pipelines
        .get(&checked.name)
        .map(|p| p.deploy_number);
    let cmd = ControllerCommand::PutPipeline {
        name: checked.name.clone(),
        config_toml: config_toml.clone(),
        instances: checked.instances,
        plugins: checked.plugins,
    };
    if let ControllerResponse::Refused(e) = propose(ctx, cmd).await? {
        return Err(refused(e));
    }
    let name = checked.name.clone();
    until_applied(ctx, "pipeline deploy", move |ctx| {
        ctx.replicas().is_some_and(|rm| {
            rm.view().pipelines.get(&name).is_some_and(|p| {
                p.config_toml == config_toml
                    && number_before.is_none_or(|before| p.deploy_number > before)
            })
        })
    })
    .await?;
    // This broker's host learns of it at the replica manager's next pass; answer once it
    // reports it, so a status right after the deploy finds it.
    let host = ctx.pipelines.host()?;
    let deadline = tokio::time::Instant::now() + LOCAL_FOLLOW_WAIT;
    while host.status(checked.name.clone()).await.is_err() && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(DeployPipelineResponse {
        name: checked.name,
        instances: checked.instances,
        replaced,
    })
}

/// Handles a list-pipelines request.
#[tracing::instrument(name = "list_pipelines", skip_all)]
pub async fn list(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let _ = decode::<ListPipelinesRequest>(&body)?;
    let pipelines = match ctx.replicas() {
        Some(rm) => {
            let names: Vec<String> = rm.view().pipelines.keys().cloned().collect();
            let mut all = Vec::with_capacity(names.len());
            for name in names {
                all.push(cluster_status(ctx, rm, name).await?);
            }
            all
        }
        None => ctx.pipelines.host()?.list().await?,
    };
    Ok(Reply::control(&ListPipelinesResponse { pipelines }))
}

/// Handles a describe-pipeline request.
#[tracing::instrument(name = "describe_pipeline", skip_all, fields(pipeline = %"", local))]
pub async fn describe(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DescribePipelineRequest>(&body)?;
    tracing::Span::current().record("pipeline", req.name.as_str());
    tracing::Span::current().record("local", req.local);
    let status = match ctx.replicas() {
        Some(rm) if !req.local => cluster_status(ctx, rm, req.name).await?,
        _ => ctx.pipelines.host()?.status(req.name).await?,
    };
    Ok(Reply::control(&status))
}

/// The whole pipeline: this broker's part and every other live broker's.
async fn cluster_status(
    ctx: &ServerContext,
    rm: &Arc<ReplicaManager>,
    name: String,
) -> Result<PipelineStatus, RequestError> {
    let state = rm.view();
    if !state.pipelines.contains_key(&name) {
        return Err(RequestError::new(
            ErrorCode::PipelineNotFound,
            format!("no pipeline named {name:?} is deployed; see `quiver pipeline list`"),
        ));
    }
    let mut parts = Vec::new();
    match ctx.pipelines.host()?.status(name.clone()).await {
        Ok(here) => parts.push(here),
        Err(e) if e.code() == ErrorCode::PipelineNotFound => {}
        Err(e) => return Err(e.into()),
    }
    let peers: Vec<(u64, String)> = state
        .brokers
        .values()
        .filter(|b| !b.fenced && b.id != rm.id())
        .map(|b| (b.id, b.addr.clone()))
        .collect();
    let asks = peers.into_iter().map(|(id, addr)| {
        let name = name.clone();
        async move {
            let client = rm.peers().get(id, &addr).await.ok()?;
            let req = DescribePipelineRequest { name, local: true };
            match tokio::time::timeout(PEER_STATUS_TIMEOUT, client.request(&req, Bytes::new()))
                .await
            {
                Ok(Ok((status, _))) => Some(status),
                Ok(Err(e)) => {
                    tracing::debug!(broker = id, error = %e, "no pipeline status from a peer");
                    None
                }
                Err(_) => None,
            }
        }
    });
    parts.extend(futures::future::join_all(asks).await.into_iter().flatten());
    merge_status(parts).ok_or_else(|| {
        RequestError::new(
            ErrorCode::PipelineNotFound,
            format!("pipeline {name:?} is deployed but no live broker reports it yet; retry in a moment"),
        )
    })
}

/// One status from the parts each broker reported: instances side by side, rates summed,
/// the first failure as the state (else the first state that is not "running", e.g. a
/// broker left on an older file), the largest counters, lag and latencies. Counters and lag
/// are the group's, committed with its offsets and read by each broker a moment apart, so
/// the largest is the latest (a broker adds a failure that stopped its instances, never
/// committed, to the errors it reads); latencies are per broker, so the worst is shown.
pub fn merge_status(parts: Vec<PipelineStatus>) -> Option<PipelineStatus> {
    let rank = |state: &str| match state {
        s if s.starts_with("failed") => 2,
        "running" => 0,
        _ => 1,
    };
    let mut parts = parts.into_iter();
    let mut all = parts.next()?;
    for p in parts {
        if rank(&p.state) > rank(&all.state) {
            all.state = p.state;
        }
        all.instances.extend(p.instances);
        all.records_in = all.records_in.max(p.records_in);
        all.records_out = all.records_out.max(p.records_out);
        all.records_per_sec_in += p.records_per_sec_in;
        all.records_per_sec_out += p.records_per_sec_out;
        all.lag = all.lag.max(p.lag);
        all.errors = all.errors.max(p.errors);
        all.dead_lettered = all.dead_lettered.max(p.dead_lettered);
        all.latency_p50_ms = all.latency_p50_ms.max(p.latency_p50_ms);
        all.latency_p99_ms = all.latency_p99_ms.max(p.latency_p99_ms);
    }
    all.instances.sort_by(|a, b| {
        let n = |id: &str| id.rsplit('-').next().and_then(|n| n.parse::<u32>().ok());
        n(&a.id).cmp(&n(&b.id)).then_with(|| a.id.cmp(&b.id))
    });
    Some(all)
}

/// Handles a stop-pipeline request.
#[tracing::instrument(name = "stop_pipeline", skip_all)]
pub async fn stop(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<StopPipelineRequest>(&body)?;
    let name = req.name.clone();
    let resp = match ctx.replicas() {
        Some(_) => stop_in_cluster(ctx, req.name).await?,
        None => ctx.pipelines.host()?.stop(req.name).await?,
    };
    tracing::info!(pipeline = %name, instances = resp.instances, "pipeline stopped");
    Ok(Reply::control(&resp))
}

/// Removes the pipeline from the controller; answers once this broker's instances are
/// stopped (the other brokers stop theirs as they apply the removal).
async fn stop_in_cluster(
    ctx: &ServerContext,
    name: String,
) -> Result<StopPipelineResponse, RequestError> {
    let rm = replicas_of(ctx).await?;
    let instances = rm
        .view()
        .pipelines
        .get(&name)
        .map(|p| p.instances)
        .unwrap_or(0);
    let cmd = ControllerCommand::RemovePipeline { name: name.clone() };
    if let ControllerResponse::Refused(e) = propose(ctx, cmd).await? {
        return Err(refused(e));
    }
    let gone = name.clone();
    until_applied(ctx, "pipeline stop", move |ctx| {
        ctx.replicas()
            .is_some_and(|rm| !rm.view().pipelines.contains_key(&gone))
    })
    .await?;
    // The local host stops its instances as the replica manager passes the removal on.
    let host = ctx.pipelines.host()?;
    let deadline = tokio::time::Instant::now() + LOCAL_FOLLOW_WAIT;
    while host.status(name.clone()).await.is_ok() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(StopPipelineResponse { instances })
}

#[cfg(test)]
mod tests {
    use super::merge_status;
    use quiver_protocol::requests::PipelineStatus;

    fn part(state: &str, records_in: u64) -> PipelineStatus {
        PipelineStatus {
            records_per_sec_in: records_in as f64,
            name: "p".into(),
            state: state.into(),
            guarantee: "at-least-once".into(),
            group: "p".into(),
            instances: Vec::new(),
            records_in,
            records_out: 0,
            records_per_sec_out: 0.0,
            lag: 0,
            errors: 0,
            dead_lettered: 0,
            latency_p50_ms: 0.0,
            latency_p99_ms: 0.0,
        }
    }

    /// A failure shows over anything, and a broker left on an older file over "running".
    #[test]
    fn the_merged_state_is_the_worst_part() {
        let merged = |states: &[&str]| {
            merge_status(states.iter().map(|s| part(s, 1)).collect()).map(|s| s.state)
        };
        assert_eq!(merged(&["running", "running"]).unwrap(), "running");
        assert_eq!(
            merged(&["running", "degraded: broker 2 …", "running"]).unwrap(),
            "degraded: broker 2 …"
        );
        assert_eq!(
            merged(&["degraded: broker 2 …", "failed: quarantined"]).unwrap(),
            "failed: quarantined"
        );
        assert_eq!(merged(&["failed: a", "degraded: b"]).unwrap(), "failed: a");
        // Counters are the group's (each broker read the same committed ones, one a moment
        // later): the latest, not the sum. Rates are each broker's own: summed.
        let both = merge_status(vec![part("running", 3), part("running", 2)]).unwrap();
        assert_eq!((both.records_in, both.records_per_sec_in), (3, 5.0));
        assert!(merged(&[]).is_none());
    }
}
