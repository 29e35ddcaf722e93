//! The README's tour, as a new user runs it: create a 3-partition topic, pipe 100,000 lines
//! into `quiver produce`, read them back with `quiver consume`.

use std::collections::BTreeMap;

use super::harness::{json_lines, TestBroker};

#[test]
fn hundred_thousand_lines_round_trip_in_partition_order() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "demo", "--partitions", "3"]);
    let input: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    b.cli_stdin_ok(&["produce", "demo"], input.as_bytes());
    let out = b.cli_ok(&[
        "consume",
        "demo",
        "--from-beginning",
        "--max-messages",
        "100000",
        "--output",
        "json",
    ]);
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 100_000);
    let mut values: Vec<u64> = Vec::new();
    let mut per_partition: BTreeMap<u64, Vec<(i64, u64)>> = BTreeMap::new();
    for r in &recs {
        assert_eq!(r["topic"], "demo");
        assert!(r["timestamp"].as_i64().unwrap() > 0);
        let v: u64 = r["value"].as_str().unwrap().parse().unwrap();
        values.push(v);
        per_partition
            .entry(r["partition"].as_u64().unwrap())
            .or_default()
            .push((r["offset"].as_i64().unwrap(), v));
    }
    values.sort();
    assert_eq!(
        values,
        (1..=100_000).collect::<Vec<u64>>(),
        "every value exactly once"
    );
    assert_eq!(
        per_partition.len(),
        3,
        "keyless records spread over all partitions"
    );
    for (p, mut recs) in per_partition {
        recs.sort();
        let vals: Vec<u64> = recs.iter().map(|r| r.1).collect();
        let mut sorted = vals.clone();
        sorted.sort();
        assert_eq!(vals, sorted, "partition {p} keeps produce order");
        let offsets: Vec<i64> = recs.iter().map(|r| r.0).collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as i64).collect::<Vec<_>>(),
            "partition {p} offsets are dense"
        );
    }
}

#[test]
fn text_output_keys_and_explicit_partition() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "kv", "--partitions", "4"]);
    b.cli_stdin_ok(
        &["produce", "kv", "--key-separator", ":", "--partition", "2"],
        b"a:1\nb:2\nc:3\n",
    );
    let json = b.cli_ok(&[
        "consume",
        "kv",
        "--from-beginning",
        "--partition",
        "2",
        "--max-messages",
        "3",
        "--output",
        "json",
    ]);
    let recs = json_lines(&json);
    let pairs: Vec<(String, String)> = recs
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("c".into(), "3".into())
        ]
    );
    let text = b.cli_ok(&[
        "consume",
        "kv",
        "--from-beginning",
        "--partition",
        "2",
        "--max-messages",
        "3",
    ]);
    assert_eq!(text.lines().collect::<Vec<_>>(), vec!["1", "2", "3"]);
}

#[test]
fn same_key_always_lands_in_same_partition() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "keyed", "--partitions", "6"]);
    let input: String = (0..600).map(|i| format!("user-{}:{i}\n", i % 10)).collect();
    let out = b.cli_with_stdin(
        &["produce", "keyed", "--key-separator", ":"],
        Some(input.as_bytes()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = json_lines(&b.cli_ok(&[
        "consume",
        "keyed",
        "--from-beginning",
        "--max-messages",
        "600",
        "--output",
        "json",
    ]));
    let mut owner: BTreeMap<String, u64> = BTreeMap::new();
    for r in &recs {
        let k = r["key"].as_str().unwrap().to_string();
        let p = r["partition"].as_u64().unwrap();
        assert_eq!(
            *owner.entry(k.clone()).or_insert(p),
            p,
            "key {k} split across partitions"
        );
    }
    assert_eq!(owner.len(), 10);
}

#[test]
fn every_acks_level_and_codec_round_trips() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "acks"]);
    let mut expected = Vec::new();
    for (acks, codec) in [("0", "none"), ("1", "lz4"), ("all", "zstd")] {
        let input: String = (0..200).map(|i| format!("{acks}-{codec}-{i}\n")).collect();
        expected.extend(input.lines().map(str::to_string));
        let out = b.cli_with_stdin(
            &["produce", "acks", "--acks", acks, "--compression", codec],
            Some(input.as_bytes()),
        );
        assert!(
            out.status.success(),
            "acks {acks}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // acks=0 returns before the broker answers: wait (bounded) until all 600 are readable.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let d: serde_json::Value =
            serde_json::from_str(&b.cli_ok(&["topic", "describe", "acks", "--output", "json"]))
                .unwrap();
        if d["partitions"][0]["high_watermark"] == 600 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "records missing: {d}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let got: Vec<String> = b
        .cli_ok(&[
            "consume",
            "acks",
            "--from-beginning",
            "--max-messages",
            "600",
        ])
        .lines()
        .map(str::to_string)
        .collect();
    let (mut g, mut e) = (got.clone(), expected.clone());
    g.sort();
    e.sort();
    assert_eq!(g, e);
}
