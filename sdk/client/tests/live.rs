//! Tests against a running broker. They are `#[ignore]`d: `cargo test` does not start a
//! broker for them (the workspace's end-to-end tests in `tests/` start their own brokers and
//! cover the same produce/consume paths). To run them, start one and point them at it:
//! `quiver broker start --data-dir /tmp/qd --listen 127.0.0.1:7411`, then
//! `QUIVER_TEST_BOOTSTRAP=127.0.0.1:7411 QUIVER_TEST_CA=/tmp/qd/tls/ca.pem cargo test -p
//! quiver-client --test live -- --ignored`. Run that way without `QUIVER_TEST_BOOTSTRAP`,
//! they fail (they never pass without having run).

use std::collections::BTreeMap;

use futures::StreamExt;
use quiver_client::{
    partition_for_key, Admin, Client, ClientConfig, ClientError, ConsumeMode, Consumer,
    ConsumerConfig, Producer, ProducerConfig, ProducerRecord, SeekTo,
};

async fn client() -> Client {
    let bootstrap = std::env::var("QUIVER_TEST_BOOTSTRAP")
        .expect("QUIVER_TEST_BOOTSTRAP must name a running broker (HOST:PORT) for the live tests");
    let cfg = ClientConfig {
        ca_file: std::env::var("QUIVER_TEST_CA").ok().map(Into::into),
        ..ClientConfig::new(bootstrap)
    };
    Client::connect(cfg).await.expect("connect")
}

fn unique(name: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{t}")
}

#[tokio::test]
#[ignore = "needs a running broker: QUIVER_TEST_BOOTSTRAP (see the module docs)"]
async fn produced_records_come_back_in_order_with_their_offsets() {
    let client = client().await;
    let admin = Admin::new(client.clone());
    let topic = unique("live-order");
    admin
        .create_topic(&topic, 3, BTreeMap::new())
        .await
        .expect("create");
    assert!(matches!(
        admin.create_topic(&topic, 3, BTreeMap::new()).await,
        Err(ClientError::TopicAlreadyExists(_))
    ));

    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let mut futs = Vec::new();
    for i in 0..300u32 {
        let key = format!("key-{}", i % 7);
        let rec = ProducerRecord::new(topic.clone(), format!("v{i}"))
            .with_key(key)
            .with_header("i", i.to_string());
        futs.push(producer.send(rec).await.expect("send"));
    }
    let mut per_partition: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for (i, f) in futs.into_iter().enumerate() {
        let md = f.await.expect("delivered");
        let key = format!("key-{}", i % 7);
        assert_eq!(md.partition, partition_for_key(key.as_bytes(), 3));
        per_partition
            .entry(md.partition)
            .or_default()
            .push(md.offset);
    }
    for offsets in per_partition.values() {
        assert_eq!(*offsets, (0..offsets.len() as i64).collect::<Vec<_>>());
    }
    producer.close().await.expect("close");
    assert!(matches!(
        producer
            .send(ProducerRecord::new(topic.clone(), "late"))
            .await,
        Err(ClientError::Closed)
    ));

    for mode in [ConsumeMode::LongPoll, ConsumeMode::Subscribe] {
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig {
                mode,
                start: SeekTo::Beginning,
                ..ConsumerConfig::default()
            },
        );
        consumer.assign_all(&topic).await.expect("assign");
        let ends = consumer.end_offsets(&topic).await.expect("ends");
        assert_eq!(ends.values().sum::<i64>(), 300);
        {
            let mut got = 0;
            let mut last: BTreeMap<u32, i64> = BTreeMap::new();
            let stream = consumer.records();
            futures::pin_mut!(stream);
            while got < 300 {
                let r = stream.next().await.expect("stream").expect("record");
                if let Some(prev) = last.insert(r.partition, r.offset) {
                    assert_eq!(r.offset, prev + 1);
                }
                assert_eq!(r.headers[0].key, "i");
                got += 1;
            }
        }
        // Seek back into the middle of a partition.
        let p = *ends
            .keys()
            .find(|p| ends[p] > 2)
            .expect("a partition with data");
        consumer.seek(&topic, p, SeekTo::Offset(1)).expect("seek");
        assert_eq!(consumer.position(&topic, p).await.expect("position"), 1);
        let mut first = None;
        while first.is_none() {
            first = consumer
                .poll()
                .await
                .expect("poll")
                .into_iter()
                .find(|r| r.partition == p);
        }
        assert_eq!(first.map(|r| r.offset), Some(1));
    }
}

#[tokio::test]
#[ignore = "needs a running broker: QUIVER_TEST_BOOTSTRAP (see the module docs)"]
async fn bulk_values_are_acknowledged_by_flush() {
    let client = client().await;
    let admin = Admin::new(client.clone());
    let topic = unique("live-bulk");
    admin
        .create_topic(&topic, 2, BTreeMap::new())
        .await
        .expect("create");
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let value = [7u8; 100];
    let n = producer
        .send_values(&topic, None, std::iter::repeat_n(&value[..], 50_000))
        .await
        .expect("send_values");
    assert_eq!(n, 50_000);
    producer.flush().await.expect("flush");
    let s = producer.stats();
    assert_eq!((s.records_acked, s.records_failed), (50_000, 0));
    let d = admin.describe_topic(&topic).await.expect("describe");
    assert_eq!(
        d.partitions.iter().map(|p| p.high_watermark).sum::<i64>(),
        50_000
    );
    assert!(matches!(
        producer
            .send(ProducerRecord::new(topic.clone(), "x").with_partition(9))
            .await,
        Err(ClientError::InvalidPartition { .. })
    ));
    assert!(matches!(
        admin.describe_topic(&unique("missing")).await,
        Err(ClientError::TopicNotFound(_))
    ));
}
