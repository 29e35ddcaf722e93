//! A running pipeline in this process: `instances` group members sharing one client, each
//! supervised (a cluster error makes it join again after a backoff; a pipeline failure stops
//! every instance and leaves the reason in the state), with the counters and the status
//! `pipeline status` prints. A running deployment can be rolled to a new version of its file
//! one instance at a time ([`Deployment::roll`]). Used by `quiver pipeline run` (one instance, in the CLI) and by
//! the broker's pipeline host (`pipeline deploy`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_client::{Admin, Backoff, Client, ClientError};
use quiver_plugins::HostLimits;
use quiver_protocol::requests::{PipelineInstance, PipelineStatus};
use quiver_protocol::ErrorCode;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::RuntimeError;
use crate::instance::{run_instance, InstanceParts, InstanceView, Plan, StopSignal};
use crate::metrics::PipelineMetrics;
use crate::progress::{CommitMetadata, PartitionCounts};
use crate::stages::{load_stages, LoadedStage};
use crate::PipelineConfig;

/// State text of a pipeline whose instances run.
pub const RUNNING: &str = "running";
/// State text of a pipeline that was stopped.
pub const STOPPED: &str = "stopped";

struct Instance {
    number: u32,
    id: String,
    view: Arc<InstanceView>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Instance {
    /// Stops this instance (it commits what it finished and leaves) and waits for it. One
    /// still busy after 30 s (e.g. restoring a large state, which does not watch for the
    /// stop) is aborted and taken out of its group: once this returns the instance commits
    /// nothing more, and its partitions can go to another member at once.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(30), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
            tracing::warn!(instance = %self.id, "instance did not stop within 30 s; aborted");
            self.view.leave_group(&self.id).await;
        }
    }
}

/// A pipeline running in this process.
pub struct Deployment {
    plan: Arc<Plan>,
    broker: u32,
    client: Client,
    metrics: Arc<PipelineMetrics>,
    state: Arc<Mutex<String>>,
    stop: Arc<watch::Sender<bool>>,
    instances: Vec<Instance>,
    /// Why this broker still runs this (older) file: it could not roll to the cluster's.
    roll_failure: Option<String>,
    /// Where its instances run, after their id in the client id their group shows (see
    /// [`member_client_id`]): `None` inside a broker, else this process.
    process: Option<String>,
}

impl Deployment {
    /// The plugins (`name@version`) its stages load.
    pub fn plugin_ids(&self) -> Vec<String> {
        self.plan.stages.iter().map(|s| s.id.clone()).collect()
    }
}

/// Checks that `config` can run against this cluster before anything starts: every source
/// and output topic exists (a missing one is named, with the command that creates it), and
/// every stage's plugin loads. Returns the loaded stages.
pub async fn preflight(
    client: &Client,
    config: &PipelineConfig,
    base_dir: &Path,
) -> Result<Vec<LoadedStage>, RuntimeError> {
    check_all_topics(client, config).await?;
    load_stages(client, config, base_dir).await
}

/// Checks that every topic the pipeline reads or writes exists (`pipeline deploy` checks
/// this before it deploys any `path` stage's bundle, so a refused deploy changes nothing).
pub async fn check_all_topics(
    client: &Client,
    config: &PipelineConfig,
) -> Result<(), RuntimeError> {
    let sources = config
        .source
        .topics
        .iter()
        .map(|t| ("source.topics".to_string(), t));
    check_topics(client, sources.chain(output_topics(config))).await
}

/// Checks that the topics the pipeline writes to exist: an instance (re)starting checks
/// them before it reads anything, so an output deleted while the pipeline runs is waited
/// for, not met again at every attempt after the attempt's other outputs were written
/// (at least once, each attempt wrote those again).
pub async fn check_outputs(client: &Client, config: &PipelineConfig) -> Result<(), RuntimeError> {
    check_topics(client, output_topics(config)).await
}

/// The topics a pipeline writes to, each with its key in the file.
fn output_topics(config: &PipelineConfig) -> impl Iterator<Item = (String, &String)> {
    std::iter::once(("sink.topic".to_string(), &config.sink.topic))
        .chain(config.sinks.iter().map(|(n, t)| (format!("sinks.{n}"), t)))
        .chain(
            config
                .on_error
                .topic
                .iter()
                .map(|t| ("on_error.topic".to_string(), t)),
        )
}

/// Fails with [`RuntimeError::Topic`] naming every one of `topics` the cluster lacks.
async fn check_topics<'a>(
    client: &Client,
    topics: impl Iterator<Item = (String, &'a String)>,
) -> Result<(), RuntimeError> {
    let admin = Admin::new(client.clone());
    let mut missing: Vec<(String, &str)> = Vec::new();
    for (key, topic) in topics {
        match admin.describe_topic(topic).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::UnknownTopicOrPartition) => {
                // A topic named by several keys (a sink that is also the dead-letter
                // topic) is named once, with its keys.
                match missing.iter_mut().find(|(_, t)| *t == topic.as_str()) {
                    Some((keys, _)) => *keys = format!("{keys}, {key}"),
                    None => missing.push((key, topic.as_str())),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !missing.is_empty() {
        return Err(RuntimeError::Topic(missing_topics(&missing)));
    }
    Ok(())
}

/// Every topic the pipeline needs and the cluster lacks, each with its key, and the commands
/// that create them (all at once: fixing one to meet the next is a slow way to learn them).
fn missing_topics(missing: &[(String, &str)]) -> String {
    let named: Vec<String> = missing
        .iter()
        .map(|(key, topic)| format!("{topic:?} ({key})"))
        .collect();
    let commands: Vec<String> = missing
        .iter()
        .map(|(_, topic)| format!("`quiver topic create {topic}`"))
        .collect();
    match (named.as_slice(), commands.as_slice()) {
        ([one], [command]) => format!("topic {one} does not exist; create it with {command}"),
        _ => format!(
            "topics {} do not exist; create them with {}",
            and_list(&named),
            and_list(&commands)
        ),
    }
}

/// The client id an instance's group member has: `pipeline NAME-N` inside a broker,
/// `pipeline run NAME-N on HOST (pid P)` in a `pipeline run` process.
pub fn member_client_id(instance: &str, process: Option<&str>) -> String {
    match process {
        None => format!("{DEPLOYED_PREFIX}{instance}"),
        Some(p) => format!("{RUN_COPY_PREFIX}{instance} on {p}"),
    }
}

/// How the client id of a `pipeline run` copy's member starts.
pub const RUN_COPY_PREFIX: &str = "pipeline run ";

/// A `pipeline run` copy's instance and where it runs (`HOST (pid P)`), from its member's
/// client id; `None` for any other member.
pub fn run_copy_of(client_id: &str) -> Option<(&str, &str)> {
    client_id.strip_prefix(RUN_COPY_PREFIX)?.split_once(" on ")
}

/// A deployed instance's id (`NAME-N`), from its member's client id; `None` for any other
/// member (a `pipeline run` copy included).
pub fn deployed_instance_of(client_id: &str) -> Option<&str> {
    if run_copy_of(client_id).is_some() {
        return None;
    }
    client_id.strip_prefix(DEPLOYED_PREFIX)
}

/// How the client id of a deployed instance's member starts.
const DEPLOYED_PREFIX: &str = "pipeline ";

/// `HOST (pid P)` of this process.
fn this_process() -> String {
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|f| {
            let h = std::fs::read_to_string(f).ok()?;
            let h = h.trim();
            (!h.is_empty()).then(|| h.to_string())
        })
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host} (pid {})", std::process::id())
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

impl Deployment {
    /// Loads the stages (failing fast on a missing or broken plugin) and starts `instances`
    /// members, numbered from 1. `base_dir` resolves `path` stages; `broker` is shown in
    /// the status.
    pub async fn start(
        client: Client,
        config: PipelineConfig,
        base_dir: &Path,
        instances: u32,
        broker: u32,
    ) -> Result<Deployment, RuntimeError> {
        let numbers: Vec<u32> = (1..=instances).collect();
        Self::start_numbered(client, config, base_dir, &numbers, broker).await
    }

    /// [`start`](Self::start) for `quiver pipeline run`: the instances run in this process,
    /// as a client of the cluster, and their group members say so (`pipeline run NAME-N on
    /// HOST (pid P)`), so `group describe` and `pipeline status` tell them from the
    /// instances deployed in brokers, and copies on different machines apart.
    pub async fn start_here(
        client: Client,
        config: PipelineConfig,
        base_dir: &Path,
        instances: u32,
    ) -> Result<Deployment, RuntimeError> {
        let numbers: Vec<u32> = (1..=instances).collect();
        Self::launch(client, config, base_dir, &numbers, 0, Some(this_process())).await
    }

    /// [`start`](Self::start) with the instance numbers given (in a cluster each broker
    /// runs its share of the numbers; an instance's id is `NAME-N`).
    pub async fn start_numbered(
        client: Client,
        config: PipelineConfig,
        base_dir: &Path,
        numbers: &[u32],
        broker: u32,
    ) -> Result<Deployment, RuntimeError> {
        Self::launch(client, config, base_dir, numbers, broker, None).await
    }

    /// Loads the stages and starts the instances `numbers`, run in `process` (`None`:
    /// inside broker `broker`).
    async fn launch(
        client: Client,
        config: PipelineConfig,
        base_dir: &Path,
        numbers: &[u32],
        broker: u32,
        process: Option<String>,
    ) -> Result<Deployment, RuntimeError> {
        let mut d = Self::prepare(
            client,
            config,
            base_dir,
            broker,
            Arc::new(PipelineMetrics::default()),
        )
        .await?;
        d.process = process;
        for n in numbers {
            d.spawn_instance(*n);
        }
        Ok(d)
    }

    /// Stops the instances whose number is not in `numbers` (each commits and leaves) and
    /// starts those missing.
    pub async fn resize(&mut self, numbers: &[u32]) {
        let (keep, gone): (Vec<Instance>, Vec<Instance>) = std::mem::take(&mut self.instances)
            .into_iter()
            .partition(|i| numbers.contains(&i.number));
        self.instances = keep;
        for i in &gone {
            tracing::info!(instance = %i.id, "instance moves to another broker; stopping it here");
        }
        futures::future::join_all(gone.into_iter().map(Instance::stop)).await;
        for n in numbers {
            if !self.instances.iter().any(|i| i.number == *n) {
                self.spawn_instance(*n);
            }
        }
    }

    /// Loads the stages of `config`: a deployment with no instance yet.
    async fn prepare(
        client: Client,
        config: PipelineConfig,
        base_dir: &Path,
        broker: u32,
        metrics: Arc<PipelineMetrics>,
    ) -> Result<Deployment, RuntimeError> {
        let stages = preflight(&client, &config, base_dir).await?;
        let plan = Arc::new(Plan {
            config,
            stages,
            limits: HostLimits::default(),
        });
        let (stop_tx, _) = watch::channel(false);
        Ok(Deployment {
            plan,
            broker,
            client,
            metrics,
            state: Arc::new(Mutex::new(RUNNING.to_string())),
            stop: Arc::new(stop_tx),
            instances: Vec::new(),
            roll_failure: None,
            process: None,
        })
    }

    /// Replaces this deployment by one of `config`, one instance at a time: instance N of
    /// the old one commits what it finished and leaves the group, then instance N of the new
    /// one joins (its partitions' state comes back from the changelog), so offsets and state
    /// carry over and the group never loses more than one member at once. The new stages are
    /// loaded first: if that fails, the old deployment is returned untouched with the error.
    pub async fn roll(
        self,
        config: PipelineConfig,
        base_dir: &Path,
    ) -> Result<Deployment, (Deployment, RuntimeError)> {
        let numbers: Vec<u32> = (1..=config.run.instances).collect();
        self.roll_numbered(config, base_dir, &numbers).await
    }

    /// [`roll`](Self::roll) to the instance numbers given.
    pub async fn roll_numbered(
        self,
        config: PipelineConfig,
        base_dir: &Path,
        numbers: &[u32],
    ) -> Result<Deployment, (Deployment, RuntimeError)> {
        let instances = numbers.len();
        let mut next = match Self::prepare(
            self.client.clone(),
            config,
            base_dir,
            self.broker,
            self.metrics.clone(),
        )
        .await
        {
            Ok(d) => d,
            Err(e) => return Err((self, e)),
        };
        next.process = self.process.clone();
        let mut old = self.instances;
        old.sort_by_key(|i| i.number);
        for &n in numbers {
            // The old instance of the same number leaves first: the two would share one
            // transactional id and fence each other. Else the next old one, so the group
            // loses at most one member at a time.
            let leaving = old.iter().position(|i| i.number == n);
            if let Some(p) = leaving.or((!old.is_empty()).then_some(0)) {
                old.remove(p).stop().await;
            }
            next.spawn_instance(n);
        }
        for i in old {
            i.stop().await;
        }
        tracing::info!(pipeline = %next.plan.config.name, instances, "pipeline rolled to its new file");
        Ok(next)
    }

    fn spawn_instance(&mut self, n: u32) {
        let id = format!("{}-{n}", self.plan.config.name);
        let view = Arc::new(InstanceView::default());
        let (one_tx, one_rx) = watch::channel(false);
        let span = tracing::info_span!("pipeline", instance = %id);
        let parts = InstanceParts {
            client: self.client.clone(),
            plan: self.plan.clone(),
            client_id: member_client_id(&id, self.process.as_deref()),
            id: id.clone(),
            number: n,
            view: view.clone(),
            metrics: self.metrics.clone(),
        };
        let task = tokio::spawn(
            supervise(parts, self.state.clone(), self.stop.clone(), one_rx).instrument(span),
        );
        self.instances.push(Instance {
            number: n,
            id,
            view,
            stop: one_tx,
            task,
        });
    }

    /// The pipeline's config.
    pub fn config(&self) -> &PipelineConfig {
        &self.plan.config
    }

    /// The counters now.
    pub fn metrics(&self) -> crate::metrics::MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// The counters themselves: read after [`stop`](Self::stop), they include what the
    /// instances completed while stopping.
    pub fn counters(&self) -> Arc<PipelineMetrics> {
        self.metrics.clone()
    }

    /// `running`, `stopped` or `failed: <reason>`.
    pub fn state(&self) -> String {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notes that this broker could not roll this deployment to the cluster's newer file
    /// (`pipeline status` then says so instead of "running").
    pub fn note_roll_failure(&mut self, reason: String) {
        self.roll_failure = Some(reason);
    }

    /// The state `pipeline status` shows: a running deployment left on an older file
    /// because it could not roll here is "degraded", with the reason.
    fn shown_state(&self) -> String {
        match (self.state(), &self.roll_failure) {
            (state, Some(reason)) if state == RUNNING => format!(
                "degraded: broker {} still runs the previous file; it cannot roll to the new one here: {reason}",
                self.broker
            ),
            (state, _) if state == RUNNING => {
                let retrying = self
                    .instances
                    .iter()
                    .filter(|i| !i.task.is_finished())
                    .find_map(|i| Some((&i.id, i.view.retrying()?)));
                match retrying {
                    Some((id, (n, error))) => format!(
                        "retrying: instance {id} failed {n} times in a row, joining again after each: {error}"
                    ),
                    None => state,
                }
            }
            (state, _) => state,
        }
    }

    /// Waits until the pipeline fails (returns its reason) or is stopped (returns `None`).
    pub async fn wait(&self) -> Option<String> {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
        let state = self.state();
        state.strip_prefix("failed: ").map(str::to_string)
    }

    /// Stops every instance (each commits what it finished and leaves the group) and waits
    /// for them. Returns how many were running (a failed pipeline's have ended).
    pub async fn stop(self) -> u32 {
        // Those running until now (a failed pipeline's have ended already), counted before
        // the signal ends any.
        let n = self
            .instances
            .iter()
            .filter(|i| !i.task.is_finished())
            .count() as u32;
        let _ = self.stop.send(true);
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if *s == RUNNING {
                *s = STOPPED.to_string();
            }
        }
        // At once: each may take its 30 s.
        futures::future::join_all(self.instances.into_iter().map(Instance::stop)).await;
        n
    }

    /// The status `pipeline status` prints. Lag and the counters are the group's, read from
    /// the cluster now: the counters committed with its offsets ([`committed_counts`]), so
    /// they include work done before a restart, on other brokers and by `pipeline run`
    /// copies (this process's own counters stand in when the cluster cannot be asked). The
    /// rates and latencies are this process's.
    pub async fn status(&self) -> PipelineStatus {
        let m = self.metrics.snapshot();
        let cfg = &self.plan.config;
        let (lag, counts) = group_progress(&self.client, cfg).await;
        let counts = match counts {
            Some(c) => PartitionCounts {
                errors: c.errors + m.stopping_errors,
                ..c
            },
            None => PartitionCounts {
                records_in: m.records_in,
                records_out: m.records_out,
                errors: m.errors,
                dead_lettered: m.dead_lettered,
            },
        };
        PipelineStatus {
            name: cfg.name.clone(),
            state: self.shown_state(),
            guarantee: cfg.run.guarantee.to_string(),
            group: cfg.group().to_string(),
            instances: self
                .instances
                .iter()
                .filter(|i| !i.task.is_finished())
                .map(|i| PipelineInstance {
                    id: i.id.clone(),
                    broker: self.broker,
                    partitions: i.view.partitions(),
                })
                .collect(),
            records_in: counts.records_in,
            records_out: counts.records_out,
            records_per_sec_in: m.records_per_sec_in,
            records_per_sec_out: m.records_per_sec_out,
            lag,
            errors: counts.errors,
            dead_lettered: counts.dead_lettered,
            latency_p50_ms: m.latency_p50_ms,
            latency_p99_ms: m.latency_p99_ms,
        }
    }
}

/// How far the pipeline's group is, as `pipeline status` shows it: its lag ([`group_lag`];
/// -1 when the cluster cannot be asked) and its committed counters ([`committed_counts`];
/// `None` when they cannot be read).
pub async fn group_progress(
    client: &Client,
    cfg: &PipelineConfig,
) -> (i64, Option<PartitionCounts>) {
    let lag = group_lag(client, cfg).await.unwrap_or(-1);
    let counts = match committed_counts(client, cfg).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::debug!(error = %e, "the committed counters cannot be read");
            None
        }
    };
    (lag, counts)
}

/// The counters committed with the group's offsets of the pipeline's source topics, summed
/// over their partitions ([`crate::progress`]).
async fn committed_counts(
    client: &Client,
    cfg: &PipelineConfig,
) -> Result<PartitionCounts, ClientError> {
    let admin = Admin::new(client.clone());
    let committed = match admin.group_offsets(cfg.group(), None).await {
        Ok(c) => c,
        Err(e) if e.code() == Some(ErrorCode::UnknownGroup) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut all = PartitionCounts::default();
    for c in committed
        .iter()
        .filter(|c| c.offset.is_some() && cfg.source.topics.contains(&c.topic))
    {
        all += CommitMetadata::counts_in(c.metadata.as_deref());
    }
    Ok(all)
}

/// Records of the source topics the pipeline's group has not committed: per source
/// partition, the group's lag where it has a committed offset; elsewhere everything readable, or nothing when the pipeline starts at the latest records.
/// A source topic the cluster does not have counts nothing: it has no records to read (the
/// pipeline's state says why it cannot run).
pub async fn group_lag(client: &Client, cfg: &PipelineConfig) -> Result<i64, ClientError> {
    let admin = Admin::new(client.clone());
    let described = match admin.describe_group(cfg.group()).await {
        Ok(d) => d.partitions,
        Err(e) if e.code() == Some(ErrorCode::UnknownGroup) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut lag = 0;
    for t in &cfg.source.topics {
        let d = match admin.describe_topic(t).await {
            Ok(d) => d,
            // A deleted source has nothing left to read (the status says "-1", unknown,
            // only when the cluster cannot be asked).
            Err(e) if e.code() == Some(ErrorCode::UnknownTopicOrPartition) => continue,
            Err(e) => return Err(e),
        };
        for p in &d.partitions {
            let known = described
                .iter()
                .find(|g| g.topic == *t && g.partition == p.partition);
            lag += match known {
                Some(g) if g.committed.is_some() => g.lag.max(0),
                _ if cfg.source.start == crate::StartPosition::Latest => 0,
                _ => (p.high_watermark - p.log_start_offset).max(0),
            };
        }
    }
    Ok(lag)
}

/// Runs one instance until it stops or the pipeline fails; joins again after cluster errors.
async fn supervise(
    parts: InstanceParts,
    state: Arc<Mutex<String>>,
    stop: Arc<watch::Sender<bool>>,
    own_stop: watch::Receiver<bool>,
) {
    let signal = StopSignal::new(stop.subscribe(), own_stop);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if signal.is_set() {
            return;
        }
        let r = run_instance(&parts, signal.clone()).await;
        // An instance that returned before it could leave (a setup error) leaves now.
        parts.view.leave_group(&parts.id).await;
        match r {
            Ok(()) => return,
            Err(RuntimeError::Failed(reason)) => {
                tracing::error!(pipeline = %parts.plan.config.name, %reason, "pipeline failed; stopping every instance");
                *state.lock().unwrap_or_else(|p| p.into_inner()) = format!("failed: {reason}");
                let _ = stop.send(true);
                return;
            }
            Err(e) => {
                parts.view.failed(&e.to_string());
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "instance stopped; joining again");
                let mut wait = signal.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait.wait() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_client_ids_tell_deployed_instances_copies_and_others_apart() {
        let deployed = member_client_id("wc-2", None);
        let copy = member_client_id("wc-1", Some("vm (pid 7)"));
        assert_eq!(deployed_instance_of(&deployed), Some("wc-2"));
        assert_eq!(run_copy_of(&deployed), None);
        assert_eq!(run_copy_of(&copy), Some(("wc-1", "vm (pid 7)")));
        assert_eq!(deployed_instance_of(&copy), None);
        // A deployed pipeline may be called "run": its instances are still deployed ones.
        assert_eq!(deployed_instance_of("pipeline run-1"), Some("run-1"));
        for other in ["quiver-cli", "pipelines", ""] {
            assert_eq!(deployed_instance_of(other), None, "{other}");
            assert_eq!(run_copy_of(other), None, "{other}");
        }
    }

    #[test]
    fn every_missing_topic_is_named_with_the_command_that_creates_it() {
        let one = missing_topics(&[("sink.topic".into(), "out")]);
        assert_eq!(
            one,
            "topic \"out\" (sink.topic) does not exist; create it with `quiver topic create out`"
        );
        let three = missing_topics(&[
            ("source.topics".into(), "a"),
            ("source.topics".into(), "b"),
            ("sink.topic".into(), "c"),
        ]);
        assert_eq!(
            three,
            "topics \"a\" (source.topics), \"b\" (source.topics) and \"c\" (sink.topic) do not exist; create them with `quiver topic create a`, `quiver topic create b` and `quiver topic create c`"
        );
    }
}
