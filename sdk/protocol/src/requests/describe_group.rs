//! DescribeGroup: members and their partitions, and per partition the committed offset,
//! log end, high watermark and lag (high watermark − committed; from the log start when
//! nothing is committed).

use serde::{Deserialize, Serialize};

use super::group::TopicPartition;
use crate::{ApiKey, Message};

/// Describes `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribeGroupRequest {
    /// Group name.
    pub group: String,
}

/// One member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberDescription {
    /// Member id.
    pub member_id: String,
    /// The client's name.
    pub client_id: String,
    /// Partitions it owns.
    pub assigned: Vec<TopicPartition>,
    /// Partitions being revoked from it (still owned until it releases them).
    pub revoking: Vec<TopicPartition>,
}

/// One partition of the group's topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPartitionDescription {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// The owning member, if any.
    pub owner: Option<String>,
    /// The committed offset, if any.
    pub committed: Option<i64>,
    /// First stored offset.
    pub log_start_offset: i64,
    /// Next offset to be assigned.
    pub log_end_offset: i64,
    /// Readable below this.
    pub high_watermark: i64,
    /// Records not yet committed.
    pub lag: i64,
}

impl GroupPartitionDescription {
    /// Sets the partition's log offsets and the lag they give: high watermark − committed,
    /// counted from the log start when nothing is committed (or the commit is below it).
    pub fn set_log_offsets(&mut self, log_start: i64, log_end: i64, high_watermark: i64) {
        self.log_start_offset = log_start;
        self.log_end_offset = log_end;
        self.high_watermark = high_watermark;
        self.lag = (high_watermark - self.committed.unwrap_or(log_start).max(log_start)).max(0);
    }
}

/// A group's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDescription {
    /// Group name.
    pub group: String,
    /// `empty`, `stable` or `rebalancing`.
    pub state: String,
    /// Generation.
    pub generation: u64,
    /// Strategy name.
    pub strategy: String,
    /// `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// Members, by id.
    pub members: Vec<MemberDescription>,
    /// Partitions, by topic and index.
    pub partitions: Vec<GroupPartitionDescription>,
}

impl Message for DescribeGroupRequest {
    const API: ApiKey = ApiKey::DescribeGroup;
    type Response = GroupDescription;
}
