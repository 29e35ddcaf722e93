//! FetchOffsets: a group's committed offsets. Offsets an open transaction will store are
//! waited for, so a member that takes over a partition starts from the transaction's
//! outcome, never from before it. The wait is bounded below a client's request timeout:
//! a transaction still open then is answered `RequestTimedOut` ("retry"), and the SDK's
//! group consumer asks again, its partitions not started meanwhile.

use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::requests::FetchOffsetsRequest;
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// How long a fetch waits for pending transactional offsets: well within the SDK's
/// default request timeout (30 s), so the client gets the answer to retry rather than a
/// timeout of its own.
const PENDING_WAIT: Duration = Duration::from_secs(20);

/// The most partitions one fetch-offsets request may name (all of a group's: name none).
pub const MAX_FETCH_OFFSETS_PARTITIONS: usize = 100_000;

/// Handles a fetch-offsets request.
#[tracing::instrument(name = "fetch_offsets", skip_all)]
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<FetchOffsetsRequest>(&body)?;
    if let Some(n) = req
        .partitions
        .as_ref()
        .map(Vec::len)
        .filter(|&n| n > MAX_FETCH_OFFSETS_PARTITIONS)
    {
        return Err(RequestError::new(
            ErrorCode::InvalidRequest,
            format!(
                "a fetch-offsets request names {n} partitions; at most {MAX_FETCH_OFFSETS_PARTITIONS} (name none to get every committed offset of the group)"
            ),
        ));
    }
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
