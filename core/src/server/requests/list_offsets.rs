//! ListOffsets: earliest, latest (high watermark), or the first offset at a timestamp. On
//! a cluster broker only the partition's leader answers: a follower's (or a former
//! replica's) offsets may lag or be gone, and a client must not take them for the log's;
//! a new leader answers "latest" once it knows the high watermark.

use bytes::Bytes;
use quiver_protocol::requests::{ListOffsetsRequest, ListOffsetsResponse, OffsetSpec};
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a list-offsets request.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<ListOffsetsRequest>(&body)?;
    let (_, log) = ctx.partition(&req.topic, req.partition)?;
    if let Some(rm) = ctx.replicas() {
        let leader = rm.leader(&req.topic, req.partition)?;
        let leader = leader.lock().unwrap_or_else(|p| p.into_inner());
        // A new leader's watermark is the one it had as a follower until its followers
        // report (Kafka's OFFSET_NOT_AVAILABLE): "latest" would name an end that is too
        // early. While the ISR is too small for the watermark to move at all, the one held
        // is the best answer there is.
        let stale =
            leader.enough_replicas() && log.snapshot().high_watermark < leader.epoch_start();
        if stale && matches!(req.spec, OffsetSpec::Latest | OffsetSpec::LastStable) {
            return Err(RequestError::new(
                ErrorCode::OffsetNotAvailable,
                format!(
                    "{}/{} has a new leader that does not know its high watermark yet; retry in a moment",
                    req.topic, req.partition
                ),
            ));
        }
    }
    let (offset, timestamp) = log
        .lookup_async(req.spec, ctx.config.limits.max_frame_bytes as usize)
        .await?;
    Ok(Reply::control(&ListOffsetsResponse { offset, timestamp }))
}
