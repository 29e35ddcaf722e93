//! The test harness: [`TestBroker`] starts a real broker process on a free loopback port
//! with its own data directory, waits until it answers (polling, never a bare sleep), runs
//! the CLI against it, and kills what it started when dropped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `quiver` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quiver"))
}

/// A UDP port free right now on 127.0.0.1, below Linux's ephemeral range (32768–60999):
/// a broker restarted on its port must not find it taken by some client's socket, which
/// the kernel hands out from that range.
pub fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((seed.wrapping_add(n.wrapping_mul(7919))) % 12_000) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("addr").port()
}

/// A broker process under test.
pub struct TestBroker {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
    pub extra_args: Vec<String>,
    pub config: Option<PathBuf>,
    /// Environment variables the broker process gets (fault injection).
    pub env: Vec<(String, String)>,
}

impl TestBroker {
    /// Starts a broker with default config.
    pub fn start() -> TestBroker {
        Self::start_with_config("")
    }

    /// Starts a broker with `toml` as its config file (empty: no config file).
    pub fn start_with_config(toml: &str) -> TestBroker {
        Self::start_with(toml, &[])
    }

    /// Starts a broker with `toml` as its config file and `env` in its environment.
    pub fn start_with(toml: &str, env: &[(&str, &str)]) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = if toml.is_empty() {
            None
        } else {
            let p = dir.path().join("broker.toml");
            std::fs::write(&p, toml).expect("write config");
            Some(p)
        };
        let mut b = TestBroker {
            dir,
            port: free_udp_port(),
            child: None,
            extra_args: Vec::new(),
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        b.spawn();
        b
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir().join("tls").join("ca.pem")
    }

    /// An SDK client's config for this broker (its address, trusting its CA).
    pub fn client_config(&self) -> quiver_client::ClientConfig {
        quiver_client::ClientConfig {
            ca_file: Some(self.ca()),
            ..quiver_client::ClientConfig::new(self.addr())
        }
    }

    /// Where the broker's output goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// The broker's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the process (again) on the same port and data directory, and waits for it.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(bin());
        cmd.args(["broker", "start", "--data-dir"])
            .arg(self.data_dir())
            .args(["--listen", &self.addr()])
            .args(&self.extra_args)
            .env("QUIVER_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        self.child = Some(cmd.spawn().expect("spawn broker"));
        self.wait_ready();
    }

    /// Polls until `topic list` answers (up to 60 s).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("broker exited during start ({status}):\n{}", self.log());
            }
            if self.ca().exists() && self.cli(&["topic", "list"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("broker not ready after 60 s:\n{}", self.log());
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe_kill(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "broker did not exit within 30 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the CLI against this broker.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None)
    }

    /// Runs the CLI with `stdin` piped in.
    pub fn cli_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        cli_at(&self.addr(), &self.ca(), args, stdin)
    }

    /// Runs the CLI and returns stdout, panicking with stderr on failure.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "quiver {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `stdin` piped in and returns stdout, panicking with stderr on failure.
    pub fn cli_stdin_ok(&self, args: &[&str], stdin: &[u8]) -> String {
        let out = self.cli_with_stdin(args, Some(stdin));
        assert!(
            out.status.success(),
            "quiver {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI expecting failure; returns its stderr (the message a user reads).
    pub fn cli_err(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.cli_with_stdin(args, stdin);
        assert!(
            !out.status.success(),
            "quiver {args:?} should have failed; printed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `topic describe NAME --output json`.
    pub fn describe(&self, topic: &str) -> serde_json::Value {
        let out = self.cli_ok(&["topic", "describe", topic, "--output", "json"]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("describe output is not JSON ({e}): {out}"))
    }

    /// The sum of the log end offsets of a topic's partitions.
    pub fn total_log_end(&self, topic: &str) -> i64 {
        self.describe(topic)["partitions"]
            .as_array()
            .expect("partitions array")
            .iter()
            .map(|p| p["log_end_offset"].as_i64().expect("log_end_offset"))
            .sum()
    }

    /// Resident memory of the broker process in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the broker process has had, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the CLI against `addr` trusting `ca`.
pub fn cli_at(addr: &str, ca: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(bin());
    cmd.arg("--bootstrap")
        .arg(addr)
        .arg("--ca")
        .arg(ca)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn cli");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    child.wait_with_output().expect("cli output")
}

/// Sends a signal with the `kill` command (keeps the tests free of unsafe code).
pub fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Panics with the command's stderr unless it succeeded.
pub fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Parses JSON lines.
/// `quiver consume` arguments that print every record of `topic` readable with
/// read-committed isolation, one JSON object per line (the command stops at the end).
pub fn read_committed_args(topic: &str) -> [&str; 7] {
    [
        "consume",
        topic,
        "--from-beginning",
        "--isolation",
        "read-committed",
        "--output",
        "json",
    ]
}

pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// The record values a `quiver consume … --output json` run printed, in order; none when
/// the command failed (a caller polling for them tries again).
pub fn printed_values(out: &Output) -> Vec<String> {
    if !out.status.success() {
        return Vec::new();
    }
    json_lines(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .map(|r| {
            r["value"]
                .as_str()
                .unwrap_or_else(|| panic!("a consumed record's value is a string: {r}"))
                .to_string()
        })
        .collect()
}

/// Copies `logs` (each `(path, name)`) into `$QUIVER_TEST_KEEP_LOGS/<label>-<pid>/` when
/// a test fails (the variable set, a panic unwinding): the temporary directories holding
/// them are gone once the test ends.
pub fn keep_logs_on_failure(label: &str, logs: &[(PathBuf, String)]) {
    if !std::thread::panicking() {
        return;
    }
    let Some(keep) = std::env::var_os("QUIVER_TEST_KEEP_LOGS") else {
        return;
    };
    let to = Path::new(&keep).join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&to);
    for (path, name) in logs {
        let _ = std::fs::copy(path, to.join(name));
    }
    eprintln!("---- whole logs kept in {}", to.display());
}

/// Calls [`keep_logs_on_failure`] when dropped: declared after what owns the logs, it runs
/// before they are deleted.
pub struct KeepLogsOnFailure(pub &'static str, pub Vec<(PathBuf, String)>);

impl Drop for KeepLogsOnFailure {
    fn drop(&mut self) {
        keep_logs_on_failure(self.0, &self.1);
    }
}

/// Polls `cond` every 100 ms until it holds; panics with `what` after `secs`.
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// The group's description, or `null` while it does not exist yet (members still joining).
pub fn describe_now(b: &TestBroker, group: &str) -> serde_json::Value {
    let out = b.cli(&["group", "describe", group, "--output", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// True when the group has `members` members, is stable, and every partition has an owner.
pub fn settled(d: &serde_json::Value, members: usize) -> bool {
    d["members"].as_array().map_or(0, Vec::len) == members
        && d["state"] == "stable"
        && d["partitions"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| !p["owner"].is_null()))
}

/// The example plugin bundles' folder.
pub fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/plugins")
}

/// Builds the Rust→WASM examples once per test binary (the script installs the target).
pub fn build_wasm_examples() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/build-wasm-examples.sh");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .status()
            .expect("run scripts/build-wasm-examples.sh");
        assert!(status.success(), "{} failed: {status}", script.display());
    });
}

/// The path of example plugin `name`, its WASM built first when it is a Rust crate.
pub fn example(name: &str) -> String {
    let dir = examples().join(name);
    if dir.join("Cargo.toml").exists() {
        build_wasm_examples();
    }
    dir.display().to_string()
}

/// Builds a fixture on fresh free ports and starts it with `start`; tries again on new
/// ports (up to 3 times) when starting fails: free ports are found by binding and releasing
/// them, so another test may take one first.
pub fn start_on_free_ports<T>(
    make: impl Fn() -> T,
    start: impl Fn(&T) -> std::process::Output,
) -> T {
    for attempt in 1..=3 {
        let fixture = make();
        let out = start(&fixture);
        if out.status.success() {
            return fixture;
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(attempt < 3, "cluster start failed 3 times: {err}");
        eprintln!("cluster start failed (attempt {attempt}), retrying on new ports: {err}");
    }
    unreachable!()
}

/// A real broker (QUIC endpoint, sled files in `dir`) started in this process with topic
/// `topic` of one partition, and a client reaching it in process.
pub async fn in_process_broker(
    dir: &Path,
    topic: &str,
) -> (quiver_core::BrokerHandle, quiver_client::Client) {
    let broker = quiver_core::Broker::start(quiver_core::BrokerConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        ..quiver_core::BrokerConfig::default()
    })
    .await
    .expect("broker starts");
    let client = quiver_client::Client::connect(broker.in_process_client_config())
        .await
        .expect("in-process client");
    quiver_client::Admin::new(client.clone())
        .create_topic(topic, 1, std::collections::BTreeMap::new())
        .await
        .expect("create the topic");
    (broker, client)
}
