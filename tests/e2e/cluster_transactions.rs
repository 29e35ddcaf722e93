//! Transactions on a 3-broker cluster: a transactional id's coordinator is the leader of its
//! `__consumer_offsets` partition, markers go through each partition's leader, and a
//! partition's leader asks the coordinator before it takes a producer's first
//! transactional batch. A raw client's forged transactional batches are refused with
//! nothing stored; a transaction whose coordinator is killed (`kill -9`) between its writes
//! and its commit commits through the next coordinator, and read-committed consumers see
//! exactly the committed records.

use std::time::Duration;

use quiver_client::{Client, ClientConfig, ProducerRecord, TransactionalProducer};
use quiver_protocol::batch::{BatchBuilder, Compression};
use quiver_protocol::requests::{coordinator_partition, Acks, ProduceRequest, OFFSETS_TOPIC};
use quiver_protocol::ErrorCode;

use super::cluster::{succeeded, TestCluster};
use super::harness::printed_values;

/// The values of `topic`, read from the beginning with `isolation`, sorted.
fn values(c: &TestCluster, topic: &str, isolation: &str) -> Vec<String> {
    let out = c.cli(
        &[
            "consume",
            topic,
            "--from-beginning",
            "--isolation",
            isolation,
            "--output",
            "json",
        ],
        None,
    );
    succeeded(&out);
    let mut v = printed_values(&out);
    v.sort();
    v
}

/// A transactional batch of `producer_id`/`epoch` sent as is to `t`/0.
async fn forged(client: &Client, producer_id: i64, epoch: i16) -> quiver_client::ClientError {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(None, b"sneaky", quiver_core::clock::now_ms(), &[]);
    b.set_producer(producer_id, epoch, 0);
    b.set_transactional(true);
    let req = ProduceRequest {
        topic: "t".into(),
        partition: 0,
        acks: Acks::All,
        timeout_ms: 5_000,
    };
    let batch = b.build();
    // Right after the cluster starts, the partition or the transaction coordinator's
    // partition may have no leader yet (a retriable answer): ask again until the answer is
    // about the batch.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = client
            .request_for_partition("t", 0, &req, batch.clone(), Duration::from_secs(10))
            .await
            .expect_err("a forged transactional batch is refused");
        if !e.is_retriable() || std::time::Instant::now() > deadline {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn cluster_transactions_refuse_forged_batches_and_survive_their_coordinator() {
    let c = TestCluster::start();
    succeeded(&c.cli(
        &[
            "topic",
            "create",
            "t",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
        None,
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = ClientConfig {
        ca_file: Some(c.ca()),
        ..ClientConfig::new(c.bootstrap())
    };
    let (client, mut tx, coordinator) = rt.block_on(async {
        let client = Client::connect(config).await.expect("connect");
        // A producer id no coordinator handed out.
        let e = forged(&client, 777, 0).await;
        assert_eq!(e.code(), Some(ErrorCode::ProducerFenced), "{e}");
        // One shaped like a coordinator's, that it never handed out.
        let e = forged(&client, (1 << 62) | (2 << 48) | 12345, 0).await;
        assert_eq!(e.code(), Some(ErrorCode::ProducerFenced), "{e}");
        // A real producer writing a partition it did not add to its transaction.
        let honest = TransactionalProducer::init(client.clone(), "honest")
            .await
            .unwrap();
        let (pid, epoch) = honest.producer();
        let e = forged(&client, pid, epoch).await;
        assert_eq!(e.code(), Some(ErrorCode::InvalidTxnState), "{e}");
        assert!(e.to_string().contains("AddPartitionsToTxn"), "{e}");

        // A transaction writes every partition and has not committed yet.
        // A timeout longer than any failover, so the kill below never times it out.
        let mut tx = TransactionalProducer::init_with_timeout(
            client.clone(),
            "mover",
            Duration::from_secs(600),
        )
        .await
        .unwrap();
        tx.prepare_topic("t").await.unwrap();
        for i in 0..9u32 {
            tx.send(ProducerRecord::new("t", format!("a{i}")).with_partition(i % 3))
                .unwrap();
        }
        tx.flush().await.unwrap();
        let partitions = client.partition_count(OFFSETS_TOPIC).await.unwrap();
        let p = coordinator_partition("mover", partitions);
        let meta = client
            .metadata(Some(vec![OFFSETS_TOPIC.to_string()]))
            .await
            .unwrap();
        let coordinator = meta.topics[0].partitions[p as usize].leader;
        (client, tx, coordinator)
    });
    assert!(
        values(&c, "t", "read-committed").is_empty(),
        "nothing forged was stored, and nothing is committed yet"
    );
    // The coordinator dies between the writes and the commit.
    c.kill(u64::from(coordinator));
    rt.block_on(async {
        tx.commit(None)
            .await
            .expect("commit through the next coordinator");
        // The next transaction aborts.
        for i in 0..3u32 {
            tx.send(ProducerRecord::new("t", format!("b{i}")).with_partition(i))
                .unwrap();
        }
        tx.flush().await.unwrap();
        tx.abort().await.unwrap();
        drop(client);
    });
    let committed: Vec<String> = (0..9).map(|i| format!("a{i}")).collect();
    assert_eq!(values(&c, "t", "read-committed"), committed);
    assert_eq!(
        values(&c, "t", "read-uncommitted").len(),
        12,
        "the aborted records are in the log, never read committed"
    );
}
