//! Fetch: read stored batches from an offset; when fewer than `min_bytes` are readable,
//! wait (long-poll) for the high watermark to move, up to `max_wait_ms`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::requests::{FetchRequest, FetchResponse, Isolation};

use super::{decode, Reply, RequestError};
use crate::server::{budget, ServerContext};

/// Longest long-poll the broker grants.
const MAX_WAIT_CAP_MS: u32 = 30_000;

/// Handles a fetch request.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<FetchRequest>(&body)?;
    let (_, log) = ctx.partition(&req.topic, req.partition)?;
    if let Some(rm) = ctx.replicas() {
        rm.leader(&req.topic, req.partition)?;
    }
    let max_bytes = (req.max_bytes as usize).clamp(1, ctx.config.limits.max_frame_bytes as usize);
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(u64::from(req.max_wait_ms.min(MAX_WAIT_CAP_MS)));
    let isolation = req.isolation;
    // Room for what this read may bring, in the connection's budget; what it brought is
    // kept until the answer is written.
    let mut hold = budget::reserve(max_bytes).await;
    let mut read = log
        .read_async_with(req.offset, max_bytes, isolation)
        .await?;
    hold.shrink_to(read.payload.len());
    // A min_bytes above max_bytes could never be met: each append would read (and check)
    // up to max_bytes again until the deadline. A read the budget cut short (records
    // readable past its end, up to the bound of its isolation) is as full as it gets, too.
    let min_bytes = (req.min_bytes as usize).clamp(1, max_bytes);
    let full = |read: &crate::log::ReadResult| {
        let readable = match isolation {
            Isolation::ReadCommitted => read.snapshot.last_stable,
            Isolation::ReadUncommitted => read.snapshot.high_watermark,
        };
        read.payload.len() >= min_bytes || (!read.payload.is_empty() && read.end < readable)
    };
    while !full(&read) && !ctx.is_stopping() {
        // Parked, the fetch holds nothing: what it read is read again when it wakes.
        let seen = read.snapshot.high_watermark.max(req.offset);
        read.payload = Bytes::new();
        drop(hold);
        let waited = tokio::select! {
            moved = log.wait_beyond(seen, deadline) => moved,
            _ = ctx.stopped() => false,
        };
        hold = budget::reserve(max_bytes).await;
        read = log
            .read_async_with(req.offset, max_bytes, isolation)
            .await?;
        hold.shrink_to(read.payload.len());
        if !waited {
            break;
        }
    }
    let read_len = read.payload.len();
    let payload = match req.processor {
        Some(spec) if !read.payload.is_empty() => {
            ctx.plugins
                .process(
                    &req.topic,
                    req.partition,
                    &spec,
                    req.offset,
                    &read.payload,
                    ctx.config.limits.max_frame_bytes as usize,
                )
                .await?
        }
        Some(spec) => {
            ctx.plugins.touch(&req.topic, req.partition, &spec);
            read.payload
        }
        None => read.payload,
    };
    let hold = budget::regrow(hold, read_len, payload.len()).await;
    let counters = ctx.metrics.topic(&req.topic);
    counters
        .bytes_out
        .fetch_add(payload.len() as u64, Ordering::Relaxed);
    counters
        .batches_out
        .fetch_add(read.batches as u64, Ordering::Relaxed);
    let s = read.snapshot;
    let reply = Reply::new(
        &FetchResponse {
            high_watermark: s.high_watermark,
            log_start_offset: s.log_start,
            log_end_offset: s.log_end,
            last_stable_offset: s.last_stable,
            aborted: read.aborted,
        },
        payload,
    );
    Ok(Reply { hold, ..reply })
}
