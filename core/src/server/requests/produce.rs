//! Produce: validate the batches, append them to the partition in producer-sequence order,
//! wait for the durability the topic's flush policy promises, answer with the offsets.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::split_batches;
use quiver_protocol::requests::{Acks, ProduceRequest, ProduceResponse, VerifyTxnPartitionRequest};

use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::log::TxnGuard;
use crate::server::ServerContext;

/// Handles a produce request.
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, payload) = decode::<ProduceRequest>(&body)?;
    crate::topic::refuse_internal(&req.topic, "produce to")?;
    let span = tracing::debug_span!("produce", topic = %req.topic, partition = req.partition, bytes = payload.len());
    let _e = span.enter();
    let (topic, log) = ctx.partition(&req.topic, req.partition)?;
    // A cluster partition takes writes on its leader only, and acks=all ones only while
    // its ISR is large enough.
    let replicas = ctx.replicas();
    if let Some(rm) = replicas {
        rm.leader(&req.topic, req.partition)?;
        if req.acks == Acks::All {
            rm.check_enough_replicas(&req.topic, req.partition)?;
        }
    }
    let config = topic.config();
    let batches = split_batches(&payload, config.max_message_bytes as usize)?;
    let timeout = Duration::from_millis(u64::from(req.timeout_ms.clamp(100, 300_000)));
    drop(_e);
    // Every batch is checked against the records it holds before anything is stored (CRC,
    // record walk, decompression: CPU work, so on a blocking thread).
    let max_decompressed = ctx.config.limits.max_frame_bytes as usize;
    let cfg = config.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let now = crate::clock::now_ms();
        batches
            .into_iter()
            .map(|b| {
                cfg.check_produced(&b, now, max_decompressed)
                    .map(|h| (b, h))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| RequestError::new(ErrorCode::Internal, format!("produce task failed: {e}")))??;
    // A transaction's partitions are known to its coordinator before its batches land: a
    // lone broker registers them itself; in a cluster the producer added them
    // (AddPartitionsToTxn), and the coordinator confirms it before a producer's first
    // transactional batch here.
    // What each check saw: a batch whose transaction ended here meanwhile (the producer
    // aborted it after giving up on this request) is refused, not stored after the marker.
    let mut guards = Vec::new();
    let mut verified = Vec::new();
    for (_, h) in &checked {
        if !h.is_transactional() {
            continue;
        }
        if !guards
            .iter()
            .any(|g: &TxnGuard| g.producer_id() == h.producer_id)
        {
            guards.push(log.txn_guard(h.producer_id));
        }
        if let Some(txns) = ctx.groups.lone_txns() {
            txns.register_partition(h.producer_id, h.producer_epoch, &req.topic, req.partition)
                .await?;
        } else if let Some(rm) = replicas {
            let key = (h.producer_id, h.producer_epoch);
            if verified.contains(&key) || log.txn_open(h.producer_id, h.producer_epoch) {
                continue;
            }
            let check = VerifyTxnPartitionRequest {
                producer_id: h.producer_id,
                producer_epoch: h.producer_epoch,
                topic: req.topic.clone(),
                partition: req.partition,
            };
            crate::txn::verify::verify_in_cluster(rm, &ctx.groups, &check).await?;
            verified.push(key);
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let appended = log
        .append_guarded(checked, &guards, &config, &ctx.flusher, timeout)
        .await?;
    if let Some(rm) = replicas {
        rm.leader_flushed(&log, appended.last_offset + 1);
        if req.acks == Acks::All {
            rm.wait_committed(&log, appended.last_offset, deadline)
                .await?;
        }
    }
    let counters = ctx.metrics.topic(&req.topic);
    counters
        .records_in
        .fetch_add(appended.records, Ordering::Relaxed);
    counters
        .bytes_in
        .fetch_add(appended.bytes, Ordering::Relaxed);
    Ok(Reply::control(&ProduceResponse {
        base_offset: appended.base_offset,
        last_offset: appended.last_offset,
        append_time_ms: -1,
    }))
}
