//! [`Producer`]: batches records per partition and sends them with idempotent retries.
//!
//! `send*` appends a record to its partition's open [`BatchBuilder`] under a short mutex
//! (no channel hop, no allocation besides the encoded bytes). A background task per
//! partition closes a batch when it is full, when `linger` has passed, or on flush; stamps
//! it with the partition's producer id and sequence; and sends it with up to
//! `max_in_flight_per_partition` requests outstanding. A batch that fails in transit is
//! re-sent with the same bytes (the broker answers a duplicate with its first offsets); one
//! that fails for good fails its records and moves the partition to a new producer id.

mod accumulator;
mod partitioner;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::Compression;
use quiver_protocol::requests::Acks;
use tokio::sync::Notify;

pub use partitioner::{murmur2, partition_for_key, DefaultPartitioner, Partitioner};

use crate::{Client, ClientError, Result};
use accumulator::{PartitionQueue, TopicState};

/// How a [`Producer`] batches and acknowledges.
///
/// ```
/// use std::time::Duration;
/// use quiver_client::{Acks, Compression, ProducerConfig};
/// let cfg = ProducerConfig {
///     acks: Acks::All,
///     linger: Duration::from_millis(10),
///     compression: Compression::Lz4,
///     ..ProducerConfig::default()
/// };
/// assert_eq!(cfg.max_in_flight_per_partition, 5);
/// ```
#[derive(Clone)]
pub struct ProducerConfig {
    /// Acknowledgement level; with `Acks::None` offsets are reported as -1.
    pub acks: Acks,
    /// How long a batch stays open for more records before it is sent.
    pub linger: Duration,
    /// A batch is sent once it holds this many (uncompressed) bytes.
    pub batch_size_bytes: usize,
    /// Codec of the batches.
    pub compression: Compression,
    /// Requests outstanding per partition.
    pub max_in_flight_per_partition: usize,
    /// `send` waits while more than this many bytes are buffered or in flight.
    pub buffer_memory_bytes: usize,
    /// A record fails if it is not acknowledged this long after its batch opened.
    pub delivery_timeout: Duration,
    /// First delay between retries of a batch (doubles up to 1 s).
    pub retry_backoff: Duration,
    /// Picks partitions for records that do not name one.
    pub partitioner: Arc<dyn Partitioner>,
    /// A topic's metadata is looked up again after this long (Kafka's
    /// `metadata.max.age.ms`): partitions added to it meanwhile start getting records.
    pub metadata_max_age: Duration,
    /// A header that records carry last with a value ending in a number that grows from
    /// record to record (a pipeline's `quiver.source`, `topic/partition/offset`): each
    /// batch then holds its key and its value's prefix once, and each record only its
    /// number's distance from the first (see
    /// [`BatchBuilder::set_numbered_header`](quiver_protocol::batch::BatchBuilder::set_numbered_header)).
    /// Readers see the same headers. `None` (the default) writes every header whole.
    pub numbered_header: Option<String>,
}

impl fmt::Debug for ProducerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerConfig")
            .field("acks", &self.acks)
            .field("linger", &self.linger)
            .field("batch_size_bytes", &self.batch_size_bytes)
            .field("compression", &self.compression)
            .field(
                "max_in_flight_per_partition",
                &self.max_in_flight_per_partition,
            )
            .field("buffer_memory_bytes", &self.buffer_memory_bytes)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("retry_backoff", &self.retry_backoff)
            .field("metadata_max_age", &self.metadata_max_age)
            .field("numbered_header", &self.numbered_header)
            .finish_non_exhaustive()
    }
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::Leader,
            linger: Duration::from_millis(5),
            batch_size_bytes: 1024 * 1024,
            compression: Compression::None,
            max_in_flight_per_partition: 5,
            buffer_memory_bytes: 64 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            partitioner: Arc::new(DefaultPartitioner),
            metadata_max_age: Duration::from_secs(300),
            numbered_header: None,
        }
    }
}

/// A record to send.
///
/// ```
/// use quiver_client::ProducerRecord;
/// let r = ProducerRecord::new("orders", "hello")
///     .with_key("customer-7")
///     .with_header("source", "web");
/// assert_eq!(r.partition, None);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    /// Topic name.
    pub topic: String,
    /// Partition; chosen by the partitioner when `None`.
    pub partition: Option<u32>,
    /// Key (drives the default partitioner).
    pub key: Option<Bytes>,
    /// Value.
    pub value: Bytes,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Create time in ms since the epoch; now when `None`.
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    /// A keyless record for `topic`.
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        ProducerRecord {
            topic: topic.into(),
            value: value.into(),
            ..ProducerRecord::default()
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the partition.
    pub fn with_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Sets the timestamp (ms since the epoch).
    pub fn with_timestamp(mut self, timestamp: i64) -> Self {
        self.timestamp = Some(timestamp);
        self
    }
}

/// A borrowed record for [`Producer::send_nowait`]: nothing is copied but into the batch.
///
/// ```
/// use quiver_client::RecordRef;
/// let r = RecordRef::new("orders", b"hello");
/// assert!(r.key.is_none());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Partition; chosen by the partitioner when `None`.
    pub partition: Option<u32>,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Value.
    pub value: &'a [u8],
    /// Headers.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// Create time in ms since the epoch; now when `None`.
    pub timestamp: Option<i64>,
}

impl<'a> RecordRef<'a> {
    /// A keyless record for `topic`.
    pub fn new(topic: &'a str, value: &'a [u8]) -> Self {
        RecordRef {
            topic,
            partition: None,
            key: None,
            value,
            headers: &[],
            timestamp: None,
        }
    }
}

/// An owned copy of a borrowed record (its bytes copied).
impl From<RecordRef<'_>> for ProducerRecord {
    fn from(r: RecordRef<'_>) -> Self {
        ProducerRecord {
            topic: r.topic.to_string(),
            partition: r.partition,
            key: r.key.map(Bytes::copy_from_slice),
            value: Bytes::copy_from_slice(r.value),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v)))
                .collect(),
            timestamp: r.timestamp,
        }
    }
}

/// Where an acknowledged record landed.
///
/// ```no_run
/// # async fn demo(p: quiver_client::Producer) -> quiver_client::Result<()> {
/// let md = p.send(quiver_client::ProducerRecord::new("orders", "x")).await?.await?;
/// println!("{}/{}@{}", md.topic, md.partition, md.offset);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset; -1 with `acks = 0`.
    pub offset: i64,
    /// The record's timestamp.
    pub timestamp: i64,
}

/// Counters of a producer since it was made.
///
/// ```no_run
/// # fn demo(p: &quiver_client::Producer) {
/// let s = p.stats();
/// println!("{} acked, {} failed", s.records_acked, s.records_failed);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ProducerStats {
    /// Records accepted by `send*`.
    pub records_sent: u64,
    /// Records acknowledged.
    pub records_acked: u64,
    /// Records that failed for good.
    pub records_failed: u64,
    /// Batches acknowledged.
    pub batches_acked: u64,
    /// Batch bytes acknowledged.
    pub bytes_acked: u64,
    /// The most recent failure.
    pub last_error: Option<ClientError>,
}

/// The shared outcome of one batch: the base offset, or why it failed.
pub(crate) struct Completion {
    result: OnceLock<Result<i64, ClientError>>,
    waiters: Mutex<Vec<Waker>>,
    topic: Arc<str>,
    partition: u32,
}

impl Completion {
    fn new(topic: Arc<str>, partition: u32) -> Self {
        Completion {
            result: OnceLock::new(),
            waiters: Mutex::new(Vec::new()),
            topic,
            partition,
        }
    }

    fn complete(&self, r: Result<i64, ClientError>) {
        let _ = self.result.set(r);
        let waiters = std::mem::take(&mut *lock(&self.waiters));
        for w in waiters {
            w.wake();
        }
    }

    /// True once its batch was acknowledged or failed.
    fn is_done(&self) -> bool {
        self.result.get().is_some()
    }

    /// Waits until its batch is acknowledged or failed.
    async fn done(&self) {
        std::future::poll_fn(|cx| {
            if self.is_done() {
                return Poll::Ready(());
            }
            let mut waiters = lock(&self.waiters);
            // Checked again under the lock: `complete` sets the result before draining.
            if self.is_done() {
                return Poll::Ready(());
            }
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// Resolves to the [`RecordMetadata`] of one sent record once its batch is acknowledged.
///
/// ```no_run
/// # async fn demo(p: quiver_client::Producer) -> quiver_client::Result<()> {
/// let fut = p.send(quiver_client::ProducerRecord::new("orders", "x")).await?;
/// let md = fut.await?;
/// # Ok(()) }
/// ```
pub struct DeliveryFuture {
    completion: Arc<Completion>,
    index: u32,
    timestamp: i64,
}

impl fmt::Debug for DeliveryFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryFuture")
            .field("topic", &self.completion.topic)
            .field("partition", &self.completion.partition)
            .finish_non_exhaustive()
    }
}

impl DeliveryFuture {
    /// Whether the record's fate is known (acknowledged or failed): awaiting it now returns
    /// at once.
    pub fn is_done(&self) -> bool {
        self.completion.result.get().is_some()
    }

    /// The topic the record was queued for.
    pub fn topic(&self) -> &str {
        &self.completion.topic
    }

    /// The partition the record was queued for.
    pub fn partition(&self) -> u32 {
        self.completion.partition
    }

    fn output(&self, r: &Result<i64, ClientError>) -> Result<RecordMetadata> {
        let base = r.clone()?;
        Ok(RecordMetadata {
            topic: self.completion.topic.clone(),
            partition: self.completion.partition,
            offset: if base < 0 {
                -1
            } else {
                base + i64::from(self.index)
            },
            timestamp: self.timestamp,
        })
    }
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(r) = self.completion.result.get() {
            return Poll::Ready(self.output(r));
        }
        let mut waiters = lock(&self.completion.waiters);
        // Checked again under the lock: `complete` sets the result before draining waiters.
        if let Some(r) = self.completion.result.get() {
            drop(waiters);
            return Poll::Ready(self.output(r));
        }
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Why [`Producer::queue_run`] stopped: the count is how many of its records it queued.
enum Paused {
    /// Every record is queued.
    Done,
    /// The next record needs its topic's partitioner plugin.
    NeedsPlugin(usize),
    /// The buffer is full (or the producer closed): wait for space.
    BufferFull(usize),
}

/// Equal strings, without comparing their bytes when both are the same `str`.
fn same_str(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

/// Ends a run of [`Producer::send_refs`]: the future of its last record replaces the one
/// `out` holds for that partition.
fn end_run(run: Option<accumulator::QueueRun<'_>>, out: &mut RefsQueued) {
    let Some(run) = run else {
        return;
    };
    let partition = run.partition();
    let Some((completion, index, timestamp)) = run.finish() else {
        return;
    };
    let future = DeliveryFuture {
        completion,
        index,
        timestamp,
    };
    match out
        .last
        .iter_mut()
        .find(|d| d.partition() == partition && d.topic() == future.topic())
    {
        Some(slot) => *slot = future,
        None => out.last.push(future),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How records without an explicit partition are routed in one topic.
pub(crate) enum PluginRouting {
    /// The producer's [`Partitioner`] (the topic has no partitioner plugin).
    Default,
    /// The topic's partitioner plugin, run on its own thread.
    #[cfg(feature = "plugins")]
    Plugin(crate::plugins::TopicPartitioner),
    /// The topic has a partitioner plugin (`name@version`) this build cannot run.
    #[cfg(not(feature = "plugins"))]
    Unavailable(String),
}

/// Records routed per hop to a partitioner plugin's thread in [`Producer::send_values`].
#[cfg(feature = "plugins")]
const PLUGIN_CHUNK: usize = 1024;

/// State shared by the producer handle and its partition tasks.
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) config: ProducerConfig,
    topics: RwLock<HashMap<String, Arc<TopicState>>>,
    topic_setup: tokio::sync::Mutex<()>,
    pub(crate) buffered: AtomicUsize,
    pub(crate) space: Notify,
    pub(crate) outstanding: AtomicU64,
    pub(crate) idle: Notify,
    pub(crate) flushing: AtomicUsize,
    pub(crate) closing: AtomicBool,
    closed: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    records_sent: AtomicU64,
    pub(crate) records_acked: AtomicU64,
    pub(crate) records_failed: AtomicU64,
    pub(crate) batches_acked: AtomicU64,
    pub(crate) bytes_acked: AtomicU64,
    pub(crate) last_error: Mutex<Option<ClientError>>,
}

impl Shared {
    /// Called by the send path when a batch finished, successfully or not.
    pub(crate) fn finish_batch(
        &self,
        records: u64,
        accounted: usize,
        r: &Result<i64, ClientError>,
    ) {
        match r {
            Ok(_) => {
                self.records_acked.fetch_add(records, Ordering::Relaxed);
                self.batches_acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.records_failed.fetch_add(records, Ordering::Relaxed);
                *lock(&self.last_error) = Some(e.clone());
            }
        }
        self.buffered.fetch_sub(accounted, Ordering::AcqRel);
        self.space.notify_waiters();
        if self.outstanding.fetch_sub(records, Ordering::AcqRel) == records {
            self.idle.notify_waiters();
        }
    }

    fn all_queues(&self) -> Vec<Arc<PartitionQueue>> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect()
    }
}

/// Marks a flush (or a wait for buffer space) in progress while alive: partition tasks then
/// send open batches without waiting for `linger`. A guard, so a cancelled wait undoes it.
struct Urgent<'a>(&'a Shared);

impl<'a> Urgent<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.flushing.fetch_add(1, Ordering::AcqRel);
        for q in shared.all_queues() {
            q.wake.notify_one();
        }
        Urgent(shared)
    }
}

impl Drop for Urgent<'_> {
    fn drop(&mut self) {
        self.0.flushing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`Producer::send_values_counted`] did: how many values it queued (from the
/// front), and the error that stopped it, if any.
#[derive(Debug)]
pub struct ValuesQueued {
    /// Values queued; they will be sent and resolved like any record.
    pub queued: u64,
    /// Why it stopped before the end; `None` when every value was queued.
    pub error: Option<ClientError>,
}

/// What [`Producer::send_refs`] did: how many records it queued (from the front), the
/// future of the last one queued to each partition, and the error that stopped it, if any.
#[derive(Debug, Default)]
pub struct RefsQueued {
    /// Records queued; they will be sent and resolved like any record.
    pub queued: usize,
    /// For each partition the call queued records to, the future of the last of them. A
    /// partition's batches are stored in order, so once it resolves every earlier record
    /// of the call to that partition was stored too, or failed for good, which
    /// [`Producer::stats`] counts.
    pub last: Vec<DeliveryFuture>,
    /// Why it stopped before the end; `None` when every record was queued.
    pub error: Option<ClientError>,
}

/// Sends records to topics, batching per partition; cheap to clone.
///
/// ```no_run
/// # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
/// use quiver_client::{Producer, ProducerConfig, ProducerRecord, RecordRef};
///
/// let producer = Producer::new(client, ProducerConfig::default());
/// // One record, awaiting its offset:
/// let md = producer.send(ProducerRecord::new("orders", "hello").with_key("k1")).await?.await?;
/// println!("written at offset {}", md.offset);
/// // Bulk, without a future per record; failures show in stats():
/// for i in 0..1000u32 {
///     producer.send_nowait(RecordRef::new("orders", &i.to_be_bytes())).await?;
/// }
/// producer.flush().await;
/// assert_eq!(producer.stats().records_failed, 0);
/// producer.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
    _handle: Arc<CloseOnDrop>,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Tells the partition tasks to drain and stop when the last producer handle is dropped.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.closing.store(true, Ordering::Release);
        for q in self.0.all_queues() {
            q.wake.notify_one();
        }
    }
}

impl Producer {
    /// A producer over `client`; partition tasks start on first use of a topic.
    pub fn new(client: Client, mut config: ProducerConfig) -> Producer {
        config.max_in_flight_per_partition = config.max_in_flight_per_partition.max(1);
        config.batch_size_bytes = config.batch_size_bytes.max(1024);
        let shared = Arc::new(Shared {
            client,
            config,
            topics: RwLock::new(HashMap::new()),
            topic_setup: tokio::sync::Mutex::new(()),
            buffered: AtomicUsize::new(0),
            space: Notify::new(),
            outstanding: AtomicU64::new(0),
            idle: Notify::new(),
            flushing: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            records_sent: AtomicU64::new(0),
            records_acked: AtomicU64::new(0),
            records_failed: AtomicU64::new(0),
            batches_acked: AtomicU64::new(0),
            bytes_acked: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        Producer {
            _handle: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &ProducerConfig {
        &self.shared.config
    }

    /// Queues `record` and returns a future of its offset. Waits while the buffer is full.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        let headers: Vec<(&str, &[u8])> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        self.send_ref(RecordRef {
            topic: &record.topic,
            partition: record.partition,
            key: record.key.as_deref(),
            value: &record.value,
            headers: &headers,
            timestamp: record.timestamp,
        })
        .await
    }

    /// Queues a borrowed record (its bytes are copied into the batch) and returns a future
    /// of its offset: [`send`](Self::send) without building an owned record first.
    pub async fn send_ref(&self, r: RecordRef<'_>) -> Result<DeliveryFuture> {
        let topic = self.topic(r.topic).await?;
        let routed = self.plugin_partition(&topic, &r).await?;
        self.wait_for_space().await?;
        let (completion, index, timestamp) = self.append(&topic, &r, routed, true)?;
        Ok(DeliveryFuture {
            completion: completion.ok_or(ClientError::Closed)?,
            index,
            timestamp,
        })
    }

    /// Queues a borrowed record without a per-record future; failures are counted in
    /// [`stats`](Self::stats) and reported by [`flush`](Self::flush).
    pub async fn send_nowait(&self, record: RecordRef<'_>) -> Result<()> {
        let topic = self.topic(record.topic).await?;
        let routed = self.plugin_partition(&topic, &record).await?;
        self.wait_for_space().await?;
        self.append(&topic, &record, routed, false)?;
        Ok(())
    }

    /// Queues borrowed records in order, as [`send_ref`](Self::send_ref) would one by one,
    /// but looks each topic up once per run of records to it and holds each partition's
    /// queue once per run of records to it: the fast path for many records at once (a
    /// pipeline's output). Returns the future of the last record queued to each partition
    /// rather than one per record.
    pub async fn send_refs(&self, records: &[RecordRef<'_>]) -> RefsQueued {
        let s = &self.shared;
        let mut out = RefsQueued::default();
        let count = records.len() as u64;
        // Counted for the whole call before `close` is checked (as `append` does per
        // record); what is not queued is taken back at the end.
        s.outstanding.fetch_add(count, Ordering::SeqCst);
        let result = if s.closed.load(Ordering::SeqCst) {
            Err(ClientError::Closed)
        } else {
            let mut i = 0;
            let mut result = Ok(());
            while i < records.len() {
                let name = records[i].topic;
                let end = records[i..]
                    .iter()
                    // A caller's records mostly name one topic's `str`: pointers first.
                    .position(|r| !same_str(r.topic, name))
                    .map_or(records.len(), |n| i + n);
                result = self.queue_topic_refs(&records[i..end], &mut out).await;
                if result.is_err() {
                    break;
                }
                i = end;
            }
            result
        };
        let unqueued = count - out.queued as u64;
        if unqueued > 0 && s.outstanding.fetch_sub(unqueued, Ordering::AcqRel) == unqueued {
            s.idle.notify_waiters();
        }
        s.records_sent
            .fetch_add(out.queued as u64, Ordering::Relaxed);
        out.error = result.err();
        out
    }

    /// [`send_refs`](Self::send_refs) of records of one topic, counting into `out`: queues
    /// without awaiting until a record needs its partitioner plugin's answer or the buffer
    /// is full, awaits that, and goes on.
    async fn queue_topic_refs(
        &self,
        records: &[RecordRef<'_>],
        out: &mut RefsQueued,
    ) -> Result<()> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let topic = self.topic(first.topic).await?;
        let mut now = None;
        let (mut from, mut routed) = (0, None);
        while from < records.len() {
            match self.queue_run(&topic, &records[from..], routed.take(), &mut now, out)? {
                Paused::Done => break,
                Paused::NeedsPlugin(n) => {
                    from += n;
                    // Some: queue_run asks only for records its plugin routes.
                    let answer = self.plugin_partition(&topic, &records[from]).await?;
                    routed = Some(answer.ok_or_else(|| {
                        ClientError::Plugin(format!(
                            "topic {}: its partitioner gave no partition",
                            first.topic
                        ))
                    })?);
                }
                Paused::BufferFull(n) => {
                    from += n;
                    self.wait_for_space().await?;
                }
            }
        }
        Ok(())
    }

    /// Queues `records` of one topic until one needs an await (`routed` is the plugin's
    /// answer for the first): each partition's queue is held for a run of records to it.
    fn queue_run(
        &self,
        topic: &TopicState,
        records: &[RecordRef<'_>],
        mut routed: Option<u32>,
        now: &mut Option<i64>,
        out: &mut RefsQueued,
    ) -> Result<Paused> {
        let s = &self.shared;
        let mut held: Option<accumulator::QueueRun<'_>> = None;
        for (i, r) in records.iter().enumerate() {
            let routed = routed.take();
            let plugin = r.partition.is_none() && !matches!(topic.routing, PluginRouting::Default);
            if plugin && routed.is_none() {
                end_run(held, out);
                return Ok(Paused::NeedsPlugin(i));
            }
            let pending = held.as_ref().map_or(0, |h| h.size());
            if s.buffered.load(Ordering::Relaxed) + pending >= s.config.buffer_memory_bytes
                || s.closed.load(Ordering::Relaxed)
            {
                end_run(held, out);
                return Ok(Paused::BufferFull(i));
            }
            let partition = match self.partition_for(topic, r, routed) {
                Ok(p) => p,
                Err(e) => {
                    end_run(held, out);
                    return Err(e);
                }
            };
            if held.as_ref().is_some_and(|h| h.partition() != partition) {
                end_run(held.take(), out);
            }
            let run = held.get_or_insert_with(|| topic.partitions[partition as usize].lock_run(s));
            let timestamp = r
                .timestamp
                .unwrap_or_else(|| *now.get_or_insert_with(now_ms));
            run.push(r, timestamp, accumulator::buffered_size(r));
            out.queued += 1;
        }
        end_run(held, out);
        Ok(Paused::Done)
    }

    /// Queues many keyless values for one topic (and partition, if given) without a
    /// per-record future: the fastest path for bulk loads. Returns how many were queued.
    /// On an error some values may have been queued already (they will be sent);
    /// [`send_values_counted`](Self::send_values_counted) says how many.
    pub async fn send_values<'a, I>(
        &self,
        topic: &str,
        partition: Option<u32>,
        values: I,
    ) -> Result<u64>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let counted = self.send_values_counted(topic, partition, values).await;
        match counted.error {
            Some(e) => Err(e),
            None => Ok(counted.queued),
        }
    }

    /// [`send_values`](Self::send_values) that also reports, when it fails part-way, how
    /// many values (from the front) it queued before the error: those will be sent (and
    /// resolved like any record), the rest were not queued, so a caller resends exactly
    /// `values[queued..]`.
    pub async fn send_values_counted<'a, I>(
        &self,
        topic: &str,
        partition: Option<u32>,
        values: I,
    ) -> ValuesQueued
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut queued = 0;
        let error = self
            .queue_values(topic, partition, values, &mut queued)
            .await
            .err();
        ValuesQueued { queued, error }
    }

    /// The loop of [`send_values_counted`](Self::send_values_counted), counting into `n`.
    async fn queue_values<'a, I>(
        &self,
        topic: &str,
        partition: Option<u32>,
        values: I,
        n: &mut u64,
    ) -> Result<()>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let state = self.topic(topic).await?;
        // One clock read per call: values queued together share a timestamp.
        let timestamp = Some(now_ms());
        if partition.is_none() {
            match &state.routing {
                PluginRouting::Default => {}
                #[cfg(not(feature = "plugins"))]
                PluginRouting::Unavailable(plugin) => {
                    return Err(ClientError::PartitionerUnavailable {
                        topic: topic.to_string(),
                        plugin: plugin.clone(),
                    })
                }
                #[cfg(feature = "plugins")]
                PluginRouting::Plugin(plugin) => {
                    return self
                        .send_values_routed(&state, plugin, topic, timestamp, values, n)
                        .await
                }
            }
        }
        for value in values {
            if self.shared.buffered.load(Ordering::Relaxed)
                >= self.shared.config.buffer_memory_bytes
                || self.shared.closed.load(Ordering::Relaxed)
            {
                self.wait_for_space().await?;
            }
            let r = RecordRef {
                partition,
                timestamp,
                ..RecordRef::new(topic, value)
            };
            self.append(&state, &r, None, false)?;
            *n += 1;
        }
        Ok(())
    }

    /// `send_values` through a topic's partitioner plugin: values go to the plugin's thread
    /// in chunks (one hop per chunk), then are queued in order.
    #[cfg(feature = "plugins")]
    async fn send_values_routed<'a, I>(
        &self,
        state: &TopicState,
        plugin: &crate::plugins::TopicPartitioner,
        topic: &str,
        timestamp: Option<i64>,
        values: I,
        n: &mut u64,
    ) -> Result<()>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let partitions = state.partitions.len() as u32;
        let mut values = values.into_iter().peekable();
        while values.peek().is_some() {
            let chunk: Vec<(Option<Bytes>, Bytes)> = values
                .by_ref()
                .take(PLUGIN_CHUNK)
                .map(|v| (None, Bytes::copy_from_slice(v)))
                .collect();
            let (routed, failed) = plugin
                .partition_many(topic, chunk.clone(), partitions)
                .await;
            for ((_, value), p) in chunk.iter().zip(routed) {
                if self.shared.buffered.load(Ordering::Relaxed)
                    >= self.shared.config.buffer_memory_bytes
                    || self.shared.closed.load(Ordering::Relaxed)
                {
                    self.wait_for_space().await?;
                }
                let r = RecordRef {
                    partition: Some(p),
                    timestamp,
                    ..RecordRef::new(topic, value)
                };
                self.append(state, &r, None, false)?;
                *n += 1;
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sends every buffered record now and waits until all records sent so far (before the
    /// call) are acknowledged or failed; records other tasks send meanwhile are not waited
    /// for. Returns the last error if any record failed since the
    /// producer was made (see [`stats`](Self::stats) for counts).
    pub async fn flush(&self) -> Result<()> {
        let s = &self.shared;
        let urgent = Urgent::new(s);
        // The batches holding what was sent so far: records other tasks send meanwhile go
        // into later batches and are not waited for (except those that join a batch open
        // now, which is sent at once, as the flush asks).
        let batches: Vec<Arc<Completion>> = s
            .all_queues()
            .iter()
            .flat_map(|q| q.unresolved_batches())
            .collect();
        for b in batches {
            b.done().await;
        }
        drop(urgent);
        self.last_failure()
    }

    /// The last error, if any record failed since the producer was made.
    fn last_failure(&self) -> Result<()> {
        let s = &self.shared;
        match lock(&s.last_error).clone() {
            Some(e) if s.records_failed.load(Ordering::Relaxed) > 0 => Err(e),
            _ => Ok(()),
        }
    }

    /// Waits until no record is outstanding: after `close`, when no new one can come.
    async fn until_idle(&self) {
        let s = &self.shared;
        let _urgent = Urgent::new(s);
        loop {
            let idle = s.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if s.outstanding.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
    }

    /// Flushes, then stops the partition tasks. Later sends fail with [`ClientError::Closed`].
    pub async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::SeqCst);
        // Every record counted before `closed` was set is waited for: the flush's snapshot
        // could miss one still being queued.
        self.until_idle().await;
        let r = self.last_failure();
        self.shared.closing.store(true, Ordering::Release);
        for q in self.shared.all_queues() {
            q.wake.notify_one();
        }
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for t in tasks {
            let _ = t.await;
        }
        r
    }

    /// Counters since the producer was made.
    pub fn stats(&self) -> ProducerStats {
        let s = &self.shared;
        ProducerStats {
            records_sent: s.records_sent.load(Ordering::Relaxed),
            records_acked: s.records_acked.load(Ordering::Relaxed),
            records_failed: s.records_failed.load(Ordering::Relaxed),
            batches_acked: s.batches_acked.load(Ordering::Relaxed),
            bytes_acked: s.bytes_acked.load(Ordering::Relaxed),
            last_error: lock(&s.last_error).clone(),
        }
    }

    async fn wait_for_space(&self) -> Result<()> {
        let s = &self.shared;
        loop {
            if s.closed.load(Ordering::Acquire) {
                return Err(ClientError::Closed);
            }
            if s.buffered.load(Ordering::Acquire) < s.config.buffer_memory_bytes {
                return Ok(());
            }
            let space = s.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            if s.buffered.load(Ordering::Acquire) < s.config.buffer_memory_bytes {
                return Ok(());
            }
            // Records waiting for linger must go out, or the buffer never drains.
            let _urgent = Urgent::new(s);
            space.await;
        }
    }

    /// The topic's partition queues, looked up (and their tasks started) on first use.
    async fn topic(&self, name: &str) -> Result<Arc<TopicState>> {
        if let Some(t) = self.lookup(name) {
            if t.metadata_due(self.shared.config.metadata_max_age) {
                return Ok(self.refresh_topic(name, t).await);
            }
            return Ok(t);
        }
        let _guard = self.shared.topic_setup.lock().await;
        if let Some(t) = self.lookup(name) {
            return Ok(t);
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        let partitions = self.shared.client.partition_count(name).await?;
        if partitions == 0 {
            return Err(ClientError::TopicNotFound(format!(
                "topic {name:?} has no partitions"
            )));
        }
        let routing = self.routing(name).await?;
        let (state, tasks) = TopicState::start(name, partitions, routing, &self.shared);
        self.install(name, state.clone(), tasks);
        Ok(state)
    }

    /// How records of topic `name` without a partition are routed (from its cached
    /// metadata).
    async fn routing(&self, name: &str) -> Result<PluginRouting> {
        Ok(
            match &self.shared.client.topic_metadata(name).await?.partitioner {
                None => PluginRouting::Default,
                #[cfg(feature = "plugins")]
                Some(id) => PluginRouting::Plugin(
                    crate::plugins::TopicPartitioner::load(&self.shared.client, id).await?,
                ),
                #[cfg(not(feature = "plugins"))]
                Some(id) => {
                    tracing::warn!(topic = name, plugin = %id, "the topic has a partitioner plugin and this SDK is built without the `plugins` feature: records without an explicit partition will fail");
                    PluginRouting::Unavailable(id.clone())
                }
            },
        )
    }

    /// Makes `state` the topic's, its queues' tasks the producer's.
    fn install(&self, name: &str, state: Arc<TopicState>, tasks: Vec<tokio::task::JoinHandle<()>>) {
        lock(&self.shared.tasks).extend(tasks);
        self.shared
            .topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), state);
    }

    /// Looks topic `name`'s metadata up again: when partitions were added, a state with
    /// queues for them replaces `current` (its queues and batches are kept). On any error,
    /// or while another lookup runs, records go on with `current`.
    async fn refresh_topic(&self, name: &str, current: Arc<TopicState>) -> Arc<TopicState> {
        let Ok(_guard) = self.shared.topic_setup.try_lock() else {
            return current;
        };
        let current = self.lookup(name).unwrap_or(current);
        if self.shared.closed.load(Ordering::Acquire) {
            return current;
        }
        let had = current.partitions.len() as u32;
        let now = match self
            .shared
            .client
            .metadata(Some(vec![name.to_string()]))
            .await
        {
            Ok(resp) => resp
                .topics
                .iter()
                .find(|t| t.name == name)
                .map_or(0, |t| t.partitions.len() as u32),
            Err(e) => {
                tracing::debug!(topic = name, error = %e, "metadata refresh failed; keeping the partitions known");
                return current;
            }
        };
        if now <= had {
            return current;
        }
        let routing = match self.routing(name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(topic = name, error = %e, "the topic has new partitions but its partitioner could not be loaded; keeping the partitions known");
                return current;
            }
        };
        let (state, tasks) = current.grown(name, now, routing, &self.shared);
        self.install(name, state.clone(), tasks);
        tracing::info!(
            topic = name,
            from = had,
            to = now,
            "the topic has new partitions; records go to them too"
        );
        state
    }

    fn lookup(&self, name: &str) -> Option<Arc<TopicState>> {
        self.shared
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The partition the topic's partitioner plugin gives `r`, for a record without an
    /// explicit partition in a topic with a plugin (`None` otherwise). The plugin runs on
    /// its own thread; this only awaits the answer.
    async fn plugin_partition(&self, topic: &TopicState, r: &RecordRef<'_>) -> Result<Option<u32>> {
        if r.partition.is_some() {
            return Ok(None);
        }
        match &topic.routing {
            PluginRouting::Default => Ok(None),
            #[cfg(not(feature = "plugins"))]
            PluginRouting::Unavailable(plugin) => Err(ClientError::PartitionerUnavailable {
                topic: r.topic.to_string(),
                plugin: plugin.clone(),
            }),
            #[cfg(feature = "plugins")]
            PluginRouting::Plugin(plugin) => {
                let n = topic.partitions.len() as u32;
                plugin.partition(r.topic, r.key, r.value, n).await.map(Some)
            }
        }
    }

    /// The partition `r` goes to: the explicit one, else `routed` (the plugin's answer),
    /// else the producer's partitioner (sticky when it has no preference).
    fn partition_for(
        &self,
        topic: &TopicState,
        r: &RecordRef<'_>,
        routed: Option<u32>,
    ) -> Result<u32> {
        let n = topic.partitions.len() as u32;
        match r.partition.or(routed) {
            Some(p) if p < n => Ok(p),
            Some(p) => Err(ClientError::InvalidPartition {
                topic: r.topic.to_string(),
                partition: p,
                partitions: n,
            }),
            None => match &topic.routing {
                PluginRouting::Default => Ok(self
                    .shared
                    .config
                    .partitioner
                    .partition(r.topic, r.key, n)
                    .filter(|p| *p < n)
                    .unwrap_or_else(|| topic.sticky())),
                // Never a silent fallback to another partitioner.
                #[cfg(not(feature = "plugins"))]
                PluginRouting::Unavailable(plugin) => Err(ClientError::PartitionerUnavailable {
                    topic: r.topic.to_string(),
                    plugin: plugin.clone(),
                }),
                #[cfg(feature = "plugins")]
                PluginRouting::Plugin(p) => Err(ClientError::Plugin(format!(
                    "topic {}: record queued without asking its partitioner {}",
                    r.topic,
                    p.id()
                ))),
            },
        }
    }

    /// Queues `r` in its partition (see [`partition_for`](Self::partition_for)).
    #[allow(clippy::type_complexity)]
    fn append(
        &self,
        topic: &TopicState,
        r: &RecordRef<'_>,
        routed: Option<u32>,
        want_future: bool,
    ) -> Result<(Option<Arc<Completion>>, u32, i64)> {
        let partition = self.partition_for(topic, r, routed)?;
        let timestamp = r.timestamp.unwrap_or_else(now_ms);
        let s = &self.shared;
        // Counted before `close` is checked again (both sequentially consistent, as close's
        // store and its flush's read): a close that began meanwhile either sees this record
        // in its flush, or this send sees the close and takes the record back (queued after
        // the partition tasks stopped, it would never be sent or resolved).
        s.outstanding.fetch_add(1, Ordering::SeqCst);
        if s.closed.load(Ordering::SeqCst) {
            if s.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
                s.idle.notify_waiters();
            }
            return Err(ClientError::Closed);
        }
        s.records_sent.fetch_add(1, Ordering::Relaxed);
        let (completion, index) =
            topic.partitions[partition as usize].append(r, timestamp, want_future, s);
        Ok((completion, index, timestamp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(
        name: &str,
        partitions: u32,
        partitioner: Option<&str>,
    ) -> quiver_protocol::requests::TopicMetadata {
        Client::test_topic(name, partitions, partitioner)
    }

    /// A flush waits for the records sent before it, not for those another task sharing the
    /// producer keeps sending. No broker answers here, so every record fails after its
    /// delivery timeout: the other task's records are always on their way, and a flush that
    /// waited for every outstanding record would never return.
    #[tokio::test]
    async fn a_flush_does_not_wait_for_records_sent_after_it_began() {
        let client = Client::offline_for_tests(vec![topic("plain", 2, None)]);
        let producer = Producer::new(
            client,
            ProducerConfig {
                delivery_timeout: Duration::from_millis(1500),
                retry_backoff: Duration::from_millis(50),
                ..ProducerConfig::default()
            },
        );
        let busy = producer.clone();
        let sender = tokio::spawn(async move {
            loop {
                if busy
                    .send_nowait(RecordRef::new("plain", b"theirs"))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mine = producer
            .send(ProducerRecord::new("plain", "mine"))
            .await
            .unwrap();
        let flushed = tokio::time::timeout(Duration::from_secs(20), producer.flush()).await;
        assert!(
            flushed.is_ok(),
            "the flush waited for the other task's records"
        );
        assert!(
            futures::FutureExt::now_or_never(mine).is_some(),
            "the record sent before the flush is resolved when it returns"
        );
        sender.abort();
    }

    /// A bulk send stopped part-way (here the producer closes under it) says how many
    /// values it queued before the error.
    #[tokio::test]
    async fn send_values_counted_reports_what_it_queued_before_an_error() {
        let client = Client::offline_for_tests(vec![topic("plain", 2, None)]);
        let producer = Producer::new(client, ProducerConfig::default());
        let shared = producer.shared.clone();
        let values = (0..5u8).map(|i| {
            if i == 3 {
                shared.closed.store(true, Ordering::SeqCst);
            }
            &b"value"[..]
        });
        let sent = producer.send_values_counted("plain", Some(0), values).await;
        assert_eq!(sent.queued, 3);
        assert!(matches!(sent.error, Some(ClientError::Closed)), "{sent:?}");
        assert_eq!(producer.stats().records_sent, 3);
    }

    /// `send_refs` queues records of several topics and partitions in one call: it counts
    /// them as sent, holds exactly their bytes in the buffer, and hands back one future per
    /// partition, that of the partition's last record.
    #[tokio::test]
    async fn send_refs_queues_every_record_and_returns_each_partitions_last() {
        let client = Client::offline_for_tests(vec![topic("a", 3, None), topic("b", 2, None)]);
        let producer = Producer::new(client, ProducerConfig::default());
        let hdr: &[(&str, &[u8])] = &[("h", b"v")];
        let to = |t, p, value: &'static [u8]| RecordRef {
            partition: Some(p),
            headers: hdr,
            ..RecordRef::new(t, value)
        };
        let records = [
            to("a", 0, b"1"),
            to("a", 0, b"2"),
            to("a", 2, b"3"),
            to("a", 0, b"4"),
            to("b", 1, b"5"),
            to("b", 1, b"6"),
            to("a", 2, b"7"),
        ];
        let sent = producer.send_refs(&records).await;
        assert!(sent.error.is_none(), "{sent:?}");
        assert_eq!(sent.queued, records.len());
        assert_eq!(producer.stats().records_sent, records.len() as u64);
        let bytes: usize = records.iter().map(accumulator::buffered_size).sum();
        assert_eq!(producer.shared.buffered.load(Ordering::SeqCst), bytes);
        let mut last: Vec<(String, u32, u32)> = sent
            .last
            .iter()
            .map(|d| (d.topic().to_string(), d.partition(), d.index))
            .collect();
        last.sort();
        // The index is the record's place in its partition's open batch: a/0 holds three,
        // a/2 two (one of them after the run of b), b/1 two.
        assert_eq!(
            last,
            [("a".into(), 0, 2), ("a".into(), 2, 1), ("b".into(), 1, 1)]
        );
        assert_eq!(producer.shared.outstanding.load(Ordering::SeqCst), 7);
    }

    /// A record `send_refs` cannot queue stops it there: the records before it are queued
    /// (and counted, bytes and all), the rest are not, and nothing stays counted as
    /// outstanding for them.
    #[tokio::test]
    async fn send_refs_stops_at_a_bad_record_having_queued_those_before_it() {
        let client = Client::offline_for_tests(vec![topic("a", 2, None)]);
        let producer = Producer::new(client, ProducerConfig::default());
        let at = |p| RecordRef {
            partition: Some(p),
            ..RecordRef::new("a", b"value")
        };
        let records = [at(0), at(1), at(1), at(5), at(0)];
        let sent = producer.send_refs(&records).await;
        assert_eq!(sent.queued, 3);
        assert!(
            matches!(
                sent.error,
                Some(ClientError::InvalidPartition { partition: 5, .. })
            ),
            "{sent:?}"
        );
        assert_eq!(sent.last.len(), 2);
        let bytes: usize = records[..3].iter().map(accumulator::buffered_size).sum();
        assert_eq!(producer.shared.buffered.load(Ordering::SeqCst), bytes);
        assert_eq!(producer.shared.outstanding.load(Ordering::SeqCst), 3);
        assert_eq!(producer.stats().records_sent, 3);
    }

    /// More records than the buffer holds: `send_refs` waits for space part-way and goes
    /// on. No broker answers here, so space comes back as the first records fail after
    /// their delivery timeout; every record is queued in the end, each failed one counted.
    #[tokio::test]
    async fn send_refs_waits_for_buffer_space_and_queues_everything() {
        let client = Client::offline_for_tests(vec![topic("a", 1, None)]);
        let producer = Producer::new(
            client,
            ProducerConfig {
                buffer_memory_bytes: 4096,
                batch_size_bytes: 1024,
                delivery_timeout: Duration::from_millis(300),
                retry_backoff: Duration::from_millis(20),
                ..ProducerConfig::default()
            },
        );
        let value = [7u8; 200];
        let records = vec![RecordRef::new("a", &value); 100];
        let started = std::time::Instant::now();
        let sent = tokio::time::timeout(Duration::from_secs(60), producer.send_refs(&records))
            .await
            .expect("send_refs never found space");
        // Space comes back only when the first records fail, a delivery timeout after they
        // were queued: a call that returned sooner queued past the buffer's limit.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "send_refs queued 22 KB into a 4 KB buffer without waiting"
        );
        assert!(sent.error.is_none(), "{sent:?}");
        assert_eq!(sent.queued, 100);
        assert_eq!(sent.last.len(), 1);
        let _ = producer.flush().await;
        let stats = producer.stats();
        assert_eq!(stats.records_failed, 100, "{stats:?}");
        assert_eq!(producer.shared.buffered.load(Ordering::SeqCst), 0);
    }

    /// Without the `plugins` feature, a topic's partitioner cannot run: every way of
    /// sending a record without a partition fails with the typed error naming the topic
    /// and the plugin, nothing is queued for it, and records with a partition still go.
    #[cfg(not(feature = "plugins"))]
    #[tokio::test]
    async fn a_partitioner_topic_fails_send_with_a_typed_error_without_the_plugins_feature() {
        let client = Client::offline_for_tests(vec![
            topic("orders", 3, Some("route@1.0.0")),
            topic("plain", 3, None),
        ]);
        let producer = Producer::new(client, ProducerConfig::default());
        let is_unavailable = |e: &ClientError| {
            matches!(e, ClientError::PartitionerUnavailable { topic, plugin }
                if topic == "orders" && plugin == "route@1.0.0")
        };

        let e = producer
            .send(ProducerRecord::new("orders", "x").with_key("k"))
            .await
            .unwrap_err();
        assert!(is_unavailable(&e), "{e:?}");
        let msg = e.to_string();
        for part in ["orders", "route@1.0.0", "`plugins` cargo feature"] {
            assert!(msg.contains(part), "{msg:?} lacks {part:?}");
        }
        assert!(!e.is_retriable());

        let e = producer
            .send_nowait(RecordRef::new("orders", b"x"))
            .await
            .unwrap_err();
        assert!(is_unavailable(&e), "{e:?}");
        let e = producer
            .send_values("orders", None, [&b"a"[..], &b"b"[..]])
            .await
            .unwrap_err();
        assert!(is_unavailable(&e), "{e:?}");
        assert_eq!(producer.stats().records_sent, 0, "nothing was queued");

        // An explicit partition does not need the partitioner; a topic without one uses
        // the producer's partitioner as before.
        producer
            .send(ProducerRecord::new("orders", "x").with_partition(2))
            .await
            .unwrap();
        assert_eq!(
            producer
                .send_values("orders", Some(1), [&b"a"[..], &b"b"[..]])
                .await
                .unwrap(),
            2
        );
        producer
            .send(ProducerRecord::new("plain", "x").with_key("k"))
            .await
            .unwrap();
        assert_eq!(producer.stats().records_sent, 4);
    }

    #[tokio::test]
    async fn explicit_partitions_beyond_the_topic_are_refused() {
        let client = Client::offline_for_tests(vec![topic("plain", 2, None)]);
        let producer = Producer::new(client, ProducerConfig::default());
        let e = producer
            .send(ProducerRecord::new("plain", "x").with_partition(2))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::InvalidPartition {
                    partition: 2,
                    partitions: 2,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
