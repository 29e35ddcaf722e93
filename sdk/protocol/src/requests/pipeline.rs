//! Pipelines run inside brokers: DeployPipeline (a checked `pipeline.toml`, whose stages name
//! deployed plugins), ListPipelines, DescribePipeline (the status `quiver pipeline status`
//! prints) and StopPipeline. The file format itself belongs to `quiver-pipeline`; the broker
//! keeps the text as sent and hands it to its pipeline host.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Runs `instances` copies of a pipeline inside the broker, replacing a running pipeline of
/// the same name (its instances are rolled; offsets and state are kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployPipelineRequest {
    /// The pipeline file's text (TOML, the format of `config/pipeline.toml`). Stages name
    /// deployed plugins: the CLI deploys `path = …` bundles first and rewrites those stages.
    pub config_toml: String,
}

/// What the deploy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployPipelineResponse {
    /// The pipeline's name.
    pub name: String,
    /// Instances started.
    pub instances: u32,
    /// True when a pipeline of that name was running and has been replaced.
    pub replaced: bool,
}

impl Message for DeployPipelineRequest {
    const API: ApiKey = ApiKey::DeployPipeline;
    type Response = DeployPipelineResponse;
}

/// Lists deployed pipelines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPipelinesRequest {}

/// Every deployed pipeline's status, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListPipelinesResponse {
    /// One status per pipeline.
    pub pipelines: Vec<PipelineStatus>,
}

impl Message for ListPipelinesRequest {
    const API: ApiKey = ApiKey::ListPipelines;
    type Response = ListPipelinesResponse;
}

/// Asks for one pipeline's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribePipelineRequest {
    /// Pipeline name.
    pub name: String,
    /// Only the instances running in the broker asked (brokers of a cluster ask each other
    /// this way); false gives the whole pipeline, gathered from every live broker.
    pub local: bool,
}

/// One instance of a deployed pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineInstance {
    /// Instance id, `NAME-N`.
    pub id: String,
    /// The broker it runs in.
    pub broker: u32,
    /// Input partitions it owns now, as `topic/partition`.
    pub partitions: Vec<String>,
}

/// A pipeline's status (the fields of `quiver pipeline status --output json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineStatus {
    /// Pipeline name.
    pub name: String,
    /// `running`, `stopped`, `failed: <reason>` (a stage failed under policy "stop", or a
    /// plugin was quarantined), `degraded: <reason>` (in a cluster, a broker still runs
    /// the previous file because it cannot roll to the new one), or `retrying: <reason>`
    /// (an instance keeps failing, e.g. its output topic was deleted, and joins again
    /// after each failure).
    pub state: String,
    /// `at-least-once` or `exactly-once`.
    pub guarantee: String,
    /// Its consumer group.
    pub group: String,
    /// Running instances.
    pub instances: Vec<PipelineInstance>,
    /// Input records processed (their output acknowledged and their offsets committed):
    /// the group's count, committed with its offsets, as are the three counters below.
    pub records_in: u64,
    /// Records written to the sinks.
    pub records_out: u64,
    /// Input records per second over the last few seconds.
    pub records_per_sec_in: f64,
    /// Output records per second over the last few seconds.
    pub records_per_sec_out: f64,
    /// Records of the source topics not yet committed by the pipeline's group.
    pub lag: i64,
    /// Records a stage failed on (skipped, dead-lettered, or the one that stopped it).
    pub errors: u64,
    /// Records written to the dead-letter topic.
    pub dead_lettered: u64,
    /// Median end-to-end latency since the pipeline started here, ms: from an input
    /// record's timestamp to the commit of its output.
    pub latency_p50_ms: f64,
    /// 99th percentile of that latency, ms.
    pub latency_p99_ms: f64,
}

impl Message for DescribePipelineRequest {
    const API: ApiKey = ApiKey::DescribePipeline;
    type Response = PipelineStatus;
}

/// Stops every instance of a pipeline (each commits what it finished and leaves the group)
/// and forgets it: it does not come back when the broker restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopPipelineRequest {
    /// Pipeline name.
    pub name: String,
}

/// What the stop did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopPipelineResponse {
    /// Instances stopped.
    pub instances: u32,
}

impl Message for StopPipelineRequest {
    const API: ApiKey = ApiKey::StopPipeline;
    type Response = StopPipelineResponse;
}
