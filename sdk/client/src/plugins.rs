//! Plugins from the client's side: [`PluginAdmin`] deploys, lists, describes, removes and
//! downloads bundles; [`TopicPartitioner`] is a topic's partitioner plugin, downloaded from
//! the broker and run in-process by the [`Producer`](crate::Producer) for records without
//! an explicit partition, so every producer (CLI or SDK) routes a record the same way.

use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use quiver_plugins::{Bundle, PluginConfig};
use quiver_protocol::requests::{
    DeployPluginRequest, DeployPluginResponse, DescribePluginRequest, GetPluginRequest,
    ListPluginsRequest, PluginInfo, RemovePluginRequest, RemovePluginResponse,
};

use crate::{Client, ClientError, Result};

/// Plugin administration over a [`Client`] (one request per call to the bootstrap broker).
///
/// ```no_run
/// # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
/// use quiver_client::PluginAdmin;
/// let plugins = PluginAdmin::new(client);
/// let deployed = plugins.deploy_path("examples/plugins/grep").await?;
/// println!("{}@{} ({})", deployed.plugin.name, deployed.plugin.version, deployed.plugin.digest);
/// for p in plugins.list().await? {
///     println!("{} {}", p.id(), p.kind);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PluginAdmin {
    client: Client,
}

impl PluginAdmin {
    /// Plugin administration over `client`.
    pub fn new(client: Client) -> Self {
        PluginAdmin { client }
    }

    /// Loads the bundle at `path` (folder or `.tar.gz`), validates it locally, and deploys it.
    pub async fn deploy_path(&self, path: impl AsRef<Path>) -> Result<DeployPluginResponse> {
        let bundle = Bundle::load(path.as_ref()).map_err(|e| ClientError::Plugin(e.to_string()))?;
        self.deploy(&bundle).await
    }

    /// Deploys a loaded bundle.
    #[tracing::instrument(skip_all, fields(plugin = %bundle.id()))]
    pub async fn deploy(&self, bundle: &Bundle) -> Result<DeployPluginResponse> {
        let archive = bundle
            .to_archive_bytes()
            .map_err(|e| ClientError::Plugin(e.to_string()))?;
        let (resp, _) = self
            .client
            .request(&DeployPluginRequest {}, Bytes::from(archive))
            .await?;
        Ok(resp)
    }

    /// Every deployed plugin.
    pub async fn list(&self) -> Result<Vec<PluginInfo>> {
        let (resp, _) = self
            .client
            .request(&ListPluginsRequest {}, Bytes::new())
            .await?;
        Ok(resp.plugins)
    }

    /// `name@version`, or the highest version of `name` when `version` is `None`.
    pub async fn describe(&self, name: &str, version: Option<&str>) -> Result<PluginInfo> {
        let req = DescribePluginRequest {
            name: name.to_string(),
            version: version.map(str::to_string),
        };
        let (resp, _) = self.client.request(&req, Bytes::new()).await?;
        Ok(resp.plugin)
    }

    /// Removes `name@version` (refused while in use).
    pub async fn remove(&self, name: &str, version: &str) -> Result<RemovePluginResponse> {
        let req = RemovePluginRequest {
            name: name.to_string(),
            version: version.to_string(),
        };
        let (resp, _) = self.client.request(&req, Bytes::new()).await?;
        Ok(resp)
    }

    /// Downloads a deployed bundle and checks that its content matches the stored digest.
    pub async fn get(&self, name: &str, version: Option<&str>) -> Result<(PluginInfo, Bundle)> {
        let req = GetPluginRequest {
            name: name.to_string(),
            version: version.map(str::to_string),
        };
        let (resp, archive) = self.client.request(&req, Bytes::new()).await?;
        let bundle = Bundle::from_archive_bytes(&archive)
            .map_err(|e| ClientError::Plugin(format!("{}: {e}", resp.plugin.id())))?;
        if bundle.digest() != resp.plugin.digest {
            return Err(ClientError::Plugin(format!(
                "{}: downloaded bundle does not match its digest {}",
                resp.plugin.id(),
                resp.plugin.digest
            )));
        }
        Ok((resp.plugin, bundle))
    }
}

/// A topic's partitioner plugin, run by the producer for records without a partition.
pub struct TopicPartitioner {
    id: String,
    instance: Mutex<Box<dyn quiver_plugins::Partitioner>>,
}

impl std::fmt::Debug for TopicPartitioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicPartitioner")
            .field("id", &self.id)
            .finish()
    }
}

impl TopicPartitioner {
    /// Downloads `id` (`name@version`) and builds it.
    pub async fn load(client: &Client, id: &str) -> Result<TopicPartitioner> {
        let (name, version) = id.split_once('@').ok_or_else(|| {
            ClientError::Plugin(format!("partitioner {id:?} is not NAME@VERSION"))
        })?;
        let (_, bundle) = PluginAdmin::new(client.clone())
            .get(name, Some(version))
            .await?;
        let instance =
            tokio::task::spawn_blocking(move || PluginConfig::new(bundle).build_partitioner())
                .await
                .map_err(|e| ClientError::Plugin(format!("{id}: build task failed: {e}")))?
                .map_err(|e| ClientError::Plugin(e.to_string()))?;
        Ok(TopicPartitioner {
            id: id.to_string(),
            instance: Mutex::new(instance),
        })
    }

    /// `name@version`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The partition for a record; a plugin error (or an out-of-range answer) is an error,
    /// never a silent fallback.
    pub fn partition(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        partitions: u32,
    ) -> Result<u32> {
        let mut p = self.instance.lock().unwrap_or_else(|p| p.into_inner());
        let n = p
            .partition(key, value, partitions)
            .map_err(|e| ClientError::Plugin(format!("topic {topic}: {e}")))?;
        if n >= partitions {
            return Err(ClientError::Plugin(format!(
                "topic {topic}: partitioner {} returned partition {n}, but the topic has {partitions}",
                self.id
            )));
        }
        Ok(n)
    }
}
