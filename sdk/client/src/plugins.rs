//! Plugins from the client's side: [`PluginAdmin`] deploys, lists, describes, removes and
//! downloads bundles; `TopicPartitioner` (cargo feature `plugins`) is a topic's partitioner
//! plugin, downloaded from the broker and run by the [`Producer`](crate::Producer) for
//! records without an explicit partition, so every producer (CLI or SDK) routes a record the
//! same way.
//!
//! Without the `plugins` feature this crate does not depend on the plugin host (wasmtime,
//! mlua): `PluginAdmin` still lists, describes and removes plugins and moves bundle archives
//! as bytes, and a producer sending a record without a partition to a topic that has a
//! partitioner fails with [`ClientError::PartitionerUnavailable`].

#[cfg(feature = "plugins")]
use std::path::Path;

use bytes::Bytes;
#[cfg(feature = "plugins")]
use quiver_plugins::Bundle;
use quiver_protocol::requests::{
    DeployPluginRequest, DeployPluginResponse, DescribePluginRequest, GetPluginRequest,
    ListPluginsRequest, PluginInfo, RemovePluginRequest, RemovePluginResponse,
};

#[cfg(feature = "plugins")]
use crate::ClientError;
use crate::{Client, Result};

/// Plugin administration over a [`Client`] (one request per call to the bootstrap broker).
///
/// ```no_run
/// # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
/// use quiver_client::PluginAdmin;
/// let plugins = PluginAdmin::new(client);
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
    ///
    /// ```no_run
    /// # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
    /// let plugins = quiver_client::PluginAdmin::new(client);
    /// let deployed = plugins.deploy_path("examples/plugins/grep").await?;
    /// println!("{}@{} ({})", deployed.plugin.name, deployed.plugin.version, deployed.plugin.digest);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "plugins")]
    pub async fn deploy_path(&self, path: impl AsRef<Path>) -> Result<DeployPluginResponse> {
        let path = path.as_ref().to_path_buf();
        let bundle = tokio::task::spawn_blocking(move || Bundle::load(&path))
            .await
            .map_err(|e| ClientError::Plugin(format!("bundle load task failed: {e}")))?
            .map_err(|e| ClientError::Plugin(e.to_string()))?;
        self.deploy(&bundle).await
    }

    /// Deploys a loaded bundle.
    #[cfg(feature = "plugins")]
    #[tracing::instrument(skip_all, fields(plugin = %bundle.id()))]
    pub async fn deploy(&self, bundle: &Bundle) -> Result<DeployPluginResponse> {
        let archive = bundle
            .to_archive_bytes()
            .map_err(|e| ClientError::Plugin(e.to_string()))?;
        self.deploy_archive(Bytes::from(archive)).await
    }

    /// Deploys a bundle archive (`.tar.gz` bytes) as it is; the broker validates it.
    pub async fn deploy_archive(&self, archive: Bytes) -> Result<DeployPluginResponse> {
        let (resp, _) = self
            .client
            .request(&DeployPluginRequest {}, archive)
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

    /// Downloads a deployed bundle's archive as stored by the broker. The content is not
    /// checked against the digest here (that needs the `plugins` feature: see `get`).
    pub async fn get_archive(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(PluginInfo, Bytes)> {
        let req = GetPluginRequest {
            name: name.to_string(),
            version: version.map(str::to_string),
        };
        let (resp, archive) = self.client.request(&req, Bytes::new()).await?;
        Ok((resp.plugin, archive))
    }

    /// Downloads a deployed bundle and checks that its content matches the stored digest.
    #[cfg(feature = "plugins")]
    pub async fn get(&self, name: &str, version: Option<&str>) -> Result<(PluginInfo, Bundle)> {
        let (info, archive) = self.get_archive(name, version).await?;
        let id = info.id();
        // Unpacking and hashing a bundle (up to the broker's bundle limit) is CPU work.
        let bundle = tokio::task::spawn_blocking(move || Bundle::from_archive_bytes(&archive))
            .await
            .map_err(|e| ClientError::Plugin(format!("{id}: bundle unpack task failed: {e}")))?
            .map_err(|e| ClientError::Plugin(format!("{}: {e}", info.id())))?;
        if bundle.digest() != info.digest {
            return Err(ClientError::Plugin(format!(
                "{}: downloaded bundle does not match its digest {}",
                info.id(),
                info.digest
            )));
        }
        Ok((info, bundle))
    }
}

#[cfg(feature = "plugins")]
pub use partitioner::TopicPartitioner;

#[cfg(feature = "plugins")]
mod partitioner {
    use std::sync::mpsc;
    use std::sync::Arc;

    use bytes::Bytes;
    use quiver_plugins::{Bundle, PluginConfig};
    use tokio::sync::oneshot;

    use super::PluginAdmin;
    use crate::{Client, ClientError, Result};

    /// Records to route: (key, value) pairs of one topic.
    type Records = Vec<(Option<Bytes>, Bytes)>;

    /// One call to the plugin thread: route `records` (stopping at the first failure).
    struct Job {
        topic: Arc<str>,
        records: Records,
        partitions: u32,
        reply: oneshot::Sender<(Vec<u32>, Option<ClientError>)>,
    }

    /// A topic's partitioner plugin, run by the producer for records without a partition.
    ///
    /// The plugin instance lives on a thread of its own (named
    /// `quiver-partitioner-NAME@VERSION`): it is built there and every call runs there, so
    /// a plugin call never occupies an async runtime worker. Callers await the answer.
    pub struct TopicPartitioner {
        id: String,
        jobs: mpsc::Sender<Job>,
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
            Self::from_bundle(id, bundle).await
        }

        /// Builds `bundle` as the partitioner `id` on its own thread.
        pub async fn from_bundle(id: &str, bundle: Bundle) -> Result<TopicPartitioner> {
            let (jobs, rx) = mpsc::channel::<Job>();
            let (ready_tx, ready) = oneshot::channel::<Result<(), String>>();
            let thread_id = id.to_string();
            std::thread::Builder::new()
                .name(format!("quiver-partitioner-{id}"))
                .spawn(move || run(thread_id, bundle, rx, ready_tx))
                .map_err(|e| ClientError::Plugin(format!("{id}: cannot start its thread: {e}")))?;
            ready
                .await
                .map_err(|_| {
                    ClientError::Plugin(format!("{id}: its thread stopped while building"))
                })?
                .map_err(ClientError::Plugin)?;
            Ok(TopicPartitioner {
                id: id.to_string(),
                jobs,
            })
        }

        /// `name@version`.
        pub fn id(&self) -> &str {
            &self.id
        }

        /// The partition for a record; a plugin error (or an out-of-range answer) is an
        /// error, never a silent fallback. The key and value are copied to the plugin's
        /// thread.
        pub async fn partition(
            &self,
            topic: &str,
            key: Option<&[u8]>,
            value: &[u8],
            partitions: u32,
        ) -> Result<u32> {
            let records = vec![(
                key.map(Bytes::copy_from_slice),
                Bytes::copy_from_slice(value),
            )];
            let (mut got, err) = self.partition_many(topic, records, partitions).await;
            match (got.pop(), err) {
                (_, Some(e)) => Err(e),
                (Some(p), None) => Ok(p),
                (None, None) => Err(ClientError::Plugin(format!(
                    "topic {topic}: partitioner {} gave no answer",
                    self.id
                ))),
            }
        }

        /// Partitions for many records in one hop to the plugin thread: the partitions of
        /// the records before the first failure, and that failure.
        pub(crate) async fn partition_many(
            &self,
            topic: &str,
            records: Records,
            partitions: u32,
        ) -> (Vec<u32>, Option<ClientError>) {
            let (reply, answer) = oneshot::channel();
            let job = Job {
                topic: Arc::from(topic),
                records,
                partitions,
                reply,
            };
            let stopped = || {
                ClientError::Plugin(format!(
                    "topic {topic}: the thread of partitioner {} stopped",
                    self.id
                ))
            };
            if self.jobs.send(job).is_err() {
                return (Vec::new(), Some(stopped()));
            }
            answer
                .await
                .unwrap_or_else(|_| (Vec::new(), Some(stopped())))
        }
    }

    /// The plugin thread: builds the instance, then answers jobs until every sender is gone.
    fn run(
        id: String,
        bundle: Bundle,
        jobs: mpsc::Receiver<Job>,
        ready: oneshot::Sender<Result<(), String>>,
    ) {
        let mut instance = match PluginConfig::new(bundle).build_partitioner() {
            Ok(i) => {
                let _ = ready.send(Ok(()));
                i
            }
            Err(e) => {
                let _ = ready.send(Err(format!("{id}: {e}")));
                return;
            }
        };
        while let Ok(job) = jobs.recv() {
            let mut out = Vec::with_capacity(job.records.len());
            let mut failed = None;
            for (key, value) in &job.records {
                match instance.partition(key.as_deref(), value, job.partitions) {
                    Ok(n) if n < job.partitions => out.push(n),
                    Ok(n) => {
                        failed = Some(ClientError::Plugin(format!(
                            "topic {}: partitioner {id} returned partition {n}, but the topic has {}",
                            job.topic, job.partitions
                        )));
                        break;
                    }
                    Err(e) => {
                        failed = Some(ClientError::Plugin(format!("topic {}: {e}", job.topic)));
                        break;
                    }
                }
            }
            let _ = job.reply.send((out, failed));
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn lua_bundle(script: &str) -> Bundle {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("plugin.toml"),
                "name = \"t\"\nversion = \"1.0.0\"\nkind = \"partitioner\"\nruntime = \"lua\"\nentry = \"p.lua\"\n",
            )
            .unwrap();
            std::fs::write(dir.path().join("p.lua"), script).unwrap();
            Bundle::load(dir.path()).unwrap()
        }

        #[tokio::test(flavor = "current_thread")]
        async fn partitioner_answers_are_checked() {
            let b =
                lua_bundle("function partition(key, value, n)\n  return #value % (n + 1)\nend\n");
            let p = TopicPartitioner::from_bundle("t@1.0.0", b).await.unwrap();
            assert_eq!(p.id(), "t@1.0.0");
            assert_eq!(p.partition("t", None, b"ab", 4).await.unwrap(), 2);
            let e = p.partition("t", None, b"abcd", 4).await.unwrap_err();
            assert!(matches!(e, ClientError::Plugin(_)));
            // (The plugin host checks the range too; either message names the answer.)
            assert!(e.to_string().contains("partition 4"), "{e}");
            // Many at once: the answers before the first failure, and the failure.
            let records = (0..6)
                .map(|i| (None, Bytes::from(vec![b'x'; i])))
                .collect::<Vec<_>>();
            let (got, err) = p.partition_many("t", records, 3).await;
            assert_eq!(got, vec![0, 1, 2]);
            assert!(err.is_some_and(|e| e.to_string().contains("partition 3")));
        }

        #[tokio::test(flavor = "current_thread")]
        async fn plugin_calls_leave_the_runtime_thread_free() {
            // A single-threaded runtime: if the plugin ran on the runtime thread, the ticker
            // task below could not run until the call returned (there would be no await
            // point), so it would have counted nothing during the call.
            let b = lua_bundle(
                "function partition(key, value, n)\n  local x = 0\n  for i = 1, 2000 do x = x + i end\n  return x % n\nend\n",
            );
            let p = TopicPartitioner::from_bundle("t@1.0.0", b).await.unwrap();
            let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let ticker = {
                let (ticks, stop) = (ticks.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                })
            };
            let records = (0..20_000)
                .map(|_| (None, Bytes::from_static(b"v")))
                .collect::<Vec<_>>();
            let (got, err) = p.partition_many("t", records, 7).await;
            let during = ticks.load(std::sync::atomic::Ordering::Relaxed);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            ticker.await.unwrap();
            assert!(err.is_none(), "{err:?}");
            assert_eq!(got.len(), 20_000);
            assert!(got.iter().all(|&n| n == (2000 * 2001 / 2) % 7));
            assert!(
                during > 0,
                "the runtime thread was blocked during the plugin call"
            );
        }
    }
}
