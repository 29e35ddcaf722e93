//! Types shared by the consumer-group requests: a topic-partition, a subscription, the
//! assignment strategy and the offset-reset policy, and the group-name rule.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
}

impl TopicPartition {
    /// A topic-partition.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What a member reads: named topics, or every topic whose name matches a regex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subscription {
    /// These topics (ones that do not exist yet are picked up when they appear).
    Topics(Vec<String>),
    /// Every non-internal topic whose whole name matches this regular expression.
    Pattern(String),
}

/// How the coordinator spreads partitions over members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Strategy {
    /// Per topic, contiguous ranges of partitions to members in id order.
    Range,
    /// All partitions dealt one by one to members in id order.
    RoundRobin,
    /// Balanced, keeping every partition where it is whenever balance allows.
    #[default]
    Sticky,
}

impl Strategy {
    /// The CLI and log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Range => "range",
            Strategy::RoundRobin => "round-robin",
            Strategy::Sticky => "sticky",
        }
    }

    /// Parses `range`, `round-robin` or `sticky`.
    pub fn parse(s: &str) -> Result<Strategy, String> {
        match s {
            "range" => Ok(Strategy::Range),
            "round-robin" | "roundrobin" => Ok(Strategy::RoundRobin),
            "sticky" => Ok(Strategy::Sticky),
            other => Err(format!(
                "unknown strategy {other:?}; use range, round-robin or sticky"
            )),
        }
    }
}

/// Where a member starts a partition that has no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AutoOffsetReset {
    /// The first stored offset.
    #[default]
    Earliest,
    /// The end of the partition (only records written from then on).
    Latest,
}

impl AutoOffsetReset {
    /// The CLI and log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AutoOffsetReset::Earliest => "earliest",
            AutoOffsetReset::Latest => "latest",
        }
    }
}

/// The internal topic that stores consumer groups' offsets and settings.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// The partition of [`OFFSETS_TOPIC`] that holds `group`: its leader is the group's
/// coordinator. A stable hash (FNV-1a, 32 bits) so every client and broker agrees.
///
/// ```
/// use quiver_protocol::requests::coordinator_partition;
/// assert_eq!(coordinator_partition("any", 1), 0);
/// assert_eq!(coordinator_partition("orders", 6), coordinator_partition("orders", 6));
/// ```
pub fn coordinator_partition(group: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in group.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// Checks a group name: 1–249 bytes of `[A-Za-z0-9._-]`.
pub fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!(
            "group name must be 1 to 249 bytes, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "group name {name:?} has the character {c:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse_and_print() {
        for s in [Strategy::Range, Strategy::RoundRobin, Strategy::Sticky] {
            assert_eq!(Strategy::parse(s.as_str()), Ok(s));
        }
        assert!(Strategy::parse("eager").is_err());
    }

    #[test]
    fn group_names() {
        assert!(validate_group_name("billing.v1_x-2").is_ok());
        for bad in ["", "a b", "a/b", &"g".repeat(250)] {
            assert!(validate_group_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
