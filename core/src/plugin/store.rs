//! Durable plugin storage in sled: `__plugins` maps `name@version` to a [`StoredPlugin`]
//! record (JSON), `__plugin_blobs` maps a content digest to the bundle archive bytes.
//! This module only stores and looks up; validation and the in-use rules live in
//! [`super::PluginService`].

use serde::{Deserialize, Serialize};

use super::PluginStoreError;
use crate::log::Database;

/// What the broker remembers about one deployed `name@version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPlugin {
    /// Plugin name.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Content digest of the bundle (key of its archive in `__plugin_blobs`).
    pub digest: String,
    /// `processor` or `partitioner`.
    pub kind: String,
    /// `lua` or `wasm`.
    pub runtime: String,
    /// The manifest's description.
    pub description: String,
    /// Deploy time, ms since the Unix epoch.
    pub deployed_ms: i64,
    /// Archive size, bytes.
    pub size: u64,
    /// Default config from the manifest.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
}

impl StoredPlugin {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// The two sled trees.
pub struct PluginStore {
    db: Database,
    records: sled::Tree,
    blobs: sled::Tree,
}

impl PluginStore {
    /// Opens (or creates) the trees in `db`.
    pub fn open(db: Database) -> Result<PluginStore, PluginStoreError> {
        Ok(PluginStore {
            records: db.open_tree("__plugins")?,
            blobs: db.open_tree("__plugin_blobs")?,
            db,
        })
    }

    /// The record of `name@version`; `Corrupt` when it no longer decodes.
    pub fn get(&self, id: &str) -> Result<Option<StoredPlugin>, PluginStoreError> {
        match self.records.get(id.as_bytes())? {
            Some(v) => decode(&v).map(Some).map_err(|e| {
                PluginStoreError::Corrupt(format!(
                    "the stored record of {id} is damaged ({e}); remove it with `quiver plugin remove {id}` and deploy it again"
                ))
            }),
            None => Ok(None),
        }
    }

    /// Every readable version of `name` (a damaged record is left out: see
    /// [`damaged`](Self::damaged)).
    pub fn versions(&self, name: &str) -> Result<Vec<StoredPlugin>, PluginStoreError> {
        let prefix = format!("{name}@");
        Ok(sort_out(self.records.scan_prefix(prefix.as_bytes()))?.0)
    }

    /// Every readable record (a damaged one is left out: see [`damaged`](Self::damaged)).
    pub fn all(&self) -> Result<Vec<StoredPlugin>, PluginStoreError> {
        Ok(sort_out(self.records.iter())?.0)
    }

    /// The ids (`name@version`) of records that no longer decode (disk damage).
    pub fn damaged(&self) -> Result<Vec<String>, PluginStoreError> {
        Ok(sort_out(self.records.iter())?.1)
    }

    /// The ids of `name`'s records that no longer decode.
    pub fn damaged_versions(&self, name: &str) -> Result<Vec<String>, PluginStoreError> {
        Ok(sort_out(self.records.scan_prefix(format!("{name}@").as_bytes()))?.1)
    }

    /// Removes the record of `id` if it no longer decodes; returns whether it did. Its
    /// archive's digest was in the record, so the archive stays unreferenced.
    pub fn remove_damaged(&self, id: &str) -> Result<bool, PluginStoreError> {
        let Some(v) = self.records.get(id.as_bytes())? else {
            return Ok(false);
        };
        if decode(&v).is_ok() {
            return Ok(false);
        }
        self.records.remove(id.as_bytes())?;
        self.db.flush()?;
        Ok(true)
    }

    /// The archive bytes of `digest`.
    pub fn blob(&self, digest: &str) -> Result<Option<sled::IVec>, PluginStoreError> {
        Ok(self.blobs.get(digest.as_bytes())?)
    }

    /// Stores the archive, then the record, and flushes: durable when this returns.
    pub fn put(&self, record: &StoredPlugin, archive: &[u8]) -> Result<(), PluginStoreError> {
        self.blobs.insert(record.digest.as_bytes(), archive)?;
        let json =
            serde_json::to_vec(record).map_err(|e| PluginStoreError::Corrupt(e.to_string()))?;
        self.records.insert(record.id().as_bytes(), json)?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes the record and, when no other record shares its digest, the archive.
    /// Returns whether the archive was deleted.
    pub fn remove(&self, record: &StoredPlugin) -> Result<bool, PluginStoreError> {
        self.records.remove(record.id().as_bytes())?;
        let shared = self.all()?.iter().any(|r| r.digest == record.digest);
        if !shared {
            self.blobs.remove(record.digest.as_bytes())?;
        }
        self.db.flush()?;
        Ok(!shared)
    }
}

/// The records of `items` that decode, and the keys (ids) of those that do not (the
/// store's open names each of those once).
fn sort_out(
    items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
) -> Result<(Vec<StoredPlugin>, Vec<String>), PluginStoreError> {
    let (mut readable, mut damaged) = (Vec::new(), Vec::new());
    for item in items {
        let (k, v) = item?;
        match decode(&v) {
            Ok(r) => readable.push(r),
            Err(_) => damaged.push(String::from_utf8_lossy(&k).into_owned()),
        }
    }
    Ok((readable, damaged))
}

fn decode(bytes: &[u8]) -> Result<StoredPlugin, PluginStoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| PluginStoreError::Corrupt(format!("plugin record: {e}")))
}
