//! The `quiver plugin test` / `quiver plugin bench` library entry points.

use quiver_plugins::local::{run_bench, run_test, LocalError};

use crate::support::*;

#[test]
fn run_test_reads_plain_and_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(
        &input,
        "ERROR one\nINFO two\n\n{\"key\":\"k\",\"value\":\"ERROR three\",\"headers\":{\"h\":\"v\"}}\n{\"value\":\"INFO four\"}\n",
    )
    .unwrap();
    let out = run_test(&example("grep"), &input, &[]).unwrap();
    assert_eq!(values(&out), ["ERROR one", "ERROR three"]);
    assert_eq!(out[1].key.as_deref(), Some(&b"k"[..]));
    assert_eq!(out[1].headers.len(), 1);
    assert_eq!(out[1].offset, 3, "offsets are line numbers");

    let out = run_test(&example("grep"), &input, &["pattern=INFO".to_string()]).unwrap();
    assert_eq!(values(&out), ["INFO two", "INFO four"]);

    let err = run_test(&example("grep"), &input, &["nokey".to_string()]).unwrap_err();
    assert!(matches!(err, LocalError::Plugin(_)), "{err}");
    let err = run_test(&example("grep"), &dir.path().join("missing"), &[]).unwrap_err();
    assert!(matches!(err, LocalError::Input { .. }), "{err}");
}

#[test]
fn run_test_on_a_partitioner_sets_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"user\":\"ann\"}\n{\"user\":\"ann\",\"x\":1}\n").unwrap();
    let out = run_test(&example("json-partitioner"), &input, &[]).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].partition as u32, fnv1a(b"ann") % 4);
    assert_eq!(out[0].partition, out[1].partition);
}

#[test]
fn run_bench_reports_throughput() {
    for name in ["noop-filter", "noop-map", "grep", "key-hash-partitioner"] {
        let r = run_bench(&example(name), 2500, 100, 1000).unwrap();
        assert_eq!(r.records, 2500, "{name}");
        assert!(
            r.records_per_sec > 0.0 && r.micros_per_batch > 0.0,
            "{name}"
        );
        if name.starts_with("noop") {
            assert_eq!(r.output_records, 2500, "{name}");
            assert_eq!(r.calls, 3, "{name}");
        }
    }
}

#[test]
fn run_test_gives_a_processor_keyed_state() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("words.txt");
    std::fs::write(&input, "a\nb\na\na\n").unwrap();
    let out = run_test(&example("count"), &input, &[]).unwrap();
    assert_eq!(values(&out), ["1", "1", "2", "3"]);
    assert_eq!(out[3].key.as_deref(), Some(&b"a"[..]));
}
