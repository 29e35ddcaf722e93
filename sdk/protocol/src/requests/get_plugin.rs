//! GetPlugin: download a deployed bundle (payload = its archive), e.g. for a producer to
//! run the topic's partitioner itself.

use serde::{Deserialize, Serialize};

use super::plugin::PluginInfo;
use crate::{ApiKey, Message};

/// Asks for the archive of `name@version` (or of the highest version of `name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetPluginRequest {
    /// Plugin name.
    pub name: String,
    /// Exact version, or `None` for the highest deployed.
    pub version: Option<String>,
}

/// The plugin's record; the payload holds its archive bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetPluginResponse {
    /// What is stored.
    pub plugin: PluginInfo,
}

impl Message for GetPluginRequest {
    const API: ApiKey = ApiKey::GetPlugin;
    type Response = GetPluginResponse;
}
