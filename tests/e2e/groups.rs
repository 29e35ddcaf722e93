//! Consumer groups end to end: members (real `quiver consume --group` processes where the
//! issue talks about processes, the SDK elsewhere) share a topic's partitions, each
//! partition read by one member at a time; groups are independent; offsets are durable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_client::{
    Client, ClientError, GroupConfig, GroupConsumer, RebalanceListener, TopicPartition,
};
use quiver_protocol::requests::{CommitOffsetsRequest, OffsetCommit};
use quiver_protocol::ErrorCode;
use serde_json::Value;

use super::harness::{bin, describe_now, json_lines, settled, unsafe_kill, wait_for, TestBroker};

/// A `quiver consume --group` process writing JSON lines to a file; killed on drop.
struct Member {
    child: Child,
    out: PathBuf,
}

impl Member {
    fn spawn(
        b: &TestBroker,
        dir: &Path,
        name: &str,
        topic: &str,
        group: &str,
        extra: &[&str],
    ) -> Member {
        let out = dir.join(format!("{name}.json"));
        let err = dir.join(format!("{name}.err"));
        let child = Command::new(bin())
            .arg("--bootstrap")
            .arg(b.addr())
            .arg("--ca")
            .arg(b.ca())
            .args([
                "consume", topic, "--group", group, "--follow", "--output", "json",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("out file"))
            .stderr(std::fs::File::create(err).expect("err file"))
            .spawn()
            .expect("spawn consumer");
        Member { child, out }
    }

    /// The complete JSON lines written so far.
    fn records(&self) -> Vec<Value> {
        let s = std::fs::read_to_string(&self.out).unwrap_or_default();
        let complete = match s.rfind('\n') {
            Some(i) => &s[..=i],
            None => "",
        };
        json_lines(complete)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the member commits and leaves.
    fn stop(&mut self) {
        unsafe_kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn describe(b: &TestBroker, group: &str) -> Value {
    serde_json::from_str(&b.cli_ok(&["group", "describe", group, "--output", "json"]))
        .expect("describe json")
}

fn produce_keyed(b: &TestBroker, topic: &str, from: u64, to: u64) {
    let mut input = String::new();
    for i in from..to {
        input.push_str(&format!("key{i}:v{i}\n"));
    }
    let out = b.cli_with_stdin(
        &["produce", topic, "--key-separator", ":"],
        Some(input.as_bytes()),
    );
    assert!(
        out.status.success(),
        "produce: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn value(r: &Value) -> String {
    r["value"].as_str().expect("value").to_string()
}

fn partition(r: &Value) -> u64 {
    r["partition"].as_u64().expect("partition")
}

#[test]
fn three_members_share_six_partitions_and_a_second_group_gets_everything() {
    const N: u64 = 300_000;
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "orders", "--partitions", "6"]);
    let dir = tempfile::tempdir().unwrap();
    let members: Vec<Member> = (0..3)
        .map(|i| Member::spawn(&b, dir.path(), &format!("m{i}"), "orders", "billing", &[]))
        .collect();
    let audit = Member::spawn(&b, dir.path(), "audit", "orders", "audit", &[]);
    wait_for(60, "billing to settle with 3 members", || {
        settled(&describe_now(&b, "billing"), 3)
    });
    let owners_before = describe(&b, "billing");
    produce_keyed(&b, "orders", 0, N);
    wait_for(240, "both groups to receive every record", || {
        members.iter().map(|m| m.records().len()).sum::<usize>() >= N as usize
            && audit.records().len() >= N as usize
    });
    let per_member: Vec<Vec<Value>> = members.iter().map(Member::records).collect();
    // Every record exactly once within the group.
    let all: Vec<String> = per_member.iter().flatten().map(value).collect();
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), N as usize, "some record was lost");
    assert_eq!(all.len(), N as usize, "some record was delivered twice");
    // Each partition read by exactly one member, the one `group describe` showed.
    let mut readers: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    for (i, recs) in per_member.iter().enumerate() {
        for r in recs {
            readers.entry(partition(r)).or_default().insert(i);
        }
    }
    assert_eq!(readers.len(), 6, "every partition got records");
    for (p, who) in &readers {
        assert_eq!(who.len(), 1, "partition {p} was read by members {who:?}");
    }
    assert!(
        per_member.iter().all(|r| !r.is_empty()),
        "every member worked"
    );
    let owners: BTreeSet<String> = owners_before["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["owner"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(owners.len(), 3);
    // The other group received everything too (publish/subscribe).
    let audit_values: BTreeSet<String> = audit.records().iter().map(value).collect();
    assert_eq!(audit_values.len(), N as usize);
    // Lag falls to 0 once the members have committed.
    wait_for(30, "billing lag to reach 0", || {
        describe(&b, "billing")["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["lag"] == 0)
    });
}

#[test]
fn a_killed_member_partitions_move_to_the_others_and_resume_from_the_commit() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "jobs", "--partitions", "4"]);
    let dir = tempfile::tempdir().unwrap();
    let session = ["--session-timeout-ms", "1500"];
    let mut victim = Member::spawn(&b, dir.path(), "victim", "jobs", "workers", &session);
    wait_for(60, "the first member to own everything", || {
        settled(&describe_now(&b, "workers"), 1)
    });
    let survivor = Member::spawn(&b, dir.path(), "survivor", "jobs", "workers", &session);
    wait_for(60, "two members to settle", || {
        settled(&describe_now(&b, "workers"), 2)
    });
    produce_keyed(&b, "jobs", 0, 2000);
    wait_for(60, "the first batch to be consumed and committed", || {
        let d = describe(&b, "workers");
        d["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["lag"] == 0)
    });
    let d = describe(&b, "workers");
    let victim_id = d["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["member_id"].as_str().unwrap().to_string())
        .find(|id| id.contains(&format!("-{}-", victim.child.id())))
        .expect("victim member id");
    let committed: BTreeMap<u64, i64> = d["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["owner"].as_str() == Some(victim_id.as_str()))
        .map(|p| {
            (
                p["partition"].as_u64().unwrap(),
                p["committed"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert!(!committed.is_empty(), "the victim owned partitions: {d}");
    victim.kill9();
    wait_for(30, "the survivor to own every partition", || {
        let d = describe(&b, "workers");
        settled(&d, 1) && d["members"][0]["assigned"].as_array().map_or(0, Vec::len) == 4
    });
    produce_keyed(&b, "jobs", 2000, 3000);
    wait_for(60, "the survivor to read the victim's partitions", || {
        let recs = survivor.records();
        recs.iter()
            .filter(|r| committed.contains_key(&partition(r)))
            .count()
            >= 1
            && describe(&b, "workers")["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["lag"] == 0)
    });
    // The survivor started each moved partition exactly at the victim's last commit.
    let recs = survivor.records();
    for (p, c) in &committed {
        let first = recs
            .iter()
            .filter(|r| partition(r) == *p)
            .map(|r| r["offset"].as_i64().unwrap())
            .min();
        if let Some(first) = first {
            assert_eq!(first, *c, "partition {p} resumed at {first}, committed {c}");
        }
    }
    // Nothing lost: every value of the second batch arrived at the survivor.
    let got: BTreeSet<String> = recs.iter().map(value).collect();
    for i in 2000..3000 {
        let v = format!("v{i}");
        let victim_had = victim.records().iter().any(|r| value(r) == v);
        assert!(got.contains(&v) || victim_had, "{v} lost");
    }
}

/// Records rebalance callbacks.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Callback>>>);

/// One callback: its name and partitions.
type Callback = (String, Vec<TopicPartition>);

impl RebalanceListener for Log {
    fn on_assigned(&mut self, p: &[TopicPartition]) {
        self.0.lock().unwrap().push(("assigned".into(), p.to_vec()));
    }
    fn on_revoked(&mut self, p: &[TopicPartition]) {
        self.0.lock().unwrap().push(("revoked".into(), p.to_vec()));
    }
    fn on_lost(&mut self, p: &[TopicPartition]) {
        self.0.lock().unwrap().push(("lost".into(), p.to_vec()));
    }
}

fn set(v: &[TopicPartition]) -> BTreeSet<TopicPartition> {
    v.iter().cloned().collect()
}

#[test]
fn a_joining_member_only_takes_the_partitions_it_gets() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "events", "--partitions", "6"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = |name: &str| {
            let mut c = GroupConfig::new("g", ["events"]);
            c.client_id = name.into();
            c
        };
        let client = Client::connect(b.client_config()).await.unwrap();
        let mut a = GroupConsumer::join(client.clone(), cfg("a")).await.unwrap();
        let a_log = Log::default();
        a.set_listener(a_log.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while a.assignment().len() < 6 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a never got 6 partitions"
            );
            a.poll_timeout(Duration::from_millis(50)).await.unwrap();
        }
        let a_before = set(&a.assignment());
        let mut bm = GroupConsumer::join(client.clone(), cfg("b")).await.unwrap();
        let b_log = Log::default();
        bm.set_listener(b_log.clone());
        while !(bm.assignment().len() == 3 && a.assignment().len() == 3) {
            assert!(tokio::time::Instant::now() < deadline, "never split 3/3");
            a.poll_timeout(Duration::from_millis(20)).await.unwrap();
            bm.poll_timeout(Duration::from_millis(20)).await.unwrap();
        }
        let a_after = set(&a.assignment());
        let b_has = set(&bm.assignment());
        assert!(a_after.is_subset(&a_before), "a gained partitions");
        assert!(a_after.is_disjoint(&b_has));
        let revoked: BTreeSet<TopicPartition> = a_log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == "revoked")
            .flat_map(|(_, p)| p.iter().cloned())
            .collect();
        assert_eq!(
            revoked, b_has,
            "a gave up exactly what b took, and kept the rest"
        );
        assert!(
            !a_log.0.lock().unwrap().iter().any(|(k, _)| k == "lost"),
            "nothing was lost"
        );
        let b_assigned: BTreeSet<TopicPartition> = b_log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == "assigned")
            .flat_map(|(_, p)| p.iter().cloned())
            .collect();
        assert_eq!(b_assigned, b_has);
        bm.close().await.unwrap();
        a.close().await.unwrap();
    });
}

#[test]
fn describe_lag_and_reset_move_the_next_member_and_busy_groups_refuse_admin() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "logs", "--partitions", "2"]);
    produce_keyed(&b, "logs", 0, 100);
    let d = describe_or_missing(&b, "readers");
    assert!(d.is_none(), "no group before anyone joins");
    // Not following: reads to the end, commits, leaves.
    let first =
        json_lines(&b.cli_ok(&["consume", "logs", "--group", "readers", "--output", "json"]));
    assert_eq!(first.len(), 100);
    let d = describe(&b, "readers");
    assert_eq!(d["state"], "empty");
    let parts = d["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert!(parts
        .iter()
        .all(|p| p["lag"] == 0 && p["committed"] == p["high_watermark"]));
    // Nothing new: a second run prints nothing.
    assert!(b
        .cli_ok(&["consume", "logs", "--group", "readers", "--output", "json"])
        .trim()
        .is_empty());
    // A dry run shows where each partition would go, and changes nothing.
    let before = describe(&b, "readers")["partitions"].clone();
    let reset_to_10 = [
        "group",
        "reset",
        "readers",
        "--topic",
        "logs",
        "--to-offset",
        "10",
    ];
    let dry_run = [&reset_to_10[..], &["--dry-run", "--output", "json"]].concat();
    let dry: serde_json::Value = serde_json::from_str(&b.cli_ok(&dry_run)).unwrap();
    assert_eq!(dry["dry_run"], true, "{dry}");
    for p in dry["partitions"].as_array().unwrap() {
        let hw = before[p["partition"].as_u64().unwrap() as usize]["high_watermark"]
            .as_i64()
            .unwrap();
        assert_eq!(p["current_offset"].as_i64(), Some(hw), "{dry}");
        assert_eq!(p["new_offset"].as_i64(), Some(10.min(hw)), "{dry}");
    }
    assert_eq!(
        describe(&b, "readers")["partitions"],
        before,
        "a dry run changed offsets"
    );
    b.cli_ok(&reset_to_10);
    let d = describe(&b, "readers");
    let hws: Vec<i64> = d["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let hw = p["high_watermark"].as_i64().unwrap();
            assert_eq!(p["committed"].as_i64().unwrap(), 10.min(hw));
            assert_eq!(p["lag"].as_i64().unwrap(), hw - 10.min(hw));
            hw
        })
        .collect();
    let again =
        json_lines(&b.cli_ok(&["consume", "logs", "--group", "readers", "--output", "json"]));
    let expected: i64 = hws.iter().map(|hw| hw - 10.min(*hw)).sum();
    assert_eq!(again.len() as i64, expected);
    for p in 0..2u64 {
        if let Some(min) = again
            .iter()
            .filter(|r| partition(r) == p)
            .map(|r| r["offset"].as_i64().unwrap())
            .min()
        {
            assert_eq!(min, 10, "partition {p} restarted at the reset offset");
        }
    }
    // With a member present, reset and delete are refused and change nothing.
    let dir = tempfile::tempdir().unwrap();
    let mut m = Member::spawn(&b, dir.path(), "m", "logs", "readers", &[]);
    wait_for(60, "the member to join", || {
        settled(&describe_now(&b, "readers"), 1)
    });
    let before = describe(&b, "readers")["partitions"].clone();
    for args in [
        vec![
            "group",
            "reset",
            "readers",
            "--topic",
            "logs",
            "--to-earliest",
        ],
        vec!["group", "delete", "readers"],
    ] {
        let out = b.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded with a member");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("active members"), "{args:?}: {err}");
    }
    // A dry run still answers, and says the reset would wait for the members to leave.
    let out = b.cli(&[
        "group",
        "reset",
        "readers",
        "--topic",
        "logs",
        "--to-earliest",
        "--dry-run",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("CURRENT-OFFSET"));
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains("nothing changed") && note.contains("member"),
        "{note}"
    );
    assert_eq!(describe(&b, "readers")["partitions"], before);
    m.stop();
    wait_for(30, "the member to leave", || {
        describe(&b, "readers")["members"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    let list = b.cli_ok(&["group", "list", "--output", "json"]);
    assert!(list.contains("\"readers\""), "{list}");
    b.cli_ok(&["group", "delete", "readers"]);
    let list = b.cli_ok(&["group", "list", "--output", "json"]);
    assert!(!list.contains("\"readers\""), "{list}");
    assert!(describe_or_missing(&b, "readers").is_none());
}

fn describe_or_missing(b: &TestBroker, group: &str) -> Option<Value> {
    let out = b.cli(&["group", "describe", group, "--output", "json"]);
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).unwrap());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    None
}

#[test]
fn offsets_survive_a_restart_and_forged_or_stale_commits_change_nothing() {
    let mut b = TestBroker::start();
    b.cli_ok(&["topic", "create", "pay", "--partitions", "2"]);
    produce_keyed(&b, "pay", 0, 50);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (member_id, generation) = rt.block_on(async {
        let client = Client::connect(b.client_config()).await.unwrap();
        let mut cfg = GroupConfig::new("ledger", ["pay"]);
        cfg.strategy = Some(quiver_client::Strategy::Range);
        let mut m = GroupConsumer::join(client.clone(), cfg).await.unwrap();
        poll_at_least(&mut m, 50).await;
        m.commit().await.unwrap();
        let id = m.member_id();
        let generation = m.generation();
        // A forged member id and a generation never issued are refused.
        let commit = |member_id: &str, generation: u64| CommitOffsetsRequest {
            group: "ledger".into(),
            member_id: member_id.into(),
            generation,
            offsets: vec![OffsetCommit {
                topic: "pay".into(),
                partition: 0,
                offset: 1,
                metadata: None,
            }],
        };
        let code = |r: quiver_client::Result<_>| match r {
            Err(e @ ClientError::Broker { .. }) => e.code(),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => None,
        };
        assert_eq!(
            code(
                client
                    .request(&commit("forged-1", generation), bytes::Bytes::new())
                    .await
            ),
            Some(ErrorCode::UnknownMember)
        );
        assert_eq!(
            code(
                client
                    .request(&commit(&id, generation + 1000), bytes::Bytes::new())
                    .await
            ),
            Some(ErrorCode::StaleGeneration)
        );
        drop(m); // no leave: the broker restarts under it
        (id, generation)
    });
    let before = describe(&b, "ledger");
    let committed = |d: &Value| -> Vec<i64> {
        d["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["committed"].as_i64().unwrap_or(-1))
            .collect()
    };
    assert_eq!(
        committed(&before).iter().sum::<i64>(),
        50,
        "the refused commits changed nothing: {before}"
    );
    b.terminate();
    b.spawn();
    let after = describe(&b, "ledger");
    assert_eq!(committed(&after), committed(&before));
    assert_eq!(after["strategy"], "range");
    assert!(
        after["members"].as_array().unwrap().is_empty(),
        "membership is not durable"
    );
    // The old member id is unknown after the restart.
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.unwrap();
        let r = client
            .request(
                &CommitOffsetsRequest {
                    group: "ledger".into(),
                    member_id,
                    generation,
                    offsets: vec![],
                },
                bytes::Bytes::new(),
            )
            .await;
        assert_eq!(
            r.err().and_then(|e| e.code()),
            Some(ErrorCode::UnknownMember)
        );
    });
    // A new member continues from the commits: nothing to read.
    let out = b.cli_ok(&["consume", "pay", "--group", "ledger", "--output", "json"]);
    assert!(out.trim().is_empty(), "re-read after restart: {out}");
}

/// Polls `m` until it handed out at least `records` records (30 s at most).
async fn poll_at_least(m: &mut GroupConsumer, records: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while n < records {
        assert!(
            tokio::time::Instant::now() < deadline,
            "read only {n} of {records}"
        );
        n += m
            .poll_timeout(Duration::from_millis(100))
            .await
            .unwrap()
            .len();
    }
}

/// With `hold_revoked`, a revoked partition stays the member's (not fetched, nothing
/// committed) until it releases it: the joining member does not get it before, and starts
/// it at what the holder stored by the release.
#[test]
fn a_held_revoked_partition_moves_only_when_released_with_what_was_stored() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "held", "--partitions", "2"]);
    produce_keyed(&b, "held", 0, 40);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.unwrap();
        let mut cfg = GroupConfig::new("holders", ["held"])
            .start_without_commit_at(quiver_client::AutoOffsetReset::Earliest);
        cfg.commit_stored_offsets = true;
        cfg.hold_revoked = true;
        let mut a = GroupConsumer::join(client.clone(), cfg.clone())
            .await
            .unwrap();
        poll_at_least(&mut a, 40).await;
        assert_eq!(a.assignment().len(), 2);
        for p in 0..2 {
            a.store_offset("held", p, 3);
        }
        cfg.hold_revoked = false;
        let mut bm = GroupConsumer::join(client.clone(), cfg).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !a.holds_revoked() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing was revoked"
            );
            a.poll_timeout(Duration::from_millis(20)).await.unwrap();
            bm.poll_timeout(Duration::from_millis(20)).await.unwrap();
        }
        for _ in 0..10 {
            a.poll_timeout(Duration::from_millis(20)).await.unwrap();
            let got = bm.poll_timeout(Duration::from_millis(50)).await.unwrap();
            assert!(
                got.is_empty() && bm.assignment().is_empty(),
                "taken while held"
            );
            assert_eq!(a.assignment().len(), 2, "still the holder's");
        }
        a.release_revoked().await;
        assert!(!a.holds_revoked());
        assert_eq!(a.assignment().len(), 1);
        let kept = a.assignment()[0].partition;
        let mut first = None;
        while first.is_none() {
            assert!(tokio::time::Instant::now() < deadline, "never moved");
            a.poll_timeout(Duration::from_millis(20)).await.unwrap();
            first = bm
                .poll_timeout(Duration::from_millis(50))
                .await
                .unwrap()
                .first()
                .map(|r| (r.partition, r.offset));
        }
        assert_eq!(
            first,
            Some((1 - kept, 3)),
            "starts at what the holder stored"
        );
        bm.close().await.unwrap();
        a.close().await.unwrap();
    });
}

/// With `commit_stored_offsets`, commits (explicit, and at close) store only what the
/// application marked done, never the position of records it polled but did not finish.
#[test]
fn stored_offset_commits_store_only_what_was_marked_done() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "work", "--partitions", "1"]);
    produce_keyed(&b, "work", 0, 40);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.unwrap();
        let mut cfg = GroupConfig::new("finishers", ["work"]);
        cfg.commit_stored_offsets = true;
        let mut m = GroupConsumer::join(client.clone(), cfg).await.unwrap();
        poll_at_least(&mut m, 40).await;
        assert_eq!(m.commit().await.unwrap(), 0, "nothing marked done yet");
        let grant = m.grant_id("work", 0);
        assert!(grant.is_some(), "the partition is owned");
        assert_eq!(m.grant_id("elsewhere", 3), None);
        m.store_offset("work", 0, 15);
        m.store_offset("work", 0, 10); // never backwards
        m.store_offset("elsewhere", 3, 99); // not owned: ignored
        assert_eq!(m.commit().await.unwrap(), 1);
        m.store_offset("work", 0, 25);
        m.poll_timeout(Duration::from_millis(50)).await.unwrap();
        assert_eq!(
            m.grant_id("work", 0),
            grant,
            "the same grant while it is kept"
        );
        m.close().await.unwrap();
    });
    let d = describe_or_missing(&b, "finishers").expect("the group exists");
    let p = d["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["topic"] == "work")
        .cloned()
        .unwrap();
    assert_eq!(p["committed"], 25, "{d}");
    assert_eq!(p["lag"], 15, "{d}");
}

#[test]
fn a_compacted_offsets_log_keeps_the_last_commit_and_replays_only_the_state() {
    let mut b = TestBroker::start_with_config("offsets_compact_bytes = 65536\n");
    b.cli_ok(&["topic", "create", "ticks", "--partitions", "2"]);
    produce_keyed(&b, "ticks", 0, 10);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let last = rt.block_on(async {
        let client = Client::connect(b.client_config()).await.unwrap();
        let mut cfg = GroupConfig::new("clock", ["ticks"]);
        cfg.strategy = Some(quiver_client::Strategy::Range);
        let mut m = GroupConsumer::join(client.clone(), cfg).await.unwrap();
        poll_at_least(&mut m, 10).await;
        // About 200 bytes a commit: 1,500 of them are several compactions' worth.
        let mut last = 0;
        for i in 1..=1500i64 {
            let req = CommitOffsetsRequest {
                group: "clock".into(),
                member_id: m.member_id(),
                generation: m.generation(),
                offsets: (0..2)
                    .map(|p| OffsetCommit {
                        topic: "ticks".into(),
                        partition: p,
                        offset: i + i64::from(p),
                        metadata: None,
                    })
                    .collect(),
            };
            client.request(&req, bytes::Bytes::new()).await.unwrap();
            last = i;
        }
        drop(m); // no leave: the broker is killed under it
        last
    });
    wait_for(60, "a compaction of __consumer_offsets", || {
        b.log().contains("compacted the consumer-group log")
    });
    b.kill9();
    b.spawn();
    let d = describe(&b, "clock");
    let committed: Vec<i64> = d["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["committed"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(committed, vec![last, last + 1], "{d}");
    // The restart replayed the carried state and what came after it, not 1,500 commits.
    let log = b.log();
    let replayed: u64 = log
        .lines()
        .rfind(|l| l.contains("recovered consumer groups"))
        .and_then(|l| l.split("records=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the broker logs what it replayed");
    assert!(replayed < 1000, "replayed {replayed} records");
}

#[test]
fn a_group_at_group_max_size_refuses_a_new_member_until_one_leaves() {
    let b = TestBroker::start_with_config("group_max_size = 2\n");
    b.cli_ok(&["topic", "create", "capped", "--partitions", "2"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.unwrap();
        let cfg = || GroupConfig::new("capped-g", ["capped"]);
        let first = GroupConsumer::join(client.clone(), cfg()).await.unwrap();
        let _second = GroupConsumer::join(client.clone(), cfg()).await.unwrap();
        let refused = GroupConsumer::join(client.clone(), cfg())
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Some(ErrorCode::GroupMaxSizeReached),
            "{refused}"
        );
        assert!(refused.to_string().contains("group_max_size"), "{refused}");
        first.close().await.unwrap();
        GroupConsumer::join(client.clone(), cfg())
            .await
            .expect("a member left, so a new one fits");
    });
}

/// Requests cancelled in the middle (a task aborted while its request is on the wire)
/// leave the client and the broker able to answer the next one.
#[test]
fn requests_cancelled_mid_flight_leave_the_client_answering() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "cancelled", "--partitions", "2"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.unwrap();
        let admin = quiver_client::Admin::new(client.clone());
        admin.group_offsets("nobody", None).await.unwrap();
        for round in 0..40u64 {
            let tasks: Vec<_> = (0..50)
                .map(|_| {
                    let c = client.clone();
                    tokio::spawn(async move {
                        let _ = quiver_client::Admin::new(c)
                            .group_offsets("nobody", None)
                            .await;
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_micros(100 * (round % 20))).await;
            for t in tasks {
                t.abort();
            }
        }
        let answered =
            tokio::time::timeout(Duration::from_secs(10), admin.group_offsets("nobody", None))
                .await;
        assert!(
            matches!(answered, Ok(Ok(_))),
            "after cancelled requests: {answered:?}"
        );
    });
}

/// A topic given more partitions while a member reads it: the member takes the new ones
/// (its cached metadata did not know them) and reads what is produced there.
#[test]
fn a_member_takes_the_partitions_a_topic_grows_while_it_reads() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "grows"]);
    let dir = tempfile::tempdir().unwrap();
    let member = Member::spawn(&b, dir.path(), "m", "grows", "readers", &[]);
    wait_for(60, "the member to own partition 0", || {
        settled(&describe_now(&b, "readers"), 1)
    });
    b.cli_stdin_ok(&["produce", "grows", "--partition", "0"], b"before\n");
    wait_for(60, "the first record", || member.records().len() == 1);
    b.cli_ok(&["topic", "alter", "grows", "--partitions", "3"]);
    b.cli_stdin_ok(&["produce", "grows", "--partition", "2"], b"after\n");
    wait_for(60, "the record of the new partition", || {
        member.records().iter().any(|r| value(r) == "after")
    });
    assert_eq!(partition(&member.records()[1]), 2);
    let owned = describe(&b, "readers")["partitions"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(owned, 3, "the group covers every partition");
}

/// A deleted topic's committed offsets go with it (as in Kafka): a group reading a topic
/// created again under the same name starts by its reset policy, not at the old positions
/// (which skipped the new topic's first records).
#[test]
fn a_deleted_topics_offsets_go_with_it() {
    let b = TestBroker::start_with_config("delete_topic_enable = true\n");
    let lines = |from: u32, to: u32| -> Vec<u8> {
        (from..to)
            .map(|i| format!("v{i}\n"))
            .collect::<String>()
            .into_bytes()
    };
    let read = |n: &str| {
        b.cli_ok(&[
            "consume",
            "t",
            "--group",
            "g",
            "--from-beginning",
            "--max-messages",
            n,
            "--output",
            "json",
        ])
    };
    b.cli_ok(&["topic", "create", "t"]);
    b.cli_stdin_ok(&["produce", "t"], &lines(0, 100));
    assert_eq!(json_lines(&read("100")).len(), 100);
    let committed = |d: &Value| {
        d["partitions"]
            .as_array()
            .map(|ps| ps.iter().filter(|p| p["committed"].is_i64()).count())
            .unwrap_or(0)
    };
    assert_eq!(committed(&describe(&b, "g")), 1);
    b.cli_ok(&["topic", "delete", "t"]);
    b.cli_ok(&["topic", "create", "t"]);
    b.cli_stdin_ok(&["produce", "t"], &lines(1000, 1150));
    wait_for(30, "the deleted topic's offsets to go", || {
        describe_or_missing(&b, "g").is_none_or(|d| committed(&d) == 0)
    });
    let again = json_lines(&read("150"));
    assert_eq!(again.len(), 150, "every record of the new topic");
    assert_eq!(value(&again[0]), "v1000");
}
