//! The controller's Raft network: openraft's RPCs over QUIC, on their own ALPN
//! ([`RAFT_ALPN`], `quiver-raft/1`).
//!
//! **Transport.** Every node presents a certificate signed by the cluster CA and verifies its
//! peer's against the same CA, in both directions (mutual TLS 1.3; verification is never
//! switched off). A node keeps one cached QUIC connection per target node and opens a fresh
//! bidirectional stream per RPC, so a slow snapshot chunk never blocks a heartbeat. QUIC learns
//! that a peer is gone only by silence, so the transport sends keep-alives every
//! [`KEEP_ALIVE`] and drops a connection after [`IDLE_TIMEOUT`] without packets; the next RPC
//! to that node reconnects. A handshake runs in its own task: an RPC that gives up (openraft's
//! deadline) does not abort it, so a slow handshake still completes for the next RPC.
//!
//! **Framing.** One stream carries one request and one reply, each a frame: a big-endian
//! `u32` length and then that many bytes of JSON ([`RaftRequest`] / [`RaftReply`]). A frame
//! longer than [`MAX_FRAME`] is refused on both sides.
//!
//! **Deadlines.** openraft gives each RPC an [`RPCOption`] whose hard TTL bounds the whole
//! call (connect, send, wait, read); past it the call fails with `RPCError::Timeout`. A
//! connection failure is `Unreachable` (openraft backs off before retrying), anything else
//! on the wire is a `Network` error, and an error raised by the remote Raft comes back as
//! `RemoteError`.
//!
//! **Server side.** [`serve_raft_connection`] answers the RPC streams of one accepted
//! connection through `Raft::append_entries` / `vote` / `install_snapshot`. Whoever accepts
//! connections (the controller's own endpoint today, the broker's endpoint by ALPN later) hands
//! it the connections that negotiated [`RAFT_ALPN`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Raft;
use quinn::VarInt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::types::{BrokerId, BrokerNode, ControllerCommand, ControllerResponse, TypeConfig};

/// The ALPN protocol id of controller Raft connections.
pub const RAFT_ALPN: &[u8] = b"quiver-raft/1";

/// The largest request or reply frame accepted (the JSON body, without the length prefix).
/// The controller's config keeps entries per append and snapshot chunks well below it.
pub const MAX_FRAME: usize = 32 * 1024 * 1024;

/// Keep-alive interval of Raft connections.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// A Raft connection without a packet for this long is closed (the peer is taken as dead).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Concurrent RPC streams one peer may have open on a connection.
const MAX_STREAMS: u32 = 64;

/// How long the server waits for a request frame on a stream it accepted.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An RPC as it travels on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<BrokerId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command a follower forwards to the leader (it proposes it as its own write).
    Propose(ControllerCommand),
    /// A broker's periodic "alive" to the controller leader (not logged).
    Heartbeat {
        id: BrokerId,
        epoch: u64,
    },
}

/// The answer to one [`RaftRequest`]: the remote Raft's result, or why the request could not
/// be read.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<BrokerId>, RaftError<BrokerId>>),
    Vote(Result<VoteResponse<BrokerId>, RaftError<BrokerId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<BrokerId>, RaftError<BrokerId, InstallSnapshotError>>,
    ),
    /// The leader's answer to a forwarded command, or why it could not take it (for
    /// instance: it is no longer the leader).
    Proposed(Result<ControllerResponse, String>),
    /// A heartbeat was recorded (false: this node keeps no heartbeats).
    Heartbeat(bool),
    /// The server could not decode the request.
    BadRequest(String),
}

/// What went wrong below Raft: TLS setup, connecting, or the wire.
#[derive(Debug, thiserror::Error)]
pub enum RaftTransportError {
    #[error("raft TLS config: {0}")]
    Tls(String),
    #[error("cannot resolve {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(String),
    #[error("stream read: {0}")]
    Read(String),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    #[error("codec: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl RaftTransportError {
    /// Whether the peer could not be reached at all (openraft should back off).
    fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Resolve { .. } | Self::Connect { .. } | Self::Connection(_)
        )
    }
}

/// The TLS identity of a controller node and the CA it trusts for its peers.
pub struct RaftTls {
    /// The cluster CA certificate(s) peers must chain to.
    pub ca: Vec<CertificateDer<'static>>,
    /// This node's certificate chain, leaf first. The leaf is used as a server and as a
    /// client certificate, so it needs both usages (or no extended key usage at all), and a
    /// subject alternative name for the host its peers dial.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for RaftTls {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> RaftTransportError {
    RaftTransportError::Tls(format!("{what}: {e}"))
}

impl RaftTls {
    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, RaftTransportError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in &self.ca {
            roots
                .add(ca.clone())
                .map_err(|e| tls_err("cluster CA", e))?;
        }
        if roots.is_empty() {
            return Err(RaftTransportError::Tls("no cluster CA certificate".into()));
        }
        Ok(Arc::new(roots))
    }

    /// The rustls server config: TLS 1.3, ALPN [`RAFT_ALPN`], client certificates required and
    /// verified against the cluster CA, no 0-RTT.
    pub fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, RaftTransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(|e| tls_err("client verifier", e))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("tls versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err("node certificate", e))?;
        cfg.alpn_protocols = vec![RAFT_ALPN.to_vec()];
        cfg.max_early_data_size = 0;
        Ok(Arc::new(cfg))
    }

    /// The rustls client config: TLS 1.3, ALPN [`RAFT_ALPN`], servers verified against the
    /// cluster CA, this node's certificate presented.
    pub fn rustls_client_config(&self) -> Result<Arc<rustls::ClientConfig>, RaftTransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("tls versions", e))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err("node certificate", e))?;
        cfg.alpn_protocols = vec![RAFT_ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The quinn server config for an endpoint that serves only Raft.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, RaftTransportError> {
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(self.rustls_server_config()?)
            .map_err(|e| tls_err("QUIC server", e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(Arc::new(transport_config()));
        Ok(server)
    }

    /// The quinn client config used to dial peers.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, RaftTransportError> {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(self.rustls_client_config()?)
            .map_err(|e| tls_err("QUIC client", e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(Arc::new(transport_config()));
        Ok(client)
    }
}

/// Transport settings of Raft connections: keep-alive [`KEEP_ALIVE`], idle timeout
/// [`IDLE_TIMEOUT`], a bounded number of concurrent RPC streams.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t
}

async fn write_frame(send: &mut quinn::SendStream, body: &[u8]) -> Result<(), RaftTransportError> {
    if body.len() > MAX_FRAME {
        return Err(RaftTransportError::FrameTooLarge(body.len()));
    }
    let len = (body.len() as u32).to_be_bytes();
    send.write_all(&len)
        .await
        .map_err(|e| RaftTransportError::Write(e.to_string()))?;
    send.write_all(body)
        .await
        .map_err(|e| RaftTransportError::Write(e.to_string()))?;
    send.finish()
        .map_err(|e| RaftTransportError::Write(e.to_string()))
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, RaftTransportError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| RaftTransportError::Read(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(RaftTransportError::FrameTooLarge(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| RaftTransportError::Read(e.to_string()))?;
    Ok(body)
}

/// Splits `host:port` (or `[v6]:port`) into the TLS server name and resolves the address.
async fn resolve(addr: &str) -> Result<(SocketAddr, String), RaftTransportError> {
    let resolve_err = |reason: String| RaftTransportError::Resolve {
        addr: addr.to_string(),
        reason,
    };
    let (host, _) = addr
        .rsplit_once(':')
        .ok_or_else(|| resolve_err("expected host:port".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let sock = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| resolve_err(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_err("no address".into()))?;
    Ok((sock, host))
}

/// After a failed connection attempt, RPCs to that peer fail at once for this long instead of
/// each starting a handshake of its own (a dead peer costs a full handshake timeout).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// The cached connection to one peer.
struct Peer {
    addr: String,
    slot: tokio::sync::Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    conn: Option<quinn::Connection>,
    /// When and why the last connection attempt failed.
    failed: Option<(Instant, String)>,
}

impl Slot {
    /// The live connection, or the recent failure to report, or `None`: try connecting.
    fn ready(&self, addr: &str) -> Option<Result<quinn::Connection, RaftTransportError>> {
        if let Some(c) = self.conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Some(Ok(c.clone()));
        }
        match &self.failed {
            Some((at, why)) if at.elapsed() < RECONNECT_BACKOFF => {
                Some(Err(RaftTransportError::Connect {
                    addr: addr.to_string(),
                    reason: why.clone(),
                }))
            }
            _ => None,
        }
    }
}

impl Peer {
    /// The live cached connection, or a new one. Waiting for the slot can be cancelled (an
    /// RPC past its deadline); the handshake itself runs in its own task holding the slot, so
    /// concurrent RPCs share one handshake and a handshake an RPC gave up on still completes
    /// and is cached for the next RPC.
    async fn connection(
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        config: &quinn::ClientConfig,
    ) -> Result<quinn::Connection, RaftTransportError> {
        if let Some(ready) = self.slot.lock().await.ready(&self.addr) {
            return ready;
        }
        let peer = self.clone();
        let endpoint = endpoint.clone();
        let config = config.clone();
        let task = tokio::spawn(async move {
            let mut slot = peer.slot.lock().await;
            if let Some(ready) = slot.ready(&peer.addr) {
                return ready;
            }
            let attempt = async {
                let (sock, name) = resolve(&peer.addr).await?;
                let connect_err = |reason: String| RaftTransportError::Connect {
                    addr: peer.addr.clone(),
                    reason,
                };
                endpoint
                    .connect_with(config, sock, &name)
                    .map_err(|e| connect_err(e.to_string()))?
                    .await
                    .map_err(|e| connect_err(e.to_string()))
            };
            match attempt.await {
                Ok(conn) => {
                    *slot = Slot {
                        conn: Some(conn.clone()),
                        failed: None,
                    };
                    Ok(conn)
                }
                Err(e) => {
                    *slot = Slot {
                        conn: None,
                        failed: Some((Instant::now(), e.to_string())),
                    };
                    Err(e)
                }
            }
        });
        task.await.map_err(|e| RaftTransportError::Connect {
            addr: self.addr.clone(),
            reason: e.to_string(),
        })?
    }
}

/// openraft's network factory over QUIC: hands out [`QuicRaftClient`]s that share one cached
/// connection per target node. Cheap to clone.
#[derive(Clone)]
pub struct QuicRaftNetwork {
    id: BrokerId,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    peers: Arc<Mutex<HashMap<BrokerId, Arc<Peer>>>>,
}

impl QuicRaftNetwork {
    /// A factory for node `id` that dials from `endpoint` with `client_config` (see
    /// [`RaftTls::client_config`]).
    pub fn new(
        id: BrokerId,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
    ) -> Self {
        Self {
            id,
            endpoint,
            client_config,
            peers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn peer(&self, target: BrokerId, addr: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match peers.get(&target) {
            Some(p) if p.addr == addr => p.clone(),
            _ => {
                // New node, or its address changed: a fresh slot (the old connection closes
                // when its last user drops it).
                let p = Arc::new(Peer {
                    addr: addr.to_string(),
                    slot: tokio::sync::Mutex::new(Slot::default()),
                });
                peers.insert(target, p.clone());
                p
            }
        }
    }
}

impl QuicRaftNetwork {
    /// An RPC client to node `target` at `addr` (sharing the cached connection).
    fn client_for(&self, target: BrokerId, addr: &str) -> QuicRaftClient {
        QuicRaftClient {
            id: self.id,
            target,
            node: BrokerNode {
                addr: addr.to_string(),
            },
            peer: self.peer(target, addr),
            endpoint: self.endpoint.clone(),
            client_config: self.client_config.clone(),
        }
    }

    /// Forwards `cmd` to node `target` (the leader) at `addr` and returns its answer, all
    /// within `ttl`.
    pub async fn propose(
        &self,
        target: BrokerId,
        addr: &str,
        cmd: ControllerCommand,
        ttl: Duration,
    ) -> Result<ControllerResponse, RaftTransportError> {
        let client = self.client_for(target, addr);
        match client.call(&RaftRequest::Propose(cmd), ttl).await {
            Ok(RaftReply::Proposed(Ok(r))) => Ok(r),
            Ok(RaftReply::Proposed(Err(why))) => Err(RaftTransportError::Protocol(format!(
                "node {target} did not take the command: {why}"
            ))),
            Ok(_) => Err(RaftTransportError::Protocol(format!(
                "node {target} answered a proposal with something else"
            ))),
            Err(CallError::Timeout(t)) => Err(RaftTransportError::Protocol(format!(
                "node {target} did not answer within {t:?}"
            ))),
            Err(CallError::Transport(e)) => Err(e),
        }
    }
}

impl QuicRaftNetwork {
    /// Sends broker `id`'s heartbeat (with its `epoch`) to node `target` at `addr`.
    pub async fn heartbeat(
        &self,
        target: BrokerId,
        addr: &str,
        id: BrokerId,
        epoch: u64,
        ttl: Duration,
    ) -> Result<(), RaftTransportError> {
        let client = self.client_for(target, addr);
        match client
            .call(&RaftRequest::Heartbeat { id, epoch }, ttl)
            .await
        {
            Ok(RaftReply::Heartbeat(true)) => Ok(()),
            Ok(_) => Err(RaftTransportError::Protocol(format!(
                "node {target} did not take the heartbeat"
            ))),
            Err(CallError::Timeout(t)) => Err(RaftTransportError::Protocol(format!(
                "node {target} did not answer within {t:?}"
            ))),
            Err(CallError::Transport(e)) => Err(e),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for QuicRaftNetwork {
    type Network = QuicRaftClient;

    async fn new_client(&mut self, target: BrokerId, node: &BrokerNode) -> Self::Network {
        QuicRaftClient {
            id: self.id,
            target,
            node: node.clone(),
            peer: self.peer(target, &node.addr),
            endpoint: self.endpoint.clone(),
            client_config: self.client_config.clone(),
        }
    }
}

/// The RPC client to one target node.
pub struct QuicRaftClient {
    id: BrokerId,
    target: BrokerId,
    node: BrokerNode,
    peer: Arc<Peer>,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
}

/// Why one call failed, before it is turned into openraft's error type.
enum CallError {
    Timeout(Duration),
    Transport(RaftTransportError),
}

impl QuicRaftClient {
    /// Sends `req` on a new stream and reads the reply, all within `ttl`.
    async fn call(&self, req: &RaftRequest, ttl: Duration) -> Result<RaftReply, CallError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| CallError::Transport(RaftTransportError::Codec(e)))?;
        let exchange = async {
            let conn = self
                .peer
                .connection(&self.endpoint, &self.client_config)
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(&mut send, &body).await?;
            let reply = read_frame(&mut recv).await?;
            Ok::<_, RaftTransportError>(serde_json::from_slice::<RaftReply>(&reply)?)
        };
        match tokio::time::timeout(ttl, exchange).await {
            Err(_) => Err(CallError::Timeout(ttl)),
            Ok(Err(e)) => Err(CallError::Transport(e)),
            Ok(Ok(RaftReply::BadRequest(why))) => Err(CallError::Transport(
                RaftTransportError::Protocol(format!("peer refused the request: {why}")),
            )),
            Ok(Ok(reply)) => Ok(reply),
        }
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        e: CallError,
    ) -> RPCError<BrokerId, BrokerNode, E> {
        match e {
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.id,
                target: self.target,
                timeout,
            }),
            CallError::Transport(e) if e.is_unreachable() => {
                RPCError::Unreachable(Unreachable::new(&e))
            }
            CallError::Transport(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RemoteError<BrokerId, BrokerNode, E> {
        RemoteError::new_with_node(self.target, self.node.clone(), e)
    }

    fn unexpected<E: std::error::Error>(
        &self,
        action: RPCTypes,
        reply: &RaftReply,
    ) -> RPCError<BrokerId, BrokerNode, E> {
        let e = RaftTransportError::Protocol(format!(
            "{action:?} answered with {}",
            match reply {
                RaftReply::AppendEntries(_) => "AppendEntries",
                RaftReply::Vote(_) => "Vote",
                RaftReply::InstallSnapshot(_) => "InstallSnapshot",
                RaftReply::Proposed(_) => "Proposed",
                RaftReply::Heartbeat(_) => "Heartbeat",
                RaftReply::BadRequest(_) => "BadRequest",
            }
        ));
        RPCError::Network(NetworkError::new(&e))
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<BrokerId, BrokerNode, RaftError<BrokerId, E>>>;

impl RaftNetwork<TypeConfig> for QuicRaftClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<BrokerId>> {
        let action = RPCTypes::AppendEntries;
        let entries = rpc.entries.len() as u64;
        match self
            .call(&RaftRequest::AppendEntries(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftReply::AppendEntries(r)) => r.map_err(|e| RPCError::RemoteError(self.remote(e))),
            Ok(other) => Err(self.unexpected(action, &other)),
            // Entries carrying plugin archives can add up past a frame: openraft sends fewer.
            Err(CallError::Transport(RaftTransportError::FrameTooLarge(_))) if entries > 1 => {
                Err(PayloadTooLarge::new_entries_hint(entries / 2).into())
            }
            Err(e) => Err(self.rpc_error(action, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<BrokerId>, InstallSnapshotError> {
        let action = RPCTypes::InstallSnapshot;
        match self
            .call(&RaftRequest::InstallSnapshot(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftReply::InstallSnapshot(r)) => {
                r.map_err(|e| RPCError::RemoteError(self.remote(e)))
            }
            Ok(other) => Err(self.unexpected(action, &other)),
            Err(e) => Err(self.rpc_error(action, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<BrokerId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<BrokerId>> {
        let action = RPCTypes::Vote;
        match self.call(&RaftRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(RaftReply::Vote(r)) => r.map_err(|e| RPCError::RemoteError(self.remote(e))),
            Ok(other) => Err(self.unexpected(action, &other)),
            Err(e) => Err(self.rpc_error(action, e)),
        }
    }
}

/// The brokers' heartbeats this controller node heard (the leader's copy is the one that
/// counts): broker id → (its epoch, when).
#[derive(Debug, Default)]
pub struct Liveness {
    seen: Mutex<HashMap<BrokerId, (u64, Instant)>>,
}

impl Liveness {
    /// Records a heartbeat.
    pub fn beat(&self, id: BrokerId, epoch: u64) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (epoch, Instant::now()));
    }

    /// The last heartbeat of `id`.
    pub fn last(&self, id: BrokerId) -> Option<(u64, Instant)> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
    }
}

/// What serves peers' Raft connections: the Raft handle and the heartbeat table.
#[derive(Clone)]
pub struct RaftService {
    /// The node's Raft.
    pub raft: Raft<TypeConfig>,
    /// Heartbeats heard.
    pub liveness: Arc<Liveness>,
}

/// Answers the Raft RPCs of one accepted connection (which negotiated [`RAFT_ALPN`]) until
/// the peer closes it or it times out. Each stream is served in its own task.
pub async fn serve_raft_connection(conn: quinn::Connection, raft: Raft<TypeConfig>) {
    serve_raft_service(
        conn,
        RaftService {
            raft,
            liveness: Arc::default(),
        },
    )
    .await
}

/// [`serve_raft_connection`] that also records heartbeats in `service.liveness`.
pub async fn serve_raft_service(conn: quinn::Connection, service: RaftService) {
    let raft = service.raft;
    let liveness = service.liveness;
    let remote = conn.remote_address();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "raft connection closed");
                return;
            }
        };
        let raft = raft.clone();
        let liveness = liveness.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(send, recv, &raft, &liveness).await {
                tracing::debug!(%remote, error = %e, "raft rpc stream failed");
            }
        });
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    raft: &Raft<TypeConfig>,
    liveness: &Liveness,
) -> Result<(), RaftTransportError> {
    let body = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(&mut recv)).await {
        Ok(body) => body?,
        Err(_) => {
            return Err(RaftTransportError::Read(
                "request not received in time".into(),
            ))
        }
    };
    let reply = match serde_json::from_slice::<RaftRequest>(&body) {
        Ok(RaftRequest::AppendEntries(rpc)) => {
            RaftReply::AppendEntries(raft.append_entries(rpc).await)
        }
        Ok(RaftRequest::Vote(rpc)) => RaftReply::Vote(raft.vote(rpc).await),
        Ok(RaftRequest::Heartbeat { id, epoch }) => {
            liveness.beat(id, epoch);
            RaftReply::Heartbeat(true)
        }
        Ok(RaftRequest::Propose(cmd)) => RaftReply::Proposed(
            raft.client_write(cmd)
                .await
                .map(|r| r.data)
                .map_err(|e| e.to_string()),
        ),
        Ok(RaftRequest::InstallSnapshot(rpc)) => {
            RaftReply::InstallSnapshot(raft.install_snapshot(rpc).await)
        }
        Err(e) => RaftReply::BadRequest(e.to_string()),
    };
    write_frame(&mut send, &serde_json::to_vec(&reply)?).await
}
