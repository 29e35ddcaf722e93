//! Plugins end to end, through the CLI (and the SDK where the contract says "CLI and SDK
//! alike") against real broker processes: deploy and redeploy, list and describe, consume-time
//! processors with source offsets, partitioners, removal rules, restart durability, and a
//! hostile processor stopped at its limits while other clients keep working.

use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_client::{Client, Producer, ProducerConfig, ProducerRecord};
use quiver_protocol::requests::{FetchRequest, ProcessorSpec};

use super::harness::{example, examples, json_lines, TestBroker};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn grep_filter_at_consume_time_returns_matching_records_with_source_offsets() {
    let b = TestBroker::start();
    let out = b.cli_ok(&["plugin", "deploy", &example("grep")]);
    assert!(out.contains("deployed grep@1.0.0"), "{out}");
    b.cli_ok(&["topic", "create", "logs"]);
    let lines: Vec<String> = (0..20)
        .map(|i| {
            if i % 3 == 0 {
                format!("{i} ERROR disk")
            } else {
                format!("{i} INFO fine")
            }
        })
        .collect();
    b.cli_with_stdin(&["produce", "logs"], Some(lines.join("\n").as_bytes()));
    let want: Vec<(i64, String)> = (0..20)
        .filter(|i| i % 3 == 0)
        .map(|i| (i, format!("{i} ERROR disk")))
        .collect();
    for mode in ["long-poll", "subscribe"] {
        let got = json_lines(&b.cli_ok(&[
            "consume",
            "logs",
            "--from-beginning",
            "--processor",
            "grep",
            "--mode",
            mode,
            "--output",
            "json",
        ]));
        let got: Vec<(i64, String)> = got
            .iter()
            .map(|r| {
                (
                    r["offset"].as_i64().unwrap(),
                    r["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(got, want, "mode {mode}");
    }
    // Config overrides per consumer, with an exact version.
    let got = b.cli_ok(&[
        "consume",
        "logs",
        "--from-beginning",
        "--processor",
        "grep@1.0.0",
        "--processor-config",
        "pattern=19 INFO",
    ]);
    assert_eq!(got, "19 INFO fine\n");
    // The same bundle run locally gives the same answer.
    let input = b.dir.path().join("input.txt");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let local = b.cli_ok(&[
        "plugin",
        "test",
        &example("grep"),
        "--input",
        input.to_str().unwrap(),
    ]);
    let want_values: Vec<String> = want.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(local.lines().collect::<Vec<_>>(), want_values);
    // An unknown processor is a clear error.
    let e = b.cli_err(
        &["consume", "logs", "--from-beginning", "--processor", "nope"],
        None,
    );
    assert!(e.contains("no plugin named nope"), "{e}");
    // A config key the plugin does not declare is refused, by the broker and by `plugin
    // test`, rather than ignored (the processor ran on its default pattern before).
    let e = b.cli_err(
        &[
            "consume",
            "logs",
            "--from-beginning",
            "--processor",
            "grep",
            "--processor-config",
            "patern=19 INFO",
        ],
        None,
    );
    assert!(
        e.contains("grep@1.0.0 has no config key \"patern\" (it takes: pattern"),
        "{e}"
    );
    let e = b.cli_err(
        &[
            "plugin",
            "test",
            &example("grep"),
            "--input",
            input.to_str().unwrap(),
            "--config",
            "patern=x",
        ],
        None,
    );
    assert!(e.contains("has no config key \"patern\""), "{e}");
}

#[test]
fn partitioner_routes_keys_the_same_from_the_cli_and_the_sdk() {
    let b = TestBroker::start();
    b.cli_ok(&["plugin", "deploy", &example("key-hash-partitioner")]);
    b.cli_ok(&["plugin", "deploy", &example("grep")]);
    // Only a deployed partitioner is accepted.
    let e = b.cli_err(
        &["topic", "create", "bad", "--partitioner", "grep@1.0.0"],
        None,
    );
    assert!(e.contains("not a partitioner"), "{e}");
    let e = b.cli_err(
        &["topic", "create", "bad", "--partitioner", "missing@1.0.0"],
        None,
    );
    assert!(e.contains("not deployed"), "{e}");
    b.cli_ok(&[
        "topic",
        "create",
        "by-cli",
        "--partitions",
        "4",
        "--partitioner",
        "key-hash-partitioner@1.0.0",
    ]);
    b.cli_ok(&["topic", "create", "by-sdk", "--partitions", "4"]);
    b.cli_ok(&[
        "topic",
        "alter",
        "by-sdk",
        "--partitioner",
        "key-hash-partitioner@1.0.0",
    ]);
    let keys: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let stdin: Vec<String> = keys.iter().map(|k| format!("{k}:v")).collect();
    b.cli_with_stdin(
        &["produce", "by-cli", "--key-separator", ":"],
        Some(stdin.join("\n").as_bytes()),
    );
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.expect("connect");
        let producer = Producer::new(client, ProducerConfig::default());
        for k in &keys {
            producer
                .send(ProducerRecord::new("by-sdk", "v").with_key(k.clone()))
                .await
                .expect("send")
                .await
                .expect("ack");
        }
    });
    let placement = |topic: &str| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> =
            json_lines(&b.cli_ok(&["consume", topic, "--from-beginning", "--output", "json"]))
                .iter()
                .map(|r| {
                    (
                        r["key"].as_str().unwrap().to_string(),
                        r["partition"].as_u64().unwrap(),
                    )
                })
                .collect();
        v.sort();
        v
    };
    let cli = placement("by-cli");
    assert_eq!(cli.len(), keys.len());
    assert_eq!(cli, placement("by-sdk"));
    let used: std::collections::BTreeSet<u64> = cli.iter().map(|(_, p)| *p).collect();
    assert!(used.len() > 1, "all keys on one partition: {cli:?}");
    // And as the plugin itself says when run locally (4 partitions).
    let input = b.dir.path().join("keys.jsonl");
    let jl: Vec<String> = keys
        .iter()
        .map(|k| format!("{{\"key\":\"{k}\",\"value\":\"v\"}}"))
        .collect();
    std::fs::write(&input, jl.join("\n")).unwrap();
    let local = b.cli_ok(&[
        "plugin",
        "test",
        &example("key-hash-partitioner"),
        "--input",
        input.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let mut local: Vec<(String, u64)> = json_lines(&local)
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["partition"].as_u64().unwrap(),
            )
        })
        .collect();
    local.sort();
    assert_eq!(local, cli);
}

#[test]
fn a_failing_partitioner_reaches_the_producer_as_an_error() {
    let b = TestBroker::start();
    // A Lua partitioner that answers out of range for one key.
    let dir = b.dir.path().join("bad-partitioner");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        "name = \"bad-partitioner\"\nversion = \"1.0.0\"\nkind = \"partitioner\"\nruntime = \"lua\"\nentry = \"p.lua\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("p.lua"),
        "function partition(key, value, n)\n  if key == 'boom' then return n + 7 end\n  return 0\nend\n",
    )
    .unwrap();
    b.cli_ok(&["plugin", "deploy", dir.to_str().unwrap()]);
    b.cli_ok(&[
        "topic",
        "create",
        "t",
        "--partitions",
        "2",
        "--partitioner",
        "bad-partitioner@1.0.0",
    ]);
    let rt = runtime();
    let err = rt.block_on(async {
        let client = Client::connect(b.client_config()).await.expect("connect");
        let producer = Producer::new(client, ProducerConfig::default());
        producer
            .send(ProducerRecord::new("t", "v").with_key("fine"))
            .await
            .expect("a good key is sent")
            .await
            .expect("ack");
        producer
            .send(ProducerRecord::new("t", "v").with_key("boom"))
            .await
            .err()
    });
    let err = err
        .expect("an out-of-range partition is an error")
        .to_string();
    assert!(err.contains("bad-partitioner@1.0.0"), "{err}");
    let e = b.cli_err(&["produce", "t", "--key-separator", ":"], Some(b"boom:v\n"));
    assert!(e.contains("bad-partitioner@1.0.0"), "{e}");
}

#[test]
fn redeploying_the_same_bytes_is_a_no_op_and_different_bytes_are_refused() {
    let b = TestBroker::start();
    let first = b.cli_ok(&["plugin", "deploy", &example("grep")]);
    assert!(first.contains("deployed grep@1.0.0"), "{first}");
    let again = b.cli_ok(&["plugin", "deploy", &example("grep")]);
    assert!(
        again.contains("already deployed with the same content"),
        "{again}"
    );
    // Scripts get the digest from the JSON answer.
    let j: serde_json::Value = serde_json::from_str(&b.cli_ok(&[
        "plugin",
        "deploy",
        &example("grep"),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(j["already_deployed"], true, "{j}");
    assert_eq!(j["plugin"]["name"], "grep", "{j}");
    assert_eq!(
        j["plugin"]["digest"].as_str().map(str::len),
        Some(64),
        "{j}"
    );
    // Same name and version, one byte more.
    let copy = b.dir.path().join("grep-changed");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["plugin.toml", "grep.lua"] {
        std::fs::copy(examples().join("grep").join(f), copy.join(f)).unwrap();
    }
    let mut lua = std::fs::read_to_string(copy.join("grep.lua")).unwrap();
    lua.push_str("-- changed\n");
    std::fs::write(copy.join("grep.lua"), lua).unwrap();
    let e = b.cli_err(&["plugin", "deploy", copy.to_str().unwrap()], None);
    assert!(
        e.contains("grep@1.0.0 is already deployed with different content"),
        "{e}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["plugin", "list", "--output", "json"])).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let d: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["plugin", "describe", "grep", "--output", "json"]))
            .unwrap();
    assert_eq!(d["digest"], list[0]["digest"]);
    assert_eq!(d["kind"], "processor");
    assert_eq!(d["runtime"], "lua");
    assert_eq!(d["config"]["pattern"], "ERROR");
}

#[test]
fn deployed_plugins_survive_a_broker_restart() {
    let mut b = TestBroker::start();
    b.cli_ok(&["plugin", "deploy", &example("grep")]);
    b.cli_ok(&["plugin", "deploy", &example("noop-map")]);
    b.cli_ok(&["topic", "create", "logs"]);
    b.cli_with_stdin(&["produce", "logs"], Some(b"ok\nERROR x\nok\n"));
    let before = b.cli_ok(&["plugin", "list", "--output", "json"]);
    b.terminate();
    b.spawn();
    assert_eq!(b.cli_ok(&["plugin", "list", "--output", "json"]), before);
    let got = json_lines(&b.cli_ok(&[
        "consume",
        "logs",
        "--from-beginning",
        "--processor",
        "grep",
        "--output",
        "json",
    ]));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["offset"], 1);
    let mapped = b.cli_ok(&[
        "consume",
        "logs",
        "--from-beginning",
        "--processor",
        "noop-map",
    ]);
    assert_eq!(mapped, "ok\nERROR x\nok\n");
}

#[test]
fn remove_is_refused_while_a_topic_uses_the_partitioner() {
    let b = TestBroker::start();
    b.cli_ok(&["plugin", "deploy", &example("json-partitioner")]);
    b.cli_ok(&[
        "topic",
        "create",
        "events",
        "--partitions",
        "3",
        "--partitioner",
        "json-partitioner@1.0.0",
    ]);
    let e = b.cli_err(&["plugin", "remove", "json-partitioner@1.0.0"], None);
    assert!(e.contains("in use by topic events"), "{e}");
    let d = b.cli_ok(&["plugin", "describe", "json-partitioner@1.0.0"]);
    assert!(d.contains("topic events (partitioner)"), "{d}");
    b.cli_ok(&["topic", "alter", "events", "--partitioner", ""]);
    b.cli_ok(&["plugin", "remove", "json-partitioner@1.0.0"]);
    let list = b.cli_ok(&["plugin", "list", "--output", "json"]);
    assert_eq!(list.trim(), "[]");
    let e = b.cli_err(&["plugin", "describe", "json-partitioner"], None);
    assert!(e.contains("no plugin named json-partitioner"), "{e}");
}

#[test]
fn a_wasm_bundle_importing_the_filesystem_is_refused_at_deploy() {
    let b = TestBroker::start();
    let e = b.cli_err(&["plugin", "deploy", &example("hostile-fs")], None);
    assert!(e.contains("wasi:filesystem"), "{e}");
    assert_eq!(
        b.cli_ok(&["plugin", "list", "--output", "json"]).trim(),
        "[]"
    );
}

/// Sends one fetch with `processor` straight to the broker and times it.
async fn timed_fetch(
    client: &Client,
    topic: &str,
    offset: i64,
    processor: &str,
) -> (Duration, quiver_client::Result<Bytes>) {
    let req = FetchRequest {
        topic: topic.into(),
        partition: 0,
        offset,
        max_bytes: 1 << 20,
        max_wait_ms: 0,
        min_bytes: 1,
        processor: Some(ProcessorSpec::parse(processor).unwrap()),
        isolation: Default::default(),
    };
    let start = Instant::now();
    let r = client
        .request_for_partition(topic, 0, &req, Bytes::new(), Duration::from_secs(10))
        .await
        .map(|(_, p)| p);
    (start.elapsed(), r)
}

#[test]
fn a_hostile_processor_is_stopped_at_its_limits_while_other_clients_keep_working() {
    let b = TestBroker::start_with_config("[plugins]\ncpu_ms = 100\nmemory_mb = 32\n");
    b.cli_ok(&["plugin", "deploy", &example("hostile")]);
    b.cli_ok(&["plugin", "deploy", &example("grep")]);
    b.cli_ok(&["topic", "create", "abuse"]);
    b.cli_ok(&["topic", "create", "normal"]);
    // offset 0: infinite loop; offset 1: memory bomb.
    b.cli_with_stdin(&["produce", "abuse"], Some(b"loop\nalloc\n"));
    b.cli_with_stdin(&["produce", "normal"], Some(b"ERROR one\n"));
    let rt = runtime();
    let client = rt
        .block_on(Client::connect(b.client_config()))
        .expect("connect");
    // Warm up: connection and metadata, and one processor instance built.
    rt.block_on(timed_fetch(&client, "normal", 0, "grep"))
        .1
        .expect("warm-up fetch");
    let rss_before = b.rss_kib();
    for round in 0..3 {
        let (took, r) = rt.block_on(timed_fetch(&client, "abuse", 0, "hostile"));
        let e = r.expect_err("an infinite loop cannot succeed").to_string();
        assert!(e.contains("PluginFailed"), "{e}");
        assert!(e.contains("hostile@1.0.0"), "{e}");
        if !e.contains("quarantined") {
            assert!(e.contains("CPU limit of 100 ms"), "{e}");
            // Stopped, not left running: far below the request timeout on any machine
            // (the exact stop time is the plugin limits' own unit tests' business).
            assert!(
                took < Duration::from_secs(10),
                "round {round}: the loop ran {took:?} against a CPU limit of 100 ms"
            );
        }
        let (_, r) = rt.block_on(timed_fetch(&client, "abuse", 1, "hostile"));
        let e = r.expect_err("a memory bomb cannot succeed").to_string();
        // Usually the memory limit stops it; on a slow or busy machine the bomb can use up
        // its 100 ms of CPU before it reaches 32 MiB. Either limit stopping it is the
        // sandbox working (each limit's exact behaviour is the plugin host's unit tests').
        assert!(
            e.contains("memory limit of 32 MiB")
                || e.contains("CPU limit of 100 ms")
                || e.contains("quarantined"),
            "{e}"
        );
        // Another client, the CLI, on the same broker: produce and consume work.
        b.cli_with_stdin(
            &["produce", "normal"],
            Some(format!("ERROR {round}\n").as_bytes()),
        );
        let got = b.cli_ok(&[
            "consume",
            "normal",
            "--from-beginning",
            "--processor",
            "grep",
        ]);
        assert_eq!(got.lines().count(), round + 2, "{got}");
    }
    let plain = b.cli_ok(&["consume", "abuse", "--from-beginning"]);
    assert_eq!(plain, "loop\nalloc\n");
    let rss_after = b.rss_kib();
    // Loose: the bombs' memory (32 MiB each) is given back, not kept per failure.
    assert!(
        rss_after < rss_before + 48 * 1024,
        "broker RSS went from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn a_lua_plugin_stuck_in_pattern_matching_fails_alone_while_everything_else_goes_on() {
    let b = TestBroker::start();
    b.cli_ok(&["plugin", "deploy", &example("backtrack")]);
    b.cli_ok(&["topic", "create", "stuck"]);
    b.cli_stdin_ok(&["produce", "stuck"], b"x\ny\n");
    b.cli_ok(&["topic", "create", "other"]);
    let addr = b.addr();
    let ca = b.ca();
    // Three consumers keep calling the hostile processor.
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let (addr, ca) = (addr.clone(), ca.clone());
            std::thread::spawn(move || {
                (0..3)
                    .map(|_| {
                        let out = super::harness::cli_at(
                            &addr,
                            &ca,
                            &[
                                "consume",
                                "stuck",
                                "--from-beginning",
                                "--processor",
                                "backtrack",
                                "--max-messages",
                                "1",
                            ],
                            None,
                        );
                        assert!(
                            !out.status.success(),
                            "the hostile processor cannot succeed"
                        );
                        String::from_utf8_lossy(&out.stderr).into_owned()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // Meanwhile produce and consume on another topic go on.
    let mut expect = String::new();
    for i in 0..10 {
        let line = format!("round {i}\n");
        b.cli_stdin_ok(&["produce", "other"], line.as_bytes());
        expect.push_str(&line);
        assert_eq!(b.cli_ok(&["consume", "other", "--from-beginning"]), expect);
    }
    for c in consumers {
        for e in c.join().expect("consumer thread") {
            assert!(e.contains("PluginFailed"), "{e}");
        }
    }
    b.cli_ok(&["topic", "list"]);
}
