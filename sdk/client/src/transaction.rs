//! [`TransactionalProducer`]: writes that become visible all together or not at all, with a
//! consumer group's offsets in the same transaction (read-process-write exactly once, as
//! Kafka's transactions do it).
//!
//! A transaction buffers its records per partition; [`TransactionalProducer::flush`] writes
//! them (acks=all, transactional batches stamped with the producer id, epoch and per-partition
//! sequences, so a retried request is never stored twice) and returns where each partition's
//! records landed; [`TransactionalProducer::commit`] flushes, adds the group's offsets, and
//! ends the transaction; [`TransactionalProducer::abort`] voids everything written in it.
//! Consumers reading with [`Isolation::ReadCommitted`](crate::Isolation) see committed
//! transactions only. Initialising a transactional id again (another process, a restart)
//! fences this producer: its next write or commit fails with `ProducerFenced`, and so does
//! every call after it. The coordinator fences a producer the same way when it aborts its
//! transaction past the timeout; then `abort` takes the id back at a new epoch and the
//! producer goes on (Kafka's KIP-588). `abort` names the epoch it held, so the coordinator
//! refuses it when another producer initialised the id since: that producer is never
//! fenced by this one, which stays fenced (only a new `init` takes the id back).
//!
//! The transaction's coordinator is the leader of the `__consumer_offsets` partition its id
//! hashes to; the producer adds each partition to the transaction there before its first
//! write to it, sends the group's offsets to the group's coordinator, and retries
//! coordinator requests while leadership moves (a retried EndTxn is answered from the
//! transaction's outcome).
//!
//! ```no_run
//! # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
//! use quiver_client::{ProducerRecord, TransactionalProducer};
//! let mut tx = TransactionalProducer::init(client, "orders-enricher-1").await?;
//! tx.send(ProducerRecord::new("enriched", "a"))?;
//! tx.send(ProducerRecord::new("enriched", "b"))?;
//! tx.commit(None).await?; // both, or (after abort or a crash) neither
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::{BatchBuilder, Compression};
use quiver_protocol::requests::{
    coordinator_partition, Acks, AddPartitionsToTxnRequest, EndTxnRequest, InitTransactionsRequest,
    OffsetCommit, ProduceRequest, TopicPartition, TxnCommitOffsetsRequest, OFFSETS_TOPIC,
};
use quiver_protocol::{ErrorCode, Message};

use crate::backoff::Backoff;
use crate::producer::partition_for_key;
use crate::{Client, ClientError, ProducerRecord, Result};

/// Largest batch the producer builds.
const BATCH_BYTES: usize = 512 * 1024;
/// Default transaction timeout: an open transaction older than this is aborted by the broker.
pub const DEFAULT_TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// A consumer group's positions to commit with a transaction.
#[derive(Debug, Clone)]
pub struct TxnOffsets {
    /// Group name.
    pub group: String,
    /// The member committing (checked like a commit: a stale generation is refused).
    pub member_id: String,
    /// Its generation.
    pub generation: u64,
    /// The positions (and metadata) to store.
    pub offsets: Vec<OffsetCommit>,
}

/// Where one partition's records of a flush landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    /// Offset of the first record written.
    pub first_offset: i64,
    /// Offset of the last record written.
    pub last_offset: i64,
}

/// One partition's buffered records: closed batches and the open builder. Sequences are
/// given at flush, just before sending: a batch dropped unsent (an abort) takes none, so
/// the partition's numbering has no gap the broker would wait on.
type Buffered = (Vec<BatchBuilder>, BatchBuilder);

/// One partition's batches of a flush, numbered: `(topic, partition, [(bytes, records)])`.
type Numbered = (String, u32, Vec<(Bytes, i32)>);

/// A producer whose writes are transactions.
pub struct TransactionalProducer {
    client: Client,
    id: String,
    producer_id: i64,
    epoch: i16,
    /// Closed batches and the open builder, per (topic, partition).
    pending: BTreeMap<(String, u32), Buffered>,
    sequences: HashMap<(String, u32), i32>,
    partitions: HashMap<String, u32>,
    round_robin: u32,
    /// Partitions added to the open transaction on its coordinator.
    added: BTreeSet<(String, u32)>,
    /// The transaction timeout asked for at init (asked again when starting over).
    timeout_ms: u32,
    /// Why the producer must start over (a new epoch) before its next transaction: a flush
    /// failed after its batches were numbered (a partition may lack some the broker would
    /// wait for), or ending a transaction failed (its outcome is unknown). `abort` does it.
    needs_init: Option<String>,
    /// Codec of the batches it builds.
    compression: Compression,
    /// The numbered header of the batches it builds (see
    /// [`with_numbered_header`](Self::with_numbered_header)).
    numbered_header: Option<String>,
    /// Set once the broker answered `ProducerFenced`: another producer initialised this id
    /// (or the coordinator aborted a transaction past its timeout). Every later call fails
    /// with it until `abort` takes the id back, which the coordinator allows only when the
    /// fence was its timeout's (never fencing a producer that took the id over).
    fenced: Option<String>,
}

impl std::fmt::Debug for TransactionalProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalProducer")
            .field("transactional_id", &self.id)
            .field("producer_id", &self.producer_id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl TransactionalProducer {
    /// Initialises `transactional_id` with the default timeout (fencing any other producer
    /// holding it and aborting its open transaction).
    pub async fn init(client: Client, transactional_id: &str) -> Result<TransactionalProducer> {
        Self::init_with_timeout(client, transactional_id, DEFAULT_TXN_TIMEOUT).await
    }

    /// [`init`](Self::init) with a transaction timeout.
    pub async fn init_with_timeout(
        client: Client,
        transactional_id: &str,
        timeout: Duration,
    ) -> Result<TransactionalProducer> {
        let req = InitTransactionsRequest {
            transactional_id: transactional_id.to_string(),
            timeout_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            held: None,
        };
        let r = coordinator_request(&client, transactional_id, &req).await?;
        Ok(TransactionalProducer {
            client,
            id: transactional_id.to_string(),
            producer_id: r.producer_id,
            epoch: r.producer_epoch,
            pending: BTreeMap::new(),
            sequences: HashMap::new(),
            partitions: HashMap::new(),
            round_robin: 0,
            added: BTreeSet::new(),
            timeout_ms: req.timeout_ms,
            needs_init: None,
            fenced: None,
            compression: Compression::None,
            numbered_header: None,
        })
    }

    /// Writes header `key` compactly in the batches it builds from now on, as a producer's
    /// `numbered_header` does (see
    /// [`ProducerConfig::numbered_header`](crate::ProducerConfig::numbered_header)).
    pub fn with_numbered_header(mut self, key: Option<&str>) -> Self {
        self.numbered_header = key.map(str::to_string);
        self
    }

    /// Compresses the batches it builds from now on with `codec` (none by default).
    pub fn with_compression(mut self, codec: Compression) -> Self {
        self.compression = codec;
        self
    }

    /// Fails once this producer was fenced.
    fn check_fenced(&self) -> Result<()> {
        match &self.fenced {
            Some(why) => Err(ClientError::Broker {
                code: ErrorCode::ProducerFenced,
                message: format!(
                    "transactional id {:?} was fenced ({why}); initialise it again (TransactionalProducer::init) to take it over",
                    self.id
                ),
            }),
            None => Ok(()),
        }
    }

    /// Notes a fencing answer in `r`.
    fn observe<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if e.code() == Some(ErrorCode::ProducerFenced) && self.fenced.is_none() {
                self.fenced = Some(e.to_string());
            }
        }
        r
    }

    /// The producer id and epoch in use.
    pub fn producer(&self) -> (i64, i16) {
        (self.producer_id, self.epoch)
    }

    /// Learns a topic's partition count (needed before `send` to a topic).
    pub async fn prepare_topic(&mut self, topic: &str) -> Result<u32> {
        if let Some(&n) = self.partitions.get(topic) {
            return Ok(n);
        }
        let n = self.client.partition_count(topic).await?;
        if n == 0 {
            // As the producer does: records could go nowhere (and round robin would divide
            // by zero).
            return Err(ClientError::TopicNotFound(format!(
                "topic {topic:?} has no partitions"
            )));
        }
        self.partitions.insert(topic.to_string(), n);
        Ok(n)
    }

    /// Buffers `record` in the open transaction: its partition, else by key (as the
    /// default partitioner), else round robin. The topic must have been prepared.
    pub fn send(&mut self, record: ProducerRecord) -> Result<u32> {
        self.check_fenced()?;
        let n = *self.partitions.get(&record.topic).ok_or_else(|| {
            ClientError::InvalidConfig(format!(
                "topic {:?} was not prepared: call prepare_topic first",
                record.topic
            ))
        })?;
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p < n => p,
            (Some(p), _) => {
                return Err(ClientError::InvalidConfig(format!(
                    "{} has {n} partitions, not {}",
                    record.topic,
                    p + 1
                )))
            }
            (None, Some(k)) => partition_for_key(k, n),
            (None, None) => {
                self.round_robin = self.round_robin.wrapping_add(1);
                self.round_robin % n
            }
        };
        let (codec, numbered) = (self.compression, self.numbered_header.as_deref());
        let entry = self
            .pending
            .entry((record.topic.clone(), partition))
            .or_insert_with(|| (Vec::new(), batch_builder(codec, numbered)));
        let headers: Vec<(&str, &[u8])> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        let ts = record.timestamp.unwrap_or_else(crate::producer::now_ms);
        entry
            .1
            .push(record.key.as_deref(), &record.value, ts, &headers);
        if entry.1.size_bytes() >= BATCH_BYTES {
            let b = std::mem::replace(&mut entry.1, batch_builder(codec, numbered));
            entry.0.push(b);
        }
        Ok(partition)
    }

    /// Writes everything buffered (in the open transaction) and waits until every partition
    /// acknowledged it (acks=all). Returns where each partition's records landed.
    pub async fn flush(&mut self) -> Result<BTreeMap<(String, u32), Landed>> {
        self.check_fenced()?;
        if let Some(why) = &self.needs_init {
            return Err(ClientError::InvalidConfig(format!(
                "the last transaction failed ({why}); call abort() before the next one"
            )));
        }
        // Set before anything is taken from the buffer: if adding the partitions fails,
        // the buffered records are gone, and a retried commit must not end the transaction
        // without them.
        self.needs_init = Some("a flush did not complete".into());
        let mut jobs = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        for ((topic, partition), (mut closed, open)) in pending {
            if !open.is_empty() {
                closed.push(open);
            }
            jobs.push((topic, partition, closed));
        }
        let added = self
            .add_partitions(jobs.iter().map(|(t, p, _)| (t.clone(), *p)))
            .await;
        self.observe(added)?;
        // Numbered now, just before sending; until every batch is acknowledged, a failure
        // may leave a gap in a partition's numbering.
        let jobs: Vec<Numbered> = jobs
            .into_iter()
            .map(|(topic, partition, builders)| {
                let batches = builders
                    .into_iter()
                    .map(|mut b| {
                        let count = b.len() as i32;
                        let seq = next_sequence(&mut self.sequences, &topic, partition, count);
                        (stamp(&mut b, self.producer_id, self.epoch, seq), count)
                    })
                    .collect();
                (topic, partition, batches)
            })
            .collect();
        let client = self.client.clone();
        let sends = jobs.into_iter().map(|(topic, partition, batches)| {
            let client = client.clone();
            async move {
                let mut landed: Option<Landed> = None;
                for (bytes, _) in batches {
                    let (first, last) =
                        produce_with_retries(&client, &topic, partition, bytes).await?;
                    landed = Some(match landed {
                        None => Landed {
                            first_offset: first,
                            last_offset: last,
                        },
                        Some(l) => Landed {
                            first_offset: l.first_offset,
                            last_offset: last,
                        },
                    });
                }
                Ok::<_, ClientError>(((topic, partition), landed))
            }
        });
        let mut out = BTreeMap::new();
        for r in futures::future::join_all(sends).await {
            let (tp, landed) = self.observe(r)?;
            if let Some(l) = landed {
                out.insert(tp, l);
            }
        }
        self.needs_init = None;
        Ok(out)
    }

    /// Flushes, adds `offsets` (if any) to the transaction and commits it. Returns where
    /// the records of this last flush landed. When the group refuses the offsets
    /// (`StaleGeneration`, `UnknownMember`, `NotPartitionOwner`) the transaction stays open
    /// with its records: call `commit` again with the member's current generation, or
    /// `abort`.
    pub async fn commit(
        &mut self,
        offsets: Option<TxnOffsets>,
    ) -> Result<BTreeMap<(String, u32), Landed>> {
        let landed = self.flush().await?;
        if let Some(o) = offsets {
            // As for a flush: a commit retried after this part failed would end the
            // transaction without the offsets.
            self.needs_init = Some("adding the offsets to the transaction did not complete".into());
            // The group's offsets partition takes part in the transaction: its marker
            // makes the offsets visible.
            let offsets_partition = match self.client.partition_count(OFFSETS_TOPIC).await {
                Ok(n) => coordinator_partition(&o.group, n),
                Err(ClientError::TopicNotFound(_)) => 0,
                Err(e) => return Err(e),
            };
            let added = self
                .add_partitions([(OFFSETS_TOPIC.to_string(), offsets_partition)])
                .await;
            self.observe(added)?;
            let group = o.group.clone();
            let req = TxnCommitOffsetsRequest {
                transactional_id: self.id.clone(),
                producer_id: self.producer_id,
                producer_epoch: self.epoch,
                group: o.group,
                member_id: o.member_id,
                generation: o.generation,
                offsets: o.offsets,
            };
            let stored = coordinator_request(&self.client, &group, &req).await;
            if let Err(e) = &stored {
                // Refused by the group's checks, before anything was stored: the
                // transaction is as it was, open with its records and without offsets, so
                // the commit may be tried again with the member's new generation.
                let refused = [
                    ErrorCode::StaleGeneration,
                    ErrorCode::UnknownMember,
                    ErrorCode::NotPartitionOwner,
                ];
                if e.code().is_some_and(|c| refused.contains(&c)) {
                    self.needs_init = None;
                }
            }
            self.observe(stored)?;
            self.needs_init = None;
        }
        self.end(true).await?;
        Ok(landed)
    }

    /// Drops what is buffered and aborts the transaction: nothing written in it becomes
    /// visible to read-committed consumers, and its offsets are not stored. After a failed
    /// flush or commit it starts over at a new epoch; after `ProducerFenced` it does so only
    /// if the coordinator fenced this producer for a timeout, and otherwise fails with
    /// `ProducerFenced` again.
    pub async fn abort(&mut self) -> Result<()> {
        self.pending.clear();
        if self.fenced.is_some() || self.needs_init.is_some() {
            return self.start_over().await;
        }
        self.end(false).await
    }

    /// Initialises the id again at a new epoch, naming the one this producer held: the
    /// coordinator ends whatever the id left open, and refuses when another producer
    /// initialised the id since (this one then stays fenced). A new epoch numbers every
    /// partition from 0 again.
    async fn start_over(&mut self) -> Result<()> {
        let req = InitTransactionsRequest {
            transactional_id: self.id.clone(),
            timeout_ms: self.timeout_ms,
            held: Some((self.producer_id, self.epoch)),
        };
        let r = coordinator_request(&self.client, &self.id, &req).await;
        let r = self.observe(r)?;
        tracing::info!(transactional_id = %self.id, producer_id = r.producer_id, epoch = r.producer_epoch,
            fenced_before = self.fenced.is_some(), "transactional producer started over");
        self.producer_id = r.producer_id;
        self.epoch = r.producer_epoch;
        self.sequences.clear();
        self.added.clear();
        self.needs_init = None;
        self.fenced = None;
        Ok(())
    }

    async fn end(&mut self, commit: bool) -> Result<()> {
        if self.added.is_empty() {
            // Nothing was written in this transaction: there is nothing to end.
            return Ok(());
        }
        let req = EndTxnRequest {
            transactional_id: self.id.clone(),
            producer_id: self.producer_id,
            producer_epoch: self.epoch,
            commit,
        };
        let ended = coordinator_request(&self.client, &self.id, &req).await;
        let ended = self.observe(ended);
        // Whatever the outcome, the next transaction adds its partitions afresh; an outcome
        // not known (the request failed) is settled by starting over at the next abort.
        self.added.clear();
        if let Err(e) = &ended {
            self.needs_init = Some(format!("ending it failed: {e}"));
        }
        ended.map(drop)
    }

    /// Adds the partitions not yet in the open transaction to it (on its coordinator).
    async fn add_partitions(&mut self, tps: impl IntoIterator<Item = (String, u32)>) -> Result<()> {
        let new: Vec<(String, u32)> = tps
            .into_iter()
            .filter(|tp| !self.added.contains(tp))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let req = AddPartitionsToTxnRequest {
            transactional_id: self.id.clone(),
            producer_id: self.producer_id,
            producer_epoch: self.epoch,
            partitions: new
                .iter()
                .map(|(t, p)| TopicPartition::new(t.clone(), *p))
                .collect(),
        };
        coordinator_request(&self.client, &self.id, &req).await?;
        self.added.extend(new);
        Ok(())
    }
}

/// Sends `req` to the coordinator of `key` (a transactional id or a group: the leader of
/// the offsets partition it hashes to), retrying retriable failures (leadership moving, a
/// coordinator still loading) for up to 60 s.
async fn coordinator_request<M: Message>(
    client: &Client,
    key: &str,
    req: &M,
) -> Result<M::Response> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.request_for_group(key, req, Bytes::new()).await {
            Ok((r, _)) => return Ok(r),
            Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(api = M::API.name(), error = %e, "coordinator request failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The sequence of the next `count` records to `topic`/`partition` (and moves it on).
fn next_sequence(
    sequences: &mut HashMap<(String, u32), i32>,
    topic: &str,
    partition: u32,
    count: i32,
) -> i32 {
    let seq = sequences.entry((topic.to_string(), partition)).or_insert(0);
    let first = *seq;
    *seq = quiver_protocol::batch::sequence_after(*seq, count);
    first
}

/// A fresh builder for one partition's batch, with the producer's codec and numbered
/// header.
fn batch_builder(codec: Compression, numbered_header: Option<&str>) -> BatchBuilder {
    let mut b = BatchBuilder::new(codec);
    b.set_numbered_header(numbered_header);
    b
}

/// Encodes a closed batch stamped with the transaction's producer fields and `sequence`.
fn stamp(b: &mut BatchBuilder, producer_id: i64, epoch: i16, sequence: i32) -> Bytes {
    b.set_producer(producer_id, epoch, sequence);
    b.set_transactional(true);
    b.build()
}

/// Sends one transactional batch, retrying retriable failures with the same bytes (the
/// broker recognises the sequence and answers a stored one with its offsets).
async fn produce_with_retries(
    client: &Client,
    topic: &str,
    partition: u32,
    bytes: Bytes,
) -> Result<(i64, i64)> {
    let req = ProduceRequest {
        topic: topic.to_string(),
        partition,
        acks: Acks::All,
        timeout_ms: 30_000,
    };
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let timeout = client.config().request_timeout;
        match client
            .request_for_partition(topic, partition, &req, bytes.clone(), timeout)
            .await
        {
            Ok((r, _)) => return Ok((r.base_offset, r.last_offset)),
            Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}
