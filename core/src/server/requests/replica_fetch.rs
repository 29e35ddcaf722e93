//! ReplicaFetch and OffsetForLeaderEpoch: what a leader answers its followers. Both are
//! refused unless the connection presented a cluster-CA certificate (a broker) and this
//! broker leads the partition at the epoch the follower names.

use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::requests::{
    OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, ReplicaFetchRequest,
    ReplicaFetchResponse,
};
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::replica::ReplicaManager;
use crate::server::dispatch::Peer;
use crate::server::ServerContext;

/// Longest wait the leader grants a follower's fetch.
const MAX_WAIT_CAP_MS: u32 = 5_000;

fn for_brokers<'a>(
    ctx: &'a ServerContext,
    peer: Peer,
    what: &str,
) -> Result<&'a std::sync::Arc<ReplicaManager>, RequestError> {
    match ctx.replicas() {
        Some(rm) if peer.broker => Ok(rm),
        Some(_) => Err(RequestError::new(
            ErrorCode::ClusterAuthorizationFailed,
            format!("{what} is for the cluster's brokers only (a connection with a certificate signed by the cluster CA)"),
        )),
        None => Err(RequestError::new(
            ErrorCode::ClusterAuthorizationFailed,
            format!("{what}: this broker is not part of a cluster"),
        )),
    }
}

/// A follower's fetch: record its position, then answer batches up to the log end.
#[tracing::instrument(name = "replica_fetch", skip_all)]
pub async fn fetch(ctx: &ServerContext, peer: Peer, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<ReplicaFetchRequest>(&body)?;
    let rm = for_brokers(ctx, peer, "ReplicaFetch")?;
    let (_, log) = ctx.topics.partition(&req.topic, req.partition)?;
    let snap = log.snapshot();
    let answer = |payload: Bytes| {
        let s = log.snapshot();
        Reply::new(
            &ReplicaFetchResponse {
                high_watermark: s.high_watermark,
                log_start_offset: s.log_start,
                log_end_offset: s.log_end,
            },
            payload,
        )
    };
    if req.offset < snap.log_start {
        // The follower starts over at the log start (it sees it in the answer).
        rm.check_leader_epoch(&req.topic, req.partition, req.leader_epoch)?;
        return Ok(answer(Bytes::new()));
    }
    rm.check_leader_epoch(&req.topic, req.partition, req.leader_epoch)?;
    if req.offset > snap.log_end {
        // No replica of this log can hold more than it: a follower that does copied another
        // log (a topic deleted and created again under the same name) or skipped its
        // truncation. Its position must not count for the high watermark.
        return Err(crate::log::LogError::OffsetOutOfRange {
            offset: req.offset,
            start: snap.log_start,
            end: snap.log_end,
        }
        .into());
    }
    rm.follower_fetched(
        &log,
        u64::from(req.replica_id),
        req.broker_epoch,
        req.leader_epoch,
        req.offset,
        req.flushed_offset,
    )?;
    let max_bytes = (req.max_bytes as usize).clamp(1, ctx.config.limits.max_frame_bytes as usize);
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(u64::from(req.max_wait_ms.min(MAX_WAIT_CAP_MS)));
    let this = log.clone();
    let mut read =
        crate::log::partition::blocking(move || this.read_to_log_end(req.offset, max_bytes))
            .await??;
    if read.payload.is_empty() && !ctx.is_stopping() {
        tokio::select! {
            _ = log.wait_for_append(req.offset, deadline) => {}
            _ = ctx.stopped() => {}
        }
        let this = log.clone();
        read = crate::log::partition::blocking(move || this.read_to_log_end(req.offset, max_bytes))
            .await??;
    }
    Ok(answer(read.payload))
}

/// Where the follower's last epoch ends in this leader's log.
#[tracing::instrument(name = "offset_for_leader_epoch", skip_all)]
pub fn offset_for_leader_epoch(
    ctx: &ServerContext,
    peer: Peer,
    body: Bytes,
) -> Result<Reply, RequestError> {
    let (req, _) = decode::<OffsetForLeaderEpochRequest>(&body)?;
    let rm = for_brokers(ctx, peer, "OffsetForLeaderEpoch")?;
    rm.check_leader_epoch(&req.topic, req.partition, req.current_leader_epoch)?;
    let (_, log) = ctx.topics.partition(&req.topic, req.partition)?;
    let (epoch, end_offset) = log.end_offset_for_epoch(req.epoch);
    Ok(Reply::control(&OffsetForLeaderEpochResponse {
        epoch,
        end_offset,
    }))
}
