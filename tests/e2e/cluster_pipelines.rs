//! Deployed pipelines in a 3-broker cluster: the controller holds the deployed file and
//! every live broker runs its share of the instances; when a broker is killed its
//! instances move to the others and nothing is lost, and when it is back it takes its share
//! again; a changed file rolls them; `pipeline status` gathers every
//! broker's instances; `pipeline stop` ends them all and the group empties. A stateful
//! word count keeps its counts through a broker killed mid-run (the changelog is
//! replicated like its input): at-least-once loses nothing, and exactly-once (transactions
//! coordinated across the brokers) counts every word exactly, with nothing from an aborted
//! attempt visible to read-committed consumers.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::cluster::{lines, succeeded, TestCluster};
use super::harness::{example, json_lines, printed_values, read_committed_args, wait_for};

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
    printed_values(&out).into_iter().collect()
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

/// What a word count's output holds, read committed from the beginning.
struct Counts {
    /// The latest value per key (offset order within each partition; a word lives in one
    /// partition).
    latest: BTreeMap<String, u64>,
    /// The distinct `quiver.source` headers.
    sources: BTreeSet<String>,
    /// How many records.
    records: u64,
}

fn latest_counts(c: &TestCluster, topic: &str) -> Counts {
    let out = c.cli(&read_committed_args(topic), None);
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
    Counts {
        latest,
        sources,
        records: records.len() as u64,
    }
}

#[test]
fn deployed_word_counts_keep_their_state_through_a_killed_broker() {
    word_count_through_a_killed_broker("at-least-once");
}

#[test]
fn exactly_once_word_counts_are_exact_through_a_killed_broker() {
    word_count_through_a_killed_broker("exactly-once");
}

/// 30,000 words into a deployed 3-instance word count on 3 brokers; broker 3 is killed
/// (`kill -9`) once the count is under way. At-least-once: every word's latest count is at
/// least its true count. Exactly-once: exactly its true count, and the output holds one
/// record per input, read committed.
fn word_count_through_a_killed_broker(guarantee: &str) {
    let exact = guarantee == "exactly-once";
    let c = TestCluster::start();
    create_topics(&c, &[("words", 6), ("counts", 3)]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wc.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"wc\"\n[source]\ntopics = [\"words\"]\n[[stages]]\npath = \"{}\"\n[sink]\ntopic = \"counts\"\n[run]\ninstances = 3\nguarantee = \"{guarantee}\"\n",
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
    wait_for(120, "the count under way", || {
        status(&c, "wc").is_some_and(|s| s["records_in"].as_u64().unwrap_or(0) > 0)
    });
    // A broker dies with its instance, its replicas of the changelog and (exactly-once)
    // the transactions it coordinated: the partitions move to instances elsewhere, which
    // restore their counts from the replicated changelog.
    c.kill(3);
    succeeded(&c.cli(
        &["produce", "words", "--key-separator", ":"],
        Some(second.as_bytes()),
    ));
    wait_for(240, "every record counted after the kill", || {
        status(&c, "wc")
            .is_some_and(|s| s["lag"] == 0 && placement(&s).iter().all(|(_, b)| *b != 3))
            && latest_counts(&c, "counts").sources.len() as u64 >= records
    });
    let counts = latest_counts(&c, "counts");
    eprintln!(
        "{guarantee}: {} output records for {records} inputs; pipeline status {}",
        counts.records,
        status(&c, "wc").unwrap_or_default()
    );
    assert_eq!(counts.latest.len() as u64, words, "every word has a count");
    for (word, n) in &truth {
        let got = counts.latest[word];
        if exact {
            assert_eq!(got, *n, "{word}: latest count {got}, true count {n}");
        } else {
            assert!(
                got >= *n,
                "{word}: latest count {got} < true count {n} (lost)"
            );
        }
    }
    assert_eq!(
        counts.sources.len() as u64,
        records,
        "every input reached the sink"
    );
    if exact {
        assert_eq!(
            counts.records, records,
            "one committed output per input: nothing from an aborted attempt"
        );
    }
}

/// In a cluster as on a lone broker, deploying the same file again starts a pipeline its
/// `stop` policy failed: the user skips the record it failed on (a group reset) and deploys
/// the file again, and the rest of the input goes through. Before, the cluster took the same
/// file as "no change", and the pipeline stayed failed until stopped and deployed anew.
#[test]
fn deploying_the_same_file_again_starts_a_pipeline_its_stop_policy_failed() {
    let c = TestCluster::start();
    create_topics(&c, &[("src", 1), ("out", 1)]);
    let dir = tempfile::tempdir().unwrap();
    super::pipelines::write_picky(dir.path());
    let file = dir.path().join("strict.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"strict\"\n[source]\ntopics = [\"src\"]\n[[stages]]\npath = \"{}\"\n[sink]\ntopic = \"out\"\n[on_error]\npolicy = \"stop\"\n",
            dir.path().join("picky").display()
        ),
    )
    .unwrap();
    succeeded(&c.cli(
        &["produce", "src", "--key-separator", ":"],
        Some(b"a:ok1\nb:bad\nc:ok2\n"),
    ));
    succeeded(&c.cli(&["pipeline", "deploy", file.to_str().unwrap()], None));
    // Every broker names the pipeline among the plugin's users (the controller's record).
    let out = c.cli(&["plugin", "describe", "picky", "--output", "json"], None);
    let described: serde_json::Value = serde_json::from_slice(&out.stdout).expect("describe json");
    assert_eq!(described["used_by"], serde_json::json!(["pipeline strict"]));
    wait_for(60, "the pipeline to fail on the bad record", || {
        status(&c, "strict").is_some_and(|s| {
            s["state"]
                .as_str()
                .is_some_and(|st| st.starts_with("failed:") && st.contains("refusing bad"))
        })
    });
    // The failed instances left the group, so its offsets can move past the bad record.
    wait_for(60, "the group without members", || {
        let out = c.cli(&["group", "describe", "strict", "--output", "json"], None);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|g| g["members"].as_array().is_some_and(|m| m.is_empty()))
    });
    succeeded(&c.cli(
        &[
            "group",
            "reset",
            "strict",
            "--topic",
            "src",
            "--to-offset",
            "2",
        ],
        None,
    ));
    succeeded(&c.cli(&["pipeline", "deploy", file.to_str().unwrap()], None));
    wait_for(90, "the record after the bad one in the sink", || {
        output_values(&c).contains("OK2")
    });
    wait_for(60, "the pipeline running with its lag at 0", || {
        status(&c, "strict").is_some_and(|s| s["state"] == "running" && s["lag"] == 0)
    });
    assert!(
        !output_values(&c).contains("BAD"),
        "the skipped record stays skipped"
    );
    succeeded(&c.cli(&["pipeline", "stop", "strict"], None));
}
