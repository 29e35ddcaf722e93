//! Types shared by the plugin requests: what the broker says about a deployed plugin
//! ([`PluginInfo`]), how a consumer names a consume-time processor ([`ProcessorSpec`]), and
//! the `name@version` spelling ([`parse_plugin_ref`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A deployed plugin as the broker stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// `[a-z0-9-]+`.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// `processor` or `partitioner`.
    pub kind: String,
    /// `lua` or `wasm`.
    pub runtime: String,
    /// The manifest's one-line description.
    pub description: String,
    /// SHA-256 content digest of the bundle's files (lowercase hex).
    pub digest: String,
    /// When it was deployed, ms since the Unix epoch.
    pub deployed_ms: i64,
    /// Size of the stored archive, bytes.
    pub size_bytes: u64,
    /// The manifest's default config.
    pub config: BTreeMap<String, String>,
    /// What uses it now (`topic orders (partitioner)`, `consume orders/0`); empty when unused.
    pub used_by: Vec<String>,
}

impl PluginInfo {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// A consume-time processor named by a fetch or subscribe: the partition leader runs it on
/// the batches it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessorSpec {
    /// Plugin name.
    pub name: String,
    /// Exact version; `None` for the highest deployed version.
    pub version: Option<String>,
    /// Config overrides (`--processor-config key=value`).
    pub config: BTreeMap<String, String>,
}

impl ProcessorSpec {
    /// A spec from `NAME` or `NAME@VERSION`, without config overrides.
    pub fn parse(reference: &str) -> Result<ProcessorSpec, String> {
        let (name, version) = parse_plugin_ref(reference)?;
        Ok(ProcessorSpec {
            name,
            version,
            config: BTreeMap::new(),
        })
    }
}

/// Splits `NAME[@VERSION]`; the name must be `[a-z0-9-]+`.
pub fn parse_plugin_ref(reference: &str) -> Result<(String, Option<String>), String> {
    let (name, version) = match reference.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (reference, None),
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "plugin name {name:?} must be non-empty and use only a-z, 0-9 and '-'"
        ));
    }
    if let Some(v) = version {
        if v.is_empty() {
            return Err(format!(
                "plugin reference {reference:?} has an empty version"
            ));
        }
    }
    Ok((name.to_string(), version.map(str::to_string)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_refs() {
        assert_eq!(
            parse_plugin_ref("grep@1.0.0").unwrap(),
            ("grep".into(), Some("1.0.0".into()))
        );
        assert_eq!(parse_plugin_ref("grep").unwrap(), ("grep".into(), None));
        for bad in ["", "@1", "Grep", "grep@", "a b"] {
            assert!(parse_plugin_ref(bad).is_err(), "{bad:?}");
        }
    }
}
