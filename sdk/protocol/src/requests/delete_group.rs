//! DeleteGroup: forgets a group and its committed offsets (refused while it has members).

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Deletes `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteGroupRequest {
    /// Group name.
    pub group: String,
}

/// What was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteGroupResponse {
    /// Committed offsets dropped.
    pub offsets_deleted: u32,
}

impl Message for DeleteGroupRequest {
    const API: ApiKey = ApiKey::DeleteGroup;
    type Response = DeleteGroupResponse;
}
