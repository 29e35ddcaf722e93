//! A broker started inside the bench process on a free loopback port.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use quiver_core::{Broker, BrokerConfig, BrokerHandle};

/// A running in-process broker and the temporary directory it may own.
pub struct EmbeddedBroker {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its CA file.
    pub ca: Option<PathBuf>,
    handle: BrokerHandle,
    _tmp: Option<tempfile::TempDir>,
}

impl EmbeddedBroker {
    /// Starts one in `data_dir`, or in a new temporary directory.
    pub async fn start(data_dir: Option<PathBuf>) -> anyhow::Result<EmbeddedBroker> {
        let (dir, tmp) = match data_dir {
            Some(d) => (d, None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("quiver-bench-")
                    .tempdir_in(std::env::current_dir().unwrap_or_else(|_| std::env::temp_dir()))
                    .or_else(|_| tempfile::tempdir())
                    .context("creating a temporary data directory")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let config = BrokerConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: dir,
            // The bench deletes what each measurement made (unless told to keep it).
            delete_topic_enable: true,
            ..BrokerConfig::default()
        };
        let handle = Broker::start(config)
            .await
            .context("starting the embedded broker")?;
        Ok(EmbeddedBroker {
            addr: handle.local_addr(),
            ca: handle.ca_path(),
            handle,
            _tmp: tmp,
        })
    }

    /// A client of this broker that reaches it in process, as its deployed pipelines do.
    pub async fn in_process_client(&self) -> anyhow::Result<quiver_client::Client> {
        quiver_client::Client::connect(self.handle.in_process_client_config())
            .await
            .context("connecting to the embedded broker in process")
    }

    /// Shuts it down.
    pub async fn stop(self) {
        self.handle.shutdown().await;
    }
}
