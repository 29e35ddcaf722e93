//! [`Consumer`]: reads assigned partitions from chosen positions, as batches or a stream.
//!
//! Each assigned partition has a task that keeps one fetch outstanding (long-poll) or holds
//! a push subscription, and hands whole fetched payloads to the consumer through one
//! bounded channel (the backpressure). Records are decoded on the consumer's side, in
//! `poll`, skipping the ones before the requested offset (a stored batch may start earlier).
//! Consumer groups will sit on top of this (a `GroupConsumer` driving `assign`/`seek`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use quiver_protocol::batch::{split_batches, BatchHeader, Header, RecordIter};
use quiver_protocol::requests::{AbortedTxn, FetchRequest, Isolation, OffsetSpec};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::admin::list_offset;
use crate::backoff::Backoff;
use crate::{Client, ClientError, Result};

/// How partition data is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsumeMode {
    /// Long-poll fetches, one always outstanding per partition.
    #[default]
    LongPoll,
    /// A push subscription per partition (QUIC flow control is the backpressure).
    Subscribe,
}

/// Where to (re)start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    /// The first offset still stored.
    Beginning,
    /// The end: only records written from now on.
    End,
    /// An absolute offset.
    Offset(i64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// What to do when a partition's position is no longer (or not yet) in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// Jump to the first stored offset.
    #[default]
    Earliest,
    /// Jump to the end.
    Latest,
    /// Report [`ClientError::OffsetOutOfRange`] from `poll`.
    Error,
}

/// How a [`Consumer`] fetches.
///
/// ```
/// use quiver_client::{ConsumeMode, ConsumerConfig, SeekTo};
/// let cfg = ConsumerConfig { mode: ConsumeMode::Subscribe, start: SeekTo::Beginning, ..ConsumerConfig::default() };
/// assert_eq!(cfg.max_bytes, 4 * 1024 * 1024);
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Upper bound of one fetch's (or pushed chunk's) payload.
    pub max_bytes: u32,
    /// Long-poll wait of a fetch.
    pub max_wait_ms: u32,
    /// A fetch answers as soon as this many bytes are available.
    pub min_bytes: u32,
    /// Long-poll or push.
    pub mode: ConsumeMode,
    /// Where newly assigned partitions start unless `seek` says otherwise (Kafka: latest).
    pub start: SeekTo,
    /// What to do when the position falls out of the log.
    pub reset: OffsetReset,
    /// Fetched payloads buffered across all partitions before fetching pauses; also the
    /// most one poll takes, so a poll stays bounded however fast the fetches refill.
    pub buffer_chunks: usize,
    /// A consume-time processor the partition leader runs before sending: dropped records
    /// never cross the network, and the records received keep their source offsets (so
    /// offsets may have gaps).
    pub processor: Option<quiver_protocol::requests::ProcessorSpec>,
    /// Read-uncommitted (default: every record) or read-committed (only records of
    /// committed transactions, up to the last stable offset; always long-poll).
    pub isolation: Isolation,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_bytes: 4 * 1024 * 1024,
            max_wait_ms: 500,
            min_bytes: 1,
            mode: ConsumeMode::LongPoll,
            start: SeekTo::End,
            reset: OffsetReset::Earliest,
            buffer_chunks: 16,
            processor: None,
            isolation: Isolation::ReadUncommitted,
        }
    }
}

/// One record read from a partition.
///
/// ```no_run
/// # fn demo(r: quiver_client::ConsumedRecord) {
/// println!("{}/{}@{}: {}", r.topic, r.partition, r.offset, String::from_utf8_lossy(&r.value));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
    /// Timestamp (ms since the epoch).
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Bytes,
    /// Headers.
    pub headers: Vec<Header>,
}

/// A fetched payload, or the error that stopped a partition's task.
struct Fetched {
    topic: Arc<str>,
    partition: u32,
    generation: u64,
    data: Result<Chunk>,
}

struct Chunk {
    /// The offset asked for: records before it are skipped.
    from: i64,
    /// Aborted transactions among the batches (read-committed): their batches are skipped.
    aborted: Vec<AbortedTxn>,
    /// Whole stored batches.
    batches: Bytes,
    /// The offset after the last batch.
    next: i64,
}

struct PartState {
    position: Option<i64>,
    /// Offset of the last record decoded for this partition and the end of the chunk it
    /// came in: when `records()` hands that record out, the position jumps to the chunk's
    /// end, which with a processor may lie past the last record.
    tail: Option<(i64, i64)>,
    pending: Option<SeekTo>,
    generation: u64,
    task: Option<JoinHandle<()>>,
}

impl Drop for PartState {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Reads assigned partitions.
///
/// ```no_run
/// # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
/// use futures::StreamExt;
/// use quiver_client::{Consumer, ConsumerConfig, SeekTo};
///
/// let mut consumer = Consumer::new(client, ConsumerConfig::default());
/// consumer.assign("orders", [0, 1, 2]).await?;
/// consumer.seek("orders", 0, SeekTo::Beginning)?;
/// let ends = consumer.end_offsets("orders").await?;
/// let records = consumer.records();
/// futures::pin_mut!(records);
/// while let Some(r) = records.next().await {
///     let r = r?;
///     println!("{}@{}", r.partition, r.offset);
///     if r.offset + 1 >= ends[&r.partition] { break; }
/// }
/// # Ok(()) }
/// ```
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    parts: BTreeMap<(Arc<str>, u32), PartState>,
    tx: mpsc::Sender<Fetched>,
    rx: mpsc::Receiver<Fetched>,
    buffer: VecDeque<ConsumedRecord>,
    /// The last generation number handed out: every fetch task gets a number never used
    /// before, so chunks of a stopped task (still in the channel) never pass for a new one's.
    generations: u64,
    /// An error met after records of the same poll were already decoded: those records
    /// are returned first, the error by the next poll.
    deferred: Option<ClientError>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .field("assigned", &self.parts.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A consumer over `client` with nothing assigned.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        let (tx, rx) = mpsc::channel(config.buffer_chunks.max(1));
        Consumer {
            client,
            config,
            parts: BTreeMap::new(),
            tx,
            rx,
            buffer: VecDeque::new(),
            generations: 0,
            deferred: None,
        }
    }

    /// Adds partitions of `topic` to the assignment (checked against the topic's metadata).
    /// They start at `config.start` unless [`seek`](Self::seek) says otherwise.
    pub async fn assign(
        &mut self,
        topic: &str,
        partitions: impl IntoIterator<Item = u32>,
    ) -> Result<()> {
        let partitions: Vec<u32> = partitions.into_iter().collect();
        let highest = partitions.iter().copied().max().unwrap_or(0);
        // A partition added since the topic's metadata was cached is found by asking again.
        let count = self
            .client
            .partition_count_including(topic, highest)
            .await?;
        let topic: Arc<str> = Arc::from(topic);
        for p in partitions {
            let generation = self.next_generation();
            if p >= count {
                return Err(ClientError::InvalidPartition {
                    topic: topic.to_string(),
                    partition: p,
                    partitions: count,
                });
            }
            self.parts.entry((topic.clone(), p)).or_insert(PartState {
                position: None,
                tail: None,
                pending: Some(self.config.start),
                generation,
                task: None,
            });
        }
        Ok(())
    }

    /// Assigns every partition of `topic`.
    pub async fn assign_all(&mut self, topic: &str) -> Result<()> {
        let count = self.client.partition_count(topic).await?;
        self.assign(topic, 0..count).await
    }

    /// The assigned partitions.
    pub fn assignment(&self) -> Vec<(Arc<str>, u32)> {
        self.parts.keys().cloned().collect()
    }

    /// Removes partitions of `topic` from the assignment: their fetches stop and records
    /// already fetched for them are dropped.
    pub fn unassign(&mut self, topic: &str, partitions: impl IntoIterator<Item = u32>) {
        for p in partitions {
            self.parts.remove(&(Arc::from(topic), p));
            self.buffer
                .retain(|r| !(&*r.topic == topic && r.partition == p));
        }
    }

    /// Moves an assigned partition's position; data already fetched for it is dropped.
    pub fn seek(&mut self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        let generation = self.next_generation();
        let key = (Arc::from(topic), partition);
        let st = self.parts.get_mut(&key).ok_or_else(|| {
            ClientError::Config(format!(
                "{topic}/{partition} is not assigned to this consumer"
            ))
        })?;
        if let Some(t) = st.task.take() {
            t.abort();
        }
        st.generation = generation;
        st.position = None;
        st.tail = None;
        st.pending = Some(to);
        self.buffer
            .retain(|r| !(&*r.topic == topic && r.partition == partition));
        Ok(())
    }

    /// Where reading goes on after the record at `last` of `topic`/`partition`, handed
    /// out by the latest poll: the end of the chunk it came in when it was that chunk's
    /// last record (the chunk's trailing transaction markers, and the aborted records a
    /// read-committed consumer skips, lie before that end), else `last + 1`. Committing
    /// this leaves no lag behind a transaction's marker.
    pub fn next_after(&self, topic: &str, partition: u32, last: i64) -> i64 {
        match self
            .parts
            .get(&(Arc::from(topic), partition))
            .and_then(|s| s.tail)
        {
            Some((l, next)) if l == last => next.max(last + 1),
            _ => last + 1,
        }
    }

    /// Where reading of `topic`/`partition` goes on, as far as it is known without asking
    /// the broker: past the last chunk a poll decoded, markers and aborted records included.
    /// `None` before its first chunk, after a seek, while records a stream has not yielded
    /// yet wait in the buffer, or when not assigned.
    pub fn decoded_position(&self, topic: &str, partition: u32) -> Option<i64> {
        let st = self.parts.get(&(Arc::from(topic), partition))?;
        let waiting = self
            .buffer
            .iter()
            .any(|r| r.partition == partition && &*r.topic == topic);
        if waiting {
            return None;
        }
        st.position
    }

    /// The offset of the next record this consumer will hand out for the partition.
    pub async fn position(&mut self, topic: &str, partition: u32) -> Result<i64> {
        let key: (Arc<str>, u32) = (Arc::from(topic), partition);
        let Some(st) = self.parts.get(&key) else {
            return Err(ClientError::Config(format!(
                "{topic}/{partition} is not assigned to this consumer"
            )));
        };
        if let Some(p) = st.position {
            return Ok(p);
        }
        let to = st.pending.unwrap_or(self.config.start);
        let offset = self.resolve(topic, partition, to).await?;
        if let Some(st) = self.parts.get_mut(&key) {
            st.position = Some(offset);
            st.pending = None;
        }
        Ok(offset)
    }

    /// The end offset of every partition of `topic` for this consumer's isolation (the high
    /// watermark; read-committed: the last stable offset): reading up to these means
    /// "caught up".
    pub async fn end_offsets(&self, topic: &str) -> Result<BTreeMap<u32, i64>> {
        self.offsets(topic, latest_for(self.config.isolation)).await
    }

    /// The first stored offset of every partition of `topic`.
    pub async fn beginning_offsets(&self, topic: &str) -> Result<BTreeMap<u32, i64>> {
        self.offsets(topic, OffsetSpec::Earliest).await
    }

    async fn offsets(&self, topic: &str, spec: OffsetSpec) -> Result<BTreeMap<u32, i64>> {
        let n = self.client.partition_count(topic).await?;
        let lookups = (0..n).map(|p| async move {
            list_offset(&self.client, topic, p, spec)
                .await
                .map(|o| (p, o))
        });
        futures::future::try_join_all(lookups)
            .await
            .map(|v| v.into_iter().collect())
    }

    /// Resolves a start position. "The end" for a read-committed consumer is the last
    /// stable offset, not the high watermark: records of a transaction still open below the
    /// watermark are read once it commits (starting at the watermark skipped them).
    async fn resolve(&self, topic: &str, partition: u32, to: SeekTo) -> Result<i64> {
        let spec = match to {
            SeekTo::Offset(o) => return Ok(o),
            SeekTo::Beginning => OffsetSpec::Earliest,
            SeekTo::End => latest_for(self.config.isolation),
            SeekTo::Timestamp(t) => OffsetSpec::Timestamp(t),
        };
        list_offset(&self.client, topic, partition, spec).await
    }

    /// Starts the fetch task of every assigned partition that has none.
    async fn start_tasks(&mut self) -> Result<()> {
        let idle: Vec<(Arc<str>, u32)> = self
            .parts
            .iter()
            .filter(|(_, s)| s.task.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        for key in idle {
            let offset = self.position(&key.0, key.1).await?;
            let Some(st) = self.parts.get_mut(&key) else {
                continue;
            };
            let fetcher = Fetcher {
                client: self.client.clone(),
                config: self.config.clone(),
                topic: key.0.clone(),
                partition: key.1,
                generation: st.generation,
                tx: self.tx.clone(),
            };
            let span = tracing::debug_span!("consume", topic = %key.0, partition = key.1);
            st.task = Some(tokio::spawn(fetcher.run(offset).instrument(span)));
        }
        Ok(())
    }

    /// Waits up to `max_wait_ms` for records and returns what arrived (possibly nothing).
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>> {
        self.poll_timeout(Duration::from_millis(u64::from(self.config.max_wait_ms)))
            .await
    }

    /// Waits up to `timeout` for records of the assigned partitions and returns what was
    /// already fetched (possibly none): at most `buffer_chunks` fetched payloads. Without
    /// that bound a poll kept taking the chunks the fetch tasks refilled while it decoded,
    /// and under a backlog one poll grew to hundreds of thousands of records.
    pub async fn poll_timeout(&mut self, timeout: Duration) -> Result<Vec<ConsumedRecord>> {
        if !self.buffer.is_empty() {
            return Ok(self.buffer.drain(..).collect());
        }
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        self.start_tasks().await?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let first = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(f)) => f,
                Ok(None) | Err(_) => return Ok(out),
            };
            let mut taken = self.take(first, &mut out);
            let mut chunks = 1;
            while taken.is_ok() && chunks < self.config.buffer_chunks {
                chunks += 1;
                match self.rx.try_recv() {
                    Ok(f) => taken = self.take(f, &mut out),
                    Err(_) => break,
                }
            }
            // Records already decoded (their positions moved past them) are handed out
            // before the error: dropping them here would skip them for good.
            if let Err(e) = taken {
                if out.is_empty() {
                    return Err(e);
                }
                self.deferred = Some(e);
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    fn next_generation(&mut self) -> u64 {
        self.generations += 1;
        self.generations
    }

    /// Decodes one fetched payload into `out` and advances the partition's position.
    fn take(&mut self, f: Fetched, out: &mut Vec<ConsumedRecord>) -> Result<()> {
        let fresh = self.next_generation();
        let key = (f.topic, f.partition);
        let Some(st) = self.parts.get_mut(&key) else {
            return Ok(());
        };
        if st.generation != f.generation {
            return Ok(());
        }
        let chunk = match f.data {
            Ok(c) => c,
            Err(e) => {
                st.task = None;
                st.generation = fresh;
                st.pending = st.position.map(SeekTo::Offset).or(st.pending);
                return Err(e);
            }
        };
        let limits = self.client.limits();
        let before = out.len();
        if let Err(e) = decode_chunk(&key.0, key.1, &chunk, limits.max_decompressed_bytes, out) {
            // None of the chunk's records is handed out, and the position stays before it;
            // the fetch task (already past it) stops, and the next poll fetches the chunk
            // again from the position, so it is never skipped in silence.
            out.truncate(before);
            if let Some(t) = st.task.take() {
                t.abort();
            }
            st.generation = fresh;
            st.pending = st.position.map(SeekTo::Offset).or(st.pending);
            return Err(e);
        }
        let next = chunk.next.max(chunk.from);
        st.position = Some(next);
        st.tail = match (out.len() > before).then(|| out[out.len() - 1].offset) {
            Some(last) => Some((last, next)),
            None => st.tail.map(|(last, _)| (last, next)),
        };
        Ok(())
    }

    /// All records as an async stream (fetched in the background, decoded as they come).
    pub fn records(&mut self) -> impl Stream<Item = Result<ConsumedRecord>> + '_ {
        futures::stream::unfold(self, |c| async move {
            loop {
                if let Some(r) = c.buffer.pop_front() {
                    if let Some(st) = c.parts.get_mut(&(r.topic.clone(), r.partition)) {
                        st.position = Some(match st.tail {
                            Some((last, next)) if last == r.offset => next,
                            _ => r.offset + 1,
                        });
                    }
                    return Some((Ok(r), c));
                }
                let timeout = Duration::from_secs(3600);
                match c.poll_timeout(timeout).await {
                    Ok(v) => c.buffer.extend(v),
                    Err(e) => return Some((Err(e), c)),
                }
            }
        })
    }
}

/// Decodes the records of `chunk` at or after `chunk.from` into `out`.
fn decode_chunk(
    topic: &Arc<str>,
    partition: u32,
    chunk: &Chunk,
    max_decompressed: usize,
    out: &mut Vec<ConsumedRecord>,
) -> Result<()> {
    for batch in split_batches(&chunk.batches, usize::MAX)? {
        let header = BatchHeader::parse(&batch)?;
        if header.next_offset() <= chunk.from || header.is_control() {
            continue;
        }
        if header.is_transactional()
            && chunk.aborted.iter().any(|a| {
                a.producer_id == header.producer_id
                    && (a.first_offset..=a.last_offset).contains(&header.base_offset)
            })
        {
            continue;
        }
        // Room for the batch's records at once (a record takes at least 7 bytes, so a
        // lying count cannot reserve more than the bytes present allow).
        let count = usize::try_from(header.record_count).unwrap_or(0);
        out.reserve(count.min(batch.len() / 7));
        for rec in RecordIter::new(&batch, max_decompressed)? {
            let rec = rec?;
            if rec.offset < chunk.from {
                continue;
            }
            out.push(ConsumedRecord {
                topic: topic.clone(),
                partition,
                offset: rec.offset,
                timestamp: rec.timestamp,
                key: rec.key,
                value: rec.value,
                headers: rec.headers,
            });
        }
    }
    Ok(())
}

/// The offset after the last batch of a payload, from the batch headers alone.
fn next_offset(payload: &Bytes) -> Result<Option<i64>> {
    let mut next = None;
    let mut pos = 0;
    while pos < payload.len() {
        let h = BatchHeader::parse(&payload[pos..])?;
        next = Some(h.next_offset());
        pos += h.total_len();
    }
    if pos > payload.len() {
        return Err(ClientError::Protocol(
            quiver_protocol::ProtocolError::Truncated {
                needed: pos - payload.len(),
            },
        ));
    }
    Ok(next)
}

/// One partition's background reader.
struct Fetcher {
    client: Client,
    config: ConsumerConfig,
    topic: Arc<str>,
    partition: u32,
    generation: u64,
    tx: mpsc::Sender<Fetched>,
}

/// What to do after a failed fetch.
enum Recovery {
    Retry,
    Restart(i64),
    Fail(ClientError),
}

type FetchResult = Result<(quiver_protocol::requests::FetchResponse, Bytes)>;

impl Fetcher {
    async fn run(self, offset: i64) {
        match (self.config.mode, self.config.isolation) {
            // Pushed chunks carry no last stable offset: read-committed always long-polls.
            (ConsumeMode::LongPoll, _) | (_, Isolation::ReadCommitted) => {
                self.long_poll(offset).await
            }
            (ConsumeMode::Subscribe, Isolation::ReadUncommitted) => self.subscribe(offset).await,
        }
    }

    fn spawn_fetch(&self, offset: i64) -> JoinHandle<FetchResult> {
        let client = self.client.clone();
        let topic = self.topic.clone();
        let partition = self.partition;
        let req = FetchRequest {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes: self.config.max_bytes,
            max_wait_ms: self.config.max_wait_ms,
            min_bytes: self.config.min_bytes,
            processor: self.config.processor.clone(),
            isolation: self.config.isolation,
        };
        let timeout = client.config().request_timeout
            + Duration::from_millis(u64::from(self.config.max_wait_ms));
        tokio::spawn(async move {
            client
                .request_for_partition(&topic, partition, &req, Bytes::new(), timeout)
                .await
        })
    }

    /// Sends a chunk to the consumer; false when the consumer is gone.
    async fn deliver(&self, data: Result<Chunk>) -> bool {
        self.tx
            .send(Fetched {
                topic: self.topic.clone(),
                partition: self.partition,
                generation: self.generation,
                data,
            })
            .await
            .is_ok()
    }

    async fn recover(&self, e: ClientError) -> Recovery {
        match e {
            ClientError::OffsetOutOfRange(_) => {
                let spec = match self.config.reset {
                    OffsetReset::Earliest => OffsetSpec::Earliest,
                    OffsetReset::Latest => latest_for(self.config.isolation),
                    OffsetReset::Error => return Recovery::Fail(e),
                };
                match list_offset(&self.client, &self.topic, self.partition, spec).await {
                    Ok(o) => {
                        tracing::warn!(topic = %self.topic, partition = self.partition, offset = o,
                            "position out of range; resetting");
                        Recovery::Restart(o)
                    }
                    Err(e) if e.is_retriable() => Recovery::Retry,
                    Err(e) => Recovery::Fail(e),
                }
            }
            e if e.is_retriable() => {
                tracing::debug!(error = %e, "fetch failed; retrying");
                // The leader may have moved: the next attempt (a subscription as well as a
                // fetch) looks it up again.
                self.client.invalidate_metadata(&self.topic);
                Recovery::Retry
            }
            e => Recovery::Fail(e),
        }
    }

    async fn long_poll(self, mut offset: i64) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut inflight = self.spawn_fetch(offset);
        loop {
            let result = match (&mut inflight).await {
                Ok(r) => r,
                Err(join) => {
                    if join.is_cancelled() {
                        return;
                    }
                    Err(ClientError::Transport {
                        addr: self.client.config().bootstrap.clone(),
                        reason: join.to_string(),
                    })
                }
            };
            match result {
                Ok((resp, payload)) => {
                    backoff.reset();
                    let next = match next_offset(&payload) {
                        Ok(n) => n,
                        Err(e) => {
                            self.deliver(Err(e)).await;
                            return;
                        }
                    };
                    match next {
                        Some(next) if next > offset => {
                            let from = offset;
                            offset = next;
                            inflight = self.spawn_fetch(offset);
                            let chunk = Chunk {
                                from,
                                aborted: resp.aborted,
                                batches: payload,
                                next,
                            };
                            if !self.deliver(Ok(chunk)).await {
                                inflight.abort();
                                return;
                            }
                        }
                        Some(_) => {
                            // Nothing at or after the offset: do not spin on a quick answer.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            inflight = self.spawn_fetch(offset);
                        }
                        None => inflight = self.spawn_fetch(offset),
                    }
                }
                Err(e) => match self.recover(e).await {
                    Recovery::Retry => {
                        tokio::time::sleep(backoff.next_delay()).await;
                        inflight = self.spawn_fetch(offset);
                    }
                    Recovery::Restart(o) => {
                        offset = o;
                        inflight = self.spawn_fetch(offset);
                    }
                    Recovery::Fail(e) => {
                        self.deliver(Err(e)).await;
                        return;
                    }
                },
            }
        }
    }

    async fn subscribe(self, mut offset: i64) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let err = match self
                .client
                .subscribe_with(
                    &self.topic,
                    self.partition,
                    offset,
                    self.config.max_bytes,
                    self.config.processor.clone(),
                )
                .await
            {
                Ok(mut sub) => loop {
                    match sub.next_chunk().await {
                        Ok(Some((_, payload))) => {
                            backoff.reset();
                            let next = match next_offset(&payload) {
                                Ok(Some(n)) => n,
                                Ok(None) => continue,
                                Err(e) => break e,
                            };
                            if next <= offset {
                                continue;
                            }
                            let chunk = Chunk {
                                from: offset,
                                aborted: Vec::new(),
                                batches: payload,
                                next,
                            };
                            offset = next;
                            if !self.deliver(Ok(chunk)).await {
                                return;
                            }
                        }
                        Ok(None) => {
                            break ClientError::Transport {
                                addr: self.client.config().bootstrap.clone(),
                                reason: "the broker ended the subscription".into(),
                            }
                        }
                        Err(e) => break e,
                    }
                },
                Err(e) => e,
            };
            match self.recover(err).await {
                Recovery::Retry => tokio::time::sleep(backoff.next_delay()).await,
                Recovery::Restart(o) => offset = o,
                Recovery::Fail(e) => {
                    self.deliver(Err(e)).await;
                    return;
                }
            }
        }
    }
}

/// The end of a partition for a consumer of `isolation`: the high watermark, or for
/// read-committed the last stable offset (Kafka's rule).
fn latest_for(isolation: Isolation) -> OffsetSpec {
    match isolation {
        Isolation::ReadUncommitted => OffsetSpec::Latest,
        Isolation::ReadCommitted => OffsetSpec::LastStable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::{set_base_offset, BatchBuilder, Compression};

    fn batch(base: i64, n: usize) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..n {
            b.push(
                None,
                format!("v{}", base + i as i64).as_bytes(),
                1000 + i as i64,
                &[],
            );
        }
        let mut raw = b.build().to_vec();
        set_base_offset(&mut raw, base);
        Bytes::from(raw)
    }

    /// A consumer of topic `t` (partitions 0 and 1 assigned) whose fetch tasks never run:
    /// the test feeds its channel itself.
    async fn fed_consumer() -> Consumer {
        let client = Client::offline_for_tests(vec![Client::test_topic("t", 2, None)]);
        let mut c = Consumer::new(client, ConsumerConfig::default());
        c.assign("t", [0, 1]).await.unwrap();
        for st in c.parts.values_mut() {
            st.task = Some(tokio::spawn(std::future::pending()));
            st.position = Some(0);
        }
        c
    }

    fn fed(c: &Consumer, partition: u32, data: Result<Chunk>) -> Fetched {
        Fetched {
            topic: Arc::from("t"),
            partition,
            generation: c.parts[&(Arc::from("t"), partition)].generation,
            data,
        }
    }

    fn chunk(base: i64, n: usize) -> Chunk {
        Chunk {
            from: base,
            aborted: Vec::new(),
            batches: batch(base, n),
            next: base + n as i64,
        }
    }

    /// Records decoded in a poll are handed out even when another partition's fetch fails
    /// in the same poll; the error comes with the next poll. Before, the error dropped them
    /// while their partition's position had already moved past them: lost for good.
    #[tokio::test]
    async fn an_error_in_a_poll_does_not_drop_the_records_already_decoded() {
        let mut c = fed_consumer().await;
        let ok = fed(&c, 0, Ok(chunk(0, 5)));
        let failed = fed(&c, 1, Err(ClientError::TopicNotFound("t".into())));
        c.tx.send(ok).await.unwrap();
        c.tx.send(failed).await.unwrap();
        let got = c.poll_timeout(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert!(matches!(
            c.poll_timeout(Duration::from_millis(10)).await,
            Err(ClientError::TopicNotFound(_))
        ));
        assert_eq!(c.parts[&(Arc::from("t"), 0)].position, Some(5));
    }

    /// A poll takes at most `buffer_chunks` fetched payloads, however many wait: the fetch
    /// tasks refill the channel while a poll decodes, and under a backlog an unbounded poll
    /// grew to hundreds of thousands of records (a pipeline's poll is one transaction).
    #[tokio::test]
    async fn a_poll_takes_at_most_buffer_chunks_payloads() {
        let mut c = fed_consumer().await;
        // More waiting than a poll may take, as when the tasks refill during a poll.
        c.config.buffer_chunks = 2;
        for (p, base) in [(0, 0), (1, 0), (0, 3), (1, 3)] {
            let f = fed(&c, p, Ok(chunk(base, 3)));
            c.tx.send(f).await.unwrap();
        }
        let at = |recs: &[ConsumedRecord]| -> Vec<(u32, i64)> {
            recs.iter().map(|r| (r.partition, r.offset)).collect()
        };
        let first = c.poll_timeout(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            at(&first),
            [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)],
            "the first two chunks, in order"
        );
        let second = c.poll_timeout(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            at(&second),
            [(0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5)],
            "the other two, in the next poll"
        );
        assert_eq!(c.parts[&(Arc::from("t"), 0)].position, Some(6));
        assert_eq!(c.parts[&(Arc::from("t"), 1)].position, Some(6));
    }

    /// After a chunk whose end lies past its last record (a transaction's marker follows
    /// it), reading goes on from the chunk's end, not from the record after the last one:
    /// a commit of that leaves no lag of 1 behind each transaction.
    #[tokio::test]
    async fn reading_goes_on_past_a_chunks_trailing_marker() {
        let mut c = fed_consumer().await;
        let marked = Chunk {
            next: 4,
            ..chunk(0, 3)
        };
        c.tx.send(fed(&c, 0, Ok(marked))).await.unwrap();
        let got = c.poll_timeout(Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(c.next_after("t", 0, 2), 4, "past the marker at 3");
        assert_eq!(c.next_after("t", 0, 1), 2, "not the chunk's last record");
        assert_eq!(c.next_after("t", 1, 7), 8, "nothing read there");
    }

    /// A batch whose header lies about its record count (well-formed otherwise) is refused,
    /// and the room reserved for its records is bounded by its bytes, not by the count.
    #[test]
    fn a_lying_record_count_reserves_no_more_than_the_bytes_allow() {
        let mut raw = batch(0, 3).to_vec();
        let at = quiver_protocol::batch::field::RECORD_COUNT;
        raw[at..at + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        let len = raw.len();
        let lying = Chunk {
            from: 0,
            aborted: Vec::new(),
            batches: Bytes::from(raw),
            next: 3,
        };
        let mut out = Vec::new();
        let topic: Arc<str> = Arc::from("t");
        // Records decoded before the lie shows are dropped by the caller (`take`).
        assert!(decode_chunk(&topic, 0, &lying, usize::MAX, &mut out).is_err());
        assert!(
            out.capacity() <= len / 7,
            "reserved {} records for a batch of {len} bytes",
            out.capacity()
        );
    }

    /// A chunk that fails to decode part-way hands out none of its records (its partition's
    /// position stays before it, so they would come twice).
    #[tokio::test]
    async fn a_chunk_that_fails_to_decode_hands_out_nothing() {
        let mut c = fed_consumer().await;
        let mut broken = batch(0, 3).to_vec();
        broken.extend_from_slice(&[0u8; 20]);
        let bad = Chunk {
            from: 0,
            aborted: Vec::new(),
            batches: Bytes::from(broken),
            next: 3,
        };
        // The task that sent it has moved on: its next chunk must not be taken, or the
        // broken one would be skipped for good.
        let after = fed(&c, 0, Ok(chunk(3, 2)));
        c.tx.send(fed(&c, 0, Ok(bad))).await.unwrap();
        c.tx.send(after).await.unwrap();
        assert!(c.poll_timeout(Duration::from_secs(5)).await.is_err());
        let st = &c.parts[&(Arc::from("t"), 0)];
        assert_eq!(st.position, Some(0));
        assert!(
            matches!(st.pending, Some(SeekTo::Offset(0))),
            "the next poll fetches again from the position"
        );
        assert!(st.task.is_none(), "the task past the chunk was stopped");
    }

    /// Chunks a stopped fetch task left in the channel are not taken for the new task's
    /// after the partition is unassigned and assigned again (its generation is new).
    #[tokio::test]
    async fn chunks_of_a_partition_assigned_before_are_dropped_after_it_comes_back() {
        let mut c = fed_consumer().await;
        let stale = fed(&c, 0, Ok(chunk(300, 5)));
        c.tx.send(stale).await.unwrap();
        c.unassign("t", [0]);
        c.assign("t", [0]).await.unwrap();
        let st = c.parts.get_mut(&(Arc::from("t"), 0)).unwrap();
        st.task = Some(tokio::spawn(std::future::pending()));
        st.position = Some(100);
        let fresh = fed(&c, 0, Ok(chunk(100, 2)));
        c.tx.send(fresh).await.unwrap();
        let got = c.poll_timeout(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![100, 101]
        );
    }

    #[test]
    fn records_before_the_requested_offset_are_skipped() {
        let mut payload = batch(10, 5).to_vec();
        payload.extend_from_slice(&batch(15, 5));
        let payload = Bytes::from(payload);
        assert_eq!(next_offset(&payload).unwrap(), Some(20));
        let chunk = Chunk {
            aborted: Vec::new(),
            from: 13,
            batches: payload,
            next: 20,
        };
        let mut out = Vec::new();
        decode_chunk(&Arc::from("t"), 0, &chunk, 1 << 20, &mut out).unwrap();
        let offsets: Vec<i64> = out.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (13..20).collect::<Vec<_>>());
        assert_eq!(&out[0].value[..], b"v13");
    }

    #[test]
    fn a_whole_batch_before_the_offset_is_skipped() {
        let mut payload = batch(0, 3).to_vec();
        payload.extend_from_slice(&batch(3, 2));
        let chunk = Chunk {
            aborted: Vec::new(),
            from: 3,
            batches: Bytes::from(payload),
            next: 5,
        };
        let mut out = Vec::new();
        decode_chunk(&Arc::from("t"), 1, &chunk, 1 << 20, &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![3, 4]);
        assert!(out.iter().all(|r| r.partition == 1));
    }

    #[test]
    fn processed_batches_with_gaps_and_no_records_advance_past_their_range() {
        // What a broker-side processor sends: source offsets kept, dropped ones missing.
        let mut b = BatchBuilder::new(Compression::None);
        b.push_at(2, None, b"v12", 1000, &[]);
        let mut payload = b.build_covering(10, 4).to_vec();
        payload.extend_from_slice(&BatchBuilder::new(Compression::None).build_covering(15, 4));
        let payload = Bytes::from(payload);
        assert_eq!(next_offset(&payload).unwrap(), Some(20));
        let chunk = Chunk {
            aborted: Vec::new(),
            from: 10,
            batches: payload,
            next: 20,
        };
        let mut out = Vec::new();
        decode_chunk(&Arc::from("t"), 0, &chunk, 1 << 20, &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![12]);
    }

    #[test]
    fn empty_and_truncated_payloads() {
        assert_eq!(next_offset(&Bytes::new()).unwrap(), None);
        let b = batch(0, 2);
        assert!(next_offset(&b.slice(..b.len() - 1)).is_err());
    }
}
