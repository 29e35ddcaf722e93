//! FetchOffsets: a group's committed offsets. Offsets an open transaction will store are
//! waited for (up to the longest transaction timeout's worth of a minute), so a member that
//! takes over a partition starts from the transaction's outcome, never from before it.

use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::requests::FetchOffsetsRequest;
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// How long a fetch waits for pending transactional offsets.
const PENDING_WAIT: Duration = Duration::from_secs(60);

/// Handles a fetch-offsets request.
#[tracing::instrument(name = "fetch_offsets", skip_all)]
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<FetchOffsetsRequest>(&body)?;
    let service = ctx.groups.for_group(&req.group)?;
    if !service
        .wait_for_txn_offsets(&req.group, req.partitions.as_deref(), PENDING_WAIT)
        .await
    {
        return Err(RequestError::new(
            ErrorCode::RequestTimedOut,
            format!(
                "group {}: a transaction holding offsets of these partitions has not ended; retry",
                req.group
            ),
        ));
    }
    Ok(Reply::control(&service.fetch_offsets(&req)))
}
