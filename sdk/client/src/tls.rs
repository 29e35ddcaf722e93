//! TLS and QUIC transport setup for the client: trust roots (a CA file or the system's),
//! TLS 1.3 only, ALPN `quiver/1`, and a transport tuned for throughput.
//!
//! Certificate verification is always on; there is deliberately no way to turn it off.

use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;

use crate::{ClientConfig, ClientError, Result};

/// Builds the root store: the certificates in `ca_file`, or the system roots.
fn roots(config: &ClientConfig) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    ClientError::Tls(format!("CA file {} not found", path.display()))
                } else {
                    ClientError::Tls(format!("cannot read CA file {}: {e}", path.display()))
                }
            })?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    ClientError::Tls(format!("CA file {} is not valid PEM: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    ClientError::Tls(format!("CA file {}: bad certificate: {e}", path.display()))
                })?;
                n += 1;
            }
            if n == 0 {
                return Err(ClientError::Tls(format!(
                    "CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(ClientError::Tls(
                    "no system root certificates found; pass a CA file (--ca)".into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// Reads a client certificate chain and its key.
fn identity(
    id: &crate::config::ClientIdentity,
) -> Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", path.display())))
    };
    let chain = rustls_pemfile::certs(&mut read(&id.cert_file)?.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Tls(format!("{}: {e}", id.cert_file.display())))?;
    let key = rustls_pemfile::private_key(&mut read(&id.key_file)?.as_slice())
        .map_err(|e| ClientError::Tls(format!("{}: {e}", id.key_file.display())))?
        .ok_or_else(|| {
            ClientError::Tls(format!("{} holds no private key", id.key_file.display()))
        })?;
    Ok((chain, key))
}

/// The quinn client config: rustls (ring, TLS 1.3, ALPN) plus the tuned transport.
pub(crate) fn quinn_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots(config)?);
    let mut tls = match &config.identity {
        None => tls.with_no_client_auth(),
        Some(id) => {
            let (chain, key) = identity(id)?;
            tls.with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Tls(format!("client certificate: {e}")))?
        }
    };
    tls.alpn_protocols = vec![quiver_protocol::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));

    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(config.stream_receive_window));
    t.receive_window(VarInt::from_u32(config.connection_receive_window));
    t.send_window(u64::from(config.connection_receive_window));
    t.keep_alive_interval(Some(config.keep_alive));
    t.max_idle_timeout(Some(IdleTimeout::try_from(config.idle_timeout).map_err(
        |_| {
            ClientError::Config(format!(
                "idle timeout {:?} is too large",
                config.idle_timeout
            ))
        },
    )?));
    // The broker never opens streams towards a client, nor sends datagrams.
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.datagram_receive_buffer_size(None);
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// The TLS server name for `addr` (`HOST:PORT`, `[v6]:PORT` or a bare host).
pub(crate) fn server_name(addr: &str) -> String {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return sa.ip().to_string();
    }
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(server_name("127.0.0.1:7400"), "127.0.0.1");
        assert_eq!(server_name("[::1]:7400"), "::1");
        assert_eq!(server_name("localhost:7400"), "localhost");
        assert_eq!(server_name("broker-1.example.com"), "broker-1.example.com");
    }

    #[test]
    fn missing_ca_file_is_a_clear_error() {
        let cfg = ClientConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..ClientConfig::default()
        };
        let e = quinn_client_config(&cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("CA file /nonexistent/ca.pem not found"), "{e}");
    }
}
