//! quiver-pipeline: processing described in a `pipeline.toml` — source topics → a chain of
//! plugin stages → sink topics, run by the members of one consumer group.
//!
//! - [`config`]: the file format, its defaults and validation (errors name file, line, key).
//!
//! The runtime (stage instances per input partition, keyed state, the delivery guarantees)
//! comes next and will live here too, shared by `quiver pipeline run` (in the CLI process)
//! and `quiver pipeline deploy` (inside brokers).

pub mod config;

pub use config::{
    ErrorPolicy, Guarantee, OnError, PipelineConfig, PipelineConfigError, RunConfig, SinkConfig,
    SourceConfig, StageConfig, StagePlugin, StartPosition,
};
