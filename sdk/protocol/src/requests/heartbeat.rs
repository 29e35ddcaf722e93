//! Heartbeat: a long-poll that keeps a member alive and carries its assignment changes.
//!
//! The member reports what it owns; the coordinator answers at once when that differs
//! from the member's assignment (something granted, or something to revoke), else when
//! something changes for it or the heartbeat interval passes. A revoked partition is only
//! given to its next owner after a heartbeat of the old owner no longer lists it.

use serde::{Deserialize, Serialize};

use super::group::TopicPartition;
use crate::{ApiKey, Message};

/// One heartbeat of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Group name.
    pub group: String,
    /// The member id JoinGroup returned.
    pub member_id: String,
    /// The generation the member last saw.
    pub generation: u64,
    /// The partitions the member owns now (revoked ones it has released are left out).
    pub owned: Vec<TopicPartition>,
}

/// The member's assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The group generation now.
    pub generation: u64,
    /// Partitions the member may read (granted, not being revoked).
    pub assignment: Vec<TopicPartition>,
    /// Partitions the member must stop reading, commit, and then leave out of `owned`.
    pub revoke: Vec<TopicPartition>,
}

impl Message for HeartbeatRequest {
    const API: ApiKey = ApiKey::Heartbeat;
    type Response = HeartbeatResponse;
}
