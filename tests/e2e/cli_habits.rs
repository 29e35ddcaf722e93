//! Kafka habits in the CLI: `consume --group G --from-beginning` starts a group without
//! committed offsets at the earliest record, `consume --follow --timeout-ms` ends once
//! nothing new comes, `quiver completions SHELL` prints a script, and
//! output piped into a reader that stops early (`| head`) ends quietly, as for `cat`, and
//! `consume --output json` keeps keys and values that are not UTF-8 exact, in base64.

use std::time::{Duration, Instant};

use super::harness::{bin, TestBroker};

#[test]
fn consume_with_a_group_from_the_beginning_reads_everything_and_commits() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "habits"]);
    let summary: serde_json::Value = serde_json::from_str(
        &b.cli_stdin_ok(&["produce", "habits", "--output", "json"], b"a\nb\nc\n"),
    )
    .expect("one JSON summary on stdout");
    assert_eq!(
        (&summary["records"], &summary["failed"]),
        (&3.into(), &0.into()),
        "{summary}"
    );
    let out = b.cli_ok(&[
        "consume",
        "habits",
        "--group",
        "fresh",
        "--from-beginning",
        "--max-messages",
        "3",
    ]);
    assert_eq!(out, "a\nb\nc\n");
    // The group's offset is committed (on leaving): poll for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d: serde_json::Value =
            serde_json::from_str(&b.cli_ok(&["group", "describe", "fresh", "--output", "json"]))
                .unwrap();
        if d["partitions"][0]["committed"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "offset never committed: {d}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Kafka's --timeout-ms: waiting for more than there is ends once nothing new comes,
    // with and without a group.
    let out = b.cli_ok(&[
        "consume",
        "habits",
        "--from-beginning",
        "--follow",
        "--max-messages",
        "10",
        "--timeout-ms",
        "1500",
    ]);
    assert_eq!(out, "a\nb\nc\n");
    let out = b.cli_ok(&[
        "consume",
        "habits",
        "--group",
        "late",
        "--from-beginning",
        "--follow",
        "--timeout-ms",
        // Long enough for the join and the first assignment on a slow machine.
        "10000",
    ]);
    assert_eq!(out, "a\nb\nc\n");
    // Starting at the end (Kafka's default) without --follow reads nothing, and says why.
    let out = b.cli(&["consume", "habits"]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let hint = String::from_utf8_lossy(&out.stderr);
    assert!(
        hint.contains("--from-beginning") && hint.contains("--follow"),
        "{hint}"
    );
}

#[test]
fn completions_print_a_script_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(bin())
            .args(["completions", shell])
            .output()
            .expect("run quiver");
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("quiver"), "{shell}");
        assert!(
            script.contains("broker") && script.contains("consume"),
            "{shell}"
        );
    }
    let bad = std::process::Command::new(bin())
        .args(["completions", "powershell-9000"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn pipeline_validate_accepts_the_sample_and_names_file_line_and_key_of_a_typo() {
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pipeline.toml");
    let out = std::process::Command::new(bin())
        .args([
            "pipeline",
            "validate",
            sample.to_str().unwrap(),
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    super::harness::succeeded(&out);
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["name"], "wordcount");
    assert_eq!(p["run"]["guarantee"], "exactly-once");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\n[source]\ntopics = [\"in\"]\n[sink]\ntopic = \"out\"\n[run]\ninstences = 2\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["pipeline", "validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:7: run.instences"), "{err}");
    // A stage's bundle is loaded too: a path that leads nowhere is named (it passed before).
    let nowhere = dir.path().join("nowhere.toml");
    std::fs::write(
        &nowhere,
        "name = \"n\"\n[source]\ntopics = [\"in\"]\n[[stages]]\npath = \"no-such-bundle\"\n[sink]\ntopic = \"out\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["pipeline", "validate", nowhere.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nowhere.toml:5: stages[0].path: cannot load bundle"),
        "{err}"
    );
}

#[test]
fn output_piped_into_a_reader_that_stops_early_is_not_an_error() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "piped", "--partitions", "3"]);
    // The reader is gone before the command writes (`quiver topic describe … | head -0`).
    let mut child = std::process::Command::new(bin())
        .arg("--bootstrap")
        .arg(b.addr())
        .arg("--ca")
        .arg(b.ca())
        .args(["topic", "describe", "piped"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cli");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("cli output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn json_output_keeps_binary_keys_and_values_exact_in_base64() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "bin", "--partitions", "1"]);
    b.cli_stdin_ok(
        &["produce", "bin", "--key-separator", ":"],
        b"k\xff:v\xfe\x00\nplain:text\n",
    );
    let out = b.cli_ok(&["consume", "bin", "--from-beginning", "--output", "json"]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    // Bytes that are not UTF-8: the text as before, and the exact bytes beside it.
    assert_eq!(lines[0]["key_base64"], "a/8=", "{out}");
    assert_eq!(lines[0]["value_base64"], "dv4A", "{out}");
    assert_eq!(lines[0]["value"], "v\u{fffd}\u{0}");
    // UTF-8 records carry no base64 fields.
    assert_eq!(lines[1]["key"], "plain");
    assert_eq!(lines[1]["value"], "text");
    assert!(lines[1].get("value_base64").is_none(), "{out}");
    assert!(lines[1].get("key_base64").is_none(), "{out}");
}

#[test]
fn cluster_describe_answers_for_a_lone_broker_too() {
    let b = TestBroker::start();
    let json: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["cluster", "describe", "--output", "json"])).unwrap();
    assert_eq!(json["clustered"], false, "{json}");
    assert!(json["broker"].as_u64().is_some(), "{json}");
    let table = b.cli_ok(&["cluster", "describe"]);
    assert!(table.contains("runs alone"), "{table}");
}

/// `pipeline run --instances` is bounded as the file's `[run] instances` is: 100,000
/// group members in one process are refused before anything starts.
#[test]
fn pipeline_run_instances_are_bounded_like_the_files() {
    for n in ["0", "100000"] {
        let out = std::process::Command::new(bin())
            .args(["pipeline", "run", "no-such.toml", "--instances", n])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--instances {n} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--instances") && err.contains("1..=1024"),
            "{err}"
        );
    }
}

/// Messages a user's slip should get (found by a black-box test): a partition count of 0,
/// an address without a port (a typo, not a broker that is down), a port another broker
/// holds (its cause said once, not three times); and `topic create --output json`.
#[test]
fn slips_get_messages_about_the_slip() {
    let b = TestBroker::start();
    let e = b.cli_err(&["topic", "create", "none", "--partitions", "0"], None);
    assert!(e.contains("must be at least 1"), "{e}");
    let created: serde_json::Value = serde_json::from_str(&b.cli_ok(&[
        "topic",
        "create",
        "made",
        "--partitions",
        "2",
        "--output",
        "json",
    ]))
    .expect("one JSON document");
    assert_eq!(created["name"], "made", "{created}");
    assert_eq!(created["partitions"].as_array().map(Vec::len), Some(2));
    let out = std::process::Command::new(bin())
        .args(["--bootstrap", "127.0.0.1", "topic", "list"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("HOST:PORT") && !e.contains("is a broker running"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["broker", "start", "--listen", &b.addr(), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert_eq!(e.matches("Address already in use").count(), 1, "{e}");
}
