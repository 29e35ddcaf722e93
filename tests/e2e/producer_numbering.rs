//! Producers' sequence numbering against a real broker: nothing a producer drops unsent or
//! cannot hear about leaves a gap the broker would wait on. A transaction aborted before
//! its batches were sent takes no sequence numbers; an `acks=0` producer, which never reads
//! the broker's answers, does not number its batches, so one refused batch does not hold
//! every later one. And the read side of a transaction still open: a read-committed
//! consumer starting at the end starts at the last stable offset. A flush waits for what
//! was sent before it, not for what other tasks sharing the producer keep sending.

use std::time::{Duration, Instant};

use quiver_client::{
    Acks, Client, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, SeekTo,
    TransactionalProducer,
};

use super::harness::{in_process_broker, TestBroker};

#[test]
fn a_transaction_aborted_before_its_batches_were_sent_leaves_no_gap() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let (broker, client) = in_process_broker(dir.path(), "t").await;
        let mut tx = TransactionalProducer::init(client.clone(), "numbering")
            .await
            .unwrap();
        tx.prepare_topic("t").await.unwrap();
        // More than one batch's worth: the first batches close while the transaction is
        // still being filled.
        let value = vec![b'x'; 1024];
        for _ in 0..1200 {
            tx.send(ProducerRecord::new("t", value.clone())).unwrap();
        }
        tx.abort().await.unwrap();
        tx.send(ProducerRecord::new("t", "after the abort"))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), tx.commit(None))
            .await
            .expect("the commit is answered")
            .expect("the next transaction commits");
        drop(tx);
        drop(client);
        broker.shutdown().await;
    });
}

#[test]
fn an_acks_0_producer_goes_on_after_a_refused_batch() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "fire"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.expect("connect");
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks: Acks::None,
                ..ProducerConfig::default()
            },
        );
        // Ten days ahead of the broker's clock: refused, and nobody hears of it.
        let future = quiver_core::clock::now_ms() + 10 * 24 * 3600 * 1000;
        producer
            .send(ProducerRecord::new("fire", "from the future").with_timestamp(future))
            .await
            .unwrap();
        producer.flush().await.unwrap();
        for i in 0..10 {
            producer
                .send(ProducerRecord::new("fire", format!("ok-{i}")))
                .await
                .unwrap();
            producer.flush().await.unwrap();
        }
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig {
                start: SeekTo::Beginning,
                ..ConsumerConfig::default()
            },
        );
        consumer.assign_all("fire").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        while got.len() < 10 {
            assert!(
                Instant::now() < deadline,
                "only {got:?} of the 10 records after the refused one arrived"
            );
            got.extend(
                consumer
                    .poll_timeout(Duration::from_millis(200))
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| String::from_utf8_lossy(&r.value).into_owned()),
            );
        }
        assert!(got.iter().all(|v| v.starts_with("ok-")), "{got:?}");
    });
}

/// A read-committed consumer starting "at the end" starts at the last stable offset, not
/// the high watermark: records of a transaction open when it started are read once the
/// transaction commits (starting at the watermark skipped them for good).
#[test]
fn a_read_committed_consumer_starting_at_the_end_reads_a_transaction_open_then() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let (broker, client) = in_process_broker(dir.path(), "t").await;
        let mut tx = TransactionalProducer::init(client.clone(), "open-then")
            .await
            .unwrap();
        tx.prepare_topic("t").await.unwrap();
        for i in 0..10 {
            tx.send(ProducerRecord::new("t", format!("in-txn-{i}")))
                .unwrap();
        }
        tx.flush().await.unwrap();
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig {
                isolation: quiver_client::Isolation::ReadCommitted,
                ..ConsumerConfig::default()
            },
        );
        consumer.assign_all("t").await.unwrap();
        // Its start is resolved now, while the transaction is open.
        let none = consumer
            .poll_timeout(Duration::from_millis(300))
            .await
            .unwrap();
        assert!(none.is_empty(), "{none:?}");
        tx.commit(None).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = 0;
        while got < 10 {
            assert!(
                Instant::now() < deadline,
                "{got} of the transaction's 10 records were read"
            );
            got += consumer
                .poll_timeout(Duration::from_millis(200))
                .await
                .unwrap()
                .len();
        }
        drop(consumer);
        drop(tx);
        drop(client);
        broker.shutdown().await;
    });
}

#[test]
fn a_flush_waits_for_what_was_sent_before_it_not_for_what_others_keep_sending() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let (_broker, client) = in_process_broker(dir.path(), "busy").await;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let stop = Arc::new(AtomicBool::new(false));
        // Another task keeps the shared producer busy for as long as the test runs: some
        // record of it is always on its way.
        let sender = {
            let (producer, stop) = (producer.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    producer
                        .send_nowait(quiver_client::RecordRef::new("busy", b"theirs"))
                        .await
                        .unwrap();
                    sent += 1;
                    if sent.is_multiple_of(256) {
                        tokio::task::yield_now().await;
                    }
                }
                sent
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mine = producer
            .send(ProducerRecord::new("busy", "mine"))
            .await
            .unwrap();
        let flushed = tokio::time::timeout(Duration::from_secs(30), producer.flush()).await;
        assert!(
            matches!(flushed, Ok(Ok(()))),
            "the flush waited for records sent after it began: {flushed:?}"
        );
        let md = futures::FutureExt::now_or_never(mine)
            .expect("the record sent before the flush is acknowledged when it returns")
            .unwrap();
        assert!(md.offset >= 0);
        stop.store(true, Ordering::Relaxed);
        assert!(sender.await.unwrap() > 0);
        producer.close().await.unwrap();
    });
}

#[test]
fn a_producer_sends_to_partitions_added_after_its_first_send() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "grow", "--partitions", "2"]);
    let log_ends = || -> Vec<i64> {
        b.describe("grow")["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .map(|p| p["log_end_offset"].as_i64().expect("log_end_offset"))
            .collect()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.expect("connect");
        let producer = Producer::new(
            client,
            ProducerConfig {
                metadata_max_age: Duration::from_millis(200),
                ..ProducerConfig::default()
            },
        );
        for i in 0..4 {
            producer
                .send(ProducerRecord::new("grow", format!("before-{i}")))
                .await
                .unwrap();
            producer.flush().await.unwrap();
        }
        b.cli_ok(&["topic", "alter", "grow", "--partitions", "4"]);
        // Keyless records take the partitions in turn, one batch each: once the producer
        // has looked the topic up again, the new partitions get their share.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0;
        loop {
            let ends = log_ends();
            if ends.iter().all(|&e| e > 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the new partitions got nothing: {ends:?}"
            );
            for _ in 0..8 {
                producer
                    .send(ProducerRecord::new("grow", format!("after-{i}")))
                    .await
                    .unwrap();
                producer.flush().await.unwrap();
                i += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        producer.close().await.unwrap();
    });
}
