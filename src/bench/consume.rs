//! `bench consume`: reads a topic from the beginning with push or long-poll fetches,
//! producing the records first when the topic holds fewer than asked for.
//!
//! Its latency figures are the gaps between successive non-empty `poll`s while the
//! consumer reads a backlog that is already stored: how long the application waits for its
//! next chunk of records (one fetch response or pushed chunk, or several decoded together).
//! They are not end-to-end (produce-to-consume) latency, which this bench does not measure.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quiver_client::{Client, ConsumeMode, Consumer, ConsumerConfig, SeekTo};

use super::produce::produce_into;
use super::report::{histogram, progress, Report};
use super::{FetchMode, Limit, LoadOpts};

/// Makes sure `topic` holds at least the records the run will read.
pub(super) async fn prepare(client: &Client, o: &LoadOpts, topic: &str) -> anyhow::Result<u64> {
    let probe = Consumer::new(client.clone(), ConsumerConfig::default());
    let have: u64 = match probe.end_offsets(topic).await {
        Ok(ends) => ends.values().map(|e| *e as u64).sum(),
        Err(_) => 0,
    };
    let want = match o.limit() {
        Limit::Records(n) => n,
        Limit::Time(_) => o.records,
    };
    if have < want {
        eprintln!(
            "producing {} records into {topic} to read back",
            want - have
        );
        let mut fill = o.clone();
        fill.records = want - have;
        fill.duration = None;
        produce_into(client, &fill, topic, true).await?;
    }
    Ok(want)
}

/// Reads `topic` from the beginning; returns the report.
pub async fn consume_from(
    client: &Client,
    o: &LoadOpts,
    topic: &str,
    show_progress: bool,
) -> anyhow::Result<Report> {
    let want = prepare(client, o, topic).await?;
    let processor = processor_spec(client, o).await?;
    let mut consumer = Consumer::new(
        client.clone(),
        ConsumerConfig {
            mode: match o.mode {
                FetchMode::Subscribe => ConsumeMode::Subscribe,
                FetchMode::LongPoll => ConsumeMode::LongPoll,
            },
            start: SeekTo::Beginning,
            max_bytes: 4 * 1024 * 1024,
            buffer_chunks: 32,
            processor,
            ..ConsumerConfig::default()
        },
    );
    consumer
        .assign_all(topic)
        .await
        .context("assigning the bench topic")?;
    let pb = progress(Some(want), "consume");
    if !show_progress {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut lat = histogram();
    let (mut records, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    let time_limit = match o.limit() {
        Limit::Time(d) => Some(d),
        Limit::Records(_) => None,
    };
    let mut last = Instant::now();
    while records < want {
        if time_limit.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let got = consumer.poll_timeout(Duration::from_secs(10)).await?;
        if got.is_empty() {
            bail!("no records for 10 s after {records} of {want}");
        }
        let now = Instant::now();
        // The first poll includes connecting and the first fetch: not a steady-state sample.
        if records > 0 {
            let _ = lat.record((now - last).as_micros().max(1) as u64);
        }
        last = now;
        records += got.len() as u64;
        bytes += got.iter().map(|r| r.value.len() as u64).sum::<u64>();
        pb.inc(got.len() as u64);
    }
    let seconds = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let record_size = bytes
        .checked_div(records)
        .map_or(o.record_size, |s| s as usize);
    Ok(Report::new(
        "consume",
        records,
        record_size,
        o.partitions,
        seconds,
        &lat,
    )
    .measuring(
        "gap between successive non-empty polls while reading a backlog (not produce-to-consume latency)",
    ))
}

/// The `--processor` spec: a bundle path is deployed first (a no-op when it already is).
async fn processor_spec(
    client: &Client,
    o: &LoadOpts,
) -> anyhow::Result<Option<quiver_client::ProcessorSpec>> {
    let Some(p) = &o.processor else {
        return Ok(None);
    };
    if std::path::Path::new(p).exists() {
        let d = quiver_client::PluginAdmin::new(client.clone())
            .deploy_path(p)
            .await
            .with_context(|| format!("cannot deploy {p}"))?;
        return Ok(Some(quiver_client::ProcessorSpec {
            name: d.plugin.name,
            version: Some(d.plugin.version),
            config: Default::default(),
        }));
    }
    Ok(Some(
        quiver_client::ProcessorSpec::parse(p).map_err(|e| anyhow::anyhow!("--processor: {e}"))?,
    ))
}

/// `bench consume`.
pub async fn run(client: &Client, o: &LoadOpts) -> anyhow::Result<Report> {
    consume_from(client, o, &o.topic_name(), true).await
}
