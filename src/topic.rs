//! `quiver topic …`: create, list, describe, alter and delete topics through the SDK's
//! [`Admin`]. Thin: parse, call, print (table or JSON).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use quiver_client::{Admin, ClientError};

use crate::connect::{parse_pairs, GlobalOpts};
use crate::output::{self, Format};

/// `quiver topic`.
#[derive(Debug, Args)]
pub struct TopicArgs {
    #[command(subcommand)]
    command: TopicCommand,
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name (letters, digits, '.', '_', '-').
        name: String,
        /// Number of partitions [default: the broker's topic_defaults.partitions, 1 unless
        /// configured].
        #[arg(long, value_parser = at_least_one)]
        partitions: Option<u32>,
        /// Copies of each partition, on different brokers.
        #[arg(long, default_value_t = 1)]
        replication_factor: u16,
        /// Topic config override, key=value (repeatable), e.g. retention.ms=3600000.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// A deployed partitioner plugin for records produced without a partition
        /// (same as --config partitioner=NAME@VERSION).
        #[arg(long, value_name = "NAME@VERSION")]
        partitioner: Option<String>,
        /// Output format (json: the created topic, as `topic describe --output json`).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// List topics.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show a topic's config and partitions.
    Describe {
        /// Topic name.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Show the offsets of the bootstrap broker's own copy of each partition (zero where
        /// it holds no replica) instead of each partition's leader's.
        #[arg(long)]
        local: bool,
    },
    /// Change topic config keys, or add partitions.
    Alter {
        /// Topic name.
        name: String,
        /// Config to set, key=value (repeatable).
        #[arg(
            long = "config",
            value_name = "KEY=VALUE",
            required_unless_present_any = ["partitioner", "partitions", "delete_config"]
        )]
        config: Vec<String>,
        /// Remove a key's override so the topic goes back to the broker's default
        /// (repeatable; Kafka's `--delete-config`).
        #[arg(long = "delete-config", value_name = "KEY")]
        delete_config: Vec<String>,
        /// Grow the topic to this many partitions (new ones start empty; keyed records may
        /// map to other partitions afterwards).
        #[arg(long, value_name = "N")]
        partitions: Option<u32>,
        /// Set the topic's partitioner plugin ("" to go back to the default partitioner).
        #[arg(long, value_name = "NAME@VERSION")]
        partitioner: Option<String>,
    },
    /// Move a partition's replicas to other brokers (a cluster): the new replicas copy the
    /// log and join the ISR before the old ones are dropped.
    Reassign {
        /// Topic name.
        name: String,
        /// The partition to move.
        #[arg(long)]
        partition: u32,
        /// The wanted brokers, comma-separated, preferred leader first (e.g. 1,2,3).
        #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
        replicas: Vec<u32>,
        /// Return once the move has started instead of waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for the move to finish, in seconds.
        #[arg(long, value_name = "S", default_value_t = 300)]
        timeout: u64,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// Runs a `topic` subcommand.
pub async fn run(global: &GlobalOpts, args: TopicArgs) -> anyhow::Result<()> {
    if let TopicCommand::Create { name, .. }
    | TopicCommand::Describe { name, .. }
    | TopicCommand::Alter { name, .. }
    | TopicCommand::Reassign { name, .. }
    | TopicCommand::Delete { name } = &args.command
    {
        if let Err(e) = quiver_protocol::requests::validate_topic_name(name) {
            bail!("{e}");
        }
    }
    let admin = Admin::new(global.connect().await?);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            config,
            partitioner,
            output,
        } => {
            let mut config: BTreeMap<String, String> =
                parse_pairs(&config, "--config")?.into_iter().collect();
            if let Some(p) = partitioner {
                config.insert("partitioner".into(), p);
            }
            let d = admin
                .create_replicated_topic(&name, partitions.unwrap_or(0), replication_factor, config)
                .await
                .map_err(|e| match e {
                    ClientError::TopicAlreadyExists(_) => anyhow::anyhow!(
                        "topic {name:?} already exists (see `quiver topic describe {name}`)"
                    ),
                    e => anyhow::Error::new(e).context(format!("cannot create topic {name:?}")),
                })?;
            match output {
                Format::Json => output::json(&mut out, &d)?,
                Format::Table => writeln!(
                    out,
                    "created topic {} with {} partition(s)",
                    d.name,
                    d.partitions.len()
                )?,
            }
        }
        TopicCommand::List { output } => {
            let topics = admin.list_topics().await.context("cannot list topics")?;
            match output {
                Format::Json => output::json(&mut out, &topics)?,
                Format::Table => {
                    let rows: Vec<Vec<String>> = topics
                        .iter()
                        .map(|t| {
                            let mut leaders: Vec<u32> =
                                t.partitions.iter().map(|p| p.leader).collect();
                            leaders.sort_unstable();
                            leaders.dedup();
                            vec![
                                t.name.clone(),
                                t.partitions.len().to_string(),
                                leaders
                                    .iter()
                                    .map(u32::to_string)
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ]
                        })
                        .collect();
                    output::table(&mut out, &["NAME", "PARTITIONS", "LEADERS"], &rows)?;
                }
            }
        }
        TopicCommand::Describe {
            name,
            output,
            local,
        } => {
            let d = if local {
                admin.describe_topic_local(&name).await
            } else {
                admin.describe_topic(&name).await
            }
            .map_err(|e| not_found(e, &name))?;
            match output {
                Format::Json => output::json(&mut out, &d)?,
                Format::Table => {
                    writeln!(out, "Topic: {}  Partitions: {}", d.name, d.partitions.len())?;
                    writeln!(out, "Config:")?;
                    for (k, v) in &d.config {
                        writeln!(out, "  {k} = {v}")?;
                    }
                    writeln!(out)?;
                    let rows: Vec<Vec<String>> = d
                        .partitions
                        .iter()
                        .map(|p| {
                            vec![
                                p.partition.to_string(),
                                p.leader.to_string(),
                                ids(&p.replicas),
                                ids(&p.isr),
                                p.log_start_offset.to_string(),
                                p.high_watermark.to_string(),
                                p.log_end_offset.to_string(),
                                p.size_bytes.to_string(),
                                p.status.clone(),
                            ]
                        })
                        .collect();
                    output::table(
                        &mut out,
                        &[
                            "PARTITION",
                            "LEADER",
                            "REPLICAS",
                            "ISR",
                            "LOG-START",
                            "HIGH-WATERMARK",
                            "LOG-END",
                            "SIZE-BYTES",
                            "STATUS",
                        ],
                        &rows,
                    )?;
                    for p in &d.partitions {
                        if let Some(reason) = &p.offline_reason {
                            writeln!(out, "partition {} is offline: {reason}", p.partition)?;
                        }
                    }
                }
            }
        }
        TopicCommand::Alter {
            name,
            config,
            delete_config,
            partitions,
            partitioner,
        } => {
            if let Some(total) = partitions {
                let d = admin
                    .create_partitions(&name, total)
                    .await
                    .map_err(|e| not_found(e, &name))?;
                writeln!(out, "{}: {} partitions", d.name, d.partitions.len())?;
                if config.is_empty() && partitioner.is_none() && delete_config.is_empty() {
                    return Ok(());
                }
            }
            let mut set: BTreeMap<String, String> =
                parse_pairs(&config, "--config")?.into_iter().collect();
            if let Some(p) = partitioner {
                set.insert("partitioner".into(), p);
            }
            // Only a removal needs the newer request: plain sets keep working against
            // brokers that predate it.
            let d = if delete_config.is_empty() {
                admin.alter_topic_config(&name, set.clone()).await
            } else {
                admin
                    .alter_topic_config_incremental(&name, set.clone(), delete_config.clone())
                    .await
            }
            .map_err(|e| not_found(e, &name))?;
            for k in set.keys() {
                match d.config.get(k) {
                    Some(v) => writeln!(out, "{}: {k} = {v}", d.name)?,
                    None => writeln!(out, "{}: {k} unset", d.name)?,
                }
            }
            for k in &delete_config {
                match d.config.get(k) {
                    Some(v) => writeln!(out, "{}: {k} = {v} (the default)", d.name)?,
                    None => writeln!(out, "{}: {k} unset", d.name)?,
                }
            }
        }
        TopicCommand::Reassign {
            name,
            partition,
            replicas,
            no_wait,
            timeout,
        } => {
            let started = admin
                .reassign_partition(&name, partition, replicas.clone())
                .await
                .map_err(|e| not_found(e, &name))?;
            writeln!(
                out,
                "moving {name}/{partition} to replicas {replicas:?} (replicas during the move: {:?})",
                started.replicas
            )?;
            if no_wait {
                return Ok(());
            }
            out.flush()?;
            let mut wanted = replicas.clone();
            wanted.sort_unstable();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
            loop {
                let d = admin
                    .describe_topic(&name)
                    .await
                    .map_err(|e| not_found(e, &name))?;
                if let Some(p) = d.partitions.iter().find(|p| p.partition == partition) {
                    let mut now = p.replicas.clone();
                    now.sort_unstable();
                    if now == wanted && wanted.iter().all(|r| p.isr.contains(r)) {
                        writeln!(
                            out,
                            "moved {name}/{partition}: replicas {:?}, leader {}, isr {:?}",
                            p.replicas, p.leader, p.isr
                        )?;
                        return Ok(());
                    }
                    if std::time::Instant::now() > deadline {
                        bail!(
                            "{name}/{partition} did not finish moving within {timeout} s (replicas {:?}, isr {:?}); it goes on in the background, see `quiver topic describe {name}`",
                            p.replicas,
                            p.isr
                        );
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        TopicCommand::Delete { name } => {
            let n = admin
                .delete_topic(&name)
                .await
                .map_err(|e| not_found(e, &name))?;
            writeln!(out, "deleted topic {name} ({n} partition(s))")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Turns "unknown topic" into advice, and adds context to anything else.
fn not_found(e: ClientError, name: &str) -> anyhow::Error {
    match e {
        ClientError::TopicNotFound(_) => {
            anyhow::anyhow!("topic {name:?} does not exist (see `quiver topic list`)")
        }
        // The broker's message says it all, with what to change.
        ClientError::TopicDeletionDisabled(message) => anyhow::anyhow!("{message}"),
        e => anyhow::Error::new(e).context(format!("topic {name:?}")),
    }
}

/// Broker ids as Kafka's tools print them: `1,2,3` (`-` for none).
fn ids(ids: &[u32]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// A count of 1 or more (clap's own range message, "0 is not in 1..=4294967295", says
/// less).
fn at_least_one(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a count: {e}")),
    }
}
