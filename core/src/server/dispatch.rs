//! Routes a decoded frame to its handler. Nothing else lives here.

use bytes::Bytes;
use quinn::SendStream;
use quiver_protocol::ApiKey;

use super::requests::{self, Reply, RequestError};
use super::ServerContext;

/// What a handler produced.
pub enum Outcome {
    /// One response to write.
    Reply(Reply),
    /// The handler wrote to the stream itself (subscribe).
    Streamed,
}

/// Runs the handler of `api`.
pub async fn dispatch(
    ctx: &ServerContext,
    api: ApiKey,
    body: Bytes,
    send: &mut SendStream,
) -> Result<Outcome, RequestError> {
    let reply = match api {
        ApiKey::Produce => requests::produce::handle(ctx, body).await?,
        ApiKey::Fetch => requests::fetch::handle(ctx, body).await?,
        ApiKey::ListOffsets => requests::list_offsets::handle(ctx, body)?,
        ApiKey::Metadata => requests::metadata::handle(ctx, body)?,
        ApiKey::CreateTopic => requests::create_topic::handle(ctx, body)?,
        ApiKey::DeleteTopic => requests::delete_topic::handle(ctx, body)?,
        ApiKey::DescribeTopic => requests::describe_topic::handle(ctx, body)?,
        ApiKey::AlterTopicConfig => requests::alter_topic_config::handle(ctx, body)?,
        ApiKey::JoinGroup => requests::join_group::handle(ctx, body).await?,
        ApiKey::Heartbeat => requests::heartbeat::handle(ctx, body).await?,
        ApiKey::LeaveGroup => requests::leave_group::handle(ctx, body)?,
        ApiKey::CommitOffsets => requests::commit_offsets::handle(ctx, body).await?,
        ApiKey::FetchOffsets => requests::fetch_offsets::handle(ctx, body)?,
        ApiKey::ListGroups => requests::list_groups::handle(ctx, body)?,
        ApiKey::DescribeGroup => requests::describe_group::handle(ctx, body)?,
        ApiKey::ResetOffsets => requests::reset_offsets::handle(ctx, body).await?,
        ApiKey::DeleteGroup => requests::delete_group::handle(ctx, body).await?,
        ApiKey::DeployPlugin => requests::deploy_plugin::handle(ctx, body).await?,
        ApiKey::ListPlugins => requests::list_plugins::handle(ctx, body)?,
        ApiKey::DescribePlugin => requests::describe_plugin::handle(ctx, body)?,
        ApiKey::RemovePlugin => requests::remove_plugin::handle(ctx, body)?,
        ApiKey::GetPlugin => requests::get_plugin::handle(ctx, body)?,
        ApiKey::Subscribe => {
            requests::subscribe::handle(ctx, body, send).await?;
            return Ok(Outcome::Streamed);
        }
    };
    Ok(Outcome::Reply(reply))
}
