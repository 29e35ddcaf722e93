//! AlterTopicConfig: sets topic config keys; answers with the new description.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::requests::TopicDescription;
use crate::{ApiKey, Message};

/// Sets config keys on a topic (all or nothing: one bad key changes nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlterTopicConfigRequest {
    /// Topic name.
    pub name: String,
    /// Keys to set.
    pub set: BTreeMap<String, String>,
}

impl Message for AlterTopicConfigRequest {
    const API: ApiKey = ApiKey::AlterTopicConfig;
    type Response = TopicDescription;
}
