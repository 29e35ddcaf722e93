//! Where deployed pipelines run: the broker answers DeployPipeline, ListPipelines,
//! DescribePipeline and StopPipeline by asking its [`PipelineHost`]. The host (in the
//! `quiver-pipeline` crate, installed by the `quiver broker start` binary) runs the
//! pipeline's instances as clients of this broker and keeps the deployed files across
//! restarts; the broker itself knows nothing of stages or plugins. A broker without a host
//! (embedded in a test) answers `PipelinesUnavailable`.

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
