//! Why a pipeline cannot start or stopped: [`RuntimeError`].

/// A pipeline run that cannot start, or ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// A stage's plugin cannot be loaded or built.
    #[error("stage {stage}: {reason}")]
    Stage {
        /// Stage index.
        stage: usize,
        /// What is wrong.
        reason: String,
    },
    /// A topic the pipeline reads or writes does not exist.
    #[error("{0}")]
    Topic(String),
    /// The run stopped for good: a stage failed under policy "stop", or a plugin was
    /// quarantined. Nothing past the failure was committed.
    #[error("pipeline failed: {0}")]
    Failed(String),
    /// Something that may pass (state that did not arrive in time, a membership that changed
    /// under the instance): the instance gives up what it has not committed, leaves the
    /// group, and joins again.
    #[error("{0}")]
    Retry(String),
    /// The cluster failed a request (reading, writing or committing); the instance joins
    /// again and resumes from the last commit.
    #[error("{0}")]
    Client(#[from] quiver_client::ClientError),
}
