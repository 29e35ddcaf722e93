//! `bench produce`: several producers push generated records.
//!
//! - Saturated (default): each producer queues records through the bulk send path as fast
//!   as the producer buffer takes them; one record in every thousand is sent with an awaited
//!   offset, and its latency runs from that `send` call to its acknowledgement. At
//!   saturation this is mostly time spent queued behind earlier records.
//! - Fixed rate (`--rate N`): each of the P producers follows a schedule of N/P records/s:
//!   record `i` is due at `start + i / (N/P)`. The producer sleeps until records are due
//!   (the timer ticks about every millisecond) and then hands over every record due by
//!   now. Latency runs from a record's *scheduled* time to its acknowledgement, so time a
//!   record spent waiting because the producer was behind (a full buffer, a slow broker)
//!   counts: no coordinated omission. Latency is sampled on a schedule (every k-th record,
//!   at most ~10,000 samples/s per producer), never on how fast the system answers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use quiver_client::{
    Admin, Client, ClientError, DeliveryFuture, Producer, ProducerConfig, ProducerRecord,
    ProducerStats, RecordRef,
};

use super::payload::Payloads;
use super::report::{histogram, progress, Report};
use super::{Limit, LoadOpts};

/// Records queued per bulk call.
const CHUNK: u64 = 1000;

/// Latency samples per second per producer, at most, in a paced run.
const PACED_SAMPLES_PER_SEC: f64 = 10_000.0;

/// A paced run "kept up" when it achieved at least this share of the target rate.
const KEPT_UP_SHARE: f64 = 0.98;

/// Creates the topic with `replication_factor` replicas per partition unless it exists.
pub async fn ensure_topic(
    client: &Client,
    topic: &str,
    partitions: u32,
    replication_factor: u16,
) -> anyhow::Result<()> {
    match Admin::new(client.clone())
        .create_replicated_topic(topic, partitions, replication_factor, BTreeMap::new())
        .await
    {
        Ok(_) | Err(ClientError::TopicAlreadyExists(_)) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating bench topic {topic}")),
    }
}

/// What one producer task reports.
struct TaskResult {
    stats: ProducerStats,
    /// Paced runs: the largest lag behind the schedule.
    max_lag: Duration,
}

/// The pacing of one producer: records at `rate` per second from `start`, `total` of them.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    rate: f64,
    total: u64,
}

impl Schedule {
    /// When record `i` is due.
    fn due_at(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// How many records are due at `now` (records `0..n`), at most `total`.
    fn due_by(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        ((elapsed * self.rate).floor() as u64 + 1).min(self.total)
    }
}

/// Splits `total` records between `n` producers (the first ones take the remainder).
fn share(total: u64, n: usize, index: usize) -> u64 {
    let n = n as u64;
    total / n + u64::from((index as u64) < total % n)
}

/// Produces `o`'s load into `topic`; returns the report.
pub async fn produce_into(
    client: &Client,
    o: &LoadOpts,
    topic: &str,
    show_progress: bool,
) -> anyhow::Result<Report> {
    ensure_topic(client, topic, o.partitions, o.replication_factor).await?;
    let limit = o.limit();
    let paced_total = o.rate.map(|rate| match limit {
        Limit::Records(n) => n,
        Limit::Time(d) => (d.as_secs_f64() * rate).ceil().max(1.0) as u64,
    });
    let pb = progress(
        match (paced_total, limit) {
            (Some(n), _) | (None, Limit::Records(n)) => Some(n),
            (None, Limit::Time(_)) => None,
        },
        "produce",
    );
    if !show_progress {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let claimed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(histogram()));
    let values = Payloads::new(o.payload, o.record_size);
    // Paced runs start their schedules a little ahead, so producer set-up is not counted
    // as lag of the first records.
    let start = Instant::now() + Duration::from_millis(if o.rate.is_some() { 20 } else { 0 });
    let mut tasks = Vec::new();
    for index in 0..o.producers {
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks: o.acks,
                linger: Duration::from_millis(o.linger_ms),
                batch_size_bytes: o.batch_size,
                compression: o.compression,
                // Enough to keep every partition's pipeline full, not so much that
                // records wait in the buffer for long (which is what latency would show).
                buffer_memory_bytes: (o.batch_size * 6 * o.partitions as usize).max(8 << 20),
                ..ProducerConfig::default()
            },
        );
        let (latencies, values, topic, pb) = (
            latencies.clone(),
            values.clone(),
            topic.to_string(),
            pb.clone(),
        );
        match (o.rate, paced_total) {
            (Some(rate), Some(total)) => {
                let schedule = Schedule {
                    start,
                    rate: rate / o.producers as f64,
                    total: share(total, o.producers, index),
                };
                tasks.push(tokio::spawn(paced(
                    producer, topic, values, schedule, latencies, pb,
                )));
            }
            _ => {
                let claimed = claimed.clone();
                tasks.push(tokio::spawn(saturated(
                    producer, topic, values, limit, start, claimed, latencies, pb,
                )));
            }
        }
    }
    let (mut acked, mut sent, mut max_lag) = (0, 0, Duration::ZERO);
    for t in tasks {
        let r = t.await.context("producer task")??;
        if r.stats.records_failed > 0 {
            bail!(
                "{} records failed: {}",
                r.stats.records_failed,
                r.stats
                    .last_error
                    .map(|e| e.to_string())
                    .unwrap_or_default()
            );
        }
        acked += r.stats.records_acked;
        sent += r.stats.records_sent;
        max_lag = max_lag.max(r.max_lag);
    }
    let seconds = Instant::now()
        .saturating_duration_since(start)
        .as_secs_f64();
    pb.finish_and_clear();
    let lat = latencies
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    // With acks=0 nothing is acknowledged: count what was handed to the broker.
    let records = if o.acks == quiver_client::Acks::None {
        sent
    } else {
        acked
    };
    let report = Report::new(
        "produce",
        records,
        o.record_size,
        o.partitions,
        seconds,
        &lat,
    );
    Ok(match o.rate {
        None => report.measuring(
            "send call to acknowledgement of 1 record in 1000, at saturation (mostly queueing)",
        ),
        Some(rate) => {
            let mut r = report.measuring(
                "scheduled send time to acknowledgement, at the fixed rate (includes any lag behind the schedule)",
            );
            r.kind = "produce (fixed rate)".into();
            r.target_records_per_sec = Some(rate);
            r.kept_up = Some(r.records_per_sec >= rate * KEPT_UP_SHARE);
            r.max_schedule_lag_ms = Some(max_lag.as_secs_f64() * 1000.0);
            r
        }
    })
}

/// One producer as fast as it goes: bulk chunks, one awaited record per chunk.
#[allow(clippy::too_many_arguments)]
async fn saturated(
    producer: Producer,
    topic: String,
    values: Payloads,
    limit: Limit,
    start: Instant,
    claimed: Arc<AtomicU64>,
    latencies: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    pb: indicatif::ProgressBar,
) -> Result<TaskResult, ClientError> {
    let mut samplers = Vec::new();
    loop {
        let (from, n) = match limit {
            Limit::Records(total) => {
                let from = claimed.fetch_add(CHUNK, Ordering::Relaxed);
                if from >= total {
                    break;
                }
                (from, CHUNK.min(total - from))
            }
            Limit::Time(d) => {
                if start.elapsed() >= d {
                    break;
                }
                (claimed.fetch_add(CHUNK, Ordering::Relaxed), CHUNK)
            }
        };
        let last = from + n - 1;
        producer
            .send_values(&topic, None, (from..last).map(|i| values.nth(i)))
            .await?;
        let sent_at = Instant::now();
        let fut = producer
            .send(ProducerRecord::new(topic.clone(), values.nth_bytes(last)))
            .await?;
        let latencies = latencies.clone();
        samplers.push(tokio::spawn(async move {
            if fut.await.is_ok() {
                let us = sent_at.elapsed().as_micros() as u64;
                let _ = latencies.lock().map(|mut h| h.record(us.max(1)));
            }
        }));
        pb.inc(n);
    }
    producer.flush().await?;
    for s in samplers {
        let _ = s.await;
    }
    let stats = producer.stats();
    producer.close().await?;
    Ok(TaskResult {
        stats,
        max_lag: Duration::ZERO,
    })
}

/// One producer on a schedule; sampled latencies run from each record's scheduled time.
async fn paced(
    producer: Producer,
    topic: String,
    values: Payloads,
    schedule: Schedule,
    latencies: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    pb: indicatif::ProgressBar,
) -> Result<TaskResult, ClientError> {
    let sample_every = (schedule.rate / PACED_SAMPLES_PER_SEC).ceil().max(1.0) as u64;
    // Acknowledgements are awaited by a collector as they come (not in send order, which
    // would charge a fast record for a slow one before it).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, DeliveryFuture)>();
    let collector = tokio::spawn(async move {
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                next = rx.recv(), if open => match next {
                    Some((due, fut)) => pending.push(async move { (due, fut.await) }),
                    None => open = false,
                },
                Some((due, r)) = pending.next(), if !pending.is_empty() => {
                    if r.is_ok() {
                        let us = Instant::now().saturating_duration_since(due).as_micros() as u64;
                        let _ = latencies.lock().map(|mut h| h.record(us.max(1)));
                    }
                }
                else => break,
            }
        }
    });
    let mut i: u64 = 0;
    let mut max_lag = Duration::ZERO;
    while i < schedule.total {
        let next = schedule.due_at(i);
        let now = Instant::now();
        if next > now {
            tokio::time::sleep_until(next.into()).await;
            continue;
        }
        max_lag = max_lag.max(now - next);
        let due = schedule.due_by(now).max(i + 1);
        let from = i;
        while i < due {
            if i.is_multiple_of(sample_every) {
                let fut = producer
                    .send(ProducerRecord::new(topic.clone(), values.nth_bytes(i)))
                    .await?;
                let _ = tx.send((schedule.due_at(i), fut));
            } else {
                producer
                    .send_nowait(RecordRef::new(&topic, values.nth(i)))
                    .await?;
            }
            i += 1;
        }
        pb.inc(i - from);
    }
    drop(tx);
    producer.flush().await?;
    let _ = collector.await;
    let stats = producer.stats();
    producer.close().await?;
    Ok(TaskResult { stats, max_lag })
}

/// `bench produce`.
pub async fn run(client: &Client, o: &LoadOpts) -> anyhow::Result<Report> {
    produce_into(client, o, &o.topic_name(), true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_spaces_records_evenly_and_counts_what_is_due() {
        let start = Instant::now();
        let s = Schedule {
            start,
            rate: 1000.0,
            total: 5000,
        };
        assert_eq!(s.due_at(0), start);
        assert_eq!(s.due_at(1000) - start, Duration::from_secs(1));
        assert_eq!(s.due_at(250) - start, Duration::from_millis(250));
        // Record 0 is due at the start; 1 ms later records 0 and 1.
        assert_eq!(s.due_by(start), 1);
        assert_eq!(s.due_by(start + Duration::from_micros(1500)), 2);
        assert_eq!(s.due_by(start + Duration::from_secs(2)), 2001);
        assert_eq!(
            s.due_by(start + Duration::from_secs(60)),
            5000,
            "capped at total"
        );
        // Before the start only the first counts as due (callers sleep until it is).
        if let Some(before) = start.checked_sub(Duration::from_millis(5)) {
            assert_eq!(s.due_by(before), 1);
        }
    }

    #[test]
    fn records_are_shared_between_producers_exactly() {
        for (total, n) in [(10u64, 3usize), (1_000_000, 7), (2, 5), (0, 2)] {
            let parts: Vec<u64> = (0..n).map(|i| share(total, n, i)).collect();
            assert_eq!(parts.iter().sum::<u64>(), total, "{total} over {n}");
            let (min, max) = (parts.iter().min().unwrap(), parts.iter().max().unwrap());
            assert!(max - min <= 1, "{parts:?}");
        }
    }
}
