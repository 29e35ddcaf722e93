//! Options every client command shares (`--bootstrap`, `--ca`, `--log-level`), logging
//! setup, and turning those options into a connected [`Client`] with errors a person can
//! act on.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use quiver_client::{Client, ClientConfig, ClientError};

/// The CA file a local broker writes, trusted by default when it exists.
const DEFAULT_CA: &str = "./quiver-data/tls/ca.pem";

/// Global options.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// Broker to connect to first (HOST:PORT), or several separated by commas (tried in order).
    #[arg(
        long,
        global = true,
        env = "QUIVER_BOOTSTRAP",
        default_value = "127.0.0.1:7400"
    )]
    pub bootstrap: String,
    /// PEM file of the CA to trust [default: ./quiver-data/tls/ca.pem if it exists, else the
    /// system roots].
    #[arg(long, global = true, env = "QUIVER_CA")]
    pub ca: Option<PathBuf>,
    /// Log filter, e.g. `debug` or `quiver_client=debug` [default: warn; info for the broker].
    #[arg(long, global = true, env = "QUIVER_LOG")]
    pub log_level: Option<String>,
}

/// Logs to stderr at `level` (a tracing filter), or `default` when none is given.
pub fn init_logging(level: Option<&str>, default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level.unwrap_or(default)).unwrap_or_else(|e| {
            eprintln!("warning: bad --log-level ({e}); using {default}");
            tracing_subscriber::EnvFilter::new(default)
        });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

impl GlobalOpts {
    /// The client configuration these options describe.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let ca_file = match &self.ca {
            Some(p) if !p.exists() => bail!(
                "CA file {} not found (pass the broker's <data_dir>/tls/ca.pem with --ca or QUIVER_CA)",
                p.display()
            ),
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from(DEFAULT_CA)).filter(|p| p.exists()),
        };
        Ok(ClientConfig {
            ca_file,
            ..ClientConfig::new(self.bootstrap.clone())
        })
    }

    /// Connects to the bootstrap broker.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let config = self.client_config()?;
        let trusted = config.ca_file.clone();
        Client::connect(config).await.map_err(|e| match e {
            ClientError::Connect { addr, reason } if reason.contains("TLS") => anyhow::anyhow!(
                "cannot connect to {addr}: {reason}; {}",
                match trusted {
                    Some(p) => format!("is {} the CA of this broker? pass the right one with --ca", p.display()),
                    None => "pass the broker's CA certificate with --ca <data_dir>/tls/ca.pem".into(),
                }
            ),
            // An address that does not resolve is a typo, not a broker that is down.
            ClientError::Connect { addr, reason } if reason.starts_with("cannot resolve") => {
                anyhow::anyhow!(
                    "cannot connect to {addr}: {reason}; pass --bootstrap HOST:PORT, e.g. 127.0.0.1:7400"
                )
            }
            ClientError::Connect { addr, reason } => anyhow::anyhow!(
                "cannot connect to {addr}: {reason}; is a broker running? start one with `quiver broker start`"
            ),
            other => anyhow::Error::new(other).context("cannot set up the client"),
        })
    }
}

/// Parses `key=value` pairs given with `--config` or `--header`.
pub fn parse_pairs(items: &[String], flag: &str) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .with_context(|| format!("{flag} {s:?} is not key=value"))?;
            if k.is_empty() {
                bail!("{flag} {s:?} has an empty key");
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}
