//! Every example bundle under examples/plugins/ does what its README says.

use bytes::Bytes;
use quiver_plugins::{Bundle, HostLimits, PluginConfig, Record};

use crate::support::*;

#[test]
fn every_example_bundle_loads_and_round_trips_as_an_archive() {
    build_wasm_examples();
    let mut seen = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("plugin.toml").exists() {
            continue;
        }
        let b = Bundle::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let again = Bundle::from_archive_bytes(&b.to_archive_bytes().unwrap()).unwrap();
        assert_eq!(b.digest(), again.digest(), "{}", dir.display());
        seen += 1;
    }
    assert!(seen >= 8, "expected all examples, saw {seen}");
}

#[test]
fn grep_keeps_exactly_the_records_containing_the_pattern() {
    let mut p = processor(example("grep"), HostLimits::default());
    let out = p
        .process_batch(recs(&[
            "ERROR disk",
            "INFO ok",
            "an ERROR",
            "error lower",
            "",
        ]))
        .unwrap();
    assert_eq!(values(&out), ["ERROR disk", "an ERROR"]);
    assert_eq!(out[1].offset, 2, "kept records are the inputs, unchanged");

    let mut p = PluginConfig::new(example("grep"))
        .overrides(["pattern=a.c"])
        .unwrap()
        .build_processor()
        .unwrap();
    let out = p.process_batch(recs(&["abc", "xa.cx"])).unwrap();
    assert_eq!(values(&out), ["xa.cx"], "the pattern is a plain substring");
}

#[test]
fn noop_filter_and_noop_map_return_records_unchanged_field_by_field() {
    let input = vec![
        Record {
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from_static(b"v1"),
            headers: vec![("trace".into(), Bytes::from_static(b"abc"))],
            timestamp: 1_700_000_000_123,
            offset: 99,
            partition: 7,
        },
        Record {
            offset: 100,
            ..rec("v2")
        },
    ];
    for name in ["noop-filter", "noop-map"] {
        let mut p = processor(example(name), HostLimits::default());
        assert_eq!(p.process_batch(input.clone()).unwrap(), input, "{name}");
        assert_eq!(p.process_batch(Vec::new()).unwrap(), Vec::new(), "{name}");
    }
}

#[test]
fn json_partitioner_routes_by_the_configured_field() {
    let mut p = PluginConfig::new(example("json-partitioner"))
        .build_partitioner()
        .unwrap();
    for user in ["ann", "bob", "chen"] {
        let a = format!(r#"{{"user":"{user}","n":1}}"#);
        let b = format!(r#"{{"n":2, "user" : "{user}"}}"#);
        let pa = p.partition(None, a.as_bytes(), 8).unwrap();
        assert_eq!(pa, fnv1a(user.as_bytes()) % 8, "{user}");
        assert_eq!(p.partition(Some(b"x"), b.as_bytes(), 8).unwrap(), pa);
    }
    assert_eq!(p.partition(None, b"not json", 8).unwrap(), 0);
    let mut by_n = PluginConfig::new(example("json-partitioner"))
        .set("field", "n")
        .build_partitioner()
        .unwrap();
    assert_eq!(
        by_n.partition(None, br#"{"user":"ann","n":12}"#, 5)
            .unwrap(),
        fnv1a(b"12") % 5
    );
}

#[test]
fn redact_masks_the_configured_json_field() {
    let mut p = processor(example("redact"), HostLimits::default());
    let out = p
        .process_batch(recs(&[
            r#"{"user":"ann","password":"hunter2"}"#,
            r#"{"user":"bob"}"#,
            "not json",
        ]))
        .unwrap();
    assert_eq!(
        values(&out),
        [
            r#"{"user":"ann","password":"***"}"#,
            r#"{"user":"bob"}"#,
            "not json"
        ]
    );
    let mut p = PluginConfig::new(example("redact"))
        .overrides(["field=user", "mask=?"])
        .unwrap()
        .build_processor()
        .unwrap();
    let out = p.process_batch(recs(&[r#"{"user":"ann"}"#])).unwrap();
    assert_eq!(values(&out), [r#"{"user":"?"}"#]);
}

#[test]
fn split_words_fans_out_one_record_per_word() {
    let mut p = processor(example("split-words"), HostLimits::default());
    let mut input = recs(&["the quick  fox", "", "jumps"]);
    input[0].key = Some(Bytes::from_static(b"k"));
    let out = p.process_batch(input).unwrap();
    assert_eq!(values(&out), ["the", "quick", "fox", "jumps"]);
    assert!(out[..3]
        .iter()
        .all(|r| r.key.as_deref() == Some(&b"k"[..]) && r.offset == 0));
    assert_eq!(out[3].offset, 2);
}

#[test]
fn running_count_keeps_its_state_across_calls() {
    let mut p = processor(example("running-count"), HostLimits::default());
    let keyed = |k: &'static [u8]| Record {
        key: Some(Bytes::from_static(k)),
        ..rec("x")
    };
    let out = p
        .process_batch(vec![keyed(b"a"), keyed(b"b"), keyed(b"a")])
        .unwrap();
    assert_eq!(values(&out), ["1", "1", "2"]);
    let out = p.process_batch(vec![keyed(b"a"), keyed(b"b")]).unwrap();
    assert_eq!(
        values(&out),
        ["3", "2"],
        "counts persist from one batch to the next"
    );

    let mut other = processor(example("running-count"), HostLimits::default());
    assert_eq!(
        values(&other.process_batch(vec![keyed(b"a")]).unwrap()),
        ["1"],
        "instances do not share state"
    );

    assert!(p.process_batch(recs(&["panic"])).is_err());
    let out = p.process_batch(vec![keyed(b"a")]).unwrap();
    assert_eq!(values(&out), ["1"], "after a failure the instance is fresh");
}

#[test]
fn key_hash_partitioner_is_fnv1a_of_the_key_or_value() {
    let mut p = PluginConfig::new(example("key-hash-partitioner"))
        .build_partitioner()
        .unwrap();
    for key in ["a", "user-17", "zzz"] {
        assert_eq!(
            p.partition(Some(key.as_bytes()), b"v", 10).unwrap(),
            fnv1a(key.as_bytes()) % 10
        );
    }
    assert_eq!(p.partition(None, b"value", 3).unwrap(), fnv1a(b"value") % 3);
    assert!(p.partition(None, b"value", 0).is_err());
}

#[test]
fn a_processor_bundle_is_not_a_partitioner() {
    let err = PluginConfig::new(example("grep"))
        .build_partitioner()
        .err()
        .unwrap();
    assert!(
        matches!(err, quiver_plugins::PluginError::Load { .. }),
        "{err}"
    );
    let err = PluginConfig::new(example("noop-map"))
        .build_partitioner()
        .err()
        .unwrap();
    assert!(
        matches!(err, quiver_plugins::PluginError::Load { .. }),
        "{err}"
    );
}
