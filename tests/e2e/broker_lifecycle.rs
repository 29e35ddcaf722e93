//! Broker lifecycle: restart keeps topics, offsets and config; SIGTERM shuts down cleanly;
//! bad config refuses to start, naming the key; daemon mode; the metrics endpoint.

use std::process::Command;
use std::time::{Duration, Instant};

use super::harness::{bin, free_udp_port, json_lines, TestBroker};

#[test]
fn restart_recovers_topics_offsets_and_config() {
    let mut b = TestBroker::start();
    b.cli_ok(&[
        "topic",
        "create",
        "keep",
        "--partitions",
        "2",
        "--config",
        "retention.ms=3600000",
    ]);
    let input: String = (0..1000).map(|i| format!("{i}\n")).collect();
    assert!(b
        .cli_with_stdin(&["produce", "keep"], Some(input.as_bytes()))
        .status
        .success());
    let status = b.terminate();
    assert!(status.success(), "SIGTERM exit: {status}\n{}", b.log());
    b.spawn();
    assert_eq!(b.describe("keep")["config"]["retention.ms"], "3600000");
    assert_eq!(b.total_log_end("keep"), 1000);
    let recs = json_lines(&b.cli_ok(&[
        "consume",
        "keep",
        "--from-beginning",
        "--max-messages",
        "1000",
        "--output",
        "json",
    ]));
    assert_eq!(recs.len(), 1000);
    // New records continue after the recovered offsets.
    b.cli_stdin_ok(&["produce", "keep", "--partition", "0"], b"after\n");
    assert_eq!(b.total_log_end("keep"), 1001);
}

#[test]
fn unknown_config_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("broker.toml");
    std::fs::write(&cfg, "broker_id = 1\nlisten_address = \"127.0.0.1:1\"\n").unwrap();
    let out = Command::new(bin())
        .args(["broker", "start", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listen_address") && err.contains("broker.toml") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn data_dir_of_another_broker_id_is_refused() {
    let mut b = TestBroker::start();
    b.kill9();
    let out = Command::new(bin())
        .args(["broker", "start", "--broker-id", "5", "--data-dir"])
        .arg(b.data_dir())
        .args(["--listen", &b.addr()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to broker 0"));
}

#[test]
fn daemon_start_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    // Started from a config file, stopped by naming the same file.
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!("listen = \"{addr}\"\ndata_dir = \"{}\"\n", data.display()),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["broker", "start", "--daemon", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "daemon start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: u32 = std::fs::read_to_string(data.join("broker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ca = data.join("tls").join("ca.pem");
    let listed = super::harness::cli_at(&addr, &ca, &["topic", "list"], None);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let out = Command::new(bin())
        .args(["broker", "stop", "--config"])
        .arg(&config)
        .env_remove("QUIVER_DATA_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        assert!(Instant::now() < deadline, "daemon still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(data.join("broker.log").exists());
}

#[test]
fn metrics_endpoint_counts_records() {
    use std::io::{Read, Write};
    let mport = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = TestBroker::start_with_config(&format!("metrics_listen = \"127.0.0.1:{mport}\"\n"));
    b.cli_ok(&["topic", "create", "m"]);
    assert!(b
        .cli_with_stdin(&["produce", "m"], Some(b"a\nb\nc\n"))
        .status
        .success());
    let mut s = std::net::TcpStream::connect(("127.0.0.1", mport)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.contains("quiver_records_in_total{topic=\"m\"} 3"),
        "{body}"
    );
    assert!(
        body.contains("quiver_request_duration_seconds_bucket{api=\"Produce\""),
        "{body}"
    );
    assert!(body.contains("quiver_partitions 1"), "{body}");
}
