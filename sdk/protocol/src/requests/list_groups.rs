//! ListGroups: every group this broker coordinates, with its state and member count.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Lists groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListGroupsRequest {}

/// One group in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupListing {
    /// Group name.
    pub group: String,
    /// `empty`, `stable` or `rebalancing`.
    pub state: String,
    /// Members now.
    pub members: u32,
    /// Strategy name.
    pub strategy: String,
}

/// The groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListGroupsResponse {
    /// Groups sorted by name.
    pub groups: Vec<GroupListing>,
}

impl Message for ListGroupsRequest {
    const API: ApiKey = ApiKey::ListGroups;
    type Response = ListGroupsResponse;
}
