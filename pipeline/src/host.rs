//! The broker's pipeline host: runs deployed pipelines inside the broker process as clients
//! of that broker, and keeps each deployed file in `<data_dir>/pipelines/NAME.toml` so the
//! pipeline comes back when the broker restarts. Deploying a file under a running name
//! rolls the running pipeline to it one instance at a time (see [`Deployment::roll`]): the
//! new stages are loaded first (a broken plugin leaves the old one running), then each old
//! instance commits and leaves before its replacement joins the same group and goes on from
//! the committed offsets and state. `pipeline stop` removes the file.
//!
//! In a cluster the controller holds the deployed files instead: the broker asks this host
//! to [`check`](PipelineHost::check) a file before proposing it, and its replica manager
//! [`assign`](PipelineHost::assign)s this broker's share of every pipeline's instances,
//! which a background task follows (start, roll, resize, stop; a pipeline that cannot start
//! here is retried every few seconds).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use quiver_client::{Client, ClientConfig};
use quiver_core::pipelines::{
    AssignedPipeline, CheckedPipeline, HostResult, PipelineHost, PipelineHostError,
};
use quiver_protocol::requests::{DeployPipelineResponse, PipelineStatus, StopPipelineResponse};
use quiver_protocol::ErrorCode;
use tokio::sync::{watch, Mutex, OnceCell};

use crate::deployment::Deployment;
use crate::error::RuntimeError;
use crate::PipelineConfig;

/// A pipeline that is deployed here: running, or failed to start.
enum Entry {
    Running(Deployment),
    /// Could not start (e.g. after a restart a plugin was gone): the reason.
    Broken(PipelineConfig, String),
}

/// How often a cluster pipeline that could not start here is tried again.
const RETRY_START: Duration = Duration::from_secs(5);

/// Runs the deployed pipelines of one broker.
pub struct BrokerPipelines {
    this: Weak<BrokerPipelines>,
    dir: PathBuf,
    broker_id: u32,
    client_config: ClientConfig,
    client: OnceCell<Client>,
    pipelines: Mutex<BTreeMap<String, Entry>>,
    /// The broker's `group_max_size`: a pipeline with more instances is refused (its
    /// group could never hold them all).
    group_max_size: u64,
    /// Cluster mode: the latest assignment from the replica manager (`None` until the
    /// first, and always for a lone broker).
    assigned: watch::Sender<Option<Vec<AssignedPipeline>>>,
    /// Set at shutdown: assignments are no longer followed.
    shut: std::sync::atomic::AtomicBool,
    /// Cluster mode: each assigned pipeline's deploy number as last applied here.
    deploys_seen: std::sync::Mutex<BTreeMap<String, u64>>,
}

fn lock_seen(
    m: &std::sync::Mutex<BTreeMap<String, u64>>,
) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn host_error(code: ErrorCode, message: impl Into<String>) -> PipelineHostError {
    PipelineHostError::new(code, message)
}

fn runtime_error(e: RuntimeError) -> PipelineHostError {
    let code = match &e {
        RuntimeError::Client(c) => c.code().unwrap_or(ErrorCode::Internal),
        _ => ErrorCode::InvalidPipeline,
    };
    host_error(code, e.to_string())
}

impl BrokerPipelines {
    /// A host for the broker `broker_id` keeping its files under `<data_dir>/pipelines/`,
    /// whose instances connect with `client_config` (the broker's own address and CA); it
    /// refuses pipelines with more instances than `group_max_size`, the broker's.
    pub fn new(
        data_dir: &Path,
        broker_id: u32,
        client_config: ClientConfig,
        group_max_size: u64,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| BrokerPipelines {
            this: this.clone(),
            assigned: watch::channel(None).0,
            shut: Default::default(),
            deploys_seen: Default::default(),
            dir: data_dir.join("pipelines"),
            broker_id,
            client_config,
            client: OnceCell::new(),
            pipelines: Mutex::new(BTreeMap::new()),
            group_max_size,
        })
    }

    /// Fails when the pipeline has more instances than its group may have members.
    fn check_group_size(&self, config: &PipelineConfig) -> HostResult<()> {
        let max = self.group_max_size;
        if u64::from(config.run.instances) > max {
            return Err(host_error(
                ErrorCode::InvalidPipeline,
                format!(
                    "[run] instances = {} is more than this broker's group_max_size ({max}): the pipeline's group {:?} cannot have more members, so the others would never run; lower instances or raise group_max_size",
                    config.run.instances,
                    config.group()
                ),
            ));
        }
        Ok(())
    }

    async fn client(&self) -> HostResult<Client> {
        self.client
            .get_or_try_init(|| Client::connect(self.client_config.clone()))
            .await
            .cloned()
            .map_err(|e| {
                host_error(
                    ErrorCode::Internal,
                    format!("the pipeline host cannot connect to its broker: {e}"),
                )
            })
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    /// Starts every pipeline deployed before the broker restarted. One that cannot start
    /// is listed as failed, with the reason. It holds the host's lock throughout, so a
    /// `deploy` or `stop` that arrives meanwhile waits for it and then acts on what it
    /// resumed (without it, a file resumed after a deploy of a new version replaced it, and
    /// a stop found nothing to stop and the pipeline started after it).
    pub async fn resume(&self) {
        let mut pipelines = self.pipelines.lock().await;
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for path in files {
            let config = match PipelineConfig::load_stored(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "deployed pipeline file is not valid; skipped");
                    continue;
                }
            };
            let name = config.name.clone();
            if pipelines.contains_key(&name) {
                continue;
            }
            let entry = match self.start(config.clone()).await {
                Ok(d) => {
                    tracing::info!(pipeline = %name, "deployed pipeline resumed");
                    Entry::Running(d)
                }
                Err(e) => {
                    tracing::error!(pipeline = %name, error = %e, "deployed pipeline cannot start");
                    Entry::Broken(config, e.message)
                }
            };
            pipelines.insert(name, entry);
        }
    }

    async fn start(&self, config: PipelineConfig) -> HostResult<Deployment> {
        let client = self.client().await?;
        let n = config.run.instances;
        Deployment::start(client, config, &self.dir, n, self.broker_id)
            .await
            .map_err(runtime_error)
    }

    /// Stops every running pipeline (their files stay: they start again with the broker).
    pub async fn shutdown(&self) {
        self.shut.store(true, std::sync::atomic::Ordering::SeqCst);
        let all = std::mem::take(&mut *self.pipelines.lock().await);
        for (name, entry) in all {
            if let Entry::Running(d) = entry {
                let n = d.stop().await;
                tracing::info!(pipeline = %name, instances = n, "pipeline stopped for shutdown");
            }
        }
    }

    async fn deploy_text(&self, text: String) -> HostResult<DeployPipelineResponse> {
        let config = parse_deployable(&text, false)?;
        self.check_group_size(&config)?;
        let name = config.name.clone();
        let mut pipelines = self.pipelines.lock().await;
        match pipelines.get(&name) {
            Some(Entry::Running(old)) => refuse_stateful_change(old.config(), &config)?,
            Some(Entry::Broken(old, _)) => refuse_stateful_change(old, &config)?,
            None => {}
        }
        // Load the new stages before touching the running pipeline: a broken plugin
        // leaves it running.
        let client = self.client().await?;
        crate::deployment::preflight(&client, &config, &self.dir)
            .await
            .map_err(runtime_error)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            host_error(
                ErrorCode::StorageError,
                format!("cannot create {}: {e}", self.dir.display()),
            )
        })?;
        let tmp = self.dir.join(format!(".{name}.toml.tmp"));
        std::fs::write(&tmp, &text)
            .and_then(|_| std::fs::rename(&tmp, self.file_of(&name)))
            .map_err(|e| {
                host_error(
                    ErrorCode::StorageError,
                    format!("cannot save the pipeline file: {e}"),
                )
            })?;
        let instances = config.run.instances;
        let (replaced, started) = match pipelines.remove(&name) {
            Some(Entry::Running(old)) => match old.roll(config.clone(), &self.dir).await {
                Ok(d) => (true, Ok(d)),
                Err((old, e)) => {
                    pipelines.insert(name.clone(), Entry::Running(old));
                    return Err(runtime_error(e));
                }
            },
            Some(Entry::Broken(..)) => (true, self.start(config.clone()).await),
            None => (false, self.start(config.clone()).await),
        };
        match started {
            Ok(d) => {
                pipelines.insert(name.clone(), Entry::Running(d));
                Ok(DeployPipelineResponse {
                    name,
                    instances,
                    replaced,
                })
            }
            Err(e) => {
                pipelines.insert(name, Entry::Broken(config, e.message.clone()));
                Err(e)
            }
        }
    }

    async fn status_of(&self, entry: &Entry) -> PipelineStatus {
        match entry {
            Entry::Running(d) => d.status().await,
            Entry::Broken(config, reason) => {
                // What the group committed before the pipeline broke still counts.
                let (lag, counts) = match self.client().await {
                    Ok(c) => crate::deployment::group_progress(&c, config).await,
                    Err(_) => (-1, None),
                };
                let counts = counts.unwrap_or_default();
                PipelineStatus {
                    name: config.name.clone(),
                    state: format!("failed: {reason}"),
                    guarantee: config.run.guarantee.to_string(),
                    group: config.group().to_string(),
                    instances: Vec::new(),
                    records_in: counts.records_in,
                    records_out: counts.records_out,
                    records_per_sec_in: 0.0,
                    records_per_sec_out: 0.0,
                    lag,
                    errors: counts.errors,
                    dead_lettered: counts.dead_lettered,
                    latency_p50_ms: 0.0,
                    latency_p99_ms: 0.0,
                }
            }
        }
    }

    async fn stop_named(&self, name: String) -> HostResult<StopPipelineResponse> {
        let mut pipelines = self.pipelines.lock().await;
        let entry = pipelines.remove(&name);
        // A file not resumed yet (the broker is starting) is deployed too: removing it
        // stops the pipeline before it starts.
        let file = self.file_of(&name);
        if entry.is_none() && !file.exists() {
            return Err(host_error(
                ErrorCode::PipelineNotFound,
                format!("no pipeline named {name:?} is deployed; see `quiver pipeline list`"),
            ));
        }
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(pipeline = %name, error = %e, "cannot remove the pipeline file");
        }
        drop(pipelines);
        let instances = match entry {
            Some(Entry::Running(d)) => d.stop().await,
            Some(Entry::Broken(..)) | None => 0,
        };
        Ok(StopPipelineResponse { instances })
    }
}

/// Refuses a new file for a running pipeline that would give a stage's state to another
/// plugin.
fn refuse_stateful_change(old: &PipelineConfig, new: &PipelineConfig) -> HostResult<()> {
    match old.roll_problem(new) {
        Some(problem) => Err(host_error(ErrorCode::InvalidPipeline, problem)),
        None => Ok(()),
    }
}

/// A deployed file: valid, and naming its stages as deployed plugins (a path on the client's
/// machine means nothing here).
fn parse_deployable(text: &str, stored: bool) -> HostResult<PipelineConfig> {
    let config = if stored {
        PipelineConfig::parse_stored(text, "deployed pipeline")
    } else {
        PipelineConfig::parse(text, "deployed pipeline")
    }
    .map_err(|e| host_error(ErrorCode::InvalidPipeline, e.to_string()))?;
    if let Some(s) = config
        .stages
        .iter()
        .find(|s| matches!(s.plugin, crate::StagePlugin::Path(_)))
    {
        return Err(host_error(
            ErrorCode::InvalidPipeline,
            format!(
                "stage plugin {:?} is a path on the client's machine; deploy the bundle first (`quiver plugin deploy DIR`) and name it as plugin = \"NAME@VERSION\" (`quiver pipeline deploy` does this for you)",
                s.plugin
            ),
        ));
    }
    Ok(config)
}

/// Cluster mode.
impl BrokerPipelines {
    async fn check_text(
        &self,
        text: String,
        running: BTreeMap<String, String>,
    ) -> HostResult<CheckedPipeline> {
        let config = parse_deployable(&text, false)?;
        self.check_group_size(&config)?;
        if let Some(old) = running.get(&config.name) {
            let old = PipelineConfig::parse_stored(old, "running pipeline")
                .map_err(|e| host_error(ErrorCode::Internal, e.to_string()))?;
            refuse_stateful_change(&old, &config)?;
        }
        let client = self.client().await?;
        let stages = crate::deployment::preflight(&client, &config, &self.dir)
            .await
            .map_err(runtime_error)?;
        let mut plugins: Vec<String> = stages.into_iter().map(|s| s.id).collect();
        plugins.sort();
        plugins.dedup();
        Ok(CheckedPipeline {
            name: config.name,
            instances: config.run.instances,
            plugins,
        })
    }

    /// Follows the assignments until the host is dropped.
    async fn follow_assignments(self: Arc<Self>) {
        let mut rx = self.assigned.subscribe();
        loop {
            let wanted = rx.borrow_and_update().clone().unwrap_or_default();
            let all_started = self.apply_assignment(wanted).await;
            let changed = async {
                if all_started {
                    rx.changed().await
                } else {
                    tokio::select! {
                        r = rx.changed() => r,
                        _ = tokio::time::sleep(RETRY_START) => Ok(()),
                    }
                }
            };
            if changed.await.is_err() {
                return;
            }
        }
    }

    /// Makes the running pipelines match `wanted`; false when one could not start.
    async fn apply_assignment(&self, wanted: Vec<AssignedPipeline>) -> bool {
        let mut all_started = true;
        let mut pipelines = self.pipelines.lock().await;
        if self.shut.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        let gone: Vec<String> = pipelines
            .keys()
            .filter(|n| !wanted.iter().any(|w| &w.name == *n))
            .cloned()
            .collect();
        for name in gone {
            lock_seen(&self.deploys_seen).remove(&name);
            if let Some(Entry::Running(d)) = pipelines.remove(&name) {
                let n = d.stop().await;
                tracing::info!(pipeline = %name, instances = n, "pipeline stopped: the cluster no longer holds it");
            }
        }
        for w in wanted {
            let config = match parse_deployable(&w.config_toml, true) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(pipeline = %w.name, error = %e, "the cluster holds a pipeline file this broker cannot read");
                    let config =
                        PipelineConfig::parse_stored(&w.config_toml, "deployed pipeline").ok();
                    if let Some(c) = config {
                        pipelines.insert(w.name.clone(), Entry::Broken(c, e.message));
                    }
                    continue;
                }
            };
            // A file deployed again since the last assignment: start again what failed
            // (a lone broker's deploy does too).
            let restart_asked = lock_seen(&self.deploys_seen)
                .insert(w.name.clone(), w.deploy_number)
                .is_some_and(|seen| w.deploy_number != seen);
            let failed_here = matches!(pipelines.get(&w.name),
                Some(Entry::Running(d)) if d.state().starts_with("failed"));
            if restart_asked && failed_here {
                if let Some(Entry::Running(d)) = pipelines.remove(&w.name) {
                    d.stop().await;
                    tracing::info!(pipeline = %w.name, "starting the failed pipeline again: its file was deployed again");
                }
            }
            let entry = match pipelines.remove(&w.name) {
                Some(Entry::Running(mut d)) if *d.config() == config => {
                    d.resize(&w.instances).await;
                    Entry::Running(d)
                }
                Some(Entry::Running(d)) => {
                    match d.roll_numbered(config, &self.dir, &w.instances).await {
                        Ok(d) => Entry::Running(d),
                        Err((mut old, e)) => {
                            tracing::error!(pipeline = %w.name, error = %e, "cannot roll the pipeline to its new file here; the old one keeps running");
                            old.note_roll_failure(e.to_string());
                            all_started = false;
                            Entry::Running(old)
                        }
                    }
                }
                Some(Entry::Broken(..)) | None => {
                    let started = match self.client().await {
                        Ok(client) => Deployment::start_numbered(
                            client,
                            config.clone(),
                            &self.dir,
                            &w.instances,
                            self.broker_id,
                        )
                        .await
                        .map_err(runtime_error),
                        Err(e) => Err(e),
                    };
                    match started {
                        Ok(d) => {
                            tracing::info!(pipeline = %w.name, instances = ?w.instances, "running this broker's instances of a deployed pipeline");
                            Entry::Running(d)
                        }
                        Err(e) => {
                            tracing::warn!(pipeline = %w.name, error = %e, "deployed pipeline cannot start here; retrying");
                            all_started = false;
                            Entry::Broken(config, e.message)
                        }
                    }
                }
            };
            pipelines.insert(w.name, entry);
        }
        all_started
    }
}

impl PipelineHost for BrokerPipelines {
    fn deploy(&self, config_toml: String) -> BoxFuture<'_, HostResult<DeployPipelineResponse>> {
        self.deploy_text(config_toml).boxed()
    }

    fn list(&self) -> BoxFuture<'_, HostResult<Vec<PipelineStatus>>> {
        async move {
            let pipelines = self.pipelines.lock().await;
            let mut out = Vec::with_capacity(pipelines.len());
            for entry in pipelines.values() {
                out.push(self.status_of(entry).await);
            }
            Ok(out)
        }
        .boxed()
    }

    fn status(&self, name: String) -> BoxFuture<'_, HostResult<PipelineStatus>> {
        async move {
            let pipelines = self.pipelines.lock().await;
            let entry = pipelines.get(&name).ok_or_else(|| {
                host_error(
                    ErrorCode::PipelineNotFound,
                    format!("no pipeline named {name:?} is deployed; see `quiver pipeline list`"),
                )
            })?;
            Ok(self.status_of(entry).await)
        }
        .boxed()
    }

    fn stop(&self, name: String) -> BoxFuture<'_, HostResult<StopPipelineResponse>> {
        self.stop_named(name).boxed()
    }

    fn check(
        &self,
        config_toml: String,
        running: BTreeMap<String, String>,
    ) -> BoxFuture<'_, HostResult<CheckedPipeline>> {
        self.check_text(config_toml, running).boxed()
    }

    fn plugins_in_use(&self) -> BoxFuture<'_, Vec<(String, String)>> {
        async move {
            let pipelines = self.pipelines.lock().await;
            pipelines
                .iter()
                .map(|(name, e)| match e {
                    Entry::Running(d) => (name, d.plugin_ids()),
                    // One that could not start yet (e.g. a topic was missing) starts once
                    // the cause is fixed: it still needs its plugins.
                    Entry::Broken(config, _) => (name, config.pinned_plugins()),
                })
                .flat_map(|(name, ids)| ids.into_iter().map(move |id| (id, name.clone())))
                .collect()
        }
        .boxed()
    }

    fn assign(&self, pipelines: Vec<AssignedPipeline>) {
        let first = self.assigned.send_replace(Some(pipelines)).is_none();
        if first {
            if let Some(this) = self.this.upgrade() {
                tokio::spawn(this.follow_assignments());
            }
        }
    }
}
