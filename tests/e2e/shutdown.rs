//! SIGTERM under load: every produce the broker received gets its answer (acknowledged
//! after its flush, or `BrokerShuttingDown`, which the SDK retries) before the process
//! exits; nothing waits for the shutdown timeout, and every acknowledged record is there,
//! once, after a restart.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_client::{Acks, Client, ConsumeMode, Producer, ProducerConfig, ProducerRecord};

use super::crash_recovery::read_all;
use super::harness::{unsafe_kill, TestBroker};

/// Polls `cond` every 20 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_answers_every_produce_and_loses_no_acknowledged_record() {
    // A shutdown timeout far above what an orderly shutdown needs: if anything waited for
    // it, the broker's log says so and the assertions below fail.
    let mut b = TestBroker::start_with_config(
        "shutdown_timeout_ms = 60000\n[topic_defaults]\nflush = \"batch\"\n",
    );
    b.cli_ok(&["topic", "create", "term", "--partitions", "3"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = rt
        .block_on(Client::connect(b.client_config()))
        .expect("connect");
    let producer = Arc::new(Producer::new(
        client,
        ProducerConfig {
            acks: Acks::Leader,
            linger: Duration::from_millis(1),
            batch_size_bytes: 8 * 1024,
            delivery_timeout: Duration::from_secs(90),
            ..ProducerConfig::default()
        },
    ));
    let sender = {
        let (producer, acked, failed, stop) = (
            producer.clone(),
            acked.clone(),
            failed.clone(),
            stop.clone(),
        );
        rt.spawn(async move {
            let mut i: u64 = 0;
            let mut tasks = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let fut = match producer
                    .send(ProducerRecord::new("term", format!("t{i}")))
                    .await
                {
                    Ok(f) => f,
                    Err(e) => {
                        failed.lock().unwrap().push(format!("send t{i}: {e}"));
                        break;
                    }
                };
                let (acked, failed) = (acked.clone(), failed.clone());
                let value = i;
                tasks.push(tokio::spawn(async move {
                    match fut.await {
                        Ok(_) => acked.lock().unwrap().push(value),
                        Err(e) => failed.lock().unwrap().push(format!("t{value}: {e}")),
                    }
                }));
                i += 1;
                if i.is_multiple_of(200) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            for t in tasks {
                let _ = t.await;
            }
            i
        })
    };
    wait_until(
        Duration::from_secs(60),
        "5,000 acknowledged records",
        || acked.lock().unwrap().len() >= 5_000,
    );
    let pid = b.pid();
    unsafe_kill(pid, "TERM");
    let mut child = b.child.take().expect("running");
    let deadline = Instant::now() + Duration::from_secs(50);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not exit within 50 s of SIGTERM:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = b.log();
    assert!(
        log.contains("every in-flight request answered"),
        "the broker did not answer everything before exiting:\n{log}"
    );
    assert!(!log.contains("requests still in flight"), "{log}");
    // Restart: the producer's retries (of requests refused with BrokerShuttingDown, or
    // cut by the closing connection) land now, each once.
    let acked_at_stop = acked.lock().unwrap().len();
    b.spawn();
    b.wait_ready();
    wait_until(
        Duration::from_secs(60),
        "records acknowledged after the restart",
        || acked.lock().unwrap().len() >= acked_at_stop + 2_000,
    );
    stop.store(true, Ordering::SeqCst);
    let sent = rt.block_on(sender).expect("sender");
    rt.block_on(producer.close()).expect("close");
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} sends failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let acked: HashSet<u64> = acked.lock().unwrap().iter().copied().collect();
    assert_eq!(acked.len() as u64, sent, "every send was acknowledged");
    let stored = rt.block_on(read_all(b.client_config(), "term", ConsumeMode::LongPoll));
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for (_, _, v) in &stored {
        let n: u64 = v.trim_start_matches('t').parse().expect("value");
        *seen.entry(n).or_default() += 1;
    }
    let dup: Vec<_> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(v, _)| *v)
        .collect();
    assert!(
        dup.is_empty(),
        "duplicated: {:?}",
        &dup[..dup.len().min(10)]
    );
    let lost: Vec<_> = acked.iter().filter(|v| !seen.contains_key(v)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost: {:?}",
        &lost[..lost.len().min(10)]
    );
}
