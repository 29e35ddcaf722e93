//! The broker: opens storage, makes or loads TLS material, starts the QUIC server, the
//! flush, retention and metrics tasks, and shuts them down in order (stop accepting, let
//! in-flight requests finish, close connections, flush).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cluster::member::{raft_tls, ClusterMember, MemberConfig};
use crate::cluster::ControllerState;
use crate::config::BrokerConfig;
use crate::group::{GroupDirectory, GroupService};
use crate::log::{FlushFailed, Flusher, PartitionLog, RepairReport};
use crate::metrics::Metrics;
use crate::pipelines::{PipelineHost, PipelineSlot};
use crate::plugin::PluginService;
use crate::server::endpoint::{self, EndpointError};
use crate::server::{ClusterSlot, ServerContext, ServerParts};
use crate::tls::{self, TlsError};
use crate::topic::{TopicMeta, TopicRegistry, PARTITION_META_TREE, TOPICS_TREE};
use crate::txn::{MarkerWriter, ProducerIds, TxnCoordinator, TxnEnv, MAX_TRANSACTIONAL_IDS};

/// Why the broker could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Invalid configuration or data directory.
    #[error("{0}")]
    Config(String),
    /// Storage failure.
    #[error("storage: {0}")]
    Storage(String),
    /// TLS material could not be made or loaded.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not be set up (its message says so; an error chain prints
    /// it once).
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The network endpoint failed.
    #[error("network: {0}")]
    Io(String),
}

impl From<std::io::Error> for BrokerError {
    fn from(e: std::io::Error) -> Self {
        BrokerError::Io(e.to_string())
    }
}

/// Entry point: [`Broker::start`].
pub struct Broker;

type ShutdownFn = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>;

/// A running broker.
pub struct BrokerHandle {
    local_addr: SocketAddr,
    ca_path: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    pipelines: PipelineSlot,
    member: Arc<tokio::sync::Mutex<Option<ClusterMember>>>,
    /// What handles requests: also reached in process ([`BrokerHandle::in_process`]).
    ctx: Arc<crate::server::ServerContext>,
    shutdown: Option<ShutdownFn>,
}

/// What the data directory remembers about its broker.
#[derive(Debug, Serialize, Deserialize)]
struct DataDirIdentity {
    broker_id: u32,
}

fn check_identity(dir: &Path, broker_id: u32) -> Result<(), BrokerError> {
    let path = dir.join("broker.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let id: DataDirIdentity = serde_json::from_slice(&bytes)
                .map_err(|e| BrokerError::Config(format!("{} is damaged: {e}", path.display())))?;
            if id.broker_id != broker_id {
                return Err(BrokerError::Config(format!(
                    "data directory {} belongs to broker {}, but this broker is configured as broker_id = {broker_id}; use that broker's data directory or fix broker_id",
                    dir.display(),
                    id.broker_id
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let body = serde_json::to_vec(&DataDirIdentity { broker_id }).unwrap_or_default();
            std::fs::write(&path, body)
                .map_err(|e| BrokerError::Config(format!("cannot write {}: {e}", path.display())))
        }
        Err(e) => Err(BrokerError::Config(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// The file that says the log store was created empty and the controller has not yet
/// taken this broker's registration saying so.
pub const EMPTY_LOG_MARKER: &str = "log-empty-unregistered";

/// Whether `dir`'s log store is new (missing or an empty directory) or was new at a start
/// whose registration did not go through; writes the marker when it is.
fn empty_log_store(dir: &Path) -> Result<bool, BrokerError> {
    let log = dir.join("log");
    let marker = dir.join(EMPTY_LOG_MARKER);
    let empty = marker.exists()
        || match std::fs::read_dir(&log) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
    if empty {
        // Durable before the store is created: after a power loss a store without its
        // marker would be taken for one holding replicas.
        let write = || -> std::io::Result<()> {
            std::fs::File::create(&marker)?.sync_all()?;
            std::fs::File::open(dir)?.sync_all()
        };
        write()
            .map_err(|e| BrokerError::Config(format!("cannot write {}: {e}", marker.display())))?;
    }
    Ok(empty)
}

fn open_db(dir: &Path) -> Result<crate::log::Database, BrokerError> {
    crate::log::store::open(&dir.join("log"))
        .map_err(|e| {
            let hint = if e.to_string().contains("lock") {
                " (is another broker running with this data directory? stop it with `quiver broker stop`)"
            } else {
                ""
            };
            BrokerError::Storage(format!("cannot open {}: {e}{hint}", dir.join("log").display()))
        })
}

async fn retention_loop(
    topics: Arc<TopicRegistry>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let topics = topics.clone();
        let res = tokio::task::spawn_blocking(move || {
            for t in topics.list() {
                let cfg = t.config();
                for p in &t.partitions {
                    if let Err(e) = p.apply_retention(&cfg, crate::clock::now_ms()) {
                        tracing::warn!(topic = %p.topic, partition = p.partition, error = %e, "retention failed");
                    }
                    let _ = p.persist_meta();
                }
            }
        })
        .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "retention task failed");
        }
    }
}

impl Broker {
    /// Truncates partition `partition` of `topic` in the data directory of a stopped
    /// broker at its first damaged batch (that batch and everything after it are
    /// dropped) and reports what went. A running broker holds the directory's lock, so
    /// this refuses to touch its data.
    pub fn repair(
        data_dir: &Path,
        topic: &str,
        partition: u32,
    ) -> Result<RepairReport, BrokerError> {
        if !data_dir.join("log").exists() {
            return Err(BrokerError::Config(format!(
                "{} holds no broker data (no log/ directory)",
                data_dir.display()
            )));
        }
        let db = open_db(data_dir)?;
        let storage = |e: sled::Error| BrokerError::Storage(e.to_string());
        let topics = db.open_tree(TOPICS_TREE).map_err(storage)?;
        let meta: TopicMeta = match topics.get(topic.as_bytes()).map_err(storage)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| {
                BrokerError::Storage(format!("the record of topic {topic:?} is damaged: {e}"))
            })?,
            None => {
                return Err(BrokerError::Config(format!(
                    "no topic {topic:?} in {}",
                    data_dir.display()
                )))
            }
        };
        if partition >= meta.partitions {
            return Err(BrokerError::Config(format!(
                "topic {topic:?} has {} partitions; partition {partition} does not exist",
                meta.partitions
            )));
        }
        let pmeta = db.open_tree(PARTITION_META_TREE).map_err(storage)?;
        let report = PartitionLog::repair(&db, &pmeta, meta.id, partition)
            .map_err(|e| BrokerError::Storage(e.to_string()))?;
        tracing::info!(topic, partition, ?report, "partition repaired");
        Ok(report)
    }

    /// Starts a broker with `config` and returns once it accepts connections.
    pub async fn start(config: BrokerConfig) -> Result<BrokerHandle, BrokerError> {
        config
            .validate("config")
            .map_err(|e| BrokerError::Config(e.to_string()))?;
        let addr: SocketAddr = config
            .listen
            .parse()
            .map_err(|e| BrokerError::Config(format!("listen {:?}: {e}", config.listen)))?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            BrokerError::Config(format!(
                "cannot create data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
        check_identity(&config.data_dir, config.broker_id)?;
        // A store created now holds no replica, whatever the cluster remembers of this
        // broker (a new disk, or a lost `log/`): said at registration, and remembered by a
        // marker until the controller has taken it (a start that fails before then would
        // otherwise find a store and say nothing).
        let empty_log = config.cluster.enabled() && empty_log_store(&config.data_dir)?;
        let db = open_db(&config.data_dir)?;
        let identity = tls::load_or_create(&config)?;
        let ca_path = identity.ca_path.clone().or(config.cluster.ca.clone());
        // A cluster broker also serves its peers' Raft on this endpoint (mutual TLS).
        let (crypto, raft_tls) = match (&config.cluster.ca, config.cluster.enabled()) {
            (Some(ca), true) => {
                let ca = tls::load_certificates(ca)?;
                let raft_tls = raft_tls(ca.clone(), &identity.chain, &identity.key);
                (tls::cluster_server_crypto(identity, &ca)?, Some(raft_tls))
            }
            _ => (tls::server_crypto(identity)?, None),
        };
        let defaults = config
            .default_topic_config()
            .map_err(|(k, r)| BrokerError::Config(format!("topic_defaults.{k}: {r}")))?;
        let topics = Arc::new(
            TopicRegistry::open(db.clone(), defaults)
                .map_err(|e| BrokerError::Storage(e.to_string()))?,
        );
        let metrics = Arc::new(Metrics::default());
        metrics.partitions.store(
            topics
                .list()
                .iter()
                .map(|t| t.partitions.len() as i64)
                .sum(),
            Ordering::Relaxed,
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        // The flusher has its own stop signal: it keeps serving the flush tickets of
        // in-flight produces and commits until they have all been answered.
        let (flush_stop_tx, flush_stop_rx) = watch::channel(false);
        let flusher = Flusher::new(db.clone());
        let flush_task = tokio::spawn(flusher.clone().run(
            Duration::from_millis(config.topic_defaults.flush_interval_ms.clamp(10, 60_000)),
            flush_stop_rx,
        ));
        let endpoint = endpoint::bind(addr, crypto, &config.limits)?;
        let local_addr = endpoint.local_addr()?;
        let metrics_addr = match &config.metrics_listen {
            Some(m) => {
                let l = tokio::net::TcpListener::bind(m)
                    .await
                    .map_err(|e| BrokerError::Io(format!("metrics_listen {m}: {e}")))?;
                let a = l.local_addr()?;
                tokio::spawn(crate::metrics::serve(l, metrics.clone(), stop_rx.clone()));
                Some(a)
            }
            None => None,
        };
        // A lone broker coordinates every group from its own `__consumer_offsets`; a cluster
        // broker serves the groups of the offsets partitions it leads (the replica manager
        // opens them as it takes leadership).
        // Transactions live beside groups (the same partitions of `__consumer_offsets`).
        let groups = GroupDirectory::new();
        let txn_markers = MarkerWriter::new(topics.clone(), flusher.clone());
        txn_markers.attach_groups(&groups);
        let txn_env = Arc::new(TxnEnv {
            markers: txn_markers.clone(),
            ids: ProducerIds::new(db.sled().clone(), config.broker_id),
            max_ids: MAX_TRANSACTIONAL_IDS,
        });
        let lone_tasks = if config.cluster.enabled() {
            None
        } else {
            let (service, replayed) =
                GroupService::open(topics.clone(), flusher.clone(), group_log_limits(&config))
                    .map_err(|e| BrokerError::Storage(format!("consumer groups: {e}")))?;
            let txns = TxnCoordinator::new(service.clone(), replayed.txn_states, txn_env.clone());
            let moved = txns
                .adopt_legacy(&db)
                .await
                .map_err(|e| BrokerError::Storage(format!("transactions: {e}")))?;
            if moved > 0 {
                tracing::info!(
                    ids = moved,
                    "moved transaction state into {}",
                    crate::group::OFFSETS_TOPIC
                );
            }
            groups.set_lone(service.clone(), txns.clone());
            Some((
                tokio::spawn(service.run_ticker(stop_rx.clone())),
                tokio::spawn(txns.run_ticker(stop_rx.clone())),
            ))
        };
        let plugins = Arc::new(
            PluginService::open(db.clone(), topics.clone(), &config.plugins)
                .map_err(|e| BrokerError::Storage(e.to_string()))?,
        );
        let config = Arc::new(config);
        let pipelines = PipelineSlot::default();
        let member: ClusterSlot = Arc::default();
        let ctx = ServerContext::new(
            ServerParts {
                config: config.clone(),
                topics: topics.clone(),
                flusher: flusher.clone(),
                metrics,
                groups: groups.clone(),
                plugins: plugins.clone(),
                txn_markers: txn_markers.clone(),
                cluster: member.clone(),
                pipelines: pipelines.clone(),
            },
            stop_rx.clone(),
        );
        let started = match raft_tls {
            Some(raft_tls) => {
                let m = ClusterMember::start(
                    MemberConfig {
                        id: config.broker_id,
                        data_dir: config.data_dir.clone(),
                        advertised: config.advertised(),
                        local_addr,
                        cluster: config.cluster.clone(),
                        tls: raft_tls,
                        empty_log: empty_log.then(|| config.data_dir.join(EMPTY_LOG_MARKER)),
                    },
                    endpoint.clone(),
                    stop_rx.clone(),
                )
                .await
                .map_err(BrokerError::Config)?;
                let _ = ctx.raft.set(m.service());
                let (Some(ca), Some(cert), Some(key)) = (
                    config.cluster.ca.clone(),
                    config.tls.cert.clone(),
                    config.tls.key.clone(),
                ) else {
                    return Err(BrokerError::Config(
                        "a cluster broker needs cluster.ca, tls.cert and tls.key (written by `quiver cluster start`)".into(),
                    ));
                };
                let rm = crate::replica::ReplicaManager::start(
                    crate::replica::manager::ReplicaSetup {
                        me: u64::from(config.broker_id),
                        registered_epoch: m.epoch(),
                        topics: topics.clone(),
                        flusher: flusher.clone(),
                        controller: m.controller(),
                        peers: crate::replica::peers::PeerClients::new(
                            endpoint.clone(),
                            ca,
                            cert,
                            key,
                        ),
                        lag_max_ms: config.cluster.replica_lag_max_ms as i64,
                        max_batch_bytes: config.limits.max_frame_bytes as usize,
                        groups: groups.clone(),
                        txn_env: txn_env.clone(),
                        offsets_replication: config.cluster.voters.len().clamp(1, 3),
                        group_log: group_log_limits(&config),
                        plugins: plugins.clone(),
                        pipelines: pipelines.clone(),
                    },
                    stop_rx.clone(),
                );
                txn_markers.attach_replicas(Arc::downgrade(&rm));
                let _ = ctx.replicas.set(rm);
                Some(m)
            }
            None => None,
        };
        *member.lock().await = started;
        let member_for_handle = member.clone();
        let ctx_for_handle = ctx.clone();
        let accept_task = tokio::spawn(endpoint::accept_loop(endpoint.clone(), ctx.clone()));
        let janitor_task = tokio::spawn(crate::txn::janitor::run(
            topics.clone(),
            txn_markers.clone(),
            stop_rx.clone(),
        ));
        let retention_task = tokio::spawn(retention_loop(
            topics.clone(),
            Duration::from_millis(config.retention_check_interval_ms),
            stop_rx,
        ));
        tracing::info!(broker_id = config.broker_id, %local_addr, data_dir = %config.data_dir.display(), "broker started");
        let shutdown: ShutdownFn = Box::new(move || {
            Box::pin(async move {
                tracing::info!(
                    "broker shutting down: no new connections; finishing in-flight requests"
                );
                let _ = stop_tx.send(true);
                let _ = accept_task.await;
                let left = ctx
                    .drain(Duration::from_millis(config.shutdown_timeout_ms))
                    .await;
                if left > 0 {
                    tracing::warn!(requests = left, "closing with requests still in flight");
                } else {
                    tracing::info!("every in-flight request answered");
                }
                if let Some(m) = member.lock().await.take() {
                    m.shutdown().await;
                }
                endpoint.close(quinn::VarInt::from_u32(0), b"broker shutting down");
                let _ = retention_task.await;
                let _ = janitor_task.await;
                if let Some((groups, txns)) = lone_tasks {
                    let _ = groups.await;
                    let _ = txns.await;
                }
                // Every request has been answered (or the timeout passed): now the flusher
                // may stop; the final flush below covers whatever it had not.
                let _ = flush_stop_tx.send(true);
                let _ = flush_task.await;
                for t in topics.list() {
                    for p in &t.partitions {
                        let _ = p.persist_meta();
                    }
                }
                if let Err(e) = flusher.flush_now() {
                    tracing::error!(error = %e, "final flush failed");
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                tracing::info!("broker stopped");
            })
        });
        Ok(BrokerHandle {
            local_addr,
            ca_path,
            metrics_addr,
            pipelines,
            member: member_for_handle,
            ctx: ctx_for_handle,
            shutdown: Some(shutdown),
        })
    }
}

impl BrokerHandle {
    /// The bound QUIC address (useful when `listen` used port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The CA certificate clients should trust, when the broker made its own.
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.ca_path.clone()
    }

    /// The bound metrics address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Cluster brokers: the controller leader this broker knows of and the metadata it has
    /// applied (`None` for a lone broker).
    pub async fn cluster_view(&self) -> Option<(Option<u64>, ControllerState)> {
        let m = self.member.lock().await;
        let m = m.as_ref()?;
        Some((m.controller_leader(), m.state().await))
    }

    /// A door into this broker for clients in the same process: a client whose
    /// [`ClientConfig::local`](quiver_client::ClientConfig::local) is this sends its
    /// requests for this broker straight to the dispatcher, without QUIC.
    pub fn in_process(&self) -> quiver_client::LocalBroker {
        quiver_client::LocalBroker(Arc::new(crate::server::local::InProcess::new(&self.ctx)))
    }

    /// Most members a consumer group may have on this broker (`group_max_size`).
    pub fn group_max_size(&self) -> u64 {
        self.ctx.config.group_max_size
    }

    /// The configuration of a client in this process that reaches this broker through
    /// [`in_process`](Self::in_process) (its requests skip QUIC), and other brokers of its
    /// cluster over QUIC, trusting its CA.
    pub fn in_process_client_config(&self) -> quiver_client::ClientConfig {
        let mut addr = self.local_addr();
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        quiver_client::ClientConfig {
            ca_file: self.ca_path(),
            local: Some(self.in_process()),
            ..quiver_client::ClientConfig::new(addr.to_string())
        }
    }

    /// Installs the host that runs deployed pipelines (once; later calls return false).
    /// Install it after start, since the host's instances connect to this broker.
    pub fn install_pipeline_host(&self, host: Arc<dyn PipelineHost>) -> bool {
        self.pipelines.install(host)
    }

    /// Resolves when a disk flush failed: the broker acknowledges no more writes and should
    /// stop (see [`crate::log::flush`]); a supervisor's restart recovers from the disk.
    pub async fn storage_failed(&self) -> FlushFailed {
        self.ctx.flusher.failure().await
    }

    /// Stops accepting, finishes in-flight requests (up to `shutdown_timeout_ms`), flushes.
    pub async fn shutdown(mut self) {
        if let Some(f) = self.shutdown.take() {
            f().await;
        }
    }
}

/// How the consumer-group services bound their work on `__consumer_offsets`.
fn group_log_limits(config: &BrokerConfig) -> crate::group::GroupLogLimits {
    crate::group::GroupLogLimits {
        max_decompressed: config.limits.max_frame_bytes as usize,
        compact_bytes: config.offsets_compact_bytes,
        retention_ms: config.offsets_retention_ms,
        max_members: usize::try_from(config.group_max_size).unwrap_or(usize::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store is empty when `log/` is missing or an empty directory, and stays so (the
    /// marker) until a registration removes the marker.
    #[test]
    fn an_empty_log_store_is_remembered_until_registered() {
        let dir = tempfile::tempdir().unwrap();
        assert!(empty_log_store(dir.path()).unwrap(), "no log/ yet");
        std::fs::create_dir(dir.path().join("log")).unwrap();
        std::fs::write(dir.path().join("log/db"), b"x").unwrap();
        assert!(
            empty_log_store(dir.path()).unwrap(),
            "the marker: the earlier start did not register"
        );
        std::fs::remove_file(dir.path().join(EMPTY_LOG_MARKER)).unwrap();
        assert!(!empty_log_store(dir.path()).unwrap(), "a store with data");
        std::fs::remove_file(dir.path().join("log/db")).unwrap();
        assert!(empty_log_store(dir.path()).unwrap(), "an emptied log/");
    }
}
