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
//! committed offset carries where that state is, and the partition's counters (see
//! [`crate::progress`]).
//!
//! Output records carry `quiver.source` = `topic/partition/offset` of their input record. A
//! stage routes a record to a named output of `[sinks]` with the header `quiver.sink = NAME`
//! (removed before writing). Dead letters carry `quiver.error`, `quiver.stage` and
//! `quiver.source`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quiver_client::{
    AutoOffsetReset, Client, ConsumedRecord, GroupConfig, GroupConsumer, GroupLeaver, Isolation,
    ProducerRecord, RecordRef, TopicPartition,
};
use quiver_plugins::{HostLimits, Record};
use quiver_protocol::ErrorCode;
use tokio::sync::watch;

use crate::changelog::{ensure_changelog, PartitionState};
use crate::error::RuntimeError;
use crate::metrics::{PipelineMetrics, TimestampRuns};
use crate::progress::{CommitMetadata, PartitionCounts};
use crate::stages::{ChainOutput, Failure, LoadedStage, PartitionChain};
use crate::writer::{SealedWrites, Writer};
use crate::{ErrorPolicy, Guarantee, PipelineConfig, StartPosition};

/// Header naming an output record's input: `topic/partition/offset`.
pub const SOURCE_HEADER: &str = "quiver.source";
/// Header a stage sets to route a record to a named output of `[sinks]`.
pub const SINK_HEADER: &str = "quiver.sink";
/// Header of a dead letter: the stage's error.
pub const ERROR_HEADER: &str = "quiver.error";
/// Header of a dead letter: `INDEX:name@version` of the stage that failed.
pub const STAGE_HEADER: &str = "quiver.stage";

/// Bytes of one fetch of an instance (per partition).
const POLL_FETCH_BYTES: u32 = 1024 * 1024;
/// Fetched chunks an instance keeps ahead of its processing (across partitions); a poll
/// takes them all. Two, not eight: a poll's decoded records (about 130 bytes of bookkeeping
/// per record, twice) then stay small enough to be reused warm, which cut the drain's CPU
/// per record by about a tenth on the bench; one chunk left the fetcher waiting.
const POLL_FETCH_CHUNKS: usize = 2;
/// At least once: polls whose writes may still be unacknowledged while the next is
/// processed. Two, so a poll's acknowledgement (it waits for a flush round that ends in an
/// `fdatasync`) overlaps the next two polls' work: with one, the live no-stage bench lost
/// about a sixth of its throughput to those waits. (Commits do not hold the loop: they
/// travel in the background, one at a time.) After a crash, at most these polls' outputs,
/// and those of polls completed since the last commit landed, are written again.
const POLLS_IN_FLIGHT: usize = 2;
/// How long a poll waits for records while nothing is in flight.
const IDLE_POLL_WAIT: Duration = Duration::from_millis(500);
/// How long a poll waits while an earlier poll's writes are in flight: the loop comes back
/// this often to complete polls whose writes were acknowledged meanwhile, and once none is
/// in flight and no records came, commits every stored offset.
const IN_FLIGHT_POLL_WAIT: Duration = Duration::from_millis(5);

/// How long an instance that stops tries to leave its group.
const LEAVE_WITHIN: Duration = Duration::from_secs(5);

/// Everything an instance needs to run: the checked file and its loaded stages.
pub struct Plan {
    /// The pipeline.
    pub config: PipelineConfig,
    /// Its stages, in order.
    pub stages: Vec<LoadedStage>,
    /// Limits of every plugin call.
    pub limits: HostLimits,
}

/// How long a run without input must last before it counts as working (and clears the
/// failures `pipeline status` shows): longer than a run that fails on the first records
/// it gets takes.
const WORKING_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// What an instance shows in `pipeline status`.
#[derive(Debug, Default)]
pub struct InstanceView {
    /// Input partitions owned now, `topic/partition`.
    pub partitions: Mutex<Vec<String>>,
    /// Takes the instance's member out of its group if the instance ends without leaving
    /// (aborted, or its own leave failed or timed out): set at join.
    leaver: Mutex<Option<GroupLeaver>>,
    /// Runs in a row that ended in an error (the instance joins again after each) without
    /// one loop through a poll in between, and the last error.
    failures: Mutex<(u32, String)>,
}

impl InstanceView {
    fn set(&self, owned: &[TopicPartition]) {
        let list = owned
            .iter()
            .map(|tp| format!("{}/{}", tp.topic, tp.partition))
            .collect();
        *self.partitions.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }

    fn set_leaver(&self, leaver: GroupLeaver) {
        *self.leaver.lock().unwrap_or_else(|p| p.into_inner()) = Some(leaver);
    }

    /// Leaves the group for an instance that ended without leaving it (nothing when it
    /// left). Bounded: the connection may be gone.
    pub async fn leave_group(&self, instance: &str) {
        let leaver = self.leaver.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(leaver) = leaver.filter(|l| !l.has_left()) else {
            return;
        };
        match tokio::time::timeout(LEAVE_WITHIN, leaver.leave()).await {
            Ok(Ok(())) => tracing::info!(
                instance,
                "left the group for an instance that ended without leaving"
            ),
            Ok(Err(e)) => {
                tracing::warn!(instance, error = %e, "leaving the group failed; its session will expire")
            }
            Err(_) => tracing::warn!(
                instance,
                "leaving the group took too long; its session will expire"
            ),
        }
    }

    /// A run ended in `error`; the instance joins again.
    pub fn failed(&self, error: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.0 += 1;
        f.1 = error.to_string();
    }

    /// A poll with records was written and committed, or a run without input lasted: the
    /// instance works.
    fn went_round(&self) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.0 > 0 {
            *f = (0, String::new());
        }
    }

    /// Why the instance keeps failing: set once two runs in a row ended in an error with
    /// nothing written and committed between them (one, as a rebalance may cause, is not
    /// shown).
    pub fn retrying(&self) -> Option<(u32, String)> {
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        (f.0 >= 2).then(|| f.clone())
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
    /// Its group member's client id ([`crate::deployment::member_client_id`]).
    pub client_id: String,
    /// Its number `N`.
    pub number: u32,
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

/// False for a partition given away, or lost and granted again, since `sent` was sent: its
/// records are read again from the commit (by whoever owns it), so neither its offset nor its
/// state mark moves for that poll.
fn same_grant(
    sent_grants: &BTreeMap<TopicPartition, Option<u64>>,
    member: &GroupConsumer,
    tp: &TopicPartition,
    run: Option<&PartitionRun>,
) -> bool {
    let sent_under = sent_grants.get(tp).copied().flatten();
    sent_under.is_some()
        && run.is_some_and(|r| r.grant == sent_under)
        && member.grant_id(&tp.topic, tp.partition) == sent_under
}

/// Completes sent polls, oldest first, while the oldest one's writes are all acknowledged
/// already (so nothing waits for a flush round).
async fn complete_acknowledged(
    writer: &mut Writer,
    member: &mut GroupConsumer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
    in_flight: &mut VecDeque<SentPoll>,
    metrics: &PipelineMetrics,
    view: &InstanceView,
) -> Result<(), RuntimeError> {
    let done = in_flight
        .iter()
        .take_while(|sent| sent.writes.are_done())
        .count();
    complete_oldest(
        writer,
        member,
        chains,
        in_flight,
        in_flight.len() - done,
        metrics,
        view,
    )
    .await
}

/// Completes sent polls, oldest first, until at most `keep` are in flight.
async fn complete_oldest(
    writer: &mut Writer,
    member: &mut GroupConsumer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
    in_flight: &mut VecDeque<SentPoll>,
    keep: usize,
    metrics: &PipelineMetrics,
    view: &InstanceView,
) -> Result<(), RuntimeError> {
    while in_flight.len() > keep {
        let Some(mut sent) = in_flight.pop_front() else {
            break;
        };
        let timestamps = std::mem::take(&mut sent.timestamps);
        match complete_poll(writer, member, chains, sent).await {
            Ok(counts) => {
                if counts.records_in > 0 {
                    metrics.record_batch(
                        counts.records_in,
                        counts.records_out,
                        counts.errors,
                        counts.dead_lettered,
                    );
                    metrics.record_latencies(quiver_core::clock::now_ms(), &timestamps);
                    // A poll written and committed: the instance works.
                    view.went_round();
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs one instance until `stop` turns true (then it commits what is done and leaves the
/// group) or the pipeline fails (`RuntimeError::Failed`). Other errors mean "join again".
pub async fn run_instance(parts: &InstanceParts, mut stop: StopSignal) -> Result<(), RuntimeError> {
    let InstanceParts {
        client,
        plan,
        id: instance_id,
        client_id,
        number,
        view,
        metrics,
    } = parts;
    let client = client.clone();
    let cfg = &plan.config;
    // An output deleted while the pipeline ran is waited for here, before anything is read
    // (and, at least once, written again to the outputs that are there).
    crate::deployment::check_outputs(&client, cfg)
        .await
        .map_err(|e| match e {
            RuntimeError::Topic(missing) => RuntimeError::Retry(format!(
                "{missing}; the instance reads nothing until it exists"
            )),
            e => e,
        })?;
    let exactly_once = cfg.run.guarantee == Guarantee::ExactlyOnce;
    let mut group = GroupConfig::new(cfg.group(), cfg.source.topics.iter().cloned())
        .start_without_commit_at(match cfg.source.start {
            StartPosition::Earliest => AutoOffsetReset::Earliest,
            StartPosition::Latest => AutoOffsetReset::Latest,
        });
    group.client_id = client_id.clone();
    // Exactly once, offsets are committed only inside transactions.
    group.commit_on_revoke = !exactly_once;
    // At least once, offsets are stored for commit only once a poll's writes are
    // acknowledged (the next polls are processed meanwhile).
    group.commit_stored_offsets = !exactly_once;
    // A revoked partition is given back only once the writes of its polls still in flight
    // landed (and, at least once, their offsets are committed): the next owner starts after
    // them, and none of them lands after its outputs (a stale value after a newer one).
    group.hold_revoked = true;
    group.fetch.isolation = Isolation::ReadCommitted;
    // A poll takes what is fetched ahead: at most ~2 MiB per instance, so a poll's
    // transaction and the instance's memory stay bounded however large the backlog.
    group.fetch.max_bytes = POLL_FETCH_BYTES;
    group.fetch.buffer_chunks = POLL_FETCH_CHUNKS;
    // Set up before joining: an error here returns with no member left behind.
    let changelog = if plan.stages.is_empty() {
        None
    } else {
        // One changelog partition per input partition number, with as many copies as the
        // most replicated source topic: state is kept as safely as its input.
        let admin = quiver_client::Admin::new(client.clone());
        let (mut most, mut replicas) = (1, 1);
        for t in &cfg.source.topics {
            let d = admin.describe_topic(t).await?;
            most = most.max(d.partitions.len() as u32);
            let copies = d.partitions.iter().map(|p| p.replicas.len()).max();
            replicas = replicas.max(copies.unwrap_or(1) as u16);
        }
        Some(ensure_changelog(&client, &cfg.name, most, replicas).await?)
    };
    let mut member = GroupConsumer::join(client.clone(), group).await?;
    view.set_leaver(member.leaver());
    let codec = cfg.sink.compression.codec();
    let mut writer = if exactly_once {
        match Writer::exactly_once(
            client.clone(),
            &crate::writer::transactional_id(&cfg.name, *number),
            &member.member_id(),
            codec,
        )
        .await
        {
            Ok(w) => w,
            Err(e) => {
                let _ = member.close_without_commit().await;
                return Err(e);
            }
        }
    } else {
        Writer::at_least_once(client.clone(), codec)
    };
    let mut chains: BTreeMap<TopicPartition, PartitionRun> = BTreeMap::new();
    // At least once, a poll's writes are acknowledged while the next ones are processed
    // (its offsets are stored for commit only once they are); exactly once, each poll's
    // transaction commits before the next poll.
    let overlap = if exactly_once { 0 } else { POLLS_IN_FLIGHT };
    let mut in_flight: VecDeque<SentPoll> = VecDeque::new();
    let run_started = std::time::Instant::now();
    let mut result = loop {
        if stop.is_set() {
            break Ok(());
        }
        let poll_started = std::time::Instant::now();
        let wait = if in_flight.is_empty() {
            IDLE_POLL_WAIT
        } else {
            IN_FLIGHT_POLL_WAIT
        };
        let polled = tokio::select! {
            r = member.poll_timeout(wait) => r,
            _ = stop.wait() => break Ok(()),
        };
        let records = match polled {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        tracing::debug!(
            records = records.len(),
            poll_ms = poll_started.elapsed().as_millis() as u64,
            "polled"
        );
        if member.holds_revoked() {
            if let Err(e) = complete_oldest(
                &mut writer,
                &mut member,
                &mut chains,
                &mut in_flight,
                0,
                metrics,
                view,
            )
            .await
            {
                break Err(e);
            }
            member.release_revoked().await;
        }
        let owned = member.assignment();
        view.set(&owned);
        if let Err(e) = sync_chains(plan, &client, changelog, &mut member, &mut chains).await {
            break Err(e);
        }
        let idle = records.is_empty();
        let positions = member.positions();
        match send_poll(plan, &mut writer, &mut chains, records, &positions, metrics).await {
            Ok(Some(sent)) => in_flight.push_back(sent),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        // Polls beyond the overlap are waited for; younger ones whose writes are all
        // acknowledged are completed without waiting. An empty poll does not wait for
        // the rest: it may be only a gap in the input, and the next poll comes within
        // `IN_FLIGHT_POLL_WAIT` anyway. Once nothing is in flight and the input is quiet,
        // every stored offset is committed, so the committed offsets catch up.
        if let Err(e) = complete_oldest(
            &mut writer,
            &mut member,
            &mut chains,
            &mut in_flight,
            overlap,
            metrics,
            view,
        )
        .await
        {
            break Err(e);
        }
        if let Err(e) = complete_acknowledged(
            &mut writer,
            &mut member,
            &mut chains,
            &mut in_flight,
            metrics,
            view,
        )
        .await
        {
            break Err(e);
        }
        if idle && in_flight.is_empty() {
            // Metadata goes only with an exactly-once commit (at least once, with each poll's).
            let marks = if writer.is_transactional() {
                commit_metadata(&chains, |_, _| true)
            } else {
                Vec::new()
            };
            if let Err(e) = writer.commit_quiet(&mut member, marks).await {
                break Err(e);
            }
            // Nothing in flight, everything committed, and the run has lasted: the
            // instance works (a run that fails on its first records never gets here).
            if run_started.elapsed() >= WORKING_AFTER {
                view.went_round();
            }
        }
    };
    if result.is_ok() {
        // Stopping: what was sent is completed and committed before leaving.
        result = complete_oldest(
            &mut writer,
            &mut member,
            &mut chains,
            &mut in_flight,
            0,
            metrics,
            view,
        )
        .await;
    }
    if result.is_err() {
        // Nothing of the polls not completed counts as done: the transaction (if any) is
        // void, their offsets were never stored, and the next owner of these partitions
        // starts from the last commit.
        writer.abort().await;
        for sent in in_flight.iter().rev() {
            for (tp, (first, _)) in &sent.ranges {
                member.rewind(&tp.topic, tp.partition, *first);
            }
        }
    }
    writer.close().await;
    // Leave, so the partitions go to another member now rather than when the session runs
    // out; unless the membership is already gone. Bounded: the connection may be gone too.
    let gone = matches!(&result, Err(RuntimeError::Client(e))
        if matches!(e.code(), Some(ErrorCode::UnknownMember | ErrorCode::UnknownGroup)));
    let leave = async {
        match (&result, writer.is_transactional()) {
            _ if gone => Ok(()),
            (Err(_), true) => member.close_without_commit().await,
            _ => member.close().await,
        }
    };
    // The leaver stays: if this did not leave (a timeout, even in the middle of the
    // LeaveGroup, or a membership the heartbeats took up again), whoever ends the instance
    // leaves with it.
    match tokio::time::timeout(LEAVE_WITHIN, leave).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(instance = %instance_id, error = %e, "leaving the group failed")
        }
        Err(_) => {
            tracing::warn!(instance = %instance_id, "leaving the group took too long; its session will expire")
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
    /// Whether the snapshot taken when the partition was granted still has to be written.
    snapshot_due: bool,
    /// The grant of the partition these stages belong to ([`GroupConsumer::grant_id`]): a
    /// partition lost and granted again is read again from its commit, so its stages and
    /// state start again from there too.
    grant: Option<u64>,
    /// The partition's counters: those of its committed offset when it was granted, plus
    /// this owner's polls once their writes were acknowledged (committed with the next
    /// commit's metadata).
    counts: PartitionCounts,
}

/// Builds the stages of newly owned partitions (restoring their state from the changelog
/// position their committed offset names) and drops those of partitions given away.
async fn sync_chains(
    plan: &Plan,
    client: &Client,
    changelog: Option<u32>,
    member: &mut GroupConsumer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
) -> Result<(), RuntimeError> {
    let owned = member.assignment();
    let now: BTreeSet<&TopicPartition> = owned.iter().collect();
    chains.retain(|tp, run| {
        now.contains(tp) && member.grant_id(&tp.topic, tp.partition) == run.grant
    });
    for tp in &owned {
        if chains.contains_key(tp) {
            continue;
        }
        let meta = member.committed_metadata(&tp.topic, tp.partition);
        let (stores, state) = match changelog {
            Some(partitions) => {
                let state = PartitionState::restore(
                    client,
                    &plan.config.name,
                    plan.stages.len(),
                    tp,
                    partitions,
                    meta.as_deref(),
                )
                .await?;
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
        let snapshot_due = state.is_some();
        chains.insert(
            tp.clone(),
            PartitionRun {
                chain,
                state,
                snapshot_due,
                grant: member.grant_id(&tp.topic, tp.partition),
                counts: CommitMetadata::counts_in(meta.as_deref()),
            },
        );
    }
    Ok(())
}

/// A poll whose records went through the stages and whose writes were sent: what
/// completing it needs (its writes acknowledged, then its input committed).
struct SentPoll {
    /// Per input partition with records in this poll: what it counted (added to the
    /// partition's committed counters once the writes are acknowledged).
    counts: BTreeMap<TopicPartition, PartitionCounts>,
    /// The input records' timestamps (for the latency figures).
    timestamps: TimestampRuns,
    /// Per input partition: its first record in this poll, and the offset after its last.
    ranges: BTreeMap<TopicPartition, (i64, i64)>,
    /// Per input partition with records or state in this poll: the grant it was sent under.
    grants: BTreeMap<TopicPartition, Option<u64>>,
    /// Input partitions whose state was written, and whether the write began a snapshot.
    state_writes: Vec<(TopicPartition, Option<u64>)>,
    /// What finishing the writes waits for.
    writes: SealedWrites,
}

/// Runs each partition's records through its chain and sends the outputs, dead letters and
/// state (snapshots due first, then changes) without waiting for them. `None` for an idle
/// poll with nothing to write (an idle poll writes only snapshots that are due).
async fn send_poll(
    plan: &Arc<Plan>,
    writer: &mut Writer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
    records: Vec<ConsumedRecord>,
    positions: &BTreeMap<TopicPartition, i64>,
    metrics: &PipelineMetrics,
) -> Result<Option<SentPoll>, RuntimeError> {
    let mut counts: BTreeMap<TopicPartition, PartitionCounts> = BTreeMap::new();
    let mut timestamps = TimestampRuns::default();
    let mut ranges: BTreeMap<TopicPartition, (i64, i64)> = BTreeMap::new();
    let mut by_partition: BTreeMap<TopicPartition, Vec<Record>> = BTreeMap::new();
    for (tp, recs) in into_runs(records, &mut timestamps) {
        // The commit goes past the last record's chunk end when nothing but markers (or
        // aborted records) follows it there: no lag of 1 behind a transactional input.
        let after_last = recs[recs.len() - 1].offset + 1;
        let end = positions
            .get(&tp)
            .copied()
            .unwrap_or(after_last)
            .max(after_last);
        let range = (recs[0].offset, end);
        counts.entry(tp.clone()).or_default().records_in += recs.len() as u64;
        add_run(&mut ranges, &mut by_partition, tp, range, recs);
    }
    let idle = by_partition.is_empty();
    if idle
        && !chains
            .values()
            .any(|r| r.snapshot_due || r.state.as_ref().is_some_and(PartitionState::needs_snapshot))
    {
        return Ok(None);
    }
    // Plugin calls block: move the chains that have work to a blocking thread and back.
    let mut work: Vec<(TopicPartition, PartitionRun, Vec<Record>)> = Vec::new();
    for (tp, recs) in by_partition {
        let run = chains.remove(&tp).ok_or_else(|| {
            RuntimeError::Failed(format!("no stages for {}/{}", tp.topic, tp.partition))
        })?;
        work.push((tp, run, recs));
    }
    let started = std::time::Instant::now();
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
        // The failure that stops the pipeline counts among its errors.
        metrics.count_stopping_error();
        return Err(RuntimeError::Failed(f));
    }
    let ran_at = std::time::Instant::now();
    let cfg = &plan.config;
    // State first: a snapshot due (taken when the partition was granted, or because the
    // changes outgrew it) precedes the changes of this poll in the changelog.
    let mut state_writes = Vec::new();
    for (tp, run) in chains.iter_mut() {
        let Some(state) = run.state.as_mut() else {
            continue;
        };
        let snapshot = run.snapshot_due || state.needs_snapshot();
        run.snapshot_due = false;
        let write = state.next_write(snapshot);
        if write.records.is_empty() {
            continue;
        }
        state_writes.push((tp.clone(), write.snapshot_epoch));
        for r in write.records {
            writer.send_tracked(r).await?;
        }
    }
    for (tp, range, out) in outputs {
        let ChainOutput {
            records, failed, ..
        } = out;
        let mut source = SourceHeader::new(&tp);
        let counted = counts.entry(tp.clone()).or_default();
        counted.records_out += records.len() as u64;
        send_outputs(writer, &records, &mut source, range, cfg).await?;
        for f in failed {
            counted.errors += 1;
            if cfg.on_error.policy != ErrorPolicy::DeadLetter {
                tracing::debug!(stage = %f.stage_id, error = %f.error, "record skipped");
                continue;
            }
            let Some(dlq) = &cfg.on_error.topic else {
                continue;
            };
            let source = Bytes::copy_from_slice(source.of(f.record.offset.clamp(range.0, range.1)));
            counted.dead_lettered += 1;
            writer.send(dead_letter(f, dlq, source)).await?;
        }
    }
    tracing::debug!(
        records = total(&counts).records_in,
        stages_ms = (ran_at - started).as_millis() as u64,
        send_ms = ran_at.elapsed().as_millis() as u64,
        "poll sent"
    );
    let grants = chains
        .iter()
        .filter(|(tp, _)| ranges.contains_key(*tp) || state_writes.iter().any(|(s, _)| s == *tp))
        .map(|(tp, run)| (tp.clone(), run.grant))
        .collect();
    Ok(Some(SentPoll {
        counts,
        timestamps,
        ranges,
        grants,
        state_writes,
        writes: writer.seal(),
    }))
}

/// Adds one partition's run of a poll's records: its offsets widen the partition's range.
fn add_run(
    ranges: &mut BTreeMap<TopicPartition, (i64, i64)>,
    by_partition: &mut BTreeMap<TopicPartition, Vec<Record>>,
    tp: TopicPartition,
    (first, end): (i64, i64),
    mut recs: Vec<Record>,
) {
    let range = ranges.entry(tp.clone()).or_insert((first, end));
    range.1 = end;
    let into = by_partition.entry(tp).or_default();
    if into.is_empty() {
        *into = recs;
    } else {
        into.append(&mut recs);
    }
}

/// Waits until a sent poll's writes are acknowledged (or its transaction flushed), moves
/// its partitions' state marks to where the state landed, and commits its input with the
/// marks — as the writer's guarantee says.
async fn complete_poll(
    writer: &mut Writer,
    member: &mut GroupConsumer,
    chains: &mut BTreeMap<TopicPartition, PartitionRun>,
    sent: SentPoll,
) -> Result<PartitionCounts, RuntimeError> {
    let started = std::time::Instant::now();
    let landed = writer.finish(sent.writes).await?;
    let written_at = std::time::Instant::now();
    let polled = total(&sent.counts);
    if polled.records_in > 0 {
        // Only polls with input count: one that wrote only state (the snapshot of a
        // partition just granted) is not the window the fault is for.
        crate::fault::after_write();
    }
    for (tp, snapshot) in &sent.state_writes {
        if !same_grant(&sent.grants, member, tp, chains.get(tp)) {
            continue;
        }
        let Some(state) = chains.get_mut(tp).and_then(|r| r.state.as_mut()) else {
            continue;
        };
        if let Some(l) = landed.get(&state.changelog()) {
            state.landed(l.first_offset, l.last_offset, *snapshot);
        }
    }
    for (tp, counted) in &sent.counts {
        if !same_grant(&sent.grants, member, tp, chains.get(tp)) {
            continue;
        }
        if let Some(run) = chains.get_mut(tp) {
            run.counts += *counted;
        }
    }
    // The partitions whose metadata changed: those counted in this poll, and those with
    // state (their marks move with the changelog). The others' committed metadata stays.
    let marks = commit_metadata(chains, |tp, run| {
        sent.counts.contains_key(tp) || run.state.is_some()
    });
    let ends: BTreeMap<TopicPartition, i64> = sent
        .ranges
        .iter()
        .filter(|(tp, _)| same_grant(&sent.grants, member, tp, chains.get(*tp)))
        .map(|(tp, (_, end))| (tp.clone(), *end))
        .collect();
    writer.commit(member, &ends, marks).await?;
    tracing::debug!(
        records = polled.records_in,
        write_ms = (written_at - started).as_millis() as u64,
        commit_ms = written_at.elapsed().as_millis() as u64,
        "poll committed"
    );
    Ok(polled)
}

/// The sum of a poll's per-partition counts.
fn total(counts: &BTreeMap<TopicPartition, PartitionCounts>) -> PartitionCounts {
    let mut all = PartitionCounts::default();
    for c in counts.values() {
        all += *c;
    }
    all
}

/// The metadata of the owned partitions' committed offsets (those `which` picks): each
/// one's counters, and where its state stands ([`CommitMetadata`]).
fn commit_metadata(
    chains: &BTreeMap<TopicPartition, PartitionRun>,
    which: impl Fn(&TopicPartition, &PartitionRun) -> bool,
) -> Vec<(TopicPartition, String)> {
    chains
        .iter()
        .filter(|(tp, run)| which(tp, run))
        .map(|(tp, run)| {
            let m = CommitMetadata {
                state: run.state.as_ref().map(PartitionState::mark),
                counts: run.counts,
            };
            (tp.clone(), m.to_text())
        })
        .collect()
}

/// A record a stage failed on, for the dead-letter topic: as the stage got it, with headers
/// naming the error, the stage and the input it came from.
fn dead_letter(f: Failure, topic: &str, source: Bytes) -> ProducerRecord {
    let mut headers = f.record.headers;
    headers.retain(|(k, _)| k != SINK_HEADER);
    headers.push((ERROR_HEADER.into(), Bytes::from(f.error)));
    headers.push((
        STAGE_HEADER.into(),
        Bytes::from(format!("{}:{}", f.stage, f.stage_id)),
    ));
    headers.push((SOURCE_HEADER.into(), source));
    ProducerRecord {
        topic: topic.to_string(),
        partition: None,
        key: f.record.key,
        value: f.record.value,
        headers,
        timestamp: (f.record.timestamp > 0).then_some(f.record.timestamp),
    }
}

/// A poll's records as the stages take them, in runs of one partition each (a poll holds
/// a few: one per fetched chunk), with their timestamps noted for the latency figures.
/// Converted in one pass into the same allocation: a poll's bookkeeping (over a hundred
/// bytes per record) is touched once, not copied into a second vector.
fn into_runs(
    records: Vec<ConsumedRecord>,
    timestamps: &mut TimestampRuns,
) -> Vec<(TopicPartition, Vec<Record>)> {
    // Where each run starts, and its partition.
    let mut starts: Vec<(usize, Arc<str>, u32)> = Vec::new();
    let mut all: Vec<Record> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            // Records of one fetch share their topic's name: pointers first.
            let same = starts.last().is_some_and(|(_, topic, partition)| {
                *partition == r.partition && (Arc::ptr_eq(topic, &r.topic) || **topic == *r.topic)
            });
            if !same {
                starts.push((i, r.topic.clone(), r.partition));
            }
            timestamps.push(r.timestamp);
            to_plugin_record(r)
        })
        .collect();
    let mut runs = Vec::with_capacity(starts.len());
    while let Some((start, topic, partition)) = starts.pop() {
        let recs = if start == 0 {
            std::mem::take(&mut all)
        } else {
            all.split_off(start)
        };
        runs.push((TopicPartition::new(topic.to_string(), partition), recs));
    }
    runs.reverse();
    runs
}

fn to_plugin_record(r: ConsumedRecord) -> Record {
    Record {
        key: r.key,
        value: r.value,
        headers: if r.headers.is_empty() {
            Vec::new()
        } else {
            r.headers.into_iter().map(|h| (h.key, h.value)).collect()
        },
        timestamp: r.timestamp,
        offset: r.offset,
        partition: r.partition as i32,
    }
}

/// `quiver.source` values of one input partition's records: `topic/partition/` once, then
/// each record's offset written after it in a buffer used again for the next record.
struct SourceHeader {
    buf: Vec<u8>,
    prefix: usize,
}

impl SourceHeader {
    fn new(tp: &TopicPartition) -> Self {
        let buf = format!("{}/{}/", tp.topic, tp.partition).into_bytes();
        SourceHeader {
            prefix: buf.len(),
            buf,
        }
    }

    /// `topic/partition/offset`.
    fn of(&mut self, offset: i64) -> &[u8] {
        self.buf.truncate(self.prefix);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
        &self.buf
    }
}

/// Records of a partition's outputs handed to the writer in one call: the call's record
/// references, header lists and source values (about 150 bytes per record) then stay in
/// the core's cache while the producer copies them into its batches.
const OUTPUTS_PER_CALL: usize = 1024;

/// Sends a partition's stage outputs, each to its destination (the sink, or the named
/// output its `quiver.sink` header asks for) with the `quiver.source` header, in calls of
/// [`OUTPUTS_PER_CALL`] records to the writer, once every named output is known to exist.
/// The producer copies the records into its
/// batches, so nothing is built per record but the source values (one buffer) and the
/// header lists (one vector).
async fn send_outputs(
    writer: &mut Writer,
    records: &[Record],
    source: &mut SourceHeader,
    (first, last): (i64, i64),
    cfg: &PipelineConfig,
) -> Result<(), RuntimeError> {
    // Every named output is checked before any record is queued: a name `[sinks]` lacks
    // fails the poll with nothing of this partition's outputs sent.
    for r in records.iter().filter(|r| !r.headers.is_empty()) {
        for (k, v) in &r.headers {
            if k == SINK_HEADER {
                sink_named(cfg, v, source.of(r.offset.clamp(first, last)))?;
            }
        }
    }
    let per_call = OUTPUTS_PER_CALL.min(records.len());
    let mut sources = Vec::with_capacity(per_call * (source.prefix + 8));
    let mut source_ends = Vec::with_capacity(per_call);
    let mut routes = Vec::with_capacity(per_call);
    for call in records.chunks(OUTPUTS_PER_CALL) {
        sources.clear();
        source_ends.clear();
        routes.clear();
        for r in call {
            sources.extend_from_slice(source.of(r.offset.clamp(first, last)));
            source_ends.push(sources.len());
        }
        let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(call.len());
        let mut start = 0;
        for (r, &end) in call.iter().zip(&source_ends) {
            let mut topic = cfg.sink.topic.as_str();
            let from = headers.len();
            for (k, v) in &r.headers {
                if k == SINK_HEADER {
                    topic = sink_named(cfg, v, &sources[start..end])?;
                } else if k != SOURCE_HEADER {
                    headers.push((k, v));
                }
            }
            headers.push((SOURCE_HEADER, &sources[start..end]));
            start = end;
            routes.push((topic, from..headers.len()));
        }
        let refs: Vec<RecordRef<'_>> = call
            .iter()
            .zip(routes.drain(..))
            .map(|(r, (topic, span))| RecordRef {
                topic,
                partition: None,
                key: r.key.as_deref(),
                value: &r.value,
                headers: &headers[span],
                timestamp: (r.timestamp > 0).then_some(r.timestamp),
            })
            .collect();
        writer.send_refs(&refs).await?;
    }
    Ok(())
}

/// The topic of the output of `[sinks]` a stage named in a record's `quiver.sink` header.
fn sink_named<'c>(
    cfg: &'c PipelineConfig,
    name: &[u8],
    source: &[u8],
) -> Result<&'c str, RuntimeError> {
    let name = String::from_utf8_lossy(name);
    cfg.sinks.get(name.as_ref()).map(String::as_str).ok_or_else(|| {
        let known = if cfg.sinks.is_empty() {
            "the file has no [sinks]".to_string()
        } else {
            format!(
                "it has: {}",
                cfg.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        RuntimeError::Failed(format!(
            "a stage routed the record from {} to the output {name:?}, which [sinks] does not name ({known}); name it in [sinks] of the pipeline file and deploy it again",
            String::from_utf8_lossy(source)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumed(topic: &Arc<str>, partition: u32, offset: i64) -> ConsumedRecord {
        ConsumedRecord {
            topic: topic.clone(),
            partition,
            offset,
            timestamp: 1_000 + offset,
            key: None,
            value: Bytes::from(format!("v{offset}")),
            headers: Vec::new(),
        }
    }

    #[test]
    fn a_poll_splits_into_its_partitions_runs_in_order() {
        let a: Arc<str> = "in".into();
        // The same name in another allocation (another fetch) is the same topic.
        let a_again: Arc<str> = "in".into();
        let b: Arc<str> = "other".into();
        let poll = vec![
            consumed(&a, 0, 5),
            consumed(&a_again, 0, 6),
            consumed(&a, 1, 9),
            consumed(&b, 1, 2),
            consumed(&b, 1, 3),
            consumed(&a, 0, 7),
        ];
        let mut poll = poll;
        poll[4].headers.push(quiver_protocol::batch::Header {
            key: "h".into(),
            value: Bytes::from("hv"),
        });
        let mut timestamps = TimestampRuns::default();
        let runs = into_runs(poll, &mut timestamps);
        let seen: Vec<(String, u32, Vec<i64>)> = runs
            .iter()
            .map(|(tp, recs)| {
                (
                    tp.topic.clone(),
                    tp.partition,
                    recs.iter().map(|r| r.offset).collect(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("in".into(), 0, vec![5, 6]),
                ("in".into(), 1, vec![9]),
                ("other".into(), 1, vec![2, 3]),
                ("in".into(), 0, vec![7]),
            ]
        );
        let r = &runs[2].1[1];
        assert_eq!((r.partition, r.timestamp), (1, 1_003));
        assert_eq!(&r.value[..], b"v3");
        assert_eq!(r.headers, vec![("h".to_string(), Bytes::from("hv"))]);
        assert!(runs[2].1[0].headers.is_empty());
        assert!(into_runs(Vec::new(), &mut timestamps).is_empty());
    }

    /// Outputs of more than one writer call, some routed to a named output: each lands
    /// in its topic, in order, with its own `quiver.source`; a name `[sinks]` lacks fails
    /// with the name and what the file has.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outputs_land_in_their_sinks_across_writer_calls() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, client) =
            crate::test_broker::with_topics(dir.path(), &["out", "odd-out"]).await;
        let cfg = PipelineConfig::parse(
            "name = \"p\"\n[source]\ntopics = [\"in\"]\n[sink]\ntopic = \"out\"\n[sinks]\nodd = \"odd-out\"\n",
            "p.toml",
        )
        .unwrap();
        let total = OUTPUTS_PER_CALL * 2 + 7;
        let records: Vec<Record> = (0..total as i64)
            .map(|i| {
                let mut r = Record::from_value(format!("v{i}"));
                r.offset = 100 + i;
                if i % 2 == 1 {
                    r.headers.push((SINK_HEADER.into(), Bytes::from("odd")));
                }
                r
            })
            .collect();
        let tp = TopicPartition::new("in", 3);
        let range = (100, 100 + total as i64 - 1);
        let mut writer = Writer::at_least_once(client.clone(), Default::default());
        send_outputs(
            &mut writer,
            &records,
            &mut SourceHeader::new(&tp),
            range,
            &cfg,
        )
        .await
        .unwrap();
        let sealed = writer.seal();
        writer.finish(sealed).await.unwrap();
        for (topic, parity) in [("out", 0), ("odd-out", 1)] {
            let want: Vec<i64> = (0..total as i64).filter(|i| i % 2 == parity).collect();
            let read = crate::test_broker::read_start(&client, topic, want.len()).await;
            assert_eq!(read.len(), want.len(), "{topic}");
            for (r, i) in read.iter().zip(want) {
                assert_eq!(r.value, format!("v{i}").as_bytes(), "{topic}");
                let headers: Vec<(&str, &[u8])> = r
                    .headers
                    .iter()
                    .map(|h| (h.key.as_str(), &h.value[..]))
                    .collect();
                let source = format!("in/3/{}", 100 + i);
                assert_eq!(headers, vec![(SOURCE_HEADER, source.as_bytes())], "{topic}");
            }
        }

        // A poll whose last output names an output `[sinks]` lacks: an error naming it,
        // and none of the poll's other outputs (two calls' worth) queued.
        let log_ends = |topic: &'static str| {
            let client = client.clone();
            async move {
                crate::test_broker::fetch_start(&client, topic, 1)
                    .await
                    .0
                    .log_end_offset
            }
        };
        let ends = (log_ends("out").await, log_ends("odd-out").await);
        let mut lost = Record::from_value("x");
        lost.offset = 100 + total as i64 - 1;
        lost.headers
            .push((SINK_HEADER.into(), Bytes::from("evens")));
        let mut poll = records.clone();
        poll.push(lost);
        let err = send_outputs(&mut writer, &poll, &mut SourceHeader::new(&tp), range, &cfg)
            .await
            .unwrap_err()
            .to_string();
        let last = format!("in/3/{}", 100 + total - 1);
        assert!(
            err.contains(&last) && err.contains("\"evens\"") && err.contains("it has: odd"),
            "{err}"
        );
        let sealed = writer.seal();
        writer.finish(sealed).await.unwrap();
        assert_eq!((log_ends("out").await, log_ends("odd-out").await), ends);
        broker.shutdown().await;
    }
}
