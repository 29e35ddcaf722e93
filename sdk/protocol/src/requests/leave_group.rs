//! LeaveGroup: a member leaves at once; its partitions go to the others without waiting
//! for its session to expire.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Leaves `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveGroupRequest {
    /// Group name.
    pub group: String,
    /// The member leaving.
    pub member_id: String,
}

/// The group generation after the member left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveGroupResponse {
    /// The group generation now.
    pub generation: u64,
}

impl Message for LeaveGroupRequest {
    const API: ApiKey = ApiKey::LeaveGroup;
    type Response = LeaveGroupResponse;
}
