//! One pipeline instance: a member of the pipeline's consumer group that reads its assigned
//! input partitions, runs each partition's records through that partition's stage chain (on
//! a blocking thread), writes the output to the sinks and the failed records to the
//! dead-letter topic, waits until every write is acknowledged (acks=all), and only then
//! commits the input offsets: at-least-once. Nothing of a poll is committed unless all of
//! its writes were acknowledged; a failure makes the instance join again and resume from
//! the last commit.
//!
//! Each input partition's stages keep keyed state that is written to the pipeline's changelog
//! with the output and restored by the partition's next owner (see [`crate::changelog`]); the
//! committed offset carries where that state is.
//!
//! Output records carry `quiver.source` = `topic/partition/offset` of their input record. A
//! stage routes a record to a named output of `[sinks]` with the header `quiver.sink = NAME`
//! (removed before writing). Dead letters carry `quiver.error`, `quiver.stage` and
//! `quiver.source`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quiver_client::{
    Acks, AutoOffsetReset, Client, ConsumedRecord, DeliveryFuture, GroupConfig, GroupConsumer,
    Producer, ProducerConfig, ProducerRecord, TopicPartition,
};
use quiver_plugins::{HostLimits, Record};
use tokio::sync::watch;

use crate::changelog::{ensure_changelog, PartitionState};
use crate::error::RuntimeError;
use crate::metrics::PipelineMetrics;
use crate::stages::{ChainOutput, LoadedStage, PartitionChain};
use crate::{ErrorPolicy, PipelineConfig, StartPosition};

/// Header naming an output record's input: `topic/partition/offset`.
pub const SOURCE_HEADER: &str = "quiver.source";
/// Header a stage sets to route a record to a named output of `[sinks]`.
pub const SINK_HEADER: &str = "quiver.sink";
/// Header of a dead letter: the stage's error.
pub const ERROR_HEADER: &str = "quiver.error";
/// Header of a dead letter: `INDEX:name@version` of the stage that failed.
pub const STAGE_HEADER: &str = "quiver.stage";

/// Everything an instance needs to run: the checked file and its loaded stages.
pub struct Plan {
    /// The pipeline.
    pub config: PipelineConfig,
    /// Its stages, in order.
    pub stages: Vec<LoadedStage>,
    /// Limits of every plugin call.
    pub limits: HostLimits,
}

/// What an instance shows in `pipeline status`.
#[derive(Debug, Default)]
pub struct InstanceView {
    /// Input partitions owned now, `topic/partition`.
    pub partitions: Mutex<Vec<String>>,
}

impl InstanceView {
    fn set(&self, owned: &[TopicPartition]) {
        let list = owned
            .iter()
            .map(|tp| format!("{}/{}", tp.topic, tp.partition))
            .collect();
        *self.partitions.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }

    /// The partitions owned now.
    pub fn partitions(&self) -> Vec<String> {
        self.partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What one instance runs with.
#[derive(Clone)]
pub struct InstanceParts {
    /// The connection to the cluster.
    pub client: Client,
    /// The pipeline.
    pub plan: Arc<Plan>,
    /// Instance id, `NAME-N`.
    pub id: String,
    /// What the status shows of it.
    pub view: Arc<InstanceView>,
    /// The pipeline's counters.
    pub metrics: Arc<PipelineMetrics>,
}

/// When an instance must stop: the whole pipeline stops (or failed), or just this instance
/// (a rolling redeploy).
#[derive(Clone)]
pub struct StopSignal {
    all: watch::Receiver<bool>,
    one: watch::Receiver<bool>,
}

impl StopSignal {
    /// A signal set when either channel turns true.
    pub fn new(all: watch::Receiver<bool>, one: watch::Receiver<bool>) -> Self {
        StopSignal { all, one }
    }

    /// True once either was set.
    pub fn is_set(&self) -> bool {
        *self.all.borrow() || *self.one.borrow()
    }

    /// Waits until either is set (or its sender is gone).
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.all.wait_for(|s| *s) => {}
            _ = self.one.wait_for(|s| *s) => {}
        }
    }
}

/// Runs one instance until `stop` turns true (then it commits what is done and leaves the
/// group) or the pipeline fails (`RuntimeError::Failed`). Other errors mean "join again".
pub async fn run_instance(parts: &InstanceParts, mut stop: StopSignal) -> Result<(), RuntimeError> {
    let InstanceParts {
        client,
        plan,
        id: instance_id,
        view,
        metrics,
    } = parts;
    let client = client.clone();
    let cfg = &plan.config;
    let mut group = GroupConfig::new(cfg.group(), cfg.source.topics.iter().cloned())
        .start_without_commit_at(match cfg.source.start {
            StartPosition::Earliest => AutoOffsetReset::Earliest,
            StartPosition::Latest => AutoOffsetReset::Latest,
        });
    group.client_id = format!("pipeline {instance_id}");
    group.commit_on_revoke = true;
    let mut member = GroupConsumer::join(client.clone(), group).await?;
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(2),
            ..ProducerConfig::default()
        },
    );
    let changelog = if plan.stages.is_empty() {
        None
    } else {
        let mut most = 1;
        for t in &cfg.source.topics {
            most = most.max(client.partition_count(t).await?);
        }
        Some(ensure_changelog(&client, &cfg.name, most).await?)
    };
    let mut chains: BTreeMap<TopicPartition, PartitionRun> = BTreeMap::new();
    let result = loop {
        if stop.is_set() {
            break Ok(());
        }
        let polled = tokio::select! {
            r = member.poll_timeout(Duration::from_millis(500)) => r,
            _ = stop.wait() => break Ok(()),
        };
        let records = match polled {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let owned = member.assignment();
        view.set(&owned);
        if let Err(e) = sync_chains(
            plan,
            &client,
            &producer,
            changelog,
            &mut member,
            &mut chains,
        )
        .await
        {
            break Err(e);
        }
        if records.is_empty() {
            if let Err(e) = keep_snapshots_fresh(&producer, &mut member, &mut chains).await {
                break Err(e);
            }
            continue;
        }
        let firsts = first_offsets(&records);
        let done = match process_poll(plan, &producer, &mut chains, records).await {
            Ok((counts, written)) => note_state(&producer, &mut member, &mut chains, written)
                .await
                .map(|()| counts),
            Err(e) => Err(e),
        };
        match done {
            Ok(counts) => {
                if let Err(e) = member.commit().await {
                    break Err(e.into());
                }
                metrics.record_batch(counts.input, counts.output, counts.errors, counts.dead);
            }
            Err(e) => {
                // Nothing of this poll counts as done: the next commit (at close, or by
                // whoever owns these partitions next) starts from its first records.
                for (tp, first) in firsts {
                    member.rewind(&tp.topic, tp.partition, first);
                }
                break Err(e);
            }
        }
    };
    let _ = producer.flush().await;
    match &result {
        Err(RuntimeError::Client(_)) => {} // the connection or the membership is gone
        _ => {
            if let Err(e) = member.close().await {
                tracing::warn!(instance = %instance_id, error = %e, "leaving the group failed");
            }
        }
    }
    view.set(&[]);
    result
}

/// The stages of one owned input partition and their state.
struct PartitionRun {
    chain: PartitionChain,
    /// `None` for a pipeline without stages (nothing to keep).
    state: Option<PartitionState>,
}

/// Builds the stages of newly owned partitions (restoring their state from the changelog
/// position their committed offset names) and drops those of partitions given away.
async fn sync_chains(
    plan: &Plan,
    client: &Client,
    producer: &Producer,
    changelog: Option<u32>,
    member: &mut GroupConsumer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
) -> Result<(), RuntimeError> {
    let owned = member.assignment();
    let now: BTreeSet<&TopicPartition> = owned.iter().collect();
    chains.retain(|tp, _| now.contains(tp));
    for tp in &owned {
        if chains.contains_key(tp) {
            continue;
        }
        let (stores, state) = match changelog {
            Some(partitions) => {
                let meta = member.committed_metadata(&tp.topic, tp.partition);
                let state = PartitionState::restore(
                    client,
                    producer,
                    &plan.config.name,
                    plan.stages.len(),
                    tp,
                    partitions,
                    meta.as_deref(),
                )
                .await?;
                member.set_commit_metadata(&tp.topic, tp.partition, state.metadata());
                (state.stores.clone(), Some(state))
            }
            None => (Vec::new(), None),
        };
        let chain = PartitionChain::build(
            &plan.stages,
            &stores,
            &plan.limits,
            plan.config.on_error.policy,
        )
        .map_err(|e| RuntimeError::Failed(format!("cannot build the stages: {e}")))?;
        chains.insert(tp.clone(), PartitionRun { chain, state });
    }
    Ok(())
}

/// After a poll's writes were acknowledged: records where each partition's state now ends
/// (re-snapshotting where due) in the metadata of the coming commit.
async fn note_state(
    producer: &Producer,
    member: &mut GroupConsumer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
    written: Vec<(TopicPartition, Option<i64>)>,
) -> Result<(), RuntimeError> {
    for (tp, last) in written {
        if let Some(state) = chains.get_mut(&tp).and_then(|r| r.state.as_mut()) {
            state.written(last, producer).await?;
            member.set_commit_metadata(&tp.topic, tp.partition, state.metadata());
        }
    }
    Ok(())
}

/// On an idle poll: snapshots that grew old are rewritten, so retention never reaches the
/// one a commit points at.
async fn keep_snapshots_fresh(
    producer: &Producer,
    member: &mut GroupConsumer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
) -> Result<(), RuntimeError> {
    let all: Vec<(TopicPartition, Option<i64>)> =
        chains.keys().map(|tp| (tp.clone(), None)).collect();
    note_state(producer, member, chains, all).await
}

fn first_offsets(records: &[ConsumedRecord]) -> BTreeMap<TopicPartition, i64> {
    let mut firsts = BTreeMap::new();
    for r in records {
        firsts
            .entry(TopicPartition::new(r.topic.to_string(), r.partition))
            .or_insert(r.offset);
    }
    firsts
}

/// Records of one poll, counted once all their writes were acknowledged.
#[derive(Debug, Default)]
struct PollCounts {
    input: u64,
    output: u64,
    errors: u64,
    dead: u64,
}

/// Runs one poll's records through their partitions' chains, writes the results and waits
/// for every acknowledgement.
/// Returns the counts and, per partition, the changelog offset of its last state change.
async fn process_poll(
    plan: &Arc<Plan>,
    producer: &Producer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
    records: Vec<ConsumedRecord>,
) -> Result<(PollCounts, Vec<(TopicPartition, Option<i64>)>), RuntimeError> {
    let mut counts = PollCounts {
        input: records.len() as u64,
        ..PollCounts::default()
    };
    let mut by_partition: BTreeMap<TopicPartition, Vec<Record>> = BTreeMap::new();
    for r in records {
        by_partition
            .entry(TopicPartition::new(r.topic.to_string(), r.partition))
            .or_default()
            .push(to_plugin_record(r));
    }
    // Plugin calls block: move the chains that have work to a blocking thread and back.
    let mut work: Vec<(TopicPartition, PartitionRun, Vec<Record>)> = Vec::new();
    for (tp, recs) in by_partition {
        let chain = chains.remove(&tp).ok_or_else(|| {
            RuntimeError::Failed(format!("no stages for {}/{}", tp.topic, tp.partition))
        })?;
        work.push((tp, chain, recs));
    }
    let done = tokio::task::spawn_blocking(move || {
        work.into_iter()
            .map(|(tp, mut run, recs)| {
                let range = (
                    recs.first().map_or(0, |r| r.offset),
                    recs.last().map_or(0, |r| r.offset),
                );
                let out = run.chain.process(recs);
                (tp, run, range, out)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| RuntimeError::Failed(format!("stage task failed: {e}")))?;
    let mut deliveries: Vec<DeliveryFuture> = Vec::new();
    let mut fatal = None;
    let mut outputs = Vec::new();
    for (tp, run, range, out) in done {
        chains.insert(tp.clone(), run);
        if let Some(f) = &out.fatal {
            fatal.get_or_insert_with(|| format!("{}/{}: {f}", tp.topic, tp.partition));
        }
        outputs.push((tp, range, out));
    }
    if let Some(f) = fatal {
        return Err(RuntimeError::Failed(f));
    }
    let cfg = &plan.config;
    let mut state_writes: Vec<(TopicPartition, Vec<DeliveryFuture>)> = Vec::new();
    for (tp, range, out) in outputs {
        if let Some(state) = chains.get_mut(&tp).and_then(|r| r.state.as_mut()) {
            state_writes.push((tp.clone(), state.send_changes(producer).await?));
        }
        let ChainOutput {
            records, failed, ..
        } = out;
        for r in records {
            let source = source_of(&tp, r.offset.clamp(range.0, range.1));
            let record = to_output(r, &source, cfg)?;
            counts.output += 1;
            deliveries.push(producer.send(record).await?);
        }
        for f in failed {
            counts.errors += 1;
            if cfg.on_error.policy != ErrorPolicy::DeadLetter {
                tracing::debug!(stage = %f.stage_id, error = %f.error, "record skipped");
                continue;
            }
            let Some(dlq) = &cfg.on_error.topic else {
                continue;
            };
            let source = source_of(&tp, f.record.offset.clamp(range.0, range.1));
            let mut headers = f.record.headers;
            headers.retain(|(k, _)| k != SINK_HEADER);
            headers.push((ERROR_HEADER.into(), Bytes::from(f.error)));
            headers.push((
                STAGE_HEADER.into(),
                Bytes::from(format!("{}:{}", f.stage, f.stage_id)),
            ));
            headers.push((SOURCE_HEADER.into(), Bytes::from(source)));
            let record = ProducerRecord {
                topic: dlq.clone(),
                partition: None,
                key: f.record.key,
                value: f.record.value,
                headers,
                timestamp: (f.record.timestamp > 0).then_some(f.record.timestamp),
            };
            counts.dead += 1;
            deliveries.push(producer.send(record).await?);
        }
    }
    for d in deliveries {
        d.await?;
    }
    let mut written = Vec::with_capacity(state_writes.len());
    for (tp, writes) in state_writes {
        let mut last = None;
        for d in writes {
            last = Some(d.await?.offset);
        }
        written.push((tp, last));
    }
    Ok((counts, written))
}

fn source_of(tp: &TopicPartition, offset: i64) -> String {
    format!("{}/{}/{}", tp.topic, tp.partition, offset)
}

fn to_plugin_record(r: ConsumedRecord) -> Record {
    Record {
        key: r.key,
        value: r.value,
        headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
        timestamp: r.timestamp,
        offset: r.offset,
        partition: r.partition as i32,
    }
}

/// The record to write for one stage output: its destination (the sink, or the named
/// output its `quiver.sink` header asks for) and the `quiver.source` header.
fn to_output(
    r: Record,
    source: &str,
    cfg: &PipelineConfig,
) -> Result<ProducerRecord, RuntimeError> {
    let mut topic = cfg.sink.topic.clone();
    let mut headers = Vec::with_capacity(r.headers.len() + 1);
    for (k, v) in r.headers {
        if k == SINK_HEADER {
            let name = String::from_utf8_lossy(&v).into_owned();
            topic = cfg.sinks.get(&name).cloned().ok_or_else(|| {
                RuntimeError::Failed(format!(
                    "a stage routed a record to the output {name:?}, which [sinks] does not name (it has: {})",
                    cfg.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
        } else if k != SOURCE_HEADER {
            headers.push((k, v));
        }
    }
    headers.push((
        SOURCE_HEADER.into(),
        Bytes::copy_from_slice(source.as_bytes()),
    ));
    Ok(ProducerRecord {
        topic,
        partition: None,
        key: r.key,
        value: r.value,
        headers,
        timestamp: (r.timestamp > 0).then_some(r.timestamp),
    })
}
