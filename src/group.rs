//! `quiver group …` (list, describe, reset, delete) through the SDK's [`Admin`], and the
//! group side of `quiver consume TOPIC --group G`: join, print, commit after printing
//! (at-least-once), and on exit commit and leave.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use quiver_client::{
    Admin, AutoOffsetReset, ClientError, ConsumedRecord, GroupConfig, GroupConsumer, ResetTo,
    TopicPartition,
};

use crate::connect::GlobalOpts;
use crate::output::{self, Format};

/// `quiver group`.
#[derive(Debug, Args)]
pub struct GroupArgs {
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// List consumer groups.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show a group's members, assigned partitions, committed offsets, log ends and lag.
    Describe {
        /// Group name.
        group: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Move a group's committed offsets of a topic (refused while the group has members).
    Reset {
        /// Group name.
        group: String,
        /// Topic whose offsets move.
        #[arg(long)]
        topic: String,
        /// To the first stored offset of each partition.
        #[arg(long, group = "target")]
        to_earliest: bool,
        /// To the end of each partition.
        #[arg(long, group = "target")]
        to_latest: bool,
        /// To this offset in every partition (clamped to each partition's range).
        #[arg(long, value_name = "N", group = "target")]
        to_offset: Option<i64>,
        /// To the first record at or after this time (RFC 3339, e.g. 2025-01-31T12:00:00Z).
        #[arg(long, value_name = "RFC3339", group = "target")]
        to_datetime: Option<String>,
        /// Show each partition's committed and new offset, and change nothing (Kafka's
        /// reset without --execute).
        #[arg(long)]
        dry_run: bool,
        /// Output format (json: {"group", "topic", "dry_run", "partitions": [{"partition",
        /// "new_offset", and with --dry-run "current_offset"}]}).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Delete a group and its committed offsets (refused while it has members).
    Delete {
        /// Group name.
        group: String,
    },
}

fn group_error(e: ClientError, group: &str) -> anyhow::Error {
    use quiver_protocol::ErrorCode;
    match e.code() {
        Some(ErrorCode::UnknownGroup) => {
            anyhow::anyhow!("group {group:?} does not exist (see `quiver group list`)")
        }
        Some(ErrorCode::GroupNotEmpty) => {
            anyhow::anyhow!("group {group:?} has active members; stop its consumers first ({e})")
        }
        _ => anyhow::Error::new(e),
    }
}

/// Runs `quiver group …`.
pub async fn run(global: &GlobalOpts, args: GroupArgs) -> anyhow::Result<()> {
    let admin = Admin::new(global.connect().await?);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.command {
        GroupCommand::List { output } => {
            let groups = admin.list_groups().await.context("cannot list groups")?;
            match output {
                Format::Json => output::json(&mut out, &groups)?,
                Format::Table => {
                    let rows: Vec<Vec<String>> = groups
                        .iter()
                        .map(|g| {
                            vec![
                                g.group.clone(),
                                g.state.clone(),
                                g.members.to_string(),
                                g.strategy.clone(),
                            ]
                        })
                        .collect();
                    output::table(&mut out, &["GROUP", "STATE", "MEMBERS", "STRATEGY"], &rows)?;
                }
            }
        }
        GroupCommand::Describe { group, output } => {
            let d = admin
                .describe_group(&group)
                .await
                .map_err(|e| group_error(e, &group))?;
            match output {
                Format::Json => output::json(&mut out, &d)?,
                Format::Table => {
                    writeln!(
                        out,
                        "group {}  state {}  generation {}  strategy {}  auto-offset-reset {}  members {}",
                        d.group,
                        d.state,
                        d.generation,
                        d.strategy,
                        d.auto_offset_reset,
                        d.members.len()
                    )?;
                    let rows: Vec<Vec<String>> = d
                        .partitions
                        .iter()
                        .map(|p| {
                            vec![
                                p.topic.clone(),
                                p.partition.to_string(),
                                p.owner.clone().unwrap_or_else(|| "-".into()),
                                p.committed.map_or("-".into(), |c| c.to_string()),
                                p.log_end_offset.to_string(),
                                p.high_watermark.to_string(),
                                p.lag.to_string(),
                            ]
                        })
                        .collect();
                    output::table(
                        &mut out,
                        &[
                            "TOPIC",
                            "PARTITION",
                            "OWNER",
                            "COMMITTED",
                            "LOG-END",
                            "HIGH-WATERMARK",
                            "LAG",
                        ],
                        &rows,
                    )?;
                    if !d.members.is_empty() {
                        writeln!(out)?;
                        let names = |tps: &[TopicPartition]| {
                            tps.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(",")
                        };
                        let rows: Vec<Vec<String>> = d
                            .members
                            .iter()
                            .map(|m| {
                                vec![
                                    m.member_id.clone(),
                                    m.client_id.clone(),
                                    names(&m.assigned),
                                    names(&m.revoking),
                                ]
                            })
                            .collect();
                        output::table(
                            &mut out,
                            &["MEMBER", "CLIENT", "PARTITIONS", "REVOKING"],
                            &rows,
                        )?;
                    }
                }
            }
        }
        GroupCommand::Reset {
            group,
            topic,
            to_earliest,
            to_latest,
            to_offset,
            to_datetime,
            dry_run,
            output,
        } => {
            let to = match (to_earliest, to_latest, to_offset, to_datetime) {
                (true, _, _, _) => ResetTo::Earliest,
                (_, true, _, _) => ResetTo::Latest,
                (_, _, Some(n), _) if n < 0 => bail!("--to-offset must be 0 or more"),
                (_, _, Some(n), _) => ResetTo::Offset(n),
                (_, _, _, Some(s)) => {
                    let t = time::OffsetDateTime::parse(
                        &s,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .with_context(|| {
                        format!("--to-datetime {s:?} is not RFC 3339 (e.g. 2025-01-31T12:00:00Z)")
                    })?;
                    ResetTo::Timestamp((t.unix_timestamp_nanos() / 1_000_000) as i64)
                }
                _ => bail!(
                    "say where to: --to-earliest, --to-latest, --to-offset N or --to-datetime RFC3339"
                ),
            };
            let topic_error = |e| match e {
                ClientError::TopicNotFound(_) => {
                    anyhow::anyhow!("topic {topic:?} does not exist (see `quiver topic list`)")
                }
                e => group_error(e, &group),
            };
            if dry_run {
                let offsets = admin
                    .resolve_reset(&topic, &to)
                    .await
                    .map_err(topic_error)?;
                let (current, members) = committed_offsets(&admin, &group, &topic).await?;
                print_reset(&mut out, output, &group, &topic, &offsets, Some(&current))?;
                eprintln!(
                    "dry run: nothing changed; without --dry-run the reset applies{}",
                    if members > 0 {
                        format!(", once the group's {members} member(s) have left (it is refused while the group has members)")
                    } else {
                        String::new()
                    }
                );
            } else {
                let offsets = admin
                    .reset_group_offsets(&group, &topic, to)
                    .await
                    .map_err(topic_error)?;
                print_reset(&mut out, output, &group, &topic, &offsets, None)?;
            }
        }
        GroupCommand::Delete { group } => {
            let n = admin
                .delete_group(&group)
                .await
                .map_err(|e| group_error(e, &group))?;
            writeln!(out, "deleted group {group} ({n} committed offsets)")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The group's committed offsets of `topic` by partition, and its member count (none and
/// 0 for a group that does not exist yet).
async fn committed_offsets(
    admin: &Admin,
    group: &str,
    topic: &str,
) -> anyhow::Result<(BTreeMap<u32, i64>, usize)> {
    match admin.describe_group(group).await {
        Ok(d) => Ok((
            d.partitions
                .iter()
                .filter(|p| p.topic == topic)
                .filter_map(|p| Some((p.partition, p.committed?)))
                .collect(),
            d.members.len(),
        )),
        Err(e) if e.code() == Some(quiver_protocol::ErrorCode::UnknownGroup) => {
            Ok((BTreeMap::new(), 0))
        }
        Err(e) => Err(group_error(e, group)),
    }
}

/// Prints a reset's offsets (with `current`, the committed ones: a dry run).
fn print_reset(
    out: &mut impl Write,
    format: Format,
    group: &str,
    topic: &str,
    offsets: &[(u32, i64)],
    current: Option<&BTreeMap<u32, i64>>,
) -> anyhow::Result<()> {
    let shown = |p: &u32| match current.and_then(|c| c.get(p)) {
        Some(o) => o.to_string(),
        None => "-".into(),
    };
    match format {
        Format::Json => {
            let partitions: Vec<serde_json::Value> = offsets
                .iter()
                .map(|(p, o)| {
                    let mut v = serde_json::json!({ "partition": p, "new_offset": o });
                    if let Some(c) = current {
                        v["current_offset"] = serde_json::json!(c.get(p));
                    }
                    v
                })
                .collect();
            output::json(
                out,
                &serde_json::json!({
                    "group": group, "topic": topic, "dry_run": current.is_some(),
                    "partitions": partitions,
                }),
            )?;
        }
        Format::Table => {
            // A dry run adds the committed offset beside the new one.
            let with_current = current.is_some();
            let headers = ["TOPIC", "PARTITION", "CURRENT-OFFSET", "NEW-OFFSET"];
            let rows: Vec<Vec<String>> = offsets
                .iter()
                .map(|(p, o)| {
                    let mut row = vec![topic.to_string(), p.to_string()];
                    if with_current {
                        row.push(shown(p));
                    }
                    row.push(o.to_string());
                    row
                })
                .collect();
            let headers: Vec<&str> = headers
                .into_iter()
                .filter(|h| with_current || *h != "CURRENT-OFFSET")
                .collect();
            output::table(out, &headers, &rows)?;
        }
    }
    Ok(())
}

/// What `quiver consume --group` needs from its arguments.
pub struct GroupRun<'a> {
    /// Topic to read.
    pub topic: &'a str,
    /// Group to join.
    pub group: &'a str,
    /// Keep reading at the end.
    pub follow: bool,
    /// With `follow`: stop once no record came for this long.
    pub idle_timeout: Option<Duration>,
    /// Stop after this many records.
    pub max_messages: Option<u64>,
    /// Session timeout.
    pub session_timeout_ms: u64,
    /// Consume-time processor run by the partition leaders.
    pub processor: Option<quiver_client::ProcessorSpec>,
    /// `--from-beginning`: partitions without a committed offset start at the earliest
    /// record (this member's choice, not stored with the group).
    pub from_beginning: bool,
    /// `--isolation`.
    pub isolation: quiver_client::Isolation,
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `quiver consume TOPIC --group G`: joins, prints what the group assigns this member,
/// commits after printing, and at the end (caught up, `--max-messages`, or a signal)
/// commits and leaves.
pub async fn consume(
    global: &GlobalOpts,
    run: GroupRun<'_>,
    mut print: impl FnMut(&mut dyn Write, &ConsumedRecord) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    quiver_protocol::requests::validate_group_name(run.group).map_err(|e| anyhow::anyhow!(e))?;
    let client = global.connect().await?;
    client
        .partition_count(run.topic)
        .await
        .map_err(|e| match e {
            ClientError::TopicNotFound(_) => anyhow::anyhow!(
                "topic {:?} does not exist (see `quiver topic list`)",
                run.topic
            ),
            e => anyhow::Error::new(e).context(format!("cannot look up topic {:?}", run.topic)),
        })?;
    let mut config = GroupConfig::new(run.group, [run.topic])
        .session_timeout(Duration::from_millis(run.session_timeout_ms));
    config.client_id = format!("quiver-cli-{}", std::process::id());
    config.fetch.processor = run.processor.clone();
    config.fetch.isolation = run.isolation;
    if run.from_beginning {
        config = config.start_without_commit_at(AutoOffsetReset::Earliest);
    }
    let mut member = GroupConsumer::join(client, config)
        .await
        .with_context(|| format!("cannot join group {:?}", run.group))?;
    let max = run.max_messages.unwrap_or(u64::MAX);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let mut printed: u64 = 0;
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut idle = crate::consume::IdleTimeout::new(run.idle_timeout);
    'outer: while printed < max {
        let records = tokio::select! {
            r = member.poll_timeout(Duration::from_millis(200)) => r.context("cannot read records")?,
            _ = &mut stop => break,
        };
        if idle.ran_out(!records.is_empty()) {
            break;
        }
        for (i, r) in records.iter().enumerate() {
            print(&mut out, r)?;
            printed += 1;
            if printed >= max {
                // Records handed out but not printed are not consumed: commit up to here.
                for rest in &records[i + 1..] {
                    member.rewind(&rest.topic, rest.partition, rest.offset);
                }
                break 'outer;
            }
        }
        out.flush()?;
        if !records.is_empty() {
            member.commit().await.context("cannot commit offsets")?;
        } else if !run.follow && member.caught_up().await? {
            break;
        }
    }
    out.flush()?;
    member.close().await.context("cannot leave the group")?;
    Ok(())
}
