//! The broker's configuration: one TOML file (documented in `config/broker.toml`), defaults
//! in code, `QUIVER_*` environment overrides, and validation at load.
//!
//! Errors name the file (or environment variable), the key and the reason, so a typo stops
//! the broker at start with a message instead of running with a surprise.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::topic::TopicConfig;

/// A configuration problem, with where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file did not parse, or a key is unknown or has a bad value.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line, column and key).
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("invalid config key `{key}` (from {source_name}): {reason}")]
    Invalid {
        /// The key path, e.g. `topic_defaults.retention_ms`.
        key: String,
        /// The file or environment variable it came from.
        source_name: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// TLS settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; empty to use a self-made CA under `<data_dir>/tls/`.
    pub cert: Option<PathBuf>,
    /// PEM private key (must not be readable by other users).
    pub key: Option<PathBuf>,
    /// Extra DNS names or IPs for the self-made server certificate.
    pub extra_sans: Vec<String>,
}

/// Protective limits against hostile or broken clients.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request frame in bytes.
    pub max_frame_bytes: u32,
    /// Concurrent connections the broker accepts.
    pub max_connections: u32,
    /// Concurrent request streams per connection.
    pub max_streams_per_connection: u32,
    /// Time a client has to send a whole request once it opened the stream.
    pub request_read_timeout_ms: u64,
    /// Longest a client may take none of an answer's bytes (or a subscription chunk's); a
    /// client that stops reading for that long has its stream reset, freeing what the
    /// answer held. A slow but steady reader is never cut off.
    pub response_write_timeout_ms: u64,
    /// QUIC idle timeout: a silent peer is dropped after this.
    pub idle_timeout_ms: u64,
    /// Memory all produce requests together may use to decompress the batches they check,
    /// bytes (at least `max_frame_bytes`, one batch's most). A request reserves what its
    /// batches can inflate to before it decompresses, and waits for room until its timeout:
    /// a few bytes of compression bomb cannot make the broker hold gigabytes.
    pub max_decompression_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: 64 * 1024 * 1024,
            max_connections: 10_000,
            max_streams_per_connection: 1024,
            request_read_timeout_ms: 30_000,
            response_write_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            max_decompression_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Ceilings for every plugin call the broker makes (a bundle's `[limits]` may ask for
/// less, never more), and the size of bundles it accepts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// CPU time per plugin call (time its thread ran), milliseconds.
    pub cpu_ms: u64,
    /// Memory per plugin instance, MiB.
    pub memory_mb: u64,
    /// Most bytes of output per processor call.
    pub max_output_bytes: u64,
    /// WASM stack per instance, bytes.
    pub wasm_stack_bytes: u64,
    /// Consecutive failed calls after which an instance is quarantined (and dropped).
    pub max_consecutive_failures: u32,
    /// Largest bundle archive `plugin deploy` accepts, bytes.
    pub max_bundle_bytes: u64,
    /// A consume-time processor instance unused this long is dropped (its state with it).
    pub processor_idle_ms: u64,
    /// Threads that run plugin calls, apart from storage and network work; 0 = half the
    /// cores (at least one). Plugins together never use more cores than this.
    pub threads: u32,
    /// After an instance is quarantined (failed too often, or stuck past its deadline),
    /// new calls for it are refused for this long, ms.
    pub quarantine_ms: u64,
}

/// Most plugin threads a broker runs (each may also leave up to four abandoned ones).
pub const MAX_PLUGIN_THREADS: u32 = 256;

impl PluginsConfig {
    /// The plugin thread count, with 0 resolved to half the cores (at least one).
    pub fn effective_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
                .max(1),
            n => n as usize,
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            cpu_ms: 100,
            memory_mb: 64,
            max_output_bytes: 16 * 1024 * 1024,
            wasm_stack_bytes: 512 * 1024,
            max_consecutive_failures: 5,
            max_bundle_bytes: 16 * 1024 * 1024,
            processor_idle_ms: 300_000,
            threads: 0,
            quarantine_ms: 10_000,
        }
    }
}

/// Everything a broker needs to start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Unique id of this broker in its cluster (`broker.id` in Kafka).
    pub broker_id: u32,
    /// UDP address the QUIC endpoint binds.
    pub listen: String,
    /// Address given to clients in metadata; defaults to `listen`.
    pub advertised_addr: Option<String>,
    /// Directory for the sled database, TLS material, pid and log files.
    pub data_dir: PathBuf,
    /// Whether `topic delete` is allowed (`delete.topic.enable` in Kafka).
    pub delete_topic_enable: bool,
    /// HTTP address of the Prometheus endpoint; off when unset.
    pub metrics_listen: Option<String>,
    /// How often retention runs.
    pub retention_check_interval_ms: u64,
    /// Bytes a `__consumer_offsets` partition may grow past its last compaction before its
    /// live records are carried forward and the older part deleted.
    pub offsets_compact_bytes: u64,
    /// A consumer group with no members that stored nothing for this long is deleted
    /// (its committed offsets with it), ms; -1 keeps groups forever. Kafka's
    /// `offsets.retention.minutes`.
    pub offsets_retention_ms: i64,
    /// Most members one consumer group may have; a join past it is refused
    /// (`GroupMaxSizeReached`). Kafka's `group.max.size`.
    pub group_max_size: u64,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_timeout_ms: u64,
    /// TLS.
    pub tls: TlsConfig,
    /// Limits.
    pub limits: LimitsConfig,
    /// Config given to topics that do not override it.
    pub topic_defaults: TopicDefaults,
    /// Plugin host ceilings.
    pub plugins: PluginsConfig,
    /// Membership of a cluster (none: a lone broker).
    pub cluster: ClusterConfig,
}

/// `[cluster]`: this broker belongs to a cluster whose controller (one Raft group) runs on
/// the `voters`. Written by `quiver cluster start`; a broker with no voters is a lone broker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The cluster CA certificate (PEM): peers' certificates must chain to it, and
    /// `tls.cert` must be one it signed (for server and client authentication).
    pub ca: Option<PathBuf>,
    /// The controller voters: every broker's id and QUIC address, this one's included.
    pub voters: Vec<VoterConfig>,
    /// `replica.lag.max.ms`: a follower that has not caught up with its leader for this
    /// long leaves the partition's ISR (it rejoins when caught up).
    #[serde(default = "default_replica_lag_max_ms")]
    pub replica_lag_max_ms: u64,
}

fn default_replica_lag_max_ms() -> u64 {
    10_000
}

/// One controller voter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VoterConfig {
    /// Broker id.
    pub id: u32,
    /// Its QUIC address, `IP:port`.
    pub addr: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            ca: None,
            voters: Vec::new(),
            replica_lag_max_ms: default_replica_lag_max_ms(),
        }
    }
}

impl ClusterConfig {
    /// Whether this broker is part of a cluster.
    pub fn enabled(&self) -> bool {
        !self.voters.is_empty()
    }
}

/// Defaults for new topics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicDefaults {
    /// Partitions of a topic created without `--partitions`.
    pub partitions: u32,
    /// Delete batches older than this (ms); -1 keeps forever.
    pub retention_ms: i64,
    /// Delete the oldest batches while a partition is larger (bytes); -1 for no limit.
    pub retention_bytes: i64,
    /// `batch`: acknowledge after a disk flush (shared by concurrent appends);
    /// `interval`: flush every `flush_interval_ms` and acknowledge at once.
    pub flush: String,
    /// Flush period for `flush = "interval"`.
    pub flush_interval_ms: u64,
    /// Largest record batch accepted.
    pub max_message_bytes: u32,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        let t = TopicConfig::default();
        TopicDefaults {
            partitions: 1,
            retention_ms: t.retention_ms,
            retention_bytes: t.retention_bytes,
            flush: t.flush.as_str().to_string(),
            flush_interval_ms: t.flush_interval_ms,
            max_message_bytes: t.max_message_bytes,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            broker_id: 0,
            listen: "127.0.0.1:7400".into(),
            advertised_addr: None,
            data_dir: PathBuf::from("./quiver-data"),
            delete_topic_enable: false,
            metrics_listen: None,
            retention_check_interval_ms: 5_000,
            offsets_compact_bytes: 16 * 1024 * 1024,
            offsets_retention_ms: 7 * 24 * 3600 * 1000,
            group_max_size: crate::group::DEFAULT_GROUP_MAX_SIZE as u64,
            shutdown_timeout_ms: 10_000,
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            topic_defaults: TopicDefaults::default(),
            plugins: PluginsConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// The environment-variable prefix: `QUIVER_LISTEN`, `QUIVER_TOPIC_DEFAULTS__RETENTION_MS`.
pub const ENV_PREFIX: &str = "QUIVER_";

/// Environment variables the CLI itself uses, never config keys.
const CLI_ENV: &[&str] = &[
    "QUIVER_BOOTSTRAP",
    "QUIVER_CA",
    "QUIVER_LOG",
    "QUIVER_BIN",
    "QUIVER_OUTPUT",
];

/// The prefix of fault-injection variables for tests (`QUIVER_FAULT_FAIL_SYNC_AFTER`),
/// never config keys.
const FAULT_ENV_PREFIX: &str = "QUIVER_FAULT_";

/// The prefix of variables the test harness reads (`QUIVER_TEST_KEEP_LOGS`), never config
/// keys: a broker started by a test inherits them.
const TEST_ENV_PREFIX: &str = "QUIVER_TEST_";

/// Whether environment variable `name` overrides a broker config key (a `QUIVER_*`
/// variable that is not one of the CLI's own, a fault injection nor the test harness's).
pub fn is_config_var(name: &str) -> bool {
    name.starts_with(ENV_PREFIX)
        && !CLI_ENV.contains(&name)
        && !name.starts_with(FAULT_ENV_PREFIX)
        && !name.starts_with(TEST_ENV_PREFIX)
}

impl BrokerConfig {
    /// Loads the file (or the embedded defaults when `path` is `None`), applies `QUIVER_*`
    /// environment overrides from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<BrokerConfig, ConfigError> {
        let (text, source) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "defaults".to_string()),
        };
        let mut cfg: BrokerConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: source.clone(),
            message: e.to_string(),
        })?;
        cfg.validate(&source)?;
        cfg.apply_env(env)?;
        Ok(cfg)
    }

    fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut vars: Vec<(String, String)> =
            env.into_iter().filter(|(k, _)| is_config_var(k)).collect();
        if vars.is_empty() {
            return Ok(());
        }
        vars.sort();
        let mut table = toml::Value::try_from(&*self).map_err(|e| ConfigError::Parse {
            path: "environment".into(),
            message: e.to_string(),
        })?;
        for (var, raw) in &vars {
            let path: Vec<String> = var[ENV_PREFIX.len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            let value = parse_env_value(raw);
            set_path(&mut table, &path, value).map_err(|reason| ConfigError::Invalid {
                key: path.join("."),
                source_name: format!("environment variable {var}"),
                reason,
            })?;
        }
        let source = format!(
            "environment ({})",
            vars.iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let cfg: BrokerConfig =
            table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: source.clone(),
                    message: e.to_string(),
                })?;
        cfg.validate(&source)?;
        *self = cfg;
        Ok(())
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            key: key.into(),
            source_name: source.into(),
            reason,
        };
        self.listen.parse::<SocketAddr>().map_err(|e| {
            bad(
                "listen",
                format!("{:?} is not an IP:port address ({e})", self.listen),
            )
        })?;
        if let Some(m) = &self.metrics_listen {
            m.parse::<SocketAddr>().map_err(|e| {
                bad(
                    "metrics_listen",
                    format!("{m:?} is not an IP:port address ({e})"),
                )
            })?;
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(bad(
                "tls.cert",
                "set both tls.cert and tls.key, or neither".into(),
            ));
        }
        let l = &self.limits;
        for (k, v) in [
            ("limits.max_frame_bytes", u64::from(l.max_frame_bytes)),
            ("limits.max_connections", u64::from(l.max_connections)),
            (
                "limits.max_streams_per_connection",
                u64::from(l.max_streams_per_connection),
            ),
            ("limits.request_read_timeout_ms", l.request_read_timeout_ms),
            (
                "limits.response_write_timeout_ms",
                l.response_write_timeout_ms,
            ),
            ("limits.idle_timeout_ms", l.idle_timeout_ms),
            ("limits.max_decompression_bytes", l.max_decompression_bytes),
            (
                "retention_check_interval_ms",
                self.retention_check_interval_ms,
            ),
            ("offsets_compact_bytes", self.offsets_compact_bytes),
            ("group_max_size", self.group_max_size),
            ("plugins.cpu_ms", self.plugins.cpu_ms),
            ("plugins.memory_mb", self.plugins.memory_mb),
            ("plugins.max_output_bytes", self.plugins.max_output_bytes),
            ("plugins.wasm_stack_bytes", self.plugins.wasm_stack_bytes),
            (
                "plugins.max_consecutive_failures",
                u64::from(self.plugins.max_consecutive_failures),
            ),
            ("plugins.max_bundle_bytes", self.plugins.max_bundle_bytes),
            ("plugins.processor_idle_ms", self.plugins.processor_idle_ms),
        ] {
            if v == 0 {
                return Err(bad(k, "must be greater than 0".into()));
            }
        }
        if self.offsets_retention_ms == 0 || self.offsets_retention_ms < -1 {
            return Err(bad(
                "offsets_retention_ms",
                format!(
                    "must be greater than 0, or -1 to keep groups forever; got {}",
                    self.offsets_retention_ms
                ),
            ));
        }
        if l.max_decompression_bytes < u64::from(l.max_frame_bytes) {
            return Err(bad(
                "limits.max_decompression_bytes",
                format!(
                    "must be at least limits.max_frame_bytes ({}), the most one batch may \
                     decompress to; got {}",
                    l.max_frame_bytes, l.max_decompression_bytes
                ),
            ));
        }
        let max_stack = quiver_plugins::MAX_WASM_STACK_BYTES as u64;
        if self.plugins.wasm_stack_bytes > max_stack {
            return Err(bad(
                "plugins.wasm_stack_bytes",
                format!("must be at most {max_stack} (1 MiB: WASM runs on the broker's threads, whose stacks are 2 MiB)"),
            ));
        }
        if self.plugins.threads > MAX_PLUGIN_THREADS {
            return Err(bad(
                "plugins.threads",
                format!(
                    "must be at most {MAX_PLUGIN_THREADS} (0 = half the cores), got {}",
                    self.plugins.threads
                ),
            ));
        }
        if self.topic_defaults.partitions == 0 {
            return Err(bad(
                "topic_defaults.partitions",
                "must be at least 1".into(),
            ));
        }
        self.default_topic_config().map_err(|(k, reason)| {
            bad(&format!("topic_defaults.{}", k.replace('.', "_")), reason)
        })?;
        self.validate_cluster(source)
    }

    fn validate_cluster(&self, source: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            key: key.into(),
            source_name: source.into(),
            reason,
        };
        let c = &self.cluster;
        if !c.enabled() {
            if c.ca.is_some() {
                return Err(bad(
                    "cluster.ca",
                    "a cluster CA without [[cluster.voters]]: list the controller voters, or remove [cluster]".into(),
                ));
            }
            return Ok(());
        }
        if c.ca.is_none() {
            return Err(bad(
                "cluster.ca",
                "a cluster needs its CA certificate (brokers authenticate each other with it)"
                    .into(),
            ));
        }
        if self.tls.cert.is_none() {
            return Err(bad(
                "tls.cert",
                "a cluster broker needs a certificate signed by the cluster CA (tls.cert and tls.key); `quiver cluster start` issues them".into(),
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        for v in &c.voters {
            if !ids.insert(v.id) {
                return Err(bad(
                    "cluster.voters",
                    format!("voter id {} is listed twice", v.id),
                ));
            }
            v.addr.parse::<SocketAddr>().map_err(|e| {
                bad(
                    "cluster.voters",
                    format!("voter {} address {:?} is not IP:port ({e})", v.id, v.addr),
                )
            })?;
        }
        Ok(())
    }

    /// The topic config that topics start from.
    pub fn default_topic_config(&self) -> Result<TopicConfig, (String, String)> {
        let d = &self.topic_defaults;
        let mut t = TopicConfig::default();
        for (k, v) in [
            ("retention.ms", d.retention_ms.to_string()),
            ("retention.bytes", d.retention_bytes.to_string()),
            ("flush", d.flush.clone()),
            ("flush.interval.ms", d.flush_interval_ms.to_string()),
            ("max.message.bytes", d.max_message_bytes.to_string()),
        ] {
            t.set(k, &v).map_err(|reason| (k.to_string(), reason))?;
        }
        Ok(t)
    }

    /// The address clients should use for this broker.
    pub fn advertised(&self) -> String {
        self.advertised_addr
            .clone()
            .unwrap_or_else(|| self.listen.clone())
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    // Numbers, booleans and arrays as TOML; everything else as a string.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(table: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    let mut cur = table;
    for (i, part) in path.iter().enumerate() {
        let t = cur
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a section"))?;
        if i + 1 == path.len() {
            t.insert(part.clone(), value);
            return Ok(());
        }
        cur = t
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Err("empty key".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<BrokerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broker.toml");
        std::fs::write(&p, text).unwrap();
        BrokerConfig::load(Some(&p), Vec::new())
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(load_str("").unwrap(), BrokerConfig::default());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = load_str("broker_id = 1\nlisten_addr = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_addr") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_value_is_refused() {
        let e = load_str("[topic_defaults]\nflush = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("topic_defaults.flush"), "{e}");
        let e = load_str("listen = \"nowhere\"\n").unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        let e = load_str("[plugins]\nthreads = 100000\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("plugins.threads"), "{e}");
        // The keys added for compaction, group expiry and the decompression budget.
        for (text, key) in [
            ("offsets_compact_bytes = 0\n", "offsets_compact_bytes"),
            ("offsets_retention_ms = 0\n", "offsets_retention_ms"),
            ("offsets_retention_ms = -5\n", "offsets_retention_ms"),
            (
                "[limits]\nmax_decompression_bytes = 1024\n",
                "limits.max_decompression_bytes",
            ),
            ("group_max_size = 0\n", "group_max_size"),
            (
                "[plugins]\nwasm_stack_bytes = 2097152\n",
                "plugins.wasm_stack_bytes",
            ),
        ] {
            let e = load_str(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text:?}: {e}");
        }
        let c = load_str("offsets_retention_ms = -1\n").unwrap();
        assert_eq!(c.offsets_retention_ms, -1);
    }

    #[test]
    fn env_overrides_apply_and_are_validated() {
        let env = vec![
            ("QUIVER_BROKER_ID".to_string(), "7".to_string()),
            (
                "QUIVER_TOPIC_DEFAULTS__RETENTION_MS".to_string(),
                "1000".to_string(),
            ),
            ("QUIVER_BOOTSTRAP".to_string(), "ignored:1".to_string()),
            // The test harness's and fault injection's variables are not config keys.
            ("QUIVER_TEST_KEEP_LOGS".to_string(), "/tmp".to_string()),
            (
                "QUIVER_FAULT_CRASH_AFTER_WRITES".to_string(),
                "1".to_string(),
            ),
        ];
        let c = BrokerConfig::load(None, env).unwrap();
        assert_eq!(c.broker_id, 7);
        assert_eq!(c.topic_defaults.retention_ms, 1000);
        let e = BrokerConfig::load(None, vec![("QUIVER_NO_SUCH".into(), "1".into())]).unwrap_err();
        assert!(e.to_string().contains("no_such"), "{e}");
    }
}

#[cfg(test)]
mod documented_defaults {
    use super::*;

    /// `config/broker.toml` documents every key with its default: it must load to exactly
    /// the defaults in code.
    #[test]
    fn sample_config_matches_code_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/broker.toml");
        let cfg = BrokerConfig::load(Some(&path), Vec::new()).unwrap();
        assert_eq!(cfg, BrokerConfig::default());
    }
}
