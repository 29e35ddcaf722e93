//! Crash safety: a broker killed with `kill -9` while a producer (acks=1, `flush = "batch"`)
//! runs loses no acknowledged record and duplicates none once restarted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_client::{
    Acks, Client, ClientConfig, ConsumeMode, Consumer, ConsumerConfig, Producer, ProducerConfig,
    ProducerRecord, SeekTo,
};

use super::harness::TestBroker;

/// Reads every record of `topic` from the beginning to the end offsets.
pub async fn read_all(
    cfg: ClientConfig,
    topic: &str,
    mode: ConsumeMode,
) -> Vec<(u32, i64, String)> {
    let client = Client::connect(cfg).await.expect("connect");
    let mut c = Consumer::new(
        client,
        ConsumerConfig {
            mode,
            start: SeekTo::Beginning,
            max_wait_ms: 100,
            ..ConsumerConfig::default()
        },
    );
    c.assign_all(topic).await.expect("assign");
    let ends = c.end_offsets(topic).await.expect("end offsets");
    let mut out = Vec::new();
    let mut done: HashMap<u32, bool> = ends.iter().map(|(p, e)| (*p, *e == 0)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done.values().any(|d| !d) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reading back timed out"
        );
        for r in c
            .poll_timeout(Duration::from_millis(200))
            .await
            .expect("poll")
        {
            if r.offset + 1 >= ends[&r.partition] {
                done.insert(r.partition, true);
            }
            out.push((
                r.partition,
                r.offset,
                String::from_utf8_lossy(&r.value).into_owned(),
            ));
        }
    }
    out
}

#[test]
fn acked_records_survive_kill_9_without_duplicates() {
    let mut b = TestBroker::start();
    b.cli_ok(&["topic", "create", "crash", "--partitions", "2"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let sent_before_kill = rt.block_on(async {
        let client = Client::connect(b.client_config()).await.expect("connect");
        let producer = Producer::new(
            client,
            ProducerConfig {
                acks: Acks::Leader,
                linger: Duration::from_millis(1),
                batch_size_bytes: 16 * 1024,
                delivery_timeout: Duration::from_secs(3),
                ..ProducerConfig::default()
            },
        );
        let mut tasks = Vec::new();
        let mut i: u64 = 0;
        // Produce until 20,000 records are acknowledged, then kill the broker mid-stream.
        loop {
            let n = acked.lock().unwrap().len();
            if n >= 20_000 {
                break;
            }
            for _ in 0..500 {
                let fut = match producer
                    .send(ProducerRecord::new("crash", format!("r{i}")))
                    .await
                {
                    Ok(f) => f,
                    Err(_) => break,
                };
                let acked = acked.clone();
                let value = i;
                tasks.push(tokio::spawn(async move {
                    if fut.await.is_ok() {
                        acked.lock().unwrap().push(value);
                    }
                }));
                i += 1;
            }
            tokio::task::yield_now().await;
        }
        b.kill9();
        let sent = i;
        // Keep sending into the dead broker for a moment: these must fail, not hang.
        for _ in 0..2000 {
            if let Ok(fut) = producer
                .send(ProducerRecord::new("crash", format!("r{i}")))
                .await
            {
                let acked = acked.clone();
                let value = i;
                tasks.push(tokio::spawn(async move {
                    if fut.await.is_ok() {
                        acked.lock().unwrap().push(value);
                    }
                }));
            }
            i += 1;
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("every send resolves after the broker died")
                .unwrap();
        }
        sent
    });
    b.spawn();
    let records = rt.block_on(read_all(b.client_config(), "crash", ConsumeMode::LongPoll));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, _, v) in &records {
        *seen.entry(v.clone()).or_default() += 1;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 20_000 && sent_before_kill >= 20_000);
    let lost: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|v| !seen.contains_key(&format!("r{v}")))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let dups: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "{} records duplicated, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(5)]
    );
    // Per partition, offsets are dense and values keep their produce order.
    for p in 0..2u32 {
        let mut part: Vec<&(u32, i64, String)> = records.iter().filter(|r| r.0 == p).collect();
        part.sort_by_key(|r| r.1);
        let nums: Vec<u64> = part.iter().map(|r| r.2[1..].parse().unwrap()).collect();
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "partition {p} out of produce order"
        );
    }
}

#[test]
fn subscribe_and_long_poll_read_the_same_records() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "modes", "--partitions", "3"]);
    let input: String = (0..5000).map(|i| format!("{i}\n")).collect();
    assert!(b
        .cli_with_stdin(
            &["produce", "modes", "--compression", "lz4"],
            Some(input.as_bytes())
        )
        .status
        .success());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut a = rt.block_on(read_all(b.client_config(), "modes", ConsumeMode::LongPoll));
    let mut s = rt.block_on(read_all(b.client_config(), "modes", ConsumeMode::Subscribe));
    a.sort();
    s.sort();
    assert_eq!(a.len(), 5000);
    assert_eq!(a, s);
}
