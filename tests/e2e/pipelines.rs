//! Pipelines end to end, with real processes: `quiver pipeline deploy` runs a pipeline inside
//! the broker (dead letters with their error, `quiver.source` on every output, status with
//! counters and lag, kept across a broker restart, `stop` leaves the group empty), and
//! `quiver pipeline run` copies split the input partitions of one group, a fourth copy
//! taking its share with nothing lost.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::harness::{
    bin, describe_now, example, json_lines, read_committed_args, settled, succeeded, unsafe_kill,
    wait_for, KeepLogsOnFailure, TestBroker,
};

/// A Lua processor that refuses records whose value contains "bad" and upper-cases the rest.
const PICKY: &str = r#"
function process(record)
  if string.find(record.value, "bad", 1, true) then error("refusing " .. record.value) end
  return { key = record.key, value = string.upper(record.value) }
end
"#;

pub(super) fn write_picky(dir: &Path) {
    let d = dir.join("picky");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("plugin.toml"),
        "name = \"picky\"\nversion = \"1.0.0\"\nkind = \"processor\"\nruntime = \"lua\"\nentry = \"picky.lua\"\n",
    )
    .unwrap();
    std::fs::write(d.join("picky.lua"), PICKY).unwrap();
}

fn produce_lines(b: &TestBroker, topic: &str, lines: &[String]) {
    let input = lines.join("\n") + "\n";
    b.cli_stdin_ok(
        &["produce", topic, "--key-separator", ":"],
        input.as_bytes(),
    );
}

/// Writes `text` as the pipeline file `NAME.toml` in `dir`; returns its path.
fn pipeline_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    file
}

/// Every record of `topic` (up to `n`), as JSON.
fn read_topic(b: &TestBroker, topic: &str, n: usize) -> Vec<Value> {
    json_lines(&b.cli_ok(&[
        "consume",
        topic,
        "--from-beginning",
        "--max-messages",
        &n.to_string(),
        "--output",
        "json",
    ]))
}

fn status(b: &TestBroker, name: &str) -> Value {
    serde_json::from_str(&b.cli_ok(&["pipeline", "status", name, "--output", "json"]))
        .expect("status json")
}

fn header<'a>(r: &'a Value, name: &str) -> &'a str {
    r["headers"][name]
        .as_str()
        .unwrap_or_else(|| panic!("record has no header {name}: {r}"))
}

/// The input record a `quiver.source` header points at must hold `value` (before the stage).
fn source_value(inputs: &BTreeMap<String, String>, r: &Value) -> String {
    inputs
        .get(header(r, "quiver.source"))
        .unwrap_or_else(|| panic!("quiver.source of {r} names no input record"))
        .clone()
}

/// The input values every record of `sink` came from (by its `quiver.source`), out of
/// `inputs` ([`by_position`]).
fn sink_sources(b: &TestBroker, inputs: &BTreeMap<String, String>, sink: &str) -> BTreeSet<String> {
    read_topic(b, sink, b.total_log_end(sink) as usize)
        .iter()
        .map(|r| source_value(inputs, r))
        .collect()
}

/// `topic/partition/offset` → value of every record of `topic`.
fn by_position(records: &[Value]) -> BTreeMap<String, String> {
    records
        .iter()
        .map(|r| {
            (
                format!(
                    "{}/{}/{}",
                    r["topic"].as_str().unwrap(),
                    r["partition"],
                    r["offset"]
                ),
                r["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn deployed_pipeline_dead_letters_failures_reports_status_survives_a_restart_and_stops() {
    let mut b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    write_picky(dir.path());
    for (t, n) in [("in", "3"), ("out", "3"), ("dlq", "1")] {
        b.cli_ok(&["topic", "create", t, "--partitions", n]);
    }
    let lines: Vec<String> = (1..=1000)
        .map(|i| {
            if i % 50 == 0 {
                format!("k{i}:bad{i}")
            } else {
                format!("k{i}:v{i}")
            }
        })
        .collect();
    produce_lines(&b, "in", &lines);
    let file = pipeline_file(dir.path(), "upper", "name = \"upper\"\n[source]\ntopics = [\"in\"]\n[[stages]]\npath = \"picky\"\n[sink]\ntopic = \"out\"\ncompression = \"lz4\"\n[on_error]\npolicy = \"dead-letter\"\ntopic = \"dlq\"\n[run]\ninstances = 2\n");
    // JSON for scripts: one document, even when a stage bundle is deployed on the way.
    let out = b.cli_ok(&[
        "pipeline",
        "deploy",
        file.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let d: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(
        (&d["name"], &d["instances"], &d["group"]),
        (&"upper".into(), &2.into(), &"upper".into()),
        "{d}"
    );
    assert!(
        d["plugins_deployed"][0]["plugin"]
            .as_str()
            .is_some_and(|p| p.starts_with("picky@")),
        "{d}"
    );
    // The plugin names the pipeline among its users (it said "nothing" before, while its
    // removal was refused as in use).
    let described: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["plugin", "describe", "picky", "--output", "json"]))
            .expect("describe json");
    assert_eq!(described["used_by"], serde_json::json!(["pipeline upper"]));
    wait_for(60, "the pipeline to process 1,000 records", || {
        let s = status(&b, "upper");
        s["records_in"] == 1000 && s["lag"] == 0
    });
    let s = status(&b, "upper");
    for field in [
        "name",
        "state",
        "guarantee",
        "instances",
        "records_in",
        "records_out",
        "records_per_sec_in",
        "records_per_sec_out",
        "lag",
        "errors",
        "dead_lettered",
    ] {
        assert!(!s[field].is_null(), "status lacks {field}: {s}");
    }
    assert_eq!(s["state"], "running");
    assert_eq!(s["guarantee"], "at-least-once");
    assert_eq!(
        (&s["records_out"], &s["errors"], &s["dead_lettered"]),
        (&Value::from(980), &Value::from(20), &Value::from(20)),
        "{s}"
    );
    let instances = s["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{s}");
    let owned: BTreeSet<&str> = instances
        .iter()
        .flat_map(|i| i["partitions"].as_array().unwrap())
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(owned, BTreeSet::from(["in/0", "in/1", "in/2"]), "{s}");

    let inputs = by_position(&read_topic(&b, "in", 1000));
    let sink = read_topic(&b, "out", 980);
    assert_eq!(sink.len(), 980);
    for r in &sink {
        let original = source_value(&inputs, r);
        assert_eq!(r["value"].as_str().unwrap(), original.to_uppercase(), "{r}");
    }
    let dead = read_topic(&b, "dlq", 20);
    assert_eq!(dead.len(), 20);
    for r in &dead {
        let v = r["value"].as_str().unwrap();
        assert!(v.starts_with("bad"), "{r}");
        assert_eq!(source_value(&inputs, r), v);
        assert!(
            header(r, "quiver.error").contains(&format!("refusing {v}")),
            "{r}"
        );
        assert_eq!(header(r, "quiver.stage"), "0:picky@1.0.0");
    }

    // A restart: the pipeline comes back by itself and goes on from its commits. Its
    // counters are committed with its offsets, so they go on from there too (they started
    // again at 0 when they lived in the broker's memory).
    b.terminate();
    b.spawn();
    let more: Vec<String> = (1001..=1100).map(|i| format!("k{i}:v{i}")).collect();
    produce_lines(&b, "in", &more);
    wait_for(
        60,
        "the resumed pipeline to process 100 new records",
        || {
            let out = b.cli(&["pipeline", "status", "upper", "--output", "json"]);
            serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|s| s["records_in"] == 1100 && s["lag"] == 0)
        },
    );
    let s = status(&b, "upper");
    assert_eq!(
        (&s["records_out"], &s["errors"], &s["dead_lettered"]),
        (&Value::from(1080), &Value::from(20), &Value::from(20)),
        "the counters went on from before the restart: {s}"
    );
    let sink = read_topic(&b, "out", 1080);
    let values: BTreeSet<&str> = sink.iter().map(|r| r["value"].as_str().unwrap()).collect();
    assert_eq!(sink.len(), 1080, "a clean restart writes nothing twice");
    assert_eq!(values.len(), 1080);

    let list = b.cli_ok(&["pipeline", "list"]);
    assert!(list.contains("upper") && list.contains("running"), "{list}");
    // Its plugin stays while it runs: removed, the pipeline could not start again.
    let err = b.cli_err(&["plugin", "remove", "picky@1.0.0"], None);
    assert!(err.contains("in use by pipeline upper"), "{err}");
    let stopped = b.cli_ok(&["pipeline", "stop", "upper"]);
    assert!(stopped.contains("2 instance"), "{stopped}");
    wait_for(20, "the group to have no members", || {
        describe_now(&b, "upper")["members"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    let err = b.cli_err(&["pipeline", "status", "upper"], None);
    assert!(err.contains("no pipeline named \"upper\""), "{err}");
    // Stopped means forgotten: it does not come back with the broker.
    b.terminate();
    b.spawn();
    let list = b.cli_ok(&["pipeline", "list", "--output", "json"]);
    assert_eq!(list.trim(), "[]");
    b.cli_ok(&["plugin", "remove", "picky@1.0.0"]);
}

#[test]
fn bad_deploys_are_refused_with_the_reason_and_a_stop_policy_failure_shows_in_the_status() {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    write_picky(dir.path());
    for t in ["src", "dst"] {
        b.cli_ok(&["topic", "create", t, "--partitions", "1"]);
    }
    let write = |name: &str, extra: &str| {
        pipeline_file(
            dir.path(),
            name,
            &format!(
                "name = \"{name}\"\n[source]\ntopics = [\"src\"]\n{extra}[sink]\ntopic = \"dst\"\n"
            ),
        )
    };
    let f = write("eo", "[run]\nguarantee = \"twice\"\n");
    let err = b.cli_err(&["pipeline", "deploy", f.to_str().unwrap()], None);
    assert!(
        err.contains("run.guarantee") || err.contains("twice"),
        "{err}"
    );
    let f = write("ghost", "[[stages]]\nplugin = \"ghost@1.0.0\"\n");
    let err = b.cli_err(&["pipeline", "deploy", f.to_str().unwrap()], None);
    assert!(err.contains("ghost"), "{err}");
    let f = write("typo", "colour = \"blue\"\n");
    let err = b.cli_err(&["pipeline", "deploy", f.to_str().unwrap()], None);
    assert!(err.contains("colour"), "{err}");
    // A stage config key its plugin does not declare: refused with the keys it takes,
    // where the pipeline would otherwise run on the default in silence.
    let grep = super::harness::examples().join("grep");
    let f = write(
        "misspelt",
        &format!(
            "[[stages]]\npath = {:?}\nconfig = {{ patern = \"ERROR\" }}\n",
            grep.to_str().unwrap()
        ),
    );
    for verb in ["run", "deploy"] {
        let err = b.cli_err(&["pipeline", verb, f.to_str().unwrap()], None);
        assert!(
            err.contains("\"patern\"") && err.contains("it takes: pattern"),
            "{verb}: {err}"
        );
    }
    // A valid file padded past what a broker keeps (sent as is: the CLI would rewrite it
    // without its comments): refused with the limit, and nothing is deployed.
    let huge = format!(
        "name = \"huge\"\n[source]\ntopics = [\"src\"]\n[sink]\ntopic = \"dst\"\n# {}\n",
        "x".repeat(300 * 1024)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let client = quiver_client::Client::connect(b.client_config())
            .await
            .unwrap();
        client
            .request(
                &quiver_protocol::requests::DeployPipelineRequest { config_toml: huge },
                bytes::Bytes::new(),
            )
            .await
    });
    let err = answer.expect_err("an oversized pipeline file is refused");
    assert_eq!(
        err.code(),
        Some(quiver_protocol::ErrorCode::InvalidPipeline),
        "{err}"
    );
    assert!(err.to_string().contains("at most 262144 bytes"), "{err}");
    let listed = b.cli_ok(&["pipeline", "list", "--output", "json"]);
    assert!(!listed.contains("huge"), "{listed}");
    let f = pipeline_file(
        dir.path(),
        "nowhere",
        "name = \"nowhere\"\n[source]\ntopics = [\"src\"]\n[sink]\ntopic = \"missing\"\n",
    );
    let err = b.cli_err(&["pipeline", "deploy", f.to_str().unwrap()], None);
    assert!(
        err.contains("\"missing\" (sink.topic) does not exist")
            && err.contains("quiver topic create missing"),
        "{err}"
    );
    let out = b.cli(&["pipeline", "run", f.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "pipeline run refuses a missing sink at once"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    let list = b.cli_ok(&["pipeline", "list", "--output", "json"]);
    assert_eq!(list.trim(), "[]", "a refused deploy leaves nothing behind");
    // Its `path` stages' bundles included: the topics are checked before any is deployed
    // (the plugin stayed deployed before).
    let f = pipeline_file(dir.path(), "nowhere-picky", "name = \"nowhere\"\n[source]\ntopics = [\"src\"]\n[[stages]]\npath = \"picky\"\n[sink]\ntopic = \"missing\"\n");
    let err = b.cli_err(&["pipeline", "deploy", f.to_str().unwrap()], None);
    assert!(
        err.contains("\"missing\" (sink.topic) does not exist"),
        "{err}"
    );
    let plugins = b.cli_ok(&["plugin", "list", "--output", "json"]);
    assert!(!plugins.contains("picky"), "{plugins}");

    // Policy "stop": the failing record stops the pipeline, and its offset is not committed.
    produce_lines(&b, "src", &["a:ok1".into(), "b:bad".into(), "c:ok2".into()]);
    let f = write("strict", "[[stages]]\npath = \"picky\"\n");
    b.cli_ok(&["pipeline", "deploy", f.to_str().unwrap()]);
    wait_for(30, "the pipeline to fail", || {
        status(&b, "strict")["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed:") && s.contains("refusing bad"))
    });
    let s = status(&b, "strict");
    assert_eq!(s["instances"].as_array().unwrap().len(), 0, "{s}");
    // The reason apart from the state's word, on one line (Lua's message and position, no
    // traceback), with the way past failing records; the failure counts as an error.
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        s["state"].as_str() == Some(&format!("failed: {reason}"))
            && reason.contains("picky.lua:3: refusing bad")
            && !reason.contains('\n')
            && reason.contains("\"dead-letter\""),
        "{s}"
    );
    assert_eq!(s["errors"], 1, "{s}");
    let list = b.cli_ok(&["pipeline", "list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with("strict"))
        .unwrap_or_default();
    assert_eq!(
        row.split_whitespace().nth(1),
        Some("failed"),
        "the STATE column holds the word: {list}"
    );
    // The failing record and everything after it stay uncommitted and unwritten (a record
    // before it may have come in an earlier poll and been committed).
    let lag = s["lag"].as_i64().unwrap();
    assert!(lag >= 2, "the failed record is not committed: {s}");
    assert_eq!(
        b.total_log_end("dst"),
        3 - lag,
        "only committed input was written"
    );
    let stopped: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["pipeline", "stop", "strict", "--output", "json"]))
            .expect("json");
    assert_eq!(
        (&stopped["name"], &stopped["stopped"]),
        (&"strict".into(), &true.into()),
        "{stopped}"
    );
}

/// A `quiver pipeline run FILE` process; killed on drop.
struct Runner(Child);

impl Runner {
    fn spawn(b: &TestBroker, file: &Path, log: &Path) -> Runner {
        Self::spawn_with(b, file, log, &[])
    }

    /// With extra environment variables (fault injection).
    fn spawn_with(b: &TestBroker, file: &Path, log: &Path, env: &[(&str, &str)]) -> Runner {
        let child = Command::new(bin())
            .envs(env.iter().copied())
            .arg("--bootstrap")
            .arg(b.addr())
            .arg("--ca")
            .arg(b.ca())
            .args(["pipeline", "run"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn pipeline run");
        Runner(child)
    }

    /// SIGTERM: commits what it finished, leaves the group, exits 0.
    fn stop(&mut self) -> bool {
        unsafe_kill(self.0.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Members and the partitions each owns, from `group describe`.
fn owners(d: &Value) -> Vec<BTreeSet<u64>> {
    d["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["assigned"]
                .as_array()
                .unwrap()
                .iter()
                .map(|tp| tp["partition"].as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn pipeline_run_copies_split_the_partitions_and_a_fourth_takes_its_share_losing_nothing() {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    b.cli_ok(&["topic", "create", "lines", "--partitions", "6"]);
    b.cli_ok(&["topic", "create", "copies", "--partitions", "2"]);
    let file = pipeline_file(
        dir.path(),
        "copy",
        "name = \"copy\"\n[source]\ntopics = [\"lines\"]\n[sink]\ntopic = \"copies\"\n",
    );
    let mut runners: Vec<Runner> = (0..3)
        .map(|i| Runner::spawn(&b, &file, &dir.path().join(format!("run{i}.log"))))
        .collect();
    wait_for(60, "three copies to share the six partitions", || {
        settled(&describe_now(&b, "copy"), 3)
    });
    let d = describe_now(&b, "copy");
    let split = owners(&d);
    assert!(
        split.iter().all(|p| p.len() == 2),
        "each copy reads 2 of 6: {d}"
    );
    let all: BTreeSet<u64> = split.iter().flatten().copied().collect();
    assert_eq!(all.len(), 6, "each partition is read by one copy: {d}");

    let first: Vec<String> = (0..600).map(|i| format!("k{i}:v{i}")).collect();
    produce_lines(&b, "lines", &first);
    wait_for(60, "the first 600 records in the sink", || {
        b.total_log_end("copies") >= 600
    });
    runners.push(Runner::spawn(&b, &file, &dir.path().join("run3.log")));
    wait_for(60, "four copies to share the partitions", || {
        let d = describe_now(&b, "copy");
        settled(&d, 4) && owners(&d).iter().all(|p| !p.is_empty())
    });
    let second: Vec<String> = (600..1200).map(|i| format!("k{i}:v{i}")).collect();
    produce_lines(&b, "lines", &second);
    wait_for(60, "all 1,200 records in the sink", || {
        b.total_log_end("copies") >= 1200
    });
    // The copies' members say what they are and where they run; `pipeline status` of the
    // pipeline nobody deployed points to them.
    let d = describe_now(&b, "copy");
    for m in d["members"].as_array().unwrap() {
        let client = m["client_id"].as_str().unwrap();
        assert!(
            client.starts_with("pipeline run copy-1 on ") && client.contains(" (pid "),
            "{d}"
        );
    }
    let out = b.cli(&["pipeline", "status", "copy"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pipeline copy is not deployed, but 4 `quiver pipeline run` copies of it are running (copy-1 on ")
            && err.contains("in group copy); `quiver group describe copy` shows"),
        "{err}"
    );
    // Deployed beside them: the status lists its instance and the copies, apart, and counts
    // the records the copies committed (the counters are the group's, not the instance's).
    b.cli_ok(&["pipeline", "deploy", file.to_str().unwrap()]);
    wait_for(60, "five members share the partitions", || {
        settled(&describe_now(&b, "copy"), 5)
    });
    wait_for(
        60,
        "the status shows the deployed instance, the 4 copies and their 1,200 records",
        || {
            let s = status(&b, "copy");
            let parts = |list: &Value| -> Vec<String> {
                list.as_array().map_or(Vec::new(), |l| {
                    l.iter()
                        .flat_map(|i| i["partitions"].as_array().cloned().unwrap_or_default())
                        .map(|p| p.as_str().unwrap().to_string())
                        .collect()
                })
            };
            let mut all = parts(&s["instances"]);
            all.extend(parts(&s["run_copies"]));
            all.sort();
            s["instances"].as_array().map(Vec::len) == Some(1)
                && s["run_copies"].as_array().map(Vec::len) == Some(4)
                && s["records_in"] == 1200
                && s["records_out"] == 1200
                && s["lag"] == 0
                && all == (0..6).map(|p| format!("lines/{p}")).collect::<Vec<_>>()
        },
    );
    // Stopping the deployed part tells of the copies left running; stopping again says
    // where they run.
    let out = b.cli(&["pipeline", "stop", "copy"]);
    succeeded(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "note: pipeline copy stopped, but 4 `quiver pipeline run` copies of it are running"
        ),
        "{err}"
    );
    let out = b.cli(&["pipeline", "stop", "copy"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "cannot stop pipeline copy: it is not deployed, but 4 `quiver pipeline run` copies"
        ) && err.contains("stop each where it runs"),
        "{err}"
    );
    for r in &mut runners {
        assert!(r.stop(), "pipeline run exits cleanly on SIGTERM");
    }
    let d = describe_now(&b, "copy");
    assert!(d["members"].as_array().unwrap().is_empty(), "{d}");
    assert!(
        d["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["lag"] == 0),
        "every input committed: {d}"
    );
    let inputs = by_position(&read_topic(&b, "lines", 1200));
    let seen = sink_sources(&b, &inputs, "copies");
    let expected: BTreeSet<String> = (0..1200).map(|i| format!("v{i}")).collect();
    assert_eq!(seen, expected, "every input reached the sink");
}

/// A copy of a pipeline whose `[source] group` is not its name is found by the pipeline's
/// name, in that group; the group's name is not taken for a pipeline's.
#[test]
fn a_run_copy_in_a_group_of_another_name_is_found_by_its_pipelines_name() {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    b.cli_ok(&["topic", "create", "in", "--partitions", "2"]);
    b.cli_ok(&["topic", "create", "out", "--partitions", "1"]);
    let file = pipeline_file(dir.path(), "pf", "name = \"pf\"\n[source]\ntopics = [\"in\"]\ngroup = \"shared-g\"\n[sink]\ntopic = \"out\"\n");
    let mut runner = Runner::spawn(&b, &file, &dir.path().join("run.log"));
    wait_for(60, "the copy to own both partitions", || {
        settled(&describe_now(&b, "shared-g"), 1)
    });
    let out = b.cli(&["pipeline", "status", "pf"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pipeline pf is not deployed, but 1 `quiver pipeline run` copy of it is running (pf-1 on ")
            && err.contains("in group shared-g); `quiver group describe shared-g`"),
        "{err}"
    );
    let out = b.cli(&["pipeline", "status", "shared-g"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no pipeline named \"shared-g\" is deployed") && !err.contains("pf-1"),
        "{err}"
    );
    assert!(runner.stop(), "pipeline run exits cleanly on SIGTERM");
}

/// A reader of the pipeline's group that is not the pipeline (here `consume --group`) takes
/// input partitions from it: `pipeline status` names it, with what it owns, apart from the
/// instances (before, those partitions were simply missing from the status).
#[test]
fn pipeline_status_names_members_of_its_group_that_are_not_the_pipelines() {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    b.cli_ok(&["topic", "create", "in", "--partitions", "2"]);
    b.cli_ok(&["topic", "create", "out", "--partitions", "1"]);
    deploy_copying(&b, dir.path(), "shared", "in", "out", "at-least-once");
    wait_for(60, "the instance to own both partitions", || {
        settled(&describe_now(&b, "shared"), 1)
    });
    let mut reader = Command::new(bin())
        .arg("--bootstrap")
        .arg(b.addr())
        .arg("--ca")
        .arg(b.ca())
        .args(["consume", "in", "--group", "shared", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn consume");
    wait_for(
        60,
        "the reader and the instance to own one partition each",
        || {
            let s = status(&b, "shared");
            let owned = |list: &Value| {
                list.as_array().map_or(0, |l| {
                    l.iter()
                        .map(|m| m["partitions"].as_array().map_or(0, Vec::len))
                        .sum::<usize>()
                })
            };
            s["other_members"].as_array().map(Vec::len) == Some(1)
                && owned(&s["other_members"]) == 1
                && owned(&s["instances"]) == 1
        },
    );
    let s = status(&b, "shared");
    let other = &s["other_members"][0];
    assert!(
        other["client_id"]
            .as_str()
            .is_some_and(|c| c.starts_with("quiver-cli")),
        "{s}"
    );
    assert!(
        other["member_id"].as_str().is_some_and(|m| !m.is_empty()),
        "{s}"
    );
    assert_eq!(s["run_copies"], serde_json::json!([]), "{s}");
    let table = b.cli_ok(&["pipeline", "status", "shared"]);
    assert!(
        table.contains(
            "other members of its group (not this pipeline's; they take input partitions from it):"
        ),
        "{table}"
    );
    let _ = reader.kill();
    let _ = reader.wait();
    // `list` does not read the groups: neither field.
    let list: Value =
        serde_json::from_str(&b.cli_ok(&["pipeline", "list", "--output", "json"])).unwrap();
    assert!(
        list[0].get("other_members").is_none() && list[0].get("run_copies").is_none(),
        "{list}"
    );
}

/// A pipeline that starts at the latest records reads partitions its input gains while it
/// runs from their first record: they were all written after it began. Before, a new
/// partition had no committed offset, so its instance started it at the latest record and
/// skipped what was written before it noticed the partition (27 of 40 records arrived).
/// Partitions added while the pipeline is stopped are read from their start too.
#[test]
fn partitions_added_to_the_input_of_a_latest_pipeline_are_read_from_their_start() {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    b.cli_ok(&["topic", "create", "grow", "--partitions", "2"]);
    b.cli_ok(&["topic", "create", "grown", "--partitions", "1"]);
    let file = pipeline_file(dir.path(), "late", "name = \"late\"\n[source]\ntopics = [\"grow\"]\nstart = \"latest\"\n[sink]\ntopic = \"grown\"\n");
    b.cli_ok(&["pipeline", "deploy", file.to_str().unwrap()]);
    wait_for(60, "the instance to own both partitions, committed", || {
        let d = describe_now(&b, "late");
        settled(&d, 1)
            && d["partitions"]
                .as_array()
                .is_some_and(|ps| ps.len() == 2 && ps.iter().all(|p| !p["committed"].is_null()))
    });
    let first: Vec<String> = (0..10).map(|i| format!("k{i}:v{i}")).collect();
    produce_lines(&b, "grow", &first);
    wait_for(60, "the first 10 records in the sink", || {
        b.total_log_end("grown") >= 10
    });
    b.cli_ok(&["topic", "alter", "grow", "--partitions", "4"]);
    let more: Vec<String> = (10..50).map(|i| format!("k{i}:v{i}")).collect();
    produce_lines(&b, "grow", &more);
    let inputs = by_position(&read_topic(&b, "grow", 50));
    let new_partitions = inputs
        .keys()
        .filter(|k| k.starts_with("grow/2/") || k.starts_with("grow/3/"))
        .count();
    assert!(
        new_partitions > 0,
        "some records went to the new partitions: {inputs:?}"
    );
    let expected: BTreeSet<String> = (0..50).map(|i| format!("v{i}")).collect();
    wait_for(
        60,
        "every record, new partitions included, in the sink",
        || sink_sources(&b, &inputs, "grown") == expected,
    );
    // The same with the pipeline stopped while the topic grows, so no member can notice
    // the new partitions before their records come: whatever the machine's speed, they
    // are read only if the group was started at offset 0 there.
    b.cli_ok(&["pipeline", "stop", "late"]);
    wait_for(20, "the group to have no members", || {
        describe_now(&b, "late")["members"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    b.cli_ok(&["topic", "alter", "grow", "--partitions", "6"]);
    let later: Vec<String> = (50..100).map(|i| format!("k{i}:v{i}")).collect();
    produce_lines(&b, "grow", &later);
    let inputs = by_position(&read_topic(&b, "grow", 100));
    assert!(
        inputs
            .keys()
            .any(|k| k.starts_with("grow/4/") || k.starts_with("grow/5/")),
        "some records went to the newest partitions: {inputs:?}"
    );
    b.cli_ok(&["pipeline", "deploy", file.to_str().unwrap()]);
    let expected: BTreeSet<String> = (0..100).map(|i| format!("v{i}")).collect();
    wait_for(
        60,
        "every record of the partitions added while stopped",
        || sink_sources(&b, &inputs, "grown") == expected,
    );
}

/// An output topic deleted while an at-least-once pipeline runs: the instance fails at
/// the poll that meets it, then waits for the topic before it reads anything again. Before,
/// every retry processed the poll again and wrote its other outputs once more (16 copies
/// of a record in 30 s); now they are written at most twice (the failed attempt's, and the
/// one after the topic is back).
#[test]
fn a_deleted_output_is_waited_for_without_writing_the_other_outputs_again() {
    let b = TestBroker::start_with_config("delete_topic_enable = true\ngroup_max_size = 3\n");
    let dir = tempfile::tempdir().unwrap();
    write_picky(dir.path());
    for t in ["in", "out", "dlq"] {
        b.cli_ok(&["topic", "create", t, "--partitions", "1"]);
    }
    // More instances than the group may have members: refused, where the extra ones used
    // to retry joining for ever.
    let many = pipeline_file(dir.path(), "many", "name = \"many\"\n[source]\ntopics = [\"in\"]\n[sink]\ntopic = \"out\"\n[run]\ninstances = 4\n");
    let err = b.cli_err(&["pipeline", "deploy", many.to_str().unwrap()], None);
    assert!(
        err.contains("instances = 4 is more than this broker's group_max_size (3)"),
        "{err}"
    );
    let file = pipeline_file(dir.path(), "dl", "name = \"dl\"\n[source]\ntopics = [\"in\"]\n[[stages]]\npath = \"picky\"\n[sink]\ntopic = \"out\"\n[on_error]\npolicy = \"dead-letter\"\ntopic = \"dlq\"\n");
    b.cli_ok(&["pipeline", "deploy", file.to_str().unwrap()]);
    wait_for(60, "the instance to own the partition", || {
        settled(&describe_now(&b, "dl"), 1)
    });
    b.cli_ok(&["topic", "delete", "dlq"]);
    produce_lines(&b, "in", &["a:ok1".into(), "b:bad1".into(), "c:ok2".into()]);
    let failures = |s: &Value| -> u64 {
        let state = s["state"].as_str().unwrap_or_default();
        state
            .split_once(" failed ")
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    wait_for(60, "the instance to fail at least 4 times in a row", || {
        let s = status(&b, "dl");
        s["state"]
            .as_str()
            .is_some_and(|st| st.starts_with("retrying"))
            && failures(&s) >= 4
    });
    let s = status(&b, "dl");
    assert!(
        s["state"].as_str().unwrap().contains("\"dlq\""),
        "the reason names the missing topic: {s}"
    );
    let written = b.total_log_end("out");
    assert!(
        written <= 2,
        "retries wrote the outputs again: {written} records in out"
    );
    b.cli_ok(&["topic", "create", "dlq", "--partitions", "1"]);
    wait_for(
        60,
        "the pipeline to run again and commit everything",
        || {
            let s = status(&b, "dl");
            s["state"] == "running" && s["lag"] == 0
        },
    );
    let out = read_topic(&b, "out", b.total_log_end("out") as usize);
    let values: BTreeSet<&str> = out.iter().map(|r| r["value"].as_str().unwrap()).collect();
    assert_eq!(values, BTreeSet::from(["OK1", "OK2"]));
    assert!(out.len() <= 4, "{out:?}");
    assert_eq!(read_topic(&b, "dlq", 1).len(), 1);
}

/// The group's committed offsets, summed (a partition without one counts 0): the records it
/// consumed, when it started at offset 0.
fn committed_total(b: &TestBroker, group: &str) -> i64 {
    describe_now(b, group)["partitions"]
        .as_array()
        .map_or(0, |ps| {
            ps.iter().filter_map(|p| p["committed"].as_i64()).sum()
        })
}

/// `pipeline run` stopped while its input flows reports the records it committed, and
/// stops at once. Before, the summary was read before the stop, missing the polls
/// completed while stopping; and under a backlog a poll kept taking the chunks its fetches
/// refilled, so one poll (one transaction) grew to hundreds of thousands of records, the
/// stop waited for it, and the summary said "0 record(s) in" with millions committed.
#[test]
fn pipeline_run_stopped_mid_stream_reports_the_records_it_committed() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    b.cli_ok(&["topic", "create", "backlog", "--partitions", "3"]);
    b.cli_ok(&["topic", "create", "drained", "--partitions", "3"]);
    let lines: Vec<String> = (0..200_000).map(|i| format!("k{i}:v{i}")).collect();
    produce_lines(&b, "backlog", &lines);
    // More input keeps coming until the pipeline has stopped, however fast it drains.
    let mut producer = Command::new(bin())
        .arg("--bootstrap")
        .arg(b.addr())
        .arg("--ca")
        .arg(b.ca())
        .args(["produce", "backlog"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn produce");
    let mut stdin = producer.stdin.take().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let feeding = {
        let done = done.clone();
        std::thread::spawn(move || {
            let chunk = "a line of input\n".repeat(1000);
            while !done.load(Ordering::Relaxed) && stdin.write_all(chunk.as_bytes()).is_ok() {}
        })
    };
    let file = pipeline_file(
        dir.path(),
        "drain",
        "name = \"drain\"\n[source]\ntopics = [\"backlog\"]\n[sink]\ntopic = \"drained\"\n\
         [run]\nguarantee = \"at-least-once\"\n",
    );
    let log = dir.path().join("run.log");
    let mut runner = Runner::spawn(&b, &file, &log);
    wait_for(60, "the pipeline's first commit", || {
        committed_total(&b, "drain") > 0
    });
    let stopped = runner.stop();
    done.store(true, Ordering::Relaxed);
    feeding.join().unwrap();
    let _ = producer.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(stopped, "pipeline run exits cleanly on SIGTERM: {text}");
    let reported: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("pipeline drain: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line in: {text}"));
    let committed = committed_total(&b, "drain");
    assert_eq!(
        reported, committed,
        "the summary counts every committed record: {text}"
    );
    assert!(b.total_log_end("drained") >= committed, "{text}");
}

/// `bench pipeline` against a broker deletes the topics and groups each measurement made
/// (a bench run left gigabytes behind before), unless `--keep-topics`.
#[test]
fn bench_pipeline_leaves_nothing_behind_unless_told_to_keep_it() {
    let b = TestBroker::start_with_config("delete_topic_enable = true\n");
    let stage = example("noop-filter");
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "pipeline",
            "--stage",
            &stage,
            "--records",
            "2000",
            "--output",
            "json",
        ];
        args.extend(extra);
        b.cli_ok(&args);
    };
    let listed = || -> Vec<String> {
        let v: Value =
            serde_json::from_str(&b.cli_ok(&["topic", "list", "--output", "json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .filter(|n| n.contains("bench-"))
            .collect()
    };
    let groups = || b.cli_ok(&["group", "list"]);
    bench(&[]);
    assert_eq!(listed(), Vec::<String>::new(), "every bench topic deleted");
    assert!(!groups().contains("bench-"), "{}", groups());
    bench(&["--keep-topics"]);
    let kept = listed();
    assert!(
        kept.iter().any(|t| t.ends_with("-produce"))
            && kept.iter().any(|t| t.ends_with("-none-out"))
            && kept.iter().any(|t| t.starts_with("quiver.state.")),
        "{kept:?}"
    );
}

/// Deploys pipeline `name` without stages, copying `from` to `to` under `guarantee` (its
/// file written in `dir`).
fn deploy_copying(b: &TestBroker, dir: &Path, name: &str, from: &str, to: &str, guarantee: &str) {
    let f = pipeline_file(
        dir,
        name,
        &format!("name = \"{name}\"\n[source]\ntopics = [\"{from}\"]\n[sink]\ntopic = \"{to}\"\n[run]\nguarantee = \"{guarantee}\"\n"),
    );
    b.cli_ok(&["pipeline", "deploy", f.to_str().unwrap()]);
}

/// A pipeline reading the output of an exactly-once pipeline catches up to lag 0: its
/// commits go past each transaction's marker. Before, every partition kept a lag of 1
/// (the marker after its last record), so "lag returns to 0" never held downstream.
#[test]
fn a_pipeline_reading_a_transactional_topic_catches_up_to_lag_zero() {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    for t in ["raw", "mid", "done"] {
        b.cli_ok(&["topic", "create", t, "--partitions", "2"]);
    }
    deploy_copying(&b, dir.path(), "first", "raw", "mid", "exactly-once");
    deploy_copying(&b, dir.path(), "second", "mid", "done", "exactly-once");
    let lines: Vec<String> = (0..500).map(|i| format!("k{i}:v{i}")).collect();
    produce_lines(&b, "raw", &lines);
    wait_for(60, "both pipelines caught up, lag 0", || {
        status(&b, "first")["lag"] == 0
            && status(&b, "second")["lag"] == 0
            && status(&b, "second")["records_in"] == 500
    });
    let d = describe_now(&b, "second");
    assert!(
        d["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["lag"] == 0),
        "{d}"
    );
}

/// A transaction aborted after everything else was read leaves only skipped records and a
/// marker: no record for a pipeline to process. Its positions still move past them and are
/// committed, under both guarantees, as Kafka's consumers do: lag 0, not the aborted
/// records and markers (lag 4 before the change, for as long as no records came).
#[test]
fn an_aborted_transaction_at_the_end_of_the_input_leaves_no_lag() {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    for t in ["src", "alo-out", "eo-out"] {
        b.cli_ok(&["topic", "create", t, "--partitions", "1"]);
    }
    deploy_copying(&b, dir.path(), "alo", "src", "alo-out", "at-least-once");
    deploy_copying(&b, dir.path(), "eo", "src", "eo-out", "exactly-once");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt
        .block_on(quiver_client::Client::connect(b.client_config()))
        .unwrap();
    let mut tx = rt
        .block_on(quiver_client::TransactionalProducer::init(
            client.clone(),
            "input",
        ))
        .unwrap();
    let mut send = |values: &[&str], commit: bool| {
        rt.block_on(async {
            tx.prepare_topic("src").await.unwrap();
            for v in values {
                let r = quiver_client::ProducerRecord::new("src", v.to_string()).with_partition(0);
                tx.send(r).unwrap();
            }
            if commit {
                tx.commit(None).await.unwrap();
            } else {
                tx.flush().await.unwrap();
                tx.abort().await.unwrap();
            }
        })
    };
    // Offsets 0-1 and a commit marker at 2: both pipelines catch up to lag 0.
    send(&["a1", "a2"], true);
    wait_for(60, "both pipelines processed the committed records", || {
        ["alo", "eo"]
            .iter()
            .all(|p| status(&b, p)["records_in"] == 2 && status(&b, p)["lag"] == 0)
    });
    // Offsets 3-5 aborted and an abort marker at 6, read by a later fetch on its own.
    send(&["x1", "x2", "x3"], false);
    wait_for(60, "lag 0 past the aborted transaction", || {
        ["alo", "eo"].iter().all(|p| status(&b, p)["lag"] == 0)
    });
    for p in ["alo", "eo"] {
        let s = status(&b, p);
        assert_eq!(s["records_in"], 2, "{s}");
        let d = describe_now(&b, p);
        assert_eq!(d["partitions"][0]["committed"], 7, "{d}");
    }
}

/// The latest output value per key, reading each partition in order (a key's outputs all
/// land in one partition).
fn latest_per_key(records: &[Value]) -> BTreeMap<String, u64> {
    let mut sorted: Vec<&Value> = records.iter().collect();
    sorted.sort_by_key(|r| (r["partition"].as_u64(), r["offset"].as_i64()));
    sorted
        .into_iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["value"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// What a word-count run through a `kill -9` produced.
struct WordCountRun {
    /// The true count of each word.
    truth: BTreeMap<String, u64>,
    /// Records produced.
    inputs: u64,
    /// The sink read with read-committed.
    committed: Vec<Value>,
    /// The sink's log end (aborted attempts and transaction markers included).
    uncommitted_len: i64,
    /// Records in the sink read with read-uncommitted (aborted attempts included).
    uncommitted: usize,
}

/// The issue's run: `records` records keyed by `words` distinct words into a 6-partition
/// topic, the word-count pipeline (WASM `count`) with 3 `pipeline run` instances under
/// `guarantee`; one instance is killed mid-run and another started. The killed one dies
/// the way that matters: right after a poll's output was written and before its input was
/// committed (`QUIVER_FAULT_CRASH_AFTER_WRITES`, an abort like `kill -9`).
fn word_count_through_a_kill(guarantee: &str, records: usize, words: usize) -> WordCountRun {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    b.cli_ok(&["plugin", "deploy", &example("count")]);
    b.cli_ok(&["topic", "create", "words", "--partitions", "6"]);
    b.cli_ok(&["topic", "create", "counts", "--partitions", "3"]);
    // Compressed output, state changes and transactions: what is read back (the counts,
    // the state restored after the kill) goes through the codec.
    let codec = if guarantee == "exactly-once" {
        "zstd"
    } else {
        "lz4"
    };
    let file = pipeline_file(
        dir.path(),
        "wc",
        &format!("name = \"wc\"\n[source]\ntopics = [\"words\"]\n[[stages]]\nplugin = \"count@1.0.0\"\n[sink]\ntopic = \"counts\"\ncompression = \"{codec}\"\n[run]\nguarantee = \"{guarantee}\"\n"),
    );
    // Words drawn by a fixed hash of the record index, so counts differ from word to word.
    let mix = |i: u64| {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    let mut lines = Vec::with_capacity(records);
    for i in 0..records {
        let word = format!("w{}", mix(i as u64) % words as u64);
        *truth.entry(word.clone()).or_default() += 1;
        lines.push(format!("{word}:{word} {i}"));
    }
    assert_eq!(truth.len(), words, "every word is drawn");
    let mut logs: Vec<(PathBuf, String)> = (0..4)
        .map(|i| (dir.path().join(format!("wc{i}.log")), format!("wc{i}.log")))
        .collect();
    logs.push((b.log_path(), "broker.log".into()));
    let _keep = KeepLogsOnFailure("word-count", logs);
    let mut doomed = Runner::spawn_with(
        &b,
        &file,
        &dir.path().join("wc0.log"),
        &[(quiver_pipeline::fault::CRASH_AFTER_WRITES, "1")],
    );
    let mut runners: Vec<Runner> = (1..3)
        .map(|i| Runner::spawn(&b, &file, &dir.path().join(format!("wc{i}.log"))))
        .collect();
    wait_for(60, "three instances", || {
        settled(&describe_now(&b, "wc"), 3)
    });
    let half = records / 2;
    produce_lines(&b, "words", &lines[..half]);
    // Mid-run: one instance dies between writing and committing; another joins.
    wait_for(120, "the doomed instance to die", || {
        matches!(doomed.0.try_wait(), Ok(Some(_)))
    });
    runners.push(Runner::spawn(&b, &file, &dir.path().join("wc3.log")));
    produce_lines(&b, "words", &lines[half..]);
    wait_for(300, "every record processed", || {
        let d = describe_now(&b, "wc");
        d["partitions"]
            .as_array()
            .is_some_and(|ps| ps.len() == 6 && ps.iter().all(|p| p["lag"] == 0))
    });
    for r in &mut runners {
        assert!(r.stop(), "pipeline run exits cleanly on SIGTERM");
    }
    let uncommitted_len = b.total_log_end("counts");
    // A transaction the killed instance left open holds read-committed readers back until
    // the broker aborts it (its timeout): wait for what is promised, everything committed
    // readable.
    let read_committed = || json_lines(&b.cli_ok(&read_committed_args("counts")));
    let mut committed = read_committed();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (committed.len() as u64) < records as u64 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        committed = read_committed();
    }
    let uncommitted = json_lines(&b.cli_ok(&[
        "consume",
        "counts",
        "--from-beginning",
        "--isolation",
        "read-uncommitted",
        "--output",
        "json",
    ]))
    .len();
    WordCountRun {
        truth,
        inputs: records as u64,
        committed,
        uncommitted_len,
        uncommitted,
    }
}

#[test]
fn exactly_once_word_counts_are_exact_through_a_killed_instance() {
    let run = word_count_through_a_kill("exactly-once", 200_000, 1_000);
    let latest = latest_per_key(&run.committed);
    assert_eq!(latest.len(), 1_000, "every word has a count");
    let wrong: Vec<_> = run
        .truth
        .iter()
        .filter(|(w, n)| latest.get(*w) != Some(n))
        .map(|(w, n)| format!("{w}: {:?} (true {n})", latest.get(w)))
        .collect();
    assert!(wrong.is_empty(), "counts differ from the truth: {wrong:?}");
    // One committed output per input record: nothing lost, nothing doubled, and no record
    // of an aborted attempt (those are in the log, but not readable as committed).
    let sources: BTreeSet<&str> = run
        .committed
        .iter()
        .map(|r| header(r, "quiver.source"))
        .collect();
    assert_eq!(run.committed.len() as u64, run.inputs, "committed outputs");
    // The kill landed where it matters: the killed instance's last transaction had written
    // output (aborted since, so in the log but not read as committed).
    assert!(
        run.uncommitted as u64 > run.inputs,
        "no output of an aborted attempt in the log ({} records read uncommitted)",
        run.uncommitted
    );
    assert_eq!(
        sources.len() as u64,
        run.inputs,
        "each input's output exactly once"
    );
    eprintln!(
        "exactly-once: {} inputs, {} committed outputs, {} records in the sink log (aborted attempts and markers included)",
        run.inputs,
        run.committed.len(),
        run.uncommitted_len
    );
}

#[test]
fn at_least_once_word_counts_lose_nothing_through_a_killed_instance() {
    let run = word_count_through_a_kill("at-least-once", 200_000, 1_000);
    let latest = latest_per_key(&run.committed);
    assert_eq!(latest.len(), 1_000, "every word has a count");
    for (word, n) in &run.truth {
        let got = latest[word];
        assert!(
            got >= *n,
            "{word}: latest count {got} < true count {n} (lost)"
        );
    }
    let sources: BTreeSet<&str> = run
        .committed
        .iter()
        .map(|r| header(r, "quiver.source"))
        .collect();
    assert_eq!(
        sources.len() as u64,
        run.inputs,
        "every input reached the sink"
    );
    // The kill landed where it matters: between a poll's acknowledged writes and its
    // commit, so the next owner wrote those inputs' outputs again.
    assert!(
        run.committed.len() as u64 > run.inputs,
        "no input was processed twice: the kill did not land between writes and commit"
    );
}

#[test]
fn redeploying_a_new_plugin_version_rolls_exactly_once_instances_keeping_offsets_and_state() {
    let b = TestBroker::start();
    let dir = tempfile::tempdir().unwrap();
    // count@1.0.0 and the same code as count@1.0.1.
    let v1 = PathBuf::from(example("count"));
    let v2 = dir.path().join("count-1.0.1");
    std::fs::create_dir_all(&v2).unwrap();
    for f in ["count.wasm", "plugin.toml"] {
        std::fs::copy(v1.join(f), v2.join(f)).unwrap();
    }
    let manifest = std::fs::read_to_string(v2.join("plugin.toml")).unwrap();
    std::fs::write(
        v2.join("plugin.toml"),
        manifest.replace("version = \"1.0.0\"", "version = \"1.0.1\""),
    )
    .unwrap();
    b.cli_ok(&["plugin", "deploy", v1.to_str().unwrap()]);
    b.cli_ok(&["plugin", "deploy", v2.to_str().unwrap()]);
    b.cli_ok(&["topic", "create", "words", "--partitions", "4"]);
    b.cli_ok(&["topic", "create", "counts", "--partitions", "2"]);
    let write = |version: &str| {
        pipeline_file(
            dir.path(),
            "wc",
            &format!("name = \"wc\"\n[source]\ntopics = [\"words\"]\n[[stages]]\nplugin = \"count@{version}\"\n[sink]\ntopic = \"counts\"\n[run]\ninstances = 2\nguarantee = \"exactly-once\"\n"),
        )
    };
    let lines = |from: usize, to: usize| -> Vec<String> {
        (from..to).map(|i| format!("w{}:x", i % 10)).collect()
    };
    let file = write("1.0.0");
    b.cli_ok(&["pipeline", "deploy", file.to_str().unwrap()]);
    produce_lines(&b, "words", &lines(0, 500));
    wait_for(60, "500 records processed", || {
        status(&b, "wc")["records_in"] == 500 && status(&b, "wc")["lag"] == 0
    });
    let file = write("1.0.1");
    let out = b.cli_ok(&["pipeline", "deploy", file.to_str().unwrap()]);
    assert!(out.contains("redeployed pipeline wc"), "{out}");
    produce_lines(&b, "words", &lines(500, 1000));
    wait_for(60, "1,000 records processed", || {
        status(&b, "wc")["records_in"] == 1000 && status(&b, "wc")["lag"] == 0
    });
    // A file that would hand `count`'s state to another plugin is refused, and the
    // running pipeline stays as it was.
    let reordered = pipeline_file(dir.path(), "wc-reordered", "name = \"wc\"\n[source]\ntopics = [\"words\"]\n[[stages]]\nplugin = \"split-words@1.0.0\"\n[[stages]]\nplugin = \"count@1.0.1\"\n[sink]\ntopic = \"counts\"\n[run]\ninstances = 2\nguarantee = \"exactly-once\"\n");
    let err = b.cli_err(&["pipeline", "deploy", reordered.to_str().unwrap()], None);
    assert!(
        err.contains("stage 0 (stages[0]") && err.contains("belongs to its position"),
        "{err}"
    );
    let s = status(&b, "wc");
    assert_eq!(s["instances"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["records_in"], 1000, "counters carry over the roll: {s}");
    let out = json_lines(&b.cli_ok(&read_committed_args("counts")));
    assert_eq!(
        out.len(),
        1000,
        "a roll writes no output twice and loses none"
    );
    let sources: BTreeSet<&str> = out.iter().map(|r| header(r, "quiver.source")).collect();
    assert_eq!(sources.len(), 1000);
    let latest = latest_per_key(&out);
    for w in 0..10 {
        assert_eq!(
            latest[&format!("w{w}")],
            100,
            "state carried over the roll: {latest:?}"
        );
    }
    b.cli_ok(&["pipeline", "stop", "wc"]);
}

fn example_pipeline(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/pipelines")
        .join(path)
        .display()
        .to_string()
}

fn values(records: &[Value]) -> BTreeSet<String> {
    records
        .iter()
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_example_pipelines_do_what_their_readmes_say() {
    let b = TestBroker::start();
    example("split-words");
    example("count");
    let topics = [
        "app-logs",
        "errors",
        "lines",
        "words",
        "word-counts",
        "visits",
        "visits-enriched",
        "orders",
        "orders-small",
        "orders-large",
        "orders-dlq",
    ];
    for t in topics {
        b.cli_ok(&["topic", "create", t, "--partitions", "2"]);
    }
    for f in [
        "log-filter/pipeline.toml",
        "wordcount/split.toml",
        "wordcount/count.toml",
        "enrichment/pipeline.toml",
        "two-outputs/pipeline.toml",
    ] {
        b.cli_ok(&["pipeline", "deploy", &example_pipeline(f)]);
    }
    let produce = |topic: &str, text: &str, keyed: bool| {
        let mut args = vec!["produce", topic];
        if keyed {
            args.extend(["--key-separator", ":"]);
        }
        b.cli_stdin_ok(&args, text.as_bytes());
    };
    produce(
        "app-logs",
        "INFO started\nERROR disk full\nINFO ok\nERROR timeout\n",
        false,
    );
    produce("lines", "the cat sat\nthe dog sat\nthe end\n", false);
    produce("visits", "fr:/home\njp:/cart\nzz:/help\n", true);
    produce("orders", "o1 20\no2 5000\nbroken\no3 999\n", false);
    wait_for(60, "every example pipeline to catch up", || {
        [
            ("log-filter", "errors", 2),
            ("wordcount", "word-counts", 8),
            ("enrichment", "visits-enriched", 3),
            ("order-router", "orders-small", 2),
        ]
        .iter()
        .all(|(p, t, n)| status(&b, p)["lag"] == 0 && b.total_log_end(t) >= *n)
    });
    assert_eq!(
        values(&read_topic(&b, "errors", 2)),
        BTreeSet::from(["ERROR disk full".into(), "ERROR timeout".into()])
    );
    let counts = latest_per_key(&read_topic(&b, "word-counts", 8));
    let expected: BTreeMap<String, u64> =
        [("the", 3), ("cat", 1), ("sat", 2), ("dog", 1), ("end", 1)]
            .into_iter()
            .map(|(w, n)| (w.to_string(), n))
            .collect();
    assert_eq!(counts, expected);
    assert_eq!(
        values(&read_topic(&b, "visits-enriched", 3)),
        BTreeSet::from([
            "/home (France)".into(),
            "/cart (Japan)".into(),
            "/help (unknown country)".into()
        ])
    );
    assert_eq!(
        values(&read_topic(&b, "orders-small", 2)),
        BTreeSet::from(["o1 20".into(), "o3 999".into()])
    );
    assert_eq!(
        values(&read_topic(&b, "orders-large", 1)),
        BTreeSet::from(["o2 5000".into()])
    );
    let dead = read_topic(&b, "orders-dlq", 1);
    assert_eq!(values(&dead), BTreeSet::from(["broken".into()]));
    assert!(header(&dead[0], "quiver.error").contains("not an order: broken"));
    let large = read_topic(&b, "orders-large", 1);
    assert!(
        large[0]["headers"].get("quiver.sink").is_none(),
        "the routing header is removed"
    );
}

#[test]
fn bench_pipeline_reports_the_chain_beside_no_stage_and_plain_produce() {
    // A repeat count of 0 is refused before anything runs, naming the flag.
    let out = std::process::Command::new(bin())
        .args([
            "bench",
            "pipeline",
            "--embedded",
            "--stage",
            "examples/plugins/noop-filter",
            "--repeat",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--repeat"), "{err}");
    for backlog in [false, true] {
        // A backlog must outlast the group's settling, which is not timed.
        let records: u64 = if backlog { 100_000 } else { 3000 };
        let records_arg = records.to_string();
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "bench",
            "pipeline",
            "--embedded",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--stage",
            "examples/plugins/noop-filter",
            "--records",
            &records_arg,
            "--partitions",
            "2",
            "--output",
            "json",
        ];
        if backlog {
            // Also the pipeline-run way: a client of the broker over QUIC.
            args.extend(["--backlog", "--over-quic", "--no-warmup"]);
        } else {
            args.extend(["--repeat", "3"]);
        }
        let out = std::process::Command::new(bin())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(&args)
            .output()
            .unwrap();
        succeeded(&out);
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["backlog"], backlog, "{r}");
        assert_eq!(r["warmup"], !backlog, "{r}");
        let transport = if backlog { "quic" } else { "in-process" };
        assert_eq!(r["pipeline_transport"], transport, "{r}");
        assert_eq!(r["produce"]["records"], records, "{r}");
        for part in ["no_stage", "stages"] {
            // Draining a backlog, records processed while the group settled are not timed
            // (the bench refuses a run where that is more than half).
            let n = r[part]["records"].as_u64().unwrap();
            assert!(n * 2 >= records && n <= records, "{r}");
            assert!(backlog || n == records, "{r}");
            assert!(r[part]["records_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        }
        // The process's CPU over each measurement (the broker runs in the bench process),
        // and per record.
        for part in ["produce", "no_stage", "stages"] {
            let cpu = r[part]["cpu_seconds"].as_f64().unwrap();
            assert!(cpu > 0.0, "{part}: {r}");
            let n = r[part]["records"].as_f64().unwrap();
            let per_record = r[part]["cpu_us_per_record"].as_f64().unwrap();
            assert!(
                (per_record - cpu * 1e6 / n).abs() < 1e-6 * per_record,
                "{part}: {r}"
            );
        }
        assert!(r["stages"]["latency_samples"].as_u64().unwrap() > 0, "{r}");
        assert!(r["stages_vs_no_stage"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["no_stage_vs_produce"].as_f64().unwrap() > 0.0, "{r}");
        // Every run is listed, the ratios reported are their medians, and the three
        // reports are one run's.
        let runs = r["runs"].as_array().unwrap();
        assert_eq!(runs.len(), if backlog { 1 } else { 3 }, "{r}");
        let reported = |part: &str| r[part]["records_per_sec"].as_f64().unwrap();
        assert!(
            runs.iter().any(|x| {
                x["produce_records_per_sec"].as_f64() == Some(reported("produce"))
                    && x["no_stage_records_per_sec"].as_f64() == Some(reported("no_stage"))
                    && x["stages_records_per_sec"].as_f64() == Some(reported("stages"))
                    && x["no_stage_cpu_us_per_record"] == r["no_stage"]["cpu_us_per_record"]
            }),
            "the reports are not those of one run: {r}"
        );
        for ratio in ["no_stage_vs_produce", "stages_vs_no_stage"] {
            let mut each: Vec<f64> = runs.iter().map(|x| x[ratio].as_f64().unwrap()).collect();
            each.sort_by(f64::total_cmp);
            let reported = r[ratio].as_f64().unwrap();
            assert!(
                (reported - each[each.len() / 2]).abs() < 1e-9,
                "{ratio}: {r}"
            );
        }
    }
}

/// An instance that keeps failing (its sink topic was deleted) shows in `pipeline status`
/// as `retrying: …` with the error, not as running; it recovers once the topic is back.
#[test]
fn an_instance_that_keeps_failing_shows_as_retrying_until_it_recovers() {
    let b = TestBroker::start_with_config("delete_topic_enable = true\n");
    let dir = tempfile::tempdir().unwrap();
    for t in ["src", "dst"] {
        b.cli_ok(&["topic", "create", t]);
    }
    let file = pipeline_file(
        dir.path(),
        "copy",
        "name = \"copy\"\n[source]\ntopics = [\"src\"]\n[sink]\ntopic = \"dst\"\n",
    );
    b.cli_ok(&["pipeline", "deploy", file.to_str().unwrap()]);
    produce_lines(&b, "src", &["a".to_string()]);
    wait_for(60, "the first record copied", || {
        status(&b, "copy")["lag"] == 0
    });
    assert_eq!(status(&b, "copy")["state"], "running");
    b.cli_ok(&["topic", "delete", "dst"]);
    produce_lines(&b, "src", &["b".to_string()]);
    wait_for(60, "the status to show the retries", || {
        let s = status(&b, "copy");
        s["state"]
            .as_str()
            .is_some_and(|st| st.starts_with("retrying:") && st.contains("dst"))
    });
    b.cli_ok(&["topic", "create", "dst"]);
    wait_for(60, "the pipeline to recover", || {
        let s = status(&b, "copy");
        s["state"] == "running" && s["lag"] == 0
    });
    assert_eq!(
        values(&read_topic(&b, "dst", 1)),
        BTreeSet::from(["b".to_string()])
    );
    // A deleted source leaves nothing to read: no lag, rather than "-1" (unknown).
    b.cli_ok(&["topic", "delete", "src"]);
    let s = status(&b, "copy");
    assert_eq!(s["lag"], 0, "{s}");
}
