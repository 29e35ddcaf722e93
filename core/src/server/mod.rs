//! The QUIC server: the endpoint and its accept loop ([`endpoint`]), per-connection and
//! per-stream framing ([`connection`]) with each connection's budget of answer bytes
//! ([`budget`]), a dispatcher that only routes ([`dispatch`]), one
//! handler module per request type ([`requests`]), and the in-process door to the same
//! dispatcher for the broker's own deployed pipelines ([`local`]).
//!
//! A bad frame ends its own stream with an error response; other streams and other
//! clients never notice.

pub mod budget;
pub mod connection;
pub mod dispatch;
pub mod endpoint;
pub mod local;
pub mod requests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::BrokerConfig;
use crate::group::GroupDirectory;
use crate::log::Flusher;
use crate::metrics::Metrics;
use crate::pipelines::PipelineSlot;
use crate::plugin::PluginService;
use crate::topic::TopicRegistry;
use crate::txn::MarkerWriter;

/// Where a cluster broker keeps its membership (empty for a lone broker, and until started).
pub type ClusterSlot = Arc<tokio::sync::Mutex<Option<crate::cluster::member::ClusterMember>>>;

/// What every request handler can reach.
pub struct ServerContext {
    /// The broker's parts (reached through `Deref`: `ctx.topics`, `ctx.groups`, …).
    parts: ServerParts,
    /// The controller's Raft, once it runs (cluster brokers): peer brokers' Raft
    /// connections on this endpoint are served by it.
    pub raft: std::sync::OnceLock<crate::cluster::RaftService>,
    /// A cluster broker's replicas, once its membership runs (unset on a lone broker).
    pub replicas: std::sync::OnceLock<Arc<crate::replica::ReplicaManager>>,
    /// Turns true when the broker starts shutting down.
    pub stopping: watch::Receiver<bool>,
    inflight: AtomicUsize,
    idle: Notify,
    /// The broker's decompression memory, in KiB permits (`limits.max_decompression_bytes`).
    decompression: Arc<Semaphore>,
    /// Its size in KiB (a request never waits for more than all of it).
    decompression_kib: u32,
}

impl std::ops::Deref for ServerContext {
    type Target = ServerParts;

    fn deref(&self) -> &ServerParts {
        &self.parts
    }
}

/// The broker's parts a [`ServerContext`] is made of.
pub struct ServerParts {
    /// Broker config.
    pub config: Arc<BrokerConfig>,
    /// Topics and their partition logs.
    pub topics: Arc<TopicRegistry>,
    /// Group commit.
    pub flusher: Arc<Flusher>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Consumer groups.
    pub groups: Arc<GroupDirectory>,
    /// Deployed plugins.
    pub plugins: Arc<PluginService>,
    /// Writes transaction markers into the partitions this broker leads.
    pub txn_markers: Arc<MarkerWriter>,
    /// The cluster membership slot.
    pub cluster: ClusterSlot,
    /// The slot of the pipeline host.
    pub pipelines: PipelineSlot,
}

impl ServerContext {
    /// A context over the broker's parts.
    pub fn new(parts: ServerParts, stopping: watch::Receiver<bool>) -> Arc<ServerContext> {
        let decompression_kib = usize::try_from(parts.config.limits.max_decompression_bytes / 1024)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let decompression = Arc::new(Semaphore::new(decompression_kib));
        Arc::new(ServerContext {
            decompression,
            decompression_kib: decompression_kib as u32,
            parts,
            raft: std::sync::OnceLock::new(),
            replicas: std::sync::OnceLock::new(),
            stopping,
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// The replica manager of a cluster broker (`None` on a lone broker).
    pub fn replicas(&self) -> Option<&Arc<crate::replica::ReplicaManager>> {
        self.replicas.get()
    }

    /// A partition for a client's produce or fetch: on a cluster broker, one it has not
    /// applied yet answers `NotLeader` (retried after a metadata refresh).
    pub fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(Arc<crate::topic::Topic>, Arc<crate::log::PartitionLog>), requests::RequestError>
    {
        self.topics
            .partition(topic, partition)
            .map_err(|e| match self.replicas() {
                Some(rm) => rm.not_ready(topic, partition, e),
                None => e.into(),
            })
    }

    /// Reserves `bytes` of the broker's decompression memory until the permit drops,
    /// waiting until `deadline` at most; 0 bytes reserve nothing.
    pub async fn reserve_decompression(
        &self,
        bytes: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, requests::RequestError> {
        if bytes == 0 {
            return Ok(None);
        }
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.decompression_kib);
        let acquire = self.decompression.clone().acquire_many_owned(kib);
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            Ok(Err(_)) => Err(requests::RequestError::new(
                quiver_protocol::ErrorCode::BrokerShuttingDown,
                "the broker is shutting down",
            )),
            Err(_) => Err(requests::RequestError::new(
                quiver_protocol::ErrorCode::RequestTimedOut,
                format!(
                    "the broker's memory for decompressing produced batches \
                     (limits.max_decompression_bytes = {}) stayed full until this request \
                     timed out; retry, or send smaller compressed batches",
                    self.config.limits.max_decompression_bytes
                ),
            )),
        }
    }

    /// True once shutdown began.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Resolves when shutdown begins.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Counts a request as in flight until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.metrics
            .requests_in_flight
            .fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    /// Waits until no request is in flight, or `timeout`; returns how many remain.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            let n = self.inflight.load(Ordering::SeqCst);
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.inflight.load(Ordering::SeqCst);
            }
        }
    }
}

/// Marks one request in flight.
pub struct InflightGuard(Arc<ServerContext>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0
            .metrics
            .requests_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
