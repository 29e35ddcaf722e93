//! A broker that comes back without its log (a replaced disk, or a data directory restored
//! from an older backup) is a new incarnation of that broker: the partition leader must not
//! take it back into the ISR on the position its earlier incarnation reported (Kafka's
//! KIP-903), only once the new incarnation's own fetches show that it holds every committed
//! record. Three brokers from `quiver cluster start`, each behind a UDP proxy so that the
//! returning broker can be cut off from the partition's leader alone.

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
    let out = cli_at(
        &c.bootstrap(),
        &c.ca(),
        &["produce", TOPIC, "--acks", "all", "--key-separator", ":"],
        Some(lines.as_bytes()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
    let cut = LinkFault {
        blackhole: true,
        ..LinkFault::default()
    };
    c.link(x as usize, leader as usize, cut);
    let old_pid = c.pid(x).expect("broker running");
    unsafe_kill(old_pid, "KILL");
    wait_for(30, "the killed broker to exit", || {
        !std::path::Path::new(&format!("/proc/{old_pid}")).exists()
    });
    std::fs::remove_dir_all(c.data_dir(x as usize).join("log")).expect("remove its log");
    c.restart_stopped();
    wait_for(60, "the returning broker registered and unfenced", || {
        let b = &c.cluster(&["status"])["brokers"][x as usize - 1];
        b["pid"]
            .as_u64()
            .is_some_and(|pid| pid != u64::from(old_pid))
            && b["fenced"] == false
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
    let out = cli_at(
        &c.addr_of(x as usize),
        &c.ca(),
        &["topic", "describe", TOPIC, "--output", "json", "--local"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local: Value = serde_json::from_slice(&out.stdout).unwrap();
    let end = partition(&local, p)["log_end_offset"].as_i64().unwrap();
    assert!(
        end >= committed,
        "broker {x} rejoined the ISR with {end} of partition {p}'s {committed} committed records"
    );
}
