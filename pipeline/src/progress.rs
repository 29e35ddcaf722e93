//! What a pipeline commits with each input offset, as the offset's metadata: the input
//! partition's counters (records in, out, failed, dead-lettered, since the group first
//! committed it) and, for a pipeline with state, where that state stands in the changelog.
//!
//! The counters travel with the offset, so they move with the partition: a new owner (after
//! a rebalance, a `kill -9`, a broker restart or a rolling redeploy) starts from the
//! committed counts, and work that was never committed is never counted. `pipeline status`
//! sums them over the group's committed offsets: the same figures whichever broker or
//! `pipeline run` copy did the work, exact under both guarantees (at least once, a replayed
//! record is counted by the commit that finally covers it, once).
//!
//! The text is JSON: `{"state": {...}, "counts": {"in": N, "out": N, "errors": N,
//! "dead_lettered": N}}`, either part absent when it has nothing to say. Metadata written
//! before the counters existed (`{"state": ...}` only) reads as counts of zero.

use std::ops::AddAssign;

use serde::{Deserialize, Serialize};

use crate::changelog::StateMark;

/// One input partition's counters, as committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCounts {
    /// Input records processed.
    #[serde(rename = "in", default)]
    pub records_in: u64,
    /// Records written to the sinks.
    #[serde(rename = "out", default)]
    pub records_out: u64,
    /// Records a stage failed on (skipped or dead-lettered).
    #[serde(default)]
    pub errors: u64,
    /// Records written to the dead-letter topic.
    #[serde(default)]
    pub dead_lettered: u64,
}

impl AddAssign for PartitionCounts {
    fn add_assign(&mut self, other: PartitionCounts) {
        self.records_in += other.records_in;
        self.records_out += other.records_out;
        self.errors += other.errors;
        self.dead_lettered += other.dead_lettered;
    }
}

impl PartitionCounts {
    /// True when nothing was counted.
    pub fn is_zero(&self) -> bool {
        *self == PartitionCounts::default()
    }
}

/// The metadata of one committed input offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitMetadata {
    /// Where the partition's state stands (pipelines with state only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateMark>,
    /// The partition's counters.
    #[serde(default, skip_serializing_if = "PartitionCounts::is_zero")]
    pub counts: PartitionCounts,
}

impl CommitMetadata {
    /// The metadata text to commit.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("commit metadata serializes")
    }

    /// The metadata a pipeline committed; `None` for anything else (no metadata, or text a
    /// person or another program stored with the offset).
    pub fn parse(text: &str) -> Option<CommitMetadata> {
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        let object = value.as_object()?;
        if !object.contains_key("state") && !object.contains_key("counts") {
            return None;
        }
        serde_json::from_value(value).ok()
    }

    /// The counters in `text`, zero when it is not a pipeline's metadata.
    pub fn counts_in(text: Option<&str>) -> PartitionCounts {
        text.and_then(CommitMetadata::parse)
            .map(|m| m.counts)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: u64) -> PartitionCounts {
        PartitionCounts {
            records_in: n,
            records_out: n - 1,
            errors: 1,
            dead_lettered: 1,
        }
    }

    #[test]
    fn metadata_round_trips_with_and_without_state() {
        let mark = StateMark {
            epoch: 3,
            partition: 1,
            from: 10,
            to: 20,
        };
        for m in [
            CommitMetadata {
                state: Some(mark),
                counts: counts(5),
            },
            CommitMetadata {
                state: None,
                counts: counts(u64::MAX),
            },
            CommitMetadata {
                state: Some(mark),
                counts: PartitionCounts::default(),
            },
        ] {
            assert_eq!(
                CommitMetadata::parse(&m.to_text()),
                Some(m),
                "{}",
                m.to_text()
            );
        }
        assert_eq!(
            CommitMetadata {
                state: None,
                counts: counts(2)
            }
            .to_text(),
            r#"{"counts":{"in":2,"out":1,"errors":1,"dead_lettered":1}}"#
        );
    }

    #[test]
    fn metadata_from_before_the_counters_reads_as_zero_counts() {
        let old = r#"{"state":{"epoch":7,"partition":0,"from":100,"to":120}}"#;
        let m = CommitMetadata::parse(old).unwrap();
        assert_eq!(m.counts, PartitionCounts::default());
        assert_eq!(m.state.unwrap().to, 120);
    }

    #[test]
    fn other_metadata_is_not_a_pipelines_and_counts_nothing() {
        for text in ["written by a person", "{\"other\": 1}", "[1,2]", "7", ""] {
            assert_eq!(CommitMetadata::parse(text), None, "{text}");
            assert!(CommitMetadata::counts_in(Some(text)).is_zero(), "{text}");
        }
        assert!(CommitMetadata::counts_in(None).is_zero());
        // A pipeline's key with a value of the wrong shape is not trusted either.
        assert_eq!(CommitMetadata::parse(r#"{"counts":"many"}"#), None);
    }

    #[test]
    fn counts_add_field_by_field() {
        let mut total = counts(5);
        total += counts(10);
        assert_eq!(
            total,
            PartitionCounts {
                records_in: 15,
                records_out: 13,
                errors: 2,
                dead_lettered: 2
            }
        );
    }
}
