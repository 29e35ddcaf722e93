//! TLS material for the QUIC endpoint.
//!
//! With `tls.cert`/`tls.key` configured, those are loaded (a private key readable by other
//! users is refused). Otherwise the broker keeps its own CA in `<data_dir>/tls/` (`ca.pem`
//! for clients to trust, `ca.key` private) and signs a fresh server certificate for the
//! current addresses at every start. Certificate verification is never switched off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::BrokerConfig;

/// TLS material could not be made, loaded or used; the message says which file and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// The loaded server identity.
pub struct ServerIdentity {
    /// Certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// The CA file clients should trust, when the broker made its own.
    pub ca_path: Option<PathBuf>,
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError(format!("{what}: {e}"))
}

/// Loads or creates the identity described by `config`.
pub fn load_or_create(config: &BrokerConfig) -> Result<ServerIdentity, TlsError> {
    match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => load_configured(cert, key),
        _ => self_made(config),
    }
}

fn load_configured(cert: &Path, key: &Path) -> Result<ServerIdentity, TlsError> {
    check_private(key)?;
    let pem = std::fs::read(cert)
        .map_err(|e| tls_err(&format!("reading tls.cert {}", cert.display()), e))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&format!("parsing tls.cert {}", cert.display()), e))?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "tls.cert {} holds no certificate",
            cert.display()
        )));
    }
    let kpem = std::fs::read(key)
        .map_err(|e| tls_err(&format!("reading tls.key {}", key.display()), e))?;
    let key = rustls_pemfile::private_key(&mut &kpem[..])
        .map_err(|e| tls_err(&format!("parsing tls.key {}", key.display()), e))?
        .ok_or_else(|| TlsError(format!("tls.key {} holds no private key", key.display())))?;
    Ok(ServerIdentity {
        chain,
        key,
        ca_path: None,
    })
}

#[cfg(unix)]
fn check_private(key: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(key).map_err(|e| tls_err(&format!("tls.key {}", key.display()), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(TlsError(format!(
            "tls.key {} is readable by other users (mode {:o}); run `chmod 600 {}`",
            key.display(),
            meta.permissions().mode() & 0o777,
            key.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_key: &Path) -> Result<(), TlsError> {
    Ok(())
}

fn write_private(path: &Path, data: &str) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| tls_err(&format!("writing {}", path.display()), e))?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| tls_err(&format!("writing {}", path.display()), e))
}

fn write_atomic(path: &Path, data: &str) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| tls_err(&format!("writing {}", path.display()), e))
}

fn subject_alt_names(config: &BrokerConfig) -> Vec<String> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for addr in [config.listen.clone(), config.advertised()] {
        if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
            if !sa.ip().is_unspecified() {
                sans.push(sa.ip().to_string());
            }
        } else if let Some((host, _)) = addr.rsplit_once(':') {
            sans.push(host.to_string());
        }
    }
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            sans.push(h.to_string());
        }
    }
    sans.extend(config.tls.extra_sans.iter().cloned());
    sans.sort();
    sans.dedup();
    sans
}

/// The CA kept in `dir` (`ca.pem` for clients to trust, `ca.key` private), made with
/// `common_name` when absent. Returns its certificate, key and the `ca.pem` path.
fn load_or_create_ca(
    dir: &Path,
    common_name: &str,
) -> Result<(rcgen::Certificate, KeyPair, PathBuf), TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| tls_err(&format!("creating {}", dir.display()), e))?;
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    if ca_pem_path.exists() && ca_key_path.exists() {
        check_private(&ca_key_path)?;
        let key_pem =
            std::fs::read_to_string(&ca_key_path).map_err(|e| tls_err("reading ca.key", e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| tls_err("parsing ca.key", e))?;
        let pem =
            std::fs::read_to_string(&ca_pem_path).map_err(|e| tls_err("reading ca.pem", e))?;
        let params =
            CertificateParams::from_ca_cert_pem(&pem).map_err(|e| tls_err("parsing ca.pem", e))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| tls_err("loading CA", e))?;
        return Ok((cert, key, ca_pem_path));
    }
    let key = KeyPair::generate().map_err(|e| tls_err("generating CA key", e))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_err("CA params", e))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name.to_string());
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params
        .self_signed(&key)
        .map_err(|e| tls_err("signing CA", e))?;
    write_private(&ca_key_path, &key.serialize_pem())?;
    write_atomic(&ca_pem_path, &cert.pem())?;
    Ok((cert, key, ca_pem_path))
}

/// The cluster CA in `dir` (made on first use); returns the `ca.pem` clients trust.
pub fn cluster_ca(dir: &Path) -> Result<PathBuf, TlsError> {
    Ok(load_or_create_ca(dir, "Quiver cluster CA")?.2)
}

/// Issues broker `id`'s certificate, signed by the CA in `ca_dir`, for the names and
/// addresses `sans`, usable as a server and as a client certificate (brokers authenticate
/// each other with it). Writes `cert.pem` (leaf then CA) and `key.pem` (private) into
/// `out_dir` and returns their paths, for `tls.cert` / `tls.key`.
pub fn issue_broker_certificate(
    ca_dir: &Path,
    id: u32,
    sans: &[String],
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let (ca_cert, ca_key, _) = load_or_create_ca(ca_dir, "Quiver cluster CA")?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| tls_err(&format!("creating {}", out_dir.display()), e))?;
    let key = KeyPair::generate().map_err(|e| tls_err("generating broker key", e))?;
    let mut params =
        CertificateParams::new(sans.to_vec()).map_err(|e| tls_err("broker params", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("quiver-broker-{id}"));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .map_err(|e| tls_err("signing the broker certificate", e))?;
    let cert_path = out_dir.join("cert.pem");
    let key_path = out_dir.join("key.pem");
    write_private(&key_path, &key.serialize_pem())?;
    write_atomic(&cert_path, &format!("{}{}", cert.pem(), ca_cert.pem()))?;
    Ok((cert_path, key_path))
}

fn self_made(config: &BrokerConfig) -> Result<ServerIdentity, TlsError> {
    let dir = config.data_dir.join("tls");
    let (ca_cert, ca_key, ca_pem_path) = load_or_create_ca(
        &dir,
        &format!("Quiver broker {} local CA", config.broker_id),
    )?;
    let key = KeyPair::generate().map_err(|e| tls_err("generating server key", e))?;
    let mut params = CertificateParams::new(subject_alt_names(config))
        .map_err(|e| tls_err("server params", e))?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("quiver-broker-{}", config.broker_id),
    );
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .map_err(|e| tls_err("signing server certificate", e))?;
    write_atomic(&dir.join("server.pem"), &cert.pem())?;
    let key_der =
        PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| tls_err("server key", e))?;
    Ok(ServerIdentity {
        chain: vec![cert.der().clone(), ca_cert.der().clone()],
        key: key_der,
        ca_path: Some(ca_pem_path),
    })
}

/// Builds the rustls server config (TLS 1.3, ALPN `quiver/1`, no 0-RTT).
pub fn server_crypto(id: ServerIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("tls versions", e))?
        .with_no_client_auth()
        .with_single_cert(id.chain, id.key)
        .map_err(|e| tls_err("server certificate", e))?;
    cfg.alpn_protocols = vec![quiver_protocol::ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}

/// The server config of a cluster broker: clients speak `quiver/1` as with a lone broker,
/// and peer brokers speak the controller's Raft (`quiver-raft/1`) on the same endpoint. A
/// client certificate is optional, but one presented must chain to the cluster CA; the
/// endpoint serves the Raft ALPN only to connections that presented one.
pub fn cluster_server_crypto(
    id: ServerIdentity,
    cluster_ca: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in cluster_ca {
        roots.add(c.clone()).map_err(|e| tls_err("cluster CA", e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| tls_err("client verifier", e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("tls versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain, id.key)
        .map_err(|e| tls_err("server certificate", e))?;
    cfg.alpn_protocols = vec![
        quiver_protocol::ALPN.to_vec(),
        crate::cluster::RAFT_ALPN.to_vec(),
    ];
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}

/// The certificates of a PEM file (the cluster CA).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem =
        std::fs::read(path).map_err(|e| tls_err(&format!("reading {}", path.display()), e))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&format!("parsing {}", path.display()), e))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(path).unwrap();
        rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_broker_certificate_from_the_cluster_ca_serves_and_authenticates_as_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("tls");
        let ca = cluster_ca(&ca_dir).unwrap();
        assert_eq!(cluster_ca(&ca_dir).unwrap(), ca, "made once, then reused");
        let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let (cert, key) =
            issue_broker_certificate(&ca_dir, 2, &sans, &dir.path().join("broker-2")).unwrap();
        // Loadable as a configured certificate (private key permissions included).
        load_configured(&cert, &key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&ca) {
            roots.add(c).unwrap();
        }
        let roots = Arc::new(roots);
        let chain = certs(&cert);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        server
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from("127.0.0.1").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap();
        let client = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .unwrap();
        client
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .unwrap();
        // Another CA's broker is not trusted.
        let other = dir.path().join("other");
        let (stranger, _) = issue_broker_certificate(&other, 9, &sans, &other).unwrap();
        let s = certs(&stranger);
        assert!(client
            .verify_client_cert(&s[0], &s[1..], UnixTime::now())
            .is_err());
    }
}
