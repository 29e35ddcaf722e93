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

/// A value longer than this is stored as chunks of this size: the first under its key, the
/// rest under the key followed by the chunk's index (u16 BE, from 1), which sort right after
/// it and before the next key. sled keeps up to 17 entries in a leaf and rewrites the whole
/// leaf when it splits or consolidates, and writes any entry over a quarter of its segment
/// to a file of its own: so a leaf of 1 MiB batches was a 16 MiB file written each time.
/// 16 KiB chunks keep a full leaf (272 KiB) inside the 4 MiB segments of
/// [`super::store`]; the chunks' sizes have changed before (whole values, then 256 KiB
/// chunks) and every stored form reads back whole.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// Length of a chunk's suffix: the value's 8-byte suffix and the chunk index.
const CHUNK_SUFFIX_LEN: usize = 10;

/// One partition's slice of a shared tree; keys going in and coming out are the 8-byte
/// suffixes, and values come out whole however they were stored.
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

    /// The key just past every chunk of `suffix` (and of any smaller suffix).
    fn past_chunks_of(&self, suffix: &[u8; 8]) -> Vec<u8> {
        let mut k = self.key(suffix);
        k.extend_from_slice(&[0xff, 0xff]);
        k
    }

    fn strip(item: Entry) -> Entry {
        item.map(|(k, v)| (IVec::from(&k[PREFIX_LEN.min(k.len())..]), v))
    }

    /// The full keys of the chunks after the first stored for the 8-byte `suffix`.
    fn chunk_keys(&self, suffix: &[u8]) -> Result<Vec<IVec>, sled::Error> {
        if suffix.len() != 8 {
            return Ok(Vec::new());
        }
        let mut from = self.key(suffix);
        from.extend_from_slice(&[0, 0]);
        let mut to = self.key(suffix);
        to.extend_from_slice(&[0xff, 0xff]);
        self.tree.range(from..=to).keys().collect()
    }

    /// Stores `value` under `suffix` (in chunks when it is longer than [`CHUNK_BYTES`],
    /// all of them or none).
    pub fn insert(&self, suffix: &[u8], value: impl Into<IVec>) -> Result<(), sled::Error> {
        let value: IVec = value.into();
        let key = self.key(suffix);
        let _turn = one_writer();
        let stale = self.chunk_keys(suffix)?;
        if stale.is_empty() && (value.len() <= CHUNK_BYTES || suffix.len() != 8) {
            self.tree.insert(key, value)?;
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for k in stale {
            batch.remove(k);
        }
        for (i, chunk) in value.chunks(CHUNK_BYTES).enumerate() {
            if i == 0 {
                batch.insert(key.clone(), chunk);
                continue;
            }
            let index = u16::try_from(i).map_err(|_| {
                sled::Error::Unsupported(format!(
                    "a value of {} bytes needs more than {} chunks",
                    value.len(),
                    u16::MAX
                ))
            })?;
            let mut k = key.clone();
            k.extend_from_slice(&index.to_be_bytes());
            batch.insert(k, chunk);
        }
        self.tree.apply_batch(batch)
    }

    /// Removes `suffix` (every chunk of it).
    pub fn remove(&self, suffix: &[u8]) -> Result<(), sled::Error> {
        let _turn = one_writer();
        let chunks = self.chunk_keys(suffix)?;
        if chunks.is_empty() {
            self.tree.remove(self.key(suffix))?;
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        batch.remove(self.key(suffix));
        for k in chunks {
            batch.remove(k);
        }
        self.tree.apply_batch(batch)
    }

    fn whole(&self, range: sled::Iter) -> Chunked<impl DoubleEndedIterator<Item = Entry>> {
        Chunked::new(range.map(Self::strip))
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Entry> {
        self.whole(
            self.tree
                .range(full_key(&self.prefix, &[0; 8]).to_vec()..=self.past_chunks_of(&[0xff; 8])),
        )
    }

    /// Entries from `suffix` on.
    pub fn range_from(&self, suffix: &[u8; 8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.whole(
            self.tree
                .range(full_key(&self.prefix, suffix).to_vec()..=self.past_chunks_of(&[0xff; 8])),
        )
    }

    /// Entries up to and including `suffix`.
    pub fn range_through(&self, suffix: &[u8; 8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.whole(
            self.tree
                .range(full_key(&self.prefix, &[0; 8]).to_vec()..=self.past_chunks_of(suffix)),
        )
    }

    /// Entries before `suffix`.
    pub fn range_before(&self, suffix: &[u8; 8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.whole(self.tree.range(
            full_key(&self.prefix, &[0; 8]).to_vec()..full_key(&self.prefix, suffix).to_vec(),
        ))
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
            .range(full_key(&self.prefix, &[0; 8]).to_vec()..=self.past_chunks_of(&[0xff; 8]))
            .keys()
            .collect::<Result<_, _>>()?;
        for k in keys {
            let _turn = one_writer();
            self.tree.remove(k)?;
        }
        Ok(())
    }
}

/// Entries with their chunks joined: a value's first entry (an 8-byte suffix) followed by
/// its chunks (10-byte suffixes with the same first 8 bytes) comes out as one entry. A
/// chunk without its first entry (never written: chunks go in and out together) is skipped.
struct Chunked<I> {
    inner: I,
    /// An entry read past the end of the previous value, going forwards.
    ahead: Option<(IVec, IVec)>,
}

impl<I: DoubleEndedIterator<Item = Entry>> Chunked<I> {
    fn new(inner: I) -> Self {
        Chunked { inner, ahead: None }
    }

    fn is_chunk_of(chunk: &[u8], first: &[u8]) -> bool {
        chunk.len() == CHUNK_SUFFIX_LEN && first.len() == 8 && chunk[..8] == *first
    }
}

impl<I: DoubleEndedIterator<Item = Entry>> Iterator for Chunked<I> {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        loop {
            let (k, v) = match self.ahead.take() {
                Some(e) => e,
                None => match self.inner.next()? {
                    Ok(e) => e,
                    Err(e) => return Some(Err(e)),
                },
            };
            if k.len() == CHUNK_SUFFIX_LEN {
                continue;
            }
            let mut joined: Option<Vec<u8>> = None;
            loop {
                match self.inner.next() {
                    Some(Ok((ck, cv))) if Self::is_chunk_of(&ck, &k) => {
                        joined
                            .get_or_insert_with(|| v.to_vec())
                            .extend_from_slice(&cv);
                    }
                    Some(Ok(other)) => {
                        self.ahead = Some(other);
                        break;
                    }
                    Some(Err(e)) => return Some(Err(e)),
                    None => break,
                }
            }
            return Some(Ok((k, joined.map_or(v, IVec::from))));
        }
    }
}

impl<I: DoubleEndedIterator<Item = Entry>> DoubleEndedIterator for Chunked<I> {
    fn next_back(&mut self) -> Option<Entry> {
        // Chunks of one value, last first.
        let mut chunks: Vec<(IVec, IVec)> = Vec::new();
        loop {
            let item = match self.inner.next_back() {
                Some(item) => item,
                // Going forwards read one entry ahead: it is the next one backwards.
                None => Ok(self.ahead.take()?),
            };
            let (k, v) = match item {
                Ok(e) => e,
                Err(e) => return Some(Err(e)),
            };
            if k.len() == CHUNK_SUFFIX_LEN {
                if chunks.last().is_some_and(|(last, _)| last[..8] != k[..8]) {
                    chunks.clear();
                }
                chunks.push((k, v));
                continue;
            }
            if chunks
                .first()
                .is_none_or(|(c, _)| !Self::is_chunk_of(c, &k))
            {
                return Some(Ok((k, v)));
            }
            let mut joined = v.to_vec();
            for (_, c) in chunks.iter().rev() {
                joined.extend_from_slice(c);
            }
            return Some(Ok((k, IVec::from(joined))));
        }
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
        let (_dir, tree) = batches_tree();
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

    /// A fresh database's shared batches tree (the directory lives as long as the guard).
    fn batches_tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree(BATCHES_TREE).unwrap();
        (dir, tree)
    }

    /// A value of `len` bytes whose every byte says where it is.
    fn patterned(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn large_values_are_stored_in_chunks_and_read_back_whole() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 7, 0);
        let next = PartitionKeys::new(tree.clone(), 7, 1);
        next.insert(&0u64.to_be_bytes(), patterned(CHUNK_BYTES * 2, 9))
            .unwrap();
        // Offsets 0 (small), 10 (exactly one chunk), 20 (2.5 chunks), 30 (small),
        // 40 (3 chunks + 1 byte).
        let values: Vec<(u64, Vec<u8>)> = vec![
            (0, patterned(100, 1)),
            (10, patterned(CHUNK_BYTES, 2)),
            (20, patterned(CHUNK_BYTES * 5 / 2, 3)),
            (30, patterned(7, 4)),
            (40, patterned(CHUNK_BYTES * 3 + 1, 5)),
        ];
        for (o, v) in &values {
            a.insert(&o.to_be_bytes(), v.clone()).unwrap();
        }
        assert!(
            tree.len() > values.len() + 1,
            "the large values took several entries"
        );
        let expect = |o: u64| values.iter().find(|(k, _)| *k == o).unwrap().1.clone();
        let read = |it: &mut dyn Iterator<Item = Entry>| -> Vec<(u64, Vec<u8>)> {
            it.map(|e| {
                let (k, v) = e.unwrap();
                (u64::from_be_bytes(k[..].try_into().unwrap()), v.to_vec())
            })
            .collect()
        };
        assert_eq!(read(&mut a.iter()), values);
        let mut backwards = values.clone();
        backwards.reverse();
        assert_eq!(read(&mut a.iter().rev()), backwards);
        assert_eq!(read(&mut a.range_from(&20u64.to_be_bytes())), values[2..]);
        assert_eq!(read(&mut a.range_before(&20u64.to_be_bytes())), values[..2]);
        // The value holding offset 25 is the one at 20, whole.
        let (k, v) = a
            .range_through(&25u64.to_be_bytes())
            .next_back()
            .unwrap()
            .unwrap();
        assert_eq!((&k[..], v.to_vec()), (&20u64.to_be_bytes()[..], expect(20)));
        let (k, v) = a
            .range_through(&20u64.to_be_bytes())
            .next_back()
            .unwrap()
            .unwrap();
        assert_eq!((&k[..], v.to_vec()), (&20u64.to_be_bytes()[..], expect(20)));
        assert_eq!(a.last().unwrap().unwrap().1.to_vec(), expect(40));
        assert_eq!(a.first().unwrap().unwrap().1.to_vec(), expect(0));
        // Both ends at once meet in the middle without losing or repeating a value.
        let mut both = a.iter();
        let mut seen = vec![both.next().unwrap().unwrap().0.to_vec()];
        seen.push(both.next_back().unwrap().unwrap().0.to_vec());
        seen.push(both.next().unwrap().unwrap().0.to_vec());
        seen.push(both.next_back().unwrap().unwrap().0.to_vec());
        seen.push(both.next().unwrap().unwrap().0.to_vec());
        assert!(both.next().is_none() && both.next_back().is_none());
        seen.sort();
        let keys: Vec<Vec<u8>> = values
            .iter()
            .map(|(o, _)| o.to_be_bytes().to_vec())
            .collect();
        assert_eq!(seen, keys);
        // Storing a shorter value under a chunked key leaves no chunk of the old one.
        a.insert(&20u64.to_be_bytes(), patterned(50, 6)).unwrap();
        assert_eq!(
            a.range_from(&20u64.to_be_bytes())
                .next()
                .unwrap()
                .unwrap()
                .1
                .to_vec(),
            patterned(50, 6)
        );
        assert_eq!(a.iter().count(), values.len());
        // Removing a chunked value removes all of it.
        a.remove(&40u64.to_be_bytes()).unwrap();
        assert_eq!(a.last().unwrap().unwrap().1.to_vec(), expect(30));
        a.clear().unwrap();
        assert_eq!(a.iter().count(), 0);
        assert_eq!(
            next.iter().next().unwrap().unwrap().1.to_vec(),
            patterned(CHUNK_BYTES * 2, 9),
            "the neighbouring partition keeps its value"
        );
        assert_eq!(tree.len(), 2, "only the neighbour's two chunks are left");
    }

    #[test]
    fn values_stored_whole_before_chunking_read_as_they_are() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 3, 2);
        let old = patterned(CHUNK_BYTES * 3, 7);
        tree.insert(
            full_key(&partition_prefix(3, 2), &5u64.to_be_bytes()),
            old.clone(),
        )
        .unwrap();
        a.insert(&9u64.to_be_bytes(), patterned(CHUNK_BYTES * 2, 8))
            .unwrap();
        let all: Vec<Vec<u8>> = a.iter().map(|e| e.unwrap().1.to_vec()).collect();
        assert_eq!(all, vec![old.clone(), patterned(CHUNK_BYTES * 2, 8)]);
        assert_eq!(
            a.range_through(&8u64.to_be_bytes())
                .next_back()
                .unwrap()
                .unwrap()
                .1
                .to_vec(),
            old
        );
    }

    #[test]
    fn values_in_an_older_chunk_size_read_whole_and_are_replaced_whole() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 4, 0);
        // Offset 5 as the 256 KiB-chunk layout stored it: first chunk under the key, the
        // rest under key + index.
        const OLD_CHUNK: usize = 256 * 1024;
        let old = patterned(OLD_CHUNK * 2 + 100, 3);
        let key = full_key(&partition_prefix(4, 0), &5u64.to_be_bytes());
        for (i, chunk) in old.chunks(OLD_CHUNK).enumerate() {
            let mut k = key.to_vec();
            if i > 0 {
                k.extend_from_slice(&(i as u16).to_be_bytes());
            }
            tree.insert(k, chunk).unwrap();
        }
        let new = patterned(CHUNK_BYTES * 3 + 1, 4);
        a.insert(&9u64.to_be_bytes(), new.clone()).unwrap();
        let all: Vec<Vec<u8>> = a.iter().map(|e| e.unwrap().1.to_vec()).collect();
        assert_eq!(all, vec![old.clone(), new.clone()]);
        let back: Vec<Vec<u8>> = a.iter().rev().map(|e| e.unwrap().1.to_vec()).collect();
        assert_eq!(back, vec![new.clone(), old]);
        // Storing a value under the old key drops every old chunk, of whatever size.
        let replacement = patterned(CHUNK_BYTES + 1, 5);
        a.insert(&5u64.to_be_bytes(), replacement.clone()).unwrap();
        let all: Vec<Vec<u8>> = a.iter().map(|e| e.unwrap().1.to_vec()).collect();
        assert_eq!(all, vec![replacement, new]);
        assert_eq!(
            tree.len(),
            2 + 4,
            "two chunks for offset 5, four for offset 9"
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
