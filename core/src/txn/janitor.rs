//! The last resort against transactions that never end in a partition.
//!
//! Every coordinator aborts a transaction past its timeout (15 min at most) and writes its
//! markers; a transaction still open in a partition long after that is either one no
//! coordinator knows (a producer that lied, or a batch that slipped in after its
//! transaction ended), which would hold the partition's last stable offset back forever,
//! or one whose coordinator decided its end but could not write every marker yet (its
//! broker was down, or cut off from this one). So the partition's leader asks the
//! transaction's coordinator first, and aborts the transaction itself only when the
//! coordinator says it holds no such transaction: aborting a transaction it is committing
//! would lose this partition's part of it. Offsets that `__consumer_offsets` partitions
//! hold for a transaction are treated the same way.

use std::sync::Arc;
use std::time::Duration;

use quiver_protocol::batch::Marker;
use tokio::sync::watch;

use super::{MarkerWriter, TxnMarker, ABANDONED_TXN_MS};
use crate::group::OFFSETS_TOPIC;
use crate::topic::TopicRegistry;

/// How often partitions are checked.
const EVERY: Duration = Duration::from_secs(60);

/// Checks every partition every minute until `stop`.
pub async fn run(
    topics: Arc<TopicRegistry>,
    markers: Arc<MarkerWriter>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        pass(&topics, &markers, crate::clock::now_ms() - ABANDONED_TXN_MS).await;
    }
}

/// Aborts every transaction open since before `before_ms` in the partitions this broker
/// leads, and every one holding offsets in the offsets partitions it serves, that its
/// coordinator no longer holds; returns how many.
pub async fn pass(topics: &TopicRegistry, markers: &MarkerWriter, before_ms: i64) -> usize {
    let mut aborted = 0;
    for t in topics.list() {
        if t.name() == OFFSETS_TOPIC {
            continue;
        }
        for log in &t.partitions {
            for (producer_id, epoch) in log.txns_open_before(before_ms) {
                let (topic, partition) = (&log.topic, log.partition);
                if !log.takes_appends()
                    || !abandoned(markers, producer_id, epoch, topic, partition).await
                {
                    continue;
                }
                let abort = TxnMarker {
                    producer_id,
                    epoch,
                    marker: Marker::Abort,
                    coordinator_epoch: None,
                };
                match markers.append_local(topic, partition, abort).await {
                    Ok(offset) => {
                        tracing::warn!(%topic, partition, producer_id, epoch, offset, "aborted a transaction open past every coordinator's timeout, which its coordinator does not hold");
                        aborted += 1;
                    }
                    // A follower's leader does this.
                    Err(e) if e.code() == quiver_protocol::ErrorCode::NotLeader => {}
                    Err(e) => {
                        tracing::warn!(%topic, partition, producer_id, error = %e, "cannot abort an abandoned transaction yet")
                    }
                }
            }
        }
    }
    let services = markers.groups().map(|g| g.all()).unwrap_or_default();
    for service in services {
        for (producer_id, epoch) in service.txns_held_before(before_ms) {
            let partition = service.partition();
            if !abandoned(markers, producer_id, epoch, OFFSETS_TOPIC, partition).await {
                continue;
            }
            match service.abort_held_txn(producer_id, epoch).await {
                Ok(()) => {
                    tracing::warn!(partition, producer_id, epoch, "aborted transactional offsets held past every coordinator's timeout, which their coordinator does not hold");
                    aborted += 1;
                }
                Err(e) => {
                    tracing::warn!(partition, producer_id, error = %e, "cannot abort abandoned transactional offsets yet")
                }
            }
        }
    }
    aborted
}

/// Whether the coordinator of `producer_id` says its transaction at `epoch` does not hold
/// `topic`/`partition`; false while it holds it or cannot be asked (asked again next pass).
async fn abandoned(
    markers: &MarkerWriter,
    producer_id: i64,
    epoch: i16,
    topic: &str,
    partition: u32,
) -> bool {
    match markers
        .coordinator_holds(producer_id, epoch, topic, partition)
        .await
    {
        Some(holds) => {
            if holds {
                tracing::info!(%topic, partition, producer_id, epoch, "a transaction open past every timeout is still held by its coordinator; left to it");
            }
            !holds
        }
        None => {
            tracing::warn!(%topic, partition, producer_id, epoch, "a transaction open past every timeout: its coordinator cannot be asked now; asking again later");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use quiver_protocol::batch::{BatchBuilder, Compression};
    use quiver_protocol::requests::InitTransactionsRequest;

    use super::*;
    use crate::group::{GroupDirectory, GroupService};
    use crate::log::{Flusher, PartitionLog};
    use crate::topic::TopicConfig;
    use crate::txn::{ProducerIds, TxnCoordinator, TxnEnv};

    /// Appends one transactional batch of `producer_id` at `epoch` to `log`.
    async fn append_txn_batch(
        log: &Arc<PartitionLog>,
        producer_id: i64,
        epoch: i16,
        flusher: &Arc<Flusher>,
    ) {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"stuck", 1, &[]);
        b.set_producer(producer_id, epoch, 0);
        b.set_transactional(true);
        let raw = b.build();
        let h = quiver_protocol::batch::validate(&raw, usize::MAX).unwrap();
        log.append(
            vec![(raw, h)],
            &TopicConfig::default(),
            flusher,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(log.txn_open(producer_id, epoch));
    }

    #[tokio::test]
    async fn a_transaction_open_past_every_timeout_is_aborted_unless_its_coordinator_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        let topics = Arc::new(TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap());
        let flusher = Flusher::new(db.clone());
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(flusher.clone().run(Duration::from_millis(5), rx));
        // A lone broker: its coordinator answers for every producer id it issued.
        let (service, replayed) = GroupService::open(
            topics.clone(),
            flusher.clone(),
            crate::group::service::test_group_log(),
        )
        .unwrap();
        let markers = MarkerWriter::new(topics.clone(), flusher.clone());
        let env = Arc::new(TxnEnv {
            markers: markers.clone(),
            ids: ProducerIds::new(db.sled().clone(), 1),
            max_ids: 10,
        });
        let txns = TxnCoordinator::new(service.clone(), replayed.txn_states, env);
        let groups = GroupDirectory::new();
        markers.attach_groups(&groups);
        groups.set_lone(service, txns.clone());
        let t = topics.create("t", 2, &BTreeMap::new()).unwrap();
        let (lying, held) = (t.partitions[0].clone(), t.partitions[1].clone());
        // A transactional batch of a producer id no coordinator issued.
        append_txn_batch(&lying, 77, 3, &flusher).await;
        // A transaction its coordinator holds (open; it would be as much while its markers
        // are being written), in the other partition.
        let init = InitTransactionsRequest {
            transactional_id: "app".into(),
            timeout_ms: 60_000,
            held: None,
        };
        let a = txns.init(&init).await.unwrap();
        txns.register_partition(a.producer_id, a.producer_epoch, "t", 1)
            .await
            .unwrap();
        append_txn_batch(&held, a.producer_id, a.producer_epoch, &flusher).await;

        let now = crate::clock::now_ms();
        assert_eq!(
            pass(&topics, &markers, now - 60_000).await,
            0,
            "not old yet"
        );
        assert_eq!(pass(&topics, &markers, now + 1).await, 1);
        assert!(
            !lying.txn_open(77, 3),
            "aborted: the stable offset moves on"
        );
        assert!(
            held.txn_open(a.producer_id, a.producer_epoch),
            "its coordinator holds it: left to the coordinator"
        );
        assert_eq!(pass(&topics, &markers, now + 1).await, 0);
    }
}
