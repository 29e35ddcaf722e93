//! The last resort against transactions that never end in a partition.
//!
//! Every coordinator aborts a transaction past its timeout (15 min at most) and writes its
//! markers; a transaction still open in a partition long after that can only be one no
//! coordinator knows (a producer that lied, or a batch that slipped in after its
//! transaction ended). It would hold the partition's last stable offset back forever, so
//! the partition's leader aborts it itself. (`__consumer_offsets` partitions do the same
//! in their group service, which also drops the transaction's offsets.)

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
/// leads; returns how many.
pub async fn pass(topics: &TopicRegistry, markers: &MarkerWriter, before_ms: i64) -> usize {
    let mut aborted = 0;
    for t in topics.list() {
        if t.name() == OFFSETS_TOPIC {
            continue;
        }
        for log in &t.partitions {
            for (producer_id, epoch) in log.txns_open_before(before_ms) {
                let (topic, partition) = (&log.topic, log.partition);
                let abort = TxnMarker {
                    producer_id,
                    epoch,
                    marker: Marker::Abort,
                    coordinator_epoch: None,
                };
                match markers.append_local(topic, partition, abort).await {
                    Ok(offset) => {
                        tracing::warn!(%topic, partition, producer_id, epoch, offset, "aborted a transaction open past every coordinator's timeout");
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
    aborted
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use quiver_protocol::batch::{BatchBuilder, Compression};

    use super::*;
    use crate::log::Flusher;
    use crate::topic::TopicConfig;

    #[tokio::test]
    async fn a_transaction_open_past_every_timeout_is_aborted_by_its_partition() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        let topics = Arc::new(TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap());
        let flusher = Flusher::new(db);
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(flusher.clone().run(Duration::from_millis(5), rx));
        let t = topics.create("t", 1, &BTreeMap::new()).unwrap();
        let log = t.partitions[0].clone();
        // A transactional batch no coordinator knows about.
        let mut b = BatchBuilder::new(Compression::None);
        b.push(None, b"stuck", 1, &[]);
        b.set_producer(77, 3, 0);
        b.set_transactional(true);
        let raw = b.build();
        let h = quiver_protocol::batch::validate(&raw, usize::MAX).unwrap();
        log.append(
            vec![(raw, h)],
            &t.config(),
            &flusher,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(log.txn_open(77, 3));
        let markers = MarkerWriter::new(topics.clone(), flusher);
        let now = crate::clock::now_ms();
        assert_eq!(
            pass(&topics, &markers, now - 60_000).await,
            0,
            "not old yet"
        );
        assert_eq!(pass(&topics, &markers, now + 1).await, 1);
        assert!(!log.txn_open(77, 3), "aborted: the stable offset moves on");
        assert_eq!(pass(&topics, &markers, now + 1).await, 0);
    }
}
