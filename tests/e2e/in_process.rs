//! A client in the broker's process (as its deployed pipelines are) reaches it without
//! QUIC: with a bootstrap address where nothing listens, every request still succeeds only
//! because it is handed to the broker's dispatcher, and it gets the same checks and errors.

use std::collections::BTreeMap;

use quiver_client::{
    Admin, Client, ClientConfig, ClientError, ConsumeMode, Consumer, ConsumerConfig, Producer,
    ProducerConfig, ProducerRecord, SeekTo,
};
use quiver_core::{Broker, BrokerConfig};

#[test]
fn a_client_in_the_brokers_process_produces_and_consumes_without_the_network() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let broker = Broker::start(BrokerConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        })
        .await
        .expect("broker starts");
        let client = Client::connect(ClientConfig {
            // Nothing listens on the discard port: only the in-process door answers.
            local: Some(broker.in_process()),
            connect_timeout: std::time::Duration::from_millis(300),
            ..ClientConfig::new("127.0.0.1:9")
        })
        .await
        .expect("no network connection is made");
        let admin = Admin::new(client.clone());
        admin
            .create_topic("local", 2, BTreeMap::new())
            .await
            .expect("create");
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..100u32 {
            producer
                .send(ProducerRecord::new("local", format!("v{i}")).with_key(format!("k{i}")))
                .await
                .expect("queued");
        }
        producer.flush().await.expect("acknowledged");
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig {
                start: SeekTo::Beginning,
                ..ConsumerConfig::default()
            },
        );
        consumer.assign_all("local").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 100 {
            got.extend(consumer.poll().await.expect("fetch in process"));
        }
        let mut values: Vec<String> = got
            .iter()
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect();
        values.sort();
        let mut want: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();
        want.sort();
        assert_eq!(values, want);

        // The same checks as over the network: an unknown topic is the same error.
        let e = admin
            .describe_topic("nope")
            .await
            .expect_err("no such topic");
        assert!(matches!(e, ClientError::TopicNotFound(_)), "{e:?}");
        // A push subscription needs a QUIC stream: it is not served in process, so this
        // client (whose network address is dead) cannot open one.
        let mut pushed = Consumer::new(
            client.clone(),
            ConsumerConfig {
                mode: ConsumeMode::Subscribe,
                start: SeekTo::Beginning,
                ..ConsumerConfig::default()
            },
        );
        pushed.assign_all("local").await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(3), pushed.poll()).await;
        assert!(
            !matches!(r, Ok(Ok(ref v)) if !v.is_empty()),
            "a subscription went over no network: {r:?}"
        );
        drop(pushed);
        drop(consumer);
        drop(producer);
        drop(client);
        broker.shutdown().await;
    });
}
