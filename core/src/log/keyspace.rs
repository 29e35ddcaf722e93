//! Where partitions live in sled: every partition's batches share one tree
//! ([`BATCHES_TREE`]) and every time index another ([`TIME_INDEX_TREE`]), under keys
//! `topic id (u64 BE) | partition (u32 BE) | 8-byte suffix` (the base offset, or the
//! time-index key). sled keeps a cost per tree (memory, files, flush work), so a tree per
//! partition made 10,000 partitions take gigabytes while empty; shared trees cost what the
//! data costs. [`PartitionKeys`] gives one partition a view of its slice of a shared tree
//! with the prefix stripped from the keys it returns, so the partition code reads as if it
//! had a tree of its own.
//!
//! Data directories written with a tree per partition (`log/<id>/<p>`, `tidx/<id>/<p>`)
//! are moved into the shared trees the first time they are opened ([`migrate_legacy`]).

use std::collections::HashSet;

use sled::IVec;

/// The shared tree of every partition's batches.
pub const BATCHES_TREE: &str = "batches";
/// The shared tree of every partition's sparse time index.
pub const TIME_INDEX_TREE: &str = "time_index";

const PREFIX_LEN: usize = 12;

/// One writer at a time changes the shared trees. sled rewrites a whole leaf (up to 16
/// entries: here up to 16 MiB of batches) when it splits or consolidates one, and a rewrite
/// that loses a race with another writer's change of that leaf is redone from the start.
/// Concurrent appends to partitions whose keys share a leaf made sled write each large leaf
/// over and over: 9.8 GB written for 200 MB produced over 1,000 partitions, at a sixth of one
/// partition's throughput. With one writer the same run writes 0.6 GB. An insert is a copy
/// into sled's page cache, so appends lose little parallelism by taking turns here; the
/// process-wide lock is shared by the brokers of one process (tests), which only costs them
/// the same turn-taking.
static TREE_WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_writer() -> std::sync::MutexGuard<'static, ()> {
    TREE_WRITES.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key prefix of one partition.
pub fn partition_prefix(topic_id: u64, partition: u32) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[..8].copy_from_slice(&topic_id.to_be_bytes());
    p[8..].copy_from_slice(&partition.to_be_bytes());
    p
}

/// The full key of `suffix` (an offset or time-index key) in a partition's slice.
pub fn full_key(prefix: &[u8; PREFIX_LEN], suffix: &[u8; 8]) -> [u8; PREFIX_LEN + 8] {
    let mut k = [0u8; PREFIX_LEN + 8];
    k[..PREFIX_LEN].copy_from_slice(prefix);
    k[PREFIX_LEN..].copy_from_slice(suffix);
    k
}

type Entry = Result<(IVec, IVec), sled::Error>;

/// One partition's slice of a shared tree; keys going in and coming out are the 8-byte
/// suffixes.
#[derive(Clone)]
pub struct PartitionKeys {
    tree: sled::Tree,
    prefix: [u8; PREFIX_LEN],
}

impl PartitionKeys {
    /// The slice of `tree` that belongs to `topic_id`/`partition`.
    pub fn new(tree: sled::Tree, topic_id: u64, partition: u32) -> Self {
        PartitionKeys {
            tree,
            prefix: partition_prefix(topic_id, partition),
        }
    }

    fn key(&self, suffix: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(PREFIX_LEN + suffix.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(suffix);
        k
    }

    fn strip(item: Entry) -> Entry {
        item.map(|(k, v)| (IVec::from(&k[PREFIX_LEN.min(k.len())..]), v))
    }

    /// Stores `value` under `suffix`.
    pub fn insert(&self, suffix: &[u8], value: impl Into<IVec>) -> Result<(), sled::Error> {
        let _turn = one_writer();
        self.tree.insert(self.key(suffix), value)?;
        Ok(())
    }

    /// Removes `suffix`.
    pub fn remove(&self, suffix: &[u8]) -> Result<(), sled::Error> {
        let _turn = one_writer();
        self.tree.remove(self.key(suffix))?;
        Ok(())
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Entry> {
        self.tree
            .range(full_key(&self.prefix, &[0; 8])..=full_key(&self.prefix, &[0xff; 8]))
            .map(Self::strip)
    }

    /// Entries from `suffix` on.
    pub fn range_from(&self, suffix: &[u8; 8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.tree
            .range(full_key(&self.prefix, suffix)..=full_key(&self.prefix, &[0xff; 8]))
            .map(Self::strip)
    }

    /// Entries up to and including `suffix`.
    pub fn range_through(&self, suffix: &[u8; 8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.tree
            .range(full_key(&self.prefix, &[0; 8])..=full_key(&self.prefix, suffix))
            .map(Self::strip)
    }

    /// Entries before `suffix`.
    pub fn range_before(&self, suffix: &[u8; 8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.tree
            .range(full_key(&self.prefix, &[0; 8])..full_key(&self.prefix, suffix))
            .map(Self::strip)
    }

    /// The first entry.
    pub fn first(&self) -> Result<Option<(IVec, IVec)>, sled::Error> {
        self.iter().next().transpose()
    }

    /// The last entry.
    pub fn last(&self) -> Result<Option<(IVec, IVec)>, sled::Error> {
        self.iter().next_back().transpose()
    }

    /// Removes every entry of the partition.
    pub fn clear(&self) -> Result<(), sled::Error> {
        let keys: Vec<IVec> = self
            .tree
            .range(full_key(&self.prefix, &[0; 8])..=full_key(&self.prefix, &[0xff; 8]))
            .keys()
            .collect::<Result<_, _>>()?;
        for k in keys {
            let _turn = one_writer();
            self.tree.remove(k)?;
        }
        Ok(())
    }
}

/// Moves a partition's entries from its own legacy tree (`name`, when `legacy` lists it)
/// into its slice of the shared tree, then drops the legacy tree.
pub fn migrate_legacy(
    db: &sled::Db,
    legacy: &HashSet<Vec<u8>>,
    name: &str,
    into: &PartitionKeys,
) -> Result<u64, sled::Error> {
    if !legacy.contains(name.as_bytes()) {
        return Ok(0);
    }
    let old = db.open_tree(name)?;
    let mut moved = 0;
    for item in old.iter() {
        let (k, v) = item?;
        into.insert(&k, v)?;
        moved += 1;
    }
    db.flush()?;
    db.drop_tree(name)?;
    tracing::info!(
        tree = name,
        entries = moved,
        "moved a partition's legacy tree into the shared tree"
    );
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_see_only_their_own_slice() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree(BATCHES_TREE).unwrap();
        let a = PartitionKeys::new(tree.clone(), 7, 0);
        let b = PartitionKeys::new(tree.clone(), 7, 1);
        let c = PartitionKeys::new(tree, 8, 0);
        for o in [0u64, 5, 9] {
            a.insert(&o.to_be_bytes(), &b"a"[..]).unwrap();
            b.insert(&(o + 100).to_be_bytes(), &b"b"[..]).unwrap();
        }
        assert_eq!(a.iter().count(), 3);
        assert_eq!(c.iter().count(), 0);
        assert_eq!(c.last().unwrap(), None);
        assert_eq!(&a.last().unwrap().unwrap().0[..], &9u64.to_be_bytes());
        assert_eq!(&b.first().unwrap().unwrap().0[..], &100u64.to_be_bytes());
        let through: Vec<_> = a
            .range_through(&5u64.to_be_bytes())
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(through.len(), 2);
        assert_eq!(a.range_before(&5u64.to_be_bytes()).count(), 1);
        assert_eq!(a.range_from(&6u64.to_be_bytes()).count(), 1);
        a.clear().unwrap();
        assert_eq!(a.iter().count(), 0);
        assert_eq!(
            b.iter().count(),
            3,
            "clearing one partition leaves its neighbours"
        );
    }

    #[test]
    fn a_legacy_tree_is_moved_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let old = db.open_tree("log/7/0").unwrap();
        old.insert(3u64.to_be_bytes(), &b"x"[..]).unwrap();
        let legacy: HashSet<Vec<u8>> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
        let keys = PartitionKeys::new(db.open_tree(BATCHES_TREE).unwrap(), 7, 0);
        assert_eq!(migrate_legacy(&db, &legacy, "log/7/0", &keys).unwrap(), 1);
        assert_eq!(keys.iter().count(), 1);
        let after: HashSet<Vec<u8>> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
        assert!(!after.contains(b"log/7/0".as_slice()));
    }
}
