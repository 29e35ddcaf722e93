//! `bench produce`: several producers push generated records through the bulk send path;
//! one record in every thousand is sent with an awaited offset to sample latency.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quiver_client::{Admin, Client, ClientError, Producer, ProducerConfig, ProducerRecord};

use super::report::{histogram, progress, Report};
use super::{Limit, LoadOpts};

/// Records queued per bulk call.
const CHUNK: u64 = 1000;

/// Creates the topic unless it exists.
pub async fn ensure_topic(client: &Client, topic: &str, partitions: u32) -> anyhow::Result<()> {
    match Admin::new(client.clone())
        .create_topic(topic, partitions, BTreeMap::new())
        .await
    {
        Ok(_) | Err(ClientError::TopicAlreadyExists(_)) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating bench topic {topic}")),
    }
}

/// Produces `o`'s load into `topic`; returns the report.
pub async fn produce_into(
    client: &Client,
    o: &LoadOpts,
    topic: &str,
    show_progress: bool,
) -> anyhow::Result<Report> {
    ensure_topic(client, topic, o.partitions).await?;
    let limit = o.limit();
    let pb = progress(
        match limit {
            Limit::Records(n) => Some(n),
            Limit::Time(_) => None,
        },
        "produce",
    );
    if !show_progress {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let claimed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(histogram()));
    let value: Arc<Vec<u8>> = Arc::new((0..o.record_size).map(|i| b'a' + (i % 26) as u8).collect());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.producers {
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
        let (claimed, latencies, value, topic, pb) = (
            claimed.clone(),
            latencies.clone(),
            value.clone(),
            topic.to_string(),
            pb.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut samplers = Vec::new();
            loop {
                let n = match limit {
                    Limit::Records(total) => {
                        let from = claimed.fetch_add(CHUNK, Ordering::Relaxed);
                        if from >= total {
                            break;
                        }
                        CHUNK.min(total - from)
                    }
                    Limit::Time(d) => {
                        if start.elapsed() >= d {
                            break;
                        }
                        claimed.fetch_add(CHUNK, Ordering::Relaxed);
                        CHUNK
                    }
                };
                producer
                    .send_values(
                        &topic,
                        None,
                        std::iter::repeat_n(&value[..], n as usize - 1),
                    )
                    .await?;
                let sent_at = Instant::now();
                let fut = producer
                    .send(ProducerRecord::new(topic.clone(), value.to_vec()))
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
            Ok::<_, ClientError>(stats)
        }));
    }
    let (mut acked, mut sent) = (0, 0);
    for t in tasks {
        let stats = t.await.context("producer task")??;
        if stats.records_failed > 0 {
            bail!(
                "{} records failed: {}",
                stats.records_failed,
                stats.last_error.map(|e| e.to_string()).unwrap_or_default()
            );
        }
        acked += stats.records_acked;
        sent += stats.records_sent;
    }
    let seconds = start.elapsed().as_secs_f64();
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
    Ok(Report::new(
        "produce",
        records,
        o.record_size,
        o.partitions,
        seconds,
        &lat,
    ))
}

/// `bench produce`.
pub async fn run(client: &Client, o: &LoadOpts) -> anyhow::Result<Report> {
    produce_into(client, o, &o.topic_name(), true).await
}
