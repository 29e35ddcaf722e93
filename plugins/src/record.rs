//! The host-side [`Record`]: what processors take and return and what partitioners
//! look at. Values are `Bytes` so the host can slice plugin output without copying.

use bytes::Bytes;

/// One record passed to or returned from a plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The record key, if any.
    pub key: Option<Bytes>,
    /// The record value.
    pub value: Bytes,
    /// Headers in order; names are UTF-8.
    pub headers: Vec<(String, Bytes)>,
    /// Producer timestamp, milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Offset in its partition (for output records: the input record's offset).
    pub offset: i64,
    /// Partition.
    pub partition: i32,
}

impl Record {
    /// A record with only a value.
    pub fn from_value(value: impl Into<Bytes>) -> Self {
        Record {
            value: value.into(),
            ..Record::default()
        }
    }

    /// Bytes this record occupies in the plugin batch encoding (see [`crate::codec`]).
    pub fn encoded_len(&self) -> usize {
        1 + self.key.as_ref().map_or(0, |k| 4 + k.len())
            + 4
            + self.value.len()
            + 8
            + 8
            + 4
            + 4
            + self
                .headers
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>()
    }
}
