//! Subscribe: push batches from an offset as they become readable, on the request's own
//! stream, until the client stops reading or the broker stops. `write_all` waits while the
//! client's receive window is full, which is the backpressure.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use quinn::SendStream;
use quiver_protocol::requests::{SubscribeChunk, SubscribeRequest};
use quiver_protocol::{encode_control, response_prefix, ApiKey};

use super::{decode, RequestError};
use crate::server::{budget, ServerContext};

/// How often an idle subscription on a cluster broker checks that it still leads.
const LEAD_RECHECK: Duration = Duration::from_secs(1);

/// Runs a subscription; returns when the client goes away or the broker stops.
pub async fn handle(
    ctx: &ServerContext,
    body: Bytes,
    send: &mut SendStream,
) -> Result<(), RequestError> {
    let (req, _) = decode::<SubscribeRequest>(&body)?;
    let (_, log) = ctx.partition(&req.topic, req.partition)?;
    if let Some(rm) = ctx.replicas() {
        // Only the leader serves clients (a follower's copy may lag or be dropped).
        rm.leader(&req.topic, req.partition)?;
    }
    let max_bytes = (req.max_bytes as usize).clamp(1, ctx.config.limits.max_frame_bytes as usize);
    // Check the start offset before the first frame, so a bad offset is a plain error.
    log.read_async(req.offset, 1).await?;
    let counters = ctx.metrics.topic(&req.topic);
    let mut offset = req.offset;
    let mut hw_rx = log.watch_high_watermark();
    loop {
        // A broker that lost the lead stops pushing: the client looks the leader up again.
        let led = match ctx.replicas() {
            Some(rm) => rm
                .leader(&req.topic, req.partition)
                .map(|_| ())
                .map_err(RequestError::from),
            None => Ok(()),
        };
        // Room in the connection's budget for this chunk, held until it is written.
        let mut hold = budget::reserve(max_bytes).await;
        let read = match led {
            Ok(()) => log
                .read_async(offset, max_bytes)
                .await
                .map_err(RequestError::from),
            Err(e) => Err(e),
        };
        if let Ok(r) = &read {
            hold.shrink_to(r.payload.len());
        }
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                // Mid-stream errors (retention passed us, topic deleted, the lead moved)
                // end the push with a frame.
                let frame =
                    quiver_protocol::encode_error(ApiKey::Subscribe as u16, e.code, &e.message)
                        .encode();
                let _ = send.write_all(&frame).await;
                let _ = send.finish();
                return Ok(());
            }
        };
        if read.batches > 0 {
            let last = quiver_protocol::batch::split_batches(&read.payload, usize::MAX)
                .ok()
                .and_then(|b| b.last().cloned())
                .and_then(|b| quiver_protocol::batch::BatchHeader::parse(&b).ok());
            let payload = match &req.processor {
                Some(spec) => {
                    let processed = ctx
                        .plugins
                        .process(
                            &req.topic,
                            req.partition,
                            spec,
                            offset,
                            &read.payload,
                            ctx.config.limits.max_frame_bytes as usize,
                        )
                        .await
                        .map_err(RequestError::from);
                    match processed {
                        Ok(p) => p,
                        Err(e) => {
                            // A failing processor ends this subscription only.
                            let frame = quiver_protocol::encode_error(
                                ApiKey::Subscribe as u16,
                                e.code,
                                &e.message,
                            )
                            .encode();
                            let _ = send.write_all(&frame).await;
                            let _ = send.finish();
                            return Ok(());
                        }
                    }
                }
                None => read.payload.clone(),
            };
            hold = budget::regrow(hold, read.payload.len(), payload.len()).await;
            let chunk = SubscribeChunk {
                high_watermark: read.snapshot.high_watermark,
                log_start_offset: read.snapshot.log_start,
            };
            let prefix = response_prefix(
                ApiKey::Subscribe as u16,
                &encode_control(&chunk),
                payload.len(),
            );
            counters
                .bytes_out
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
            counters
                .batches_out
                .fetch_add(read.batches as u64, Ordering::Relaxed);
            let mut chunks = [prefix, payload];
            let write_timeout = Duration::from_millis(ctx.config.limits.response_write_timeout_ms);
            let written = tokio::select! {
                w = crate::server::connection::write_within(send, &mut chunks, write_timeout) => w,
                _ = ctx.stopped() => return Ok(()),
            };
            drop(hold);
            if !written {
                return Ok(());
            }
            if let Some(h) = last {
                offset = h.next_offset();
            }
            continue;
        }
        let current = offset;
        // On a cluster, wake now and then to look at the lead again.
        let recheck = if ctx.replicas().is_some() {
            LEAD_RECHECK
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            r = hw_rx.wait_for(|h| *h > current) => if r.is_err() { return Ok(()) },
            _ = tokio::time::sleep(recheck) => {}
            _ = send.stopped() => return Ok(()),
            _ = ctx.stopped() => {
                let _ = send.finish();
                return Ok(());
            }
        }
    }
}
