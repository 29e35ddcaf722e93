//! [`PluginSync`]: a cluster broker's plugin store follows the controller's. Plugins
//! deployed through any broker are held by the controller (canonical archive and digest);
//! each pass installs those missing here (or here with other content) and removes those
//! the controller no longer holds. A removal this broker refuses because a consumer here
//! still runs the plugin is retried every pass until it stops. Plugins stored on a broker
//! before it joined a cluster are not the cluster's: they are removed too (deploy them
//! again through the cluster). A record that no longer decodes is replaced by the
//! controller's copy, or removed when the controller holds no such plugin.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::cluster::ControllerState;
use crate::plugin::{PluginService, PluginServiceError};

/// Makes one broker's plugin store match the controller's plugins.
pub struct PluginSync {
    plugins: Arc<PluginService>,
    /// Ids whose install or removal failed and was logged once (no log line every pass).
    reported: Mutex<HashSet<String>>,
}

impl PluginSync {
    /// Sync for the broker's plugin service.
    pub fn new(plugins: Arc<PluginService>) -> Self {
        PluginSync {
            plugins,
            reported: Mutex::new(HashSet::new()),
        }
    }

    fn report_once(&self, id: &str, what: &str, error: &PluginServiceError) {
        let first = self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        if first {
            tracing::warn!(plugin = %id, error = %error, "cannot {what} the plugin as the controller says; retrying");
        }
    }

    fn settled(&self, id: &str) {
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// One pass (blocking: reads and writes the plugin store).
    pub fn apply(&self, state: &ControllerState) {
        let stored = match self.plugins.stored() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the plugin store");
                return;
            }
        };
        let here: HashMap<&str, &str> = stored
            .iter()
            .map(|(id, digest)| (id.as_str(), digest.as_str()))
            .collect();
        for p in state.plugins.values() {
            if here.get(p.id.as_str()) == Some(&p.digest.as_str()) {
                continue;
            }
            match self.plugins.install(&p.archive.0, &p.digest) {
                Ok(_) => {
                    self.settled(&p.id);
                    tracing::info!(plugin = %p.id, digest = %p.digest, "installed a plugin deployed in the cluster");
                }
                Err(e) => self.report_once(&p.id, "install", &e),
            }
        }
        // Damaged records the controller holds were replaced by the installs above; the
        // others go like any plugin the cluster no longer holds.
        let damaged = self.plugins.damaged().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the damaged plugin records");
            Vec::new()
        });
        let stored_ids = stored.iter().map(|(id, _)| id);
        for id in stored_ids.chain(damaged.iter()) {
            if state.plugins.contains_key(id) {
                continue;
            }
            let Some((name, version)) = id.split_once('@') else {
                continue;
            };
            match self.plugins.remove(name, version) {
                Ok(_) => {
                    self.settled(id);
                    tracing::info!(plugin = %id, "removed a plugin the cluster no longer holds");
                }
                Err(e) => self.report_once(id, "remove", &e),
            }
        }
    }
}
