//! Plugins in the broker: the durable store of deployed bundles ([`store`]), the pool of
//! consume-time processor instances, and running a processor over fetched batches
//! ([`transform`]). [`PluginService`] owns the rules: a bundle is validated by loading and
//! building it once before it is stored; the same bytes redeployed are a no-op; different
//! bytes under an existing `name@version` are refused; a plugin in use (a topic's
//! partitioner, a live processor instance) cannot be removed. Plugin code runs only on
//! the plugin pool ([`pool`]), never on the async runtime or the storage threads, and a
//! failing or stuck call fails only the request that made it.

pub mod pool;
pub mod store;
pub mod transform;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quiver_plugins::{Bundle, HostLimits, Kind, PluginConfig, Processor, Runtime};
use quiver_protocol::batch::split_batches;
use quiver_protocol::requests::{PluginInfo, ProcessorSpec};
use quiver_protocol::ErrorCode;

use crate::config::PluginsConfig;
use crate::topic::TopicRegistry;
use pool::{PluginPool, PoolError};
use store::{PluginStore, StoredPlugin};

/// Plugin calls that may wait for a pool thread at once.
const PLUGIN_QUEUE: usize = 256;

/// A storage failure of the plugin store.
#[derive(Debug, thiserror::Error)]
pub enum PluginStoreError {
    /// sled failed.
    #[error("plugin storage: {0}")]
    Storage(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("plugin storage is damaged: {0}")]
    Corrupt(String),
}

/// Why a plugin request failed; each maps to a wire code.
#[derive(Debug, thiserror::Error)]
pub enum PluginServiceError {
    /// No such plugin.
    #[error("{0}")]
    NotFound(String),
    /// Different bytes under an existing `name@version`.
    #[error("{0}")]
    VersionConflict(String),
    /// The bundle does not load or build.
    #[error("{0}")]
    Invalid(String),
    /// The archive is larger than `plugins.max_bundle_bytes`.
    #[error("{0}")]
    TooLarge(String),
    /// Still used.
    #[error("{0}")]
    InUse(String),
    /// A plugin call failed.
    #[error("{0}")]
    Failed(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] PluginStoreError),
}

impl PluginServiceError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            PluginServiceError::NotFound(_) => ErrorCode::PluginNotFound,
            PluginServiceError::VersionConflict(_) => ErrorCode::PluginVersionConflict,
            PluginServiceError::Invalid(_) => ErrorCode::InvalidPlugin,
            PluginServiceError::TooLarge(_) => ErrorCode::MessageTooLarge,
            PluginServiceError::InUse(_) => ErrorCode::PluginInUse,
            PluginServiceError::Failed(_) => ErrorCode::PluginFailed,
            PluginServiceError::Store(_) => ErrorCode::StorageError,
        }
    }
}

type Result<T, E = PluginServiceError> = std::result::Result<T, E>;

/// A processor instance used (or asked for by a fetch) this recently counts as running:
/// its plugin cannot be removed. Idle instances stay pooled (with their state) until
/// `plugins.processor_idle_ms`, but do not block removal.
const IN_USE_WINDOW: Duration = Duration::from_secs(30);

/// Identifies one processor instance: state stays with a partition and a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    topic: String,
    partition: u32,
    plugin: String,
    config: BTreeMap<String, String>,
}

/// The most processor instances the pool keeps. A fetch names its processor's config, so
/// each new config is a new instance: past this many, idle ones go first, then the least
/// recently used (its state is lost, as after `processor_idle_ms`).
const MAX_POOLED_PROCESSORS: usize = 256;

/// Makes room for one more entry in a pool: drops entries idle for `idle`, then, while
/// the pool still holds `cap` or more, the least recently used.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    pool: &mut HashMap<K, V>,
    last_used: impl Fn(&V) -> Instant,
    idle: Duration,
    cap: usize,
) {
    pool.retain(|_, v| last_used(v).elapsed() < idle);
    while pool.len() >= cap.max(1) {
        let Some(oldest) = pool
            .iter()
            .min_by_key(|(_, v)| last_used(v))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        pool.remove(&oldest);
    }
}

/// Longest time building a plugin instance may take on the plugin pool.
const BUILD_DEADLINE: Duration = Duration::from_secs(30);

/// One live processor instance.
struct Slot {
    processor: Mutex<Box<dyn Processor>>,
    /// Calls of the instance take turns here, before they go to a pool thread: a call's
    /// deadline then counts its own run only, not the calls queued ahead of it (concurrent
    /// fetches of one partition through one processor on a loaded broker had their wait
    /// counted as the plugin's time and quarantined an instance that was never slow).
    turn: tokio::sync::Mutex<()>,
    last_used: Mutex<Instant>,
    /// Set when the instance is quarantined: calls queued behind a stuck one give up.
    dead: AtomicBool,
}

impl Slot {
    /// Locks the instance for a call, unless it is quarantined while waiting (a call
    /// stuck in it would otherwise hold every later call of this instance).
    fn lock_live(&self) -> Option<std::sync::MutexGuard<'_, Box<dyn Processor>>> {
        loop {
            if self.dead.load(Ordering::SeqCst) {
                return None;
            }
            match self.processor.try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
            }
        }
    }
}

/// What a deploy did.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The stored plugin.
    pub info: PluginInfo,
    /// True when the same bytes were already stored (nothing changed).
    pub already_deployed: bool,
}

/// The broker's plugins: store, bundle cache, processor pool and host limits.
pub struct PluginService {
    store: PluginStore,
    topics: Arc<TopicRegistry>,
    limits: HostLimits,
    max_bundle_bytes: u64,
    idle: Duration,
    bundles: Mutex<HashMap<String, Arc<Bundle>>>,
    pool: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    quarantined: Mutex<HashMap<PoolKey, (Instant, String)>>,
    quarantine: Duration,
    workers: Arc<PluginPool>,
    admin: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stored record of a bundle whose canonical archive is `size` bytes.
fn record_of(bundle: &Bundle, size: usize) -> StoredPlugin {
    let m = bundle.manifest();
    StoredPlugin {
        name: m.name.clone(),
        version: m.version.clone(),
        digest: bundle.digest(),
        kind: kind_str(m.kind).into(),
        runtime: runtime_str(m.runtime).into(),
        description: m.description.clone(),
        deployed_ms: crate::clock::now_ms(),
        size: size as u64,
        config: m.config.clone(),
    }
}

fn kind_str(k: Kind) -> &'static str {
    match k {
        Kind::Processor => "processor",
        Kind::Partitioner => "partitioner",
    }
}

fn runtime_str(r: Runtime) -> &'static str {
    match r {
        Runtime::Lua => "lua",
        Runtime::Wasm => "wasm",
    }
}

impl PluginService {
    /// Opens the store in `db` with the broker's `[plugins]` config.
    pub fn open(
        db: crate::log::Database,
        topics: Arc<TopicRegistry>,
        config: &PluginsConfig,
    ) -> Result<PluginService> {
        let limits = HostLimits {
            cpu_ms: config.cpu_ms,
            memory_mb: config.memory_mb,
            max_output_bytes: usize::try_from(config.max_output_bytes).unwrap_or(usize::MAX),
            wasm_stack_bytes: usize::try_from(config.wasm_stack_bytes).unwrap_or(usize::MAX),
            max_consecutive_failures: config.max_consecutive_failures,
        };
        limits
            .validate()
            .map_err(|e| PluginServiceError::Invalid(format!("[plugins]: {e}")))?;
        let store = PluginStore::open(db)?;
        let n = store.all()?.len();
        for id in store.damaged()? {
            tracing::error!(plugin = %id, "the plugin's stored record is damaged; it cannot be used until removed (`quiver plugin remove {id}`) and deployed again");
        }
        tracing::info!(plugins = n, "plugin store opened");
        Ok(PluginService {
            store,
            topics,
            limits,
            max_bundle_bytes: config.max_bundle_bytes,
            idle: Duration::from_millis(config.processor_idle_ms),
            bundles: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            quarantined: Mutex::new(HashMap::new()),
            quarantine: Duration::from_millis(config.quarantine_ms),
            workers: PluginPool::new(
                config.effective_threads(),
                PLUGIN_QUEUE,
                Duration::from_millis(config.cpu_ms.saturating_mul(20).max(1_000)),
            ),
            admin: Mutex::new(()),
        })
    }

    /// The host limits every plugin call runs under.
    pub fn limits(&self) -> &HostLimits {
        &self.limits
    }

    /// Validates and stores a bundle archive. Blocking (builds the plugin, flushes sled).
    pub fn deploy(&self, archive: &[u8]) -> Result<Deployed> {
        let bundle = self.parse(archive)?;
        let id = bundle.id();
        let digest = bundle.digest();
        let _admin = lock(&self.admin);
        if let Some(existing) = self.store.get(&id)? {
            if existing.digest == digest {
                tracing::info!(plugin = %id, %digest, "plugin already deployed with the same bytes");
                return Ok(Deployed {
                    info: self.info(&existing),
                    already_deployed: true,
                });
            }
            return Err(PluginServiceError::VersionConflict(format!(
                "{id} is already deployed with different content (digest {}, this bundle {digest}); a deployed version never changes: bump the version in plugin.toml",
                existing.digest
            )));
        }
        let (record, canonical) = self.build(&bundle)?;
        self.keep(record, &canonical, bundle)
    }

    /// Checks a bundle archive as [`deploy`](Self::deploy) does (size, format, a build with
    /// the broker's limits) without storing it: a cluster broker proposes the result to the
    /// controller, and every broker then [`install`](Self::install)s it. Blocking.
    pub fn validate(&self, archive: &[u8]) -> Result<(StoredPlugin, Vec<u8>)> {
        let bundle = self.parse(archive)?;
        self.build(&bundle)
    }

    /// Stores a canonical archive the controller holds (validated by the broker that
    /// proposed it), replacing a local copy with other content: the controller's copy is
    /// the cluster's. Returns false when it was already here. Blocking.
    pub fn install(&self, canonical: &[u8], digest: &str) -> Result<bool> {
        let bundle = Bundle::from_archive_bytes(canonical)
            .map_err(|e| PluginServiceError::Invalid(format!("invalid bundle: {e}")))?;
        if bundle.digest() != digest {
            return Err(PluginServiceError::Invalid(format!(
                "the controller's archive of {} has digest {}, not the {digest} it was deployed with",
                bundle.id(),
                bundle.digest()
            )));
        }
        let _admin = lock(&self.admin);
        // The controller's copy also replaces a local record that is damaged.
        self.store.remove_damaged(&bundle.id())?;
        if let Some(existing) = self.store.get(&bundle.id())? {
            if existing.digest == digest {
                return Ok(false);
            }
            self.forget(&existing)?;
        }
        let record = record_of(&bundle, canonical.len());
        self.keep(record, canonical, bundle)?;
        Ok(true)
    }

    fn parse(&self, archive: &[u8]) -> Result<Bundle> {
        if archive.len() as u64 > self.max_bundle_bytes {
            return Err(PluginServiceError::TooLarge(format!(
                "bundle archive of {} bytes exceeds plugins.max_bundle_bytes = {}",
                archive.len(),
                self.max_bundle_bytes
            )));
        }
        Bundle::from_archive_bytes(archive)
            .map_err(|e| PluginServiceError::Invalid(format!("invalid bundle: {e}")))
    }

    /// Builds the bundle once with the broker's limits, so a bundle that cannot run is
    /// refused now, and gives its record and canonical archive (the stored bytes depend
    /// only on the bundle's files).
    fn build(&self, bundle: &Bundle) -> Result<(StoredPlugin, Vec<u8>)> {
        let id = bundle.id();
        let config = PluginConfig::new(bundle.clone()).limits(self.limits.clone());
        let built = match bundle.manifest().kind {
            Kind::Processor => config.build_processor().map(drop),
            Kind::Partitioner => config.build_partitioner().map(drop),
        };
        built.map_err(|e| PluginServiceError::Invalid(format!("refused {id}: {e}")))?;
        let canonical = bundle
            .to_archive_bytes()
            .map_err(|e| PluginServiceError::Invalid(format!("refused {id}: {e}")))?;
        if canonical.len() as u64 > self.max_bundle_bytes {
            return Err(PluginServiceError::TooLarge(format!(
                "{id}: the stored form of the bundle is {} bytes, over plugins.max_bundle_bytes = {}",
                canonical.len(),
                self.max_bundle_bytes
            )));
        }
        Ok((record_of(bundle, canonical.len()), canonical))
    }

    fn keep(&self, record: StoredPlugin, canonical: &[u8], bundle: Bundle) -> Result<Deployed> {
        self.store.put(&record, canonical)?;
        lock(&self.bundles).insert(record.digest.clone(), Arc::new(bundle));
        tracing::info!(plugin = %record.id(), digest = %record.digest, kind = %record.kind, runtime = %record.runtime, "plugin deployed");
        Ok(Deployed {
            info: self.info(&record),
            already_deployed: false,
        })
    }

    /// Every deployed plugin, by name then version.
    pub fn list(&self) -> Result<Vec<PluginInfo>> {
        let mut all = self.store.all()?;
        all.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then_with(|| version_key(&a.version).cmp(&version_key(&b.version)))
        });
        Ok(all.iter().map(|r| self.info(r)).collect())
    }

    /// The record of `name@version`, or of the highest version of `name`.
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Result<StoredPlugin> {
        match version {
            Some(v) => self.store.get(&format!("{name}@{v}"))?.ok_or_else(|| {
                PluginServiceError::NotFound(format!(
                    "plugin {name}@{v} is not deployed (see `quiver plugin list`)"
                ))
            }),
            None => {
                // Not an older version in place of a newer one that is damaged.
                let damaged = self.store.damaged_versions(name)?;
                if !damaged.is_empty() {
                    return Err(PluginServiceError::Store(PluginStoreError::Corrupt(format!(
                        "the stored record of {} is damaged, so the highest version of {name} is not known; name a version, or remove the damaged one with `quiver plugin remove {}` and deploy it again",
                        damaged.join(", "),
                        damaged[0]
                    ))));
                }
                self.latest(name)
            }
        }
    }

    /// The highest readable version of `name`.
    fn latest(&self, name: &str) -> Result<StoredPlugin> {
        self.store
            .versions(name)?
            .into_iter()
            .max_by(|a, b| version_key(&a.version).cmp(&version_key(&b.version)))
            .ok_or_else(|| {
                PluginServiceError::NotFound(format!(
                    "no plugin named {name} is deployed (see `quiver plugin list`)"
                ))
            })
    }

    /// [`resolve`](Self::resolve) as the wire's [`PluginInfo`].
    pub fn describe(&self, name: &str, version: Option<&str>) -> Result<PluginInfo> {
        Ok(self.info(&self.resolve(name, version)?))
    }

    /// The record and archive bytes of a plugin.
    pub fn archive(&self, name: &str, version: Option<&str>) -> Result<(PluginInfo, Bytes)> {
        let r = self.resolve(name, version)?;
        let blob = self.store.blob(&r.digest)?.ok_or_else(|| {
            PluginServiceError::Store(PluginStoreError::Corrupt(format!(
                "the archive of {} is missing",
                r.id()
            )))
        })?;
        Ok((self.info(&r), Bytes::copy_from_slice(&blob)))
    }

    /// Removes `name@version` unless it is in use. Returns the record and whether its
    /// archive was deleted.
    /// A record that no longer decodes (disk damage) is removed too, unless in use: the
    /// answer then has no record, and its archive stays unreferenced.
    pub fn remove(&self, name: &str, version: &str) -> Result<(Option<StoredPlugin>, bool)> {
        let _admin = lock(&self.admin);
        let id = format!("{name}@{version}");
        let r = match self.check_removable(name, version) {
            Err(PluginServiceError::Store(PluginStoreError::Corrupt(_)))
                if !self.used_by(&id).is_empty() =>
            {
                return Err(PluginServiceError::InUse(format!(
                    "{id} (its stored record is damaged) is in use by {}; detach it first (e.g. `quiver topic alter T --partitioner OTHER@VERSION`) or stop its consumers, then remove it",
                    self.used_by(&id).join(", ")
                )));
            }
            Err(PluginServiceError::Store(PluginStoreError::Corrupt(_)))
                if self.store.remove_damaged(&id)? =>
            {
                lock(&self.pool).retain(|k, _| k.plugin != id);
                tracing::warn!(plugin = %id, "removed a damaged plugin record; its archive stays unreferenced");
                return Ok((None, false));
            }
            r => r?,
        };
        let deleted = self.forget(&r)?;
        Ok((Some(r), deleted))
    }

    /// Checks that `name@version` is deployed and not in use (what [`remove`](Self::remove)
    /// would refuse), without removing it.
    pub fn check_removable(&self, name: &str, version: &str) -> Result<StoredPlugin> {
        let r = self.resolve(name, Some(version))?;
        let users = self.used_by(&r.id());
        if !users.is_empty() {
            return Err(PluginServiceError::InUse(format!(
                "{} is in use by {}; detach it first (e.g. `quiver topic alter T --partitioner OTHER@VERSION`) or stop its consumers",
                r.id(),
                users.join(", ")
            )));
        }
        Ok(r)
    }

    /// Ids (`name@version`) of the stored records that no longer decode.
    pub fn damaged(&self) -> Result<Vec<String>> {
        Ok(self.store.damaged()?)
    }

    /// The ids (`name@version`) and digests of every plugin stored here (readable records).
    pub fn stored(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .store
            .all()?
            .into_iter()
            .map(|r| (r.id(), r.digest))
            .collect())
    }

    fn forget(&self, r: &StoredPlugin) -> Result<bool> {
        let deleted = self.store.remove(r)?;
        lock(&self.bundles).remove(&r.digest);
        lock(&self.pool).retain(|k, _| k.plugin != r.id());
        tracing::info!(plugin = %r.id(), "plugin removed");
        Ok(deleted)
    }

    /// Checks that `id` (`name@version`) is a deployed partitioner (topic create/alter).
    pub fn check_partitioner(&self, id: &str) -> Result<()> {
        let Some((name, version)) = id.split_once('@') else {
            return Err(PluginServiceError::Invalid(format!(
                "{id:?} must be NAME@VERSION"
            )));
        };
        let r = self.resolve(name, Some(version))?;
        if r.kind != "partitioner" {
            return Err(PluginServiceError::Invalid(format!(
                "{id} is a {}, not a partitioner",
                r.kind
            )));
        }
        Ok(())
    }

    /// Who uses `id`: topics naming it as partitioner and live processor instances.
    fn used_by(&self, id: &str) -> Vec<String> {
        let mut users: Vec<String> = self
            .topics
            .list()
            .iter()
            .filter(|t| t.config().partitioner.as_deref() == Some(id))
            .map(|t| format!("topic {} (partitioner)", t.name()))
            .collect();
        let mut pool = lock(&self.pool);
        let idle = self.idle;
        pool.retain(|_, s| lock(&s.last_used).elapsed() < idle);
        let mut procs: Vec<String> = pool
            .iter()
            .filter(|(k, s)| k.plugin == id && lock(&s.last_used).elapsed() < IN_USE_WINDOW)
            .map(|(k, _)| k)
            .map(|k| format!("a consume-time processor on {}/{}", k.topic, k.partition))
            .collect();
        procs.sort();
        procs.dedup();
        users.extend(procs);
        users
    }

    fn info(&self, r: &StoredPlugin) -> PluginInfo {
        PluginInfo {
            name: r.name.clone(),
            version: r.version.clone(),
            kind: r.kind.clone(),
            runtime: r.runtime.clone(),
            description: r.description.clone(),
            digest: r.digest.clone(),
            deployed_ms: r.deployed_ms,
            size_bytes: r.size,
            config: r.config.clone(),
            used_by: self.used_by(&r.id()),
        }
    }

    /// The loaded bundle of a record (cached by digest).
    fn bundle(&self, r: &StoredPlugin) -> Result<Arc<Bundle>> {
        if let Some(b) = lock(&self.bundles).get(&r.digest) {
            return Ok(b.clone());
        }
        let blob = self.store.blob(&r.digest)?.ok_or_else(|| {
            PluginServiceError::Store(PluginStoreError::Corrupt(format!(
                "the archive of {} is missing",
                r.id()
            )))
        })?;
        let b = Arc::new(Bundle::from_archive_bytes(&blob).map_err(|e| {
            PluginServiceError::Store(PluginStoreError::Corrupt(format!("{}: {e}", r.id())))
        })?);
        lock(&self.bundles).insert(r.digest.clone(), b.clone());
        Ok(b)
    }

    /// Marks the instance of `spec` on `topic`/`partition` as in use without running it
    /// (a fetch that found nothing new still means a consumer is there).
    pub fn touch(&self, topic: &str, partition: u32, spec: &ProcessorSpec) {
        let pool = lock(&self.pool);
        for (k, s) in pool.iter() {
            if k.topic == topic
                && k.partition == partition
                && k.plugin.split('@').next() == Some(spec.name.as_str())
                && k.config == spec.config
            {
                *lock(&s.last_used) = Instant::now();
            }
        }
    }

    /// Refuses a quarantined instance key until its cool-down has passed.
    fn check_quarantine(&self, key: &PoolKey) -> Result<()> {
        let mut q = lock(&self.quarantined);
        if let Some((until, reason)) = q.get(key) {
            if Instant::now() < *until {
                return Err(PluginServiceError::Failed(format!(
                    "{} on {}/{} is quarantined for {} ms more after: {reason}",
                    key.plugin,
                    key.topic,
                    key.partition,
                    until.saturating_duration_since(Instant::now()).as_millis()
                )));
            }
            q.remove(key);
        }
        Ok(())
    }

    /// Drops the instance behind `key` (so a stuck or broken one is never called again)
    /// and refuses new calls for it during the quarantine period.
    fn quarantine(&self, key: &PoolKey, slot: Option<&Arc<Slot>>, reason: &str) {
        tracing::warn!(plugin = %key.plugin, topic = %key.topic, partition = key.partition, %reason, quarantine_ms = self.quarantine.as_millis() as u64, "processor instance quarantined");
        if let Some(slot) = slot {
            slot.dead.store(true, Ordering::SeqCst);
        }
        let mut pool = lock(&self.pool);
        if slot.is_none_or(|slot| pool.get(key).is_some_and(|s| Arc::ptr_eq(s, slot))) {
            pool.remove(key);
        }
        drop(pool);
        lock(&self.quarantined).insert(
            key.clone(),
            (Instant::now() + self.quarantine, reason.to_string()),
        );
    }

    /// The live instance for `key`, building one on the plugin pool when there is none.
    async fn slot(
        &self,
        key: &PoolKey,
        r: &StoredPlugin,
        spec: &ProcessorSpec,
    ) -> Result<Arc<Slot>> {
        if let Some(s) = lock(&self.pool).get(key).cloned() {
            return Ok(s);
        }
        let bundle = self.bundle(r)?;
        let overrides: Vec<String> = spec
            .config
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let limits = self.limits.clone();
        let built = self
            .workers
            .run(BUILD_DEADLINE, move || {
                PluginConfig::new(bundle)
                    .overrides(overrides)
                    .and_then(|c| c.limits(limits).build_processor())
            })
            .await
            .map_err(|e| {
                PluginServiceError::Failed(format!("{}: building an instance: {e}", key.plugin))
            })?
            .map_err(|e| PluginServiceError::Failed(e.to_string()))?;
        let slot = Arc::new(Slot {
            processor: Mutex::new(built),
            turn: tokio::sync::Mutex::new(()),
            last_used: Mutex::new(Instant::now()),
            dead: AtomicBool::new(false),
        });
        let mut pool = lock(&self.pool);
        if !pool.contains_key(key) {
            make_room(
                &mut pool,
                |s| *lock(&s.last_used),
                self.idle,
                MAX_POOLED_PROCESSORS,
            );
        }
        Ok(pool.entry(key.clone()).or_insert(slot).clone())
    }

    /// Runs the processor `spec` over a fetched payload of `topic`/`partition` (records
    /// before `from` left out): one plugin call per stored batch, each on the plugin pool
    /// with a deadline of twice the CPU limit plus 100 ms. A call past it is abandoned and
    /// its instance quarantined; the request gets `PluginFailed` at once.
    pub async fn process(
        &self,
        topic: &str,
        partition: u32,
        spec: &ProcessorSpec,
        from: i64,
        payload: &Bytes,
        max_decompressed: usize,
    ) -> Result<Bytes> {
        let r = self.resolve(&spec.name, spec.version.as_deref())?;
        let id = r.id();
        if r.kind != "processor" {
            return Err(PluginServiceError::Invalid(format!(
                "{id} is a {}, not a processor",
                r.kind
            )));
        }
        quiver_plugins::check_config_keys(&id, &r.config, spec.config.keys(), true)
            .map_err(PluginServiceError::Invalid)?;
        let key = PoolKey {
            topic: topic.to_string(),
            partition,
            plugin: id.clone(),
            config: spec.config.clone(),
        };
        self.check_quarantine(&key)?;
        let slot = self.slot(&key, &r, spec).await?;
        *lock(&slot.last_used) = Instant::now();
        let batches = split_batches(payload, usize::MAX).map_err(|e| {
            PluginServiceError::Failed(format!("{id}: stored batches could not be split: {e}"))
        })?;
        // The plugin stops its own call at its CPU limit, or at the wall-clock backstop on a
        // loaded machine; only a call stuck where it cannot be stopped (inside one C
        // function) gets this far, and is abandoned.
        let deadline = self.limits.call_wall_limit()
            + Duration::from_millis(self.limits.cpu_ms.saturating_add(100));
        let mut out = BytesMut::with_capacity(payload.len());
        for batch in batches {
            // A call waits for its turn as long as it may wait for a pool thread; past
            // that it is refused as busy, as a call no thread took would be.
            let Ok(turn) = tokio::time::timeout(self.workers.queue_wait(), slot.turn.lock()).await
            else {
                return Err(PluginServiceError::Failed(format!(
                    "{id} on {topic}/{partition}: {}",
                    PoolError::Busy
                )));
            };
            if slot.dead.load(Ordering::SeqCst) {
                return Err(PluginServiceError::Failed(format!(
                    "{id} on {topic}/{partition} was quarantined while this call waited for it"
                )));
            }
            let s = slot.clone();
            let call = self
                .workers
                .run(deadline, move || {
                    let Some(mut p) = s.lock_live() else {
                        return Err(transform::TransformError::Abandoned);
                    };
                    transform::process_batch(&mut **p, &batch, from, partition, max_decompressed)
                })
                .await;
            drop(turn);
            match call {
                Ok(Ok(Some(b))) => out.extend_from_slice(&b),
                Ok(Ok(None)) => {}
                Ok(Err(transform::TransformError::Plugin(e))) => {
                    tracing::warn!(plugin = %id, topic, partition, error = %e, "consume-time processor failed");
                    if e.is_quarantined() {
                        self.quarantine(&key, Some(&slot), &e.to_string());
                    }
                    return Err(PluginServiceError::Failed(e.to_string()));
                }
                Ok(Err(transform::TransformError::Abandoned)) => {
                    return Err(PluginServiceError::Failed(format!(
                        "{id} on {topic}/{partition} was quarantined while this call waited for it"
                    )))
                }
                Ok(Err(transform::TransformError::Protocol(e))) => {
                    return Err(PluginServiceError::Failed(format!(
                        "{id}: stored batch could not be decoded: {e}"
                    )))
                }
                Err(PoolError::TimedOut(ms)) => {
                    let reason = format!(
                        "{id} did not return within {ms} ms (its CPU limit is {} ms); the call was abandoned",
                        self.limits.cpu_ms
                    );
                    self.quarantine(&key, Some(&slot), &reason);
                    return Err(PluginServiceError::Failed(format!(
                        "{reason} and the instance is quarantined"
                    )));
                }
                Err(e) => return Err(PluginServiceError::Failed(format!("{id}: {e}"))),
            }
        }
        Ok(out.freeze())
    }
}

/// Orders versions by semver; unparsable ones (never stored: the host validates) sort first.
fn version_key(v: &str) -> Option<semver::Version> {
    semver::Version::parse(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::{set_base_offset, BatchBuilder, Compression, RecordIter};

    #[test]
    fn a_full_pool_drops_idle_entries_then_the_least_recently_used() {
        let now = Instant::now();
        let ago = |s: u64| now - Duration::from_secs(s);
        let mut pool: HashMap<u32, Instant> =
            HashMap::from([(1, ago(500)), (2, ago(5)), (3, ago(1)), (4, ago(3))]);
        make_room(&mut pool, |t| *t, Duration::from_secs(100), 10);
        assert_eq!(pool.len(), 3, "only the idle one went: {pool:?}");
        make_room(&mut pool, |t| *t, Duration::from_secs(100), 2);
        let mut left: Vec<u32> = pool.keys().copied().collect();
        left.sort();
        assert_eq!(
            left,
            vec![3],
            "room for one more under a cap of 2: the newest stays"
        );
    }

    fn bundle(name: &str, version: &str, kind: &str, source: &str) -> Vec<u8> {
        let mut files = BTreeMap::new();
        files.insert(
            "plugin.toml".to_string(),
            format!("name = \"{name}\"\nversion = \"{version}\"\nkind = \"{kind}\"\nruntime = \"lua\"\nentry = \"m.lua\"\n").into_bytes(),
        );
        files.insert("m.lua".to_string(), source.as_bytes().to_vec());
        Bundle::from_files(files, std::path::Path::new("t"))
            .unwrap()
            .to_archive_bytes()
            .unwrap()
    }

    fn service() -> (tempfile::TempDir, PluginService) {
        service_with(&PluginsConfig::default())
    }

    fn service_with(config: &PluginsConfig) -> (tempfile::TempDir, PluginService) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        let topics = Arc::new(TopicRegistry::open(db.clone(), Default::default()).unwrap());
        let s = PluginService::open(db, topics, config).unwrap();
        (dir, s)
    }

    const COUNT: &str =
        "local n = 0\nfunction process(r) n = n + 1; r.value = tostring(n); return r end";

    #[test]
    fn deploy_is_idempotent_per_digest_and_refuses_changed_bytes() {
        let (_d, s) = service();
        let a = bundle("p", "1.0.0", "processor", COUNT);
        assert!(!s.deploy(&a).unwrap().already_deployed);
        assert!(s.deploy(&a).unwrap().already_deployed);
        let b = bundle(
            "p",
            "1.0.0",
            "processor",
            "function process(r) return nil end",
        );
        assert!(matches!(
            s.deploy(&b),
            Err(PluginServiceError::VersionConflict(_))
        ));
        s.deploy(&bundle("p", "1.10.0", "processor", COUNT))
            .unwrap();
        s.deploy(&bundle("p", "1.9.0", "processor", COUNT)).unwrap();
        assert_eq!(s.describe("p", None).unwrap().version, "1.10.0");
        let bad = bundle("q", "1.0.0", "processor", "this is not lua");
        assert!(matches!(
            s.deploy(&bad),
            Err(PluginServiceError::Invalid(_))
        ));
    }

    /// A plugin record that no longer decodes (disk damage) does not stop the store's open:
    /// the others list and resolve, the damaged one answers what to do, `remove` drops it,
    /// and it can be deployed again.
    #[test]
    fn a_damaged_plugin_record_leaves_the_others_usable() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        let topics = Arc::new(TopicRegistry::open(db.clone(), Default::default()).unwrap());
        let s = PluginService::open(db.clone(), topics.clone(), &PluginsConfig::default()).unwrap();
        let p2 = bundle("p", "2.0.0", "processor", COUNT);
        s.deploy(&bundle("p", "1.0.0", "processor", COUNT)).unwrap();
        s.deploy(&p2).unwrap();
        s.deploy(&bundle("q", "1.0.0", "processor", COUNT)).unwrap();
        drop(s);
        db.open_tree("__plugins")
            .unwrap()
            .insert("p@2.0.0", &b"\xffnot json"[..])
            .unwrap();
        let s = PluginService::open(db, topics, &PluginsConfig::default())
            .expect("one damaged plugin record does not stop the open");
        let listed: Vec<String> = s
            .list()
            .unwrap()
            .iter()
            .map(|p| format!("{}@{}", p.name, p.version))
            .collect();
        assert_eq!(listed, ["p@1.0.0", "q@1.0.0"]);
        assert_eq!(s.store.damaged().unwrap(), ["p@2.0.0"]);
        assert_eq!(s.describe("q", None).unwrap().version, "1.0.0");
        // Without a version, not the older one in place of the damaged newer one.
        let e = s.describe("p", None).unwrap_err();
        assert!(e.to_string().contains("p@2.0.0"), "{e}");
        assert_eq!(s.describe("p", Some("1.0.0")).unwrap().version, "1.0.0");
        let e = s.describe("p", Some("2.0.0")).unwrap_err();
        assert!(
            e.to_string().contains("damaged")
                && e.to_string().contains("quiver plugin remove p@2.0.0"),
            "{e}"
        );
        let (record, _) = s.remove("p", "2.0.0").unwrap();
        assert!(record.is_none(), "a damaged record has nothing to report");
        assert!(s.store.damaged().unwrap().is_empty());
        assert!(!s.deploy(&p2).unwrap().already_deployed);
        assert_eq!(s.describe("p", None).unwrap().version, "2.0.0");
    }

    #[tokio::test]
    async fn a_pooled_processor_keeps_state_per_partition_and_blocks_removal() {
        let (_d, s) = service();
        s.deploy(&bundle("count", "1.0.0", "processor", COUNT))
            .unwrap();
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"x", 1, &[]);
        b.push(None, b"y", 1, &[]);
        let mut raw = b.build().to_vec();
        set_base_offset(&mut raw, 7);
        let payload = Bytes::from(raw);
        let spec = ProcessorSpec::parse("count").unwrap();
        let values = |out: Bytes| -> Vec<String> {
            RecordIter::new(&out, 1 << 20)
                .unwrap()
                .map(|r| String::from_utf8(r.unwrap().value.to_vec()).unwrap())
                .collect()
        };
        assert_eq!(
            values(
                s.process("t", 0, &spec, 0, &payload, 1 << 20)
                    .await
                    .unwrap()
            ),
            ["1", "2"]
        );
        assert_eq!(
            values(
                s.process("t", 0, &spec, 8, &payload, 1 << 20)
                    .await
                    .unwrap()
            ),
            ["3"]
        );
        assert_eq!(
            values(
                s.process("t", 1, &spec, 0, &payload, 1 << 20)
                    .await
                    .unwrap()
            ),
            ["1", "2"]
        );
        assert!(matches!(
            s.remove("count", "1.0.0"),
            Err(PluginServiceError::InUse(_))
        ));
    }

    /// Passes its records through after sleeping: a call that takes wall time, not CPU.
    struct Sleepy(Duration);

    impl Processor for Sleepy {
        fn process_batch(
            &mut self,
            records: Vec<quiver_plugins::Record>,
        ) -> std::result::Result<Vec<quiver_plugins::Record>, quiver_plugins::PluginError> {
            std::thread::sleep(self.0);
            Ok(records)
        }
    }

    /// Six fetches through one instance at once, on six plugin threads: each call takes a
    /// quarter of its deadline, so all six in a row take longer than one deadline. Each is
    /// timed from its own turn, not from when a thread took it, so none is taken for stuck
    /// and the instance is not quarantined.
    #[tokio::test]
    async fn calls_waiting_for_their_instance_are_not_timed_while_they_wait() {
        let config = PluginsConfig {
            threads: 6,
            cpu_ms: 100,
            ..PluginsConfig::default()
        };
        let (_d, s) = service_with(&config);
        s.deploy(&bundle("slow", "1.0.0", "processor", COUNT))
            .unwrap();
        let deadline = s.limits.call_wall_limit() + Duration::from_millis(config.cpu_ms + 100);
        let call = deadline / 4;
        let key = PoolKey {
            topic: "t".into(),
            partition: 0,
            plugin: "slow@1.0.0".into(),
            config: BTreeMap::new(),
        };
        lock(&s.pool).insert(
            key,
            Arc::new(Slot {
                processor: Mutex::new(Box::new(Sleepy(call))),
                turn: tokio::sync::Mutex::new(()),
                last_used: Mutex::new(Instant::now()),
                dead: AtomicBool::new(false),
            }),
        );
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"x", 1, &[]);
        let payload = b.build();
        let spec = ProcessorSpec::parse("slow").unwrap();
        let calls = (0..6).map(|_| s.process("t", 0, &spec, 0, &payload, 1 << 20));
        for (i, r) in futures::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            let out = r.unwrap_or_else(|e| panic!("call {i}: {e}"));
            assert_eq!(RecordIter::new(&out, 1 << 20).unwrap().count(), 1);
        }
        assert!(
            lock(&s.quarantined).is_empty(),
            "the instance was quarantined"
        );
    }
}
