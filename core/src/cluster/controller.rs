//! [`Controller`]: one node of the controller's Raft group — its store, its `openraft::Raft`,
//! and a QUIC endpoint that serves the group's RPCs
//! ([`RAFT_ALPN`](super::network::RAFT_ALPN)).
//!
//! A controller opens its sled store in a directory, binds its own UDP port for Raft (the
//! wiring slice may move Raft onto the broker's endpoint, dispatching by ALPN), and runs
//! openraft with [`raft_config`]. [`Controller::initialize`] forms the group from the voter
//! set once; afterwards membership lives in the log. [`Controller::write`] proposes a
//! [`ControllerCommand`] and answers the state machine's [`ControllerResponse`] once it is
//! committed and applied; on a follower it answers [`ControllerWriteError::NotLeader`] with
//! the leader it knows of (forwarding is the caller's business). [`Controller::state`] is a
//! copy of this node's applied [`ControllerState`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{Entry, LogId, OptionalSend, Raft, ServerState, SnapshotMeta, StorageError};
use tokio::sync::Mutex;

use super::network::{
    serve_raft_service, Liveness, QuicRaftNetwork, RaftService, RaftTls, RaftTransportError,
};
use super::state::ControllerState;
use super::store::{self, ControllerSnapshotBuilder, ControllerStateMachine, ControllerStoreError};
use super::types::{BrokerId, BrokerNode, ControllerCommand, ControllerResponse, TypeConfig};

/// Raft timing of the controller group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTimings {
    /// How often the leader sends heartbeats; also the deadline of each AppendEntries RPC.
    pub heartbeat_interval: Duration,
    /// A follower that hears no leader for a random time in
    /// `[election_timeout_min, election_timeout_max)` starts an election.
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
}

impl Default for RaftTimings {
    /// Heartbeat 250 ms; election timeout 1–2 s: four to eight missed heartbeats before a
    /// follower stands, so a loaded 2-core machine (a sled flush inside an append, a busy
    /// scheduler) does not cause spurious elections. A dead leader is replaced in about
    /// 3–4.5 s: openraft's followers also wait out the leader's lease (the longest election
    /// timeout) before they stand.
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(250),
            election_timeout_min: Duration::from_millis(1000),
            election_timeout_max: Duration::from_millis(2000),
        }
    }
}

/// The openraft configuration of the controller group.
///
/// Besides [`RaftTimings`]: at most 32 entries per AppendEntries (a `CreateTopic` with many
/// partitions is a big entry; 32 keeps a request far below the network's frame limit),
/// snapshot chunks of 1 MiB (sent as JSON, about 4 MiB on the wire), 10 s per snapshot
/// chunk, a snapshot every 1,000 applied entries, keeping 1,000 entries behind it for slow
/// followers.
pub fn raft_config(timings: RaftTimings) -> Result<openraft::Config, ControllerStartError> {
    let ms = |d: Duration| d.as_millis() as u64;
    openraft::Config {
        cluster_name: "quiver-controller".into(),
        heartbeat_interval: ms(timings.heartbeat_interval),
        election_timeout_min: ms(timings.election_timeout_min),
        election_timeout_max: ms(timings.election_timeout_max),
        install_snapshot_timeout: 10_000,
        max_payload_entries: 32,
        snapshot_max_chunk_size: 1024 * 1024,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ControllerStartError::Raft(e.to_string()))
}

/// How to start one controller node.
pub struct ControllerConfig {
    /// This node's id (the broker id).
    pub id: BrokerId,
    /// The directory of the controller's sled database (e.g. `<data_dir>/controller`).
    pub dir: PathBuf,
    /// The UDP address the Raft endpoint binds.
    pub listen: SocketAddr,
    /// Certificates: this node's, and the cluster CA its peers must chain to.
    pub tls: RaftTls,
    pub timings: RaftTimings,
    /// How long [`Controller::write`] waits for its command to be committed and applied.
    pub write_timeout: Duration,
}

impl ControllerConfig {
    /// Default timings and a 10 s write timeout.
    pub fn new(id: BrokerId, dir: impl Into<PathBuf>, listen: SocketAddr, tls: RaftTls) -> Self {
        Self {
            id,
            dir: dir.into(),
            listen,
            tls,
            timings: RaftTimings::default(),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// The controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerStartError {
    #[error(transparent)]
    Store(#[from] ControllerStoreError),
    #[error(transparent)]
    Transport(#[from] RaftTransportError),
    #[error("cannot bind the controller's UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
}

/// A write did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerWriteError {
    /// This node is not the leader; `leader_id`/`leader_addr` name the one it knows of.
    #[error("not the controller leader (leader: {leader_id:?} at {leader_addr:?})")]
    NotLeader {
        leader_id: Option<BrokerId>,
        leader_addr: Option<String>,
    },
    /// Not committed within the write timeout. The command may still be applied later, so
    /// a retry must be one the state machine treats as idempotent or checks first.
    #[error("the write was not committed within {0:?}; it may still be applied")]
    Timeout(Duration),
    /// Raft stopped (shut down or a storage failure).
    #[error("controller stopped: {0}")]
    Stopped(String),
}

/// The state machine shared between openraft and [`Controller::state`].
#[derive(Clone)]
struct SharedStateMachine(Arc<Mutex<ControllerStateMachine>>);

type StorageResult<T> = Result<T, StorageError<BrokerId>>;

impl RaftStateMachine<TypeConfig> for SharedStateMachine {
    type SnapshotBuilder = ControllerSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<BrokerId>>,
        openraft::StoredMembership<BrokerId, BrokerNode>,
    )> {
        self.0.lock().await.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<ControllerResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.0.lock().await.apply(entries).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.0.lock().await.get_snapshot_builder().await
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<std::io::Cursor<Vec<u8>>>> {
        self.0.lock().await.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<BrokerId, BrokerNode>,
        snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        self.0.lock().await.install_snapshot(meta, snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        self.0.lock().await.get_current_snapshot().await
    }
}

/// One running controller node.
pub struct Controller {
    id: BrokerId,
    raft: Raft<TypeConfig>,
    sm: SharedStateMachine,
    endpoint: quinn::Endpoint,
    /// Its own accept loop, when it owns its endpoint.
    accept: Option<tokio::task::JoinHandle<()>>,
    write_timeout: Duration,
    /// Dials peers (forwarded writes, heartbeats).
    network: QuicRaftNetwork,
    /// Heartbeats heard (counts on the leader).
    liveness: Arc<Liveness>,
}

impl Controller {
    /// Opens the store in `config.dir`, binds the Raft endpoint and starts Raft. A node whose
    /// store already belongs to a group rejoins it; a new one waits for [`Self::initialize`]
    /// (on any node) or for a leader to add it.
    pub async fn start(config: ControllerConfig) -> Result<Self, ControllerStartError> {
        let endpoint =
            quiver_client::udp::endpoint(config.listen, Some(config.tls.server_config()?))
                .map_err(|source| ControllerStartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Self::start_on(config, endpoint, true).await
    }

    /// Like [`Self::start`], on the broker's own QUIC endpoint (`config.listen` unused): it
    /// dials peers from it, and the broker hands it the connections that negotiated
    /// [`super::RAFT_ALPN`] ([`serve_raft_service`] with [`Self::service`]).
    pub async fn start_shared(
        config: ControllerConfig,
        endpoint: quinn::Endpoint,
    ) -> Result<Self, ControllerStartError> {
        Self::start_on(config, endpoint, false).await
    }

    async fn start_on(
        config: ControllerConfig,
        endpoint: quinn::Endpoint,
        owns_endpoint: bool,
    ) -> Result<Self, ControllerStartError> {
        let raft_config = Arc::new(raft_config(config.timings)?);
        let dir = config.dir.clone();
        let (log, sm) = tokio::task::spawn_blocking(move || store::open(&dir))
            .await
            .map_err(|e| ControllerStartError::Raft(format!("opening the store: {e}")))??;
        let network =
            QuicRaftNetwork::new(config.id, endpoint.clone(), config.tls.client_config()?);
        let sm = SharedStateMachine(Arc::new(Mutex::new(sm)));
        let raft = match Raft::new(config.id, raft_config, network.clone(), log, sm.clone()).await {
            Ok(raft) => raft,
            Err(e) => {
                if owns_endpoint {
                    endpoint.close(0u32.into(), b"start failed");
                }
                return Err(ControllerStartError::Raft(e.to_string()));
            }
        };
        let liveness = Arc::new(Liveness::default());
        let service = RaftService {
            raft: raft.clone(),
            liveness: liveness.clone(),
        };
        let accept = owns_endpoint.then(|| tokio::spawn(accept_loop(endpoint.clone(), service)));
        Ok(Self {
            id: config.id,
            raft,
            sm,
            endpoint,
            accept,
            write_timeout: config.write_timeout,
            network,
            liveness,
        })
    }

    /// This node's id.
    pub fn id(&self) -> BrokerId {
        self.id
    }

    /// The address the Raft endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has a local address")
    }

    /// The underlying openraft handle (metrics, membership changes).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Forms the group with `voters` (id → address) if this node's store holds no group yet.
    /// Answers `Ok(true)` if it initialized, `Ok(false)` if the group already existed (calling
    /// it again, or on another voter, is harmless).
    pub async fn initialize(
        &self,
        voters: BTreeMap<BrokerId, BrokerNode>,
    ) -> Result<bool, ControllerWriteError> {
        match self.raft.initialize(voters).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(RaftError::APIError(e)) => Err(ControllerWriteError::Stopped(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(ControllerWriteError::Stopped(e.to_string())),
        }
    }

    /// The leader this node knows of, if any (from Raft's metrics; may be stale by one
    /// election).
    pub fn current_leader(&self) -> Option<BrokerId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The address of node `id` in the current membership.
    pub fn node_addr(&self, id: BrokerId) -> Option<String> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Whether this node is the leader (as far as it knows).
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// Proposes `cmd`; answers the state machine's response once it is committed and applied
    /// here. Only the leader accepts writes.
    pub async fn write(
        &self,
        cmd: ControllerCommand,
    ) -> Result<ControllerResponse, ControllerWriteError> {
        let write = self.raft.client_write(cmd);
        match tokio::time::timeout(self.write_timeout, write).await {
            Err(_) => Err(ControllerWriteError::Timeout(self.write_timeout)),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ControllerWriteError::NotLeader {
                    leader_id: f.leader_id,
                    leader_addr: f
                        .leader_node
                        .map(|n| n.addr)
                        .or_else(|| f.leader_id.and_then(|id| self.node_addr(id))),
                })
            }
            Ok(Err(RaftError::APIError(e))) => Err(ControllerWriteError::Stopped(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(ControllerWriteError::Stopped(e.to_string())),
        }
    }

    /// Proposes `cmd` from any node: written here when this node leads, else forwarded to
    /// the leader (retried while an election is on), all within the write timeout.
    pub async fn propose(
        &self,
        cmd: ControllerCommand,
    ) -> Result<ControllerResponse, ControllerWriteError> {
        let deadline = Instant::now() + self.write_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ControllerWriteError::Timeout(self.write_timeout));
            }
            match self.write(cmd.clone()).await {
                Err(ControllerWriteError::NotLeader {
                    leader_id: Some(leader),
                    leader_addr: Some(addr),
                }) if leader != self.id => {
                    match self.network.propose(leader, &addr, cmd.clone(), left).await {
                        Ok(r) => return Ok(r),
                        Err(e) => {
                            tracing::debug!(leader, error = %e, "forwarding to the controller leader failed; retrying");
                        }
                    }
                }
                Err(ControllerWriteError::NotLeader { .. }) => {}
                other => return other,
            }
            // No leader yet, or it just changed: wait for the election.
            tokio::time::sleep(Duration::from_millis(50).min(left)).await;
        }
    }

    /// What serves peers' Raft connections on a shared endpoint.
    pub fn service(&self) -> RaftService {
        RaftService {
            raft: self.raft.clone(),
            liveness: self.liveness.clone(),
        }
    }

    /// Heartbeats this node heard.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Sends broker `id`'s heartbeat to controller node `to` (recorded here when `to` is this
    /// node). Brokers heartbeat every voter, so a newly elected leader already knows when each
    /// broker was last heard from.
    pub async fn heartbeat_to(
        &self,
        to: BrokerId,
        id: BrokerId,
        epoch: u64,
    ) -> Result<(), ControllerWriteError> {
        if to == self.id {
            self.liveness.beat(id, epoch);
            return Ok(());
        }
        let addr = self.node_addr(to).ok_or(ControllerWriteError::NotLeader {
            leader_id: Some(to),
            leader_addr: None,
        })?;
        self.network
            .heartbeat(to, &addr, id, epoch, Duration::from_secs(2))
            .await
            .map_err(|e| ControllerWriteError::Stopped(e.to_string()))
    }

    /// The voters of the current membership.
    pub fn voter_ids(&self) -> Vec<BrokerId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// A copy of the metadata this node has applied.
    pub async fn state(&self) -> ControllerState {
        self.sm.0.lock().await.state().clone()
    }

    /// The id of the last log entry this node applied.
    pub async fn last_applied(&self) -> Option<LogId<BrokerId>> {
        self.sm.0.lock().await.last_applied()
    }

    /// Stops Raft, closes the endpoint (peers see the connections close at once) and waits
    /// (bounded) until the store is released, so the directory can be opened again.
    pub async fn shutdown(self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(id = self.id, error = %e, "controller raft shutdown");
        }
        if let Some(accept) = self.accept {
            accept.abort();
            self.endpoint.close(0u32.into(), b"controller shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        }
        // openraft's state machine task drops its handle once Raft has stopped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.sm.0) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, service: RaftService) {
    while let Some(incoming) = endpoint.accept().await {
        let service = service.clone();
        let remote = incoming.remote_address();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve_raft_service(conn, service).await,
                Err(e) => tracing::debug!(%remote, error = %e, "raft handshake failed"),
            }
        });
    }
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
