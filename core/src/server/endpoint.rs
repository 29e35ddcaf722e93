//! The QUIC endpoint: transport tuning, the accept loop with a connection cap, and the
//! orderly stop (refuse new connections, let requests finish, close).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, VarInt};
use tracing::Instrument;

use super::connection::serve_connection;
use super::ServerContext;
use crate::config::LimitsConfig;

/// The QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The TLS config does not suit QUIC.
    #[error("QUIC TLS config: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {error} (is another broker using this address? pick another with --listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why (in the message, not a separate cause: an error chain would print it twice).
        error: std::io::Error,
    },
}

/// Transport settings shared by the broker (and mirrored by clients): large windows so one
/// stream can fill the path, many concurrent request streams.
pub fn transport_config(limits: &LimitsConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(limits.max_streams_per_connection));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    t.max_idle_timeout(
        Duration::from_millis(limits.idle_timeout_ms)
            .try_into()
            .ok(),
    );
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // Nothing reads QUIC datagrams: offering them would let a peer park buffers here.
    t.datagram_receive_buffer_size(None);
    t
}

/// Binds the endpoint.
pub fn bind(
    addr: SocketAddr,
    crypto: Arc<rustls::ServerConfig>,
    limits: &LimitsConfig,
) -> Result<Endpoint, EndpointError> {
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config(limits)));
    quiver_client::udp::endpoint(addr, Some(server))
        .map_err(|error| EndpointError::Bind { addr, error })
}

/// Whether the connection negotiated the controller's Raft ALPN.
fn is_raft(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .is_some_and(|p| p == crate::cluster::RAFT_ALPN)
}

/// A peer broker's Raft connection: served only with a client certificate (verified against
/// the cluster CA during the handshake) and once this broker's controller runs.
async fn serve_raft(conn: quinn::Connection, ctx: &ServerContext) {
    let Some(service) = ctx.raft.get().cloned() else {
        conn.close(VarInt::from_u32(1), b"no controller here");
        return;
    };
    if conn.peer_identity().is_none() {
        tracing::warn!(remote = %conn.remote_address(), "raft connection without a client certificate refused");
        conn.close(VarInt::from_u32(1), b"a broker certificate is required");
        return;
    }
    crate::cluster::serve_raft_service(conn, service).await;
}

/// Accepts connections until shutdown.
pub async fn accept_loop(endpoint: Endpoint, ctx: Arc<ServerContext>) {
    let max = ctx.config.limits.max_connections as i64;
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = ctx.stopped() => break,
        };
        let Some(incoming) = incoming else { break };
        if ctx.metrics.connections.load(Ordering::Relaxed) >= max {
            tracing::warn!(remote = %incoming.remote_address(), max, "refusing connection: limits.max_connections reached");
            incoming.refuse();
            continue;
        }
        let ctx = ctx.clone();
        let remote = incoming.remote_address();
        tokio::spawn(
            async move {
                match incoming.await {
                    Ok(conn) if is_raft(&conn) => serve_raft(conn, &ctx).await,
                    Ok(conn) => serve_connection(conn, ctx).await,
                    Err(e) => tracing::debug!(error = %e, "handshake failed"),
                }
            }
            .instrument(tracing::info_span!("connection", %remote)),
        );
    }
    // Stop taking new connections; existing ones finish their requests.
    endpoint.set_server_config(None);
}
