//! quiver-pipeline: processing described in a `pipeline.toml` — source topics → a chain of
//! plugin stages → sink topics, run by the members of one consumer group.
//!
//! - [`config`]: the file format, its defaults and validation (errors name file, line, key);
//! - [`stages`]: loading the stages' plugins and the per-partition stage chain, with the
//!   error policy (skip, dead-letter, stop);
//! - [`instance`]: one group member's read → process → write → commit loop (at-least-once);
//! - [`deployment`]: instances running in this process, supervised, with their status;
//! - [`host`]: the broker's pipeline host (`pipeline deploy`), persisted across restarts;
//! - [`metrics`]: the rates and latencies `pipeline status` shows, and each process's counters;
//! - [`progress`]: the counters (and state marks) committed with each input offset.
//!
//! `quiver pipeline run` (in the CLI process) and `quiver pipeline deploy` (inside brokers)
//! share the same [`Deployment`].

pub mod changelog;
pub mod config;
pub mod deployment;
pub mod error;
pub mod fault;
pub mod host;
pub mod instance;
pub mod metrics;
pub mod progress;
pub mod stages;
#[cfg(test)]
mod test_broker;
pub mod writer;

pub use config::{
    ErrorPolicy, Guarantee, OnError, PipelineConfig, PipelineConfigError, RunConfig,
    SinkCompression, SinkConfig, SourceConfig, StageConfig, StagePlugin, StartPosition,
    MAX_INSTANCES,
};
pub use deployment::Deployment;
pub use error::RuntimeError;
pub use host::BrokerPipelines;
