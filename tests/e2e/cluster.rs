//! `quiver cluster start|stop|status` with real broker daemons on 127.0.0.1: three brokers
//! from a cluster file form the controller and register; `status --output json` has the
//! contract fields; a broker killed with `kill -9` is fenced by the controller once its
//! heartbeats stop, and restarted (and unfenced) by running `start` again;
//! `stop` stops them all. Bad cluster files are refused with file, line and key.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::harness::{bin, cli_at, free_udp_port, unsafe_kill, wait_for};

fn quiver(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().expect("run quiver")
}

/// Panics with the command's stderr unless it succeeded.
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn status(file: &Path) -> Value {
    let out = quiver(&[
        "cluster",
        "status",
        "--config",
        file.to_str().unwrap(),
        "--output",
        "json",
    ]);
    succeeded(&out);
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// Stops the cluster's brokers however the test ends.
struct Cluster<'a>(&'a Path);

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        let _ = quiver(&["cluster", "stop", "--config", self.0.to_str().unwrap()]);
    }
}

#[test]
fn cluster_start_brings_up_three_brokers_with_a_controller_and_restarts_a_killed_one() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let file = dir.path().join("cluster.toml");
    let mut text = format!("data_root = \"{}\"\n", dir.path().join("qc").display());
    for (i, p) in ports.iter().enumerate() {
        text.push_str(&format!(
            "[[brokers]]\nid = {}\nlisten = \"127.0.0.1:{p}\"\n",
            i + 1
        ));
    }
    std::fs::write(&file, text).unwrap();
    let _guard = Cluster(&file);
    let f = file.to_str().unwrap();
    let out = quiver(&["cluster", "start", "--config", f]);
    succeeded(&out);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("CA certificate:"), "{printed}");
    let s = status(&file);
    for key in [
        "controller_leader",
        "ca",
        "brokers",
        "under_replicated_partitions",
        "offline_partitions",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    assert!(s["controller_leader"].as_u64().is_some(), "{s}");
    let brokers = s["brokers"].as_array().unwrap();
    assert_eq!(brokers.len(), 3);
    for b in brokers {
        for key in ["id", "addr", "pid", "alive", "fenced"] {
            assert!(b.get(key).is_some(), "broker lacks {key}: {b}");
        }
        assert_eq!(
            (&b["alive"], &b["fenced"]),
            (&Value::Bool(true), &Value::Bool(false)),
            "{b}"
        );
    }
    // The cluster CA is what clients trust.
    let ca = s["ca"].as_str().unwrap().to_string();
    let out = cli_at(
        &format!("127.0.0.1:{}", ports[1]),
        Path::new(&ca),
        &["topic", "list"],
        None,
    );
    succeeded(&out);

    // Replication is not built yet, and the refusal says so.
    let out = cli_at(
        &format!("127.0.0.1:{}", ports[0]),
        Path::new(&ca),
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "6",
            "--replication-factor",
            "3",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not replicate partitions yet"), "{err}");

    // kill -9 one; `start` again brings just that one back.
    let victim = brokers[1]["pid"].as_u64().unwrap() as u32;
    unsafe_kill(victim, "KILL");
    // The controller stops hearing its heartbeats and fences it.
    wait_for(60, "the killed broker to be dead and fenced", || {
        let b = &status(&file)["brokers"][1];
        b["alive"] == false && b["fenced"] == true
    });
    let out = quiver(&["cluster", "start", "--config", f]);
    succeeded(&out);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("broker 1 is already running"), "{printed}");
    assert!(printed.contains("started broker 2"), "{printed}");
    let s = status(&file);
    assert!(
        s["brokers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["alive"] == true && b["fenced"] == false),
        "{s}"
    );

    let out = quiver(&["cluster", "stop", "--config", f]);
    succeeded(&out);
    let s = status(&file);
    assert!(
        s["brokers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["alive"] == false),
        "{s}"
    );
    assert!(s["controller_leader"].is_null(), "{s}");
}

#[test]
fn a_cluster_file_with_a_duplicate_port_is_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "data_root = \"qc\"\n[[brokers]]\nid = 1\nlisten = \"127.0.0.1:7401\"\n[[brokers]]\nid = 2\nlisten = \"127.0.0.1:7401\"\n",
    )
    .unwrap();
    let out = quiver(&["cluster", "start", "--config", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:5") && err.contains("brokers[1].listen"),
        "{err}"
    );
}

#[test]
fn a_bootstrap_list_skips_brokers_that_do_not_answer() {
    let b = super::harness::TestBroker::start();
    let dead = format!("127.0.0.1:{}", free_udp_port());
    let list = format!("{dead},{}", b.addr());
    let out = cli_at(&list, &b.ca(), &["topic", "create", "listed"], None);
    succeeded(&out);
    let out = cli_at(
        &format!("{dead},127.0.0.1:{}", free_udp_port()),
        &b.ca(),
        &["topic", "list"],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no bootstrap broker answered"), "{err}");
}
