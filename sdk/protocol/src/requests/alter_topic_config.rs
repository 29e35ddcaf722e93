//! AlterTopicConfig and IncrementalAlterTopicConfig: change a topic's config keys; both
//! answer with the new description.

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

/// Sets some config keys of a topic and removes the overrides of others, which go back to
/// the broker's defaults (Kafka's IncrementalAlterConfigs with SET and DELETE). All or
/// nothing; a key both set and removed is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncrementalAlterTopicConfigRequest {
    /// Topic name.
    pub name: String,
    /// Keys to set.
    pub set: BTreeMap<String, String>,
    /// Keys whose override to remove (a key without one is left as it is).
    pub remove: Vec<String>,
}

impl Message for IncrementalAlterTopicConfigRequest {
    const API: ApiKey = ApiKey::IncrementalAlterTopicConfig;
    type Response = TopicDescription;
}

impl From<AlterTopicConfigRequest> for IncrementalAlterTopicConfigRequest {
    fn from(r: AlterTopicConfigRequest) -> Self {
        IncrementalAlterTopicConfigRequest {
            name: r.name,
            set: r.set,
            remove: Vec::new(),
        }
    }
}
