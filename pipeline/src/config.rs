//! `pipeline.toml`: what a pipeline reads, the stages it runs, where it writes, what it does
//! with failures and how it runs. Documented key by key in `config/pipeline.toml`.
//!
//! Unknown keys and bad values are refused with the file, the line and the key named, before
//! anything runs: a typo in `guarantee` must not quietly give a weaker guarantee.

use std::collections::BTreeMap;
use std::path::Path;

use quiver_protocol::requests::{parse_plugin_ref, validate_group_name, validate_topic_name};
use serde::{Deserialize, Serialize};

/// Most instances one pipeline may ask for.
pub const MAX_INSTANCES: u32 = 1024;

/// A pipeline file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{file}{}{}: {reason}",
    line.map(|l| format!(":{l}")).unwrap_or_default(),
    if key.is_empty() { String::new() } else { format!(": {key}") }
)]
pub struct PipelineConfigError {
    /// The file (or "pipeline" for text without one).
    pub file: String,
    /// 1-based line of the offending key, when known.
    pub line: Option<usize>,
    /// The key path, e.g. `run.guarantee` (empty when the whole file is at fault).
    pub key: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

/// Where a pipeline starts reading partitions its group has no committed offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StartPosition {
    /// The oldest retained record.
    #[default]
    Earliest,
    /// Only records produced after the pipeline starts.
    Latest,
}

/// `[source]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Input topics.
    pub topics: Vec<String>,
    /// Where to start without a committed offset (committed offsets always win).
    #[serde(default)]
    pub start: StartPosition,
    /// The consumer group; the pipeline's name when absent.
    #[serde(default)]
    pub group: Option<String>,
}

/// The plugin a stage runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StagePlugin {
    /// A deployed plugin, `NAME@VERSION` (or `NAME`: its highest version at start).
    Deployed {
        /// Name.
        name: String,
        /// Exact version, if given.
        version: Option<String>,
    },
    /// A bundle directory or `.tar.gz`, relative to the pipeline file.
    Path(String),
}

/// `[[stages]]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    #[serde(skip_serializing_if = "Option::is_none")]
    plugin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

/// One stage: a plugin and its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageConfig {
    /// What runs.
    pub plugin: StagePlugin,
    /// Config overrides for the plugin (strings, as `--processor-config`).
    pub config: BTreeMap<String, String>,
}

/// `[sink]`: the default output topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Output topic for records a stage does not route elsewhere.
    pub topic: String,
    /// Codec of every batch the pipeline writes (outputs, dead letters, state changes).
    #[serde(default, skip_serializing_if = "SinkCompression::is_none")]
    pub compression: SinkCompression,
}

/// `[sink] compression`: how the pipeline's output batches are compressed. Consumers
/// decompress whatever codec a batch has, so this never changes what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SinkCompression {
    /// Stored as produced.
    #[default]
    None,
    /// LZ4: cheap; for values that repeat themselves (the `quiver.source` header is
    /// stored compactly whatever the codec).
    Lz4,
    /// Zstandard: smaller output for more CPU.
    Zstd,
}

impl std::str::FromStr for SinkCompression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SinkCompression::None),
            "lz4" => Ok(SinkCompression::Lz4),
            "zstd" => Ok(SinkCompression::Zstd),
            other => Err(format!("unknown codec {other:?} (use none, lz4 or zstd)")),
        }
    }
}

impl SinkCompression {
    /// The name written in `pipeline.toml`.
    pub fn name(self) -> &'static str {
        match self {
            SinkCompression::None => "none",
            SinkCompression::Lz4 => "lz4",
            SinkCompression::Zstd => "zstd",
        }
    }

    fn is_none(&self) -> bool {
        *self == SinkCompression::None
    }

    /// The batch codec.
    pub fn codec(self) -> quiver_protocol::batch::Compression {
        use quiver_protocol::batch::Compression;
        match self {
            SinkCompression::None => Compression::None,
            SinkCompression::Lz4 => Compression::Lz4,
            SinkCompression::Zstd => Compression::Zstd,
        }
    }
}

/// What happens to records a stage fails on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorPolicy {
    /// Drop them (counted in the pipeline's `errors`) and go on.
    Skip,
    /// Write exactly the failed records to `on_error.topic`, with headers naming the error,
    /// the stage and the source position, and go on.
    DeadLetter,
    /// Stop the pipeline with a clear status; nothing past the failure is committed.
    #[default]
    Stop,
}

/// `[on_error]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OnError {
    /// The policy.
    #[serde(default)]
    pub policy: ErrorPolicy,
    /// The dead-letter topic (required with `dead-letter`, refused otherwise).
    #[serde(default)]
    pub topic: Option<String>,
}

/// The delivery guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Guarantee {
    /// Output acknowledged (acks=all) before input offsets are committed: nothing lost,
    /// duplicates possible after a failure.
    #[default]
    AtLeastOnce,
    /// Output, state changes and the input offset commit become visible atomically.
    ExactlyOnce,
}

/// `[run]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Instances `pipeline deploy` runs (`pipeline run` starts its `--instances`, 1 unless
    /// given, in each process).
    #[serde(default = "one")]
    pub instances: u32,
    /// The delivery guarantee.
    #[serde(default)]
    pub guarantee: Guarantee,
}

fn one() -> u32 {
    1
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            instances: 1,
            guarantee: Guarantee::default(),
        }
    }
}

/// The file as written (before cross-key checks).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: String,
    source: SourceConfig,
    #[serde(default)]
    stages: Vec<RawStage>,
    sink: SinkConfig,
    #[serde(default)]
    sinks: BTreeMap<String, String>,
    #[serde(default)]
    on_error: OnError,
    #[serde(default)]
    run: RunConfig,
}

/// A checked pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineConfig {
    /// Pipeline name (also its consumer group unless `source.group` says otherwise).
    pub name: String,
    /// Input.
    pub source: SourceConfig,
    /// Stages, in order (none: records are copied to the sink).
    pub stages: Vec<StageConfig>,
    /// Default output.
    pub sink: SinkConfig,
    /// Named extra outputs a stage may route records to: name → topic.
    pub sinks: BTreeMap<String, String>,
    /// Failure policy.
    pub on_error: OnError,
    /// How it runs.
    pub run: RunConfig,
}

impl PipelineConfig {
    /// Why a pipeline running this file cannot be rolled to `next` with its state, if it
    /// cannot. Keyed state belongs to a stage's position in the chain (its changelog keys
    /// name the position), so each position must keep its plugin (any version); stages may
    /// be added at the end, or removed from it.
    pub fn roll_problem(&self, next: &PipelineConfig) -> Option<String> {
        let name = |p: &StagePlugin| match p {
            StagePlugin::Deployed { name, .. } => name.clone(),
            StagePlugin::Path(path) => path.clone(),
        };
        self.stages
            .iter()
            .zip(&next.stages)
            .enumerate()
            .find(|(_, (a, b))| name(&a.plugin) != name(&b.plugin))
            .map(|(i, (a, b))| {
                format!(
                    "stage {i} (stages[{i}], counting from 0) of pipeline {:?} runs plugin {:?} and the new file puts {:?} there: a stage's state belongs to its position in the chain, so a redeploy may change versions and add or remove stages at the end, but not replace or reorder them; keep the order, or stop the pipeline and deploy the new chain under another name (its state starts empty)",
                    self.name,
                    name(&a.plugin),
                    name(&b.plugin)
                )
            })
    }

    /// The stages' deployed plugins named with their version (`name@version`).
    pub fn pinned_plugins(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter_map(|s| match &s.plugin {
                StagePlugin::Deployed {
                    name,
                    version: Some(v),
                } => Some(format!("{name}@{v}")),
                _ => None,
            })
            .collect()
    }

    /// Reads and checks a pipeline file.
    pub fn load(path: &Path) -> Result<PipelineConfig, PipelineConfigError> {
        Self::parse(&read_file(path)?, &path.display().to_string())
    }

    /// Checks pipeline text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<PipelineConfig, PipelineConfigError> {
        Self::parse_with(text, file, false)
    }

    /// Reads back a file deployed earlier (kept by a broker, or held by the cluster): as
    /// [`parse`](Self::parse), but rules added since do not apply, so a pipeline deployed
    /// before them keeps running: a source topic named twice is read once, and the names
    /// refused since (`.`, `..`, `[sinks]` names outside letters, digits, `.`, `_`, `-`, a
    /// `quiver.state.*` output) are taken as they are.
    pub fn parse_stored(text: &str, file: &str) -> Result<PipelineConfig, PipelineConfigError> {
        Self::parse_with(text, file, true)
    }

    /// [`load`](Self::load) of a file deployed earlier (see [`parse_stored`](Self::parse_stored)).
    pub fn load_stored(path: &Path) -> Result<PipelineConfig, PipelineConfigError> {
        Self::parse_stored(&read_file(path)?, &path.display().to_string())
    }

    fn parse_with(
        text: &str,
        file: &str,
        stored: bool,
    ) -> Result<PipelineConfig, PipelineConfigError> {
        let mut raw: RawPipeline =
            toml::from_str(text).map_err(|e| syntax_error(text, file, &e))?;
        if stored {
            let mut seen = std::collections::BTreeSet::new();
            raw.source.topics.retain(|t| seen.insert(t.clone()));
        }
        let err = |key: &str, reason: String| PipelineConfigError {
            file: file.to_string(),
            line: line_of(text, key),
            key: key.to_string(),
            reason,
        };
        // The name is also the group's (unless `[source] group` says otherwise): the same
        // rules, said of the pipeline name.
        validate_group_name(&raw.name)
            .map_err(|r| err("name", r.replacen("group name", "pipeline name", 1)))?;
        if !stored && (raw.name == "." || raw.name == "..") {
            return Err(err(
                "name",
                format!("a pipeline cannot be named {:?}", raw.name),
            ));
        }
        // The name also names the state changelog topic, `quiver.state.<name>`.
        validate_topic_name(&format!("quiver.state.{}", raw.name)).map_err(|_| {
            err(
                "name",
                format!(
                    "{} bytes is too long: a pipeline name has at most 236",
                    raw.name.len()
                ),
            )
        })?;
        if raw.source.topics.is_empty() {
            return Err(err("source.topics", "name at least one input topic".into()));
        }
        for (i, t) in raw.source.topics.iter().enumerate() {
            check_topic(t).map_err(|r| err("source.topics", r))?;
            if raw.source.topics[..i].contains(t) {
                return Err(err(
                    "source.topics",
                    format!("{t:?} is named twice; name each input topic once"),
                ));
            }
        }
        if let Some(g) = &raw.source.group {
            validate_group_name(g).map_err(|r| err("source.group", r))?;
        }
        let mut stages = Vec::with_capacity(raw.stages.len());
        for (i, s) in raw.stages.into_iter().enumerate() {
            let key = format!("stages[{i}]");
            let plugin = match (s.plugin, s.path) {
                (Some(p), None) => {
                    let (name, version) =
                        parse_plugin_ref(&p).map_err(|r| err(&format!("{key}.plugin"), r))?;
                    StagePlugin::Deployed { name, version }
                }
                (None, Some(p)) if !p.trim().is_empty() => StagePlugin::Path(p),
                (None, Some(_)) => {
                    return Err(err(&format!("{key}.path"), "is empty".into()));
                }
                (Some(_), Some(_)) => {
                    return Err(err(
                        &key,
                        "set either `plugin = \"NAME@VERSION\"` or `path = \"DIR\"`, not both"
                            .into(),
                    ))
                }
                (None, None) => return Err(err(
                    &key,
                    "needs `plugin = \"NAME@VERSION\"` (deployed) or `path = \"DIR\"` (a bundle)"
                        .into(),
                )),
            };
            stages.push(StageConfig {
                plugin,
                config: s.config,
            });
        }
        check_output(&raw.sink.topic, stored).map_err(|r| err("sink.topic", r))?;
        let mut outputs = vec![("sink.topic".to_string(), raw.sink.topic.clone())];
        for (name, topic) in &raw.sinks {
            let key = format!("sinks.{name}");
            // A stage names the output in its `quiver.sink` header.
            if !stored {
                validate_group_name(name).map_err(|r| {
                    err(
                        &key,
                        r.replacen("group name", "output name", 1)
                            .replace("got 0", "got 0 (an empty name)"),
                    )
                })?;
            }
            check_output(topic, stored).map_err(|r| err(&key, r))?;
            outputs.push((key, topic.clone()));
        }
        match (raw.on_error.policy, &raw.on_error.topic) {
            (ErrorPolicy::DeadLetter, None) => {
                return Err(err(
                    "on_error.topic",
                    "policy \"dead-letter\" needs the dead-letter topic: add `topic = \"NAME\"`"
                        .into(),
                ))
            }
            (ErrorPolicy::DeadLetter, Some(t)) => {
                check_output(t, stored).map_err(|r| err("on_error.topic", r))?;
                outputs.push(("on_error.topic".into(), t.clone()));
            }
            (policy, Some(_)) => {
                return Err(err(
                    "on_error.topic",
                    format!(
                        "only the \"dead-letter\" policy writes to a topic; this one is {:?}",
                        policy_name(policy)
                    ),
                ))
            }
            (_, None) => {}
        }
        for (key, topic) in &outputs {
            if raw.source.topics.contains(topic) {
                return Err(err(
                    key,
                    format!(
                        "{topic:?} is also a source topic: the pipeline would read its own output"
                    ),
                ));
            }
        }
        if raw.run.instances == 0 || raw.run.instances > MAX_INSTANCES {
            return Err(err(
                "run.instances",
                format!(
                    "must be between 1 and {MAX_INSTANCES}, got {}",
                    raw.run.instances
                ),
            ));
        }
        Ok(PipelineConfig {
            name: raw.name,
            source: raw.source,
            stages,
            sink: raw.sink,
            sinks: raw.sinks,
            on_error: raw.on_error,
            run: raw.run,
        })
    }

    /// The pipeline as `pipeline.toml` text that [`PipelineConfig::parse`] reads back to
    /// the same value (what `pipeline deploy` sends to the broker).
    pub fn to_toml(&self) -> String {
        let raw = RawPipeline {
            name: self.name.clone(),
            source: self.source.clone(),
            stages: self
                .stages
                .iter()
                .map(|s| {
                    let (plugin, path) = match &s.plugin {
                        StagePlugin::Deployed { name, version } => (
                            Some(match version {
                                Some(v) => format!("{name}@{v}"),
                                None => name.clone(),
                            }),
                            None,
                        ),
                        StagePlugin::Path(p) => (None, Some(p.clone())),
                    };
                    RawStage {
                        plugin,
                        path,
                        config: s.config.clone(),
                    }
                })
                .collect(),
            sink: self.sink.clone(),
            sinks: self.sinks.clone(),
            on_error: self.on_error.clone(),
            run: self.run.clone(),
        };
        toml::to_string(&raw).expect("a checked pipeline always serializes")
    }

    /// The consumer group the pipeline's instances join.
    pub fn group(&self) -> &str {
        self.source.group.as_deref().unwrap_or(&self.name)
    }
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Guarantee::AtLeastOnce => "at-least-once",
            Guarantee::ExactlyOnce => "exactly-once",
        })
    }
}

impl std::fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(policy_name(*self))
    }
}

impl std::fmt::Display for StartPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StartPosition::Earliest => "earliest",
            StartPosition::Latest => "latest",
        })
    }
}

fn policy_name(p: ErrorPolicy) -> &'static str {
    match p {
        ErrorPolicy::Skip => "skip",
        ErrorPolicy::DeadLetter => "dead-letter",
        ErrorPolicy::Stop => "stop",
    }
}

fn check_topic(t: &str) -> Result<(), String> {
    validate_topic_name(t)?;
    if t.starts_with("__") {
        return Err(format!(
            "{t:?} is an internal topic; pipelines read and write client topics only"
        ));
    }
    Ok(())
}

/// A topic a pipeline writes to: a client topic, and not a pipeline's state changelog
/// (`quiver.state.*`), whose records the host writes and reads back as state (a file
/// `stored` before that rule is taken as it is).
fn check_output(t: &str, stored: bool) -> Result<(), String> {
    check_topic(t)?;
    if !stored && t.starts_with("quiver.state.") {
        return Err(format!(
            "{t:?} is a pipeline's state changelog; pipelines write their output to other topics"
        ));
    }
    Ok(())
}

/// A toml syntax or type error, with the line toml reports and the key it names.
fn syntax_error(text: &str, file: &str, e: &toml::de::Error) -> PipelineConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let message = e.message().to_string();
    // The key: named by the message (unknown/missing field), else the key on that line.
    let key = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field") || message.starts_with("missing field"))
        .map(str::to_string)
        .or_else(|| {
            let l = text.lines().nth(line? - 1)?;
            let (k, _) = l.split_once('=')?;
            Some(k.trim().to_string())
        })
        .unwrap_or_default();
    // Named in full (`run.instances`, `stages[0].config`), as the checks after parsing do;
    // but a field missing from the whole file (its span starts the file) is top-level,
    // and so is an unknown table (the error is on its own header).
    let whole_file = e.span().is_some_and(|s| s.start == 0);
    let table = line
        .and_then(|l| table_at(text, l))
        .filter(|_| !(whole_file && message.starts_with("missing field")))
        .filter(|t| t.split('[').next() != Some(key.as_str()));
    let key = match table {
        Some(table) if !key.is_empty() && !key.contains('.') => format!("{table}.{key}"),
        _ => key,
    };
    PipelineConfigError {
        file: file.to_string(),
        line,
        key,
        reason: message.trim().to_string(),
    }
}

/// The table that line `line` (1-based) is in: `run` under `[run]`, `stages[1]` under the
/// second `[[stages]]`; `None` above the first header.
fn table_at(text: &str, line: usize) -> Option<String> {
    let mut table = None;
    let mut arrays: BTreeMap<String, usize> = BTreeMap::new();
    for l in text.lines().take(line) {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
            let name = name.0.trim().to_string();
            let n = arrays.entry(name.clone()).or_insert(0);
            table = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split_once(']')) {
            table = Some(name.0.trim().to_string());
        }
    }
    table
}

/// A pipeline file's text, or why it cannot be read (the whole file at fault: no key).
fn read_file(path: &Path) -> Result<String, PipelineConfigError> {
    std::fs::read_to_string(path).map_err(|e| PipelineConfigError {
        file: path.display().to_string(),
        line: None,
        key: String::new(),
        reason: format!("cannot read the file: {e}"),
    })
}

/// An error at `key` of the pipeline file at `file`, with the key's line when the file
/// reads (for checks made after parsing, such as loading a stage's bundle).
pub(crate) fn error_at(file: &Path, key: &str, reason: String) -> PipelineConfigError {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    PipelineConfigError {
        file: file.display().to_string(),
        line: line_of(&text, key),
        key: key.to_string(),
        reason,
    }
}

/// The line of `key` (`table.key`, `table[i].key` or `key`): the first `key =` line inside
/// the key's table (the `i`-th of an array of tables), or the table header itself.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let plain = key.replace(['[', ']'], ".");
    let parts: Vec<&str> = plain.split('.').filter(|p| !p.is_empty()).collect();
    let (table, index, leaf) = match parts.as_slice() {
        [] => return None,
        [leaf] => (None, None, *leaf),
        [table, i, rest @ ..] if i.parse::<usize>().is_ok() => (
            Some(*table),
            i.parse::<usize>().ok(),
            rest.first().copied().unwrap_or(""),
        ),
        [table, .., leaf] if leaf.parse::<usize>().is_err() => (Some(*table), None, *leaf),
        [table, ..] => (Some(*table), None, ""),
    };
    // Lines above the first header belong to the top level.
    let mut inside = table.is_none();
    let mut seen = 0;
    let mut header_line = None;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            let name = l.trim_matches(['[', ']']).trim();
            inside = false;
            if table == Some(name) {
                inside = index.is_none_or(|n| n == seen);
                seen += 1;
                if inside && header_line.is_none() {
                    header_line = Some(i + 1);
                }
            }
            continue;
        }
        if inside && !leaf.is_empty() {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim() == leaf {
                    return Some(i + 1);
                }
            }
        }
    }
    header_line
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_name_too_long_for_its_state_topic_is_refused() {
        let long = "n".repeat(237);
        let text =
            format!("name = \"{long}\"\n[source]\ntopics = [\"a\"]\n[sink]\ntopic = \"b\"\n");
        let e = super::PipelineConfig::parse(&text, "p.toml").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("name", Some(1)), "{e}");
        assert!(e.reason.contains("at most 236"), "{e}");
        let ok = text.replace(&long, &"n".repeat(236));
        super::PipelineConfig::parse(&ok, "p.toml").unwrap();
    }

    #[test]
    fn to_toml_reads_back_to_the_same_pipeline() {
        for text in [
            include_str!("../../config/pipeline.toml"),
            "name = \"p\"\n[source]\ntopics = [\"a\", \"b\"]\nstart = \"latest\"\ngroup = \"g\"\n[[stages]]\npath = \"x\"\n[[stages]]\nplugin = \"y\"\nconfig = { k = \"v\" }\n[sink]\ntopic = \"o\"\ncompression = \"zstd\"\n[sinks]\nlong = \"l\"\n[on_error]\npolicy = \"skip\"\n",
        ] {
            let p = super::PipelineConfig::parse(text, "t").unwrap();
            let back = super::PipelineConfig::parse(&p.to_toml(), "back").unwrap();
            assert_eq!(back, p, "{}", p.to_toml());
        }
    }

    use super::*;

    const WORDCOUNT: &str = r#"
name = "wordcount"
[source]
topics = ["lines"]
start = "earliest"
[[stages]]
plugin = "split-words@1.0.0"
config = { lowercase = "true" }
[[stages]]
plugin = "count@1.0.0"
[sink]
topic = "counts"
[on_error]
policy = "dead-letter"
topic = "wordcount-dlq"
[run]
instances = 3
guarantee = "exactly-once"
"#;

    #[test]
    fn the_issue_example_parses() {
        let p = PipelineConfig::parse(WORDCOUNT, "wordcount.toml").unwrap();
        assert_eq!(p.name, "wordcount");
        assert_eq!(p.group(), "wordcount");
        assert_eq!(p.source.start, StartPosition::Earliest);
        assert_eq!(p.stages.len(), 2);
        assert_eq!(
            p.stages[0].plugin,
            StagePlugin::Deployed {
                name: "split-words".into(),
                version: Some("1.0.0".into())
            }
        );
        assert_eq!(p.stages[0].config["lowercase"], "true");
        assert_eq!(p.on_error.policy, ErrorPolicy::DeadLetter);
        assert_eq!(p.run.instances, 3);
        assert_eq!(p.run.guarantee, Guarantee::ExactlyOnce);
    }

    #[test]
    fn the_documented_sample_parses() {
        let text = include_str!("../../config/pipeline.toml");
        PipelineConfig::parse(text, "config/pipeline.toml").unwrap();
    }

    #[test]
    fn defaults_are_the_cautious_ones() {
        let p = PipelineConfig::parse(
            "name = \"copy\"\n[source]\ntopics = [\"a\"]\n[sink]\ntopic = \"b\"\n",
            "p",
        )
        .unwrap();
        assert!(p.stages.is_empty());
        assert_eq!(p.on_error.policy, ErrorPolicy::Stop);
        assert_eq!(p.run.guarantee, Guarantee::AtLeastOnce);
        assert_eq!(p.run.instances, 1);
        assert_eq!(p.sink.compression, SinkCompression::None);
    }

    fn error(text: &str) -> PipelineConfigError {
        PipelineConfig::parse(text, "p.toml").unwrap_err()
    }

    /// Names that pass the character rules but make no sense here: a pipeline called "."
    /// (its changelog would be `quiver.state..`), an output named with nothing or spaces
    /// (a stage names it in a header), and a pipeline's state changelog as an output.
    #[test]
    fn odd_names_and_changelogs_as_outputs_are_refused() {
        let copy = "name = \"copy\"\n[source]\ntopics = [\"a\"]\n[sink]\ntopic = \"b\"\n";
        for dot in [".", ".."] {
            let e = error(&copy.replace("\"copy\"", &format!("{dot:?}")));
            assert_eq!(e.key, "name", "{e}");
        }
        for name in ["\"\"", "\"a b\""] {
            let e = error(&format!("{copy}[sinks]\n{name} = \"c\"\n"));
            assert!(e.key.starts_with("sinks."), "{e}");
            assert!(e.reason.contains("output name"), "{e}");
        }
        let e = error(&copy.replace("topic = \"b\"", "topic = \"quiver.state.copy\""));
        assert_eq!(e.key, "sink.topic", "{e}");
        assert!(e.reason.contains("state changelog"), "{e}");
        let e = error(&format!("{copy}[sinks]\nside = \"quiver.state.other\"\n"));
        assert_eq!(e.key, "sinks.side", "{e}");
        // Read as a source (to inspect it), a changelog is a topic like any other.
        PipelineConfig::parse(&copy.replace("[\"a\"]", "[\"quiver.state.x\"]"), "p").unwrap();
        // A pipeline deployed before these rules still reads back (it keeps running).
        let old = format!(
            "{}[sinks]\n\"a b\" = \"quiver.state.other\"\n",
            copy.replace("\"copy\"", "\".\"")
        );
        assert!(PipelineConfig::parse(&old, "p").is_err());
        let stored = PipelineConfig::parse_stored(&old, "stored").unwrap();
        assert_eq!(stored.sinks["a b"], "quiver.state.other");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_file_line_and_key() {
        let e = error(&WORDCOUNT.replace("instances = 3", "instancs = 3"));
        assert_eq!(e.key, "run.instancs");
        assert_eq!(e.line, Some(17), "{e}");
        assert!(e.to_string().starts_with("p.toml:17: run.instancs:"), "{e}");
        let e = error(&WORDCOUNT.replace("\"exactly-once\"", "\"exactly-twice\""));
        assert_eq!((e.key.as_str(), e.line), ("run.guarantee", Some(18)), "{e}");
        assert!(e.reason.contains("exactly-twice"), "{e}");
        let e = error(&WORDCOUNT.replace("instances = 3", "instances = \"three\""));
        assert_eq!((e.key.as_str(), e.line), ("run.instances", Some(17)), "{e}");
        let e = error(&WORDCOUNT.replace(
            "plugin = \"count@1.0.0\"",
            "plugin = \"count@1.0.0\"\nconfg = {}",
        ));
        assert_eq!(e.key, "stages[1].confg", "{e}");
        let e = error(&WORDCOUNT.replace("instances = 3", "instances = 0"));
        assert_eq!((e.key.as_str(), e.line), ("run.instances", Some(17)), "{e}");
        let e = error(&WORDCOUNT.replace("topic = \"wordcount-dlq\"", ""));
        assert_eq!(e.key, "on_error.topic", "{e}");
        let e = error(&WORDCOUNT.replace("topic = \"counts\"", "topic = \"lines\""));
        assert_eq!((e.key.as_str(), e.line), ("sink.topic", Some(12)), "{e}");
        assert!(e.reason.contains("read its own output"), "{e}");
        let e = error(&WORDCOUNT.replace("\"lines\"]", "\"__consumer_offsets\"]"));
        assert_eq!(e.key, "source.topics", "{e}");
        let e = error(&WORDCOUNT.replace("\"lines\"]", "\"lines\", \"lines\"]"));
        assert_eq!(e.key, "source.topics", "{e}");
        assert!(e.reason.contains("\"lines\" is named twice"), "{e}");
        // A file deployed before the rule is read back with the topic once.
        let twice = WORDCOUNT.replace("\"lines\"]", "\"lines\", \"lines\"]");
        let stored = PipelineConfig::parse_stored(&twice, "stored").unwrap();
        assert_eq!(stored.source.topics, ["lines"]);
        let e = error(&WORDCOUNT.replace("name = \"wordcount\"", "name = \"word count\""));
        assert!(e.reason.starts_with("pipeline name \"word count\""), "{e}");
        let e = error(&WORDCOUNT.replace(
            "plugin = \"count@1.0.0\"",
            "plugin = \"count@1.0.0\"\npath = \"x\"",
        ));
        assert_eq!(e.key, "stages[1]", "{e}");
        let e = error(&WORDCOUNT.replace("plugin = \"count@1.0.0\"", ""));
        assert_eq!(e.key, "stages[1]", "{e}");
        let e = error(&WORDCOUNT.replace("name = \"wordcount\"", ""));
        assert_eq!(e.key, "name", "{e}");
        // The second stage's key is found in the second stage, not the first.
        let e = error(&WORDCOUNT.replace("plugin = \"count@1.0.0\"", "plugin = \"Count\""));
        assert_eq!(
            (e.key.as_str(), e.line),
            ("stages[1].plugin", Some(10)),
            "{e}"
        );
        let e = error(&WORDCOUNT.replace(
            "plugin = \"count@1.0.0\"",
            "plugin = \"count@1.0.0\"\nconfig = { k = 1 }",
        ));
        assert_eq!(e.line, Some(11), "{e}");
        // A missing top-level key in a file that starts with a table; an unknown table.
        let e = error("[source]\ntopics = [\"a\"]\n[sink]\ntopic = \"b\"\n");
        assert_eq!(e.key, "name", "{e}");
        let e = error(&format!("{WORDCOUNT}[runn]\nx = 1\n"));
        assert_eq!(e.key, "runn", "{e}");
        let e = error(&WORDCOUNT.replace(
            "topic = \"counts\"",
            "topic = \"counts\"\ncompression = \"snappy\"",
        ));
        assert_eq!(
            (e.key.as_str(), e.line),
            ("sink.compression", Some(13)),
            "{e}"
        );
        assert!(
            e.reason.contains("snappy") && e.reason.contains("lz4"),
            "{e}"
        );
    }

    #[test]
    fn a_roll_keeps_each_positions_plugin_and_may_grow_or_shrink_at_the_end() {
        let file = |stages: &[&str]| {
            let mut t = String::from("name = \"p\"\n[source]\ntopics = [\"in\"]\n");
            for s in stages {
                t.push_str(&format!("[[stages]]\nplugin = \"{s}\"\n"));
            }
            t.push_str("[sink]\ntopic = \"out\"\n");
            PipelineConfig::parse(&t, "test").unwrap()
        };
        let running = file(&["split@1.0.0", "count@1.0.0"]);
        for ok in [
            file(&["split@2.0.0", "count@1.0.1"]),
            file(&["split@1.0.0", "count@1.0.0", "format@1.0.0"]),
            file(&["split@1.0.0"]),
        ] {
            assert_eq!(running.roll_problem(&ok), None);
        }
        let problem = running
            .roll_problem(&file(&["lower@1.0.0", "split@1.0.0", "count@1.0.0"]))
            .expect("an inserted first stage is refused");
        assert!(
            problem.contains("stage 0 (stages[0]") && problem.contains("\"split\""),
            "{problem}"
        );
        assert!(running
            .roll_problem(&file(&["count@1.0.0", "split@1.0.0"]))
            .is_some());
    }
}
