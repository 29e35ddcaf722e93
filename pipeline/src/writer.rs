//! How an instance writes a poll's results and commits its input, per guarantee:
//!
//! - at-least-once: records go out through an idempotent producer (acks=all); once every one
//!   is acknowledged, the input offsets (with their partitions' counters and state marks
//!   as metadata, [`crate::progress`]) are committed. A
//!   crash in between writes the poll's output again on the next attempt.
//! - exactly-once: records go into a transaction of the instance's transactional producer;
//!   the input offsets (with that metadata) are added to the transaction and it commits:
//!   output, state changes and offsets become visible together, or (abort, crash, fencing)
//!   not at all. Read-committed consumers never see an aborted attempt's output.
//!
//! At least once, a poll's writes are sealed ([`Writer::seal`]) and may be finished after the
//! next poll's were sent; its offsets are stored for commit only then.
//!
//! Either way [`Writer::finish`] reports, per (topic, partition), the offsets the poll's
//! records landed at, which the state marks need.

use std::collections::BTreeMap;
use std::time::Duration;

use quiver_client::{
    Acks, Client, DeliveryFuture, GroupConsumer, Landed, OffsetCommit, Producer, ProducerConfig,
    ProducerRecord, RecordRef, TopicPartition, TransactionalProducer, TxnOffsets,
};

use quiver_protocol::batch::Compression;

use crate::error::RuntimeError;
use crate::instance::SOURCE_HEADER;

/// How long a transaction may stay open: a crashed instance's transaction is aborted by the
/// broker after this (about when the group gives its partitions to another member), so
/// read-committed readers of the outputs wait at most this long behind a crash.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where each (topic, partition) written to landed.
pub type LandedMap = BTreeMap<(String, u32), Landed>;

/// The instance's output side.
pub enum Writer {
    /// Idempotent producer, acks=all; the acknowledgements the current poll waits for.
    AtLeastOnce {
        /// The producer.
        producer: Producer,
        /// The current poll's writes.
        poll: PollAcks,
    },
    /// A transactional producer, for the group member it was created for.
    ExactlyOnce {
        /// The producer (its transactional id names the member); boxed, as it is much
        /// larger than the other variant.
        tx: Box<TransactionalProducer>,
        /// The member id whose offsets its transactions commit.
        member_id: String,
    },
}

/// What one poll's writes wait for, at least once: the last record sent to each
/// (topic, partition) — the producer is idempotent and ordered per partition, so once that
/// one is acknowledged every earlier one of the partition was stored before it, unless one
/// failed, which the producer's failure count shows — and every tracked record.
#[derive(Default)]
pub struct PollAcks {
    last: Vec<DeliveryFuture>,
    tracked: Vec<DeliveryFuture>,
}

impl PollAcks {
    fn sent(&mut self, d: DeliveryFuture) {
        match self
            .last
            .iter_mut()
            .find(|l| l.partition() == d.partition() && l.topic() == d.topic())
        {
            Some(slot) => *slot = d,
            None => self.last.push(d),
        }
    }
}

/// A poll's writes, sealed: what [`Writer::finish`] waits for.
pub enum SealedWrites {
    /// At least once: these acknowledgements.
    Acks(PollAcks),
    /// Exactly once: the open transaction.
    Transaction,
}

/// The transactional id of instance `number` of `pipeline` in this process:
/// `pipeline.<name>.<number>.<process token>`. The same across the instance's group
/// memberships, so each join initialises it again (fencing the previous membership's
/// open transaction at once) and a coordinator keeps one id per instance, not one per
/// rejoin until they expire; different in every process, as a `pipeline run` copy
/// elsewhere numbers its instances from 1 too (Kafka Streams names its producers by
/// process and thread the same way). A name too long for the 249 bytes an id may have is
/// replaced by its hash.
pub fn transactional_id(pipeline: &str, number: u32) -> String {
    use std::hash::{BuildHasher, Hasher};
    static TOKEN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let token = *TOKEN.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    });
    let id = format!("pipeline.{pipeline}.{number}.{token:016x}");
    if id.len() <= 249 {
        return id;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(pipeline.as_bytes());
    format!("pipeline.{:016x}.{number}.{token:016x}", h.finish())
}

impl SealedWrites {
    /// At least once: whether every acknowledgement of the poll is in (so
    /// [`Writer::finish`] returns at once). A transaction's writes are never done early.
    pub fn are_done(&self) -> bool {
        match self {
            SealedWrites::Acks(acks) => acks
                .tracked
                .iter()
                .chain(&acks.last)
                .all(DeliveryFuture::is_done),
            SealedWrites::Transaction => false,
        }
    }
}

impl Writer {
    /// The at-least-once writer; its batches are compressed with `codec`.
    pub fn at_least_once(client: Client, codec: Compression) -> Writer {
        Writer::AtLeastOnce {
            producer: Producer::new(
                client,
                ProducerConfig {
                    acks: Acks::All,
                    linger: Duration::from_millis(2),
                    compression: codec,
                    // Every output record carries `quiver.source` last.
                    numbered_header: Some(SOURCE_HEADER.to_string()),
                    ..ProducerConfig::default()
                },
            ),
            poll: PollAcks::default(),
        }
    }

    /// The exactly-once writer of group member `member_id`, as `transactional_id` (see
    /// [`transactional_id`]); the group's generation check at offset commit fences a member
    /// that lost its partitions.
    pub async fn exactly_once(
        client: Client,
        transactional_id: &str,
        member_id: &str,
        codec: Compression,
    ) -> Result<Writer, RuntimeError> {
        let id = transactional_id;
        match TransactionalProducer::init_with_timeout(client, id, TXN_TIMEOUT).await {
            Ok(tx) => Ok(Writer::ExactlyOnce {
                tx: Box::new(
                    tx.with_compression(codec)
                        .with_numbered_header(Some(SOURCE_HEADER)),
                ),
                member_id: member_id.to_string(),
            }),
            // A broker that cannot run transactions: joining again would not change that.
            Err(e) if e.code() == Some(quiver_protocol::ErrorCode::UnsupportedApi) => Err(
                RuntimeError::Failed(format!("guarantee \"exactly-once\" cannot run here: {e}")),
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends (or buffers in the transaction) one output record; finishing the poll waits
    /// for it. Where it landed is not reported (see [`Writer::send_tracked`]).
    pub async fn send(&mut self, record: ProducerRecord) -> Result<(), RuntimeError> {
        match self {
            Writer::AtLeastOnce { producer, poll } => poll.sent(producer.send(record).await?),
            Writer::ExactlyOnce { tx, .. } => {
                tx.prepare_topic(&record.topic).await?;
                tx.send(record)?;
            }
        }
        Ok(())
    }

    /// [`Writer::send`] of many borrowed records: at least once they are queued in one call
    /// (each partition's queue held once per run of records to it), and the poll waits for
    /// the last of each partition.
    pub async fn send_refs(&mut self, records: &[RecordRef<'_>]) -> Result<(), RuntimeError> {
        match self {
            Writer::AtLeastOnce { producer, poll } => {
                let queued = producer.send_refs(records).await;
                for d in queued.last {
                    poll.sent(d);
                }
                match queued.error {
                    Some(e) => Err(e.into()),
                    None => Ok(()),
                }
            }
            Writer::ExactlyOnce { .. } => {
                for r in records {
                    self.send((*r).into()).await?;
                }
                Ok(())
            }
        }
    }

    /// Sends one record whose landing offset [`Writer::finish`] reports (state changes).
    pub async fn send_tracked(&mut self, record: ProducerRecord) -> Result<(), RuntimeError> {
        match self {
            Writer::AtLeastOnce { producer, poll } => {
                poll.tracked.push(producer.send(record).await?);
            }
            Writer::ExactlyOnce { tx, .. } => {
                tx.prepare_topic(&record.topic).await?;
                tx.send(record)?;
            }
        }
        Ok(())
    }

    /// Ends the current poll's writes: what finishing it waits for. The next poll's writes
    /// may be sent before this one is finished (at least once).
    pub fn seal(&mut self) -> SealedWrites {
        match self {
            Writer::AtLeastOnce { poll, .. } => SealedWrites::Acks(std::mem::take(poll)),
            Writer::ExactlyOnce { .. } => SealedWrites::Transaction,
        }
    }

    /// Waits until a sealed poll's writes are written (acknowledged, or flushed into the
    /// transaction) and says where the tracked ones landed.
    pub async fn finish(&mut self, writes: SealedWrites) -> Result<LandedMap, RuntimeError> {
        match (self, writes) {
            (Writer::AtLeastOnce { producer, .. }, SealedWrites::Acks(acks)) => {
                let mut landed = LandedMap::new();
                for d in acks.tracked {
                    let md = d.await?;
                    let e = landed
                        .entry((md.topic.to_string(), md.partition))
                        .or_insert(Landed {
                            first_offset: md.offset,
                            last_offset: md.offset,
                        });
                    e.first_offset = e.first_offset.min(md.offset);
                    e.last_offset = e.last_offset.max(md.offset);
                }
                for d in acks.last {
                    d.await?;
                }
                // A record that failed for good lets later ones of its partition through.
                let stats = producer.stats();
                if stats.records_failed > 0 {
                    return Err(RuntimeError::Failed(format!(
                        "{} output records were not acknowledged{}",
                        stats.records_failed,
                        stats
                            .last_error
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )));
                }
                Ok(landed)
            }
            (Writer::ExactlyOnce { tx, .. }, _) => Ok(tx.flush().await?),
            (Writer::AtLeastOnce { .. }, SealedWrites::Transaction) => Err(RuntimeError::Failed(
                "a transaction's writes handed to the at-least-once writer".into(),
            )),
        }
    }

    /// Commits where reading goes on, once the input has gone quiet and nothing is in
    /// flight (every record handed out is done), so the group's committed offsets catch up.
    /// The positions may lie past the last record processed: a transaction's marker or
    /// aborted records came after it, which would otherwise stay as lag until more records
    /// come. At least once, the positions are stored and every stored offset is committed
    /// (after the commit running in the background, if any); exactly once, the positions
    /// are committed in a transaction of their own, with the owned partitions' metadata
    /// (`marks`: counters and state marks), when they moved past the last commit.
    pub async fn commit_quiet(
        &mut self,
        member: &mut GroupConsumer,
        marks: Vec<(TopicPartition, String)>,
    ) -> Result<(), RuntimeError> {
        match self {
            Writer::AtLeastOnce { .. } => {
                member.store_positions();
                member.commit().await?;
            }
            Writer::ExactlyOnce { .. } => {
                if member.has_uncommitted_positions() {
                    self.commit(member, &BTreeMap::new(), marks).await?;
                }
            }
        }
        Ok(())
    }

    /// Commits the input of a finished poll: `ends` (the offset after each input
    /// partition's last record of the poll) and `marks`, the metadata of the owned partitions
    /// (their counters and state marks, [`crate::progress`]). At least once: the offsets are stored and committed by the group in
    /// the background (one commit at a time; the loop goes on with the next polls, and a
    /// failed background commit is reported by the next call); exactly once: they are
    /// committed with the transaction (the member's positions, which are the poll's ends,
    /// since each poll's transaction commits before the next poll).
    pub async fn commit(
        &mut self,
        member: &mut GroupConsumer,
        ends: &BTreeMap<TopicPartition, i64>,
        marks: Vec<(TopicPartition, String)>,
    ) -> Result<(), RuntimeError> {
        match self {
            Writer::AtLeastOnce { .. } => {
                for (tp, m) in marks {
                    member.set_commit_metadata(&tp.topic, tp.partition, m);
                }
                for (tp, end) in ends {
                    member.store_offset(&tp.topic, tp.partition, *end);
                }
                member.commit_in_background()?;
            }
            Writer::ExactlyOnce { tx, member_id } => {
                let marks: BTreeMap<TopicPartition, String> = marks.into_iter().collect();
                // A stale generation (a rebalance the heartbeats have not brought in yet) is
                // tried again with the one they bring, for a few seconds: the transaction is
                // still open, and the coordinator checks ownership again.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                loop {
                    // The member joined again under another id (its heartbeats found it
                    // gone): these offsets are not the new member's to commit, and its
                    // partitions may have been processed by another member meanwhile.
                    let now_id = member.member_id();
                    if now_id != *member_id {
                        return Err(RuntimeError::Retry(format!(
                            "the group membership changed under this instance (member {member_id} joined again as {now_id}); joining again"
                        )));
                    }
                    let positions = member.positions();
                    if let Some(tp) = ends
                        .keys()
                        .find(|tp| !positions.iter().any(|(p, _)| p == *tp))
                    {
                        return Err(RuntimeError::Retry(format!(
                            "{}/{} was given away before its poll committed; joining again",
                            tp.topic, tp.partition
                        )));
                    }
                    let offsets: Vec<OffsetCommit> = positions
                        .into_iter()
                        .map(|(tp, offset)| OffsetCommit {
                            // A partition without new metadata in `marks` keeps what it
                            // committed last (its counters are not reset).
                            metadata: marks
                                .get(&tp)
                                .cloned()
                                .or_else(|| member.committed_metadata(&tp.topic, tp.partition)),
                            topic: tp.topic,
                            partition: tp.partition,
                            offset,
                        })
                        .collect();
                    let txn = TxnOffsets {
                        group: member.group().to_string(),
                        member_id: member_id.clone(),
                        generation: member.generation(),
                        offsets: offsets.clone(),
                    };
                    match tx.commit(Some(txn)).await {
                        Ok(_) => {
                            member.mark_committed(&offsets);
                            break;
                        }
                        Err(e)
                            if e.code() == Some(quiver_protocol::ErrorCode::StaleGeneration)
                                && tokio::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives up the current poll's writes: exactly once, the transaction is aborted (its
    /// output is never visible to read-committed readers); at least once, nothing can be
    /// taken back.
    pub async fn abort(&mut self) {
        match self {
            Writer::AtLeastOnce { poll, .. } => *poll = PollAcks::default(),
            Writer::ExactlyOnce { tx, .. } => {
                if let Err(e) = tx.abort().await {
                    tracing::warn!(error = %e, "aborting the transaction failed (the broker aborts it after its timeout)");
                }
            }
        }
    }

    /// True for the exactly-once writer.
    pub fn is_transactional(&self) -> bool {
        matches!(self, Writer::ExactlyOnce { .. })
    }

    /// Flushes what the at-least-once producer holds (before leaving).
    pub async fn close(&mut self) {
        if let Writer::AtLeastOnce { producer, .. } = self {
            let _ = producer.flush().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;
    use quiver_client::{Admin, GroupConfig};
    use quiver_protocol::requests::LeaveGroupRequest;

    use super::*;

    /// The coordinator forgets a member (as after its failover); the member's heartbeats join
    /// again under a new id while a poll of the old membership is still open. That poll's
    /// offsets are not the new member's to commit: its partitions may have been processed by
    /// another member meanwhile, so committing them would duplicate output.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_that_joined_again_under_another_id_does_not_commit_an_old_poll() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, client) = crate::test_broker::with_topics(dir.path(), &["in", "out"]).await;
        let mut member = GroupConsumer::join(client.clone(), GroupConfig::new("g", ["in"]))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while member.assignment().is_empty() {
            assert!(Instant::now() < deadline, "never assigned");
            let _ = member.poll_timeout(Duration::from_millis(100)).await;
        }
        let first = member.member_id();
        let mut writer = Writer::exactly_once(
            client.clone(),
            &transactional_id("p", 1),
            &first,
            Compression::None,
        )
        .await
        .unwrap();
        writer.send(ProducerRecord::new("out", "x")).await.unwrap();
        let sealed = writer.seal();
        writer.finish(sealed).await.unwrap();
        let leave = LeaveGroupRequest {
            group: "g".into(),
            member_id: first.clone(),
        };
        client
            .request_for_group("g", &leave, Bytes::new())
            .await
            .unwrap();
        while member.member_id() == first || member.assignment().is_empty() {
            assert!(Instant::now() < deadline, "the member never joined again");
            let _ = member.poll_timeout(Duration::from_millis(100)).await;
        }
        let ends = BTreeMap::from([(TopicPartition::new("in".to_string(), 0), 0)]);
        match writer.commit(&mut member, &ends, Vec::new()).await {
            Err(RuntimeError::Retry(reason)) => {
                assert!(reason.contains("membership changed"), "{reason}")
            }
            Err(e) => panic!("expected the instance to join again, got {e}"),
            Ok(()) => panic!("an old membership's poll was committed by the new member"),
        }
        writer.abort().await;
        broker.shutdown().await;
    }

    /// Commits poll `n` of `tp`: its end is offset `n * 10`, its state mark `mark-{n}`.
    async fn commit_poll(
        writer: &mut Writer,
        member: &mut GroupConsumer,
        tp: &TopicPartition,
        n: i64,
    ) {
        let ends = BTreeMap::from([(tp.clone(), n * 10)]);
        writer
            .commit(member, &ends, vec![(tp.clone(), format!("mark-{n}"))])
            .await
            .unwrap();
    }

    /// At least once, a poll's commit travels in the background while the next polls are
    /// processed, one commit at a time. Commits never land out of order: the stored offsets
    /// and state marks committed last are the group's, after `commit_quiet` (the input
    /// went quiet) and after the member's own commit at close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_commits_land_in_order_and_catch_up_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, client) = crate::test_broker::with_topics(dir.path(), &["in"]).await;
        let admin = Admin::new(client.clone());
        let mut config = GroupConfig::new("g", ["in"]);
        config.commit_stored_offsets = true;
        let mut member = GroupConsumer::join(client.clone(), config).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while member.assignment().is_empty() {
            assert!(Instant::now() < deadline, "never assigned");
            let _ = member.poll_timeout(Duration::from_millis(100)).await;
        }
        let tp = TopicPartition::new("in", 0);
        let committed = || async {
            let all = admin.group_offsets("g", None).await.unwrap();
            let o = all.iter().find(|o| o.topic == "in" && o.partition == 0);
            o.map(|o| (o.offset, o.metadata.clone()))
        };
        let mut writer = Writer::at_least_once(client.clone(), Compression::None);
        let mut seen = Vec::new();
        for n in 1..=40i64 {
            commit_poll(&mut writer, &mut member, &tp, n).await;
            if let Some((Some(offset), _)) = committed().await {
                seen.push(offset);
            }
        }
        // What the broker holds only ever moves forward while commits travel.
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        writer.commit_quiet(&mut member, Vec::new()).await.unwrap();
        assert_eq!(
            committed().await,
            Some((Some(400), Some("mark-40".to_string())))
        );
        for n in 41..=50i64 {
            commit_poll(&mut writer, &mut member, &tp, n).await;
        }
        member.close().await.unwrap();
        assert_eq!(
            committed().await,
            Some((Some(500), Some("mark-50".to_string())))
        );
        broker.shutdown().await;
    }

    /// An instance's transactional id is the same at every membership, differs between
    /// instances, and fits the 249 bytes an id may have whatever the pipeline's name.
    #[test]
    fn an_instances_transactional_id_is_stable_and_fits() {
        assert_eq!(transactional_id("wc", 1), transactional_id("wc", 1));
        assert_ne!(transactional_id("wc", 1), transactional_id("wc", 2));
        assert!(transactional_id("wc", 1).starts_with("pipeline.wc.1."));
        let long = "n".repeat(236);
        let id = transactional_id(&long, u32::MAX);
        assert!(id.len() <= 249, "{}", id.len());
        assert_ne!(id, transactional_id(&"m".repeat(236), u32::MAX));
    }

    /// Both writers build their batches with the sink's codec and `quiver.source` as the
    /// batches' numbered header, and what they wrote reads back whole (values and the
    /// `quiver.source` header), uncompressed by the consumer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_writers_compress_their_batches_with_the_sinks_codec() {
        use quiver_protocol::batch::BatchHeader;

        let dir = tempfile::tempdir().unwrap();
        let (broker, client) =
            crate::test_broker::with_topics(dir.path(), &["lz4-out", "zstd-out"]).await;
        let records = |topic: &str| -> Vec<ProducerRecord> {
            (0..500)
                .map(|i| {
                    let mut r = ProducerRecord::new(topic, format!("value {i}"));
                    r.headers
                        .push(("quiver.source".into(), Bytes::from(format!("in/0/{i}"))));
                    r
                })
                .collect()
        };
        let mut lz4 = Writer::at_least_once(client.clone(), Compression::Lz4);
        for r in records("lz4-out") {
            lz4.send(r).await.unwrap();
        }
        let sealed = lz4.seal();
        lz4.finish(sealed).await.unwrap();
        let mut zstd = Writer::exactly_once(
            client.clone(),
            &transactional_id("p", 2),
            "m",
            Compression::Zstd,
        )
        .await
        .unwrap();
        for r in records("zstd-out") {
            zstd.send(r).await.unwrap();
        }
        let sealed = zstd.seal();
        zstd.finish(sealed).await.unwrap();

        for (topic, codec) in [
            ("lz4-out", Compression::Lz4),
            ("zstd-out", Compression::Zstd),
        ] {
            let (_, payload) = crate::test_broker::fetch_start(&client, topic, 1 << 20).await;
            let header = BatchHeader::parse(&payload).unwrap();
            assert_eq!(header.compression().unwrap(), codec, "{topic}");
            assert!(header.has_numbered_header(), "{topic}");
            let read = crate::test_broker::read_start(&client, topic, 500).await;
            for (i, r) in read.iter().enumerate() {
                assert_eq!(r.value, format!("value {i}").as_bytes(), "{topic}");
                let source = r.headers.iter().find(|h| h.key == "quiver.source").unwrap();
                assert_eq!(source.value, format!("in/0/{i}").as_bytes(), "{topic}");
            }
        }
        zstd.abort().await;
        broker.shutdown().await;
    }
}
