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
];

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
        ]);
        if let Some(p) = &self.partitioner {
            m.insert("partitioner".into(), p.clone());
        }
        m
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
