//! The cluster under faults, checked like Jepsen checks Kafka: three brokers from
//! `quiver cluster start`, each behind a userspace UDP proxy (its advertised address), so
//! the test can cut links between brokers. Idempotent producers write unique values with
//! `acks=all` while the nemesis `kill -9`s partition leaders and the controller leader
//! (restarting them with `cluster start`, sometimes at once, sometimes after the controller
//! fenced them) and isolates one broker at a time from its peers (both directions), or
//! makes every link lossy and slow. After the faults heal, a final read of every partition
//! goes to the [`checker`](super::checker); every broker's stored batches are compared
//! byte for byte below the high watermark; the counts and failover times are printed.
//! Beside them a transactional writer commits and aborts transactions over three
//! partitions, and a read-committed read checks each is atomic ([`super::txn_soak`]).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_client::{Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};
use quiver_protocol::batch::{split_batches, RecordIter};
use quiver_protocol::requests::{Acks, FetchRequest};
use serde_json::Value;

use super::checker::{check, tally_failure, Send};
use super::harness::{bin, cli_at, free_udp_port, unsafe_kill, wait_for};
use super::netproxy::{LinkFault, UdpProxy};
use super::txn_soak::{check_txns, txn_writer, TxnHistory, TXN_PARTITIONS, TXN_TOPIC};

const BROKERS: usize = 3;
const PARTITIONS: u32 = 6;
const LEADER_KILLS: usize = 20;
const NETWORK_PARTITIONS: usize = 10;
/// Leader kills on a healed cluster, one at a time, after the fault schedule.
const CLEAN_KILLS: usize = 5;
const TOPIC: &str = "jepsen";

pub(super) struct FaultCluster {
    dir: tempfile::TempDir,
    file: std::path::PathBuf,
    listen: Vec<u16>,
    proxies: Vec<UdpProxy>,
}

impl FaultCluster {
    fn on_free_ports(overrides: &str) -> FaultCluster {
        let dir = tempfile::tempdir().unwrap();
        let listen: Vec<u16> = (0..BROKERS).map(|_| free_udp_port()).collect();
        let proxies: Vec<UdpProxy> = listen
            .iter()
            .enumerate()
            .map(|(i, p)| UdpProxy::start(SocketAddr::from(([127, 0, 0, 1], *p)), 1000 + i as u64))
            .collect();
        let file = dir.path().join("cluster.toml");
        let mut text = format!("data_root = \"{}\"\n", dir.path().join("qc").display());
        for (i, p) in listen.iter().enumerate() {
            text.push_str(&format!(
                "[[brokers]]\nid = {}\nlisten = \"127.0.0.1:{p}\"\nadvertised_addr = \"{}\"\n{overrides}",
                i + 1,
                proxies[i].addr()
            ));
        }
        std::fs::write(&file, text).unwrap();
        FaultCluster {
            dir,
            file,
            listen,
            proxies,
        }
    }

    /// Starts the cluster; tries again on fresh ports when one was taken meanwhile (free
    /// ports are found by binding and releasing them; another test may take one first).
    pub(super) fn start() -> FaultCluster {
        Self::start_with("")
    }

    /// [`FaultCluster::start`] with broker config lines for every broker.
    pub(super) fn start_with(overrides: &str) -> FaultCluster {
        super::harness::start_on_free_ports(
            || Self::on_free_ports(overrides),
            |c| c.run(&["start"]),
        )
    }

    /// Broker `id`'s data directory.
    pub(super) fn data_dir(&self, id: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("qc/broker-{id}"))
    }

    /// `cluster start` for the brokers the nemesis killed; tried again a few times when a
    /// restart fails (the nemesis is pacing; a slow machine must not end the run early).
    pub(super) fn restart_stopped(&self) {
        for attempt in 1..=5 {
            let out = self.run(&["start"]);
            if out.status.success() {
                return;
            }
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(attempt < 5, "cluster start failed 5 times: {err}");
            eprintln!("restart failed (attempt {attempt}): {err}");
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// `quiver cluster ARGS --config FILE`.
    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["cluster"];
        all.extend(args);
        all.extend(["--config", self.file.to_str().unwrap()]);
        std::process::Command::new(bin())
            .args(&all)
            .output()
            .unwrap()
    }

    pub(super) fn cluster(&self, args: &[&str]) -> Value {
        let status = args[0] == "status";
        let mut all = args.to_vec();
        if status {
            all.extend(["--output", "json"]);
        }
        let out = self.run(&all);
        assert!(
            out.status.success(),
            "cluster {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if status {
            serde_json::from_slice(&out.stdout).unwrap()
        } else {
            Value::Null
        }
    }

    pub(super) fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("qc/tls/ca.pem")
    }

    /// The proxy address of broker `id` (1-based), as clients reach it.
    pub(super) fn addr_of(&self, id: usize) -> String {
        self.proxies[id - 1].addr().to_string()
    }

    pub(super) fn bootstrap(&self) -> String {
        self.proxies
            .iter()
            .map(|p| p.addr().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Creates `topic` with `partitions`, a replica on every broker and
    /// `min.insync.replicas = 2`.
    pub(super) fn create_topic(&self, topic: &str, partitions: u32) {
        let out = cli_at(
            &self.bootstrap(),
            &self.ca(),
            &[
                "topic",
                "create",
                topic,
                "--partitions",
                &partitions.to_string(),
                "--replication-factor",
                "3",
                "--config",
                "min.insync.replicas=2",
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn describe(&self) -> Value {
        self.describe_topic(TOPIC)
    }

    /// `topic describe TOPIC` through the cluster.
    pub(super) fn describe_topic(&self, topic: &str) -> Value {
        let out = cli_at(
            &self.bootstrap(),
            &self.ca(),
            &["topic", "describe", topic, "--output", "json"],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub(super) fn pid(&self, id: u64) -> Option<u32> {
        self.cluster(&["status"])["brokers"][id as usize - 1]["pid"]
            .as_u64()
            .map(|p| p as u32)
    }

    /// Cuts (or heals) every link between broker `id` and its peers, both directions.
    pub(super) fn isolate(&self, id: usize, fault: LinkFault) {
        for other in 1..=BROKERS {
            if other != id {
                self.link(id, other, fault);
            }
        }
    }

    /// Cuts (or heals) the link between brokers `a` and `b`, both directions.
    pub(super) fn link(&self, a: usize, b: usize, fault: LinkFault) {
        self.proxies[a - 1].set(&HashSet::from([self.listen[b - 1]]), fault);
        self.proxies[b - 1].set(&HashSet::from([self.listen[a - 1]]), fault);
    }

    fn all_links(&self, fault: LinkFault) {
        let brokers: HashSet<u16> = self.listen.iter().copied().collect();
        for p in &self.proxies {
            p.set(&brokers, fault);
        }
    }
}

impl Drop for FaultCluster {
    fn drop(&mut self) {
        for p in &self.proxies {
            p.heal();
        }
        let _ = std::process::Command::new(bin())
            .args(["cluster", "stop", "--config", self.file.to_str().unwrap()])
            .output();
        for id in 1..=BROKERS {
            if let Ok(p) =
                std::fs::read_to_string(self.dir.path().join(format!("qc/broker-{id}/broker.pid")))
            {
                if let Ok(p) = p.trim().parse::<u32>() {
                    unsafe_kill(p, "KILL");
                }
            }
        }
        // SOAK_KEEP_DATA=1 keeps the brokers' data and logs (`qc/broker-N/broker.log`)
        // for a post-mortem: the directory is moved out of the temporary one. (Not a
        // QUIVER_ variable: the brokers it starts read those as config keys.)
        if std::env::var_os("SOAK_KEEP_DATA").is_some() {
            let kept = std::env::temp_dir().join(format!(
                "quiver-soak-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            ));
            if std::fs::rename(self.dir.path(), &kept).is_ok() {
                eprintln!("soak data and broker logs kept in {}", kept.display());
            }
        }
    }
}

/// What the writers saw: every send, and per partition when writes issued after a moment
/// were first acknowledged.
#[derive(Default)]
struct History {
    sends: Vec<Send>,
    /// (partition, sent at, acknowledged at)
    acks: Vec<(u32, Instant, Instant)>,
    /// Why sends failed: the error's text without numbers, and how often.
    failures: BTreeMap<String, u64>,
}

impl History {
    fn failed(&mut self, error: &quiver_client::ClientError) {
        tally_failure(&mut self.failures, error);
    }
}

async fn writer(
    id: u32,
    client: Client,
    history: Arc<Mutex<History>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let producer = Producer::new(
        client,
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(2),
            delivery_timeout: Duration::from_secs(30),
            ..ProducerConfig::default()
        },
    );
    // In flight per partition: a partition waiting for a new leader does not hold up
    // writes to the others.
    let inflight: Vec<Arc<tokio::sync::Semaphore>> = (0..PARTITIONS)
        .map(|_| Arc::new(tokio::sync::Semaphore::new(16)))
        .collect();
    let mut seq = 0u64;
    let mut tasks = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let partition = (seq % u64::from(PARTITIONS)) as u32;
        let Ok(permit) = inflight[partition as usize].clone().try_acquire_owned() else {
            seq += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let value = format!("w{id}-{seq}");
        let sent_at = Instant::now();
        let record = ProducerRecord::new(TOPIC, value.clone()).with_partition(partition);
        let this_seq = seq;
        seq += 1;
        match producer.send(record).await {
            Ok(delivery) => {
                let history = history.clone();
                tasks.push(tokio::spawn(async move {
                    let result = delivery.await;
                    let mut h = history.lock().unwrap();
                    if let Err(e) = &result {
                        h.failed(e);
                    }
                    let acked = result.ok().map(|m| m.offset);
                    if acked.is_some() {
                        h.acks.push((partition, sent_at, Instant::now()));
                    }
                    h.sends.push(Send {
                        producer: id,
                        partition,
                        seq: this_seq,
                        value,
                        acked,
                    });
                    drop(permit);
                }));
            }
            Err(e) => {
                history.lock().unwrap().failed(&e);
                history.lock().unwrap().sends.push(Send {
                    producer: id,
                    partition,
                    seq: this_seq,
                    value,
                    acked: None,
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if seq.is_multiple_of(16) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = producer.close().await;
}

/// Reads every record of every partition below its high watermark, from its leader.
async fn read_all(client: &Client) -> BTreeMap<u32, BTreeMap<i64, String>> {
    let mut out = BTreeMap::new();
    for p in 0..PARTITIONS {
        let mut records = BTreeMap::new();
        let mut offset = 0i64;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                Instant::now() < deadline,
                "final read of partition {p} did not finish"
            );
            let req = FetchRequest {
                topic: TOPIC.into(),
                partition: p,
                offset,
                max_bytes: 4 << 20,
                max_wait_ms: 0,
                min_bytes: 1,
                processor: None,
                isolation: Default::default(),
            };
            let (resp, payload) = match client
                .request_for_partition(TOPIC, p, &req, Bytes::new(), Duration::from_secs(10))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            for b in split_batches(&payload, 64 << 20).unwrap() {
                for r in RecordIter::new(&b, 64 << 20).unwrap() {
                    let r = r.unwrap();
                    if r.offset >= offset {
                        records.insert(r.offset, String::from_utf8_lossy(&r.value).into_owned());
                    }
                }
            }
            offset = records
                .keys()
                .next_back()
                .map_or(offset, |o| o + 1)
                .max(offset);
            // Done at the leader's high watermark once it reached the log end (a leader
            // that just took over may still be a fetch behind).
            if offset >= resp.high_watermark {
                if resp.high_watermark == resp.log_end_offset {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        out.insert(p, records);
    }
    out
}

/// Every broker's stored batches of the topic below `hw[p]`, compared byte for byte.
fn replicas_identical(c: &FaultCluster, hw: &BTreeMap<u32, i64>) -> Result<(), String> {
    let mut copies: Vec<BTreeMap<u32, Vec<Vec<u8>>>> = Vec::new();
    for id in 1..=BROKERS {
        let db = quiver_core::log::store::open(&c.dir.path().join(format!("qc/broker-{id}/log")))
            .map_err(|e| e.to_string())?;
        let reg =
            quiver_core::topic::TopicRegistry::open(db, quiver_core::topic::TopicConfig::default())
                .map_err(|e| e.to_string())?;
        let t = reg.topic(TOPIC).map_err(|e| e.to_string())?;
        let mut parts = BTreeMap::new();
        for log in &t.partitions {
            let bound = hw[&log.partition];
            let mut batches = Vec::new();
            let mut offset = log.snapshot().log_start;
            while offset < bound {
                let read = log
                    .read_to_log_end(offset, 4 << 20)
                    .map_err(|e| e.to_string())?;
                if read.payload.is_empty() {
                    return Err(format!("broker {id} partition {} ends at {offset}, below the high watermark {bound}", log.partition));
                }
                for b in split_batches(&read.payload, 64 << 20).map_err(|e| e.to_string())? {
                    let h = quiver_protocol::batch::BatchHeader::parse(&b)
                        .map_err(|e| e.to_string())?;
                    if h.next_offset() <= bound {
                        batches.push(b.to_vec());
                    }
                    offset = h.next_offset();
                }
            }
            parts.insert(log.partition, batches);
        }
        copies.push(parts);
    }
    for p in 0..PARTITIONS {
        for (i, copy) in copies.iter().enumerate().skip(1) {
            if copy[&p] != copies[0][&p] {
                let describe = |b: &Vec<u8>| {
                    quiver_protocol::batch::BatchHeader::parse(b).map_or_else(
                        |e| format!("unparsable ({e})"),
                        |h| {
                            format!(
                                "[{}..{}) epoch {} producer {}/{} seq {} ({} bytes)",
                                h.base_offset,
                                h.next_offset(),
                                h.leader_epoch,
                                h.producer_id,
                                h.producer_epoch,
                                h.base_sequence,
                                b.len()
                            )
                        },
                    )
                };
                let (a, b) = (&copies[0][&p], &copy[&p]);
                let at = a.iter().zip(b.iter()).position(|(x, y)| x != y);
                let detail = match at {
                    Some(k) => format!(
                        "batch {k}: broker 1 has {}, broker {} has {}",
                        describe(&a[k]),
                        i + 1,
                        describe(&b[k])
                    ),
                    None => format!(
                        "broker 1 has {} batches, broker {} has {}",
                        a.len(),
                        i + 1,
                        b.len()
                    ),
                };
                return Err(format!(
                    "partition {p}: broker {} differs from broker 1 below the high watermark {}: {detail}",
                    i + 1,
                    hw[&p]
                ));
            }
        }
    }
    Ok(())
}

fn median_and_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort_unstable();
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    (v[v.len() / 2], v[v.len() - 1])
}

/// About 4–5 minutes of three brokers under faults (then five clean leader kills), beside the rest of the suite on two
/// cores: opt-in until its restarts are steady under CI load. Run it with
/// `cargo test --test tests cluster_faults -- --ignored --nocapture`.
#[test]
#[ignore = "fault soak, ~5 min: cargo test --test tests cluster_faults -- --ignored --nocapture"]
fn acks_all_writes_survive_leader_kills_and_network_partitions() {
    let c = FaultCluster::start();
    c.create_topic(TOPIC, PARTITIONS);
    c.create_topic(TXN_TOPIC, TXN_PARTITIONS);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let history: Arc<Mutex<History>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = ClientConfig {
        ca_file: Some(c.ca()),
        ..ClientConfig::new(c.bootstrap())
    };
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (config, history, stop) = (config.clone(), history.clone(), stop.clone());
            rt.spawn(async move {
                let client = Client::connect(config).await.expect("connect");
                writer(w, client, history, stop).await;
            })
        })
        .collect();
    let txn_history: Arc<Mutex<TxnHistory>> = Arc::default();
    let txn_task = {
        let (config, history, stop) = (config.clone(), txn_history.clone(), stop.clone());
        rt.spawn(async move {
            let client = Client::connect(config).await.expect("connect");
            txn_writer(client, history, stop).await;
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    let mut kills: Vec<(u32, Instant)> = Vec::new();
    let (mut leader_kills, mut controller_kills, mut partitions_cut, mut lossy) = (0, 0, 0, 0);
    let mut slow_fences = 0;
    let mut round = 0usize;
    while leader_kills < LEADER_KILLS || partitions_cut < NETWORK_PARTITIONS {
        round += 1;
        if round.is_multiple_of(3) && partitions_cut < NETWORK_PARTITIONS {
            // Isolate one broker from its peers, long enough for the controller to fence it
            // (its leaderships move) on most rounds.
            let victim = 1 + (partitions_cut % BROKERS);
            c.isolate(
                victim,
                LinkFault {
                    blackhole: true,
                    ..LinkFault::default()
                },
            );
            std::thread::sleep(Duration::from_secs(if partitions_cut.is_multiple_of(2) {
                8
            } else {
                3
            }));
            c.isolate(victim, LinkFault::default());
            partitions_cut += 1;
            if partitions_cut.is_multiple_of(4) {
                // Every link lossy and slow for a while.
                c.all_links(LinkFault {
                    drop_pct: 20,
                    delay: Duration::from_millis(20),
                    ..LinkFault::default()
                });
                std::thread::sleep(Duration::from_secs(3));
                c.all_links(LinkFault::default());
                lossy += 1;
            }
            continue;
        }
        // Kill a partition's leader (every fourth time the controller leader instead).
        let status = c.cluster(&["status"]);
        let (victim, partition) = if round.is_multiple_of(4) {
            controller_kills += 1;
            (status["controller_leader"].as_u64(), None)
        } else {
            let p = (leader_kills as u32) % PARTITIONS;
            let d = c.describe();
            let leader = d["partitions"][p as usize]["leader"].as_u64();
            (leader, Some(p))
        };
        let Some(victim) = victim.filter(|v| *v >= 1) else {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        let Some(pid) = c.pid(victim) else {
            c.restart_stopped();
            continue;
        };
        unsafe_kill(pid, "KILL");
        let at = Instant::now();
        // Gone for good before anything restarts it (a dying process still holds its data
        // directory's lock and its port for a moment on a loaded machine).
        let gone_by = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < gone_by {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(p) = partition {
            leader_kills += 1;
            kills.push((p, at));
        }
        if round % 2 == 1 {
            // Let the controller notice the silence and fence it first (pacing only: when a
            // loaded machine makes that slow, the nemesis goes on and counts it).
            let until = Instant::now() + Duration::from_secs(30);
            while c.cluster(&["status"])["brokers"][victim as usize - 1]["fenced"] != true {
                if Instant::now() > until {
                    slow_fences += 1;
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        c.restart_stopped();
    }
    let fault_time = started.elapsed();
    // Clean failovers: on a healed cluster (every replica in every ISR), one partition
    // leader killed at a time, so the figure is the failover itself and not a kill landing
    // while an earlier victim is still catching up.
    for p in &c.proxies {
        p.heal();
    }
    c.restart_stopped();
    let mut clean_kills: Vec<(u32, Instant)> = Vec::new();
    // Whether each clean kill's victim also led the controller (a Raft election comes first).
    let mut clean_controller_victims: Vec<bool> = Vec::new();
    for i in 0..CLEAN_KILLS {
        let healed = Instant::now() + Duration::from_secs(120);
        while c.cluster(&["status"])["under_replicated_partitions"].as_u64() != Some(0)
            && Instant::now() < healed
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        let p = (i as u32) % PARTITIONS;
        // The leader as two looks a second apart agree on (a preferred-leader election may
        // still be moving it after the heal).
        let leader_of = || {
            c.describe()["partitions"][p as usize]["leader"]
                .as_u64()
                .filter(|v| *v >= 1)
        };
        let settled = Instant::now() + Duration::from_secs(30);
        let mut seen = leader_of();
        let victim = loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = leader_of();
            if now.is_some() && now == seen {
                break now;
            }
            if Instant::now() > settled {
                break None;
            }
            seen = now;
        };
        let Some(victim) = victim else {
            continue;
        };
        let Some(pid) = c.pid(victim) else {
            continue;
        };
        let led_controller = c.cluster(&["status"])["controller_leader"].as_u64() == Some(victim);
        unsafe_kill(pid, "KILL");
        clean_kills.push((p, Instant::now()));
        clean_controller_victims.push(led_controller);
        let gone_by = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < gone_by {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Back once the partition took writes again.
        let resumed = Instant::now() + Duration::from_secs(60);
        let at = clean_kills.last().map(|k| k.1).unwrap_or_else(Instant::now);
        while Instant::now() < resumed
            && !history
                .lock()
                .unwrap()
                .acks
                .iter()
                .any(|(ap, sent, _)| *ap == p && *sent >= at)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        c.restart_stopped();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    rt.block_on(txn_task).unwrap();
    for p in &c.proxies {
        p.heal();
    }
    wait_for(
        120,
        "the cluster to heal (every broker in every ISR)",
        || {
            let s = c.cluster(&["status"]);
            s["under_replicated_partitions"] == 0 && s["offline_partitions"] == 0
        },
    );
    // (The final read goes on until each leader's high watermark reaches its log end: a
    // leader that just took over starts from the one it had as a follower, a fetch behind.)
    let txn_history = std::mem::take(&mut *txn_history.lock().unwrap());
    let (reads, txns) = rt.block_on(async {
        let client = Client::connect(config.clone()).await.unwrap();
        (
            read_all(&client).await,
            check_txns(&client, &txn_history).await,
        )
    });
    for (why, n) in &txn_history.failures {
        println!("failed transaction steps: {n} x {why}");
    }
    println!(
        "transactions: committed {}, aborted {}, uncertain {} ({} of them visible, all whole), violations {}: {:?}",
        txns.committed,
        txns.aborted,
        txns.uncertain,
        txns.uncertain_visible,
        txns.violations.len(),
        txns.violations.iter().take(10).collect::<Vec<_>>()
    );
    let history = std::mem::take(&mut *history.lock().unwrap());
    let verdict = check(&history.sends, &reads);
    for (why, n) in &history.failures {
        println!("failed sends: {n} x {why}");
    }
    for r in super::checker::describe_reorders(&history.sends) {
        println!("reordered: {r}");
    }

    // Failover: from each leader kill to the first acknowledged write sent after it.
    let failover_times = |kills: &[(u32, Instant)]| -> Vec<Duration> {
        kills
            .iter()
            .filter_map(|(p, at)| {
                history
                    .acks
                    .iter()
                    .filter(|(ap, sent, _)| ap == p && sent >= at)
                    .map(|(_, _, acked)| *acked - *at)
                    .min()
            })
            .collect()
    };
    let failovers = failover_times(&kills);
    let (median, max) = median_and_max(failovers.clone());
    let clean = failover_times(&clean_kills);
    let (clean_median, clean_max) = median_and_max(clean.clone());
    let controller_victims: Vec<Duration> = clean_kills
        .iter()
        .zip(&clean_controller_victims)
        .filter(|(_, led)| **led)
        .flat_map(|(k, _)| failover_times(std::slice::from_ref(k)))
        .collect();

    let hw: BTreeMap<u32, i64> = c.describe()["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_u64().unwrap() as u32,
                p["high_watermark"].as_i64().unwrap(),
            )
        })
        .collect();
    c.cluster(&["stop"]);
    let identical = replicas_identical(&c, &hw);
    println!(
        "fault run: {:.0?} of faults — {leader_kills} partition-leader kills, {controller_kills} controller-leader kills, {partitions_cut} broker isolations, {lossy} lossy periods, {slow_fences} kills not fenced within 30 s\n\
         checker: acknowledged {}, read {}, lost {}, duplicated {}, inconsistent offsets {}, reordered (nonmonotonic send) {}, unacknowledged but written {}\n\
         replicas identical below the high watermark: {}\n\
         failover (kill -> first acknowledged write) under the fault schedule: median {:.2?}, max {:.2?} over {} kills: {:.1?}\n\
         clean failover (one kill at a time on a healed cluster): median {:.2?}, max {:.2?} over {} kills: {:.1?}\n\
         of which the victim also led the controller: {:.1?}",
        fault_time,
        verdict.acknowledged,
        verdict.read,
        verdict.lost,
        verdict.duplicated,
        verdict.inconsistent_offsets,
        verdict.nonmonotonic_send,
        verdict.unacknowledged_seen,
        identical.as_ref().map_or_else(|e| format!("no: {e}"), |()| "yes".into()),
        median,
        max,
        failovers.len(),
        failovers,
        clean_median,
        clean_max,
        clean.len(),
        clean,
        controller_victims,
    );
    assert!(leader_kills >= LEADER_KILLS && partitions_cut >= NETWORK_PARTITIONS);
    assert!(
        verdict.acknowledged > 1000,
        "too little was acknowledged to judge: {verdict:?}"
    );
    assert!(verdict.ok(), "{verdict:?}");
    assert!(
        txns.committed > 20,
        "too few transactions committed to judge: {txns:?}"
    );
    assert!(txns.violations.is_empty(), "{txns:?}");
    identical.unwrap();
}
