//! [`ClientConfig`]: where the cluster is, what to trust, and the connection's time limits
//! and transport tuning. Plain data with defaults; validated when a client connects.

use std::path::PathBuf;
use std::time::Duration;

/// How a [`Client`](crate::Client) reaches the cluster.
///
/// ```
/// use quiver_client::ClientConfig;
/// let cfg = ClientConfig {
///     ca_file: Some("quiver-data/tls/ca.pem".into()),
///     ..ClientConfig::new("127.0.0.1:7400")
/// };
/// assert_eq!(cfg.bootstrap, "127.0.0.1:7400");
/// ```
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `HOST:PORT` of any broker (the host is also the TLS server name), or several
    /// separated by commas, tried in order.
    pub bootstrap: String,
    /// PEM file with the CA certificate(s) to trust; the system roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// A certificate chain and its private key (PEM files) to present to the broker: how
    /// a cluster's brokers prove to each other that they are brokers. `None` for clients.
    pub identity: Option<ClientIdentity>,
    /// Time limit of one request (fetch adds its `max_wait_ms` on top).
    pub request_timeout: Duration,
    /// Time limit for establishing a connection, retries included.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles up to `reconnect_backoff_max`.
    pub reconnect_backoff: Duration,
    /// Largest reconnect delay.
    pub reconnect_backoff_max: Duration,
    /// Largest response frame accepted (the body is refused before it is read), and the
    /// most one fetched batch's records may decode to. At least the brokers'
    /// `limits.max_frame_bytes`, or batches they store may not be read.
    pub max_response_bytes: u32,
    /// QUIC receive window per stream.
    pub stream_receive_window: u32,
    /// QUIC receive window per connection.
    pub connection_receive_window: u32,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// QUIC idle timeout: a connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// The broker at `bootstrap` runs in this process: requests to it are handed to its
    /// dispatcher instead of going over QUIC (a broker's own deployed pipelines).
    pub local: Option<crate::LocalBroker>,
}

impl ClientConfig {
    /// Defaults for the given bootstrap address.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        ClientConfig {
            bootstrap: bootstrap.into(),
            ..ClientConfig::default()
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            bootstrap: "127.0.0.1:7400".into(),
            ca_file: None,
            identity: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            reconnect_backoff: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            max_response_bytes: 128 * 1024 * 1024,
            stream_receive_window: 16 * 1024 * 1024,
            connection_receive_window: 64 * 1024 * 1024,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            local: None,
        }
    }
}

/// A client certificate chain and key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf.
    pub key_file: PathBuf,
}
