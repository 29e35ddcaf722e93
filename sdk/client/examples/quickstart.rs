//! Produce a few keyed records and read them back with the Quiver client SDK.
//!
//! Start a broker first (`cargo run --release -- broker start`), then:
//! `cargo run -p quiver-client --example quickstart -- 127.0.0.1:7400 ./quiver-data/tls/ca.pem`

use std::collections::BTreeMap;
use std::time::Duration;

use quiver_client::{
    Admin, Client, ClientConfig, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig,
    ProducerRecord, SeekTo,
};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let mut args = std::env::args().skip(1);
    let bootstrap = args.next().unwrap_or_else(|| "127.0.0.1:7400".into());
    let ca = args
        .next()
        .unwrap_or_else(|| "./quiver-data/tls/ca.pem".into());
    let client = Client::connect(ClientConfig {
        ca_file: Some(ca.into()),
        ..ClientConfig::new(bootstrap)
    })
    .await?;

    match Admin::new(client.clone())
        .create_topic("quickstart", 3, BTreeMap::new())
        .await
    {
        Ok(_) | Err(ClientError::TopicAlreadyExists(_)) => {}
        Err(e) => return Err(e),
    }

    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..10 {
        let delivery = producer
            .send(
                ProducerRecord::new("quickstart", format!("hello {i}"))
                    .with_key(format!("user-{}", i % 3)),
            )
            .await?;
        let md = delivery.await?;
        println!(
            "sent hello {i} to partition {} at offset {}",
            md.partition, md.offset
        );
    }
    producer.close().await?;

    let mut consumer = Consumer::new(
        client,
        ConsumerConfig {
            start: SeekTo::Beginning,
            ..ConsumerConfig::default()
        },
    );
    consumer.assign_all("quickstart").await?;
    for r in consumer.poll_timeout(Duration::from_secs(2)).await? {
        println!(
            "read {}/{}@{}: {}",
            r.topic,
            r.partition,
            r.offset,
            String::from_utf8_lossy(&r.value)
        );
    }
    Ok(())
}
