//! The durable form of group state: records of the internal `__consumer_offsets` topic.
//!
//! Each record has a key (which group setting or which committed offset) and a value; an
//! empty value is a tombstone that deletes the key. The latest record of a key wins, so
//! replaying the topic from its start rebuilds the state, and a compacting cleaner (or a
//! replicating follower) can treat the topic like any other log. Keys and values are JSON
//! so an operator can read the topic with `quiver consume`.

use serde::{Deserialize, Serialize};

use quiver_protocol::requests::{AutoOffsetReset, Strategy, TopicPartition};

/// The internal topic holding group records.
pub use quiver_protocol::requests::OFFSETS_TOPIC;

/// What a record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RecordKey {
    /// A group's existence and settings.
    Group {
        /// Group name.
        group: String,
    },
    /// A committed offset.
    Offset {
        /// Group name.
        group: String,
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
    },
    /// A transactional id's coordinator state (see [`crate::txn`]): transactions are
    /// coordinated by the leader of the offsets partition their id hashes to, and kept in it.
    Txn {
        /// The transactional id.
        id: String,
    },
}

/// One stored record of the offsets topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A change of group state.
    Group(GroupRecord),
    /// A transactional id's state (its JSON; empty when the id was forgotten).
    Txn {
        /// The transactional id.
        id: String,
        /// The stored state.
        value: Vec<u8>,
    },
}

/// The key of transactional id `id`'s state record.
pub fn txn_key(id: &str) -> Vec<u8> {
    // A struct of one string always serializes.
    serde_json::to_vec(&RecordKey::Txn { id: id.to_string() }).unwrap_or_default()
}

/// Decodes a stored `(key, value)` of the offsets topic.
pub fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, RecordError> {
    let parsed: RecordKey =
        serde_json::from_slice(key).map_err(|e| RecordError(format!("key: {e}")))?;
    match parsed {
        RecordKey::Txn { id } => Ok(Entry::Txn {
            id,
            value: value.to_vec(),
        }),
        _ => GroupRecord::decode(key, value).map(Entry::Group),
    }
}

/// A group's durable settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMetaValue {
    /// Assignment strategy.
    pub strategy: Strategy,
    /// Where partitions without a committed offset start.
    pub auto_offset_reset: AutoOffsetReset,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetValue {
    /// Next offset to read.
    pub offset: i64,
    /// Metadata stored with it.
    pub metadata: Option<String>,
}

/// One change of durable group state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRecord {
    /// A group exists with these settings.
    Meta {
        /// Group name.
        group: String,
        /// Its settings.
        value: GroupMetaValue,
    },
    /// A group was deleted.
    MetaDeleted {
        /// Group name.
        group: String,
    },
    /// An offset was committed.
    Offset {
        /// Group name.
        group: String,
        /// Partition.
        tp: TopicPartition,
        /// The offset.
        value: OffsetValue,
    },
    /// A committed offset was deleted.
    OffsetDeleted {
        /// Group name.
        group: String,
        /// Partition.
        tp: TopicPartition,
    },
}

/// A stored record could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unreadable group record: {0}")]
pub struct RecordError(String);

impl GroupRecord {
    /// The group the record belongs to.
    pub fn group(&self) -> &str {
        match self {
            GroupRecord::Meta { group, .. }
            | GroupRecord::MetaDeleted { group }
            | GroupRecord::Offset { group, .. }
            | GroupRecord::OffsetDeleted { group, .. } => group,
        }
    }

    /// What the record is about: its group, and its partition for an offset's records. A
    /// later record of the same subject replaces an earlier one.
    pub fn subject(&self) -> (&str, Option<&TopicPartition>) {
        match self {
            GroupRecord::Meta { group, .. } | GroupRecord::MetaDeleted { group } => (group, None),
            GroupRecord::Offset { group, tp, .. } | GroupRecord::OffsetDeleted { group, tp } => {
                (group, Some(tp))
            }
        }
    }

    /// Encodes to `(key, value)`; an empty value is a tombstone.
    pub fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        let key = match self {
            GroupRecord::Meta { group, .. } | GroupRecord::MetaDeleted { group } => {
                RecordKey::Group {
                    group: group.clone(),
                }
            }
            GroupRecord::Offset { group, tp, .. } | GroupRecord::OffsetDeleted { group, tp } => {
                RecordKey::Offset {
                    group: group.clone(),
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                }
            }
        };
        let value = match self {
            GroupRecord::Meta { value, .. } => serde_json::to_vec(value),
            GroupRecord::Offset { value, .. } => serde_json::to_vec(value),
            _ => Ok(Vec::new()),
        };
        // Plain structs of strings and numbers always serialize.
        (
            serde_json::to_vec(&key).unwrap_or_default(),
            value.unwrap_or_default(),
        )
    }

    /// Decodes a stored `(key, value)`.
    pub fn decode(key: &[u8], value: &[u8]) -> Result<GroupRecord, RecordError> {
        let key: RecordKey =
            serde_json::from_slice(key).map_err(|e| RecordError(format!("key: {e}")))?;
        let bad = |e: serde_json::Error| RecordError(format!("value: {e}"));
        Ok(match key {
            RecordKey::Group { group } if value.is_empty() => GroupRecord::MetaDeleted { group },
            RecordKey::Group { group } => GroupRecord::Meta {
                group,
                value: serde_json::from_slice(value).map_err(bad)?,
            },
            RecordKey::Offset {
                group,
                topic,
                partition,
            } => {
                let tp = TopicPartition::new(topic, partition);
                if value.is_empty() {
                    GroupRecord::OffsetDeleted { group, tp }
                } else {
                    GroupRecord::Offset {
                        group,
                        tp,
                        value: serde_json::from_slice(value).map_err(bad)?,
                    }
                }
            }
            RecordKey::Txn { id } => {
                return Err(RecordError(format!(
                    "the state of transactional id {id:?}, not a group record"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let tp = TopicPartition::new("t", 3);
        for r in [
            GroupRecord::Meta {
                group: "g".into(),
                value: GroupMetaValue {
                    strategy: Strategy::Range,
                    auto_offset_reset: AutoOffsetReset::Latest,
                },
            },
            GroupRecord::MetaDeleted { group: "g".into() },
            GroupRecord::Offset {
                group: "g".into(),
                tp: tp.clone(),
                value: OffsetValue {
                    offset: 42,
                    metadata: Some("m".into()),
                },
            },
            GroupRecord::OffsetDeleted {
                group: "g".into(),
                tp,
            },
        ] {
            let (k, v) = r.encode();
            assert_eq!(GroupRecord::decode(&k, &v).unwrap(), r);
        }
        assert!(GroupRecord::decode(b"{", b"").is_err());
        assert_eq!(
            decode_entry(&txn_key("app"), b"{}").unwrap(),
            Entry::Txn {
                id: "app".into(),
                value: b"{}".to_vec()
            }
        );
        assert!(GroupRecord::decode(&txn_key("app"), b"{}").is_err());
        assert!(GroupRecord::decode(br#"{"kind":"group","group":"g"}"#, b"[").is_err());
    }
}
