//! `quiver cluster start|stop|status` with real broker daemons on 127.0.0.1: three brokers
//! from a cluster file form the controller and register; `status --output json` has the
//! contract fields; an RF=3 topic has full ISRs; the leader killed with `kill -9` is fenced,
//! producers and consumers carry on through new leaders with nothing lost or doubled, and
//! `start` again brings it back into every ISR with identical replicas;
//! `min.insync.replicas` refuses acks=all writes while too few replicas are in sync.
//! Bad cluster files are refused with file, line and key.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub(super) use super::harness::succeeded;
use super::harness::{
    bin, cli_at, free_udp_port, json_lines, keep_logs_on_failure, unsafe_kill, wait_for,
};

fn quiver(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().expect("run quiver")
}

fn status(file: &Path) -> Value {
    let out = quiver(&[
        "cluster",
        "status",
        "--config",
        file.to_str().unwrap(),
        "--output",
        "json",
    ]);
    succeeded(&out);
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// A 3-broker cluster from `quiver cluster start` on free ports, stopped (and any broker
/// left running killed) however the test ends.
pub(super) struct TestCluster {
    dir: tempfile::TempDir,
    file: PathBuf,
    ports: Vec<u16>,
}

impl TestCluster {
    /// A cluster file on free ports; `overrides` (broker config lines) go to every broker.
    fn on_free_ports(overrides: &str) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
        let file = dir.path().join("cluster.toml");
        let mut text = format!("data_root = \"{}\"\n", dir.path().join("qc").display());
        for (i, p) in ports.iter().enumerate() {
            text.push_str(&format!(
                "[[brokers]]\nid = {}\nlisten = \"127.0.0.1:{p}\"\n{overrides}",
                i + 1
            ));
        }
        std::fs::write(&file, text).unwrap();
        TestCluster { dir, file, ports }
    }

    /// Starts a cluster; tries again on fresh ports when one was taken meanwhile (free
    /// ports are found by binding and releasing them; another test may take one first).
    pub(super) fn start() -> TestCluster {
        Self::start_with("")
    }

    /// [`TestCluster::start`] with broker config lines for every broker.
    fn start_with(overrides: &str) -> TestCluster {
        super::harness::start_on_free_ports(
            || Self::on_free_ports(overrides),
            |c| c.run(&["cluster", "start"]),
        )
    }

    /// Broker `id`'s data directory.
    fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("qc/broker-{id}"))
    }

    /// `quiver cluster SUB --config FILE`.
    pub(super) fn run(&self, args: &[&str]) -> std::process::Output {
        let mut all = args.to_vec();
        all.extend(["--config", self.file.to_str().unwrap()]);
        quiver(&all)
    }

    fn status(&self) -> Value {
        status(&self.file)
    }

    pub(super) fn ca(&self) -> PathBuf {
        self.dir.path().join("qc").join("tls").join("ca.pem")
    }

    pub(super) fn bootstrap(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The CLI against the whole cluster (the bootstrap list).
    pub(super) fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
        cli_at(&self.bootstrap(), &self.ca(), args, stdin)
    }

    /// `topic describe` as broker `id` sees it (its own replica's offsets).
    fn describe_at(&self, id: u64, topic: &str) -> Value {
        let addr = format!("127.0.0.1:{}", self.ports[id as usize - 1]);
        let out = cli_at(
            &addr,
            &self.ca(),
            &["topic", "describe", topic, "--output", "json", "--local"],
            None,
        );
        succeeded(&out);
        serde_json::from_slice(&out.stdout).expect("describe json")
    }

    /// `topic reassign TOPIC --partition P --replicas IDS` through the cluster.
    fn reassign(&self, topic: &str, partition: u32, replicas: &str) -> std::process::Output {
        let partition = partition.to_string();
        self.cli(
            &[
                "topic",
                "reassign",
                topic,
                "--partition",
                &partition,
                "--replicas",
                replicas,
            ],
            None,
        )
    }

    fn describe(&self, topic: &str) -> Value {
        let out = self.cli(&["topic", "describe", topic, "--output", "json"], None);
        succeeded(&out);
        serde_json::from_slice(&out.stdout).expect("describe json")
    }

    fn pid(&self, id: u64) -> u32 {
        self.status()["brokers"][id as usize - 1]["pid"]
            .as_u64()
            .expect("a running broker") as u32
    }

    pub(super) fn kill(&self, id: u64) {
        unsafe_kill(self.pid(id), "KILL");
        wait_for(60, "the killed broker to be fenced", || {
            let b = &self.status()["brokers"][id as usize - 1];
            b["alive"] == false && b["fenced"] == true
        });
    }

    /// Partition `p`'s field `key` in a describe answer.
    fn partition(describe: &Value, p: u64) -> &Value {
        describe["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["partition"] == p)
            .expect("partition in describe")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test shows what its brokers said last (their logs go with the dir);
            // with QUIVER_TEST_KEEP_LOGS=DIR their whole logs are kept there.
            let logs: Vec<(PathBuf, String)> = (1..=3)
                .map(|id| {
                    let log = self.dir.path().join(format!("qc/broker-{id}/broker.log"));
                    (log, format!("broker-{id}.log"))
                })
                .collect();
            keep_logs_on_failure("cluster", &logs);
            for id in 1..=3 {
                let log = self.dir.path().join(format!("qc/broker-{id}/broker.log"));
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(80).collect();
                eprintln!("---- broker {id}, last {} log lines:", tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = self.run(&["cluster", "stop"]);
        for id in 1..=3 {
            let pid = self.dir.path().join(format!("qc/broker-{id}/broker.pid"));
            if let Ok(p) = std::fs::read_to_string(pid) {
                if let Ok(p) = p.trim().parse::<u32>() {
                    unsafe_kill(p, "KILL");
                }
            }
        }
    }
}

pub(super) fn lines(from: usize, to: usize) -> Vec<u8> {
    (from..=to)
        .map(|i| format!("k{i}:{i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn cluster_start_replicates_fails_over_and_restarts_a_killed_broker_into_the_isr() {
    let c = TestCluster::start();
    let s = c.status();
    for key in [
        "controller_leader",
        "ca",
        "brokers",
        "under_replicated_partitions",
        "offline_partitions",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    assert!(s["controller_leader"].as_u64().is_some(), "{s}");
    let brokers = s["brokers"].as_array().unwrap();
    assert_eq!(brokers.len(), 3);
    for b in brokers {
        for key in ["id", "addr", "pid", "alive", "fenced"] {
            assert!(b.get(key).is_some(), "broker lacks {key}: {b}");
        }
        assert_eq!(
            (&b["alive"], &b["fenced"]),
            (&Value::Bool(true), &Value::Bool(false)),
            "{b}"
        );
    }
    assert_eq!(PathBuf::from(s["ca"].as_str().unwrap()), c.ca());
    // The same view from any machine, through --bootstrap.
    let out = c.cli(&["cluster", "describe", "--output", "json"], None);
    succeeded(&out);
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["clustered"], true, "{d}");
    assert_eq!(d["controller_leader"], s["controller_leader"], "{d}");
    let described = d["brokers"].as_array().unwrap();
    assert_eq!(described.len(), 3, "{d}");
    for b in described {
        for key in ["id", "addr", "epoch", "fenced"] {
            assert!(b.get(key).is_some(), "broker lacks {key}: {b}");
        }
    }

    // An RF=3 topic: every partition has three replicas, all in sync, leaders spread.
    succeeded(&c.cli(
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "6",
            "--replication-factor",
            "3",
        ],
        None,
    ));
    let d = c.describe("orders");
    let parts = d["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 6);
    let mut leaders = std::collections::BTreeSet::new();
    for p in parts {
        assert_eq!(p["replicas"].as_array().unwrap().len(), 3, "{p}");
        assert_eq!(p["isr"].as_array().unwrap().len(), 3, "{p}");
        leaders.insert(p["leader"].as_u64().unwrap());
    }
    assert_eq!(leaders.len(), 3, "leaders spread over the brokers: {d}");
    assert_eq!(c.status()["under_replicated_partitions"], 0);
    // Partitions added later get the same replication, fully in sync.
    succeeded(&c.cli(&["topic", "alter", "orders", "--partitions", "8"], None));
    let d = c.describe("orders");
    assert_eq!(d["partitions"].as_array().unwrap().len(), 8, "{d}");
    for p in d["partitions"].as_array().unwrap() {
        assert_eq!(p["isr"].as_array().unwrap().len(), 3, "{p}");
    }
    // More replicas than brokers is refused, with the reason.
    let out = c.cli(
        &["topic", "create", "wide", "--replication-factor", "4"],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("larger than the 3 live brokers"), "{err}");

    let produce = |from, to| {
        c.cli(
            &["produce", "orders", "--acks", "all", "--key-separator", ":"],
            Some(&lines(from, to)),
        )
    };
    succeeded(&produce(1, 3000));

    // kill -9 the leader of partition 0: it is fenced, its partitions get new leaders
    // from their ISRs and show as under-replicated; producing and consuming carry on.
    let victim = TestCluster::partition(&c.describe("orders"), 0)["leader"]
        .as_u64()
        .unwrap();
    c.kill(victim);
    wait_for(30, "under-replicated partitions reported", || {
        c.status()["under_replicated_partitions"].as_u64() > Some(0)
    });
    let d = c.describe("orders");
    for p in d["partitions"].as_array().unwrap() {
        assert_ne!(p["leader"].as_u64(), Some(victim), "{p}");
    }
    succeeded(&produce(3001, 6000));
    let out = c.cli(
        &[
            "consume",
            "orders",
            "--from-beginning",
            "--max-messages",
            "6000",
            "--output",
            "json",
        ],
        None,
    );
    succeeded(&out);
    let mut values: Vec<u64> = json_lines(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .map(|r| r["value"].as_str().unwrap().parse().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (1..=6000).collect::<Vec<u64>>(),
        "every acknowledged record, once"
    );

    // `start` again brings just that broker back; it catches up and rejoins every ISR.
    let out = c.run(&["cluster", "start"]);
    succeeded(&out);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!("started broker {victim}")),
        "{printed}"
    );
    wait_for(60, "no under-replicated partitions", || {
        c.status()["under_replicated_partitions"] == 0
    });
    // Every replica holds the same log: equal log ends and high watermarks everywhere.
    wait_for(30, "identical replicas", || {
        let views: Vec<Value> = (1..=3).map(|id| c.describe_at(id, "orders")).collect();
        (0..8).all(|p| {
            let ends: Vec<(Value, Value)> = views
                .iter()
                .map(|v| {
                    let x = TestCluster::partition(v, p);
                    (x["log_end_offset"].clone(), x["high_watermark"].clone())
                })
                .collect();
            ends.iter().all(|e| *e == ends[0])
        })
    });

    // Preferred-leader election: each partition's first replica leads it again.
    wait_for(60, "leaderships back on the preferred replicas", || {
        c.describe("orders")["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["leader"] == p["replicas"][0])
    });

    succeeded(&c.run(&["cluster", "stop"]));
    let s = c.status();
    assert!(
        s["brokers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["alive"] == false),
        "{s}"
    );
    assert!(s["controller_leader"].is_null(), "{s}");
}

#[test]
fn min_insync_replicas_refuses_acks_all_writes_until_enough_replicas_return() {
    let c = TestCluster::start();
    succeeded(&c.cli(
        &[
            "topic",
            "create",
            "ledger",
            "--partitions",
            "1",
            "--replication-factor",
            "3",
            "--config",
            "min.insync.replicas=2",
        ],
        None,
    ));
    // More in-sync replicas than the topic has would hold every write: refused, unchanged.
    let out = c.cli(
        &[
            "topic",
            "alter",
            "ledger",
            "--config",
            "min.insync.replicas=4",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replication factor 3"), "{err}");
    assert_eq!(c.describe("ledger")["config"]["min.insync.replicas"], "2");
    // Removing an override goes through the controller too; put back for the rest.
    let alter = |args: &[&str]| {
        succeeded(&c.cli(
            &[["topic", "alter", "ledger"].as_slice(), args].concat(),
            None,
        ))
    };
    alter(&["--delete-config", "min.insync.replicas"]);
    assert_eq!(c.describe("ledger")["config"]["min.insync.replicas"], "1");
    alter(&["--config", "min.insync.replicas=2"]);
    let produce = |from, to| {
        c.cli(
            &[
                "produce",
                "ledger",
                "--acks",
                "all",
                "--key-separator",
                ":",
                "--delivery-timeout-ms",
                "4000",
            ],
            Some(&lines(from, to)),
        )
    };
    succeeded(&produce(1, 100));
    let leader = TestCluster::partition(&c.describe("ledger"), 0)["leader"]
        .as_u64()
        .unwrap();
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for f in &followers {
        unsafe_kill(c.pid(*f), "KILL");
    }
    // Two of three brokers gone: the controller has no quorum to record the smaller ISR,
    // but the leader stops counting followers that have not fetched for
    // replica.lag.max.ms, and refuses acks=all writes instead of leaving them waiting.
    wait_for(90, "acks=all refused with NotEnoughReplicas", || {
        let out = produce(101, 110);
        assert!(
            !out.status.success(),
            "acks=all must not succeed with one live replica"
        );
        String::from_utf8_lossy(&out.stderr).contains("NotEnoughReplicas")
    });
    // Consumers still read what was committed, and only that.
    let out = c.cli(
        &[
            "consume",
            "ledger",
            "--from-beginning",
            "--max-messages",
            "100",
            "--output",
            "json",
        ],
        None,
    );
    succeeded(&out);
    assert_eq!(json_lines(&String::from_utf8_lossy(&out.stdout)).len(), 100);
    let hw = TestCluster::partition(&c.describe("ledger"), 0)["high_watermark"].clone();
    assert_eq!(hw, 100, "nothing of the refused write was committed");

    // The replicas back: writes are acknowledged again.
    succeeded(&c.run(&["cluster", "start"]));
    wait_for(60, "a second in-sync replica", || {
        TestCluster::partition(&c.describe("ledger"), 0)["isr"]
            .as_array()
            .is_some_and(|isr| isr.len() >= 2)
    });
    wait_for(60, "acks=all accepted again", || {
        produce(101, 200).status.success()
    });
    // Refused attempts were never acknowledged; retries of the same records are not
    // doubled by the successful ones (each attempt is a new producer, so only the count
    // of committed records is checked here: 100 before, at least 100 after).
    let hw = TestCluster::partition(&c.describe("ledger"), 0)["high_watermark"]
        .as_i64()
        .unwrap();
    assert!(hw >= 200, "{hw}");
}

#[test]
fn a_cluster_file_with_a_duplicate_port_is_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "data_root = \"qc\"\n[[brokers]]\nid = 1\nlisten = \"127.0.0.1:7401\"\n[[brokers]]\nid = 2\nlisten = \"127.0.0.1:7401\"\n",
    )
    .unwrap();
    let out = quiver(&["cluster", "start", "--config", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:5") && err.contains("brokers[1].listen"),
        "{err}"
    );
}

#[test]
fn a_bootstrap_list_skips_brokers_that_do_not_answer() {
    let b = super::harness::TestBroker::start();
    let dead = format!("127.0.0.1:{}", free_udp_port());
    let list = format!("{dead},{}", b.addr());
    let out = cli_at(&list, &b.ca(), &["topic", "create", "listed"], None);
    succeeded(&out);
    let out = cli_at(
        &format!("{dead},127.0.0.1:{}", free_udp_port()),
        &b.ca(),
        &["topic", "list"],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no bootstrap broker answered"), "{err}");
}

#[test]
fn a_groups_committed_offsets_survive_losing_its_coordinators_broker() {
    let c = TestCluster::start();
    succeeded(&c.cli(
        &[
            "topic",
            "create",
            "events",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
        None,
    ));
    succeeded(&c.cli(
        &["produce", "events", "--acks", "all", "--key-separator", ":"],
        Some(&lines(1, 300)),
    ));
    // Reads to the end as group "readers", commits, leaves.
    let out = c.cli(
        &[
            "consume", "events", "--group", "readers", "--output", "json",
        ],
        None,
    );
    succeeded(&out);
    assert_eq!(json_lines(&String::from_utf8_lossy(&out.stdout)).len(), 300);

    // The coordinator is the leader of the group's partition of __consumer_offsets.
    let offsets = c.describe("__consumer_offsets");
    let n = offsets["partitions"].as_array().unwrap().len() as u32;
    assert!(n > 1, "the offsets topic is partitioned: {offsets}");
    let p = quiver_protocol::requests::coordinator_partition("readers", n);
    let coordinator = TestCluster::partition(&offsets, u64::from(p))["leader"]
        .as_u64()
        .unwrap();
    unsafe_kill(c.pid(coordinator), "KILL");

    // A new coordinator (another replica of that partition) has the committed offsets.
    let committed = |d: &Value| -> i64 {
        d["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["committed"].as_i64().unwrap_or(0))
            .sum()
    };
    wait_for(60, "the group's offsets from a new coordinator", || {
        let out = c.cli(&["group", "describe", "readers", "--output", "json"], None);
        out.status.success() && committed(&serde_json::from_slice(&out.stdout).unwrap()) == 300
    });
    // New records: the group resumes exactly after what it committed.
    succeeded(&c.cli(
        &["produce", "events", "--acks", "all", "--key-separator", ":"],
        Some(&lines(301, 330)),
    ));
    let out = c.cli(
        &[
            "consume", "events", "--group", "readers", "--output", "json",
        ],
        None,
    );
    succeeded(&out);
    let mut values: Vec<u64> = json_lines(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .map(|r| r["value"].as_str().unwrap().parse().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(values, (301..=330).collect::<Vec<u64>>());
}

#[test]
fn reassign_moves_a_partition_to_other_brokers_after_they_caught_up() {
    let c = TestCluster::start();
    succeeded(&c.cli(
        &[
            "topic",
            "create",
            "moving",
            "--partitions",
            "1",
            "--replication-factor",
            "2",
        ],
        None,
    ));
    let before = TestCluster::partition(&c.describe("moving"), 0).clone();
    let old: Vec<u64> = before["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_u64().unwrap())
        .collect();
    let newcomer = (1..=3).find(|id| !old.contains(id)).unwrap();
    succeeded(&c.cli(
        &["produce", "moving", "--acks", "all", "--key-separator", ":"],
        Some(&lines(1, 500)),
    ));
    // Move off the current leader onto the broker that had no copy.
    let leader = before["leader"].as_u64().unwrap();
    let kept = old.iter().copied().find(|r| *r != leader).unwrap();
    let out = c.reassign("moving", 0, &format!("{newcomer},{kept}"));
    succeeded(&out);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("moved moving/0"), "{printed}");
    let p = TestCluster::partition(&c.describe("moving"), 0).clone();
    let mut replicas: Vec<u64> = p["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_u64().unwrap())
        .collect();
    replicas.sort_unstable();
    let mut expected = vec![newcomer, kept];
    expected.sort_unstable();
    assert_eq!(replicas, expected, "{p}");
    assert_ne!(
        p["leader"].as_u64(),
        Some(leader),
        "the old leader handed over: {p}"
    );
    // The newcomer holds the whole log, and nothing was lost.
    wait_for(30, "the new replica's copy", || {
        TestCluster::partition(&c.describe_at(newcomer, "moving"), 0)["log_end_offset"] == 500
    });
    let out = c.cli(
        &[
            "consume",
            "moving",
            "--from-beginning",
            "--max-messages",
            "500",
            "--output",
            "json",
        ],
        None,
    );
    succeeded(&out);
    assert_eq!(
        json_lines(&String::from_utf8_lossy(&out.stdout)).len(),
        500,
        "consume printed on stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The broker it moved off keeps no copy.
    wait_for(30, "the old replica's copy dropped", || {
        TestCluster::partition(&c.describe_at(leader, "moving"), 0)["log_end_offset"] == 0
    });
    // Moved back, that broker copies the whole log again like a new replica.
    succeeded(&c.reassign("moving", 0, &format!("{leader},{kept}")));
    wait_for(30, "the returning replica's copy", || {
        TestCluster::partition(&c.describe_at(leader, "moving"), 0)["log_end_offset"] == 500
    });
    // A broker that does not exist, or a move while one runs, is refused.
    let out = c.reassign("moving", 0, "7");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broker 7"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Fewer replicas than min.insync.replicas: its high watermark could never move again.
    succeeded(&c.cli(
        &[
            "topic",
            "alter",
            "moving",
            "--config",
            "min.insync.replicas=2",
        ],
        None,
    ));
    let out = c.reassign("moving", 0, &kept.to_string());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min.insync.replicas = 2"), "{err}");
    assert_eq!(
        TestCluster::partition(&c.describe("moving"), 0)["replicas"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}

#[test]
fn a_plugin_deployed_through_one_broker_runs_on_every_broker() {
    let c = TestCluster::start();
    let at = |id: usize, args: &[&str]| {
        cli_at(
            &format!("127.0.0.1:{}", c.ports[id - 1]),
            &c.ca(),
            args,
            None,
        )
    };
    let listed_on = |id: usize| -> Vec<String> {
        let out = at(id, &["plugin", "list", "--output", "json"]);
        succeeded(&out);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{}@{}",
                    p["name"].as_str().unwrap(),
                    p["version"].as_str().unwrap()
                )
            })
            .collect()
    };
    let bundle = super::harness::example("noop-filter");
    succeeded(&at(1, &["plugin", "deploy", &bundle]));
    for id in 1..=3 {
        wait_for(30, "the plugin on every broker", || {
            listed_on(id) == ["noop-filter@1.0.0"]
        });
    }
    // Removed through another broker: gone everywhere.
    succeeded(&at(3, &["plugin", "remove", "noop-filter@1.0.0"]));
    for id in 1..=3 {
        wait_for(30, "the plugin gone from every broker", || {
            listed_on(id).is_empty()
        });
    }
    // Deployed again, it runs at whichever broker leads a partition: three partitions with
    // one replica each have three different leaders.
    let out = at(2, &["plugin", "deploy", &bundle]);
    succeeded(&out);
    for id in 1..=3 {
        wait_for(30, "the plugin on every broker", || {
            listed_on(id) == ["noop-filter@1.0.0"]
        });
    }
    succeeded(&c.cli(&["topic", "create", "spread", "--partitions", "3"], None));
    let leaders: std::collections::BTreeSet<u64> = c.describe("spread")["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["leader"].as_u64().unwrap())
        .collect();
    assert_eq!(leaders.len(), 3, "one leader per broker");
    succeeded(&c.cli(
        &["produce", "spread", "--key-separator", ":"],
        Some(&lines(1, 30)),
    ));
    let out = c.cli(
        &[
            "consume",
            "spread",
            "--from-beginning",
            "--processor",
            "noop-filter",
            "--output",
            "json",
        ],
        None,
    );
    succeeded(&out);
    assert_eq!(json_lines(&String::from_utf8_lossy(&out.stdout)).len(), 30);
}

/// A broker whose records of a topic and a plugin were damaged while it was down (disk
/// damage), and which the cluster deleted meanwhile, drops those records when it comes
/// back, so that topic can be created again with a replica there.
#[test]
fn a_returning_broker_drops_damaged_records_of_what_the_cluster_deleted() {
    let c = TestCluster::start_with("delete_topic_enable = true\n");
    let bundle = super::harness::example("noop-filter");
    succeeded(&c.cli(&["plugin", "deploy", &bundle], None));
    let create = |name: &str| {
        c.cli(
            &[
                "topic",
                "create",
                name,
                "--partitions",
                "1",
                "--replication-factor",
                "3",
            ],
            None,
        )
    };
    succeeded(&create("gone"));
    // Broker 2's own view of a topic: its local log end, or the error it answers.
    let local_end = |name: &str| -> Result<Value, String> {
        let out = cli_at(
            &format!("127.0.0.1:{}", c.ports[1]),
            &c.ca(),
            &["topic", "describe", name, "--output", "json", "--local"],
            None,
        );
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let d: Value = serde_json::from_slice(&out.stdout).unwrap();
        Ok(TestCluster::partition(&d, 0)["log_end_offset"].clone())
    };
    wait_for(60, "broker 2's copy of gone", || {
        local_end("gone") == Ok(Value::from(0))
    });
    wait_for(30, "the plugin on broker 2", || {
        let out = cli_at(
            &format!("127.0.0.1:{}", c.ports[1]),
            &c.ca(),
            &["plugin", "list", "--output", "json"],
            None,
        );
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("noop-filter")
    });
    c.kill(2);
    let plugin_id = "noop-filter@1.0.0";
    {
        let db = quiver_core::log::store::open(&c.data_dir(2).join("log"))
            .expect("open broker 2's sled database");
        for (tree, key) in [
            (quiver_core::topic::TOPICS_TREE, "gone"),
            ("__plugins", plugin_id),
        ] {
            let t = db.open_tree(tree).unwrap();
            let old = t.insert(key, &b"\xffnot json"[..]).unwrap();
            assert!(old.is_some(), "broker 2 had a record of {key}");
        }
        db.flush().unwrap();
    }
    succeeded(&c.cli(&["topic", "delete", "gone"], None));
    succeeded(&c.cli(&["plugin", "remove", plugin_id], None));
    succeeded(&c.run(&["cluster", "start"]));
    // The deleted one: its damaged record dropped (no longer "offline": unknown, as a
    // broker answers for a name it has no record of), so the name is created again with a
    // replica on broker 2.
    wait_for(
        60,
        "broker 2 dropping its record of gone",
        || matches!(local_end("gone"), Err(e) if e.contains("\"gone\" does not exist")),
    );
    succeeded(&create("gone"));
    succeeded(&c.cli(&["produce", "gone"], Some(b"new\n")));
    wait_for(60, "broker 2's copy of the new gone", || {
        local_end("gone") == Ok(Value::from(1))
    });
    // The damaged plugin record is gone too (looked at with the broker stopped, once its
    // log says so).
    wait_for(30, "broker 2 dropping the damaged plugin record", || {
        std::fs::read_to_string(c.data_dir(2).join("broker.log"))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.contains("removed a plugin the cluster no longer holds") && l.contains(plugin_id)
            })
    });
    c.kill(2);
    let db = quiver_core::log::store::open(&c.data_dir(2).join("log")).unwrap();
    let plugins = db.open_tree("__plugins").unwrap();
    assert!(
        plugins.get(plugin_id).unwrap().is_none(),
        "the damaged plugin record is gone"
    );
}

/// Sums a JSON array's field over its elements.
fn sum_of(items: &Value, field: &str) -> i64 {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_i64().unwrap())
        .sum()
}

#[test]
fn offsets_lag_and_resets_come_from_each_partitions_leader_whatever_broker_answers() {
    let c = TestCluster::start();
    // One copy per partition: every broker lacks some partitions, so a broker (or group
    // coordinator) answering from its own copies would see them empty.
    succeeded(&c.cli(
        &[
            "topic",
            "create",
            "single",
            "--partitions",
            "3",
            "--replication-factor",
            "1",
        ],
        None,
    ));
    succeeded(&c.cli(
        &["produce", "single", "--acks", "all", "--key-separator", ":"],
        Some(&lines(1, 60)),
    ));
    let placed = c.describe("single");
    let leaders: Vec<u64> = placed["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["leader"].as_u64().unwrap())
        .collect();
    let mut local_total = 0;
    for id in 1..=3u64 {
        let addr = format!("127.0.0.1:{}", c.ports[id as usize - 1]);
        // Through any one broker: each partition's offsets as its leader has them.
        let out = cli_at(
            &addr,
            &c.ca(),
            &["topic", "describe", "single", "--output", "json"],
            None,
        );
        succeeded(&out);
        let d: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(sum_of(&d["partitions"], "high_watermark"), 60, "{d}");
        assert_eq!(sum_of(&d["partitions"], "log_end_offset"), 60, "{d}");
        // --local: that broker's own copies, nothing where it holds no replica.
        let mine = c.describe_at(id, "single");
        for (p, leader) in mine["partitions"].as_array().unwrap().iter().zip(&leaders) {
            if *leader != id {
                assert_eq!(p["log_end_offset"], 0, "{mine}");
            }
        }
        local_total += sum_of(&mine["partitions"], "log_end_offset");

        // A broker that does not lead a partition does not answer offsets for it.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let config = quiver_client::ClientConfig {
            ca_file: Some(c.ca()),
            ..quiver_client::ClientConfig::new(&addr)
        };
        rt.block_on(async {
            let client = quiver_client::Client::connect(config)
                .await
                .expect("connect");
            for (p, leader) in leaders.iter().enumerate() {
                let req = quiver_protocol::requests::ListOffsetsRequest {
                    topic: "single".into(),
                    partition: p as u32,
                    spec: quiver_protocol::requests::OffsetSpec::Latest,
                };
                let r = client.request(&req, bytes::Bytes::new()).await;
                if *leader == id {
                    assert!(r.is_ok(), "the leader answers: {r:?}");
                } else {
                    let e = r.expect_err("a broker without the lead refuses");
                    assert!(
                        e.to_string().contains("not the leader"),
                        "{e} (broker {id}, partition {p})"
                    );
                }
            }
        });
    }
    assert_eq!(
        local_total, 60,
        "the three brokers' copies hold every record once"
    );

    // Group offsets: reset and lag are the leaders' whichever broker coordinates.
    let reset = |to: &str| {
        let out = c.cli(
            &["group", "reset", "auditors", "--topic", "single", to],
            None,
        );
        succeeded(&out);
    };
    let describe_group = || -> Value {
        let out = c.cli(&["group", "describe", "auditors", "--output", "json"], None);
        succeeded(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    reset("--to-latest");
    let g = describe_group();
    assert_eq!(sum_of(&g["partitions"], "committed"), 60, "{g}");
    assert_eq!(sum_of(&g["partitions"], "lag"), 0, "{g}");
    reset("--to-earliest");
    let g = describe_group();
    assert_eq!(sum_of(&g["partitions"], "committed"), 0, "{g}");
    assert_eq!(sum_of(&g["partitions"], "lag"), 60, "{g}");
    assert_eq!(sum_of(&g["partitions"], "high_watermark"), 60, "{g}");
    // --to-offset is clamped to each partition's range on its leader.
    let out = c.cli(
        &[
            "group",
            "reset",
            "auditors",
            "--topic",
            "single",
            "--to-offset",
            "1000000",
        ],
        None,
    );
    succeeded(&out);
    assert_eq!(sum_of(&describe_group()["partitions"], "lag"), 0);
}
