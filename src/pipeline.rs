//! `quiver pipeline`: `validate` checks a `pipeline.toml` (documented in
//! `config/pipeline.toml`); `run` runs it in this process as members of its consumer group
//! (Ctrl-C leaves cleanly, committing what is done); `deploy` runs it inside the broker
//! (bundles named by `path` are deployed as plugins first); `list`, `status` and `stop`
//! manage deployed pipelines.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use quiver_client::{Client, ClientError, PluginAdmin};
use quiver_pipeline::{Deployment, PipelineConfig, SinkCompression, StagePlugin};
use quiver_protocol::requests::{
    DeployPipelineRequest, DescribePipelineRequest, ListPipelinesRequest, PipelineStatus,
    StopPipelineRequest,
};
use quiver_protocol::ErrorCode;

use crate::connect::GlobalOpts;
use crate::output::{self, Format};
use crate::run_copies::{self, GroupMembers, OtherMember, RunCopy};

/// How long `pipeline stop` waits to learn the pipeline's group before stopping it.
const GROUP_LOOKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// `quiver pipeline`.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    #[command(subcommand)]
    command: PipelineCommand,
}

#[derive(Debug, Subcommand)]
enum PipelineCommand {
    /// Check a pipeline file: unknown keys and bad values are named with file, line and key.
    Validate {
        /// The pipeline file (see config/pipeline.toml).
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Run the pipeline in this process, as members of its consumer group (more copies
    /// anywhere join the same group and split the partitions); Ctrl-C leaves cleanly.
    Run {
        /// The pipeline file.
        file: PathBuf,
        /// Group members to run in this process (the file's `[run] instances` is what
        /// `pipeline deploy` runs; here each process starts this many), from 1 to 1024 as
        /// in the file.
        #[arg(
            long,
            default_value_t = 1,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(quiver_pipeline::MAX_INSTANCES))
        )]
        instances: u32,
    },
    /// Run `[run] instances` of the pipeline inside the broker, kept across broker
    /// restarts; a running pipeline of the same name is replaced (offsets are kept).
    Deploy {
        /// The pipeline file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// List deployed pipelines.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// A deployed pipeline's state, instances, counters, throughput and lag.
    Status {
        /// Pipeline name.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Stop a deployed pipeline: every instance commits what it finished and leaves.
    Stop {
        /// Pipeline name.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

/// Runs a `pipeline` subcommand.
pub async fn run(global: &GlobalOpts, args: PipelineArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match args.command {
        PipelineCommand::Validate { file, output } => {
            let p = PipelineConfig::load(&file)?;
            // Offline: the `path` stages' bundles load and take the keys the file sets;
            // deployed plugins are checked by run and deploy, against the cluster.
            quiver_pipeline::stages::check_path_stages(&p, &file)?;
            match output {
                Format::Json => output::json(&mut out, &p)?,
                Format::Table => describe_file(&mut out, &p)?,
            }
        }
        PipelineCommand::Run { file, instances } => {
            drop(out);
            run_here(global, &file, instances).await?;
            return Ok(());
        }
        PipelineCommand::Deploy { file, output } => {
            let mut p = PipelineConfig::load(&file)?;
            let client = global.connect().await?;
            // Before any bundle is deployed: a deploy refused for a missing topic leaves
            // no plugin behind.
            quiver_pipeline::deployment::check_all_topics(&client, &p)
                .await
                .with_context(|| format!("cannot deploy pipeline {}", p.name))?;
            let bundles = deploy_path_stages(&client, &mut p, base_dir(&file)).await?;
            let req = DeployPipelineRequest {
                config_toml: p.to_toml(),
            };
            let (resp, _) = client
                .request(&req, Bytes::new())
                .await
                .map_err(|e| pipeline_error(e, &format!("cannot deploy pipeline {}", p.name)))?;
            match output {
                Format::Json => output::json(&mut out, &serde_json::json!({
                    "name": resp.name, "instances": resp.instances, "replaced": resp.replaced,
                    "group": p.group(),
                    "plugins_deployed": bundles.iter().map(|b| serde_json::json!({
                        "plugin": b.plugin, "path": b.path.display().to_string(),
                    })).collect::<Vec<_>>(),
                }))?,
                Format::Table => writeln!(
                    out,
                    "{} pipeline {} with {} instance(s) (group {}); see `quiver pipeline status {}`",
                    if resp.replaced { "redeployed" } else { "deployed" },
                    resp.name,
                    resp.instances,
                    p.group(),
                    resp.name
                )?,
            }
        }
        PipelineCommand::List { output } => {
            let client = global.connect().await?;
            let (resp, _) = client
                .request(&ListPipelinesRequest {}, Bytes::new())
                .await
                .map_err(|e| pipeline_error(e, "cannot list pipelines"))?;
            match output {
                Format::Json => output::json(
                    &mut out,
                    &resp
                        .pipelines
                        .iter()
                        .map(|p| status_json(p, None))
                        .collect::<Vec<_>>(),
                )?,
                Format::Table => {
                    let rows: Vec<Vec<String>> = resp
                        .pipelines
                        .iter()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                state_parts(&p.state).0.to_string(),
                                p.guarantee.clone(),
                                p.instances.len().to_string(),
                                p.records_in.to_string(),
                                p.lag.to_string(),
                            ]
                        })
                        .collect();
                    output::table(
                        &mut out,
                        &[
                            "NAME",
                            "STATE",
                            "GUARANTEE",
                            "INSTANCES",
                            "RECORDS_IN",
                            "LAG",
                        ],
                        &rows,
                    )?;
                }
            }
        }
        PipelineCommand::Status { name, output } => {
            let client = global.connect().await?;
            let asked = client
                .request(
                    &DescribePipelineRequest {
                        name: name.clone(),
                        local: false,
                    },
                    Bytes::new(),
                )
                .await;
            let s = match asked {
                Ok((s, _)) => s,
                Err(e) if e.code() == Some(ErrorCode::PipelineNotFound) => {
                    let context = format!("pipeline {name}");
                    return Err(naming_run_copies(&client, &name, e, &context, |group, copies| {
                        format!("pipeline {name} is not deployed, but {copies}; `quiver group describe {group}` shows their partitions and lag")
                    })
                    .await);
                }
                Err(e) => return Err(pipeline_error(e, &format!("pipeline {name}"))),
            };
            let members = run_copies::members_of(&client, &s.group, &s.name).await;
            match output {
                Format::Json => output::json(&mut out, &status_json(&s, Some(&members)))?,
                Format::Table => status_table(&mut out, &s, &members)?,
            }
        }
        PipelineCommand::Stop { name, output } => {
            let client = global.connect().await?;
            // Its group, to tell of `pipeline run` copies that go on reading after the stop
            // (not worth holding the stop up for: a cluster's status waits for its peers).
            let asked = DescribePipelineRequest {
                name: name.clone(),
                local: false,
            };
            let describe = client.request(&asked, Bytes::new());
            let group = tokio::time::timeout(GROUP_LOOKUP_WAIT, describe)
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|(s, _)| s.group);
            let stopped = client
                .request(&StopPipelineRequest { name: name.clone() }, Bytes::new())
                .await;
            let r = match stopped {
                Ok((r, _)) => r,
                Err(e) if e.code() == Some(ErrorCode::PipelineNotFound) => {
                    let context = format!("cannot stop pipeline {name}");
                    return Err(naming_run_copies(&client, &name, e, &context, |_, copies| {
                        format!("{context}: it is not deployed, but {copies}; {STOP_COPIES}")
                    })
                    .await);
                }
                Err(e) => return Err(pipeline_error(e, &format!("cannot stop pipeline {name}"))),
            };
            if let Some(group) = group {
                let copies = run_copies::in_group(&client, &group, &name).await;
                if !copies.is_empty() {
                    let found = [(group, copies)];
                    eprintln!(
                        "note: pipeline {name} stopped, but {}; {STOP_COPIES}",
                        run_copies::describe(&found)
                    );
                }
            }
            match output {
                Format::Json => output::json(
                    &mut out,
                    &serde_json::json!({ "name": name, "stopped": true, "instances": r.instances }),
                )?,
                Format::Table => {
                    writeln!(out, "stopped pipeline {name} ({} instance(s))", r.instances)?
                }
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// The folder `path` stages are relative to.
fn base_dir(file: &Path) -> &Path {
    file.parent().unwrap_or(Path::new("."))
}

/// Broker refusals are printed as the broker worded them; the rest with context.
fn pipeline_error(e: ClientError, context: &str) -> anyhow::Error {
    match e {
        ClientError::Broker {
            code:
                ErrorCode::PipelineNotFound
                | ErrorCode::InvalidPipeline
                | ErrorCode::PipelinesUnavailable,
            message,
        } => anyhow::anyhow!("{context}: {message}"),
        e => anyhow::Error::new(e).context(context.to_string()),
    }
}

/// What to do about `pipeline run` copies: the brokers cannot stop them.
const STOP_COPIES: &str = "stop each where it runs (Ctrl-C, or SIGTERM to its pid)";

/// The error for a pipeline no broker runs (`e`, worded with `context`), unless copies of it
/// run with `pipeline run`: then `say(group, copies)` tells of them (the group of the
/// first, and [`run_copies::describe`] of all).
async fn naming_run_copies(
    client: &Client,
    name: &str,
    e: ClientError,
    context: &str,
    say: impl FnOnce(&str, String) -> String,
) -> anyhow::Error {
    let found = run_copies::anywhere(client, name).await;
    match found.first() {
        Some((group, _)) => anyhow::anyhow!(say(group, run_copies::describe(&found))),
        None => pipeline_error(e, context),
    }
}

/// A stage bundle deployed on the way to deploying its pipeline.
struct DeployedBundle {
    /// `name@version`.
    plugin: String,
    /// The bundle's folder.
    path: std::path::PathBuf,
}

/// Deploys the bundles of `path` stages and names them by `name@version` instead, so the
/// broker can load them. Returns the bundles that were not deployed already.
async fn deploy_path_stages(
    client: &Client,
    p: &mut PipelineConfig,
    base: &Path,
) -> anyhow::Result<Vec<DeployedBundle>> {
    let mut deployed = Vec::new();
    let admin = PluginAdmin::new(client.clone());
    for stage in &mut p.stages {
        let StagePlugin::Path(rel) = &stage.plugin else {
            continue;
        };
        let path = base.join(rel);
        let r = admin
            .deploy_path(&path)
            .await
            .with_context(|| format!("cannot deploy the stage bundle {}", path.display()))?;
        if !r.already_deployed {
            // On stderr as it happens: stdout keeps the answer (one JSON document with
            // --output json), and a pipeline refused next still leaves this said.
            eprintln!("deployed plugin {} from {}", r.plugin.id(), path.display());
            deployed.push(DeployedBundle {
                plugin: r.plugin.id(),
                path,
            });
        }
        stage.plugin = StagePlugin::Deployed {
            name: r.plugin.name.clone(),
            version: Some(r.plugin.version.clone()),
        };
    }
    Ok(deployed)
}

/// `pipeline run`: members in this process until Ctrl-C (or the pipeline fails).
async fn run_here(global: &GlobalOpts, file: &Path, instances: u32) -> anyhow::Result<()> {
    let p = PipelineConfig::load(file)?;
    if instances == 0 {
        anyhow::bail!("--instances must be at least 1");
    }
    let client = global.connect().await?;
    let name = p.name.clone();
    let group = p.group().to_string();
    let d = Deployment::start_here(client, p, base_dir(file), instances)
        .await
        .with_context(|| format!("cannot start pipeline {name}"))?;
    eprintln!(
        "pipeline {name} running with {instances} instance(s) in group {group}; Ctrl-C stops it"
    );
    let failed = tokio::select! {
        r = d.wait() => r,
        r = tokio::signal::ctrl_c() => {
            r.context("cannot listen for Ctrl-C")?;
            None
        }
        _ = sigterm() => None,
    };
    // Read after the stop: the polls completed while stopping are counted too.
    let counters = d.counters();
    d.stop().await;
    let s = counters.snapshot();
    eprintln!(
        "pipeline {name}: {} record(s) in, {} out, {} error(s), {} dead-lettered",
        s.records_in, s.records_out, s.errors, s.dead_lettered
    );
    match failed {
        Some(reason) => anyhow::bail!("pipeline {name} failed: {reason}"),
        None => Ok(()),
    }
}

async fn sigterm() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// A state's word (`running`, `stopped`, `failed`, `degraded`, `retrying`) and its reason
/// (`failed: REASON` and the like).
fn state_parts(state: &str) -> (&str, Option<&str>) {
    match state.split_once(": ") {
        Some((word, reason)) => (word, Some(reason)),
        None => (state, None),
    }
}

/// A status as JSON: every field of the broker's status (`state` as it is, `failed: …`
/// included), then `reason`, the text after the state's word (null without one), for
/// scripts that want the word and the reason apart, and `run_copies`: the members of the
/// pipeline's group that `quiver pipeline run` processes hold (`instances` are the
/// deployed ones; the counters are the group's, committed with its offsets, so they count
/// the copies' committed work too; the rates are the deployed instances'), and
/// `other_members`: members of the group that are not the pipeline's (they take input
/// partitions from it).
#[derive(serde::Serialize)]
struct StatusJson<'a> {
    #[serde(flatten)]
    status: &'a PipelineStatus,
    reason: Option<&'a str>,
    /// Left out by `pipeline list`, which does not read the groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    run_copies: Option<&'a [RunCopy]>,
    /// Left out by `pipeline list`, as `run_copies`.
    #[serde(skip_serializing_if = "Option::is_none")]
    other_members: Option<&'a [OtherMember]>,
}

fn status_json<'a>(s: &'a PipelineStatus, members: Option<&'a GroupMembers>) -> StatusJson<'a> {
    StatusJson {
        status: s,
        reason: state_parts(&s.state).1,
        run_copies: members.map(|m| m.copies.as_slice()),
        other_members: members.map(|m| m.others.as_slice()),
    }
}

fn status_table(
    out: &mut impl Write,
    s: &PipelineStatus,
    members: &GroupMembers,
) -> anyhow::Result<()> {
    let (state, reason) = state_parts(&s.state);
    writeln!(
        out,
        "pipeline {}: {} ({}, group {})",
        s.name, state, s.guarantee, s.group
    )?;
    if let Some(reason) = reason {
        writeln!(out, "reason: {reason}")?;
    }
    writeln!(
        out,
        "records in {}, out {}, errors {}, dead-lettered {}, lag {}",
        s.records_in, s.records_out, s.errors, s.dead_lettered, s.lag
    )?;
    writeln!(
        out,
        "throughput: {:.1} records/s in, {:.1} records/s out; latency p50 {:.0} ms, p99 {:.0} ms",
        s.records_per_sec_in, s.records_per_sec_out, s.latency_p50_ms, s.latency_p99_ms
    )?;
    let rows: Vec<Vec<String>> = s
        .instances
        .iter()
        .map(|i| vec![i.id.clone(), i.broker.to_string(), i.partitions.join(",")])
        .collect();
    output::table(out, &["INSTANCE", "BROKER", "PARTITIONS"], &rows)?;
    let copies: Vec<Vec<String>> = members
        .copies
        .iter()
        .map(|c| vec![c.id.clone(), c.process.clone(), c.partitions.join(",")])
        .collect();
    titled_table(
        out,
        "pipeline run copies in its group (records counted above, rates not):",
        &["INSTANCE", "PROCESS", "PARTITIONS"],
        &copies,
    )?;
    let others: Vec<Vec<String>> = members
        .others
        .iter()
        .map(|m| {
            vec![
                m.client_id.clone(),
                m.member_id.clone(),
                m.partitions.join(","),
            ]
        })
        .collect();
    titled_table(
        out,
        "other members of its group (not this pipeline's; they take input partitions from it):",
        &["CLIENT", "MEMBER", "PARTITIONS"],
        &others,
    )?;
    Ok(())
}

/// A table under its title line; nothing at all without rows.
fn titled_table(
    out: &mut impl Write,
    title: &str,
    headers: &[&str],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out, "{title}")?;
    output::table(out, headers, rows)
}

/// `pipeline validate`'s table: what the file describes.
fn describe_file(out: &mut impl Write, p: &PipelineConfig) -> anyhow::Result<()> {
    writeln!(
        out,
        "pipeline {} is valid: group {}, {} instance(s), {}, on error {}",
        p.name,
        p.group(),
        p.run.instances,
        p.run.guarantee,
        p.on_error.policy
    )?;
    writeln!(
        out,
        "source: {} (start {})",
        p.source.topics.join(", "),
        p.source.start
    )?;
    for (i, s) in p.stages.iter().enumerate() {
        let what = match &s.plugin {
            StagePlugin::Deployed { name, version } => match version {
                Some(v) => format!("{name}@{v}"),
                None => format!("{name} (highest version)"),
            },
            StagePlugin::Path(path) => format!("bundle {path} (loaded and checked)"),
        };
        writeln!(out, "stage {i}: {what} {:?}", s.config)?;
    }
    match p.sink.compression {
        SinkCompression::None => writeln!(out, "sink: {}", p.sink.topic)?,
        codec => writeln!(out, "sink: {} ({} compressed)", p.sink.topic, codec.name())?,
    }
    for (name, topic) in &p.sinks {
        writeln!(out, "sink {name}: {topic}")?;
    }
    if let Some(t) = &p.on_error.topic {
        writeln!(out, "dead letters: {t}")?;
    }
    if p.stages
        .iter()
        .any(|s| matches!(s.plugin, StagePlugin::Deployed { .. }))
    {
        writeln!(
            out,
            "deployed plugins are checked against the cluster by `pipeline run` and `pipeline deploy`"
        )?;
    }
    Ok(())
}
