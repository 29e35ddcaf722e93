//! [`PluginConfig`]: a bundle, per-use config overrides and the host's limits, built into a
//! runtime object implementing [`Processor`] or [`Partitioner`]. This is the only place that
//! dispatches on the bundle's runtime; it validates everything once, at build.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::bundle::{Bundle, Kind, Runtime};
use crate::limits::Effective;
use crate::{HostLimits, Partitioner, PluginError, Processor, StateStore};

/// Refuses a config key the plugin does not declare in its `plugin.toml` `[config]`: a
/// misspelt key would otherwise be ignored, and the plugin would run on its default in
/// silence. `plugin` is `name@version`; the message says which keys it takes and where to
/// look them up: `quiver plugin describe` for a `deployed` plugin, its `plugin.toml` for a
/// local bundle. Checked wherever config is given for a plugin: pipeline stages, consume
/// time processors, `plugin test` and `plugin bench`.
pub fn check_config_keys<'a>(
    plugin: &str,
    declared: &BTreeMap<String, String>,
    keys: impl IntoIterator<Item = &'a String>,
    deployed: bool,
) -> Result<(), String> {
    let Some(unknown) = keys.into_iter().find(|k| !declared.contains_key(*k)) else {
        return Ok(());
    };
    let name = plugin.split('@').next().unwrap_or(plugin);
    let takes = if declared.is_empty() {
        "it takes no config".to_string()
    } else {
        format!(
            "it takes: {}",
            declared.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    let look = if deployed {
        format!("see `quiver plugin describe {name}`")
    } else {
        "see `[config]` in its plugin.toml".to_string()
    };
    Err(format!(
        "{plugin} has no config key {unknown:?} ({takes}; {look})"
    ))
}

/// How to build one plugin instance.
#[derive(Clone)]
pub struct PluginConfig {
    bundle: Arc<Bundle>,
    overrides: BTreeMap<String, String>,
    limits: HostLimits,
    state: Option<Arc<dyn StateStore>>,
}

impl std::fmt::Debug for PluginConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginConfig")
            .field("bundle", &self.bundle)
            .field("overrides", &self.overrides)
            .field("limits", &self.limits)
            .field("state", &self.state.as_ref().map(|s| s.scope().to_string()))
            .finish()
    }
}

impl PluginConfig {
    /// Use `bundle` with its default config and the default [`HostLimits`].
    pub fn new(bundle: impl Into<Arc<Bundle>>) -> Self {
        PluginConfig {
            bundle: bundle.into(),
            overrides: BTreeMap::new(),
            limits: HostLimits::default(),
            state: None,
        }
    }

    /// Override one config value.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.overrides.insert(key.into(), value.into());
        self
    }

    /// Override config values given as `key=value` strings (as on the command line).
    pub fn overrides<S: AsRef<str>>(
        mut self,
        pairs: impl IntoIterator<Item = S>,
    ) -> Result<Self, PluginError> {
        for p in pairs {
            let (k, v) = parse_override(p.as_ref())?;
            self.overrides.insert(k, v);
        }
        Ok(self)
    }

    /// Refuses overrides of keys the bundle's `plugin.toml` does not declare (see
    /// [`check_config_keys`]): for config a user typed, where a misspelt key must not pass.
    pub fn declared_only(self) -> Result<Self, PluginError> {
        check_config_keys(
            &self.bundle.id(),
            &self.bundle.manifest().config,
            self.overrides.keys(),
            false,
        )
        .map_err(PluginError::Config)?;
        Ok(self)
    }

    /// Use these host ceilings instead of the defaults.
    pub fn limits(mut self, limits: HostLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Give the processor built from this config its keyed state: one store per scope
    /// (pipeline, stage, input partition), so build one processor per store. The caller keeps
    /// another `Arc` to the store to [`StateStore::drain_changes`] after each call. Without a
    /// store, the plugin's state functions fail with "state is not available: this processor
    /// runs without a pipeline". A partitioner cannot have one (`build_partitioner` refuses).
    pub fn state(mut self, store: Arc<dyn StateStore>) -> Self {
        self.state = Some(store);
        self
    }

    /// The bundle being configured.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// Build a processor instance (one per partition: it may keep state).
    pub fn build_processor(&self) -> Result<Box<dyn Processor>, PluginError> {
        let eff = self.effective(Kind::Processor)?;
        Ok(match self.bundle.manifest().runtime {
            Runtime::Lua => Box::new(crate::lua::LuaProcessor::new(
                &self.bundle,
                eff,
                self.state.clone(),
            )?),
            Runtime::Wasm => Box::new(crate::wasm::WasmProcessor::new(
                &self.bundle,
                eff,
                self.state.clone(),
            )?),
        })
    }

    /// Build a partitioner instance.
    pub fn build_partitioner(&self) -> Result<Box<dyn Partitioner>, PluginError> {
        if self.state.is_some() {
            return Err(PluginError::Config(
                "a partitioner cannot have a state store (only processors have state)".into(),
            ));
        }
        let eff = self.effective(Kind::Partitioner)?;
        Ok(match self.bundle.manifest().runtime {
            Runtime::Lua => Box::new(crate::lua::LuaPartitioner::new(&self.bundle, eff)?),
            Runtime::Wasm => Box::new(crate::wasm::WasmPartitioner::new(&self.bundle, eff)?),
        })
    }

    fn effective(&self, want: Kind) -> Result<Effective, PluginError> {
        self.limits.validate()?;
        let m = self.bundle.manifest();
        if m.kind != want {
            return Err(PluginError::Load {
                plugin: self.bundle.id(),
                message: format!("it is a {:?}, not a {want:?}", m.kind).to_lowercase(),
            });
        }
        let mut config = m.config.clone();
        config.extend(self.overrides.clone());
        tracing::info!(plugin = %self.bundle.id(), kind = ?want, runtime = ?m.runtime, "building plugin instance");
        Ok(Effective {
            plugin: self.bundle.id().into(),
            config: Arc::new(config),
            cpu_ms: m.limits.cpu_ms.unwrap_or(u64::MAX).min(self.limits.cpu_ms),
            memory_mb: m
                .limits
                .memory_mb
                .unwrap_or(u64::MAX)
                .min(self.limits.memory_mb),
            max_output_bytes: self.limits.max_output_bytes,
            wasm_stack_bytes: self.limits.wasm_stack_bytes,
            max_failures: self.limits.max_consecutive_failures,
        })
    }
}

/// Split `key=value`; the key must be non-empty.
pub fn parse_override(s: &str) -> Result<(String, String), PluginError> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(PluginError::Config(format!(
            "config override {s:?} is not key=value"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_key_value_pairs() {
        assert_eq!(parse_override("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_override("a=").unwrap(), ("a".into(), String::new()));
        assert!(parse_override("=b").is_err());
        assert!(parse_override("ab").is_err());
    }

    #[test]
    fn zero_host_limits_are_rejected() {
        assert!(HostLimits::default().validate().is_ok());
        for l in [
            HostLimits {
                cpu_ms: 0,
                ..HostLimits::default()
            },
            HostLimits {
                memory_mb: 0,
                ..HostLimits::default()
            },
            HostLimits {
                max_output_bytes: 0,
                ..HostLimits::default()
            },
            HostLimits {
                wasm_stack_bytes: 0,
                ..HostLimits::default()
            },
            HostLimits {
                max_consecutive_failures: 0,
                ..HostLimits::default()
            },
        ] {
            assert!(matches!(l.validate(), Err(PluginError::Config(_))), "{l:?}");
        }
    }

    #[test]
    fn manifest_limits_are_capped_by_the_host() {
        let mut files = std::collections::BTreeMap::new();
        files.insert(
            "plugin.toml".to_string(),
            b"name = \"x\"\nversion = \"1.0.0\"\nkind = \"processor\"\nruntime = \"lua\"\nentry = \"x.lua\"\n[limits]\ncpu_ms = 5000\nmemory_mb = 8\n".to_vec(),
        );
        files.insert(
            "x.lua".to_string(),
            b"function process(r) return r end".to_vec(),
        );
        let b = Bundle::from_files(files, std::path::Path::new("x")).unwrap();
        let eff = PluginConfig::new(b).effective(Kind::Processor).unwrap();
        assert_eq!((eff.cpu_ms, eff.memory_mb), (100, 8));
    }
}
