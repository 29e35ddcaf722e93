//! Tests' broker: a real broker (QUIC endpoint, sled files in a temporary directory) in
//! this process, and a client reaching it in process, as deployed pipelines do.

use quiver_client::Client;
use quiver_core::{Broker, BrokerConfig, BrokerHandle};

/// Starts a broker keeping its data in `dir`, and a client of it.
pub async fn start(dir: &std::path::Path) -> (BrokerHandle, Client) {
    let broker = Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        ..BrokerConfig::default()
    })
    .await
    .expect("broker starts");
    let client = Client::connect(broker.in_process_client_config())
        .await
        .expect("in-process client");
    (broker, client)
}

/// [`start`], with one-partition topics `topics` created.
pub async fn with_topics(dir: &std::path::Path, topics: &[&str]) -> (BrokerHandle, Client) {
    let (broker, client) = start(dir).await;
    let admin = quiver_client::Admin::new(client.clone());
    for t in topics {
        admin
            .create_topic(t, 1, std::collections::BTreeMap::new())
            .await
            .expect("topic created");
    }
    (broker, client)
}

/// One fetch of `topic`/0 from offset 0, as a raw request: the answer and its batches.
pub async fn fetch_start(
    client: &Client,
    topic: &str,
    max_bytes: u32,
) -> (quiver_protocol::requests::FetchResponse, bytes::Bytes) {
    let fetch = quiver_protocol::requests::FetchRequest {
        topic: topic.into(),
        partition: 0,
        offset: 0,
        max_bytes,
        max_wait_ms: 0,
        min_bytes: 0,
        processor: None,
        isolation: Default::default(),
    };
    client
        .request_for_partition(
            topic,
            0,
            &fetch,
            bytes::Bytes::new(),
            std::time::Duration::from_secs(10),
        )
        .await
        .expect("fetch answered")
}

/// The first `n` records of `topic`/0, read by a consumer (panics after 30 s without them).
pub async fn read_start(
    client: &Client,
    topic: &str,
    n: usize,
) -> Vec<quiver_client::ConsumedRecord> {
    use quiver_client::{Consumer, ConsumerConfig, SeekTo};
    use std::time::{Duration, Instant};

    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign(topic, [0]).await.unwrap();
    consumer.seek(topic, 0, SeekTo::Beginning).unwrap();
    let mut read = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while read.len() < n {
        assert!(
            Instant::now() < deadline,
            "{topic}: read {} of {n}",
            read.len()
        );
        read.extend(
            consumer
                .poll_timeout(Duration::from_millis(200))
                .await
                .unwrap(),
        );
    }
    read
}
