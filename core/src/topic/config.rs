//! Per-topic config: the keys users set with `--config key=value`, their defaults,
//! parsing and validation. All or nothing: a bad key leaves the config as it was.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// When an append is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlushPolicy {
    /// Acknowledge after a sled flush; concurrent appends share one flush (group commit).
    Batch,
    /// Acknowledge at once; a background task flushes every `flush.interval.ms`.
    Interval,
}

impl FlushPolicy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushPolicy::Batch => "batch",
            FlushPolicy::Interval => "interval",
        }
    }
}

/// The config of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// `retention.ms`: delete batches older than this; -1 keeps forever.
    pub retention_ms: i64,
    /// `retention.bytes`: per-partition size cap; -1 for none.
    pub retention_bytes: i64,
    /// `flush`: `batch` or `interval`.
    pub flush: FlushPolicy,
    /// `flush.interval.ms`.
    pub flush_interval_ms: u64,
    /// `max.message.bytes`: largest batch accepted.
    pub max_message_bytes: u32,
    /// `partitioner`: a partitioner plugin (`name@version`) producers run for records
    /// without an explicit partition; unset (or set to `""`) for the default partitioner.
    /// That the plugin exists is checked by the create/alter handlers, not here.
    #[serde(default)]
    pub partitioner: Option<String>,
    /// How far ahead of the broker's clock a produced record's timestamp may be, ms: time
    /// retention trusts batch timestamps, so a record from the far future cannot pin a
    /// partition's data forever.
    #[serde(default = "default_after_max_ms")]
    pub timestamp_after_max_ms: i64,
    /// How far behind the broker's clock a produced record's timestamp may be, ms
    /// (-1: no limit, for replaying old data).
    #[serde(default = "default_before_max_ms")]
    pub timestamp_before_max_ms: i64,
    /// `min.insync.replicas`: an `acks=all` write needs at least this many in-sync replicas
    /// (the leader included), and the high watermark advances only while there are.
    #[serde(default = "default_min_insync")]
    pub min_insync_replicas: u32,
    /// `unclean.leader.election.enable`: when every in-sync replica is gone, elect a
    /// replica outside the ISR (availability over acknowledged data).
    #[serde(default)]
    pub unclean_leader_election: bool,
}

fn default_min_insync() -> u32 {
    1
}

fn default_after_max_ms() -> i64 {
    3_600_000
}

fn default_before_max_ms() -> i64 {
    -1
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            flush: FlushPolicy::Batch,
            flush_interval_ms: 1000,
            max_message_bytes: 8 * 1024 * 1024,
            partitioner: None,
            timestamp_after_max_ms: default_after_max_ms(),
            timestamp_before_max_ms: default_before_max_ms(),
            min_insync_replicas: default_min_insync(),
            unclean_leader_election: false,
        }
    }
}

/// The keys a topic accepts.
pub const TOPIC_KEYS: &[&str] = &[
    "retention.ms",
    "retention.bytes",
    "flush",
    "flush.interval.ms",
    "max.message.bytes",
    "partitioner",
    "message.timestamp.after.max.ms",
    "message.timestamp.before.max.ms",
    "min.insync.replicas",
    "unclean.leader.election.enable",
];

/// A topic's overrides after setting `set` and removing `remove`: a key removed goes back
/// to the broker's default. Refuses an unknown key to remove and a key both set and
/// removed; the values are checked where the result is applied.
pub fn altered_overrides(
    overrides: &BTreeMap<String, String>,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> Result<BTreeMap<String, String>, String> {
    let mut out = overrides.clone();
    for key in remove {
        if !TOPIC_KEYS.contains(&key.as_str()) {
            return Err(format!(
                "{key}: unknown topic config key, nothing to remove (known keys: {})",
                TOPIC_KEYS.join(", ")
            ));
        }
        if set.contains_key(key) {
            return Err(format!(
                "{key} is both set and removed in one change; choose one"
            ));
        }
        out.remove(key);
    }
    out.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(out)
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{key} must be a whole number, got {v:?}"))
}

impl TopicConfig {
    /// Sets one key; an unknown key or bad value is an error naming it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "retention.ms" => {
                let v: i64 = parse_num(key, value)?;
                if v < -1 || v == 0 {
                    return Err(format!(
                        "retention.ms must be -1 (forever) or positive, got {v}"
                    ));
                }
                self.retention_ms = v;
            }
            "retention.bytes" => {
                let v: i64 = parse_num(key, value)?;
                if v < -1 || v == 0 {
                    return Err(format!(
                        "retention.bytes must be -1 (no limit) or positive, got {v}"
                    ));
                }
                self.retention_bytes = v;
            }
            "flush" => {
                self.flush = match value {
                    "batch" => FlushPolicy::Batch,
                    "interval" => FlushPolicy::Interval,
                    other => {
                        return Err(format!(
                            "flush must be \"batch\" or \"interval\", got {other:?}"
                        ))
                    }
                }
            }
            "flush.interval.ms" => {
                let v: u64 = parse_num(key, value)?;
                if v == 0 {
                    return Err("flush.interval.ms must be positive".into());
                }
                self.flush_interval_ms = v;
            }
            "max.message.bytes" => {
                let v: u32 = parse_num(key, value)?;
                if !(64..=64 * 1024 * 1024).contains(&v) {
                    return Err(format!(
                        "max.message.bytes must be between 64 and 67108864, got {v}"
                    ));
                }
                self.max_message_bytes = v;
            }
            "message.timestamp.after.max.ms" => {
                let v: i64 = parse_num(key, value)?;
                if v < 0 {
                    return Err(format!(
                        "message.timestamp.after.max.ms must be 0 or positive, got {v}"
                    ));
                }
                self.timestamp_after_max_ms = v;
            }
            "message.timestamp.before.max.ms" => {
                let v: i64 = parse_num(key, value)?;
                if v < -1 {
                    return Err(format!(
                        "message.timestamp.before.max.ms must be -1 (no limit), 0 or positive, got {v}"
                    ));
                }
                self.timestamp_before_max_ms = v;
            }
            "min.insync.replicas" => {
                let v: u32 = parse_num(key, value)?;
                if v == 0 {
                    return Err("min.insync.replicas must be at least 1".into());
                }
                self.min_insync_replicas = v;
            }
            "unclean.leader.election.enable" => {
                self.unclean_leader_election = match value.trim() {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(format!(
                            "unclean.leader.election.enable must be true or false, got {other:?}"
                        ))
                    }
                }
            }
            "partitioner" => {
                let v = value.trim();
                if v.is_empty() {
                    self.partitioner = None;
                } else {
                    match quiver_protocol::requests::parse_plugin_ref(v) {
                        Ok((name, Some(version))) => {
                            self.partitioner = Some(format!("{name}@{version}"))
                        }
                        Ok((_, None)) => {
                            return Err(format!(
                                "partitioner must be NAME@VERSION (an exact version), got {v:?}"
                            ))
                        }
                        Err(e) => return Err(format!("partitioner: {e}")),
                    }
                }
            }
            other => {
                return Err(format!(
                    "unknown topic config key {other:?}; known keys: {}",
                    TOPIC_KEYS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// A copy with all `changes` applied, or the first error (`self` is untouched).
    pub fn with_changes(&self, changes: &BTreeMap<String, String>) -> Result<TopicConfig, String> {
        let mut c = self.clone();
        for (k, v) in changes {
            c.set(k, v)?;
        }
        Ok(c)
    }

    /// Every key with its effective value.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::from([
            ("retention.ms".into(), self.retention_ms.to_string()),
            ("retention.bytes".into(), self.retention_bytes.to_string()),
            ("flush".into(), self.flush.as_str().into()),
            (
                "flush.interval.ms".into(),
                self.flush_interval_ms.to_string(),
            ),
            (
                "max.message.bytes".into(),
                self.max_message_bytes.to_string(),
            ),
            (
                "message.timestamp.after.max.ms".into(),
                self.timestamp_after_max_ms.to_string(),
            ),
            (
                "message.timestamp.before.max.ms".into(),
                self.timestamp_before_max_ms.to_string(),
            ),
            (
                "min.insync.replicas".into(),
                self.min_insync_replicas.to_string(),
            ),
            (
                "unclean.leader.election.enable".into(),
                self.unclean_leader_election.to_string(),
            ),
        ]);
        if let Some(p) = &self.partitioner {
            m.insert("partitioner".into(), p.clone());
        }
        m
    }
}

impl TopicConfig {
    /// Checks a batch a client produced, against the records it actually holds and the
    /// topic's limits (size, timestamps against `now_ms`); see
    /// [`validate_produce`](quiver_protocol::batch::validate_produce).
    pub fn check_produced(
        &self,
        raw: &[u8],
        now_ms: i64,
        max_decompressed_bytes: usize,
    ) -> Result<quiver_protocol::batch::BatchHeader, quiver_protocol::ProtocolError> {
        use quiver_protocol::batch::{validate_produce, ProduceLimits, ATTR_LOG_APPEND_TIME};
        // The protocol's skew is symmetric: the before-bound (which so also caps the
        // future when it is the smaller one); the after-bound is checked below.
        let skew = match self.timestamp_before_max_ms {
            -1 => i64::MAX,
            before => before,
        };
        let h = validate_produce(
            raw,
            &ProduceLimits {
                max_batch_bytes: self.max_message_bytes as usize,
                max_decompressed_bytes,
                now_ms,
                max_timestamp_skew_ms: skew,
            },
        )?;
        // `validate_produce` checked max_timestamp against the records, so one comparison
        // bounds every record's timestamp from above.
        if h.attributes & ATTR_LOG_APPEND_TIME == 0
            && h.max_timestamp > now_ms.saturating_add(self.timestamp_after_max_ms)
        {
            return Err(quiver_protocol::ProtocolError::InvalidRecord {
                reason: format!(
                "timestamp {} is {} ms ahead of the broker's clock; this topic allows at most {} ms (message.timestamp.after.max.ms)",
                h.max_timestamp,
                h.max_timestamp.saturating_sub(now_ms),
                self.timestamp_after_max_ms
            ),
            });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_change_leaves_config_unchanged() {
        let c = TopicConfig::default();
        let changes = BTreeMap::from([
            ("retention.ms".to_string(), "5000".to_string()),
            ("retention.secs".to_string(), "5".to_string()),
        ]);
        let e = c.with_changes(&changes).unwrap_err();
        assert!(e.contains("retention.secs"));
        assert_eq!(c, TopicConfig::default());
    }

    #[test]
    fn map_round_trips() {
        let mut c = TopicConfig::default();
        c.set("flush", "interval").unwrap();
        let back = TopicConfig::default().with_changes(&c.to_map()).unwrap();
        assert_eq!(back, c);
    }
}
