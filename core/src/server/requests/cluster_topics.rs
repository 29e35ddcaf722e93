//! Topic administration on a cluster broker: create, delete and alter go through the
//! controller (every broker applies them from the metadata log), and the request answers
//! once this broker has applied the change.
//!
//! Placement: replicas of partition `p` go to the live brokers in id order starting at
//! `p mod live` (so leaders — the first replica — spread evenly), refusing a replication
//! factor larger than the live brokers.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::requests::{
    AlterTopicConfigRequest, CreateTopicRequest, DeleteTopicRequest, DeleteTopicResponse,
    IncrementalAlterTopicConfigRequest,
};
use quiver_protocol::ErrorCode;

use super::describe_topic::describe;
use super::{decode, Reply, RequestError};
use crate::cluster::{
    ControllerCommand, ControllerError, ControllerResponse, ControllerState, PartitionAssignment,
};
use crate::replica::ReplicaManager;
use crate::server::ServerContext;
use crate::topic::MAX_PARTITIONS;

/// How long a request waits for this broker to apply its own change.
const APPLY_WAIT: Duration = Duration::from_secs(15);

/// The replica manager, once it acts on metadata holding this broker's registration (a
/// broker that just joined gets a few seconds to get there).
pub(super) async fn replicas_of(
    ctx: &ServerContext,
) -> Result<&std::sync::Arc<ReplicaManager>, RequestError> {
    let rm = ctx
        .replicas()
        .ok_or_else(|| RequestError::new(ErrorCode::Internal, "not a cluster broker"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !rm.is_ready() {
        if tokio::time::Instant::now() >= deadline {
            return Err(RequestError::new(
                ErrorCode::NotLeader,
                "this broker has not joined its cluster yet; retry in a moment",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(rm)
}

/// Spreads `partitions` partitions of `rf` replicas over the live brokers.
pub fn assign(
    state: &ControllerState,
    partitions: u32,
    rf: u16,
) -> Result<Vec<PartitionAssignment>, String> {
    assign_from(state, 0, partitions, rf)
}

/// [`assign`] for partitions `first..first + count`, continuing the same spread.
fn assign_from(
    state: &ControllerState,
    first: u32,
    count: u32,
    rf: u16,
) -> Result<Vec<PartitionAssignment>, String> {
    let live = state.live_brokers();
    let rf = usize::from(rf.max(1));
    if rf > live.len() {
        return Err(format!(
            "replication factor {rf} is larger than the {} live brokers ({}); start more brokers or lower --replication-factor",
            live.len(),
            live.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok((first as usize..(first + count) as usize)
        .map(|p| PartitionAssignment {
            replicas: (0..rf).map(|i| live[(p + i) % live.len()]).collect(),
        })
        .collect())
}

pub(super) async fn propose(
    ctx: &ServerContext,
    cmd: ControllerCommand,
) -> Result<ControllerResponse, RequestError> {
    let rm = replicas_of(ctx).await?;
    rm.controller().propose(cmd).await.map_err(|e| {
        RequestError::new(
            ErrorCode::RequestTimedOut,
            format!("the controller did not take the change: {e}"),
        )
    })
}

fn refused(e: ControllerError) -> RequestError {
    let code = match &e {
        ControllerError::TopicAlreadyExists { .. } => ErrorCode::TopicAlreadyExists,
        ControllerError::UnknownTopic { .. } => ErrorCode::UnknownTopicOrPartition,
        ControllerError::InvalidAssignment { .. } | ControllerError::UnknownBroker { .. } => {
            ErrorCode::InvalidConfig
        }
        ControllerError::UnknownPartition { .. } => ErrorCode::UnknownTopicOrPartition,
        _ => ErrorCode::Internal,
    };
    RequestError::new(code, e.to_string())
}

/// Polls until `done` holds on this broker (its view and registry), or times out.
pub(super) async fn until_applied(
    ctx: &ServerContext,
    what: &str,
    done: impl Fn(&ServerContext) -> bool,
) -> Result<(), RequestError> {
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    while !done(ctx) {
        if tokio::time::Instant::now() >= deadline {
            return Err(RequestError::new(
                ErrorCode::RequestTimedOut,
                format!("the controller took the change, but this broker has not applied it yet ({what}); check `quiver cluster status`"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// CreateTopic through the controller.
pub async fn create(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (mut req, _) = decode::<CreateTopicRequest>(&body)?;
    req.partitions = super::create_topic::partitions_or_default(ctx, req.partitions);
    let span = tracing::info_span!("create_topic", topic = %req.name, partitions = req.partitions, rf = req.replication_factor);
    let _e = span.enter();
    drop(_e);
    if crate::topic::is_internal(&req.name) {
        return Err(RequestError::new(
            ErrorCode::InvalidTopicName,
            format!(
                "topic names starting with \"__\" are reserved for internal topics: {:?}",
                req.name
            ),
        ));
    }
    quiver_protocol::requests::validate_topic_name(&req.name)
        .map_err(|e| RequestError::new(ErrorCode::InvalidTopicName, e))?;
    if req.partitions == 0 || req.partitions > MAX_PARTITIONS {
        return Err(RequestError::new(
            ErrorCode::InvalidPartitions,
            format!(
                "partitions must be between 1 and {MAX_PARTITIONS}, got {}",
                req.partitions
            ),
        ));
    }
    let config = ctx
        .config
        .default_topic_config()
        .map_err(|(k, r)| RequestError::new(ErrorCode::InvalidConfig, format!("{k}: {r}")))?
        .with_changes(&req.config)
        .map_err(|e| RequestError::new(ErrorCode::InvalidConfig, e))?;
    if config.min_insync_replicas > u32::from(req.replication_factor.max(1)) {
        return Err(RequestError::new(
            ErrorCode::InvalidConfig,
            format!(
                "min.insync.replicas = {} is larger than the replication factor {}: no write could ever be acknowledged with acks=all",
                config.min_insync_replicas, req.replication_factor
            ),
        ));
    }
    if let Some(p) = req
        .config
        .get("partitioner")
        .filter(|p| !p.trim().is_empty())
    {
        ctx.plugins.check_partitioner(p.trim()).map_err(|e| {
            RequestError::new(ErrorCode::InvalidConfig, format!("partitioner: {e}"))
        })?;
    }
    let rm = replicas_of(ctx).await?;
    let mut tries = 0;
    let topic_id = loop {
        // The controller's applied state now, not the view of the last reconcile pass.
        let state = rm.controller().state().await;
        let partitions = assign(&state, req.partitions, req.replication_factor)
            .map_err(|e| RequestError::new(ErrorCode::InvalidConfig, e))?;
        let topic_id = state.next_topic_id();
        let cmd = ControllerCommand::CreateTopic {
            name: req.name.clone(),
            topic_id,
            partitions,
            config: req.config.clone(),
        };
        match propose(ctx, cmd).await? {
            ControllerResponse::Refused(ControllerError::TopicIdInUse { .. }) if tries < 5 => {
                // Another creation took the id first: wait for it to arrive, pick again.
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            ControllerResponse::Refused(e) => return Err(refused(e)),
            _ => break topic_id,
        }
    };
    let name = req.name.clone();
    until_applied(ctx, "topic created", |ctx| {
        ctx.topics.cluster_id(&name) == Some(topic_id)
            && ctx.replicas().is_some_and(|rm| {
                rm.view()
                    .topic(&name)
                    .is_some_and(|t| t.partitions.iter().all(|p| p.leader.is_some()))
            })
    })
    .await?;
    let t = ctx.topics.topic(&req.name)?;
    Ok(Reply::control(&describe(ctx, &t)))
}

/// DeleteTopic through the controller.
pub async fn delete(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DeleteTopicRequest>(&body)?;
    crate::topic::refuse_internal(&req.name, "delete")?;
    if !ctx.config.delete_topic_enable {
        return Err(RequestError::new(
            ErrorCode::TopicDeletionDisabled,
            "topic deletion is disabled on this broker; set delete_topic_enable = true in its config to allow it",
        ));
    }
    let partitions = replicas_of(ctx)
        .await?
        .view()
        .topic(&req.name)
        .map(|t| t.partitions.len() as u32);
    if let ControllerResponse::Refused(e) = propose(
        ctx,
        ControllerCommand::DeleteTopic {
            name: req.name.clone(),
        },
    )
    .await?
    {
        return Err(refused(e));
    }
    let name = req.name.clone();
    until_applied(ctx, "topic deleted", |ctx| ctx.topics.get(&name).is_none()).await?;
    ctx.metrics.remove_topic(&req.name);
    Ok(Reply::control(&DeleteTopicResponse {
        partitions_deleted: partitions.unwrap_or(0),
    }))
}

/// AlterTopicConfig through the controller.
pub async fn alter(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<AlterTopicConfigRequest>(&body)?;
    alter_config(ctx, req.into()).await
}

/// IncrementalAlterTopicConfig through the controller.
pub async fn alter_incremental(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<IncrementalAlterTopicConfigRequest>(&body)?;
    alter_config(ctx, req).await
}

async fn alter_config(
    ctx: &ServerContext,
    req: IncrementalAlterTopicConfigRequest,
) -> Result<Reply, RequestError> {
    crate::topic::refuse_internal(&req.name, "alter")?;
    let t = ctx.topics.topic(&req.name)?;
    let invalid = |e: String| RequestError::new(ErrorCode::InvalidConfig, e);
    // Checked here first, so a bad key is refused before it reaches the metadata log.
    let current = t
        .meta
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .overrides
        .clone();
    let overrides =
        crate::topic::altered_overrides(&current, &req.set, &req.remove).map_err(invalid)?;
    let changed = ctx
        .config
        .default_topic_config()
        .map_err(|(k, r)| invalid(format!("{k}: {r}")))?
        .with_changes(&overrides)
        .map_err(invalid)?;
    // As at creation: more in-sync replicas than a partition has would hold its high
    // watermark (so every write) until the value is changed back.
    let rm = replicas_of(ctx).await?;
    let fewest = rm
        .controller()
        .state()
        .await
        .topic(&req.name)
        .and_then(|t| t.partitions.iter().map(|p| p.replicas.len()).min());
    if let Some(rf) = fewest.filter(|&rf| changed.min_insync_replicas as usize > rf) {
        return Err(invalid(format!(
            "min.insync.replicas = {} is larger than the replication factor {rf}: no write could ever be acknowledged with acks=all (nothing was changed)",
            changed.min_insync_replicas
        )));
    }
    super::alter_topic_config::check_partitioner(ctx, &req)?;
    let cmd = ControllerCommand::AlterTopicConfig {
        name: req.name.clone(),
        set: req.set.clone(),
        remove: req.remove.clone(),
    };
    if let ControllerResponse::Refused(e) = propose(ctx, cmd).await? {
        return Err(refused(e));
    }
    let name = req.name.clone();
    let want: BTreeMap<String, String> = overrides;
    until_applied(ctx, "config changed", |ctx| {
        ctx.topics
            .get(&name)
            .is_some_and(|t| t.meta.read().unwrap_or_else(|p| p.into_inner()).overrides == want)
    })
    .await?;
    let t = ctx.topics.topic(&req.name)?;
    Ok(Reply::control(&describe(ctx, &t)))
}

/// CreatePartitions through the controller: the new partitions get as many replicas as the
/// topic's first partition, spread like the existing ones.
pub async fn add_partitions(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<quiver_protocol::requests::CreatePartitionsRequest>(&body)?;
    crate::topic::refuse_internal(&req.name, "alter")?;
    let rm = replicas_of(ctx).await?;
    let state = rm.controller().state().await;
    let Some(topic) = state.topic(&req.name) else {
        return Err(crate::topic::TopicError::NotFound(req.name.clone()).into());
    };
    let have = topic.partitions.len() as u32;
    if req.total <= have || req.total > MAX_PARTITIONS {
        return Err(RequestError::new(
            ErrorCode::InvalidPartitions,
            format!(
                "topic {:?} has {have} partitions; the new count must be larger, and at most {MAX_PARTITIONS}, got {}",
                req.name, req.total
            ),
        ));
    }
    let rf = topic.partitions.first().map_or(1, |p| p.replicas.len()) as u16;
    let partitions = assign_from(&state, have, req.total - have, rf)
        .map_err(|e| RequestError::new(ErrorCode::InvalidConfig, e))?;
    let cmd = ControllerCommand::AddPartitions {
        name: req.name.clone(),
        partitions,
        after: Some(have),
    };
    if let ControllerResponse::Refused(e) = propose(ctx, cmd).await? {
        // Refused because a first delivery of this very change was applied (its answer
        // lost, the proposal sent again): the topic has the count asked for.
        let now = rm.controller().state().await;
        let done = now
            .topic(&req.name)
            .is_some_and(|t| t.partitions.len() as u32 == req.total);
        if !done {
            return Err(refused(e));
        }
    }
    let (name, total) = (req.name.clone(), req.total as usize);
    until_applied(ctx, "partitions added", |ctx| {
        ctx.topics
            .get(&name)
            .is_some_and(|t| t.partitions.len() == total)
            && ctx.replicas().is_some_and(|rm| {
                rm.view()
                    .topic(&name)
                    .is_some_and(|t| t.partitions.iter().all(|p| p.leader.is_some()))
            })
    })
    .await?;
    let t = ctx.topics.topic(&req.name)?;
    Ok(Reply::control(&describe(ctx, &t)))
}

/// ReassignPartition: proposes the move; the partition's leader finishes it once the new
/// replicas are in sync.
pub async fn reassign(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<quiver_protocol::requests::ReassignPartitionRequest>(&body)?;
    crate::topic::refuse_internal(&req.topic, "alter")?;
    // This broker's copy of the config; one it cannot read (a damaged record) leaves the
    // check to the controller's other rules.
    let min_isr = ctx
        .topics
        .topic(&req.topic)
        .map_or(1, |t| t.config().min_insync_replicas);
    if (min_isr as usize) > req.replicas.len() {
        return Err(RequestError::new(
            ErrorCode::InvalidConfig,
            format!(
                "{} replicas for {}/{} is fewer than its min.insync.replicas = {min_isr}: its high watermark could never move again (nothing was changed; lower min.insync.replicas first)",
                req.replicas.len(),
                req.topic,
                req.partition
            ),
        ));
    }
    let cmd = ControllerCommand::ReassignPartition {
        topic: req.topic.clone(),
        partition: req.partition,
        replicas: req.replicas.iter().map(|r| u64::from(*r)).collect(),
    };
    if let ControllerResponse::Refused(e) = propose(ctx, cmd).await? {
        return Err(refused(e));
    }
    let rm = replicas_of(ctx).await?;
    let state = rm.controller().state().await;
    let replicas = state
        .partition(&req.topic, req.partition)
        .map(|p| p.replicas.iter().map(|r| *r as u32).collect())
        .unwrap_or_default();
    Ok(Reply::control(
        &quiver_protocol::requests::ReassignPartitionResponse {
            replicas,
            target: req.replicas,
        },
    ))
}
