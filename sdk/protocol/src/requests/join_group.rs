//! JoinGroup: a consumer becomes a member of a group (or re-joins with its old member id).
//! The answer carries its member id, the group generation, and how often to heartbeat;
//! partitions come in heartbeat answers.

use serde::{Deserialize, Serialize};

use super::group::{AutoOffsetReset, Strategy, Subscription};
use crate::{ApiKey, Message};

/// Joins `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGroupRequest {
    /// Group name.
    pub group: String,
    /// The id a previous join returned, to re-join as the same member; `None` for a new one.
    pub member_id: Option<String>,
    /// A free-form name of the client, shown by `group describe`.
    pub client_id: String,
    /// What this member reads.
    pub subscription: Subscription,
    /// The member is removed when no heartbeat arrives for this long.
    pub session_timeout_ms: u32,
    /// The strategy wanted; applied when the group has no members, else the group's stays.
    pub strategy: Option<Strategy>,
    /// The reset policy wanted; applied like `strategy`.
    pub auto_offset_reset: Option<AutoOffsetReset>,
}

/// The member's identity in the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGroupResponse {
    /// The member id to send with every later group request.
    pub member_id: String,
    /// The group generation now.
    pub generation: u64,
    /// How long a heartbeat long-poll waits at most before answering.
    pub heartbeat_interval_ms: u32,
    /// The group's strategy.
    pub strategy: Strategy,
    /// The group's reset policy: where partitions without a committed offset start.
    pub auto_offset_reset: AutoOffsetReset,
}

impl Message for JoinGroupRequest {
    const API: ApiKey = ApiKey::JoinGroup;
    type Response = JoinGroupResponse;
}
