//! A stored batch damaged in the middle of a partition (bytes overwritten through sled
//! directly, as a failing disk would): the broker still starts, reports that partition
//! offline and serves every other one; `quiver broker repair` drops the damaged suffix,
//! says what it dropped, and the partition serves again. The same for a large batch
//! (stored in slots) that lost a slot, and for a partition's metadata record that no longer
//! decodes (the repair removes it; the broker rebuilds it from the batches).

use quiver_core::log::keyspace::{partition_prefix, BATCHES_TREE};
use quiver_core::topic::{TopicMeta, PARTITION_META_TREE, TOPICS_TREE};

use super::harness::{cli_at, TestBroker};

/// The stopped broker's database, its batches tree, and the id of `topic`.
fn batches_of(b: &TestBroker, topic: &str) -> (quiver_core::log::Database, sled::Tree, u64) {
    let db = quiver_core::log::store::open(&b.data_dir().join("log"))
        .expect("open the broker's sled database");
    let meta: TopicMeta = serde_json::from_slice(
        &db.open_tree(TOPICS_TREE)
            .unwrap()
            .get(topic.as_bytes())
            .unwrap()
            .expect("topic record"),
    )
    .unwrap();
    let tree = db.open_tree(BATCHES_TREE).unwrap();
    (db, tree, meta.id)
}

/// Overwrites bytes inside the `nth` stored batch of `topic`/`partition`; returns its
/// base offset. The broker must be stopped. Only batches stored whole (under 4 KiB) count.
fn damage_batch(b: &TestBroker, topic: &str, partition: u32, nth: usize) -> i64 {
    let (db, tree, topic_id) = batches_of(b, topic);
    let prefix = partition_prefix(topic_id, partition);
    let (k, v) = tree
        .scan_prefix(prefix)
        .map(Result::unwrap)
        .filter(|(k, _)| k.len() == prefix.len() + 8)
        .nth(nth)
        .expect("enough batches stored whole");
    let mut bad = v.to_vec();
    let at = bad.len() - 3;
    bad[at] ^= 0x5a;
    tree.insert(&k, bad).unwrap();
    db.flush().unwrap();
    i64::from_be_bytes(k[prefix.len()..].try_into().unwrap())
}

/// Deletes the first slot of the `nth` slotted batch (4 KiB or more) of `topic`/`partition`
/// (as a lost write would); returns its base offset. The broker must be stopped.
fn drop_a_slot(b: &TestBroker, topic: &str, partition: u32, nth: usize) -> i64 {
    let (db, tree, topic_id) = batches_of(b, topic);
    let prefix = partition_prefix(topic_id, partition);
    let (head_key, head) = tree
        .scan_prefix(prefix)
        .map(Result::unwrap)
        .filter(|(k, _)| k.len() == prefix.len() + 9)
        .nth(nth)
        .expect("enough slotted batches");
    let first_slot = u64::from_be_bytes(head[1..9].try_into().unwrap());
    let mut slot = partition_prefix(topic_id | 1 << 63, partition).to_vec();
    slot.extend_from_slice(&first_slot.to_be_bytes());
    assert!(tree.remove(slot).unwrap().is_some(), "the slot was there");
    db.flush().unwrap();
    i64::from_be_bytes(head_key[prefix.len()..prefix.len() + 8].try_into().unwrap())
}

/// `quiver broker repair --output json` on `topic`/`partition` of the broker's data dir.
fn repair(b: &TestBroker, topic: &str, partition: u32) -> std::process::Output {
    let data_dir = b.data_dir();
    let partition = partition.to_string();
    cli_at(
        &b.addr(),
        &b.ca(),
        &[
            "broker",
            "repair",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--topic",
            topic,
            "--partition",
            &partition,
            "--output",
            "json",
        ],
        None,
    )
}

#[test]
fn a_damaged_middle_batch_takes_only_its_partition_offline_until_repaired() {
    let mut b = TestBroker::start();
    b.cli_ok(&["topic", "create", "disk", "--partitions", "2"]);
    b.cli_ok(&["topic", "create", "other"]);
    // Five separate produces: five stored batches of 10 records in partition 0.
    for i in 0..5 {
        let lines: String = (0..10).map(|j| format!("p0-{i}-{j}\n")).collect();
        b.cli_stdin_ok(&["produce", "disk", "--partition", "0"], lines.as_bytes());
    }
    b.cli_stdin_ok(&["produce", "disk", "--partition", "1"], b"p1-a\np1-b\n");
    b.cli_stdin_ok(&["produce", "other"], b"fine\n");
    b.terminate();
    let damaged_at = damage_batch(&b, "disk", 0, 2);
    assert_eq!(damaged_at, 20);
    b.spawn();
    b.wait_ready();
    let d = b.describe("disk");
    assert_eq!(d["partitions"][0]["status"], "offline", "{d}");
    assert!(
        d["partitions"][0]["offline_reason"]
            .as_str()
            .is_some_and(|r| r.contains("offset 20") && r.contains("quiver broker repair")),
        "{d}"
    );
    assert_eq!(d["partitions"][1]["status"], "online", "{d}");
    assert!(b.log().contains("partition offline"), "{}", b.log());
    let e = b.cli_err(
        &[
            "consume",
            "disk",
            "--partition",
            "0",
            "--from-beginning",
            "--max-messages",
            "1",
        ],
        None,
    );
    assert!(e.contains("offline") && e.contains("repair"), "{e}");
    // Everything else serves.
    assert_eq!(
        b.cli_ok(&["consume", "disk", "--partition", "1", "--from-beginning"]),
        "p1-a\np1-b\n"
    );
    assert_eq!(
        b.cli_ok(&["consume", "other", "--from-beginning"]),
        "fine\n"
    );
    b.cli_stdin_ok(&["produce", "other"], b"still\n");
    // Repair needs the broker stopped, and says what it dropped.
    let running = repair(&b, "disk", 0);
    assert!(
        !running.status.success(),
        "repair must refuse while the broker runs"
    );
    let why = String::from_utf8_lossy(&running.stderr);
    assert!(why.contains("is running"), "{why}");
    b.terminate();
    let out = repair(&b, "disk", 0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["first_damaged_offset"], 20, "{report}");
    assert_eq!(report["dropped_batches"], 3, "{report}");
    assert_eq!(report["dropped_records"], 30, "{report}");
    assert_eq!(report["log_end_after"], 20, "{report}");
    b.spawn();
    b.wait_ready();
    let d = b.describe("disk");
    assert_eq!(d["partitions"][0]["status"], "online", "{d}");
    assert_eq!(d["partitions"][0]["log_end_offset"], 20, "{d}");
    let kept = b.cli_ok(&["consume", "disk", "--partition", "0", "--from-beginning"]);
    let expect: String = (0..2)
        .flat_map(|i| (0..10).map(move |j| format!("p0-{i}-{j}\n")))
        .collect();
    assert_eq!(kept, expect);
    b.cli_stdin_ok(&["produce", "disk", "--partition", "0"], b"after repair\n");
    let all = b.cli_ok(&["consume", "disk", "--partition", "0", "--from-beginning"]);
    assert!(all.ends_with("after repair\n"), "{all}");
}

/// A large batch (stored in slots) that lost a slot: the broker still starts, with only that
/// partition offline, and repair drops the damaged suffix.
#[test]
fn a_slotted_batch_missing_a_slot_takes_only_its_partition_offline_until_repaired() {
    let mut b = TestBroker::start();
    b.cli_ok(&["topic", "create", "big", "--partitions", "2"]);
    let line = |i: usize, j: usize| format!("{i}-{j}-{}\n", "x".repeat(700));
    for i in 0..5 {
        let lines: String = (0..10).map(|j| line(i, j)).collect();
        b.cli_stdin_ok(&["produce", "big", "--partition", "0"], lines.as_bytes());
    }
    b.cli_stdin_ok(&["produce", "big", "--partition", "1"], b"small\n");
    b.terminate();
    assert_eq!(drop_a_slot(&b, "big", 0, 2), 20);
    b.spawn();
    b.wait_ready();
    let d = b.describe("big");
    assert_eq!(d["partitions"][0]["status"], "offline", "{d}");
    assert!(
        d["partitions"][0]["offline_reason"]
            .as_str()
            .is_some_and(|r| r.contains("offset 20")),
        "{d}"
    );
    assert_eq!(d["partitions"][1]["status"], "online", "{d}");
    assert_eq!(
        b.cli_ok(&["consume", "big", "--partition", "1", "--from-beginning"]),
        "small\n"
    );
    b.terminate();
    let out = repair(&b, "big", 0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["first_damaged_offset"], 20, "{report}");
    assert_eq!(report["dropped_batches"], 3, "{report}");
    assert_eq!(report["log_end_after"], 20, "{report}");
    b.spawn();
    b.wait_ready();
    let d = b.describe("big");
    assert_eq!(d["partitions"][0]["status"], "online", "{d}");
    let kept = b.cli_ok(&["consume", "big", "--partition", "0", "--from-beginning"]);
    let expect: String = (0..2)
        .flat_map(|i| (0..10).map(move |j| line(i, j)))
        .collect();
    assert_eq!(kept, expect);
}

#[test]
fn a_damaged_metadata_record_takes_only_its_partition_offline_until_repaired() {
    let mut b = TestBroker::start();
    b.cli_ok(&["topic", "create", "disk", "--partitions", "2"]);
    b.cli_stdin_ok(&["produce", "disk", "--partition", "0"], b"a\nb\nc\n");
    b.cli_stdin_ok(&["produce", "disk", "--partition", "1"], b"fine\n");
    b.terminate();
    let garbage = b"\xffnot json".to_vec();
    {
        let (db, _, topic_id) = batches_of(&b, "disk");
        let meta = db.open_tree(PARTITION_META_TREE).unwrap();
        let key = format!("{topic_id}/0");
        assert!(meta
            .insert(key.as_bytes(), garbage.clone())
            .unwrap()
            .is_some());
        db.flush().unwrap();
    }
    b.spawn();
    b.wait_ready();
    let d = b.describe("disk");
    assert_eq!(d["partitions"][0]["status"], "offline", "{d}");
    assert!(
        d["partitions"][0]["offline_reason"]
            .as_str()
            .is_some_and(
                |r| r.contains("metadata record is damaged") && r.contains("quiver broker repair")
            ),
        "{d}"
    );
    assert_eq!(d["partitions"][1]["status"], "online", "{d}");
    let e = b.cli_err(
        &[
            "consume",
            "disk",
            "--partition",
            "0",
            "--from-beginning",
            "--max-messages",
            "1",
        ],
        None,
    );
    assert!(e.contains("offline") && e.contains("repair"), "{e}");
    assert_eq!(
        b.cli_ok(&["consume", "disk", "--partition", "1", "--from-beginning"]),
        "fine\n"
    );
    b.terminate();
    // Nothing rewrote the damaged record while the broker ran and stopped.
    {
        let (db, _, topic_id) = batches_of(&b, "disk");
        let meta = db.open_tree(PARTITION_META_TREE).unwrap();
        let stored = meta.get(format!("{topic_id}/0").as_bytes()).unwrap();
        assert_eq!(stored.map(|v| v.to_vec()), Some(garbage));
    }
    let out = repair(&b, "disk", 0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["metadata_rebuilt"], true, "{report}");
    assert_eq!(report["dropped_batches"], 0, "{report}");
    b.spawn();
    b.wait_ready();
    let d = b.describe("disk");
    assert_eq!(d["partitions"][0]["status"], "online", "{d}");
    assert_eq!(d["partitions"][0]["log_end_offset"], 3, "{d}");
    b.cli_stdin_ok(&["produce", "disk", "--partition", "0"], b"d\n");
    assert_eq!(
        b.cli_ok(&["consume", "disk", "--partition", "0", "--from-beginning"]),
        "a\nb\nc\nd\n"
    );
}

/// An unreadable topic record (disk damage) no longer stops the broker: the other topics
/// serve, the damaged one answers that it is offline and what to do, its name cannot be
/// created over it, and `topic delete` drops the record so the name can be used again.
#[test]
fn a_damaged_topic_record_takes_only_its_topic_offline() {
    let mut b = TestBroker::start_with_config("delete_topic_enable = true\n");
    b.cli_ok(&["topic", "create", "fine", "--partitions", "1"]);
    b.cli_ok(&["topic", "create", "hurt", "--partitions", "2"]);
    b.cli_stdin_ok(&["produce", "fine"], b"a\nb\n");
    b.cli_stdin_ok(&["produce", "hurt"], b"x\n");
    b.terminate();
    {
        let db = quiver_core::log::store::open(&b.data_dir().join("log"))
            .expect("open the broker's sled database");
        let topics = db.open_tree(TOPICS_TREE).unwrap();
        assert!(topics
            .insert("hurt", &b"\xffnot json"[..])
            .unwrap()
            .is_some());
        db.flush().unwrap();
    }
    b.spawn();
    b.wait_ready();
    assert_eq!(b.cli_ok(&["consume", "fine", "--from-beginning"]), "a\nb\n");
    let e = b.cli_err(&["topic", "describe", "hurt"], None);
    assert!(
        e.contains("offline") && e.contains("damaged") && e.contains("quiver topic delete hurt"),
        "{e}"
    );
    let e = b.cli_err(&["produce", "hurt"], Some(b"y\n"));
    assert!(e.contains("offline"), "{e}");
    let e = b.cli_err(&["topic", "create", "hurt", "--partitions", "1"], None);
    assert!(e.contains("offline"), "{e}");
    assert!(!b.cli_ok(&["topic", "list"]).contains("hurt"));
    b.cli_ok(&["topic", "delete", "hurt"]);
    b.cli_ok(&["topic", "create", "hurt", "--partitions", "1"]);
    b.cli_stdin_ok(&["produce", "hurt"], b"new\n");
    assert_eq!(b.cli_ok(&["consume", "hurt", "--from-beginning"]), "new\n");
    // And it stays fixed across a restart.
    b.terminate();
    b.spawn();
    b.wait_ready();
    assert_eq!(b.cli_ok(&["consume", "hurt", "--from-beginning"]), "new\n");
}

/// A damaged plugin record no longer stops the broker: the other plugins list and run, the
/// damaged one says what to do, and `plugin remove` drops it so it can be deployed again.
#[test]
fn a_damaged_plugin_record_leaves_the_broker_and_other_plugins_running() {
    let mut b = TestBroker::start();
    let (kept, hurt) = (
        super::harness::example("noop-filter"),
        super::harness::example("redact"),
    );
    b.cli_ok(&["plugin", "deploy", &kept]);
    b.cli_ok(&["plugin", "deploy", &hurt]);
    let hurt_id = plugin_id(&b, "redact");
    b.terminate();
    {
        let db = quiver_core::log::store::open(&b.data_dir().join("log"))
            .expect("open the broker's sled database");
        let plugins = db.open_tree("__plugins").unwrap();
        assert!(plugins
            .insert(hurt_id.as_bytes(), &b"\xffnot json"[..])
            .unwrap()
            .is_some());
        db.flush().unwrap();
    }
    b.spawn();
    b.wait_ready();
    let listed = b.cli_ok(&["plugin", "list"]);
    assert!(
        listed.contains("noop-filter") && !listed.contains("redact"),
        "{listed}"
    );
    let e = b.cli_err(&["plugin", "describe", &hurt_id], None);
    assert!(
        e.contains("damaged") && e.contains(&format!("quiver plugin remove {hurt_id}")),
        "{e}"
    );
    b.cli_ok(&["plugin", "remove", &hurt_id]);
    b.cli_ok(&["plugin", "deploy", &hurt]);
    assert_eq!(plugin_id(&b, "redact"), hurt_id);
}

/// `NAME@VERSION` of the deployed plugin `name` (its highest version).
fn plugin_id(b: &TestBroker, name: &str) -> String {
    let d: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["plugin", "describe", name, "--output", "json"])).unwrap();
    format!(
        "{}@{}",
        d["name"].as_str().unwrap(),
        d["version"].as_str().unwrap()
    )
}
