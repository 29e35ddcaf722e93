//! Deployed pipelines in a 3-broker cluster: the controller holds the deployed file and
//! every live broker runs its share of the instances; when a broker is killed its
//! instances move to the others and nothing is lost, and when it is back it takes its share
//! again; a changed file rolls them; `pipeline status` gathers every
//! broker's instances; `pipeline stop` ends them all and the group empties; an
//! exactly-once pipeline is refused in a cluster with the reason, deployed or run. A
//! stateful word count keeps its counts through a killed broker (the changelog is
//! replicated like its input), losing nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::cluster::{lines, succeeded, TestCluster};
use super::harness::{example, json_lines, wait_for};

fn status(c: &TestCluster, name: &str) -> Option<Value> {
    let out = c.cli(&["pipeline", "status", name, "--output", "json"], None);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("status json"))
}

/// Broker of each running instance, by instance id.
fn placement(s: &Value) -> Vec<(String, u64)> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["broker"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Three instances, one on each of brokers 1, 2 and 3.
fn one_on_each_broker(s: &Value) -> bool {
    let brokers: BTreeSet<u64> = placement(s).iter().map(|(_, b)| *b).collect();
    placement(s).len() == 3 && brokers == BTreeSet::from([1, 2, 3])
}

/// Creates each `(topic, partitions)` with a replica on every broker.
fn create_topics(c: &TestCluster, topics: &[(&str, u32)]) {
    for (topic, partitions) in topics {
        let partitions = partitions.to_string();
        succeeded(&c.cli(
            &[
                "topic",
                "create",
                topic,
                "--partitions",
                &partitions,
                "--replication-factor",
                "3",
            ],
            None,
        ));
    }
}

/// The values in topic `out`, read from the beginning.
fn output_values(c: &TestCluster) -> BTreeSet<String> {
    let out = c.cli(
        &["consume", "out", "--from-beginning", "--output", "json"],
        None,
    );
    if !out.status.success() {
        return BTreeSet::new();
    }
    json_lines(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .map(|r| r["value"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `pipeline run FILE` against the cluster, which must exit with an error within `secs`;
/// returns its stderr.
fn run_until_exit(c: &TestCluster, file: &std::path::Path, secs: u64) -> String {
    let mut child = std::process::Command::new(super::harness::bin())
        .args(["--bootstrap", &c.bootstrap(), "--ca"])
        .arg(c.ca())
        .args(["pipeline", "run"])
        .arg(file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pipeline run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("pipeline run status") {
            assert!(!status.success(), "pipeline run succeeded");
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return err;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pipeline run did not exit within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn wanted(to: usize) -> BTreeSet<String> {
    (1..=to).map(|i| i.to_string()).collect()
}

#[test]
fn deployed_pipeline_instances_spread_over_brokers_and_move_off_a_killed_one() {
    let c = TestCluster::start();
    create_topics(&c, &[("src", 6), ("out", 3)]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spread.toml");
    let pipeline_of = |guarantee: &str, instances: u32| {
        format!(
            "name = \"spread\"\n[source]\ntopics = [\"src\"]\n[[stages]]\npath = \"{}\"\n[sink]\ntopic = \"out\"\n[run]\ninstances = {instances}\nguarantee = \"{guarantee}\"\n",
            example("noop-filter")
        )
    };
    let pipeline = |guarantee: &str| pipeline_of(guarantee, 3);

    // Exactly-once needs transactions across brokers: refused, with the reason.
    std::fs::write(&file, pipeline("exactly-once")).unwrap();
    let out = c.cli(&["pipeline", "deploy", file.to_str().unwrap()], None);
    assert!(!out.status.success(), "exactly-once deploy in a cluster");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at-least-once"), "{err}");

    // Run as a client, it fails at once with the same reason instead of retrying.
    let err = run_until_exit(&c, &file, 60);
    assert!(err.contains("at-least-once"), "{err}");

    std::fs::write(&file, pipeline("at-least-once")).unwrap();
    succeeded(&c.cli(&["pipeline", "deploy", file.to_str().unwrap()], None));
    wait_for(60, "one instance on each broker", || {
        status(&c, "spread").is_some_and(|s| one_on_each_broker(&s))
    });
    succeeded(&c.cli(
        &["produce", "src", "--key-separator", ":"],
        Some(&lines(1, 3000)),
    ));
    wait_for(90, "every record through the pipeline", || {
        wanted(3000).is_subset(&output_values(&c))
    });
    wait_for(60, "lag back to 0", || {
        status(&c, "spread").is_some_and(|s| s["lag"] == 0)
    });

    // A broker dies: its instance moves to the two that are left.
    c.kill(3);
    wait_for(90, "three instances on brokers 1 and 2", || {
        status(&c, "spread").is_some_and(|s| {
            let p = placement(&s);
            p.len() == 3 && p.iter().all(|(_, b)| *b != 3)
        })
    });
    succeeded(&c.cli(
        &["produce", "src", "--key-separator", ":"],
        Some(&lines(3001, 6000)),
    ));
    wait_for(
        120,
        "every record through the pipeline after the kill",
        || wanted(6000).is_subset(&output_values(&c)),
    );

    // Stop: every instance on every broker leaves the group.
    succeeded(&c.cli(&["pipeline", "stop", "spread"], None));
    wait_for(60, "the group without members", || {
        let out = c.cli(&["group", "describe", "spread", "--output", "json"], None);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|g| g["members"].as_array().is_some_and(|m| m.is_empty()))
    });
    let out = c.cli(&["pipeline", "list", "--output", "json"], None);
    succeeded(&out);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
}

/// The latest value per key of a topic read from the beginning (offset order within each
/// partition; a word lives in one partition).
fn latest_counts(c: &TestCluster, topic: &str) -> (BTreeMap<String, u64>, BTreeSet<String>) {
    let out = c.cli(
        &["consume", topic, "--from-beginning", "--output", "json"],
        None,
    );
    succeeded(&out);
    let mut records = json_lines(&String::from_utf8_lossy(&out.stdout));
    records.sort_by_key(|r| (r["partition"].as_u64(), r["offset"].as_i64()));
    let mut latest = BTreeMap::new();
    let mut sources = BTreeSet::new();
    for r in &records {
        latest.insert(
            r["key"].as_str().unwrap().to_string(),
            r["value"].as_str().unwrap().parse::<u64>().unwrap(),
        );
        if let Some(s) = r["headers"]["quiver.source"].as_str() {
            sources.insert(s.to_string());
        }
    }
    (latest, sources)
}

#[test]
fn deployed_word_counts_keep_their_state_through_a_killed_broker() {
    let c = TestCluster::start();
    create_topics(&c, &[("words", 6), ("counts", 3)]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wc.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"wc\"\n[source]\ntopics = [\"words\"]\n[[stages]]\npath = \"{}\"\n[sink]\ntopic = \"counts\"\n[run]\ninstances = 3\nguarantee = \"at-least-once\"\n",
            example("count")
        ),
    )
    .unwrap();
    succeeded(&c.cli(&["pipeline", "deploy", file.to_str().unwrap()], None));
    wait_for(60, "one instance on each broker", || {
        status(&c, "wc").is_some_and(|s| one_on_each_broker(&s))
    });
    let (records, words) = (30_000u64, 100u64);
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    let mut lines = String::new();
    for i in 0..records {
        let word = format!("w{}", (i * 7919 + i / 13) % words);
        *truth.entry(word.clone()).or_default() += 1;
        lines.push_str(&format!("{word}:{word} {i}\n"));
    }
    let all: Vec<&str> = lines.lines().collect();
    let half = all.len() / 2;
    let first = format!("{}\n", all[..half].join("\n"));
    let second = format!("{}\n", all[half..].join("\n"));
    succeeded(&c.cli(
        &["produce", "words", "--key-separator", ":"],
        Some(first.as_bytes()),
    ));
    wait_for(120, "the first half counted", || {
        status(&c, "wc").is_some_and(|s| s["lag"] == 0)
    });
    // A broker dies with its instance and its replicas of the changelog: the partitions
    // move to instances elsewhere, which restore their counts from the replicated changelog.
    c.kill(3);
    succeeded(&c.cli(
        &["produce", "words", "--key-separator", ":"],
        Some(second.as_bytes()),
    ));
    wait_for(180, "every record counted after the kill", || {
        status(&c, "wc")
            .is_some_and(|s| s["lag"] == 0 && placement(&s).iter().all(|(_, b)| *b != 3))
            && latest_counts(&c, "counts").1.len() as u64 >= records
    });
    let (latest, sources) = latest_counts(&c, "counts");
    assert_eq!(latest.len() as u64, words, "every word has a count");
    for (word, n) in &truth {
        let got = latest[word];
        assert!(
            got >= *n,
            "{word}: latest count {got} < true count {n} (lost)"
        );
    }
    assert_eq!(
        sources.len() as u64,
        records,
        "every input reached the sink"
    );
}
