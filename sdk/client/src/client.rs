//! [`Client`]: the QUIC transport every other part of the SDK uses.
//!
//! It owns one quinn endpoint, one connection per broker (made lazily, re-made with
//! exponential backoff when lost), the per-topic metadata cache, and the request/response
//! exchange: one bidirectional stream per request, one frame each way (a subscription
//! reads many). It knows nothing of batching or consumer positions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use quiver_protocol::requests::{
    coordinator_partition, MetadataRequest, MetadataResponse, SubscribeChunk, SubscribeRequest,
    TopicMetadata, OFFSETS_TOPIC,
};
use quiver_protocol::{
    decode_response, encode_request, FrameHeader, Limits, Message, ProtocolError, FRAME_HEADER_LEN,
    PROTOCOL_VERSION,
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::local::LocalTransport;
use crate::tls::{quinn_client_config, server_name};
use crate::{ClientConfig, ClientError, Result};

/// Longest wait for a connection to a partition leader (the home broker gets
/// `connect_timeout`): a live broker answers a handshake in milliseconds.
const LEADER_CONNECT_LIMIT: Duration = Duration::from_secs(2);
/// After a broker stopped answering (a connection attempt failed, or its connection timed
/// out), requests to it fail at once for this long instead of waiting on another attempt:
/// a caller then refreshes metadata and finds the partition's new leader as soon as the
/// controller names one (QUIC runs over UDP, so a dead broker's port refuses nothing, and
/// an attempt costs up to `LEADER_CONNECT_LIMIT`). About the time between a broker going
/// silent for the idle timeout and the controller fencing it; a broker that comes back is
/// used again after at most this long.
const UNREACHABLE_HOLD: Duration = Duration::from_secs(3);

/// A connection to a Quiver cluster; cheap to clone (an `Arc` inside).
///
/// ```no_run
/// # async fn demo() -> quiver_client::Result<()> {
/// use bytes::Bytes;
/// use quiver_client::{Client, ClientConfig};
/// use quiver_protocol::requests::MetadataRequest;
///
/// let client = Client::connect(ClientConfig {
///     ca_file: Some("quiver-data/tls/ca.pem".into()),
///     ..ClientConfig::new("127.0.0.1:7400")
/// })
/// .await?;
/// let (meta, _) = client.request(&MetadataRequest { topics: None }, Bytes::new()).await?;
/// println!("{} topics", meta.topics.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("bootstrap", &self.inner.config.bootstrap)
            .finish_non_exhaustive()
    }
}

struct ClientInner {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    /// False when the endpoint was lent (`connect_with`): closing the client then closes
    /// only its own connections.
    owns_endpoint: bool,
    quinn_config: quinn::ClientConfig,
    limits: Limits,
    bootstrap: Arc<BrokerConn>,
    /// The broker that answers requests not about one partition: the bootstrap broker
    /// until it stops answering, then whichever broker answered instead.
    home: Mutex<Arc<BrokerConn>>,
    /// Every bootstrap address given, tried when the connected one stops answering.
    bootstrap_list: Vec<String>,
    conns: Mutex<HashMap<String, Arc<BrokerConn>>>,
    broker_addrs: Mutex<HashMap<u32, String>>,
    metadata: Mutex<HashMap<String, Arc<TopicMetadata>>>,
}

/// One broker: its address and the current connection, re-made on demand.
struct BrokerConn {
    addr: String,
    server_name: String,
    current: Mutex<Option<quinn::Connection>>,
    connecting: tokio::sync::Mutex<()>,
    /// Until when the broker counts as unreachable (see [`UNREACHABLE_HOLD`]).
    unreachable_until: Mutex<Option<Instant>>,
    /// Set when this broker is in this process: requests skip the network.
    local: Option<Arc<dyn LocalTransport>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave their plain maps inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_permanent(e: &quinn::ConnectionError) -> bool {
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        quinn::ConnectionError::TransportError(t) => crypto(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => crypto(c.error_code),
        quinn::ConnectionError::VersionMismatch => true,
        _ => false,
    }
}

impl BrokerConn {
    fn new(addr: &str, local: Option<Arc<dyn LocalTransport>>) -> Self {
        BrokerConn {
            addr: addr.to_string(),
            server_name: server_name(addr),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            unreachable_until: Mutex::new(None),
            local,
        }
    }

    /// Notes a connection that timed out (the broker went silent) as a failed attempt.
    fn note_timed_out(&self) {
        let mut cur = lock(&self.current);
        let timed_out = cur
            .as_ref()
            .and_then(|c| c.close_reason())
            .is_some_and(|r| matches!(r, quinn::ConnectionError::TimedOut));
        if timed_out {
            *cur = None;
            *lock(&self.unreachable_until) = Some(Instant::now() + UNREACHABLE_HOLD);
        }
    }

    fn alive(&self) -> Option<quinn::Connection> {
        lock(&self.current)
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    fn forget(&self, conn: &quinn::Connection) {
        let mut cur = lock(&self.current);
        if cur.as_ref().map(|c| c.stable_id()) == Some(conn.stable_id()) {
            *cur = None;
        }
    }

    /// The live connection, or a new one (retried with backoff until `limit`).
    async fn connection(&self, inner: &ClientInner, limit: Duration) -> Result<quinn::Connection> {
        if let Some(c) = self.alive() {
            return Ok(c);
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.alive() {
            return Ok(c);
        }
        self.note_timed_out();
        if let Some(until) = *lock(&self.unreachable_until) {
            if Instant::now() < until {
                return Err(ClientError::Connect {
                    addr: self.addr.clone(),
                    reason: "the broker stopped answering a moment ago".into(),
                });
            }
        }
        let cfg = &inner.config;
        let deadline = Instant::now() + limit;
        let mut backoff = Backoff::new(cfg.reconnect_backoff, cfg.reconnect_backoff_max);
        loop {
            let reason = match tokio::time::timeout_at(deadline, self.connect_once(inner)).await {
                Ok(Ok(c)) => {
                    tracing::debug!(addr = %self.addr, "connected");
                    *lock(&self.current) = Some(c.clone());
                    *lock(&self.unreachable_until) = None;
                    return Ok(c);
                }
                Ok(Err(ConnectFailure::Permanent(reason))) => {
                    return Err(ClientError::Connect {
                        addr: self.addr.clone(),
                        reason,
                    })
                }
                Ok(Err(ConnectFailure::Transient(reason))) => reason,
                Err(_) => format!("no answer within {:?}", cfg.connect_timeout),
            };
            let delay = backoff.next_delay();
            if Instant::now() + delay >= deadline {
                *lock(&self.unreachable_until) = Some(Instant::now() + UNREACHABLE_HOLD);
                return Err(ClientError::Connect {
                    addr: self.addr.clone(),
                    reason,
                });
            }
            tracing::debug!(addr = %self.addr, %reason, ?delay, "connect failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn connect_once(&self, inner: &ClientInner) -> Result<quinn::Connection, ConnectFailure> {
        let sa = resolve(&self.addr, inner.endpoint.local_addr().ok())
            .await
            .map_err(ConnectFailure::Permanent)?;
        let connecting = inner
            .endpoint
            .connect_with(inner.quinn_config.clone(), sa, &self.server_name)
            .map_err(|e| ConnectFailure::Permanent(e.to_string()))?;
        connecting.await.map_err(|e| {
            if is_permanent(&e) {
                ConnectFailure::Permanent(format!("TLS/QUIC handshake failed: {e}"))
            } else {
                ConnectFailure::Transient(e.to_string())
            }
        })
    }
}

enum ConnectFailure {
    Permanent(String),
    Transient(String),
}

/// Resolves `addr`, preferring the family of the local endpoint.
async fn resolve(addr: &str, local: Option<SocketAddr>) -> Result<SocketAddr, String> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let found: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr:?} (expected HOST:PORT): {e}"))?
        .collect();
    let want_v4 = local.map(|l| l.is_ipv4()).unwrap_or(true);
    found
        .iter()
        .find(|s| s.is_ipv4() == want_v4)
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// Writes one request frame (header, control, payload as separate chunks: no payload copy).
async fn write_request<M: Message>(
    send: &mut quinn::SendStream,
    req: &M,
    payload: Bytes,
) -> Result<(), String> {
    let control = encode_request(req, &[]).body;
    let mut head = BytesMut::with_capacity(FRAME_HEADER_LEN);
    head.put_u32((control.len() + payload.len() + 4) as u32);
    head.put_u16(M::API as u16);
    head.put_u16(PROTOCOL_VERSION);
    let mut chunks = [head.freeze(), control, payload];
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}

/// Reads exactly `n` bytes; zero-copy when they arrive in one chunk.
async fn read_bytes(recv: &mut quinn::RecvStream, n: usize) -> Result<Option<Bytes>, ReadFailure> {
    let mut buf: Option<BytesMut> = None;
    let mut got = 0;
    while got < n {
        let chunk = recv
            .read_chunk(n - got, true)
            .await
            .map_err(|e| ReadFailure::Transport(e.to_string()))?;
        let Some(chunk) = chunk else {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ReadFailure::Protocol(ProtocolError::Truncated {
                    needed: n - got,
                }))
            };
        };
        if got == 0 && chunk.bytes.len() == n {
            return Ok(Some(chunk.bytes));
        }
        got += chunk.bytes.len();
        buf.get_or_insert_with(|| BytesMut::with_capacity(n))
            .extend_from_slice(&chunk.bytes);
    }
    Ok(Some(buf.map(BytesMut::freeze).unwrap_or_default()))
}

enum ReadFailure {
    Transport(String),
    Protocol(ProtocolError),
}

/// Reads one response frame and decodes it; `Ok(None)` at a clean end of stream.
async fn read_response<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    api: u16,
    what: &'static str,
    limits: &Limits,
    addr: &str,
) -> Result<Option<(T, Bytes)>> {
    let transport = |reason: String| ClientError::Transport {
        addr: addr.to_string(),
        reason,
    };
    let read = |r: Result<Option<Bytes>, ReadFailure>| match r {
        Ok(b) => Ok(b),
        Err(ReadFailure::Transport(e)) => Err(transport(e)),
        Err(ReadFailure::Protocol(e)) => Err(ClientError::Protocol(e)),
    };
    let Some(head) = read(read_bytes(recv, FRAME_HEADER_LEN).await)? else {
        return Ok(None);
    };
    let mut h = [0u8; FRAME_HEADER_LEN];
    h.copy_from_slice(&head);
    let header = FrameHeader::parse(&h, limits)?;
    if header.api != api {
        return Err(ClientError::Protocol(ProtocolError::Malformed {
            what: "response",
            reason: format!("api {} in answer to api {api}", header.api),
        }));
    }
    let body = match read(read_bytes(recv, header.body_len as usize).await)? {
        Some(b) => b,
        None if header.body_len == 0 => Bytes::new(),
        None => {
            return Err(ClientError::Protocol(ProtocolError::Truncated {
                needed: header.body_len as usize,
            }))
        }
    };
    Ok(Some(decode_response::<T>(what, &body)?))
}

impl Client {
    /// Connects to the bootstrap broker (retrying with backoff up to `connect_timeout`).
    /// `bootstrap` may list several brokers separated by commas: they are tried in order,
    /// each for its share of `connect_timeout`, and the first that answers is used.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        Self::connect_with(config, None).await
    }

    /// [`connect`](Self::connect) on an existing quinn endpoint (a broker reaching its
    /// peers from its own address, for instance); `None` opens a new one.
    pub async fn connect_with(
        config: ClientConfig,
        endpoint: Option<quinn::Endpoint>,
    ) -> Result<Client> {
        let candidates: Vec<String> = config
            .bootstrap
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if candidates.len() <= 1 {
            return Self::connect_one(config, candidates, endpoint).await;
        }
        let share = (config.connect_timeout / candidates.len() as u32).max(Duration::from_secs(1));
        let mut failures = Vec::new();
        for addr in &candidates {
            let one = ClientConfig {
                bootstrap: addr.clone(),
                connect_timeout: share,
                ..config.clone()
            };
            match Self::connect_one(one, candidates.clone(), endpoint.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
        }
        Err(ClientError::Connect {
            addr: config.bootstrap.clone(),
            reason: format!("no bootstrap broker answered ({})", failures.join("; ")),
        })
    }

    async fn connect_one(
        config: ClientConfig,
        bootstrap_list: Vec<String>,
        endpoint: Option<quinn::Endpoint>,
    ) -> Result<Client> {
        let quinn_config = quinn_client_config(&config)?;
        let first =
            resolve(&config.bootstrap, None)
                .await
                .map_err(|reason| ClientError::Connect {
                    addr: config.bootstrap.clone(),
                    reason,
                })?;
        let bind: SocketAddr = if first.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let owns_endpoint = endpoint.is_none();
        let endpoint = match endpoint {
            Some(e) => e,
            None => crate::udp::endpoint(bind, None).map_err(|e| ClientError::Connect {
                addr: config.bootstrap.clone(),
                reason: format!("cannot open a local UDP socket: {e}"),
            })?,
        };
        // A batch may decode to as much as the largest answer this client takes: a broker
        // stores batches that decode to up to its own frame limit, and a client that can
        // receive such a frame reads its records too.
        let limits = Limits {
            max_frame_bytes: config.max_response_bytes,
            max_decompressed_bytes: config.max_response_bytes as usize,
        };
        let local = config.local.as_ref().map(|l| l.0.clone());
        let bootstrap = Arc::new(BrokerConn::new(&config.bootstrap, local.clone()));
        let inner = Arc::new(ClientInner {
            endpoint,
            owns_endpoint,
            quinn_config,
            limits,
            conns: Mutex::new(HashMap::from([(
                config.bootstrap.clone(),
                bootstrap.clone(),
            )])),
            home: Mutex::new(bootstrap.clone()),
            bootstrap,
            bootstrap_list,
            broker_addrs: Mutex::new(HashMap::new()),
            metadata: Mutex::new(HashMap::new()),
            config,
        });
        if local.is_none() {
            inner
                .bootstrap
                .connection(&inner, inner.config.connect_timeout)
                .await?;
        }
        Ok(Client { inner })
    }

    /// Metadata of a topic of `partitions` partitions, all led by broker 0, for
    /// [`offline_for_tests`](Self::offline_for_tests).
    #[cfg(test)]
    pub(crate) fn test_topic(
        name: &str,
        partitions: u32,
        partitioner: Option<&str>,
    ) -> quiver_protocol::requests::TopicMetadata {
        use quiver_protocol::requests::{PartitionMetadata, TopicMetadata};
        TopicMetadata {
            name: name.into(),
            partitions: (0..partitions)
                .map(|p| PartitionMetadata {
                    partition: p,
                    leader: 0,
                    leader_epoch: 0,
                    replicas: vec![0],
                    isr: vec![0],
                })
                .collect(),
            partitioner: partitioner.map(str::to_string),
        }
    }

    /// A client that has not connected (and will fail to, quickly), with `topics` already
    /// in its metadata cache: for unit tests of what the SDK decides before any request.
    #[cfg(test)]
    pub(crate) fn offline_for_tests(
        topics: Vec<quiver_protocol::requests::TopicMetadata>,
    ) -> Client {
        let config = ClientConfig {
            // Nothing listens on the discard port: any request fails fast.
            bootstrap: "127.0.0.1:9".into(),
            connect_timeout: Duration::from_millis(200),
            ..ClientConfig::default()
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
        let bootstrap = Arc::new(BrokerConn::new(&config.bootstrap, None));
        let inner = ClientInner {
            endpoint: quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into())
                .expect("UDP socket"),
            owns_endpoint: true,
            quinn_config: quinn::ClientConfig::new(Arc::new(quic)),
            limits: Limits::default(),
            conns: Mutex::new(HashMap::from([(
                config.bootstrap.clone(),
                bootstrap.clone(),
            )])),
            home: Mutex::new(bootstrap.clone()),
            bootstrap,
            bootstrap_list: Vec::new(),
            broker_addrs: Mutex::new(HashMap::new()),
            metadata: Mutex::new(
                topics
                    .into_iter()
                    .map(|t| (t.name.clone(), Arc::new(t)))
                    .collect(),
            ),
            config,
        };
        Client {
            inner: Arc::new(inner),
        }
    }

    /// The configuration this client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Limits applied to responses (frame size, decompressed batch size).
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Sends `req` with `payload` to the bootstrap broker and returns the decoded response
    /// and its payload, within `request_timeout`.
    pub async fn request<M: Message>(
        &self,
        req: &M,
        payload: Bytes,
    ) -> Result<(M::Response, Bytes)> {
        self.request_with_timeout(req, payload, self.inner.config.request_timeout)
            .await
    }

    /// [`request`](Self::request) with an explicit time limit (long-polls add their wait).
    pub async fn request_with_timeout<M: Message>(
        &self,
        req: &M,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(M::Response, Bytes)> {
        let broker = lock(&self.inner.home).clone();
        let first = self
            .request_on(&broker, req, payload.clone(), timeout)
            .await;
        match first {
            Err(ClientError::Connect { .. } | ClientError::Transport { .. }) => {}
            other => return other,
        }
        // The broker this client was using is gone: any other broker it knows of (the
        // bootstrap list, the brokers metadata named) answers as well, and keeps answering.
        let mut others: Vec<String> = self.inner.bootstrap_list.clone();
        others.extend(lock(&self.inner.broker_addrs).values().cloned());
        others.retain(|a| *a != broker.addr);
        others.dedup();
        for addr in others {
            let conn = self.conn_for(&addr);
            match self.request_on(&conn, req, payload.clone(), timeout).await {
                Err(ClientError::Connect { .. } | ClientError::Transport { .. }) => continue,
                other => {
                    tracing::debug!(from = %broker.addr, to = %conn.addr, "requests go to another broker");
                    *lock(&self.inner.home) = conn;
                    return other;
                }
            }
        }
        first
    }

    /// True when this client talks to a cluster of several brokers (from the metadata,
    /// fetched when not known yet).
    pub async fn is_cluster(&self) -> Result<bool> {
        if lock(&self.inner.broker_addrs).is_empty() {
            self.metadata(Some(Vec::new())).await?;
        }
        Ok(lock(&self.inner.broker_addrs).len() > 1)
    }

    /// Sends `req` to cluster broker `id` at the address the last metadata named (fetched
    /// first when this client knows no broker yet), within `request_timeout`. `Ok(None)`
    /// when this client talks to a lone broker or knows no usable address for `id`.
    pub async fn request_to_broker<M: Message>(
        &self,
        id: u32,
        req: &M,
        payload: Bytes,
    ) -> Result<Option<(M::Response, Bytes)>> {
        if !self.is_cluster().await? {
            return Ok(None);
        }
        let Some(addr) = self.cluster_addr(id) else {
            return Ok(None);
        };
        let conn = self.conn_for(&addr);
        self.request_on(&conn, req, payload, self.inner.config.request_timeout)
            .await
            .map(Some)
    }

    /// The address of cluster broker `id` from the metadata; `None` for a lone broker (its
    /// bootstrap address is the one to use) or an unknown or unusable (unspecified) one.
    fn cluster_addr(&self, id: u32) -> Option<String> {
        let addrs = lock(&self.inner.broker_addrs);
        if addrs.len() <= 1 {
            return None;
        }
        addrs.get(&id).cloned().filter(|a| {
            a.parse::<SocketAddr>()
                .map(|s| !s.ip().is_unspecified())
                .unwrap_or(true)
        })
    }

    /// The (lazily connected) connection of the broker at `addr`.
    fn conn_for(&self, addr: &str) -> Arc<BrokerConn> {
        if let Some(c) = lock(&self.inner.conns).get(addr) {
            return c.clone();
        }
        // The in-process broker answers at the address the metadata gives for its id.
        let local = self.inner.config.local.as_ref().and_then(|l| {
            let mine = lock(&self.inner.broker_addrs)
                .get(&l.0.broker_id())
                .cloned();
            (mine.as_deref() == Some(addr)).then(|| l.0.clone())
        });
        lock(&self.inner.conns)
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(BrokerConn::new(addr, local)))
            .clone()
    }

    /// Sends a request about `topic`/`partition` to that partition's leader (from the
    /// metadata cache, refreshed when the broker says it is not the leader).
    pub async fn request_for_partition<M: Message>(
        &self,
        topic: &str,
        partition: u32,
        req: &M,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(M::Response, Bytes)> {
        let broker = self.leader(topic, partition).await?;
        let r = self.request_on(&broker, req, payload, timeout).await;
        let stale = match &r {
            Err(
                ClientError::NotLeader(_)
                | ClientError::TopicNotFound(_)
                | ClientError::Connect { .. }
                | ClientError::Transport { .. }
                | ClientError::Timeout { .. },
            ) => true,
            Err(e) => e.code() == Some(quiver_protocol::ErrorCode::FencedLeaderEpoch),
            Ok(_) => false,
        };
        if stale {
            // The leader may have moved: the next attempt asks for fresh metadata.
            self.invalidate_metadata(topic);
        }
        r
    }

    /// Sends a request about consumer group `group` to its coordinator: the leader of the
    /// group's partition of `__consumer_offsets` (one broker coordinates every group of a
    /// lone broker), within `request_timeout`.
    pub async fn request_for_group<M: Message>(
        &self,
        group: &str,
        req: &M,
        payload: Bytes,
    ) -> Result<(M::Response, Bytes)> {
        let timeout = self.inner.config.request_timeout;
        self.request_for_group_with_timeout(group, req, payload, timeout)
            .await
    }

    /// [`request_for_group`](Self::request_for_group) with an explicit time limit.
    pub async fn request_for_group_with_timeout<M: Message>(
        &self,
        group: &str,
        req: &M,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(M::Response, Bytes)> {
        let partitions = match self.partition_count(OFFSETS_TOPIC).await {
            Ok(n) => n,
            // No offsets topic yet (a cluster still forming): the bootstrap broker answers.
            Err(ClientError::TopicNotFound(_)) => {
                return self.request_with_timeout(req, payload, timeout).await
            }
            Err(e) => return Err(e),
        };
        let p = coordinator_partition(group, partitions);
        // A coordinator that moved (or whose partition a broker has not applied yet)
        // refuses with NotLeader before doing anything, so asking the leader the fresh
        // metadata names is safe for every group request, until the time is up.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = crate::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = self
                .request_for_partition(OFFSETS_TOPIC, p, req, payload.clone(), left)
                .await;
            let delay = backoff.next_delay();
            match r {
                Err(ClientError::NotLeader(_))
                    if tokio::time::Instant::now() + delay < deadline =>
                {
                    tokio::time::sleep(delay).await;
                }
                r => return r,
            }
        }
    }

    /// Sends a request to the partition's leader without reading the answer (`acks = 0`).
    /// Returns once the broker's QUIC stack acknowledged every byte of it (not its
    /// processing): a process that exits right after a flush would otherwise drop requests
    /// still in its send buffer.
    pub(crate) async fn send_only_for_partition<M: Message>(
        &self,
        topic: &str,
        partition: u32,
        req: &M,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<()> {
        let broker = self.leader(topic, partition).await?;
        let fut = async {
            let (mut send, _recv) = self.open_stream(&broker).await?;
            let transport = |reason: String| ClientError::Transport {
                addr: broker.addr.clone(),
                reason,
            };
            write_request(&mut send, req, payload)
                .await
                .map_err(transport)?;
            // None: every byte acknowledged; Some(code): the broker stopped the stream after
            // reading the request (it sends no answer at acks=0).
            send.stopped()
                .await
                .map(drop)
                .map_err(|e| transport(e.to_string()))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout {
                what: M::API.name(),
                after: timeout,
            })?
    }

    /// One request to `broker` (over QUIC, or handed to its dispatcher when it runs in this
    /// process), within `timeout`.
    async fn request_on<M: Message>(
        &self,
        broker: &BrokerConn,
        req: &M,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(M::Response, Bytes)> {
        let span = match broker.local {
            Some(_) => tracing::debug_span!("request", api = M::API.name(), broker = "in process"),
            None => tracing::debug_span!("request", api = M::API.name(), broker = %broker.addr),
        };
        let fut = async {
            match &broker.local {
                Some(local) => self.answer_in_process(local, req, payload).await,
                None => self.answer_over_quic(broker, req, payload).await,
            }
        };
        let r = tokio::time::timeout(timeout, fut)
            .instrument(span)
            .await
            .map_err(|_| ClientError::Timeout {
                what: M::API.name(),
                after: timeout,
            })?;
        if let Err(e) = &r {
            tracing::debug!(api = M::API.name(), error = %e, "request failed");
        }
        r
    }

    /// Writes the request on a new stream to `broker` and reads its answer.
    async fn answer_over_quic<M: Message>(
        &self,
        broker: &BrokerConn,
        req: &M,
        payload: Bytes,
    ) -> Result<(M::Response, Bytes)> {
        let (mut send, mut recv) = self.open_stream(broker).await?;
        write_request(&mut send, req, payload)
            .await
            .map_err(|reason| ClientError::Transport {
                addr: broker.addr.clone(),
                reason,
            })?;
        read_response::<M::Response>(
            &mut recv,
            M::API as u16,
            M::API.name(),
            &self.inner.limits,
            &broker.addr,
        )
        .await?
        .ok_or_else(|| ClientError::Transport {
            addr: broker.addr.clone(),
            reason: "the broker closed the stream without answering".into(),
        })
    }

    /// Hands the request frame to the dispatcher of the broker in this process and decodes
    /// its answer (held to the same size limit as one read off the network).
    async fn answer_in_process<M: Message>(
        &self,
        local: &Arc<dyn LocalTransport>,
        req: &M,
        payload: Bytes,
    ) -> Result<(M::Response, Bytes)> {
        let body = encode_request(req, &payload).body;
        let answer = local.call(M::API as u16, body).await;
        let limit = self.inner.limits.max_frame_bytes;
        if answer.len() > limit as usize {
            return Err(ClientError::Protocol(ProtocolError::TooLarge {
                what: "response",
                len: answer.len() as u64,
                limit: u64::from(limit),
            }));
        }
        let (resp, inline) = decode_response::<M::Response>(M::API.name(), &answer.head)?;
        let payload = if answer.payload.is_empty() {
            inline
        } else {
            answer.payload
        };
        Ok((resp, payload))
    }

    /// Opens a bidirectional stream, reconnecting once if the cached connection is dead.
    async fn open_stream(
        &self,
        broker: &BrokerConn,
    ) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let mut last = None;
        for _ in 0..2 {
            // A partition leader that does not answer quickly is likely gone (a new one is
            // on its way): give up sooner, so the caller refreshes metadata and retries.
            let limit = if std::ptr::eq(broker, Arc::as_ptr(&lock(&self.inner.home))) {
                self.inner.config.connect_timeout
            } else {
                self.inner.config.connect_timeout.min(LEADER_CONNECT_LIMIT)
            };
            let conn = broker.connection(&self.inner, limit).await?;
            match conn.open_bi().await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    broker.forget(&conn);
                    last = Some(e.to_string());
                }
            }
        }
        Err(ClientError::Transport {
            addr: broker.addr.clone(),
            reason: last.unwrap_or_default(),
        })
    }

    /// Opens a push stream of `topic`/`partition` from `offset` on the partition's leader.
    ///
    /// ```no_run
    /// # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
    /// let mut sub = client.subscribe("orders", 0, 0, 1 << 20).await?;
    /// while let Some((chunk, batches)) = sub.next_chunk().await? {
    ///     println!("{} bytes, high watermark {}", batches.len(), chunk.high_watermark);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
    ) -> Result<Subscription> {
        self.subscribe_with(topic, partition, offset, max_bytes, None)
            .await
    }

    /// [`subscribe`](Self::subscribe) with a consume-time processor the broker runs on the
    /// batches before pushing them (see [`ProcessorSpec`](quiver_protocol::requests::ProcessorSpec)).
    pub async fn subscribe_with(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        processor: Option<quiver_protocol::requests::ProcessorSpec>,
    ) -> Result<Subscription> {
        let broker = self.leader(topic, partition).await?;
        let (mut send, recv) = tokio::time::timeout(self.inner.config.request_timeout, async {
            let (mut send, recv) = self.open_stream(&broker).await?;
            let req = SubscribeRequest {
                topic: topic.to_string(),
                partition,
                offset,
                max_bytes,
                processor,
            };
            write_request(&mut send, &req, Bytes::new())
                .await
                .map_err(|reason| ClientError::Transport {
                    addr: broker.addr.clone(),
                    reason,
                })?;
            Ok::<_, ClientError>((send, recv))
        })
        .await
        .map_err(|_| ClientError::Timeout {
            what: "Subscribe",
            after: self.inner.config.request_timeout,
        })??;
        let _ = send.finish();
        Ok(Subscription {
            recv,
            _send: send,
            limits: self.inner.limits,
            addr: broker.addr.clone(),
        })
    }

    /// Metadata of the given topics (all when `None`), straight from the broker; refreshes
    /// the cache.
    pub async fn metadata(&self, topics: Option<Vec<String>>) -> Result<MetadataResponse> {
        let (resp, _) = self
            .request(&MetadataRequest { topics }, Bytes::new())
            .await?;
        {
            let mut addrs = lock(&self.inner.broker_addrs);
            for b in &resp.brokers {
                addrs.insert(b.id, b.addr.clone());
            }
        }
        let mut cache = lock(&self.inner.metadata);
        for t in &resp.topics {
            cache.insert(t.name.clone(), Arc::new(t.clone()));
        }
        Ok(resp)
    }

    /// The cached metadata of `topic`, fetched when absent.
    pub async fn topic_metadata(&self, topic: &str) -> Result<Arc<TopicMetadata>> {
        if let Some(t) = lock(&self.inner.metadata).get(topic) {
            return Ok(t.clone());
        }
        self.metadata(Some(vec![topic.to_string()])).await?;
        lock(&self.inner.metadata)
            .get(topic)
            .cloned()
            .ok_or_else(|| ClientError::TopicNotFound(format!("topic {topic:?} does not exist")))
    }

    /// Drops the cached metadata of `topic` (the next use fetches it again).
    pub fn invalidate_metadata(&self, topic: &str) {
        lock(&self.inner.metadata).remove(topic);
    }

    /// Number of partitions of `topic` (cached).
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        Ok(self.topic_metadata(topic).await?.partitions.len() as u32)
    }

    /// Number of partitions of `topic`, asked of the cluster again when the cached count
    /// does not include `partition`: the topic may have grown since it was cached.
    pub async fn partition_count_including(&self, topic: &str, partition: u32) -> Result<u32> {
        Ok(self
            .metadata_including(topic, partition)
            .await?
            .partitions
            .len() as u32)
    }

    /// The metadata of `topic`, fetched again once if the cached one lacks `partition`.
    async fn metadata_including(&self, topic: &str, partition: u32) -> Result<Arc<TopicMetadata>> {
        let md = self.topic_metadata(topic).await?;
        if md.partitions.iter().any(|p| p.partition == partition) {
            return Ok(md);
        }
        self.invalidate_metadata(topic);
        self.topic_metadata(topic).await
    }

    /// The connection of the leader of `topic`/`partition`; the bootstrap broker when the
    /// cluster has one broker or the leader's address is unknown or unusable.
    async fn leader(&self, topic: &str, partition: u32) -> Result<Arc<BrokerConn>> {
        let md = self.metadata_including(topic, partition).await?;
        let Some(p) = md.partitions.iter().find(|p| p.partition == partition) else {
            return Err(ClientError::InvalidPartition {
                topic: topic.to_string(),
                partition,
                partitions: md.partitions.len() as u32,
            });
        };
        Ok(match self.cluster_addr(p.leader) {
            None => lock(&self.inner.home).clone(),
            Some(a) => self.conn_for(&a),
        })
    }

    /// Closes every connection (in-flight requests fail).
    pub fn close(&self) {
        if self.inner.owns_endpoint {
            self.inner.endpoint.close(0u32.into(), b"client closed");
            return;
        }
        for conn in lock(&self.inner.conns).values() {
            if let Some(c) = lock(&conn.current).take() {
                c.close(0u32.into(), b"client closed");
            }
        }
    }
}

/// A push stream opened by [`Client::subscribe`]; dropping it stops the stream.
///
/// ```no_run
/// # async fn demo(mut sub: quiver_client::Subscription) -> quiver_client::Result<()> {
/// if let Some((chunk, batches)) = sub.next_chunk().await? {
///     println!("{} bytes up to hw {}", batches.len(), chunk.high_watermark);
/// }
/// # Ok(()) }
/// ```
pub struct Subscription {
    recv: quinn::RecvStream,
    _send: quinn::SendStream,
    limits: Limits,
    addr: String,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("broker", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next pushed chunk and its batches; `None` when the broker ended the stream.
    pub async fn next_chunk(&mut self) -> Result<Option<(SubscribeChunk, Bytes)>> {
        read_response::<SubscribeChunk>(
            &mut self.recv,
            SubscribeRequest::API as u16,
            "Subscribe",
            &self.limits,
            &self.addr,
        )
        .await
    }
}
