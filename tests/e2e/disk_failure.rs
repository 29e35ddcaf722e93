//! A failing disk: once a durable flush fails, the broker acknowledges nothing more (a retry
//! could succeed without the lost data, "fsyncgate") and stops with an error that says so;
//! restarted, it serves every record it acknowledged.

use std::time::{Duration, Instant};

use quiver_client::{Acks, Client, ConsumeMode, Producer, ProducerConfig, ProducerRecord};
use quiver_core::log::store::FAIL_SYNC_AFTER;

use super::crash_recovery::read_all;
use super::harness::TestBroker;

#[test]
fn a_failed_flush_stops_the_broker_and_nothing_after_it_is_acknowledged() {
    // The 40th durable flush fails (EIO, injected); later ones would succeed again.
    let mut b = TestBroker::start_with("", &[(FAIL_SYNC_AFTER, "40")]);
    b.cli_ok(&["topic", "create", "disk", "--partitions", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (acked, refusal) = rt.block_on(async {
        let client = Client::connect(b.client_config()).await.expect("connect");
        let producer = Producer::new(
            client,
            ProducerConfig {
                acks: Acks::Leader,
                delivery_timeout: Duration::from_secs(10),
                ..ProducerConfig::default()
            },
        );
        // One record at a time, each waiting for its flush, until one is refused.
        let mut acked = Vec::new();
        for i in 0..1_000u32 {
            let sent = producer
                .send(ProducerRecord::new("disk", format!("r{i}")))
                .await;
            match sent {
                Ok(ack) => match ack.await {
                    Ok(_) => acked.push(format!("r{i}")),
                    Err(e) => return (acked, e.to_string()),
                },
                Err(e) => return (acked, e.to_string()),
            }
        }
        panic!("1,000 records acknowledged though the 40th flush failed");
    });
    assert!(
        !acked.is_empty(),
        "the fault hit before any produce:\n{}",
        b.log()
    );
    assert!(
        refusal.contains("restart the broker"),
        "the refused produce says what to do: {refusal}\n{}",
        b.log()
    );
    // The broker stops on its own, with an error naming the failure.
    let mut child = b.child.take().expect("running");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the broker kept running after a failed flush:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a failed flush is a failed exit");
    assert!(
        b.log().contains("the broker stopped: a disk flush failed"),
        "{}",
        b.log()
    );
    // Restarted on a sound disk: every acknowledged record is there, in order.
    b.env.clear();
    b.spawn();
    let stored: Vec<String> = rt
        .block_on(read_all(b.client_config(), "disk", ConsumeMode::LongPoll))
        .into_iter()
        .map(|(_, _, v)| v)
        .collect();
    assert!(
        stored.len() >= acked.len() && stored[..acked.len()] == acked[..],
        "acknowledged: {} records; stored after the restart: {:?}",
        acked.len(),
        &stored[..stored.len().min(50)]
    );
}
