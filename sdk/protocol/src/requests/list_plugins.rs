//! ListPlugins: every deployed `name@version`, sorted by name then version.

use serde::{Deserialize, Serialize};

use super::plugin::PluginInfo;
use crate::{ApiKey, Message};

/// Lists deployed plugins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPluginsRequest {}

/// The deployed plugins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPluginsResponse {
    /// Sorted by name, then version (semver order).
    pub plugins: Vec<PluginInfo>,
}

impl Message for ListPluginsRequest {
    const API: ApiKey = ApiKey::ListPlugins;
    type Response = ListPluginsResponse;
}
