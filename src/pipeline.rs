//! `quiver pipeline validate`: checks a `pipeline.toml` (documented in
//! `config/pipeline.toml`) and prints what it describes, as a table or JSON. Running
//! pipelines (`run`, `deploy`, `status`, `stop`) comes with the pipeline runtime.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use quiver_pipeline::{PipelineConfig, StagePlugin};

use crate::output::{self, Format};

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
}

/// Runs a `pipeline` subcommand.
pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    match args.command {
        PipelineCommand::Validate { file, output } => {
            let p = PipelineConfig::load(&file)?;
            let mut out = std::io::stdout().lock();
            match output {
                Format::Json => output::json(&mut out, &p)?,
                Format::Table => {
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
                            StagePlugin::Path(path) => format!("bundle {path}"),
                        };
                        writeln!(out, "stage {i}: {what} {:?}", s.config)?;
                    }
                    writeln!(out, "sink: {}", p.sink.topic)?;
                    for (name, topic) in &p.sinks {
                        writeln!(out, "sink {name}: {topic}")?;
                    }
                    if let Some(t) = &p.on_error.topic {
                        writeln!(out, "dead letters: {t}")?;
                    }
                }
            }
            Ok(())
        }
    }
}
