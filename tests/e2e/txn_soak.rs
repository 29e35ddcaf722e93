//! The fault soak's transactional writer and its check. One transactional producer writes
//! transaction `n` as one record `t{n}-{k}` into each partition `k` of [`TXN_TOPIC`], and
//! commits it (every fifth one it aborts instead). A transaction whose commit or abort
//! answered is committed or aborted; one whose outcome the faults hid is uncertain (the
//! producer initialises its id again, which finishes or aborts it). Read committed
//! afterwards, every committed transaction appears whole and once, no aborted one appears
//! at all, and an uncertain one appears whole or not at all: a transaction is atomic across
//! partitions whose leaders and coordinator die under it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_client::{
    Client, Consumer, ConsumerConfig, Isolation, ProducerRecord, SeekTo, TransactionalProducer,
};

/// The transactional writer's topic.
pub(super) const TXN_TOPIC: &str = "jepsen-txn";
/// Its partitions: each transaction writes all of them.
pub(super) const TXN_PARTITIONS: u32 = 3;
const TXN_ID: &str = "soak-txn";

/// What the transactional writer saw.
#[derive(Debug, Default)]
pub(super) struct TxnHistory {
    committed: Vec<u64>,
    aborted: Vec<u64>,
    uncertain: Vec<u64>,
    /// Why steps failed: the error's text without numbers, and how often.
    pub(super) failures: BTreeMap<String, u64>,
}

impl TxnHistory {
    fn failed(&mut self, error: &quiver_client::ClientError) {
        super::checker::tally_failure(&mut self.failures, error);
    }
}

/// Writes transactions until `stop`.
pub(super) async fn txn_writer(
    client: Client,
    history: Arc<Mutex<TxnHistory>>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    let mut tx: Option<TransactionalProducer> = None;
    while !stop.load(Ordering::Relaxed) {
        let producer = match &mut tx {
            Some(t) => t,
            None => match TransactionalProducer::init(client.clone(), TXN_ID).await {
                Ok(t) => tx.insert(t),
                Err(e) => {
                    history.lock().unwrap().failed(&e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        if let Err(e) = producer.prepare_topic(TXN_TOPIC).await {
            history.lock().unwrap().failed(&e);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        for k in 0..TXN_PARTITIONS {
            let record = ProducerRecord::new(TXN_TOPIC, format!("t{n}-{k}")).with_partition(k);
            producer.send(record).expect("prepared topic");
        }
        let abort = n % 5 == 4;
        let outcome = if abort {
            match producer.flush().await {
                Ok(_) => producer.abort().await,
                Err(e) => Err(e),
            }
        } else {
            producer.commit(None).await.map(drop)
        };
        let mut h = history.lock().unwrap();
        match outcome {
            Ok(()) if abort => h.aborted.push(n),
            Ok(()) => h.committed.push(n),
            Err(e) => {
                h.failed(&e);
                h.uncertain.push(n);
                // Initialising the id again ends whatever this transaction left open.
                tx = None;
            }
        }
        n += 1;
    }
}

/// What the check found.
#[derive(Debug)]
pub(super) struct TxnVerdict {
    pub(super) committed: usize,
    pub(super) aborted: usize,
    pub(super) uncertain: usize,
    pub(super) uncertain_visible: usize,
    /// Transactions seen in part, more than once, seen though aborted, or missing though
    /// committed.
    pub(super) violations: Vec<String>,
}

/// Ends any transaction left open, reads [`TXN_TOPIC`] read-committed, and checks it
/// against `history`.
pub(super) async fn check_txns(client: &Client, history: &TxnHistory) -> TxnVerdict {
    // A new epoch aborts (or finishes) what the writer left open, so the stable offsets
    // reach the ends.
    let mut backoff = 0;
    while let Err(e) = TransactionalProducer::init(client.clone(), TXN_ID).await {
        backoff += 1;
        assert!(
            backoff < 100,
            "cannot initialise the soak's transactional id: {e}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut c = Consumer::new(
        client.clone(),
        ConsumerConfig {
            isolation: Isolation::ReadCommitted,
            start: SeekTo::Beginning,
            ..ConsumerConfig::default()
        },
    );
    c.assign(TXN_TOPIC, 0..TXN_PARTITIONS).await.unwrap();
    let ends = c.end_offsets(TXN_TOPIC).await.unwrap();
    let mut seen: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    loop {
        let mut behind = false;
        for (p, end) in &ends {
            behind |= c.position(TXN_TOPIC, *p).await.unwrap() < *end;
        }
        if !behind {
            break;
        }
        for r in c.poll_timeout(Duration::from_millis(200)).await.unwrap() {
            let v = String::from_utf8_lossy(&r.value).into_owned();
            let n: u64 = v[1..v.find('-').unwrap()].parse().unwrap();
            seen.entry(n).or_default().push(r.partition);
        }
    }
    let whole = |parts: &Vec<u32>| {
        let mut p = parts.clone();
        p.sort_unstable();
        p == (0..TXN_PARTITIONS).collect::<Vec<_>>()
    };
    let mut violations = Vec::new();
    for n in &history.committed {
        match seen.get(n) {
            Some(p) if whole(p) => {}
            other => violations.push(format!("committed {n} read as {other:?}")),
        }
    }
    for n in &history.aborted {
        if let Some(p) = seen.get(n) {
            violations.push(format!("aborted {n} read as {p:?}"));
        }
    }
    let mut uncertain_visible = 0;
    for n in &history.uncertain {
        match seen.get(n) {
            None => {}
            Some(p) if whole(p) => uncertain_visible += 1,
            Some(p) => violations.push(format!("uncertain {n} read in part: {p:?}")),
        }
    }
    let known: std::collections::BTreeSet<u64> = history
        .committed
        .iter()
        .chain(&history.aborted)
        .chain(&history.uncertain)
        .copied()
        .collect();
    for n in seen.keys().filter(|n| !known.contains(n)) {
        violations.push(format!("{n} read but never written"));
    }
    TxnVerdict {
        committed: history.committed.len(),
        aborted: history.aborted.len(),
        uncertain: history.uncertain.len(),
        uncertain_visible,
        violations,
    }
}
