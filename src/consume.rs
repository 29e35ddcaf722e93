//! `quiver consume TOPIC`: reads partitions with the SDK's [`Consumer`] and prints records
//! as text or JSON lines through a buffered stdout. Without `--follow` it stops at the end
//! offsets seen at start (or after `--max-messages`); a closed pipe ends it quietly.
//!
//! With `--group` the group side in [`crate::group::consume`] reads instead; consume-time
//! processors (`--processor`) are set where the consumer is built ([`build_consumer`]).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use quiver_client::{ClientError, ConsumeMode, ConsumedRecord, Consumer, ConsumerConfig, SeekTo};

use crate::connect::GlobalOpts;
use crate::output::{is_broken_pipe, JsonPayload};

/// Record output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RecordFormat {
    /// The value per line (key and a tab first with `--print-key`); also accepted as
    /// `table`, the name other commands use.
    #[value(alias = "table")]
    Text,
    /// One JSON object per line: topic, partition, offset, timestamp, key, value, headers;
    /// a key, value or header value that is not UTF-8 also comes exactly, in base64, as
    /// `key_base64`, `value_base64` or `headers_base64`.
    Json,
}

/// `quiver consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Start at the first stored record (default: the end, like Kafka). With --group, as
    /// in Kafka: partitions the group has no committed offset for start at the first stored
    /// record (auto.offset.reset=earliest for this member); committed offsets still win.
    #[arg(long, conflicts_with = "offset")]
    from_beginning: bool,
    /// Start at this offset (in every partition read).
    #[arg(long, value_name = "N")]
    offset: Option<i64>,
    /// Read only this partition.
    #[arg(long, value_name = "N")]
    partition: Option<u32>,
    /// Stop after this many records.
    #[arg(long, value_name = "N")]
    max_messages: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end (with --max-messages:
    /// until that many were printed).
    #[arg(long)]
    follow: bool,
    /// With --follow: stop once no new record came for this long (Kafka's
    /// `--timeout-ms`; default: wait until Ctrl-C or --max-messages).
    #[arg(long, value_name = "MS", requires = "follow")]
    timeout_ms: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = RecordFormat::Text)]
    output: RecordFormat,
    /// With text output, print the key and a tab before the value.
    #[arg(long)]
    print_key: bool,
    /// How data is pulled: long-poll fetches, or a push subscription per partition (not
    /// with --group, whose members long-poll).
    #[arg(long, value_enum, default_value_t = Mode::LongPoll, conflicts_with = "group")]
    mode: Mode,
    /// Join this consumer group: the group's members share the topic's partitions, and
    /// the member commits after printing (at-least-once). A partition starts at the group's
    /// committed offset; without one, at the first record with --from-beginning, else as the
    /// group's auto-offset-reset says (`quiver group describe`; earliest for a new group).
    #[arg(long, value_name = "G", conflicts_with_all = ["offset", "partition"])]
    group: Option<String>,
    /// With --group: the broker removes this member when silent this long.
    #[arg(long, value_name = "MS", default_value_t = 10_000, requires = "group")]
    session_timeout_ms: u64,
    /// Run this deployed processor plugin on the broker before records are sent
    /// (offsets printed are the source offsets).
    #[arg(long, value_name = "NAME[@VERSION]")]
    processor: Option<String>,
    /// Config override for --processor, key=value (repeatable).
    #[arg(long, value_name = "KEY=VALUE", requires = "processor")]
    processor_config: Vec<String>,
    /// read-uncommitted: every record; read-committed: only records of committed
    /// transactions (e.g. the output of an exactly-once pipeline), never an aborted one's.
    #[arg(long, value_enum, default_value_t = IsolationArg::ReadUncommitted)]
    isolation: IsolationArg,
}

/// `--isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    /// Every record below the high watermark.
    ReadUncommitted,
    /// Only committed transactions' records, below the last stable offset.
    ReadCommitted,
}

impl From<IsolationArg> for quiver_client::Isolation {
    fn from(i: IsolationArg) -> Self {
        match i {
            IsolationArg::ReadUncommitted => quiver_client::Isolation::ReadUncommitted,
            IsolationArg::ReadCommitted => quiver_client::Isolation::ReadCommitted,
        }
    }
}

impl ConsumeArgs {
    /// The `--processor` spec with its `--processor-config` overrides.
    fn processor_spec(&self) -> anyhow::Result<Option<quiver_client::ProcessorSpec>> {
        let Some(p) = &self.processor else {
            return Ok(None);
        };
        let mut spec = quiver_client::ProcessorSpec::parse(p)
            .map_err(|e| anyhow::anyhow!("--processor: {e}"))?;
        spec.config = crate::connect::parse_pairs(&self.processor_config, "--processor-config")?
            .into_iter()
            .collect();
        Ok(Some(spec))
    }
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Long-poll fetches.
    LongPoll,
    /// Broker push (QUIC flow control as backpressure).
    Subscribe,
}

/// Runs `quiver consume`; a closed stdout ends it without an error.
pub async fn run(global: &GlobalOpts, args: ConsumeArgs) -> anyhow::Result<()> {
    match consume(global, &args).await {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

/// Makes the consumer and assigns the partitions to read (groups will assign here instead).
async fn build_consumer(
    global: &GlobalOpts,
    args: &ConsumeArgs,
) -> anyhow::Result<(Consumer, Vec<u32>)> {
    quiver_protocol::requests::validate_topic_name(&args.topic).map_err(|e| anyhow::anyhow!(e))?;
    if matches!(args.offset, Some(o) if o < 0) {
        bail!("--offset must be 0 or more");
    }
    let client = global.connect().await?;
    let count = client
        .partition_count(&args.topic)
        .await
        .map_err(|e| match e {
            ClientError::TopicNotFound(_) => anyhow::anyhow!(
                "topic {:?} does not exist (see `quiver topic list`)",
                args.topic
            ),
            e => anyhow::Error::new(e).context(format!("cannot look up topic {:?}", args.topic)),
        })?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) if p >= count => bail!(
            "topic {} has {count} partition(s); --partition {p} does not exist",
            args.topic
        ),
        Some(p) => vec![p],
        None => (0..count).collect(),
    };
    let start = start_of(args);
    let mut consumer = Consumer::new(
        client,
        ConsumerConfig {
            start,
            mode: match args.mode {
                Mode::LongPoll => ConsumeMode::LongPoll,
                Mode::Subscribe => ConsumeMode::Subscribe,
            },
            processor: args.processor_spec()?,
            isolation: args.isolation.into(),
            ..ConsumerConfig::default()
        },
    );
    consumer
        .assign(&args.topic, partitions.iter().copied())
        .await?;
    Ok((consumer, partitions))
}

/// `--timeout-ms`: whether a consumer has gone that long without a record.
pub(crate) struct IdleTimeout {
    limit: Option<std::time::Duration>,
    last_record: std::time::Instant,
}

impl IdleTimeout {
    /// Counting from now; `None` never runs out.
    pub(crate) fn new(limit: Option<std::time::Duration>) -> Self {
        IdleTimeout {
            limit,
            last_record: std::time::Instant::now(),
        }
    }

    /// After a poll that did (`got_records`) or did not return records: true once the
    /// limit has passed since the last record (or the start).
    pub(crate) fn ran_out(&mut self, got_records: bool) -> bool {
        if got_records {
            self.last_record = std::time::Instant::now();
            return false;
        }
        self.limit.is_some_and(|t| self.last_record.elapsed() >= t)
    }
}

/// Where a consumer without a group starts reading.
fn start_of(args: &ConsumeArgs) -> SeekTo {
    match (args.from_beginning, args.offset) {
        (true, _) => SeekTo::Beginning,
        (false, Some(o)) => SeekTo::Offset(o),
        (false, None) => SeekTo::End,
    }
}

async fn consume(global: &GlobalOpts, args: &ConsumeArgs) -> anyhow::Result<()> {
    if let Some(group) = &args.group {
        let run = crate::group::GroupRun {
            topic: &args.topic,
            group,
            follow: args.follow,
            idle_timeout: args.timeout_ms.map(std::time::Duration::from_millis),
            max_messages: args.max_messages,
            session_timeout_ms: args.session_timeout_ms,
            processor: args.processor_spec()?,
            from_beginning: args.from_beginning,
            isolation: args.isolation.into(),
        };
        return crate::group::consume(global, run, |out, r| print_record(out, r, args)).await;
    }
    let (mut consumer, partitions) = build_consumer(global, args).await?;
    // Without --follow, stop at the end offsets seen now.
    let mut remaining: BTreeMap<u32, i64> = BTreeMap::new();
    if !args.follow {
        let ends = consumer
            .end_offsets(&args.topic)
            .await
            .context("cannot read the end offsets")?;
        for &p in &partitions {
            let end = ends.get(&p).copied().unwrap_or(0);
            let pos = consumer.position(&args.topic, p).await?;
            if pos < end {
                remaining.insert(p, end);
            }
        }
        if remaining.is_empty() {
            if matches!(start_of(args), SeekTo::End) {
                eprintln!(
                    "nothing to read: consume starts at the end of {} (like Kafka) and, without --follow, stops there; add --from-beginning (or --offset N) to read what is stored, or --follow to wait for new records",
                    args.topic
                );
            }
            return Ok(());
        }
    }
    let max = args.max_messages.unwrap_or(u64::MAX);
    if max == 0 {
        return Ok(());
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let mut printed: u64 = 0;
    let mut idle = IdleTimeout::new(args.timeout_ms.map(std::time::Duration::from_millis));
    'outer: loop {
        let records = consumer.poll().await.context("cannot read records")?;
        if idle.ran_out(!records.is_empty()) {
            break 'outer;
        }
        for r in &records {
            if !args.follow {
                match remaining.get(&r.partition) {
                    Some(&end) if r.offset < end => {}
                    _ => continue,
                }
            }
            print_record(&mut out, r, args)?;
            printed += 1;
            if printed >= max {
                break 'outer;
            }
            if !args.follow && r.offset + 1 >= remaining.get(&r.partition).copied().unwrap_or(0) {
                remaining.remove(&r.partition);
                if remaining.is_empty() {
                    break 'outer;
                }
            }
        }
        if !args.follow {
            // A processor may drop the last records, and transaction markers (or an aborted
            // transaction's records) hold offsets no record is printed for: the position
            // (past every batch served) says when a partition is done.
            let open: Vec<u32> = remaining.keys().copied().collect();
            for p in open {
                let end = remaining.get(&p).copied().unwrap_or(0);
                if consumer.position(&args.topic, p).await? >= end {
                    remaining.remove(&p);
                }
            }
            if remaining.is_empty() {
                break 'outer;
            }
        }
        out.flush()?;
    }
    out.flush()?;
    Ok(())
}

fn print_record(
    out: &mut (impl Write + ?Sized),
    r: &ConsumedRecord,
    args: &ConsumeArgs,
) -> anyhow::Result<()> {
    match args.output {
        RecordFormat::Text => {
            if args.print_key {
                match &r.key {
                    Some(k) => out.write_all(k)?,
                    None => out.write_all(b"null")?,
                }
                out.write_all(b"\t")?;
            }
            out.write_all(&r.value)?;
            out.write_all(b"\n")?;
        }
        RecordFormat::Json => {
            let line = JsonRecord {
                topic: &r.topic,
                partition: r.partition,
                offset: r.offset,
                timestamp: r.timestamp,
                payload: JsonPayload::new(
                    r.key.as_deref(),
                    &r.value,
                    r.headers.iter().map(|h| (h.key.as_str(), &h.value[..])),
                ),
            };
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}

/// One record as a JSON line.
#[derive(serde::Serialize)]
struct JsonRecord<'a> {
    topic: &'a str,
    partition: u32,
    offset: i64,
    timestamp: i64,
    #[serde(flatten)]
    payload: JsonPayload<'a>,
}
