//! How an instance writes a poll's results and commits its input, per guarantee:
//!
//! - at-least-once: records go out through an idempotent producer (acks=all); once every one
//!   is acknowledged, the input offsets (with the state marks as metadata) are committed. A
//!   crash in between writes the poll's output again on the next attempt.
//! - exactly-once: records go into a transaction of the instance's transactional producer;
//!   the input offsets (with the state marks) are added to the transaction and it commits:
//!   output, state changes and offsets become visible together, or (abort, crash, fencing)
//!   not at all. Read-committed consumers never see an aborted attempt's output.
//!
//! Either way [`Writer::finish`] reports, per (topic, partition), the offsets the poll's
//! records landed at, which the state marks need.

use std::collections::BTreeMap;
use std::time::Duration;

use quiver_client::{
    Acks, Client, DeliveryFuture, GroupConsumer, Landed, OffsetCommit, Producer, ProducerConfig,
    ProducerRecord, RecordRef, TransactionalProducer, TxnOffsets,
};

use crate::error::RuntimeError;

/// How long a transaction may stay open: a crashed instance's transaction is aborted by the
/// broker after this (about when the group gives its partitions to another member), so
/// read-committed readers of the outputs wait at most this long behind a crash.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where each (topic, partition) written to landed.
pub type LandedMap = BTreeMap<(String, u32), Landed>;

/// The instance's output side.
pub enum Writer {
    /// Idempotent producer, acks=all; the writes of the current poll.
    AtLeastOnce {
        /// The producer.
        producer: Producer,
        /// Writes not yet acknowledged.
        inflight: Vec<DeliveryFuture>,
    },
    /// A transactional producer.
    ExactlyOnce(TransactionalProducer),
}

impl Writer {
    /// The at-least-once writer.
    pub fn at_least_once(client: Client) -> Writer {
        Writer::AtLeastOnce {
            producer: Producer::new(
                client,
                ProducerConfig {
                    acks: Acks::All,
                    linger: Duration::from_millis(2),
                    ..ProducerConfig::default()
                },
            ),
            inflight: Vec::new(),
        }
    }

    /// The exactly-once writer of a group member: its transactional id is unique to the
    /// membership (`pipeline.<name>.<member id>`), and the group's generation check at
    /// offset commit fences a member that lost its partitions.
    pub async fn exactly_once(
        client: Client,
        pipeline: &str,
        member_id: &str,
    ) -> Result<Writer, RuntimeError> {
        let id = format!("pipeline.{pipeline}.{member_id}");
        Ok(Writer::ExactlyOnce(
            TransactionalProducer::init_with_timeout(client, &id, TXN_TIMEOUT).await?,
        ))
    }

    /// Sends (or buffers in the transaction) one output record; [`Writer::finish`] waits for
    /// it. Where it landed is not reported (see [`Writer::send_tracked`]).
    pub async fn send(&mut self, record: ProducerRecord) -> Result<(), RuntimeError> {
        match self {
            Writer::AtLeastOnce { producer, .. } => {
                let headers: Vec<(&str, &[u8])> = record
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_ref()))
                    .collect();
                producer
                    .send_nowait(RecordRef {
                        topic: &record.topic,
                        partition: record.partition,
                        key: record.key.as_deref(),
                        value: &record.value,
                        headers: &headers,
                        timestamp: record.timestamp,
                    })
                    .await?;
            }
            Writer::ExactlyOnce(tx) => {
                tx.prepare_topic(&record.topic).await?;
                tx.send(record)?;
            }
        }
        Ok(())
    }

    /// Sends one record whose landing offset [`Writer::finish`] reports (state changes).
    pub async fn send_tracked(&mut self, record: ProducerRecord) -> Result<(), RuntimeError> {
        match self {
            Writer::AtLeastOnce { producer, inflight } => {
                inflight.push(producer.send(record).await?);
            }
            Writer::ExactlyOnce(tx) => {
                tx.prepare_topic(&record.topic).await?;
                tx.send(record)?;
            }
        }
        Ok(())
    }

    /// Waits until everything sent is written (acknowledged, or flushed into the
    /// transaction) and says where it landed.
    pub async fn finish(&mut self) -> Result<LandedMap, RuntimeError> {
        match self {
            Writer::AtLeastOnce { producer, inflight } => {
                // Every record sent so far acknowledged (an error if any failed).
                producer.flush().await?;
                let mut landed = LandedMap::new();
                for d in inflight.drain(..) {
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
                Ok(landed)
            }
            Writer::ExactlyOnce(tx) => Ok(tx.flush().await?),
        }
    }

    /// Commits the input: `offsets` (with their metadata) of `member`'s group. At least
    /// once: a group commit after the writes; exactly once: the transaction's commit.
    pub async fn commit(
        &mut self,
        member: &mut GroupConsumer,
        offsets: Vec<OffsetCommit>,
    ) -> Result<(), RuntimeError> {
        match self {
            Writer::AtLeastOnce { .. } => {
                for o in offsets {
                    if let Some(m) = o.metadata {
                        member.set_commit_metadata(&o.topic, o.partition, m);
                    }
                }
                member.commit().await?;
            }
            Writer::ExactlyOnce(tx) => {
                let txn = TxnOffsets {
                    group: member.group().to_string(),
                    member_id: member.member_id(),
                    generation: member.generation(),
                    offsets: offsets.clone(),
                };
                tx.commit(Some(txn)).await?;
                member.mark_committed(&offsets);
            }
        }
        Ok(())
    }

    /// Gives up the current poll's writes: exactly once, the transaction is aborted (its
    /// output is never visible to read-committed readers); at least once, nothing can be
    /// taken back.
    pub async fn abort(&mut self) {
        match self {
            Writer::AtLeastOnce { inflight, .. } => inflight.clear(),
            Writer::ExactlyOnce(tx) => {
                if let Err(e) = tx.abort().await {
                    tracing::warn!(error = %e, "aborting the transaction failed (the broker aborts it after its timeout)");
                }
            }
        }
    }

    /// True for the exactly-once writer.
    pub fn is_transactional(&self) -> bool {
        matches!(self, Writer::ExactlyOnce(_))
    }

    /// Flushes what the at-least-once producer holds (before leaving).
    pub async fn close(&mut self) {
        if let Writer::AtLeastOnce { producer, .. } = self {
            let _ = producer.flush().await;
        }
    }
}
