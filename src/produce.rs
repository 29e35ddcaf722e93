//! `quiver produce TOPIC`: one record per input line (stdin or `--file`), sent through the
//! SDK's [`Producer`] without a per-record future; a progress bar for files and a summary
//! on stderr. A reader thread hands the async side big blocks of whole lines, so the hot
//! loop neither allocates nor blocks per line.

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_client::{Acks, ClientError, Compression, Producer, ProducerConfig, RecordRef};

use crate::connect::{parse_pairs, GlobalOpts};

/// `quiver produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to write to.
    topic: String,
    /// Read lines from this file instead of stdin.
    #[arg(long, value_name = "F")]
    file: Option<PathBuf>,
    /// Split each line at the first SEP into key and value (lines without it are keyless).
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Write every record to this partition.
    #[arg(long, value_name = "N")]
    partition: Option<u32>,
    /// Acknowledgements: 0, 1 or all.
    #[arg(long, default_value = "1", value_parser = parse_acks)]
    acks: Acks,
    /// Batch compression: none, lz4 or zstd.
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    compression: Compression,
    /// A partition's batch is sent once it holds this many bytes (keyless records then move
    /// on to the next partition, so smaller batches spread a short input more evenly).
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u32).range(1024..=67_108_864))]
    batch_size: u32,
    /// How long a partition's batch waits for more records before it is sent (ms).
    #[arg(long, value_name = "MS", default_value_t = 5)]
    linger_ms: u64,
    /// Header added to every record, key=value (repeatable).
    #[arg(long = "header", value_name = "K=V")]
    headers: Vec<String>,
    /// How long a record may take to be acknowledged, retries included, before the
    /// command fails (Kafka's `delivery.timeout.ms`).
    #[arg(long, value_name = "MS", default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1..))]
    delivery_timeout_ms: u64,
    /// The summary: a line on stderr (table), or one JSON object on stdout (json:
    /// {"topic", "records", "failed", "bytes", "seconds", "records_per_sec"}).
    #[arg(long, value_enum, default_value_t = crate::output::Format::Table)]
    output: crate::output::Format,
}

fn parse_acks(s: &str) -> Result<Acks, String> {
    Acks::parse(s)
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    Compression::parse(s)
}

/// Bytes read from the input per block handed to the producer.
const BLOCK: usize = 256 * 1024;

/// Reads `input` and sends blocks that end at a line boundary (the last may not).
fn read_blocks(
    mut input: Box<dyn Read + Send>,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut buf = BytesMut::with_capacity(2 * BLOCK);
    loop {
        if buf.capacity() - buf.len() < BLOCK {
            buf.reserve(BLOCK);
        }
        let start = buf.len();
        let spare = buf.capacity() - start;
        buf.resize(start + spare, 0);
        // (Zero-filling the spare room once per read is cheap next to the read itself.)
        let n = match input.read(&mut buf[start..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                buf.truncate(start);
                continue;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        buf.truncate(start + n);
        if n == 0 {
            if !buf.is_empty() {
                let _ = tx.blocking_send(Ok(buf.split().freeze()));
            }
            return;
        }
        // Hand over whole lines; keep the partial last line for the next read.
        if let Some(last_nl) = buf[start..].iter().rposition(|b| *b == b'\n') {
            let block = buf.split_to(start + last_nl + 1).freeze();
            if tx.blocking_send(Ok(block)).is_err() {
                return;
            }
        }
    }
}

/// Runs `quiver produce`.
pub async fn run(global: &GlobalOpts, args: ProduceArgs) -> anyhow::Result<()> {
    quiver_protocol::requests::validate_topic_name(&args.topic).map_err(|e| anyhow::anyhow!(e))?;
    if matches!(&args.key_separator, Some(s) if s.is_empty()) {
        bail!("--key-separator cannot be empty");
    }
    let headers = parse_pairs(&args.headers, "--header")?;
    let header_refs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .collect();

    let (input, progress): (Box<dyn Read + Send>, Option<ProgressBar>) = match &args.file {
        Some(path) => {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let bar = ProgressBar::new(len);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            (Box::new(BufReader::with_capacity(BLOCK, f)), Some(bar))
        }
        None => (Box::new(std::io::stdin()), None),
    };

    let client = global.connect().await?;
    // Fail early, with advice, when the topic does not exist.
    let partitions = client
        .partition_count(&args.topic)
        .await
        .map_err(|e| match e {
            ClientError::TopicNotFound(_) => anyhow::anyhow!(
                "topic {:?} does not exist; create it with `quiver topic create {}`",
                args.topic,
                args.topic
            ),
            e => anyhow::Error::new(e).context(format!("cannot look up topic {:?}", args.topic)),
        })?;
    if let Some(p) = args.partition {
        if p >= partitions {
            bail!(
                "topic {} has {partitions} partition(s); --partition {p} does not exist",
                args.topic
            );
        }
    }
    let producer = Producer::new(
        client,
        ProducerConfig {
            acks: args.acks,
            compression: args.compression,
            batch_size_bytes: args.batch_size as usize,
            linger: std::time::Duration::from_millis(args.linger_ms),
            delivery_timeout: std::time::Duration::from_millis(args.delivery_timeout_ms),
            ..ProducerConfig::default()
        },
    );

    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let reader = std::thread::spawn(move || read_blocks(input, tx));
    let started = Instant::now();
    let sep = args.key_separator.as_deref().map(str::as_bytes);
    let mut records: u64 = 0;
    let mut bytes: u64 = 0;
    let mut read_error = None;
    while let Some(block) = rx.recv().await {
        let block = match block {
            Ok(b) => b,
            Err(e) => {
                read_error = Some(e);
                break;
            }
        };
        // Every block but the last ends with a newline; it ends the last line, not a new one.
        let body = block.strip_suffix(b"\n").unwrap_or(&block);
        for line in body.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let (key, value) = match sep {
                Some(sep) => match find(line, sep) {
                    Some(i) => (Some(&line[..i]), &line[i + sep.len()..]),
                    None => (None, line),
                },
                None => (None, line),
            };
            producer
                .send_nowait(RecordRef {
                    topic: &args.topic,
                    partition: args.partition,
                    key,
                    value,
                    headers: &header_refs,
                    timestamp: None,
                })
                .await
                .context("cannot queue a record")?;
            records += 1;
            bytes += line.len() as u64;
        }
        if let Some(bar) = &progress {
            bar.inc(block.len() as u64);
        }
    }
    let _ = reader.join();
    let flushed = producer.flush().await;
    let _ = producer.close().await;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let stats = producer.stats();
    let elapsed = started.elapsed().as_secs_f64();
    let produced = records - stats.records_failed.min(records);
    let rate = records as f64 / elapsed.max(1e-9);
    match args.output {
        crate::output::Format::Json => {
            let mut out = std::io::stdout().lock();
            crate::output::json(
                &mut out,
                &serde_json::json!({
                    "topic": args.topic, "records": produced, "failed": stats.records_failed,
                    "bytes": bytes, "seconds": elapsed, "records_per_sec": rate,
                }),
            )?;
        }
        crate::output::Format::Table => eprintln!(
            "produced {produced} records ({:.1} MiB) in {elapsed:.2}s: {rate:.0} records/s, {} failed",
            bytes as f64 / (1024.0 * 1024.0),
            stats.records_failed,
        ),
    }
    if let Some(e) = read_error {
        return Err(anyhow::Error::new(e).context("cannot read the input"));
    }
    if stats.records_failed > 0 {
        let last = flushed.err().or(stats.last_error);
        bail!(
            "{} record(s) failed{}",
            stats.records_failed,
            last.map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() == 1 {
        return hay.iter().position(|b| *b == needle[0]);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_separators() {
        assert_eq!(find(b"k:v", b":"), Some(1));
        assert_eq!(find(b"key::value", b"::"), Some(3));
        assert_eq!(find(b"novalue", b":"), None);
    }
}
