//! Routes a decoded frame to its handler. Handlers that read or write sled synchronously
//! (topic and plugin administration) run on blocking threads, never on the async runtime:
//! a 10,000-partition `topic create` does not delay anyone else's request.

use std::sync::Arc;

use bytes::Bytes;
use quinn::SendStream;
use quiver_protocol::ApiKey;

use super::requests::{self, Reply, RequestError};
use super::ServerContext;

type SyncHandler = fn(&ServerContext, Bytes) -> Result<Reply, RequestError>;

/// Runs a synchronous handler that touches storage on a blocking thread.
async fn on_blocking_thread(
    ctx: &Arc<ServerContext>,
    body: Bytes,
    handler: SyncHandler,
) -> Result<Reply, RequestError> {
    let ctx = ctx.clone();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| handler(&ctx, body)))
        .await
        .map_err(|e| {
            RequestError::new(
                quiver_protocol::ErrorCode::Internal,
                format!("request task failed: {e}"),
            )
        })?
}

/// What a handler produced.
pub enum Outcome {
    /// One response to write.
    Reply(Reply),
    /// The handler wrote to the stream itself (subscribe).
    Streamed,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// It presented a certificate signed by the cluster CA: a broker of this cluster.
    pub broker: bool,
}

/// Runs the handler of `api`.
pub async fn dispatch(
    ctx: &Arc<ServerContext>,
    peer: Peer,
    api: ApiKey,
    body: Bytes,
    send: Option<&mut SendStream>,
) -> Result<Outcome, RequestError> {
    let reply = match api {
        ApiKey::Produce => requests::produce::handle(ctx, body).await?,
        ApiKey::Fetch => requests::fetch::handle(ctx, body).await?,
        ApiKey::ListOffsets => requests::list_offsets::handle(ctx, body).await?,
        ApiKey::Metadata => requests::metadata::handle(ctx, body)?,
        ApiKey::CreateTopic if ctx.replicas().is_some() => {
            requests::cluster_topics::create(ctx, body).await?
        }
        ApiKey::CreateTopic => {
            on_blocking_thread(ctx, body, requests::create_topic::handle).await?
        }
        ApiKey::CreatePartitions if ctx.replicas().is_some() => {
            requests::cluster_topics::add_partitions(ctx, body).await?
        }
        ApiKey::CreatePartitions => {
            on_blocking_thread(ctx, body, requests::create_partitions::handle).await?
        }
        ApiKey::ReassignPartition if ctx.replicas().is_some() => {
            requests::cluster_topics::reassign(ctx, body).await?
        }
        ApiKey::ReassignPartition => {
            return Err(RequestError::new(
                quiver_protocol::ErrorCode::InvalidConfig,
                "a lone broker holds the only replica of its partitions; reassignment needs a cluster (`quiver cluster start`)",
            ))
        }
        ApiKey::DeleteTopic if ctx.replicas().is_some() => {
            requests::cluster_topics::delete(ctx, body).await?
        }
        ApiKey::DeleteTopic => {
            on_blocking_thread(ctx, body, requests::delete_topic::handle).await?
        }
        ApiKey::DescribeTopic => requests::describe_topic::handle(ctx, body)?,
        ApiKey::AlterTopicConfig if ctx.replicas().is_some() => {
            requests::cluster_topics::alter(ctx, body).await?
        }
        ApiKey::AlterTopicConfig => {
            on_blocking_thread(ctx, body, requests::alter_topic_config::handle).await?
        }
        ApiKey::IncrementalAlterTopicConfig if ctx.replicas().is_some() => {
            requests::cluster_topics::alter_incremental(ctx, body).await?
        }
        ApiKey::IncrementalAlterTopicConfig => {
            on_blocking_thread(ctx, body, requests::alter_topic_config::handle_incremental)
                .await?
        }
        ApiKey::JoinGroup => requests::join_group::handle(ctx, body).await?,
        ApiKey::Heartbeat => requests::heartbeat::handle(ctx, body).await?,
        ApiKey::LeaveGroup => requests::leave_group::handle(ctx, body)?,
        ApiKey::CommitOffsets => requests::commit_offsets::handle(ctx, body).await?,
        ApiKey::FetchOffsets => requests::fetch_offsets::handle(ctx, body).await?,
        ApiKey::ListGroups => requests::list_groups::handle(ctx, body)?,
        ApiKey::DescribeGroup => requests::describe_group::handle(ctx, body)?,
        ApiKey::ResetOffsets => requests::reset_offsets::handle(ctx, body).await?,
        ApiKey::DeleteGroup => requests::delete_group::handle(ctx, body).await?,
        ApiKey::DeployPlugin if ctx.replicas().is_some() => {
            let (_req, archive) =
                requests::decode::<quiver_protocol::requests::DeployPluginRequest>(&body)?;
            requests::cluster_plugins::deploy(ctx, archive).await?
        }
        ApiKey::DeployPlugin => requests::deploy_plugin::handle(ctx, body).await?,
        ApiKey::ListPlugins => requests::list_plugins::handle(ctx, body).await?,
        ApiKey::DescribePlugin => requests::describe_plugin::handle(ctx, body).await?,
        ApiKey::RemovePlugin if ctx.replicas().is_some() => {
            let (req, _) =
                requests::decode::<quiver_protocol::requests::RemovePluginRequest>(&body)?;
            requests::cluster_plugins::remove(ctx, &req.name, &req.version).await?
        }
        ApiKey::RemovePlugin => {
            requests::remove_plugin::refuse_if_a_pipeline_uses(ctx, &body).await?;
            on_blocking_thread(ctx, body, requests::remove_plugin::handle).await?
        }
        ApiKey::GetPlugin => on_blocking_thread(ctx, body, requests::get_plugin::handle).await?,
        ApiKey::DeployPipeline => requests::pipelines::deploy(ctx, body).await?,
        ApiKey::ListPipelines => requests::pipelines::list(ctx, body).await?,
        ApiKey::DescribePipeline => requests::pipelines::describe(ctx, body).await?,
        ApiKey::StopPipeline => requests::pipelines::stop(ctx, body).await?,
        ApiKey::InitTransactions => requests::transactions::init(ctx, body).await?,
        ApiKey::TxnCommitOffsets => requests::transactions::commit_offsets(ctx, body).await?,
        ApiKey::EndTxn => requests::transactions::end(ctx, body).await?,
        ApiKey::AddPartitionsToTxn => requests::transactions::add_partitions(ctx, body).await?,
        ApiKey::WriteTxnMarker => requests::transactions::write_marker(ctx, peer, body).await?,
        ApiKey::VerifyTxnPartition => requests::transactions::verify_partition(ctx, peer, body)?,
        ApiKey::DescribeCluster => requests::describe_cluster::handle(ctx, body).await?,
        ApiKey::ReplicaFetch => requests::replica_fetch::fetch(ctx, peer, body).await?,
        ApiKey::OffsetForLeaderEpoch => {
            requests::replica_fetch::offset_for_leader_epoch(ctx, peer, body)?
        }
        ApiKey::Subscribe => {
            let Some(send) = send else {
                return Err(RequestError::new(
                    quiver_protocol::ErrorCode::InvalidRequest,
                    "a subscription pushes on its own QUIC stream; it cannot be served in process",
                ));
            };
            requests::subscribe::handle(ctx, body, send).await?;
            return Ok(Outcome::Streamed);
        }
    };
    Ok(Outcome::Reply(reply))
}
