//! `quiver plugin …`: deploy, list, describe and remove plugins on the broker (through the
//! SDK's [`PluginAdmin`]), and run a bundle locally with `plugin test` / `plugin bench`
//! (the same host the broker uses, no broker needed). Thin: parse, call, print.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use quiver_client::{ClientError, PluginAdmin, PluginInfo};
use quiver_plugins::{local, Bundle, Kind};
use quiver_protocol::requests::parse_plugin_ref;
use quiver_protocol::ErrorCode;

use crate::connect::GlobalOpts;
use crate::output::{self, Format, JsonPayload};

/// `quiver plugin`.
#[derive(Debug, Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Store a bundle (folder or .tar.gz) in the broker; the same bytes again are a no-op.
    Deploy {
        /// Bundle folder or .tar.gz.
        path: PathBuf,
        /// Output format (json: the deployed plugin, as `plugin describe` shows it, and
        /// whether it was deployed already).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// List deployed plugins.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show one plugin (its highest version when no version is given).
    Describe {
        /// NAME or NAME@VERSION.
        plugin: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Remove NAME@VERSION (refused while a topic or a consumer uses it).
    Remove {
        /// NAME@VERSION.
        plugin: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Run a bundle locally on records from a file and print what it outputs.
    Test {
        /// Bundle folder or .tar.gz.
        path: PathBuf,
        /// One value per line, or JSON lines {"key":..,"value":..,"headers":{..}}.
        #[arg(long)]
        input: PathBuf,
        /// Config override, key=value (repeatable).
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Output format: text prints values (with the partition for a partitioner).
        #[arg(long, value_enum, default_value_t = TestFormat::Text)]
        output: TestFormat,
    },
    /// Run a bundle locally on generated records and print its throughput.
    Bench {
        /// Bundle folder or .tar.gz.
        path: PathBuf,
        /// Records to run.
        #[arg(long, default_value_t = 1_000_000)]
        records: usize,
        /// Bytes per generated value.
        #[arg(long, default_value_t = 100)]
        record_size: usize,
        /// Records per call.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Config override, key=value (repeatable).
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

/// `plugin test --output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TestFormat {
    /// Values, one per line.
    Text,
    /// JSON lines with key, value, headers, offset, partition.
    Json,
}

/// Runs a `plugin` subcommand.
pub async fn run(global: &GlobalOpts, args: PluginArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.command {
        PluginCommand::Test {
            path,
            input,
            config,
            output,
        } => test(&mut out, &path, &input, &config, output)?,
        PluginCommand::Bench {
            path,
            records,
            record_size,
            batch,
            config,
            output,
        } => bench(
            &mut out,
            &path,
            records,
            record_size,
            batch,
            &config,
            output,
        )?,
        PluginCommand::Deploy { path, output } => {
            let admin = PluginAdmin::new(global.connect().await?);
            let bundle = Bundle::load(&path)
                .with_context(|| format!("cannot load bundle {}", path.display()))?;
            let id = bundle.id();
            let r = admin.deploy(&bundle).await.map_err(|e| match e {
                ClientError::Broker {
                    code: ErrorCode::PluginVersionConflict | ErrorCode::InvalidPlugin,
                    message,
                } => anyhow::anyhow!("cannot deploy {id}: {message}"),
                e => anyhow::Error::new(e).context(format!("cannot deploy {id}")),
            })?;
            if output == Format::Json {
                output::json(
                    &mut out,
                    &serde_json::json!({
                        "plugin": r.plugin,
                        "already_deployed": r.already_deployed,
                    }),
                )?;
            } else if r.already_deployed {
                writeln!(
                    out,
                    "{} is already deployed with the same content (digest {}); nothing changed",
                    r.plugin.id(),
                    r.plugin.digest
                )?;
            } else {
                writeln!(
                    out,
                    "deployed {} ({} {}, digest {})",
                    r.plugin.id(),
                    r.plugin.runtime,
                    r.plugin.kind,
                    r.plugin.digest
                )?;
            }
        }
        PluginCommand::List { output } => {
            let admin = PluginAdmin::new(global.connect().await?);
            let plugins = admin.list().await.context("cannot list plugins")?;
            match output {
                Format::Json => output::json(&mut out, &plugins)?,
                Format::Table => {
                    let rows: Vec<Vec<String>> = plugins
                        .iter()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                p.version.clone(),
                                p.kind.clone(),
                                p.runtime.clone(),
                                p.digest.chars().take(12).collect(),
                                p.description.clone(),
                            ]
                        })
                        .collect();
                    output::table(
                        &mut out,
                        &[
                            "NAME",
                            "VERSION",
                            "KIND",
                            "RUNTIME",
                            "DIGEST",
                            "DESCRIPTION",
                        ],
                        &rows,
                    )?;
                }
            }
        }
        PluginCommand::Describe { plugin, output } => {
            let (name, version) = parse_plugin_ref(&plugin).map_err(anyhow::Error::msg)?;
            let admin = PluginAdmin::new(global.connect().await?);
            let p = admin
                .describe(&name, version.as_deref())
                .await
                .map_err(|e| not_found(e, &plugin))?;
            match output {
                Format::Json => output::json(&mut out, &p)?,
                Format::Table => describe_table(&mut out, &p)?,
            }
        }
        PluginCommand::Remove { plugin, output } => {
            let (name, version) = parse_plugin_ref(&plugin).map_err(anyhow::Error::msg)?;
            let Some(version) = version else {
                bail!("give the exact version to remove: `quiver plugin remove {name}@VERSION` (see `quiver plugin list`)");
            };
            let admin = PluginAdmin::new(global.connect().await?);
            admin
                .remove(&name, &version)
                .await
                .map_err(|e| not_found(e, &plugin))?;
            match output {
                Format::Json => output::json(
                    &mut out,
                    &serde_json::json!({ "removed": format!("{name}@{version}") }),
                )?,
                Format::Table => writeln!(out, "removed {name}@{version}")?,
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn not_found(e: ClientError, plugin: &str) -> anyhow::Error {
    match e {
        ClientError::Broker {
            code: ErrorCode::PluginNotFound | ErrorCode::PluginInUse,
            message,
        } => anyhow::anyhow!("{message}"),
        e => anyhow::Error::new(e).context(format!("plugin {plugin}")),
    }
}

fn describe_table(out: &mut impl Write, p: &PluginInfo) -> anyhow::Result<()> {
    writeln!(out, "Plugin: {}", p.id())?;
    writeln!(out, "Kind: {}  Runtime: {}", p.kind, p.runtime)?;
    writeln!(out, "Description: {}", p.description)?;
    writeln!(out, "Digest: {}", p.digest)?;
    writeln!(out, "Size: {} bytes", p.size_bytes)?;
    let deployed =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(p.deployed_ms) * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| p.deployed_ms.to_string());
    writeln!(out, "Deployed: {deployed}")?;
    writeln!(out, "Config:")?;
    for (k, v) in &p.config {
        writeln!(out, "  {k} = {v}")?;
    }
    if p.used_by.is_empty() {
        writeln!(out, "Used by: nothing")?;
    } else {
        writeln!(out, "Used by:")?;
        for u in &p.used_by {
            writeln!(out, "  {u}")?;
        }
    }
    Ok(())
}

fn test(
    out: &mut impl Write,
    path: &Path,
    input: &Path,
    config: &[String],
    format: TestFormat,
) -> anyhow::Result<()> {
    let bundle =
        Bundle::load(path).with_context(|| format!("cannot load bundle {}", path.display()))?;
    let records = local::run_test(&bundle, input, config)?;
    let partitioner = bundle.manifest().kind == Kind::Partitioner;
    for r in records {
        match format {
            TestFormat::Text if partitioner => writeln!(
                out,
                "{}\t{}",
                r.partition,
                String::from_utf8_lossy(&r.value)
            )?,
            TestFormat::Text => writeln!(out, "{}", String::from_utf8_lossy(&r.value))?,
            TestFormat::Json => {
                let payload = JsonPayload::new(
                    r.key.as_deref(),
                    &r.value,
                    r.headers.iter().map(|(k, v)| (k.as_str(), &v[..])),
                );
                let mut line = serde_json::to_value(payload)?;
                line["timestamp"] = r.timestamp.into();
                line["offset"] = r.offset.into();
                line["partition"] = r.partition.into();
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}

fn bench(
    out: &mut impl Write,
    path: &Path,
    records: usize,
    record_size: usize,
    batch: usize,
    config: &[String],
    format: Format,
) -> anyhow::Result<()> {
    if records == 0 || batch == 0 {
        bail!("--records and --batch must be at least 1");
    }
    let bundle =
        Bundle::load(path).with_context(|| format!("cannot load bundle {}", path.display()))?;
    let r = local::run_bench_with(
        &bundle,
        records,
        record_size,
        batch,
        config,
        &local::LocalOptions::default(),
    )?;
    match format {
        Format::Json => output::json(
            out,
            &serde_json::json!({
                "plugin": r.plugin,
                "records": r.records,
                "output_records": r.output_records,
                "record_size": r.record_size,
                "batch": r.batch,
                "elapsed_ms": r.elapsed.as_secs_f64() * 1e3,
                "records_per_sec": r.records_per_sec,
                "micros_per_batch": r.micros_per_batch,
                "records_per_cpu_sec": r.records_per_cpu_sec(),
            }),
        )?,
        Format::Table => {
            writeln!(
                out,
                "{}: {} records of {} bytes in batches of {} -> {} output records",
                r.plugin, r.records, r.record_size, r.batch, r.output_records
            )?;
            writeln!(
                out,
                "{:.0} records/s, {:.1} µs per batch ({:.3} s)",
                r.records_per_sec,
                r.micros_per_batch,
                r.elapsed.as_secs_f64()
            )?;
            if let Some(c) = r.records_per_cpu_sec() {
                writeln!(out, "{c:.0} records per CPU-second of the calling thread")?;
            }
        }
    }
    Ok(())
}
