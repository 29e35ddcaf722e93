//! Connections from this broker to its peers' client endpoints (ALPN `quiver/1`), made with
//! the SDK's client and this broker's certificate, so the peer knows a broker is asking.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use quiver_client::{Client, ClientConfig, ClientIdentity};

use crate::cluster::BrokerId;

/// One client per peer broker, made on first use and replaced when its address changes.
pub struct PeerClients {
    endpoint: quinn::Endpoint,
    ca: PathBuf,
    identity: ClientIdentity,
    clients: Mutex<HashMap<BrokerId, (String, Client)>>,
}

impl PeerClients {
    /// Peers trusted through the cluster CA `ca`, reached from the broker's own `endpoint`
    /// (so its peers see one address per broker) with this broker's certificate.
    pub fn new(endpoint: quinn::Endpoint, ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        PeerClients {
            endpoint,
            ca,
            identity: ClientIdentity {
                cert_file: cert,
                key_file: key,
            },
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A client of broker `id` at `addr`.
    pub async fn get(
        &self,
        id: BrokerId,
        addr: &str,
    ) -> Result<Client, quiver_client::ClientError> {
        if let Some((a, c)) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            if a == addr {
                return Ok(c.clone());
            }
        }
        let client = Client::connect_with(
            ClientConfig {
                ca_file: Some(self.ca.clone()),
                identity: Some(self.identity.clone()),
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(5),
                ..ClientConfig::new(addr)
            },
            Some(self.endpoint.clone()),
        )
        .await?;
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (addr.to_string(), client.clone()));
        Ok(client)
    }

    /// Drops the client of `id` (its broker restarted or moved).
    pub fn forget(&self, id: BrokerId) {
        if let Some((_, c)) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
        {
            c.close();
        }
    }
}
