//! `quiver bench`: produce and consume throughput and latency against a broker (or one
//! started in this process with `--embedded`), and `baseline`, which measures in the same
//! run the raw limits Quiver is built on (one QUIC stream over loopback; sled appends of the
//! same batch sizes) so every figure is reported as a ratio.

mod baseline;
mod consume;
mod embedded;
mod group;
mod payload;
mod pipeline;
mod produce;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use quiver_client::{Acks, Client, ClientConfig, Compression};

use crate::connect::GlobalOpts;
use payload::PayloadKind;

/// `quiver bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Produce generated records as fast as the broker acknowledges them, or at a fixed
    /// rate (`--rate`) to measure latency at that load.
    Produce(LoadOpts),
    /// Read records (produced first when the topic is short of them) as fast as possible.
    Consume(LoadOpts),
    /// Produce and consume on an embedded broker, then measure the raw limits with the same
    /// volume and concurrency (sled appends: the records produced, one writer per partition;
    /// QUIC: the bytes consumed, one stream per partition), and print Quiver's figures as
    /// ratios of the limits.
    Baseline(LoadOpts),
    /// Time N consumer-group members (`--members`) take to settle over `--partitions`, and
    /// the incremental rebalance when one more joins.
    Rebalance(LoadOpts),
    /// End-to-end records/s and latency of a pipeline (`--stage`, repeatable, a chain of
    /// deployed NAME[@VERSION] or bundle paths) run in this process, beside a pipeline with
    /// no stage and plain produce of the same records, in the same run. With `--rate` the
    /// input is produced at that pace, so the latencies are those of a fixed load.
    Pipeline(PipelineOpts),
}

/// `bench pipeline` arguments.
#[derive(Debug, Args, Clone)]
pub struct PipelineOpts {
    /// A stage of the measured chain: a deployed NAME[@VERSION] or a bundle path (repeat for
    /// a chain; e.g. --stage examples/plugins/noop-map).
    #[arg(long = "stage", value_name = "NAME[@VERSION]|PATH", required = true)]
    stages: Vec<String>,
    /// Produce all input before each pipeline starts and measure how fast it drains that
    /// backlog (its processing capacity, without the bench's producer writing beside it);
    /// the latencies then include the wait in the backlog.
    #[arg(long, conflicts_with = "rate")]
    backlog: bool,
    /// Measure the three (plain produce, no stage, the chain) this many times in a row on
    /// the same broker and report the median ratios: a machine whose speed swings from
    /// minute to minute moves each run's figures, less so their median. Each run starts
    /// its three one later in turn (run 1: produce, no stage, chain; run 2: no stage,
    /// chain, produce; run 3: chain, produce, no stage), so none is always measured on a
    /// younger store than the others.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    repeat: u32,
    /// With --embedded, run the pipelines as `quiver pipeline run` does: a client of the
    /// broker over QUIC. By default they run as `quiver pipeline deploy` runs them, inside
    /// the broker, reaching it in process. (Against an external broker, always over QUIC.)
    #[arg(long)]
    over_quic: bool,
    /// Skip the warm-up: by default, before anything is measured, the records are
    /// produced once into a topic of their own, unmeasured, so the first measurement is
    /// not the only one made on a store and a process that wrote nothing yet (on a virtual
    /// machine it may even write into memory the last process just freed, which costs less
    /// than memory the host has to map again).
    #[arg(long)]
    no_warmup: bool,
    /// `[sink] compression` of both measured pipelines: none, lz4 or zstd (`--compression`
    /// sets the bench producer's codec, for plain produce and the pipelines' input alike).
    #[arg(long, default_value = "none")]
    sink_compression: quiver_pipeline::SinkCompression,
    /// Keep the topics (and the pipelines' groups) each measurement made. By default each
    /// is deleted once measured: a bench against a real cluster leaves nothing behind, and
    /// every measurement writes into a store of the same size, as a broker under retention
    /// does, rather than one that only grows.
    #[arg(long)]
    keep_topics: bool,
    #[command(flatten)]
    load: LoadOpts,
}

/// How records are fetched in `bench consume`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum FetchMode {
    /// The broker pushes batches on one stream per partition.
    Subscribe,
    /// Pipelined long-poll fetches.
    LongPoll,
}

/// Output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    /// Human-readable lines (also accepted as `table`, the name other commands use).
    #[value(alias = "table")]
    Text,
    /// One JSON object.
    Json,
}

/// The load and where it runs.
#[derive(Debug, Args, Clone)]
pub struct LoadOpts {
    /// Start a broker inside this process (temporary data directory unless --data-dir).
    #[arg(long)]
    embedded: bool,
    /// Data directory of the embedded broker (and of the baseline's raw sled appends).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Topic to use [default: a new `bench-<time>` topic].
    #[arg(long)]
    topic: Option<String>,
    /// Bytes per record value.
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Records to send or read.
    #[arg(long, default_value_t = 1_000_000, conflicts_with = "duration")]
    records: u64,
    /// Run for this many seconds instead of a record count.
    #[arg(long)]
    duration: Option<f64>,
    /// Partitions of the bench topic.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Replicas of each partition of the bench topic (a cluster; with `--acks all`, every
    /// in-sync replica confirms each batch).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    replication_factor: u16,
    /// Concurrent producers.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// `bench produce` and `bench pipeline`: send at this many records/s in total (split
    /// evenly between the producers; Kafka's --throughput) instead of as fast as possible, so latency is
    /// measured at a fixed load. Latency then runs from each record's scheduled send time
    /// (not from when the producer got to it), so a producer that falls behind shows it.
    #[arg(long, value_name = "RECORDS_PER_SEC")]
    rate: Option<f64>,
    /// Largest producer batch in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    batch_size: usize,
    /// Acknowledgements: 0, 1 or all.
    #[arg(long, default_value = "1", value_parser = parse_acks)]
    acks: Acks,
    /// Batch compression: none, lz4 or zstd.
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    compression: Compression,
    /// Record values: `random` (each record a different window of random bytes, so
    /// compression is not flattered) or `repeated` (every record the same text).
    #[arg(long, value_enum, default_value_t = PayloadKind::Random)]
    payload: PayloadKind,
    /// Producer linger in milliseconds.
    #[arg(long, default_value_t = 2)]
    linger_ms: u64,
    /// Consume with push (subscribe) or long-poll fetches.
    #[arg(long, value_enum, default_value_t = FetchMode::LongPoll)]
    mode: FetchMode,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// `bench consume`: read as this consumer group (its offsets are reset to the start).
    #[arg(long, value_name = "G")]
    group: Option<String>,
    /// Group members (`bench consume --group`: default 1; `bench rebalance`: default 2, at
    /// least 2).
    #[arg(long)]
    members: Option<usize>,
    /// `bench consume`: run this processor at consume time: a deployed NAME[@VERSION], or
    /// a bundle path, deployed first. Records are counted as received, so use a processor
    /// that keeps every record (a map such as examples/plugins/noop-map).
    #[arg(long, value_name = "NAME[@VERSION]|PATH")]
    processor: Option<String>,
}

fn parse_acks(s: &str) -> Result<Acks, String> {
    Acks::parse(s)
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    Compression::parse(s)
}

impl LoadOpts {
    fn topic_name(&self) -> String {
        self.topic.clone().unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            format!("bench-{t}")
        })
    }

    fn limit(&self) -> Limit {
        match self.duration {
            Some(s) => Limit::Time(Duration::from_secs_f64(s.max(0.1))),
            None => Limit::Records(self.records.max(1)),
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.record_size == 0 || self.record_size > 16 * 1024 * 1024 {
            bail!("--record-size must be between 1 and 16777216 bytes");
        }
        if self.partitions == 0 || self.producers == 0 {
            bail!("--partitions and --producers must be at least 1");
        }
        if self.batch_size < 1024 {
            bail!("--batch-size must be at least 1024 bytes");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r >= 1.0) {
                bail!("--rate must be at least 1 record/s");
            }
        }
        Ok(())
    }

    /// `--rate` applies to `bench produce` only.
    fn no_rate(&self, command: &str) -> anyhow::Result<()> {
        if self.rate.is_some() {
            bail!(
                "--rate applies to `bench produce` and `bench pipeline` only; `bench {command}` measures at saturation"
            );
        }
        Ok(())
    }
}

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// After this many records.
    Records(u64),
    /// After this long.
    Time(Duration),
}

/// Runs `quiver bench`.
pub async fn run(global: &GlobalOpts, args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Produce(o) => {
            o.check()?;
            let target = Target::open(global, &o).await?;
            let r = produce::run(&target.client, &o).await?;
            target.close().await;
            r.print(o.output);
        }
        BenchCommand::Consume(o) => {
            o.check()?;
            o.no_rate("consume")?;
            let target = Target::open(global, &o).await?;
            let r = match &o.group {
                Some(g) => {
                    group::consume(
                        &target.client,
                        &o,
                        &o.topic_name(),
                        g,
                        o.members.unwrap_or(1),
                    )
                    .await?
                }
                None => consume::run(&target.client, &o).await?,
            };
            target.close().await;
            r.print(o.output);
        }
        BenchCommand::Rebalance(o) => {
            o.check()?;
            o.no_rate("rebalance")?;
            let members = o.members.unwrap_or(2);
            if members < 2 {
                bail!("--members must be at least 2: a rebalance moves partitions between members");
            }
            let target = Target::open(global, &o).await?;
            let r = group::rebalance(&target.client, &o, members).await;
            target.close().await;
            r?;
        }
        BenchCommand::Pipeline(p) => {
            let o = p.load;
            o.check()?;
            let target = Target::open(global, &o).await?;
            let r = async {
                let pipelines = match &target.embedded {
                    Some(b) if !p.over_quic => b.in_process_client().await?,
                    _ => target.client.clone(),
                };
                let how = pipeline::Setup {
                    backlog: p.backlog,
                    repeat: p.repeat,
                    warmup: !p.no_warmup,
                    in_process: target.embedded.is_some() && !p.over_quic,
                    sink_compression: p.sink_compression,
                    keep_topics: p.keep_topics,
                };
                pipeline::run(&target.client, &pipelines, &o, &p.stages, how).await
            }
            .await;
            target.close().await;
            r?.print(o.output);
        }
        BenchCommand::Baseline(o) => {
            o.check()?;
            o.no_rate("baseline")?;
            baseline::run(&o).await?;
        }
    }
    Ok(())
}

/// The broker a bench talks to: an external one, or one embedded in this process.
pub struct Target {
    /// Connected client.
    pub client: Client,
    embedded: Option<embedded::EmbeddedBroker>,
}

impl Target {
    async fn open(global: &GlobalOpts, o: &LoadOpts) -> anyhow::Result<Target> {
        if o.embedded {
            let b = embedded::EmbeddedBroker::start(o.data_dir.clone()).await?;
            let client = Client::connect(ClientConfig {
                ca_file: b.ca.clone(),
                ..ClientConfig::new(b.addr.to_string())
            })
            .await
            .context("connecting to the embedded broker")?;
            Ok(Target {
                client,
                embedded: Some(b),
            })
        } else {
            Ok(Target {
                client: global.connect().await?,
                embedded: None,
            })
        }
    }

    async fn close(self) {
        drop(self.client);
        if let Some(b) = self.embedded {
            b.stop().await;
        }
    }
}
