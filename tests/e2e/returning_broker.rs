//! A broker that comes back without its log (a replaced disk, or a data directory restored
//! from an older backup) is a new incarnation of that broker: the partition leader must not
//! take it back into the ISR on the position its earlier incarnation reported (Kafka's
//! KIP-903), only once the new incarnation's own fetches show that it holds every committed
//! record; and where it was the last in-sync replica, it must not lead (the others would
//! truncate to its empty log): the partition stays offline until the operator allows an
//! unclean election. A broker whose record of one topic is damaged gets its copy of that
//! topic back from the leaders the same way. Three brokers from `quiver cluster start`,
//! each behind a UDP proxy so that the returning broker can be cut off from one peer alone.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster_faults::FaultCluster;
use super::harness::{cli_at, unsafe_kill, wait_for};
use super::netproxy::LinkFault;

const TOPIC: &str = "kept";
const RECORDS: usize = 3000;

fn partition(d: &Value, p: u64) -> &Value {
    d["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|x| x["partition"] == p)
        .expect("partition in describe")
}

fn blackhole() -> LinkFault {
    LinkFault {
        blackhole: true,
        ..LinkFault::default()
    }
}

/// Broker `id`'s registration as the controller has it: (epoch, fenced).
fn registration(c: &FaultCluster, id: u64) -> Option<(u64, bool)> {
    let out = cli_at(
        &c.bootstrap(),
        &c.ca(),
        &["cluster", "describe", "--output", "json"],
        None,
    );
    if !out.status.success() {
        return None;
    }
    let d: Value = serde_json::from_slice(&out.stdout).ok()?;
    let b = d["brokers"].as_array()?.iter().find(|b| b["id"] == id)?;
    Some((b["epoch"].as_u64()?, b["fenced"].as_bool()?))
}

/// Kills broker `id`, removes its log store, starts it again, and waits until the
/// controller has its new incarnation registered and unfenced.
fn restart_without_log(c: &FaultCluster, id: u64) {
    restart_after(c, id, |log| {
        std::fs::remove_dir_all(log).expect("remove its log");
    });
}

/// Kills broker `id`, runs `harm` on its log store's directory, starts it again, and waits
/// until the controller has its new incarnation registered and unfenced.
fn restart_after(c: &FaultCluster, id: u64, harm: impl FnOnce(&std::path::Path)) {
    let (old_epoch, _) = registration(c, id).expect("broker registered");
    let pid = c.pid(id).expect("broker running");
    unsafe_kill(pid, "KILL");
    wait_for(30, "the killed broker to exit", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    harm(&c.data_dir(id as usize).join("log"));
    c.restart_stopped();
    wait_for(
        60,
        "the returning broker registered again and unfenced",
        || registration(c, id).is_some_and(|(epoch, fenced)| epoch != old_epoch && !fenced),
    );
}

/// The CLI through the cluster (the bootstrap list); fails the test, with its stderr,
/// unless it succeeds.
fn cli_ok(c: &FaultCluster, args: &[&str], stdin: Option<&[u8]>) {
    let out = cli_at(&c.bootstrap(), &c.ca(), args, stdin);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `topic describe TOPIC --local` as broker `id` answers it (its own replica), or the
/// error it gives.
fn local_describe(c: &FaultCluster, id: u64, topic: &str) -> Result<Value, String> {
    let out = cli_at(
        &c.addr_of(id as usize),
        &c.ca(),
        &["topic", "describe", topic, "--output", "json", "--local"],
        None,
    );
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Broker `id`'s own log end of `topic`'s partition `p`.
fn local_end(c: &FaultCluster, id: u64, topic: &str, p: u64) -> i64 {
    let local = local_describe(c, id, topic).unwrap_or_else(|e| panic!("{e}"));
    partition(&local, p)["log_end_offset"].as_i64().unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

#[test]
fn a_broker_back_without_its_log_rejoins_the_isr_only_after_copying_it_again() {
    // A lag limit far longer than the restart takes: the earlier incarnation's last fetch
    // still looks recent when the broker returns.
    let c = FaultCluster::start_with("cluster = { replica_lag_max_ms = 120000 }\n");
    c.create_topic(TOPIC, 3);
    // Keyed, so every partition gets records.
    let lines: String = (1..=RECORDS)
        .map(|i| format!("k{i}:record {i}\n"))
        .collect();
    cli_ok(
        &c,
        &["produce", TOPIC, "--acks", "all", "--key-separator", ":"],
        Some(lines.as_bytes()),
    );
    wait_for(60, "every partition's ISR to be full", || {
        c.describe_topic(TOPIC)["partitions"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| ids(&p["isr"]).len() == 3))
    });
    // A partition whose leader is not the controller's leader, and the third broker, which
    // returns without its log: cut off from the partition's leader, it can still register
    // with the controller (and be unfenced), but it cannot copy the partition.
    let controller = c.cluster(&["status"])["controller_leader"]
        .as_u64()
        .expect("a controller leader");
    let d = c.describe_topic(TOPIC);
    let (p, leader) = d["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| Some((x["partition"].as_u64()?, x["leader"].as_u64()?)))
        .find(|(_, l)| *l != controller)
        .expect("partitions led by other brokers than the controller's leader");
    let x = (1..=3u64)
        .find(|b| *b != leader && *b != controller)
        .unwrap();
    let committed = partition(&d, p)["high_watermark"].as_i64().unwrap();
    assert!(committed > 0, "partition {p} holds records: {d}");
    c.link(x as usize, leader as usize, blackhole());
    restart_without_log(&c, x);
    wait_for(60, "the returning broker out of the ISR", || {
        !ids(&partition(&c.describe_topic(TOPIC), p)["isr"]).contains(&x)
    });
    // It holds nothing of the partition and cannot fetch it: it stays out of the ISR.
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        let isr = ids(&partition(&c.describe_topic(TOPIC), p)["isr"]);
        assert!(
            !isr.contains(&x),
            "broker {x} is back in partition {p}'s ISR {isr:?} without a copy of its log"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.link(x as usize, leader as usize, LinkFault::default());
    wait_for(90, "the returning broker back in the ISR", || {
        ids(&partition(&c.describe_topic(TOPIC), p)["isr"]).contains(&x)
    });
    let end = local_end(&c, x, TOPIC, p);
    assert!(
        end >= committed,
        "broker {x} rejoined the ISR with {end} of partition {p}'s {committed} committed records"
    );
}

#[test]
fn the_last_in_sync_replica_back_without_its_log_does_not_lead() {
    last_in_sync_replica_back_without_its_copy(|log| {
        std::fs::remove_dir_all(log).expect("remove its log");
    });
}

/// As above, with only the topic's record damaged: the broker tells the controller its
/// copy is lost.
#[test]
fn the_last_in_sync_replica_with_a_damaged_topic_record_does_not_lead() {
    last_in_sync_replica_back_without_its_copy(|log| damage_topic_record(log, "solo"));
}

/// Overwrites `topic`'s record in the (stopped) broker's store with garbage.
fn damage_topic_record(log: &std::path::Path, topic: &str) {
    let db = quiver_core::log::store::open(log).expect("open the broker's store");
    let topics = db.open_tree(quiver_core::topic::TOPICS_TREE).unwrap();
    let old = topics.insert(topic, &b"\xffnot json"[..]).unwrap();
    assert!(old.is_some(), "the broker had a record of {topic}");
    db.flush().unwrap();
}

/// The last in-sync replica of a partition comes back without its copy (`harm` done to its
/// stopped store): it must not lead, and the partition stays offline until the operator
/// allows an unclean election.
fn last_in_sync_replica_back_without_its_copy(harm: impl FnOnce(&std::path::Path)) {
    // Followers that cannot fetch leave the ISR after 2 s.
    let c = FaultCluster::start_with("cluster = { replica_lag_max_ms = 2000 }\n");
    let cli = |args: &[&str], stdin: Option<&[u8]>| cli_ok(&c, args, stdin);
    cli(
        &[
            "topic",
            "create",
            "solo",
            "--partitions",
            "3",
            "--replication-factor",
            "2",
            "--config",
            "min.insync.replicas=1",
        ],
        None,
    );
    let keyed = |from: usize, to: usize| -> Vec<u8> {
        (from..=to)
            .map(|i| format!("k{i}:record {i}\n"))
            .collect::<String>()
            .into_bytes()
    };
    let produce = |from, to| {
        cli(
            &["produce", "solo", "--acks", "all", "--key-separator", ":"],
            Some(&keyed(from, to)),
        )
    };
    produce(1, 600);
    // A partition on two brokers that both are not the controller's leader: x leads it,
    // y follows. Cut between them, y leaves the ISR and x is its last member.
    let controller = c.cluster(&["status"])["controller_leader"]
        .as_u64()
        .expect("a controller leader");
    wait_for(60, "full ISRs", || {
        c.describe_topic("solo")["partitions"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| ids(&p["isr"]).len() == 2))
    });
    let d = c.describe_topic("solo");
    let (p, x, y) = d["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| !ids(&q["replicas"]).contains(&controller))
        .map(|q| {
            let leader = q["leader"].as_u64().unwrap();
            let other = *ids(&q["replicas"]).iter().find(|r| **r != leader).unwrap();
            (q["partition"].as_u64().unwrap(), leader, other)
        })
        .next()
        .expect("a partition without a replica on the controller's leader");
    let y_end = partition(&d, p)["high_watermark"].as_i64().unwrap();
    c.link(x as usize, y as usize, blackhole());
    wait_for(60, "the follower out of the ISR", || {
        ids(&partition(&c.describe_topic("solo"), p)["isr"]) == vec![x]
    });
    // Records only x holds.
    produce(601, 1200);
    restart_after(&c, x, harm);
    // x holds nothing now: it is no longer in sync (once the answering broker's view has
    // its registration), it must not lead, and the partition is offline, saying why.
    wait_for(60, "no in-sync replica left", || {
        ids(&partition(&c.describe_topic("solo"), p)["isr"]).is_empty()
    });
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        let d = c.describe_topic("solo");
        let q = partition(&d, p);
        assert_ne!(
            q["leader"].as_u64(),
            Some(x),
            "broker {x} leads partition {p} on an empty log: {q}"
        );
        assert_eq!(q["status"], "offline", "{q}");
        let reason = q["offline_reason"].as_str().unwrap_or_default();
        assert!(reason.contains("unclean.leader.election.enable"), "{q}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Healed, y keeps what it had: nothing made it copy an empty log.
    c.link(x as usize, y as usize, LinkFault::default());
    std::thread::sleep(Duration::from_secs(2));
    let now = local_end(&c, y, "solo", p);
    assert!(
        now >= y_end,
        "broker {y} went from {y_end} to {now} records"
    );
    // The operator accepts losing what only the lost copy held: a leader again.
    cli(
        &[
            "topic",
            "alter",
            "solo",
            "--config",
            "unclean.leader.election.enable=true",
        ],
        None,
    );
    // The replica that kept its copy is elected, not the one that lost it (first in the
    // list; it may take the leadership back later, once caught up from y).
    let mut elected = None;
    wait_for(60, "a leader elected", || {
        let q = partition(&c.describe_topic("solo"), p).clone();
        elected = q["leader"].as_u64().filter(|_| q["status"] == "online");
        elected.is_some()
    });
    assert_eq!(elected, Some(y));
    produce(1201, 1300);
    let now = local_end(&c, y, "solo", p);
    assert!(
        now >= y_end,
        "broker {y} went from {y_end} to {now} records"
    );
}

#[test]
fn a_broker_with_a_damaged_topic_record_copies_the_topic_again() {
    let c = FaultCluster::start();
    c.create_topic("healed", 1);
    let lines: String = (1..=500).map(|i| format!("record {i}\n")).collect();
    cli_ok(
        &c,
        &["produce", "healed", "--acks", "all"],
        Some(lines.as_bytes()),
    );
    wait_for(60, "a full ISR", || {
        ids(&partition(&c.describe_topic("healed"), 0)["isr"]).len() == 3
    });
    let d = c.describe_topic("healed");
    let leader = partition(&d, 0)["leader"].as_u64().unwrap();
    let committed = partition(&d, 0)["high_watermark"].as_i64().unwrap();
    let x = (1..=3u64).find(|b| *b != leader).unwrap();
    restart_after(&c, x, |log| damage_topic_record(log, "healed"));
    // Its copy comes back from the leader, and it is in sync again.
    wait_for(
        60,
        "the broker's copy of the topic back and in sync",
        || {
            local_describe(&c, x, "healed").is_ok_and(|local| {
                partition(&local, 0)["log_end_offset"].as_i64() >= Some(committed)
            }) && ids(&partition(&c.describe_topic("healed"), 0)["isr"]).contains(&x)
        },
    );
    let log = std::fs::read_to_string(c.data_dir(x as usize).join("broker.log")).unwrap();
    assert!(
        log.contains("replacing the damaged local record of a topic with an empty replica"),
        "the broker's log says what it did"
    );
}
