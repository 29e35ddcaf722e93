//! The stage chain of one input partition: the pipeline's plugins built once per partition
//! (so a stateful plugin keeps state per partition), each with its own keyed-state store, and
//! the error policy applied when a stage fails. A failed call is retried record by record
//! (a call can fail as a whole, by a limit a large batch reaches, where no record does);
//! a record that fails alone ends the run under "stop", and is set aside under "skip" and
//! "dead-letter" while the rest go on. A quarantined plugin always ends the run. Plugin
//! calls block: callers run [`PartitionChain::process`] off the async threads.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use quiver_client::{Client, PluginAdmin};
use quiver_plugins::state::DEFAULT_STATE_LIMIT_BYTES;
use quiver_plugins::{
    Bundle, HostLimits, Kind, MemoryStateStore, PluginConfig, PluginError, Processor, Record,
    StateScope,
};

use crate::error::RuntimeError;
use crate::{ErrorPolicy, PipelineConfig, StagePlugin};

/// Records handed to one plugin call at most (encoded bytes), well under the output limit
/// of a call (16 MiB by default) for plugins that do not amplify.
pub const CALL_INPUT_BYTES: usize = 256 * 1024;
/// Records handed to one plugin call at most. A call's CPU limit (100 ms by default) covers
/// all its records: 1 MiB of 100-byte records (about 9,000) through a Lua filter that does
/// nothing once took past 100 ms (then measured on the wall clock, on a loaded 2-core
/// machine), and the pipeline stopped. 2,048 records leave that plugin a tenth of its limit.
pub const CALL_INPUT_RECORDS: usize = 2048;

/// A stage's plugin, loaded once per run and built once per input partition.
#[derive(Clone)]
pub struct LoadedStage {
    /// `name@version`.
    pub id: String,
    /// The bundle.
    pub bundle: Arc<Bundle>,
    /// Config overrides from the pipeline file.
    pub config: BTreeMap<String, String>,
}

/// Loads every stage's bundle: deployed plugins from the cluster, `path` bundles relative to
/// `base_dir` (the pipeline file's folder). Refuses bundles that are not processors.
pub async fn load_stages(
    client: &Client,
    config: &PipelineConfig,
    base_dir: &Path,
) -> Result<Vec<LoadedStage>, RuntimeError> {
    let admin = PluginAdmin::new(client.clone());
    let mut stages = Vec::with_capacity(config.stages.len());
    for (i, stage) in config.stages.iter().enumerate() {
        let bundle =
            match &stage.plugin {
                StagePlugin::Deployed { name, version } => {
                    let (_, bundle) = admin.get(name, version.as_deref()).await.map_err(|e| {
                        RuntimeError::Stage {
                            stage: i,
                            reason: format!("cannot load plugin {name}: {e}"),
                        }
                    })?;
                    bundle
                }
                StagePlugin::Path(p) => load_path_bundle(i, &base_dir.join(p))?,
            };
        check_processor(i, &bundle)?;
        let deployed = matches!(stage.plugin, StagePlugin::Deployed { .. });
        check_stage_config(i, &bundle, &stage.config, deployed)?;
        stages.push(LoadedStage {
            id: bundle.id(),
            bundle: Arc::new(bundle),
            config: stage.config.clone(),
        });
    }
    Ok(stages)
}

/// Checks the `path` stages of the pipeline file at `file` as a run would (each bundle
/// loads, is a processor, and takes the config keys the file sets), without a cluster:
/// what `pipeline validate` can check of the stages. A failure names the file, the line
/// and the key `stages[i].path`. Returns how many stages were checked; stages naming a
/// deployed `plugin` are checked by `run` and `deploy`, against the cluster.
pub fn check_path_stages(
    config: &PipelineConfig,
    file: &Path,
) -> Result<usize, crate::PipelineConfigError> {
    let base_dir = file.parent().unwrap_or(Path::new("."));
    let mut checked = 0;
    for (i, stage) in config.stages.iter().enumerate() {
        let StagePlugin::Path(p) = &stage.plugin else {
            continue;
        };
        let at = |key: &str, e: RuntimeError| {
            let reason = match e {
                RuntimeError::Stage { reason, .. } => reason,
                other => other.to_string(),
            };
            crate::config::error_at(file, &format!("stages[{i}].{key}"), reason)
        };
        let bundle = load_path_bundle(i, &base_dir.join(p)).map_err(|e| at("path", e))?;
        check_processor(i, &bundle).map_err(|e| at("path", e))?;
        check_stage_config(i, &bundle, &stage.config, false).map_err(|e| at("config", e))?;
        checked += 1;
    }
    Ok(checked)
}

/// The bundle of a `path` stage.
fn load_path_bundle(stage: usize, path: &Path) -> Result<Bundle, RuntimeError> {
    Bundle::load(path).map_err(|e| RuntimeError::Stage {
        stage,
        reason: format!("cannot load bundle {}: {e}", path.display()),
    })
}

/// A stage runs processors only.
fn check_processor(stage: usize, bundle: &Bundle) -> Result<(), RuntimeError> {
    if bundle.manifest().kind != Kind::Processor {
        return Err(RuntimeError::Stage {
            stage,
            reason: format!("{} is a partitioner, not a processor", bundle.id()),
        });
    }
    Ok(())
}

/// A stage's `config` may only set keys its plugin declares in `[config]` of its
/// `plugin.toml` (see [`quiver_plugins::check_config_keys`]).
fn check_stage_config(
    stage: usize,
    bundle: &Bundle,
    config: &BTreeMap<String, String>,
    deployed: bool,
) -> Result<(), RuntimeError> {
    let declared = &bundle.manifest().config;
    quiver_plugins::check_config_keys(&bundle.id(), declared, config.keys(), deployed)
        .map_err(|reason| RuntimeError::Stage { stage, reason })
}

/// Empty state stores for every stage of `pipeline` reading `topic`/`partition`.
pub fn fresh_stores(
    pipeline: &str,
    stages: usize,
    topic: &str,
    partition: u32,
) -> Vec<Arc<MemoryStateStore>> {
    (0..stages)
        .map(|i| {
            Arc::new(MemoryStateStore::new(
                StateScope::new(pipeline, i as u32, topic, partition as i32),
                DEFAULT_STATE_LIMIT_BYTES,
            ))
        })
        .collect()
}

/// A record a stage failed on.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The record as the stage received it.
    pub record: Record,
    /// Stage index.
    pub stage: usize,
    /// `name@version` of the stage's plugin.
    pub stage_id: String,
    /// The plugin's error.
    pub error: String,
}

/// What one batch through the chain produced.
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// Records out of the last stage, in order.
    pub records: Vec<Record>,
    /// Records set aside under "skip" or "dead-letter".
    pub failed: Vec<Failure>,
    /// Why the run must stop (policy "stop", or a quarantined plugin); nothing of this
    /// batch may be written or committed.
    pub fatal: Option<String>,
}

struct Stage {
    id: String,
    processor: Box<dyn Processor>,
}

/// The stage instances of one input partition.
pub struct PartitionChain {
    stages: Vec<Stage>,
    policy: ErrorPolicy,
}

impl PartitionChain {
    /// Builds every stage of one input partition, stage `i` keeping its state in
    /// `stores[i]` (see [`fresh_stores`]).
    pub fn build(
        stages: &[LoadedStage],
        stores: &[Arc<MemoryStateStore>],
        limits: &HostLimits,
        policy: ErrorPolicy,
    ) -> Result<PartitionChain, PluginError> {
        let mut built = Vec::with_capacity(stages.len());
        for (s, store) in stages.iter().zip(stores) {
            let store: Arc<dyn quiver_plugins::StateStore> = store.clone();
            let mut config = PluginConfig::new(s.bundle.clone())
                .limits(limits.clone())
                .state(store);
            for (k, v) in &s.config {
                config = config.set(k, v);
            }
            built.push(Stage {
                id: s.id.clone(),
                processor: config.build_processor()?,
            });
        }
        Ok(PartitionChain {
            stages: built,
            policy,
        })
    }

    /// Runs `input` (records of this partition, in offset order) through every stage, in
    /// calls of at most [`CALL_INPUT_BYTES`] and [`CALL_INPUT_RECORDS`] of records each (a
    /// poll may hold far more than one call's output or time limit).
    pub fn process(&mut self, input: Vec<Record>) -> ChainOutput {
        let mut out = ChainOutput::default();
        if self.stages.is_empty() {
            out.records = input;
            return out;
        }
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut rest = input.into_iter().peekable();
        while let Some(r) = rest.next() {
            bytes += r.encoded_len();
            chunk.push(r);
            if bytes >= CALL_INPUT_BYTES
                || chunk.len() >= CALL_INPUT_RECORDS
                || rest.peek().is_none()
            {
                let part = self.process_call(std::mem::take(&mut chunk));
                if out.records.is_empty() {
                    out.records = part.records;
                } else {
                    out.records.extend(part.records);
                }
                out.failed.extend(part.failed);
                if part.fatal.is_some() {
                    out.fatal = part.fatal;
                    out.records.clear();
                    out.failed.clear();
                    return out;
                }
                bytes = 0;
            }
        }
        out
    }

    /// One call's worth of records through every stage.
    fn process_call(&mut self, input: Vec<Record>) -> ChainOutput {
        let mut out = ChainOutput::default();
        // Where a failure that stops the pipeline lies: the call's input offsets.
        let offsets = (
            input.first().map_or(0, |r| r.offset),
            input.last().map_or(0, |r| r.offset),
        );
        let mut batch = input;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            if batch.is_empty() {
                break;
            }
            // Kept to retry record by record: a call fails as a whole (one bad record, or
            // a limit of the call, such as its CPU time, that a large batch reached).
            // Cloning shares the records' bytes.
            let retry = batch.clone();
            let failed_call = match stage.processor.process_batch(batch) {
                Ok(next) => {
                    batch = next;
                    continue;
                }
                Err(e) if e.is_quarantined() => {
                    out.fatal = Some(stopping(i, &stage.id, &e, self.policy, offsets));
                    return out;
                }
                Err(e) => e,
            };
            let mut next = Vec::new();
            // A one-record call's error is that record's: it is not called again.
            let mut own_error = (retry.len() == 1).then_some(failed_call);
            for r in retry {
                let result = match own_error.take() {
                    Some(e) => Err(e),
                    None => stage.processor.process_batch(vec![r.clone()]),
                };
                match result {
                    Ok(o) => next.extend(o),
                    Err(e) if e.is_quarantined() => {
                        out.fatal = Some(stopping(i, &stage.id, &e, self.policy, offsets));
                        return out;
                    }
                    Err(e) if self.policy == ErrorPolicy::Stop => {
                        // A later stage's record carries the offset its plugin gave it:
                        // kept within the call's input.
                        let offset = r.offset.clamp(offsets.0, offsets.1);
                        let at = (offset, offset);
                        out.fatal = Some(stopping(i, &stage.id, &e, self.policy, at));
                        return out;
                    }
                    Err(e) => out.failed.push(Failure {
                        record: r,
                        stage: i,
                        stage_id: stage.id.clone(),
                        error: e.to_string(),
                    }),
                }
            }
            batch = next;
        }
        out.records = batch;
        out
    }
}

/// Why a stage's error stops the pipeline, on one line (it is the state `pipeline list`
/// shows): the stage, its plugin where the error does not name it, the input offsets of
/// the failing call (the record that failed alone; a range only for a call that got the
/// plugin quarantined, which fails as a whole), the error and, when the policy "stop" is
/// why, how to go on past failing records instead.
fn stopping(
    stage: usize,
    plugin: &str,
    e: &PluginError,
    policy: ErrorPolicy,
    (first, last): (i64, i64),
) -> String {
    let error = e
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let stage = if error.contains(plugin) {
        format!("stage {stage}")
    } else {
        format!("stage {stage} ({plugin})")
    };
    let which = if first == last {
        format!("{stage}, at the record of offset {first},")
    } else {
        format!("{stage}, at a record of offsets {first}-{last},")
    };
    if e.is_quarantined() || policy != ErrorPolicy::Stop {
        format!("{which} failed: {error}")
    } else {
        format!(
            "{which} failed: {error} (on_error.policy = \"stop\" stops the pipeline at a poll with a failing record, writing and committing nothing of that poll; \"skip\" or \"dead-letter\" go on past failing records)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Lua processor bundle `t@1.0.0` running `script`; `extra` is appended to its
    /// `plugin.toml` (e.g. a `[config]` table).
    fn lua_bundle(script: &str, extra: &str) -> Bundle {
        let manifest = format!("name = \"t\"\nversion = \"1.0.0\"\nkind = \"processor\"\nruntime = \"lua\"\nentry = \"t.lua\"\n{extra}");
        let files = [
            ("plugin.toml".to_string(), manifest.into_bytes()),
            ("t.lua".to_string(), script.as_bytes().to_vec()),
        ]
        .into_iter()
        .collect();
        Bundle::from_files(files, Path::new("<test>")).unwrap()
    }

    fn lua_stage(script: &str) -> LoadedStage {
        let bundle = lua_bundle(script, "");
        LoadedStage {
            id: bundle.id(),
            bundle: Arc::new(bundle),
            config: BTreeMap::new(),
        }
    }

    const PICKY: &str = r#"
function process(record)
  if string.find(record.value, "bad", 1, true) then error("refusing " .. record.value) end
  return { key = record.key, value = string.upper(record.value) }
end
"#;

    fn records(values: &[&str]) -> Vec<Record> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Record {
                offset: 10 + i as i64,
                ..Record::from_value(v.to_string())
            })
            .collect()
    }

    fn chain(policy: ErrorPolicy) -> PartitionChain {
        PartitionChain::build(
            &[lua_stage(PICKY)],
            &fresh_stores("p", 1, "in", 0),
            &HostLimits::default(),
            policy,
        )
        .unwrap()
    }

    #[test]
    fn dead_letter_sets_aside_exactly_the_failing_records() {
        let mut c = chain(ErrorPolicy::DeadLetter);
        let out = c.process(records(&["a", "bad1", "b", "bad2", "c"]));
        assert!(out.fatal.is_none());
        let values: Vec<_> = out.records.iter().map(|r| r.value.clone()).collect();
        assert_eq!(values, vec!["A", "B", "C"]);
        let failed: Vec<_> = out.failed.iter().map(|f| f.record.offset).collect();
        assert_eq!(failed, vec![11, 13]);
        assert!(
            out.failed[0].error.contains("refusing bad1"),
            "{}",
            out.failed[0].error
        );
        assert_eq!(out.failed[0].stage_id, "t@1.0.0");
        // Outputs keep their input's offset (for the `quiver.source` header).
        let offsets: Vec<_> = out.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![10, 12, 14]);
    }

    #[test]
    fn stop_policy_ends_the_run_and_outputs_nothing_of_the_batch() {
        let mut c = chain(ErrorPolicy::Stop);
        let out = c.process(records(&["a", "bad1", "b"]));
        assert!(out.records.is_empty() && out.failed.is_empty());
        // One line: the stage, the error (naming its plugin once) and the way past it.
        // The failing call is tried again record by record: the record that fails alone
        // is named.
        let fatal = out.fatal.unwrap();
        assert!(
            fatal.starts_with(
                "stage 0, at the record of offset 11, failed: plugin t@1.0.0: Lua error:"
            ) && fatal.contains("refusing bad1")
                && fatal.ends_with("\"skip\" or \"dead-letter\" go on past failing records)")
                && !fatal.contains('\n'),
            "{fatal}"
        );
        // A call of one record names it.
        let one = chain(ErrorPolicy::Stop)
            .process(records(&["bad1"]))
            .fatal
            .unwrap();
        assert!(
            one.starts_with("stage 0, at the record of offset 10, failed:"),
            "{one}"
        );
    }

    /// A call can fail as a whole where none of its records does: here its output passes
    /// the per-call limit (a large batch reaching the CPU limit is the same). Every policy,
    /// "stop" included, tries its records one by one, and none fails. Before, "stop" ended
    /// the pipeline at once, so it ran on a trickle of input and failed on a backlog.
    #[test]
    fn a_call_failing_only_as_a_whole_is_retried_record_by_record_under_every_policy() {
        const BIG: &str = r#"
function process(record)
  return { value = string.rep("x", 600) }
end
"#;
        for policy in [
            ErrorPolicy::Stop,
            ErrorPolicy::Skip,
            ErrorPolicy::DeadLetter,
        ] {
            let limits = HostLimits {
                max_output_bytes: 1000,
                ..HostLimits::default()
            };
            let mut c = PartitionChain::build(
                &[lua_stage(BIG)],
                &fresh_stores("p", 1, "in", 0),
                &limits,
                policy,
            )
            .unwrap();
            let out = c.process(records(&["a", "b", "c"]));
            assert!(out.fatal.is_none(), "{policy:?}: {:?}", out.fatal);
            assert!(out.failed.is_empty(), "{policy:?}");
            let offsets: Vec<_> = out.records.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, vec![10, 11, 12], "{policy:?}");
        }
    }

    #[test]
    fn a_quarantined_plugin_ends_the_run_whatever_the_policy() {
        let mut c = chain(ErrorPolicy::Skip);
        // Every record fails: after 5 failed calls in a row the plugin is quarantined.
        let out = c.process(records(&["bad1", "bad2", "bad3", "bad4", "bad5", "bad6"]));
        let fatal = out.fatal.expect("quarantine must stop the run");
        assert!(fatal.contains("quarantined"), "{fatal}");
    }

    #[test]
    fn a_large_poll_is_cut_into_calls_under_the_output_limit() {
        let mut c = chain(ErrorPolicy::Stop);
        let big = "x".repeat(1000);
        let values: Vec<&str> = (0..30_000).map(|_| big.as_str()).collect();
        // 30 MB of input: one call would exceed the 16 MiB output limit.
        let out = c.process(records(&values));
        assert!(out.fatal.is_none(), "{:?}", out.fatal);
        assert_eq!(out.records.len(), 30_000);
    }

    #[test]
    fn a_stage_config_key_its_plugin_does_not_declare_is_refused() {
        let bundle = lua_bundle(PICKY, "[config]\npattern = \"ERROR\"\n");
        let set = |k: &str| BTreeMap::from([(k.to_string(), "x".to_string())]);
        check_stage_config(0, &bundle, &set("pattern"), true).unwrap();
        check_stage_config(0, &bundle, &BTreeMap::new(), true).unwrap();
        let err = check_stage_config(1, &bundle, &set("patern"), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"patern\"")
                && err.contains("it takes: pattern")
                && err.contains("t@1.0.0")
                && err.contains("see `quiver plugin describe t`"),
            "{err}"
        );
        // A plugin without `[config]` takes none; a local bundle is looked up in its file.
        let bare = lua_stage(PICKY);
        let err = check_stage_config(0, &bare.bundle, &set("lowercase"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("takes no config") && err.contains("in its plugin.toml"),
            "{err}"
        );
    }

    /// `pipeline validate` loads the `path` stages' bundles: a missing bundle and a key its
    /// plugin does not take are named with the file, line and key (a missing path passed
    /// before), and deployed plugins are left to run and deploy.
    #[test]
    fn path_stages_are_checked_offline_with_the_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("picky");
        std::fs::create_dir(&bundle).unwrap();
        std::fs::write(
            bundle.join("plugin.toml"),
            "name = \"picky\"\nversion = \"1.0.0\"\nkind = \"processor\"\nruntime = \"lua\"\nentry = \"p.lua\"\n[config]\nword = \"x\"\n",
        )
        .unwrap();
        std::fs::write(bundle.join("p.lua"), PICKY).unwrap();
        let check = |stages: &str| {
            let file = dir.path().join("p.toml");
            let text = format!(
                "name = \"p\"\n[source]\ntopics = [\"in\"]\n{stages}[sink]\ntopic = \"out\"\n"
            );
            std::fs::write(&file, &text).unwrap();
            let config = PipelineConfig::parse(&text, "p.toml").unwrap();
            check_path_stages(&config, &file)
        };
        let two = "[[stages]]\nplugin = \"other@1.0.0\"\n[[stages]]\npath = \"picky\"\nconfig = { word = \"y\" }\n";
        assert_eq!(
            check(two),
            Ok(1),
            "the deployed plugin is left to run and deploy"
        );
        let e = check("[[stages]]\npath = \"pickyy\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(5), "stages[0].path"), "{e}");
        assert!(e.reason.contains("cannot load bundle"), "{e}");
        let e = check("[[stages]]\npath = \"picky\"\nconfig = { wrod = \"y\" }\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(6), "stages[0].config"),
            "{e}"
        );
        assert!(e.reason.contains("it takes: word"), "{e}");
    }

    #[test]
    fn no_stage_copies_records() {
        let mut c =
            PartitionChain::build(&[], &[], &HostLimits::default(), ErrorPolicy::Stop).unwrap();
        let out = c.process(records(&["x", "y"]));
        assert_eq!(out.records.len(), 2);
    }
}
