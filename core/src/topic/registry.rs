//! The topic registry: which topics exist, their partitions and config, persisted in the
//! `__topics` sled tree; it opens every partition log at start and drops them on delete.
//!
//! A deletion removes the topic record, then every key of its partitions, in many sled
//! writes. It is written down first (`__topics_deleting`), so one a crash interrupted is
//! finished at the next start: otherwise the rest of the topic's data would stay on disk for
//! good, owned by no topic (ids are never given out again).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use quiver_protocol::requests::validate_topic_name;
use quiver_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use super::TopicConfig;
use crate::log::{Database, LogError, PartitionLog};

/// Most partitions one topic may have.
pub const MAX_PARTITIONS: u32 = 10_000;
/// The sled tree of topic records (JSON [`TopicMeta`] by name).
pub const TOPICS_TREE: &str = "__topics";
/// The sled tree of per-partition metadata records.
pub const PARTITION_META_TREE: &str = "__partition_meta";
/// The sled tree of deletions under way (the topic's record as it was, by id).
pub const DELETING_TREE: &str = "__topics_deleting";

/// A topic-level failure with its wire code.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// No such topic.
    #[error("topic {0:?} does not exist; create it with `quiver topic create {0}`")]
    NotFound(String),
    /// No such partition.
    #[error("topic {topic:?} has {count} partitions; partition {partition} does not exist")]
    NoPartition {
        /// Topic.
        topic: String,
        /// Asked for.
        partition: u32,
        /// Partitions the topic has.
        count: u32,
    },
    /// The name is taken.
    #[error("topic {0:?} already exists")]
    AlreadyExists(String),
    /// The name is not valid.
    #[error("{0}")]
    InvalidName(String),
    /// A config key or value is not valid.
    #[error("{0}")]
    InvalidConfig(String),
    /// The partition count is not valid.
    #[error("{0}")]
    InvalidPartitions(String),
    /// Storage failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The topic's stored record cannot be read (disk damage, not a crash): the topic is
    /// offline, and its data is kept.
    #[error("{}", damaged_message(topic, reason))]
    Damaged {
        /// The topic.
        topic: String,
        /// What could not be read.
        reason: String,
    },
    /// A client asked to change an internal topic.
    #[error("{topic:?} is an internal topic (names starting with \"__\" belong to the broker); clients cannot {action} it")]
    Internal {
        /// The topic.
        topic: String,
        /// What was refused: "produce to", "alter", "delete".
        action: &'static str,
    },
}

/// What a damaged topic record means to the user: a client's topic can be dropped; the
/// broker cannot do without an internal one.
fn damaged_message(topic: &str, reason: &str) -> String {
    if is_internal(topic) {
        format!("the broker's internal topic {topic:?} cannot be opened: its stored record is damaged ({reason}); restore the data directory from a backup")
    } else {
        format!("topic {topic:?} is offline: its stored record is damaged ({reason}); its data is kept but cannot be reached. Restore the data directory from a backup, or drop the topic with `quiver topic delete {topic}` (its stored batches then stay on disk unreferenced); in a cluster the broker copies the topic again from its other replicas")
    }
}

/// True for the broker's own topics (`__consumer_offsets`, ...).
pub fn is_internal(name: &str) -> bool {
    name.starts_with("__")
}

/// Refuses a client's `action` on an internal topic.
pub fn refuse_internal(name: &str, action: &'static str) -> Result<(), TopicError> {
    if is_internal(name) {
        return Err(TopicError::Internal {
            topic: name.to_string(),
            action,
        });
    }
    Ok(())
}

impl From<sled::Error> for TopicError {
    fn from(e: sled::Error) -> Self {
        TopicError::Log(LogError::Sled(e))
    }
}

impl TopicError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            TopicError::NotFound(_) | TopicError::NoPartition { .. } => {
                ErrorCode::UnknownTopicOrPartition
            }
            TopicError::AlreadyExists(_) => ErrorCode::TopicAlreadyExists,
            TopicError::InvalidName(_) => ErrorCode::InvalidTopicName,
            TopicError::InvalidConfig(_) => ErrorCode::InvalidConfig,
            TopicError::InvalidPartitions(_) => ErrorCode::InvalidPartitions,
            TopicError::Log(e) => e.code(),
            TopicError::Damaged { .. } => ErrorCode::StorageError,
            TopicError::Internal { .. } => ErrorCode::InvalidTopicName,
        }
    }
}

/// The durable record of a topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicMeta {
    /// Internal id (names the sled trees, so a re-created topic never sees old data).
    pub id: u64,
    /// Name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Config keys set explicitly on this topic; the rest follow the broker defaults.
    pub overrides: BTreeMap<String, String>,
    /// Creation time (ms).
    pub created_ms: i64,
    /// In a cluster: the controller's id of the topic this is a replica of (a topic deleted
    /// and created again under the same name gets a new one, and its old data goes).
    #[serde(default)]
    pub cluster_id: Option<u64>,
}

/// A live topic.
pub struct Topic {
    /// The durable record.
    pub meta: RwLock<TopicMeta>,
    config: RwLock<TopicConfig>,
    /// Partition logs, by index.
    pub partitions: Vec<Arc<PartitionLog>>,
}

impl Topic {
    /// The effective config now.
    pub fn config(&self) -> TopicConfig {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The topic's name.
    pub fn name(&self) -> String {
        self.meta
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .name
            .clone()
    }

    /// The topic's internal id.
    pub fn id(&self) -> u64 {
        self.meta.read().unwrap_or_else(|p| p.into_inner()).id
    }
}

/// A topic record that could not be read.
struct DamagedRecord {
    /// Its key as stored (the name shown may have lost bytes that are not UTF-8).
    key: Vec<u8>,
    /// What could not be read.
    reason: String,
}

/// All topics of this broker.
pub struct TopicRegistry {
    db: Database,
    topics_tree: sled::Tree,
    partition_meta: sled::Tree,
    defaults: TopicConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Topics whose stored record could not be read at open, by name as shown: offline
    /// until deleted.
    damaged: RwLock<HashMap<String, DamagedRecord>>,
    admin: std::sync::Mutex<()>,
}

impl TopicRegistry {
    /// Opens the registry and every partition log in `db`.
    pub fn open(db: Database, defaults: TopicConfig) -> Result<TopicRegistry, TopicError> {
        let topics_tree = db.open_tree(TOPICS_TREE)?;
        let partition_meta = db.open_tree(PARTITION_META_TREE)?;
        // Trees a data directory may still have from before partitions shared trees.
        let legacy: HashSet<Vec<u8>> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
        let mut topics = HashMap::new();
        let mut damaged = HashMap::new();
        for item in topics_tree.iter() {
            let (key, v) = item?;
            let meta: TopicMeta = match serde_json::from_slice(&v) {
                Ok(meta) => meta,
                Err(e) => {
                    // One unreadable record takes only its topic offline: the others serve.
                    let name = String::from_utf8_lossy(&key).into_owned();
                    tracing::error!(topic = %name, error = %e, "the topic's stored record is damaged; the topic is offline (its data is kept)");
                    damaged.insert(
                        name,
                        DamagedRecord {
                            key: key.to_vec(),
                            reason: format!("topic record: {e}"),
                        },
                    );
                    continue;
                }
            };
            let config = defaults.with_changes(&meta.overrides).unwrap_or_else(|e| {
                tracing::warn!(topic = %meta.name, error = %e, "stored topic config no longer valid; using defaults");
                defaults.clone()
            });
            let mut parts = Vec::with_capacity(meta.partitions as usize);
            for p in 0..meta.partitions {
                parts.push(Arc::new(PartitionLog::open(
                    &db,
                    partition_meta.clone(),
                    &legacy,
                    meta.id,
                    &meta.name,
                    p,
                )?));
            }
            tracing::info!(topic = %meta.name, partitions = meta.partitions, "recovered topic");
            topics.insert(
                meta.name.clone(),
                Arc::new(Topic {
                    meta: RwLock::new(meta),
                    config: RwLock::new(config),
                    partitions: parts,
                }),
            );
        }
        finish_deletions(&db, &partition_meta, &topics, &damaged)?;
        Ok(TopicRegistry {
            db,
            topics_tree,
            partition_meta,
            defaults,
            topics: RwLock::new(topics),
            damaged: RwLock::new(damaged),
            admin: std::sync::Mutex::new(()),
        })
    }

    /// The topic, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The topic or `NotFound` (`Damaged` for one whose stored record is unreadable).
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        self.get(name).ok_or_else(|| {
            self.damaged_error(name)
                .unwrap_or_else(|| TopicError::NotFound(name.to_string()))
        })
    }

    /// `Damaged` when `name`'s stored record could not be read at open.
    fn damaged_error(&self, name: &str) -> Option<TopicError> {
        let damaged = self.damaged.read().unwrap_or_else(|p| p.into_inner());
        damaged.get(name).map(|d| TopicError::Damaged {
            topic: name.to_string(),
            reason: d.reason.clone(),
        })
    }

    /// Names of the topics offline because their stored record is damaged, sorted.
    pub fn damaged(&self) -> Vec<String> {
        let damaged = self.damaged.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = damaged.keys().cloned().collect();
        names.sort();
        names
    }

    /// A partition of a topic.
    pub fn partition(
        &self,
        name: &str,
        partition: u32,
    ) -> Result<(Arc<Topic>, Arc<PartitionLog>), TopicError> {
        let t = self.topic(name)?;
        let p = t
            .partitions
            .get(partition as usize)
            .cloned()
            .ok_or(TopicError::NoPartition {
                topic: name.to_string(),
                partition,
                count: t.partitions.len() as u32,
            })?;
        Ok((t, p))
    }

    /// All topics, sorted by name.
    pub fn list(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|t| t.name());
        v
    }

    /// Creates a topic.
    pub fn create(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Arc<Topic>, TopicError> {
        if is_internal(name) {
            return Err(TopicError::InvalidName(format!(
                "topic names starting with \"__\" are reserved for internal topics: {name:?}"
            )));
        }
        self.create_any(name, partitions, overrides, None)
    }

    /// Cluster brokers: makes this broker's copy of the controller's topic `name` (id
    /// `cluster_id`) match it: created when missing, replaced when the local copy belongs to
    /// an older topic of the same name, its config set to `overrides`. Returns the topic.
    pub fn ensure_replica(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
        cluster_id: u64,
    ) -> Result<Arc<Topic>, TopicError> {
        if let Some(t) = self.get(name) {
            let meta = t.meta.read().unwrap_or_else(|p| p.into_inner()).clone();
            if meta.cluster_id == Some(cluster_id) && meta.partitions <= partitions {
                let t = if meta.partitions < partitions {
                    self.add_partitions(name, partitions)?
                } else {
                    t
                };
                if &meta.overrides != overrides {
                    return self.replace_config(name, overrides);
                }
                return Ok(t);
            }
            tracing::info!(
                topic = name,
                "the local copy belongs to another topic of this name; replacing it"
            );
            self.delete(name)?;
        }
        // Not over a local copy whose record is damaged: an empty replica in its place could
        // be chosen to lead (the last of an ISR) and lose what the others no longer have.
        // The replica manager replaces it (`replace_damaged`) once no ISR counts on this
        // broker's copy, or drops it once the controller no longer holds the topic.
        self.create_any(name, partitions, overrides, Some(cluster_id))
    }

    /// The cluster id of a local topic (`None` for a lone broker's or an internal topic).
    pub fn cluster_id(&self, name: &str) -> Option<u64> {
        self.get(name)
            .and_then(|t| t.meta.read().unwrap_or_else(|p| p.into_inner()).cluster_id)
    }

    /// Creates an internal topic (a name starting with `__`, such as `__consumer_offsets`);
    /// only the broker itself calls this.
    pub fn create_internal(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Arc<Topic>, TopicError> {
        self.create_any(name, partitions, overrides, None)
    }

    /// Creates a topic; a name whose stored record is damaged is refused.
    fn create_any(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
        cluster_id: Option<u64>,
    ) -> Result<Arc<Topic>, TopicError> {
        validate_topic_name(name).map_err(TopicError::InvalidName)?;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(TopicError::InvalidPartitions(format!(
                "partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}"
            )));
        }
        let config = self
            .defaults
            .with_changes(overrides)
            .map_err(TopicError::InvalidConfig)?;
        let _guard = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        if self.get(name).is_some() {
            return Err(TopicError::AlreadyExists(name.to_string()));
        }
        if let Some(e) = self.damaged_error(name) {
            return Err(e);
        }
        let meta = TopicMeta {
            id: self.db.generate_id()?,
            name: name.to_string(),
            partitions,
            overrides: overrides.clone(),
            created_ms: crate::clock::now_ms(),
            cluster_id,
        };
        let mut parts = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            parts.push(Arc::new(PartitionLog::open(
                &self.db,
                self.partition_meta.clone(),
                &HashSet::new(),
                meta.id,
                name,
                p,
            )?));
        }
        self.topics_tree.insert(
            name.as_bytes(),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )?;
        self.db.flush()?;
        let topic = Arc::new(Topic {
            meta: RwLock::new(meta),
            config: RwLock::new(config),
            partitions: parts,
        });
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), topic.clone());
        tracing::info!(topic = name, partitions, "created topic");
        Ok(topic)
    }

    /// Grows a topic to `total` partitions (more than it has); the new ones start empty.
    pub fn add_partitions(&self, name: &str, total: u32) -> Result<Arc<Topic>, TopicError> {
        let _guard = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let topic = self.topic(name)?;
        let mut meta = topic.meta.read().unwrap_or_else(|p| p.into_inner()).clone();
        if total <= meta.partitions || total > MAX_PARTITIONS {
            return Err(TopicError::InvalidPartitions(format!(
                "topic {name:?} has {} partitions; the new count must be larger, and at most {MAX_PARTITIONS}, got {total}",
                meta.partitions
            )));
        }
        let mut parts = topic.partitions.clone();
        for p in meta.partitions..total {
            parts.push(Arc::new(PartitionLog::open(
                &self.db,
                self.partition_meta.clone(),
                &HashSet::new(),
                meta.id,
                name,
                p,
            )?));
        }
        meta.partitions = total;
        self.topics_tree.insert(
            name.as_bytes(),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )?;
        self.db.flush()?;
        let grown = Arc::new(Topic {
            meta: RwLock::new(meta),
            config: RwLock::new(topic.config()),
            partitions: parts,
        });
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), grown.clone());
        tracing::info!(topic = name, partitions = total, "added partitions");
        Ok(grown)
    }

    /// Sets config keys on a topic and removes the overrides of others (back to the
    /// broker's defaults): all or nothing.
    pub fn alter(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Arc<Topic>, TopicError> {
        // Read, change and store under one lock: two alters at once both take effect.
        let _guard = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let current = self
            .topic(name)?
            .meta
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .overrides
            .clone();
        let overrides =
            super::altered_overrides(&current, set, remove).map_err(TopicError::InvalidConfig)?;
        self.store_config(name, &overrides)
    }

    /// Replaces a topic's config overrides: all or nothing.
    fn replace_config(
        &self,
        name: &str,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Arc<Topic>, TopicError> {
        let _guard = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        self.store_config(name, overrides)
    }

    /// Checks and stores a topic's overrides; the caller holds the admin lock.
    fn store_config(
        &self,
        name: &str,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Arc<Topic>, TopicError> {
        let topic = self.topic(name)?;
        let mut meta = topic.meta.read().unwrap_or_else(|p| p.into_inner()).clone();
        let config = self
            .defaults
            .with_changes(overrides)
            .map_err(TopicError::InvalidConfig)?;
        meta.overrides = overrides.clone();
        self.topics_tree.insert(
            name.as_bytes(),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )?;
        self.db.flush()?;
        *topic.meta.write().unwrap_or_else(|p| p.into_inner()) = meta;
        *topic.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        tracing::info!(topic = name, ?overrides, "altered topic config");
        Ok(topic)
    }

    /// Deletes a topic and its data; returns the number of partitions dropped.
    pub fn delete(&self, name: &str) -> Result<u32, TopicError> {
        let _guard = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let removed = self
            .topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let Some(topic) = removed else {
            return self.delete_damaged(name).map(|()| 0);
        };
        let deleting = self.db.open_tree(DELETING_TREE)?;
        let meta = topic.meta.read().unwrap_or_else(|p| p.into_inner()).clone();
        deleting.insert(
            meta.id.to_be_bytes(),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )?;
        self.topics_tree.remove(name.as_bytes())?;
        for p in &topic.partitions {
            p.delete()?;
        }
        deleting.remove(meta.id.to_be_bytes())?;
        self.db.flush()?;
        tracing::info!(topic = name, "deleted topic");
        Ok(topic.partitions.len() as u32)
    }

    /// A cluster's replica of `name` in place of a damaged local record: the record is
    /// dropped (its batches stay on disk unreferenced) and an empty replica created, which
    /// copies the leaders from the start. The caller makes sure no ISR counts on this
    /// broker's copy first ([`crate::cluster::ControllerCommand::ReplicaLost`]).
    pub fn replace_damaged(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
        cluster_id: u64,
    ) -> Result<Arc<Topic>, TopicError> {
        self.delete_damaged(name)?;
        self.create_any(name, partitions, overrides, Some(cluster_id))
    }

    /// Drops the unreadable record of a damaged topic (`NotFound` for a name with no
    /// record). Which partitions were its is unknown, so its data stays on disk
    /// unreferenced.
    fn delete_damaged(&self, name: &str) -> Result<(), TopicError> {
        let mut damaged = self.damaged.write().unwrap_or_else(|p| p.into_inner());
        let Some(record) = damaged.get(name) else {
            return Err(TopicError::NotFound(name.to_string()));
        };
        self.topics_tree.remove(&record.key[..])?;
        self.db.flush()?;
        damaged.remove(name);
        tracing::warn!(
            topic = name,
            "dropped the damaged record of a topic; its stored batches stay on disk unreferenced"
        );
        Ok(())
    }
}

/// Finishes the deletions a crash interrupted: erases what is left of each topic's
/// partitions, unless its record is still there (the deletion had not begun: the topic
/// stays).
fn finish_deletions(
    db: &Database,
    partition_meta: &sled::Tree,
    topics: &HashMap<String, Arc<Topic>>,
    damaged: &HashMap<String, DamagedRecord>,
) -> Result<(), TopicError> {
    let deleting = db.open_tree(DELETING_TREE)?;
    for item in deleting.iter() {
        let (key, value) = item?;
        match serde_json::from_slice::<TopicMeta>(&value) {
            // Whether the deletion had begun cannot be told from a damaged record: its
            // data and this record stay.
            Ok(meta) if damaged.contains_key(&meta.name) => {
                tracing::warn!(topic = %meta.name, "a deletion under way names a topic whose record is damaged; its data stays");
                continue;
            }
            Ok(meta) if !topics.values().any(|t| t.id() == meta.id) => {
                for p in 0..meta.partitions {
                    crate::log::partition::erase_stored(db, partition_meta, meta.id, p)?;
                }
                tracing::info!(topic = %meta.name, partitions = meta.partitions, "finished a deletion a restart interrupted");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "an unreadable record of a deletion under way; its data stays")
            }
        }
        deleting.remove(key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deletion_a_crash_interrupted_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        let r = TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap();
        let topic = r.create("doomed", 2, &BTreeMap::new()).unwrap();
        let kept = r.create("kept", 1, &BTreeMap::new()).unwrap();
        let id = topic.id();
        // Values under each partition's keys and in its slot region, as appends leave them.
        let batches = db.open_tree(crate::log::keyspace::BATCHES_TREE).unwrap();
        for (tid, parts) in [(id, 2u32)] {
            for p in 0..parts {
                for region in [tid, tid | (1 << 63)] {
                    let prefix = crate::log::keyspace::partition_prefix(region, p);
                    let key = crate::log::keyspace::full_key(&prefix, &7u64.to_be_bytes());
                    batches.insert(key, vec![1u8; 100]).unwrap();
                }
            }
        }
        let stored = |id: u64| {
            [id, id | (1 << 63)]
                .iter()
                .map(|r| batches.scan_prefix(r.to_be_bytes()).count())
                .sum::<usize>()
        };
        assert!(stored(id) > 0);
        // The deletion's first steps, then a crash: the record gone, the data still there.
        let meta = topic.meta.read().unwrap().clone();
        db.open_tree(DELETING_TREE)
            .unwrap()
            .insert(id.to_be_bytes(), serde_json::to_vec(&meta).unwrap())
            .unwrap();
        db.open_tree(TOPICS_TREE).unwrap().remove("doomed").unwrap();
        drop((r, topic, kept));
        let r = TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap();
        assert!(r.get("doomed").is_none());
        assert_eq!(
            stored(id),
            0,
            "the rest of the deleted topic's data is gone"
        );
        assert!(db.open_tree(DELETING_TREE).unwrap().is_empty());
        let kept = r.get("kept").expect("other topics stay");
        // A deletion written down whose record is still there had not begun: the topic stays.
        let meta = kept.meta.read().unwrap().clone();
        db.open_tree(DELETING_TREE)
            .unwrap()
            .insert(meta.id.to_be_bytes(), serde_json::to_vec(&meta).unwrap())
            .unwrap();
        drop((r, kept));
        let r = TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap();
        assert_eq!(r.get("kept").map(|t| t.id()), Some(meta.id));
        assert!(db.open_tree(DELETING_TREE).unwrap().is_empty());
    }

    /// An unreadable topic record (disk damage) takes only that topic offline: the others
    /// open and serve, the damaged one answers `StorageError` naming what to do, its name
    /// cannot be taken by a create, and deleting it drops the record.
    #[test]
    fn a_damaged_topic_record_takes_only_its_topic_offline() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        let r = TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap();
        r.create("healthy", 2, &BTreeMap::new()).unwrap();
        r.create("hurt", 1, &BTreeMap::new()).unwrap();
        r.create("replica", 1, &BTreeMap::new()).unwrap();
        drop(r);
        let topics = db.open_tree(TOPICS_TREE).unwrap();
        topics.insert("hurt", &b"{\"id\": 7, \"na\xff"[..]).unwrap();
        topics.insert("replica", &b"\x00"[..]).unwrap();
        topics.insert("__internal", &b"\x00"[..]).unwrap();
        let r = TopicRegistry::open(db.clone(), TopicConfig::default())
            .expect("one damaged topic record does not stop the open");
        assert_eq!(r.topic("healthy").unwrap().partitions.len(), 2);
        assert_eq!(r.damaged(), ["__internal", "hurt", "replica"]);
        // The broker's own topics cannot be dropped: its create says to restore instead.
        let e = r
            .create_internal("__internal", 1, &BTreeMap::new())
            .err()
            .expect("refused");
        assert!(e.to_string().contains("restore the data directory"), "{e}");
        // In a cluster the controller's copy does not replace a damaged one either: an
        // empty replica could be made leader and lose what the others no longer have.
        assert!(matches!(
            r.ensure_replica("replica", 2, &BTreeMap::new(), 42),
            Err(TopicError::Damaged { .. })
        ));
        let names: Vec<String> = r.list().iter().map(|t| t.name()).collect();
        assert_eq!(names, ["healthy"]);
        let e = r.topic("hurt").err().expect("offline");
        assert_eq!(e.code(), ErrorCode::StorageError);
        assert!(e.to_string().contains("quiver topic delete hurt"), "{e}");
        assert!(matches!(
            r.create("hurt", 1, &BTreeMap::new()),
            Err(TopicError::Damaged { .. })
        ));
        assert!(matches!(
            r.partition("hurt", 0),
            Err(TopicError::Damaged { .. })
        ));
        // The record stays as it was until the topic is deleted.
        let before = topics.get("hurt").unwrap();
        drop(r);
        let r = TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap();
        assert_eq!(topics.get("hurt").unwrap(), before);
        assert_eq!(r.delete("hurt").unwrap(), 0);
        assert!(topics.get("hurt").unwrap().is_none());
        assert_eq!(r.damaged(), ["__internal", "replica"]);
        assert!(matches!(r.topic("hurt"), Err(TopicError::NotFound(_))));
        r.create("hurt", 3, &BTreeMap::new()).unwrap();
        drop(r);
        let r = TopicRegistry::open(db, TopicConfig::default()).unwrap();
        assert_eq!(r.topic("hurt").unwrap().partitions.len(), 3);
        assert_eq!(r.damaged(), ["__internal", "replica"]);
    }

    #[test]
    fn create_alter_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
        let r = TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap();
        let cfg = BTreeMap::from([("retention.ms".to_string(), "60000".to_string())]);
        r.create("orders", 3, &cfg).unwrap();
        assert!(matches!(
            r.create("orders", 3, &cfg),
            Err(TopicError::AlreadyExists(_))
        ));
        assert!(matches!(
            r.create("a/b", 1, &cfg),
            Err(TopicError::InvalidName(_))
        ));
        assert!(matches!(
            r.create("x", 0, &cfg),
            Err(TopicError::InvalidPartitions(_))
        ));
        let bad = BTreeMap::from([("nope".to_string(), "1".to_string())]);
        assert!(matches!(
            r.create("y", 1, &bad),
            Err(TopicError::InvalidConfig(_))
        ));
        assert!(
            r.get("y").is_none(),
            "a refused create leaves nothing behind"
        );
        assert!(r.alter("orders", &bad, &[]).is_err());
        r.alter(
            "orders",
            &BTreeMap::from([("flush".to_string(), "interval".to_string())]),
            &[],
        )
        .unwrap();
        // Removing an override goes back to the default; a key both set and removed, or
        // unknown, changes nothing.
        let both = BTreeMap::from([("retention.ms".to_string(), "5".to_string())]);
        assert!(r.alter("orders", &both, &["retention.ms".into()]).is_err());
        assert!(r
            .alter("orders", &BTreeMap::new(), &["nope".into()])
            .is_err());
        assert_eq!(r.topic("orders").unwrap().config().retention_ms, 60000);
        let bytes = BTreeMap::from([("retention.bytes".to_string(), "1000".to_string())]);
        r.alter("orders", &bytes, &[]).unwrap();
        assert_eq!(r.topic("orders").unwrap().config().retention_bytes, 1000);
        r.alter("orders", &BTreeMap::new(), &["retention.bytes".into()])
            .unwrap();
        let t = r.topic("orders").unwrap();
        assert_eq!(
            t.config().retention_bytes,
            TopicConfig::default().retention_bytes
        );
        assert!(!t
            .meta
            .read()
            .unwrap()
            .overrides
            .contains_key("retention.bytes"));
        drop(r);
        let r = TopicRegistry::open(db.clone(), TopicConfig::default()).unwrap();
        let t = r.topic("orders").unwrap();
        assert_eq!(t.partitions.len(), 3);
        assert_eq!(t.config().retention_ms, 60000);
        assert_eq!(t.config().flush, crate::topic::FlushPolicy::Interval);
        assert_eq!(r.delete("orders").unwrap(), 3);
        assert!(r.get("orders").is_none());
        let r = TopicRegistry::open(db, TopicConfig::default()).unwrap();
        assert!(r.list().is_empty());
    }
}
