//! Produce: validate the batches, append them to the partition in producer-sequence order,
//! wait for the durability the topic's flush policy promises, answer with the offsets.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::{
    self, sequence_after, split_batches, BatchHeader, ATTR_LOG_APPEND_TIME,
};
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
    let deadline = tokio::time::Instant::now() + timeout;
    // The batches are checked one after another: the largest decompression is this
    // request's share of the broker's decompression memory, held until the checks end.
    let inflated = batches
        .iter()
        .map(|b| batch::decompression_bound(b, max_decompressed))
        .max()
        .unwrap_or(0);
    let reserved = ctx.reserve_decompression(inflated, deadline).await?;
    let cfg = config.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let _reserved = reserved;
        let now = crate::clock::now_ms();
        batches
            .into_iter()
            .map(|b| {
                let h = cfg.check_produced(&b, now, max_decompressed)?;
                Ok(stamp_log_append_time(b, h, now))
            })
            .collect::<Result<Vec<_>, quiver_protocol::ProtocolError>>()
    })
    .await
    .map_err(|e| RequestError::new(ErrorCode::Internal, format!("produce task failed: {e}")))??;
    check_producers(&checked)?;
    // Kafka answers the time it stamped on log-append-time batches.
    let append_time_ms = checked
        .iter()
        .find(|(_, h)| h.attributes & ATTR_LOG_APPEND_TIME != 0)
        .map_or(-1, |(_, h)| h.max_timestamp);
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
                include_ending: false,
            };
            crate::txn::verify::verify_in_cluster(rm, &ctx.groups, &check).await?;
            verified.push(key);
        }
    }
    let appended = log
        .append_guarded(checked, &guards, &config, &ctx.flusher, timeout)
        .await?;
    if let Some(rm) = replicas {
        rm.leader_flushed(&log, appended.last_offset + 1);
        if req.acks == Acks::All {
            rm.wait_committed_under(
                &log,
                appended.last_offset,
                Some(appended.leader_epoch as u64),
                deadline,
            )
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
        append_time_ms,
    }))
}

/// A batch asking for log-append time gets the broker's clock as its timestamp (every
/// record of it reads that time back), whatever its `max_timestamp` said: a client cannot
/// pin a far-future time this way, past the topic's timestamp limits and retention.
fn stamp_log_append_time(raw: Bytes, mut h: BatchHeader, now_ms: i64) -> (Bytes, BatchHeader) {
    if h.attributes & ATTR_LOG_APPEND_TIME == 0 {
        return (raw, h);
    }
    let mut stamped = raw.to_vec();
    batch::set_log_append_time(&mut stamped, now_ms);
    h.max_timestamp = now_ms;
    (Bytes::from(stamped), h)
}

/// Refuses what a client may not write, before anything is stored:
/// - a non-transactional batch under a producer id a transaction coordinator handed out
///   (it would move that producer's epoch here, and fence its transaction's markers);
/// - batches of more than one producer (id, epoch, transactional or not) in one request, or
///   of one producer out of sequence: the batches after the first are then sure to pass
///   the checks the first passed, so a request is stored whole or not at all.
fn check_producers(checked: &[(Bytes, BatchHeader)]) -> Result<(), RequestError> {
    for (_, h) in checked {
        if !h.is_transactional() && crate::txn::coordinator_partition_of(h.producer_id).is_some() {
            return Err(RequestError::new(
                ErrorCode::InvalidTxnState,
                format!(
                    "producer id {} belongs to a transactional producer (ids with bit 62 set are handed out by transaction coordinators), so its batches must be transactional; an idempotent producer picks an id below 2^62 (an older Quiver SDK may not: upgrade it)",
                    h.producer_id
                ),
            ));
        }
    }
    for pair in checked.windows(2) {
        let (a, b) = (&pair[0].1, &pair[1].1);
        if (a.producer_id, a.producer_epoch, a.is_transactional())
            != (b.producer_id, b.producer_epoch, b.is_transactional())
        {
            return Err(RequestError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "one produce request carries batches of one producer: producer {} epoch {} then producer {} epoch {}; send them in separate requests",
                    a.producer_id, a.producer_epoch, b.producer_id, b.producer_epoch
                ),
            ));
        }
        let expected = if a.base_sequence < 0 {
            -1
        } else {
            sequence_after(a.base_sequence, a.record_count)
        };
        if b.base_sequence != expected && (a.base_sequence >= 0 || b.base_sequence >= 0) {
            return Err(RequestError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the batches of one produce request follow each other in sequence: after sequence {} with {} records comes {expected}, not {}",
                    a.base_sequence, a.record_count, b.base_sequence
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::{BatchBuilder, Compression, COORDINATOR_PRODUCER_ID_BIT};

    fn batch(n: usize, producer: (i64, i16, i32), transactional: bool) -> (Bytes, BatchHeader) {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..n {
            b.push(None, format!("v{i}").as_bytes(), 1_000 + i as i64, &[]);
        }
        b.set_producer(producer.0, producer.1, producer.2);
        b.set_transactional(transactional);
        let raw = b.build();
        let h = batch::validate(&raw, 1 << 20).unwrap();
        (raw, h)
    }

    fn code(r: Result<(), RequestError>) -> Option<ErrorCode> {
        r.err().map(|e| e.code)
    }

    /// A coordinator's producer id in a non-transactional batch is refused: it would have
    /// raised that producer's epoch here and fenced its transaction's markers for good.
    #[test]
    fn a_coordinators_producer_id_writes_only_transactionally() {
        let txn_id = COORDINATOR_PRODUCER_ID_BIT | 7;
        let forged = batch(1, (txn_id, i16::MAX, -1), false);
        assert_eq!(
            code(check_producers(&[forged])),
            Some(ErrorCode::InvalidTxnState)
        );
        let sequenced = batch(1, (txn_id, 3, 0), false);
        assert_eq!(
            code(check_producers(&[sequenced])),
            Some(ErrorCode::InvalidTxnState)
        );
        assert_eq!(
            code(check_producers(&[batch(1, (txn_id, 3, 0), true)])),
            None
        );
        assert_eq!(code(check_producers(&[batch(1, (42, 3, 0), false)])), None);
        assert_eq!(
            code(check_producers(&[batch(1, (-1, -1, -1), false)])),
            None
        );
    }

    /// Batches of one request come from one producer, in sequence; anything else is refused
    /// whole (before, a later batch failing its check left the earlier ones stored).
    #[test]
    fn one_request_holds_one_producers_batches_in_sequence() {
        let ok = [batch(3, (5, 1, 0), false), batch(2, (5, 1, 3), false)];
        assert_eq!(code(check_producers(&ok)), None);
        let unsequenced = [batch(3, (-1, -1, -1), false), batch(2, (-1, -1, -1), false)];
        assert_eq!(code(check_producers(&unsequenced)), None);
        let wrap = [
            batch(2, (5, 1, i32::MAX - 1), false),
            batch(1, (5, 1, 0), false),
        ];
        assert_eq!(code(check_producers(&wrap)), None);
        for bad in [
            [batch(1, (-1, -1, -1), false), batch(1, (5, 0, 0), false)],
            [batch(1, (5, 1, 0), false), batch(1, (5, 0, 1), false)],
            [batch(1, (5, 1, 0), false), batch(1, (6, 1, 1), false)],
            [batch(3, (5, 1, 0), false), batch(1, (5, 1, 4), false)],
            [batch(3, (5, 1, 0), false), batch(1, (5, 1, -1), false)],
            [batch(3, (5, 1, -1), false), batch(1, (5, 1, 0), false)],
        ] {
            assert_eq!(code(check_producers(&bad)), Some(ErrorCode::InvalidRequest));
        }
    }

    /// A log-append-time batch carries the broker's time once stored, not the one it was
    /// sent with (which only had to be below year 10000).
    #[test]
    fn a_log_append_time_batch_is_stamped_with_the_brokers_clock() {
        let mut raw = batch(2, (-1, -1, -1), false).0.to_vec();
        batch::set_log_append_time(&mut raw, quiver_protocol::batch::MAX_TIMESTAMP_MS);
        let h = batch::validate(&raw, 1 << 20).unwrap();
        let (stamped, sh) = stamp_log_append_time(Bytes::from(raw), h, 5_000);
        assert_eq!(sh.max_timestamp, 5_000);
        let reread = batch::validate(&stamped, 1 << 20).unwrap();
        assert_eq!(reread.max_timestamp, 5_000, "stored bytes, CRC and all");
        let plain = batch(2, (-1, -1, -1), false);
        let (same, h) = stamp_log_append_time(plain.0.clone(), plain.1, 5_000);
        assert_eq!((same, h.max_timestamp), (plain.0, 1_001));
    }
}
