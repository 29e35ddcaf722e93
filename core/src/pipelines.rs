//! Where deployed pipelines run: the broker answers DeployPipeline, ListPipelines,
//! DescribePipeline and StopPipeline by asking its [`PipelineHost`]. The host (in the
//! `quiver-pipeline` crate, installed by the `quiver broker start` binary) runs the
//! pipeline's instances as clients of this broker; the broker itself knows nothing of stages
//! or plugins. A broker without a host (embedded in a test) answers `PipelinesUnavailable`.
//!
//! A lone broker's host keeps the deployed files itself. In a cluster the controller holds
//! every deployed pipeline ([`crate::cluster::PipelineRecord`]): the broker that takes a
//! deploy has its host [`check`](PipelineHost::check) the file and proposes it, and every
//! broker's replica manager tells its host which instances it runs
//! ([`assign`](PipelineHost::assign)), so the instances spread over the live brokers and
//! move when one is fenced.

use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use quiver_protocol::requests::{DeployPipelineResponse, PipelineStatus, StopPipelineResponse};
use quiver_protocol::ErrorCode;

/// Why the host refused or failed a pipeline request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PipelineHostError {
    /// Wire code (`PipelineNotFound`, `InvalidPipeline`, …).
    pub code: ErrorCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl PipelineHostError {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        PipelineHostError {
            code,
            message: message.into(),
        }
    }

    /// Its wire code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
}

/// Result of a host call.
pub type HostResult<T> = Result<T, PipelineHostError>;

/// A pipeline file the host checked for a cluster deploy: what the controller keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPipeline {
    /// The pipeline's name.
    pub name: String,
    /// Instances it runs across the cluster.
    pub instances: u32,
    /// Deployed plugins (`name@version`) its stages use.
    pub plugins: Vec<String>,
}

/// A pipeline the controller holds, and which of its instances this broker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedPipeline {
    /// The pipeline's name.
    pub name: String,
    /// Its file's text, as deployed.
    pub config_toml: String,
    /// Instance numbers (1-based, unique in the cluster) this broker runs; may be empty.
    pub instances: Vec<u32>,
    /// The number of the pipeline's latest deploy: when it changes, a broker starts its
    /// part of the pipeline again if it failed.
    pub deploy_number: u64,
}

/// Runs deployed pipelines for a broker.
pub trait PipelineHost: Send + Sync {
    /// Starts (or replaces) the pipeline described by `config_toml`.
    fn deploy(&self, config_toml: String) -> BoxFuture<'_, HostResult<DeployPipelineResponse>>;
    /// Every deployed pipeline's status, sorted by name.
    fn list(&self) -> BoxFuture<'_, HostResult<Vec<PipelineStatus>>>;
    /// One pipeline's status.
    fn status(&self, name: String) -> BoxFuture<'_, HostResult<PipelineStatus>>;
    /// Stops and forgets a pipeline.
    fn stop(&self, name: String) -> BoxFuture<'_, HostResult<StopPipelineResponse>>;
    /// Cluster deploy: checks `config_toml` as [`deploy`](Self::deploy) would (the file,
    /// its topics, its stages' plugins) without starting anything.
    /// `running` holds the files the cluster runs now, by pipeline name: a new file that
    /// would give a stage's state to another plugin than the running file's is refused.
    fn check(
        &self,
        config_toml: String,
        running: std::collections::BTreeMap<String, String>,
    ) -> BoxFuture<'_, HostResult<CheckedPipeline>>;
    /// Cluster mode: every pipeline the controller holds, with this broker's instances of
    /// each. The host starts, rolls (a changed file), resizes and stops its own instances
    /// to match, in the background; only the latest call counts. From the first call on,
    /// [`list`](Self::list) and [`status`](Self::status) describe this broker's part.
    fn assign(&self, pipelines: Vec<AssignedPipeline>);
    /// The plugins (`name@version`) the pipelines running here load, each with the
    /// pipeline's name: a lone broker refuses to remove those.
    fn plugins_in_use(&self) -> BoxFuture<'_, Vec<(String, String)>>;
}

/// The host slot shared by the broker's handle (which installs it once the broker listens)
/// and the request handlers (which use it).
#[derive(Default, Clone)]
pub struct PipelineSlot(Arc<OnceLock<Arc<dyn PipelineHost>>>);

impl PipelineSlot {
    /// Installs the host; false when one was installed already.
    pub fn install(&self, host: Arc<dyn PipelineHost>) -> bool {
        self.0.set(host).is_ok()
    }

    /// The host, or `PipelinesUnavailable`.
    pub fn host(&self) -> HostResult<Arc<dyn PipelineHost>> {
        self.0.get().cloned().ok_or_else(|| {
            PipelineHostError::new(
                ErrorCode::PipelinesUnavailable,
                "this broker does not run deployed pipelines (it was started without a pipeline host); run the pipeline with `quiver pipeline run FILE` instead, or start the broker with `quiver broker start`",
            )
        })
    }
}
