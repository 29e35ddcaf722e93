//! Per-partition batching and sending: the open batch, the queue of closed batches, and
//! the task that stamps (producer id, sequence), encodes and sends them with bounded
//! in-flight requests and idempotent retries.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use quiver_protocol::batch::BatchBuilder;
use quiver_protocol::requests::{Acks, ProduceRequest};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use super::{lock, Completion, RecordRef, Shared};
use crate::backoff::{random_u64, Backoff};

/// Records' overhead in a batch beyond key, value and headers (varints, attributes).
const RECORD_OVERHEAD: usize = 24;

/// Ids an idempotent producer may pick: positive, below the bit that marks ids a
/// transaction coordinator handed out (brokers refuse non-transactional batches of those).
const OWN_ID_MASK: i64 = quiver_protocol::batch::COORDINATOR_PRODUCER_ID_BIT - 1;

/// A random positive producer id below [`OWN_ID_MASK`].
fn new_producer_id() -> i64 {
    ((random_u64() as i64) & OWN_ID_MASK).max(1)
}

/// Epochs of one producer id before the id itself moves on (the wire's epoch is an i16).
const EPOCHS_PER_ID: u32 = i16::MAX as u32;

/// The producer id and epoch of a partition queue's `generation`: the queue's random id at
/// epochs 0, 1, 2, … (one more after every batch that failed for good), then the next id.
/// A new epoch starts its sequences at 0, and the broker fences the older epochs of the id
/// once it stored a batch of the newer one (Kafka's KIP-360): a batch of the old epoch
/// still travelling (a request sent before the failure, delivered late) is refused instead
/// of landing after the new epoch's batches.
fn identity(base_id: i64, generation: u32) -> (i64, i16) {
    let id = base_id.wrapping_add(i64::from(generation / EPOCHS_PER_ID)) & OWN_ID_MASK;
    (id.max(1), (generation % EPOCHS_PER_ID) as i16)
}

/// The partitions of one topic and its sticky partition for keyless records.
pub(crate) struct TopicState {
    pub(crate) partitions: Vec<Arc<PartitionQueue>>,
    sticky: Arc<AtomicU32>,
    /// The topic's partition count, shared with its queues (the round robin of keyless
    /// records covers partitions added later too).
    count: Arc<AtomicU32>,
    /// The topic's partitioner plugin, looked up when the topic is first used.
    pub(crate) routing: super::PluginRouting,
    /// When the topic's metadata was last looked up ([`mono_ms`]).
    checked_ms: AtomicU64,
}

impl TopicState {
    /// Makes the queues and starts one task per partition.
    pub(crate) fn start(
        name: &str,
        partitions: u32,
        routing: super::PluginRouting,
        shared: &Arc<Shared>,
    ) -> (Arc<TopicState>, Vec<tokio::task::JoinHandle<()>>) {
        let sticky = Arc::new(AtomicU32::new(
            (random_u64() % u64::from(partitions)) as u32,
        ));
        let count = Arc::new(AtomicU32::new(partitions));
        let queues = queues(name, 0..partitions, &count, &sticky, shared);
        let tasks = start_tasks(&queues, shared);
        let state = TopicState {
            partitions: queues,
            sticky,
            count,
            routing,
            checked_ms: AtomicU64::new(mono_ms()),
        };
        (Arc::new(state), tasks)
    }

    /// This topic grown to `partitions`: the same queues (and their batches) for the
    /// partitions it had, new ones (with their tasks) for those added.
    pub(crate) fn grown(
        &self,
        name: &str,
        partitions: u32,
        routing: super::PluginRouting,
        shared: &Arc<Shared>,
    ) -> (Arc<TopicState>, Vec<tokio::task::JoinHandle<()>>) {
        let had = self.partitions.len() as u32;
        let added = queues(name, had..partitions, &self.count, &self.sticky, shared);
        let tasks = start_tasks(&added, shared);
        self.count.store(partitions.max(had), Ordering::Relaxed);
        let state = TopicState {
            partitions: self.partitions.iter().cloned().chain(added).collect(),
            sticky: self.sticky.clone(),
            count: self.count.clone(),
            routing,
            checked_ms: AtomicU64::new(mono_ms()),
        };
        (Arc::new(state), tasks)
    }

    /// The partition keyless records go to now.
    pub(crate) fn sticky(&self) -> u32 {
        // A state made before the topic grew keeps its own (shorter) list of partitions.
        self.sticky.load(Ordering::Relaxed) % self.partitions.len().max(1) as u32
    }

    /// True when the metadata was looked up longer than `max_age` ago; the caller that
    /// gets true looks it up again (others keep going meanwhile).
    pub(crate) fn metadata_due(&self, max_age: std::time::Duration) -> bool {
        let (now, last) = (mono_ms(), self.checked_ms.load(Ordering::Relaxed));
        if u128::from(now.saturating_sub(last)) < max_age.as_millis() {
            return false;
        }
        self.checked_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// Milliseconds of a monotonic clock (from its first use), for atomics.
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Queues for `partitions` of topic `name`.
fn queues(
    name: &str,
    partitions: std::ops::Range<u32>,
    count: &Arc<AtomicU32>,
    sticky: &Arc<AtomicU32>,
    shared: &Arc<Shared>,
) -> Vec<Arc<PartitionQueue>> {
    let topic: Arc<str> = Arc::from(name);
    partitions
        .map(|p| {
            Arc::new(PartitionQueue::new(
                topic.clone(),
                p,
                count.clone(),
                sticky.clone(),
                &shared.config,
            ))
        })
        .collect()
}

/// Starts the sending task of each queue.
fn start_tasks(
    queues: &[Arc<PartitionQueue>],
    shared: &Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    queues
        .iter()
        .map(|q| {
            let span = tracing::debug_span!("producer", topic = %q.topic, partition = q.partition);
            tokio::spawn(q.clone().run(shared.clone()).instrument(span))
        })
        .collect()
}

/// A closed batch waiting to be sent.
struct Closed {
    builder: BatchBuilder,
    completion: Arc<Completion>,
    accounted: usize,
    opened: Instant,
}

struct QueueState {
    builder: BatchBuilder,
    completion: Arc<Completion>,
    accounted: usize,
    opened: Option<Instant>,
    ready: VecDeque<Closed>,
    spare: Vec<BatchBuilder>,
}

/// What [`PartitionQueue::push`] did with one record.
struct Pushed {
    /// The record's index in its batch.
    index: u32,
    /// The completion of the record's batch when pushing it closed that batch (else the
    /// record is in the open batch).
    closed_with: Option<Arc<Completion>>,
    /// The queue's task has work (a batch opened or closed).
    wake: bool,
}

/// A batch builder with the producer's codec and numbered header, with room for `bytes`
/// of records.
fn new_builder(
    compression: quiver_protocol::batch::Compression,
    bytes: usize,
    numbered_header: Option<&str>,
) -> BatchBuilder {
    let mut b = BatchBuilder::with_capacity(compression, bytes);
    b.set_numbered_header(numbered_header);
    b
}

/// The bytes a record holds of the producer's buffer (`buffer_memory_bytes`).
pub(crate) fn buffered_size(r: &RecordRef<'_>) -> usize {
    r.key.map_or(0, <[u8]>::len)
        + r.value.len()
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
        + RECORD_OVERHEAD
}

/// A partition queue locked for a run of records queued one after another: one lock, one
/// buffer count and one wake-up for the run instead of one per record. The run's bytes are
/// counted as buffered when it ends (dropped), still under the lock, so the queue's task
/// cannot send (and uncount) them before.
pub(crate) struct QueueRun<'q> {
    queue: &'q PartitionQueue,
    shared: &'q Shared,
    st: std::sync::MutexGuard<'q, QueueState>,
    /// Bytes pushed in this run.
    size: usize,
    /// The index and timestamp of the run's last record, and its batch's completion if that
    /// batch is closed.
    last: Option<(u32, i64, Option<Arc<Completion>>)>,
    wake: bool,
}

impl QueueRun<'_> {
    /// The partition this run queues to.
    pub(crate) fn partition(&self) -> u32 {
        self.queue.partition
    }

    /// Bytes pushed in this run so far (not yet counted as buffered).
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Queues one record; `size` is its [`buffered_size`].
    pub(crate) fn push(&mut self, r: &RecordRef<'_>, timestamp: i64, size: usize) {
        let pushed = self.queue.push(&mut self.st, r, timestamp, size);
        self.size += size;
        self.wake |= pushed.wake;
        self.last = Some((pushed.index, timestamp, pushed.closed_with));
    }

    /// Ends the run: the completion of the batch holding its last record, that record's
    /// index and its timestamp (`None` for a run that queued nothing).
    pub(crate) fn finish(mut self) -> Option<(Arc<Completion>, u32, i64)> {
        let (index, timestamp, closed) = self.last.take()?;
        Some((
            closed.unwrap_or_else(|| self.st.completion.clone()),
            index,
            timestamp,
        ))
    }
}

impl Drop for QueueRun<'_> {
    fn drop(&mut self) {
        self.shared.buffered.fetch_add(self.size, Ordering::AcqRel);
        if self.wake {
            self.queue.wake.notify_one();
        }
    }
}

/// One partition's open batch and closed-batch queue.
pub(crate) struct PartitionQueue {
    topic: Arc<str>,
    partition: u32,
    /// The topic's partition count (shared by its queues).
    partitions: Arc<AtomicU32>,
    sticky: Arc<AtomicU32>,
    state: Mutex<QueueState>,
    /// Completions of the batches taken off the ready queue and not known to be done: a
    /// flush waits for them (pruned as batches are taken).
    flight: Mutex<Vec<Arc<Completion>>>,
    pub(crate) wake: Notify,
    /// The random producer id of this queue (see [`identity`]).
    base_id: i64,
    /// Which producer id and epoch batches are stamped with; moves on after a batch failed
    /// for good.
    generation: AtomicU32,
    batch_size: usize,
    compression: quiver_protocol::batch::Compression,
    /// The producer's `numbered_header`.
    numbered_header: Option<Arc<str>>,
}

impl PartitionQueue {
    fn new(
        topic: Arc<str>,
        partition: u32,
        partitions: Arc<AtomicU32>,
        sticky: Arc<AtomicU32>,
        config: &super::ProducerConfig,
    ) -> Self {
        let completion = Arc::new(Completion::new(topic.clone(), partition));
        let numbered_header: Option<Arc<str>> = config.numbered_header.as_deref().map(Into::into);
        PartitionQueue {
            state: Mutex::new(QueueState {
                builder: new_builder(config.compression, 0, numbered_header.as_deref()),
                completion,
                accounted: 0,
                opened: None,
                ready: VecDeque::new(),
                spare: Vec::new(),
            }),
            topic,
            partition,
            partitions,
            sticky,
            flight: Mutex::new(Vec::new()),
            wake: Notify::new(),
            base_id: new_producer_id(),
            generation: AtomicU32::new(0),
            batch_size: config.batch_size_bytes,
            compression: config.compression,
            numbered_header,
        }
    }

    /// A fresh batch builder of this queue with room for `bytes` of records.
    fn builder(&self, bytes: usize) -> BatchBuilder {
        new_builder(self.compression, bytes, self.numbered_header.as_deref())
    }

    /// Appends one record to the open batch, closing it first if the record would not fit.
    pub(crate) fn append(
        &self,
        r: &RecordRef<'_>,
        timestamp: i64,
        want_future: bool,
        shared: &Shared,
    ) -> (Option<Arc<Completion>>, u32) {
        let size = buffered_size(r);
        shared.buffered.fetch_add(size, Ordering::AcqRel);
        let mut st = lock(&self.state);
        let pushed = self.push(&mut st, r, timestamp, size);
        let completion =
            want_future.then(|| pushed.closed_with.unwrap_or_else(|| st.completion.clone()));
        drop(st);
        if pushed.wake {
            self.wake.notify_one();
        }
        (completion, pushed.index)
    }

    /// Locks the queue for a run of records (see [`QueueRun`]).
    pub(crate) fn lock_run<'q>(&'q self, shared: &'q Shared) -> QueueRun<'q> {
        QueueRun {
            queue: self,
            shared,
            st: lock(&self.state),
            size: 0,
            last: None,
            wake: false,
        }
    }

    /// Pushes one record into the open batch, closing it first if the record would not fit
    /// and after it if the batch is then full.
    fn push(&self, st: &mut QueueState, r: &RecordRef<'_>, timestamp: i64, size: usize) -> Pushed {
        let mut wake = false;
        if !st.builder.is_empty() && st.builder.size_bytes() + size > self.batch_size {
            self.close_open(st);
            wake = true;
        }
        if st.builder.is_empty() {
            st.opened = Some(Instant::now());
            wake = true;
        }
        let index = st.builder.len() as u32;
        st.builder.push(r.key, r.value, timestamp, r.headers);
        st.accounted += size;
        let mut closed_with = None;
        if st.builder.size_bytes() >= self.batch_size {
            closed_with = Some(st.completion.clone());
            self.close_open(st);
            wake = true;
        }
        Pushed {
            index,
            closed_with,
            wake,
        }
    }

    /// The batches of this partition not acknowledged or failed yet: the open one (if it
    /// holds records), the closed ones waiting, and those on their way.
    pub(crate) fn unresolved_batches(&self) -> Vec<Arc<Completion>> {
        let st = lock(&self.state);
        let mut out: Vec<Arc<Completion>> = st.ready.iter().map(|c| c.completion.clone()).collect();
        if !st.builder.is_empty() {
            out.push(st.completion.clone());
        }
        // Under the state lock: a batch taken off the ready queue is in `flight` already.
        out.extend(lock(&self.flight).iter().filter(|c| !c.is_done()).cloned());
        out
    }

    /// Moves the open batch to the ready queue and opens a fresh one.
    fn close_open(&self, st: &mut QueueState) {
        let fresh = st
            .spare
            .pop()
            .unwrap_or_else(|| self.builder(self.batch_size.min(1 << 20)));
        let builder = std::mem::replace(&mut st.builder, fresh);
        let completion = std::mem::replace(
            &mut st.completion,
            Arc::new(Completion::new(self.topic.clone(), self.partition)),
        );
        let closed = Closed {
            builder,
            completion,
            accounted: std::mem::take(&mut st.accounted),
            opened: st.opened.take().unwrap_or_else(Instant::now),
        };
        st.ready.push_back(closed);
        // Keyless records move on to the next partition once this one's batch is closed:
        // round robin (from a random start), so N closed batches cover N partitions, where a
        // random pick could leave one out of a short run.
        let partitions = self.partitions.load(Ordering::Relaxed);
        if partitions > 1 && self.sticky.load(Ordering::Relaxed) == self.partition {
            let next = (self.partition + 1) % partitions;
            self.sticky.store(next, Ordering::Relaxed);
        }
    }

    /// The partition's sender: waits for closed batches (or linger), sends them in order.
    pub(crate) async fn run(self: Arc<Self>, shared: Arc<Shared>) {
        let in_flight = Arc::new(Semaphore::new(shared.config.max_in_flight_per_partition));
        let mut generation = self.generation.load(Ordering::Acquire);
        let mut sequence: i32 = 0;
        loop {
            let (next, deadline) = {
                let mut st = lock(&self.state);
                let urgent = shared.flushing.load(Ordering::Acquire) > 0
                    || shared.closing.load(Ordering::Acquire);
                if st.ready.is_empty() && !st.builder.is_empty() {
                    let due = st.opened.map(|o| o + shared.config.linger);
                    if urgent || due.is_some_and(|d| d <= Instant::now()) {
                        self.close_open(&mut st);
                    }
                }
                match st.ready.pop_front() {
                    Some(c) => {
                        // Still under the state lock, so a flush sees it in one place or
                        // the other.
                        let mut flight = lock(&self.flight);
                        flight.retain(|f| !f.is_done());
                        flight.push(c.completion.clone());
                        (Some(c), None)
                    }
                    None => (None, st.opened.map(|o| o + shared.config.linger)),
                }
            };
            let Some(mut closed) = next else {
                if shared.closing.load(Ordering::Acquire) {
                    let st = lock(&self.state);
                    if st.builder.is_empty() && st.ready.is_empty() {
                        break;
                    }
                    continue;
                }
                match deadline {
                    Some(d) => {
                        tokio::select! {
                            _ = self.wake.notified() => {}
                            _ = tokio::time::sleep_until(d) => {}
                        }
                    }
                    None => self.wake.notified().await,
                }
                continue;
            };
            // The broker learns a producer id from the first batch it sees, so the first
            // batch of an id goes alone: pipelined successors could otherwise overtake it.
            let permit = loop {
                let current = self.generation.load(Ordering::Acquire);
                if current != generation {
                    generation = current;
                    sequence = 0;
                }
                let permits = if sequence == 0 {
                    shared.config.max_in_flight_per_partition as u32
                } else {
                    1
                };
                let Ok(permit) = in_flight.clone().acquire_many_owned(permits).await else {
                    break None;
                };
                // A permanent failure may have moved the epoch on while we waited: the new
                // epoch's first batch then waits for every permit, as any first batch does.
                if self.generation.load(Ordering::Acquire) == generation {
                    break Some(permit);
                }
            };
            let Some(permit) = permit else {
                break;
            };
            let records = closed.builder.len();
            if shared.config.acks == Acks::None {
                // Nobody reads the answers, so nothing would notice a refused batch: the
                // sequence gap it leaves would hold every later batch (Kafka ties
                // idempotence to acknowledgements too). Not sequenced, appended as sent.
                closed.builder.set_producer(-1, -1, -1);
            } else {
                let (producer_id, epoch) = identity(self.base_id, generation);
                closed.builder.set_producer(producer_id, epoch, sequence);
                sequence = quiver_protocol::batch::sequence_after(sequence, records as i32);
            }
            let bytes = closed.builder.build();
            {
                let mut st = lock(&self.state);
                if st.spare.len() < 2 {
                    st.spare
                        .push(std::mem::replace(&mut closed.builder, self.builder(0)));
                }
            }
            let batch = InFlight {
                bytes,
                records: records as u64,
                generation,
                completion: closed.completion,
                accounted: closed.accounted,
                opened: closed.opened,
            };
            let span = tracing::debug_span!("produce", records, bytes = batch.bytes.len());
            tokio::spawn(
                self.clone()
                    .deliver(shared.clone(), batch, permit)
                    .instrument(span),
            );
        }
        // Wait for the batches still in flight.
        let _ = in_flight
            .acquire_many(shared.config.max_in_flight_per_partition as u32)
            .await;
    }

    /// Sends one batch, retrying what may succeed later, and completes its records.
    async fn deliver(
        self: Arc<Self>,
        shared: Arc<Shared>,
        batch: InFlight,
        permit: OwnedSemaphorePermit,
    ) {
        let cfg = &shared.config;
        let client = &shared.client;
        let req = ProduceRequest {
            topic: self.topic.to_string(),
            partition: self.partition,
            acks: cfg.acks,
            timeout_ms: client
                .config()
                .request_timeout
                .as_millis()
                .min(u128::from(u32::MAX)) as u32,
        };
        let deadline = batch.opened + cfg.delivery_timeout;
        let mut backoff = Backoff::new(cfg.retry_backoff, std::time::Duration::from_secs(1));
        let timeout = client.config().request_timeout;
        let result = loop {
            let attempt = if cfg.acks == Acks::None {
                client
                    .send_only_for_partition(
                        &self.topic,
                        self.partition,
                        &req,
                        batch.bytes.clone(),
                        timeout,
                    )
                    .await
                    .map(|()| -1)
            } else {
                client
                    .request_for_partition(
                        &self.topic,
                        self.partition,
                        &req,
                        batch.bytes.clone(),
                        timeout,
                    )
                    .await
                    .map(|(resp, _)| resp.base_offset)
            };
            match attempt {
                Ok(base) => break Ok(base),
                Err(e) => {
                    // OutOfOrderSequence is final: the broker no longer remembers the batch.
                    let delay = backoff.next_delay();
                    // Once an earlier batch failed and the partition moved to a new epoch, a
                    // retry of this one could land after the new epoch's batches: it fails
                    // instead (the new epoch's first batch waits for every batch in flight,
                    // and the broker fences the old epoch once it stored the new one's).
                    let replaced = self.generation.load(Ordering::Acquire) != batch.generation;
                    if e.is_retriable() && !replaced && Instant::now() + delay < deadline {
                        tracing::debug!(error = %e, ?delay, "produce failed; retrying the same batch");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    break Err(e);
                }
            }
        };
        if let Err(e) = &result {
            tracing::warn!(topic = %self.topic, partition = self.partition, records = batch.records, error = %e,
                "batch failed; the partition's next batches start a new producer epoch");
            let _ = self.generation.compare_exchange(
                batch.generation,
                batch.generation.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        } else {
            shared
                .bytes_acked
                .fetch_add(batch.bytes.len() as u64, Ordering::Relaxed);
        }
        // Completed and counted before the permit goes: the next epoch's first batch waits
        // for every permit, so by the time anything after a failed batch can be
        // acknowledged, the failure is in the producer's counts (a caller that checks them
        // after a later acknowledgement never misses it).
        batch.completion.complete(result.clone());
        shared.finish_batch(batch.records, batch.accounted, &result);
        drop(permit);
    }
}

/// A stamped, encoded batch on its way to the broker.
struct InFlight {
    bytes: Bytes,
    records: u64,
    /// The queue's generation it was stamped under (see [`identity`]).
    generation: u32,
    completion: Arc<Completion>,
    accounted: usize,
    opened: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyless_records_visit_every_partition_in_turn() {
        let config = super::super::ProducerConfig::default();
        let sticky = Arc::new(AtomicU32::new(1));
        let queues: Vec<PartitionQueue> = (0..3)
            .map(|p| {
                let count = Arc::new(AtomicU32::new(3));
                PartitionQueue::new(Arc::from("t"), p, count, sticky.clone(), &config)
            })
            .collect();
        let mut visited = Vec::new();
        for _ in 0..6 {
            let p = sticky.load(Ordering::Relaxed);
            visited.push(p);
            let q = &queues[p as usize];
            let mut st = q.state.lock().unwrap();
            q.close_open(&mut st);
        }
        assert_eq!(visited, [1, 2, 0, 1, 2, 0]);
        // Closing a batch of a partition that is not the sticky one moves nothing.
        let mut st = queues[0].state.lock().unwrap();
        queues[0].close_open(&mut st);
        assert_eq!(sticky.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_failure_moves_to_the_next_epoch_of_the_same_id_then_to_the_next_id() {
        assert_eq!(identity(77, 0), (77, 0));
        assert_eq!(identity(77, 1), (77, 1));
        assert_eq!(identity(77, EPOCHS_PER_ID - 1), (77, i16::MAX - 1));
        assert_eq!(identity(77, EPOCHS_PER_ID), (78, 0));
        assert_eq!(
            identity(i64::MAX, EPOCHS_PER_ID).0,
            1,
            "stays a positive id"
        );
    }

    /// An idempotent producer's ids stay clear of the ones transaction coordinators hand
    /// out: brokers refuse non-transactional batches of those.
    #[test]
    fn own_ids_stay_below_the_coordinators_bit() {
        let bit = quiver_protocol::batch::COORDINATOR_PRODUCER_ID_BIT;
        for _ in 0..1000 {
            let id = new_producer_id();
            assert!(id > 0 && id & bit == 0, "{id:#x}");
        }
        assert_eq!(identity(bit - 1, EPOCHS_PER_ID).0, 1, "wraps below the bit");
        assert_eq!(identity(bit - 2, EPOCHS_PER_ID), (bit - 1, 0));
    }
}
