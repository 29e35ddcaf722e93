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
//!
//! Large values (batches) are stored in *slots*: numbered entries of a slot region of the
//! partition's own (`topic id | 1 << 63`, partition, slot number), with a small head under
//! the value's key naming its slots. sled rewrites a leaf whole when it splits, and the
//! rightmost leaf of an append-only key range splits every few appends, so a value stored
//! under its offset was written about three times. Slot numbers are known before the data
//! comes: each write also stores empty placeholders for the next slots, so the next
//! values replace entries of leaves that no longer split, and sled writes them once (a
//! delta of their leaf). The placeholders' own splits copy only empty values.
//!
//! Regions sit next to each other in the key order (a topic's partitions, then the next
//! topic), so the leaf that takes a region's new placeholders and cursor could also hold
//! the next region's first slots, and each of its splits and consolidations rewrote those
//! full slots: two partitions appending side by side wrote 1.23-1.29 bytes per byte stored
//! instead of 1.04. Each region therefore ends in [`GUARDS`] empty entries after its cursor,
//! written with its first value. sled splits a leaf that holds more than 16 entries the
//! next time it passes through it, so a leaf holds at most 17: never the cursor, all 16
//! guards and a key of the next region (1.10 with guards).
//!
//! The same holds for a partition's values in the batches tree (heads, and batches under
//! 4 KiB stored whole): the leaf taking its new values could hold the next partition's
//! first ones. They end in guards too, after every key a value can have, so no reader's
//! range reaches them (two partitions of 2 KiB batches: 3.69 bytes written per byte stored,
//! 3.25 with guards; 512 B batches: 4.85 and 3.89).

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

/// A value as sled holds it: whole, or in the slots it was stored in.
#[derive(Debug, Clone)]
pub enum Stored {
    /// One piece.
    Whole(IVec),
    /// Its slots, in order.
    Slots(Vec<IVec>),
}

impl Stored {
    /// Bytes of the value.
    pub fn len(&self) -> usize {
        match self {
            Stored::Whole(v) => v.len(),
            Stored::Slots(s) => s.iter().map(|v| v.len()).sum(),
        }
    }

    /// True for an empty value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the value onto the end of `out`.
    pub fn append_to(&self, out: &mut bytes::BytesMut) {
        match self {
            Stored::Whole(v) => out.extend_from_slice(v),
            Stored::Slots(s) => s.iter().for_each(|v| out.extend_from_slice(v)),
        }
    }

    /// The value in one piece (a copy when it is in slots).
    pub fn joined(self) -> IVec {
        match self {
            Stored::Whole(v) => v,
            Stored::Slots(s) => IVec::from(s.concat()),
        }
    }
}

/// An entry whose value is as sled holds it.
type StoredEntry = Result<(IVec, Stored), sled::Error>;

/// Before slots, a value longer than this was stored as chunks of this size: the first under
/// its key, the rest under the key followed by the chunk's index (u16 BE, from 1), which
/// sort right after it and before the next key (earlier still: whole, then 256 KiB chunks).
/// Every such form still reads back whole, and is replaced whole.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// Length of a chunk's suffix: the value's 8-byte suffix and the chunk index.
const CHUNK_SUFFIX_LEN: usize = 10;

/// Values at least this long are stored in slots (shorter ones inline, under their key).
const SLOTTED_MIN: usize = 4 * 1024;
/// Bytes of one slot. A leaf of 17 slots (544 KiB, when placeholders ran short) stays under
/// the 1 MiB above which sled writes a log entry to a file of its own.
pub const SLOT_BYTES: usize = 32 * 1024;
/// Length of a slotted value's head key suffix: the value's 8-byte suffix and a 0 byte.
const SLOT_HEAD_SUFFIX_LEN: usize = 9;
/// Top bit of the topic id in a slot region's prefix: no topic id has it.
const SLOT_REGION_BIT: u64 = 1 << 63;
/// The slot number whose entry is a region's cursor, not a slot.
const CURSOR_SLOT: u64 = u64::MAX;
/// Empty entries after a region's cursor (keys: the cursor's key and one more byte), so the
/// leaf where a region grows never holds the next region's data (see the module doc). A
/// leaf holds at most 17 entries; one holding the cursor, every guard and a key of the next
/// region would hold 18.
const GUARDS: u8 = 16;
/// Placeholders kept ahead of the next free slot: at least this many, and at least twice
/// the slots of the latest value, so the next value lands in leaves that no longer split
/// (a leaf splits past 16 entries).
const MIN_RUNWAY: u64 = 32;
/// Slots of the largest value there can be: a batch comes in one frame, and a frame's size
/// is a u32 (`limits.max_frame_bytes`).
const MAX_SLOTS: u64 = (u32::MAX as u64).div_ceil(SLOT_BYTES as u64);

/// The empty entries that end a key range (a slot region, or a partition's values): keys
/// `after` plus one byte, so they sort after every key of the range and before the next
/// range's first. Written with the range's first write, or its next one for a range an
/// older broker wrote (checked once per opening: one `get`).
#[derive(Clone)]
struct Guards {
    /// The key the guards extend: at or after the range's last possible key.
    after: Vec<u8>,
    /// The guards are known to be there.
    checked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Guards {
    fn new(after: Vec<u8>) -> Self {
        Guards {
            after,
            checked: Default::default(),
        }
    }

    /// The key of guard `g` (`u8::MAX`: past every guard there can be).
    fn key(&self, g: u8) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.after.len() + 1);
        k.extend_from_slice(&self.after);
        k.push(g);
        k
    }

    /// The guards' writes, if the range does not have them yet.
    fn missing(&self, tree: &sled::Tree) -> Result<Vec<(IVec, IVec)>, sled::Error> {
        use std::sync::atomic::Ordering;
        if self.checked.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let mut writes = Vec::new();
        if tree.get(self.key(GUARDS - 1))?.is_none() {
            for g in 0..GUARDS {
                writes.push((IVec::from(self.key(g)), IVec::default()));
            }
        }
        self.checked.store(true, Ordering::Relaxed);
        Ok(writes)
    }

    /// Forgets that the guards are there (the range was erased with them).
    fn forget(&self) {
        self.checked
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Version byte of a slotted value's head.
const HEAD_V1: u8 = 1;
/// Length of a head: version, first slot, slot count, value length.
const HEAD_LEN: usize = 1 + 8 + 4 + 8;

/// Where a slotted value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotHead {
    first: u64,
    count: u32,
    len: u64,
}

impl SlotHead {
    fn encode(&self) -> [u8; HEAD_LEN] {
        let mut b = [0u8; HEAD_LEN];
        b[0] = HEAD_V1;
        b[1..9].copy_from_slice(&self.first.to_be_bytes());
        b[9..13].copy_from_slice(&self.count.to_be_bytes());
        b[13..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<SlotHead, sled::Error> {
        if b.len() != HEAD_LEN || b[0] != HEAD_V1 {
            return Err(sled::Error::Unsupported(format!(
                "a slotted value's head of {} bytes (version {:?}) is not one this broker reads",
                b.len(),
                b.first()
            )));
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let h = SlotHead {
            first: u64_at(1),
            count: u32::from_be_bytes(b[9..13].try_into().expect("4 bytes")),
            len: u64_at(13),
        };
        // A damaged head must not make a reader allocate what it says, or wrap around.
        let count = u64::from(h.count);
        let fits = (1..=MAX_SLOTS).contains(&count)
            && h.len > (count - 1) * SLOT_BYTES as u64
            && h.len <= count * SLOT_BYTES as u64
            && h.first
                .checked_add(count)
                .is_some_and(|end| end < CURSOR_SLOT);
        if !fits {
            return Err(sled::Error::Unsupported(format!(
                "a slotted value's head says {} bytes in {} slots from slot {}, which cannot be",
                h.len, h.count, h.first
            )));
        }
        Ok(h)
    }
}

/// A partition's slot region: reads slotted values, and hands out slot numbers.
#[derive(Clone)]
struct Slots {
    tree: sled::Tree,
    prefix: [u8; PREFIX_LEN],
    /// The empty entries after the region's cursor.
    guards: Guards,
}

impl Slots {
    fn key(&self, slot: u64) -> [u8; PREFIX_LEN + 8] {
        full_key(&self.prefix, &slot.to_be_bytes())
    }

    /// The value `head` names, as the slots that hold it (not joined: a reader copies them
    /// once, to where it wants the value).
    fn read(&self, head: &[u8]) -> Result<Stored, sled::Error> {
        let h = SlotHead::decode(head)?;
        let end = h.first.saturating_add(u64::from(h.count));
        // Not sized by the head: a damaged one could name billions of slots.
        let mut slots = Vec::new();
        let mut len = 0u64;
        for item in self.tree.range(self.key(h.first)..self.key(end)) {
            let (_, v) = item?;
            len += v.len() as u64;
            slots.push(v);
        }
        if slots.len() != h.count as usize || len != h.len {
            return Err(sled::Error::Unsupported(format!(
                "a slotted value of {} bytes in slots {}..{end} has {} slots and {len} bytes",
                h.len,
                h.first,
                slots.len()
            )));
        }
        Ok(match slots.len() {
            1 => Stored::Whole(slots.remove(0)),
            _ => Stored::Slots(slots),
        })
    }

    /// The slot keys of the value `head` names.
    fn keys_of(&self, head: &[u8]) -> Result<Vec<[u8; PREFIX_LEN + 8]>, sled::Error> {
        let h = SlotHead::decode(head)?;
        Ok((h.first..h.first.saturating_add(u64::from(h.count)))
            .map(|s| self.key(s))
            .collect())
    }

    /// The next free slot and the end of the placeholders (from the region's cursor, when it
    /// says a place whose next `count` slots hold no data).
    fn cursor(&self, count: u64) -> Result<(u64, u64), sled::Error> {
        if let Some(v) = self.tree.get(self.key(CURSOR_SLOT))? {
            if v.len() == 16 {
                let next = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
                let end = u64::from_be_bytes(v[8..].try_into().expect("8 bytes"));
                if self.free_from(next, count)? {
                    return Ok((next, end.max(next)));
                }
                tracing::warn!(
                    next,
                    "a slot region's cursor names slots in use; continuing after the last slot"
                );
            }
        }
        // No usable cursor (a region never written, or damaged): after the last slot there is.
        let last = self
            .tree
            .range(self.key(0)..self.key(CURSOR_SLOT))
            .keys()
            .next_back()
            .transpose()?;
        let next = match last {
            Some(k) => k
                .get(PREFIX_LEN..)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .and_then(|s| s.checked_add(1))
                .ok_or_else(|| {
                    sled::Error::Unsupported("a slot region's last key is not a slot".into())
                })?,
            None => 0,
        };
        Ok((next, next))
    }

    /// True when slots `from..from + count` are all placeholders or absent (and exist).
    fn free_from(&self, from: u64, count: u64) -> Result<bool, sled::Error> {
        let Some(end) = from.checked_add(count).filter(|e| *e < CURSOR_SLOT) else {
            return Ok(false);
        };
        for item in self.tree.range(self.key(from)..self.key(end)) {
            if !item?.1.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The writes that store `value` in slots, in the order they must reach the log: its
    /// slots, the placeholders after them, then the cursor moved past them; and the value's
    /// head (for the caller to write after all of them).
    fn fill(
        &self,
        value: &[u8],
        patch: impl FnOnce(&mut [u8]),
    ) -> Result<(Vec<(IVec, IVec)>, SlotHead), sled::Error> {
        let count = value.len().div_ceil(SLOT_BYTES) as u64;
        let count32 = u32::try_from(count).map_err(|_| {
            sled::Error::Unsupported(format!("a value of {} bytes is too large", value.len()))
        })?;
        let (next, placeholders_end) = self.cursor(count)?;
        let runway = (2 * count).max(MIN_RUNWAY);
        let (free, runway_end) = match next
            .checked_add(count)
            .and_then(|free| Some((free, free.checked_add(runway)?)))
        {
            Some((free, end)) if end < CURSOR_SLOT => (free, end),
            _ => {
                return Err(sled::Error::Unsupported(
                    "a partition's slot numbers ran out".into(),
                ))
            }
        };
        let mut writes = self.guards.missing(&self.tree)?;
        // Each slot a buffer of its own: sled's cache counts a slot's bytes, and a slice of
        // a shared buffer would keep all of it alive for as long as any slot of it is cached.
        let mut patch = Some(patch);
        for (i, chunk) in value.chunks(SLOT_BYTES).enumerate() {
            let chunk = match patch.take() {
                Some(p) => patched(chunk, p),
                None => IVec::from(chunk),
            };
            writes.push((IVec::from(&self.key(next + i as u64)[..]), chunk));
        }
        for s in placeholders_end.max(free)..runway_end {
            writes.push((IVec::from(&self.key(s)[..]), IVec::default()));
        }
        let cursor = cursor_value(free, runway_end.max(placeholders_end));
        writes.push((
            IVec::from(&self.key(CURSOR_SLOT)[..]),
            IVec::from(&cursor[..]),
        ));
        let head = SlotHead {
            first: next,
            count: count32,
            len: value.len() as u64,
        };
        Ok((writes, head))
    }

    /// Sets the cursor to `next` with no placeholders ahead (after the region was emptied).
    fn reset_cursor(&self, next: u64) -> Result<(), sled::Error> {
        self.tree
            .insert(self.key(CURSOR_SLOT), &cursor_value(next, next)[..])?;
        Ok(())
    }
}

/// A copy of `bytes` for sled with `patch` applied to it (the copy is sled's own buffer:
/// changing it in place copies nothing more).
fn patched(bytes: &[u8], patch: impl FnOnce(&mut [u8])) -> IVec {
    let mut v = IVec::from(bytes);
    patch(&mut v);
    v
}

/// The key just past every chunk of `suffix` (and of any smaller suffix) in the slice of
/// `prefix`.
fn past_chunks_of(prefix: &[u8; PREFIX_LEN], suffix: &[u8; 8]) -> Vec<u8> {
    let mut k = full_key(prefix, suffix).to_vec();
    k.extend_from_slice(&[0xff, 0xff]);
    k
}

/// A cursor entry: the next free slot, then the end of the placeholders.
fn cursor_value(next: u64, placeholders_end: u64) -> [u8; 16] {
    let mut cursor = [0u8; 16];
    cursor[..8].copy_from_slice(&next.to_be_bytes());
    cursor[8..].copy_from_slice(&placeholders_end.to_be_bytes());
    cursor
}

/// One partition's slice of a shared tree; keys going in and coming out are the 8-byte
/// suffixes, and values come out whole however they were stored.
#[derive(Clone)]
pub struct PartitionKeys {
    tree: sled::Tree,
    prefix: [u8; PREFIX_LEN],
    slots: Slots,
    /// The empty entries after the partition's values, in the batches tree only (the time
    /// index's entries are too small for a neighbour's rewrite of them to matter).
    guards: Option<Guards>,
}

impl PartitionKeys {
    /// The slice of `tree` that belongs to `topic_id`/`partition`.
    pub fn new(tree: sled::Tree, topic_id: u64, partition: u32) -> Self {
        let slot_prefix = partition_prefix(topic_id | SLOT_REGION_BIT, partition);
        let prefix = partition_prefix(topic_id, partition);
        let guards = (&*tree.name() == BATCHES_TREE.as_bytes())
            .then(|| Guards::new(past_chunks_of(&prefix, &[0xff; 8])));
        PartitionKeys {
            slots: Slots {
                tree: tree.clone(),
                prefix: slot_prefix,
                guards: Guards::new(full_key(&slot_prefix, &CURSOR_SLOT.to_be_bytes()).to_vec()),
            },
            tree,
            prefix,
            guards,
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
        past_chunks_of(&self.prefix, suffix)
    }

    fn strip(item: Entry) -> Entry {
        item.map(|(k, v)| (IVec::from(&k[PREFIX_LEN.min(k.len())..]), v))
    }

    /// The full keys of what the 8-byte `suffix` stored besides its own key: the chunks
    /// after the first, or its slotted head and its slots.
    fn chunk_keys(&self, suffix: &[u8]) -> Result<Vec<IVec>, sled::Error> {
        if suffix.len() != 8 {
            return Ok(Vec::new());
        }
        let mut from = self.key(suffix);
        from.push(0);
        let mut to = self.key(suffix);
        to.extend_from_slice(&[0xff, 0xff]);
        let mut keys = Vec::new();
        for item in self.tree.range(from..=to) {
            let (k, v) = item?;
            if k.len() == PREFIX_LEN + SLOT_HEAD_SUFFIX_LEN {
                match self.slots.keys_of(&v) {
                    Ok(slots) => keys.extend(slots.iter().map(|s| IVec::from(&s[..]))),
                    // A head that cannot be read still goes (its slots stay, unreachable):
                    // retention and truncation never stop at it.
                    Err(e) => tracing::warn!(error = %e, "removing a damaged slotted head"),
                }
            }
            keys.push(k);
        }
        Ok(keys)
    }

    /// Stores `value` under `suffix`: in slots when it is a large value under an 8-byte
    /// suffix, else whole. Whatever `suffix` stored before (in any form) goes in the same
    /// atomic batch.
    ///
    /// A new slotted value (the append path: nothing stored under `suffix` yet) is written
    /// without a sled batch: its slots, placeholders and cursor first, its head last. After
    /// a crash of the process sled recovers an unbroken prefix of its log, so a head that
    /// survives has its slots; a crash before the head leaves slots no head names (at most
    /// one value's, never read, removed with the partition). After a power loss sled can
    /// keep a later entry without an earlier one (its log writes are not ordered on the
    /// device), as with a batch: a head without its slots reads as a damaged batch. A sled batch would take sled's process-wide write lock, which
    /// stops every read and write of every tree (fetches, the flusher) while it applies, and
    /// makes sled write out its current log buffer before and after it.
    pub fn insert(&self, suffix: &[u8], value: impl AsRef<[u8]>) -> Result<(), sled::Error> {
        self.insert_patched(suffix, value.as_ref(), |_| {})
    }

    /// [`insert`](Self::insert) of `value` with `patch` applied to the stored copy of its
    /// first bytes (the first slot of a slotted value: at least [`SLOT_BYTES`] or the whole
    /// value), so a value stored with a few bytes changed is copied once, not twice: the
    /// append path stamps a batch's base offset and leader epoch this way.
    pub fn insert_patched(
        &self,
        suffix: &[u8],
        value: &[u8],
        patch: impl FnOnce(&mut [u8]),
    ) -> Result<(), sled::Error> {
        let key = self.key(suffix);
        let _turn = one_writer();
        if let Some(guards) = &self.guards {
            for (k, v) in guards.missing(&self.tree)? {
                self.tree.insert(k, v)?;
            }
        }
        let stale = self.chunk_keys(suffix)?;
        let slotted = value.len() >= SLOTTED_MIN && suffix.len() == 8;
        if stale.is_empty() && !slotted {
            self.tree.insert(key, patched(value, patch))?;
            return Ok(());
        }
        if stale.is_empty() && self.tree.get(&key)?.is_none() {
            let (writes, head) = self.slots.fill(value, patch)?;
            for (k, v) in writes {
                self.tree.insert(k, v)?;
            }
            let mut head_key = key;
            head_key.push(0);
            self.tree.insert(head_key, &head.encode()[..])?;
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for k in stale {
            batch.remove(k);
        }
        if slotted {
            let (writes, head) = self.slots.fill(value, patch)?;
            for (k, v) in writes {
                batch.insert(k, v);
            }
            batch.remove(key.clone());
            let mut head_key = key;
            head_key.push(0);
            batch.insert(head_key, &head.encode()[..]);
        } else {
            batch.insert(key, patched(value, patch));
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

    fn whole(&self, range: sled::Iter) -> impl DoubleEndedIterator<Item = Entry> {
        self.stored(range).map(|e| e.map(|(k, v)| (k, v.joined())))
    }

    fn stored(&self, range: sled::Iter) -> Chunked<impl DoubleEndedIterator<Item = Entry>> {
        Chunked::new(range.map(Self::strip), self.slots.clone(), self.prefix)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Entry> {
        self.whole(
            self.tree
                .range(full_key(&self.prefix, &[0; 8]).to_vec()..=self.past_chunks_of(&[0xff; 8])),
        )
    }

    /// Entries from `suffix` on as sled holds them, while they fit `max_bytes` (the first
    /// always comes out): a slotted value that would not fit ends the iteration before its
    /// slots are read.
    pub fn stored_from_within(
        &self,
        suffix: &[u8; 8],
        max_bytes: usize,
    ) -> impl Iterator<Item = StoredEntry> {
        let mut entries = self.stored(self.tree.range(self.from(suffix)));
        entries.budget = Some(max_bytes);
        entries
    }

    /// Entries from `suffix` on.
    pub fn range_from(&self, suffix: &[u8; 8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.whole(self.tree.range(self.from(suffix)))
    }

    /// The keys from `suffix` on.
    fn from(&self, suffix: &[u8; 8]) -> std::ops::RangeInclusive<Vec<u8>> {
        full_key(&self.prefix, suffix).to_vec()..=self.past_chunks_of(&[0xff; 8])
    }

    /// Entries up to and including `suffix`.
    pub fn range_through(&self, suffix: &[u8; 8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.whole(
            self.tree
                .range(full_key(&self.prefix, &[0; 8]).to_vec()..=self.past_chunks_of(suffix)),
        )
    }

    /// The 8-byte suffix of the last value at or before `suffix`, without reading the value.
    pub fn last_suffix_through(&self, suffix: &[u8; 8]) -> Result<Option<[u8; 8]>, sled::Error> {
        let range = full_key(&self.prefix, &[0; 8]).to_vec()..=self.past_chunks_of(suffix);
        match self.tree.range(range).keys().next_back().transpose()? {
            Some(k) => Ok(k
                .get(PREFIX_LEN..PREFIX_LEN + 8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())),
            None => Ok(None),
        }
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

    /// Removes every entry of the partition, which lives on: the slot numbers go on from
    /// where they were, so a reader still holding an old head never reads a new value.
    pub fn clear(&self) -> Result<(), sled::Error> {
        self.remove_all(true)
    }

    /// Removes every entry of the partition, its slot numbering included (it is gone).
    pub fn erase(&self) -> Result<(), sled::Error> {
        self.remove_all(false)
    }

    /// Removes the partition's keys a share at a time, each share listed and removed in the
    /// writers' turn (so a concurrent write is either gone or whole), and other partitions'
    /// writes go between shares.
    fn remove_all(&self, keep_numbering: bool) -> Result<(), sled::Error> {
        const SHARE: usize = 1024;
        // A partition living on keeps its guards; one erased leaves nothing behind (every
        // key past its values and its cursor, however many guards an older broker wrote).
        let (values_end, slots_end) = if keep_numbering {
            (
                self.past_chunks_of(&[0xff; 8]),
                self.slots.key(CURSOR_SLOT).to_vec(),
            )
        } else {
            self.slots.guards.forget();
            let values_end = match &self.guards {
                Some(g) => {
                    g.forget();
                    g.key(u8::MAX)
                }
                None => self.past_chunks_of(&[0xff; 8]),
            };
            (values_end, self.slots.guards.key(u8::MAX))
        };
        let heads = full_key(&self.prefix, &[0; 8]).to_vec()..=values_end;
        let next = if keep_numbering {
            let _turn = one_writer();
            Some(self.slots.cursor(0)?.0)
        } else {
            None
        };
        loop {
            let _turn = one_writer();
            let mut keys: Vec<IVec> = self
                .tree
                .range(heads.clone())
                .keys()
                .take(SHARE)
                .collect::<Result<_, _>>()?;
            if keys.len() < SHARE {
                let slots = self
                    .tree
                    .range(self.slots.key(0).to_vec()..=slots_end.clone())
                    .keys()
                    .take(SHARE - keys.len());
                for k in slots {
                    keys.push(k?);
                }
            }
            if keys.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            for k in keys {
                batch.remove(k);
            }
            self.tree.apply_batch(batch)?;
        }
        if let Some(next) = next.filter(|n| *n > 0) {
            let _turn = one_writer();
            // Never behind where a write made since the numbering was read left it.
            let now = self.slots.cursor(0)?.0;
            self.slots.reset_cursor(next.max(now))?;
        }
        Ok(())
    }
}

/// Entries with their chunks joined: a value's first entry (an 8-byte suffix) followed by
/// its chunks (10-byte suffixes with the same first 8 bytes) comes out as one entry, and so
/// does a slotted value's head (a 9-byte suffix) with its slots, under its 8-byte suffix. A
/// chunk without its first entry (never written: chunks go in and out together) is skipped.
struct Chunked<I> {
    inner: I,
    /// An entry read past the end of the previous value, going forwards.
    ahead: Option<(IVec, IVec)>,
    slots: Slots,
    /// The partition's key prefix (to look a head up again).
    prefix: [u8; PREFIX_LEN],
    /// Going forwards: bytes the values after the first may still take. A slotted value
    /// past it ends the iteration before its slots are read.
    budget: Option<usize>,
    /// A value came out (going forwards).
    yielded: bool,
    /// A value did not fit the budget: nothing more comes out going forwards.
    ended: bool,
}

impl<I: DoubleEndedIterator<Item = Entry>> Chunked<I> {
    fn new(inner: I, slots: Slots, prefix: [u8; PREFIX_LEN]) -> Self {
        Chunked {
            inner,
            ahead: None,
            slots,
            prefix,
            budget: None,
            yielded: false,
            ended: false,
        }
    }

    /// Whether a value of `len` bytes may come out next; when not, the iteration is over.
    fn fits(&mut self, len: u64) -> bool {
        let fits = match self.budget {
            Some(left) if self.yielded => len <= left as u64,
            _ => true,
        };
        self.ended |= !fits;
        fits
    }

    /// Counts a value that comes out against the budget.
    fn spent(&mut self, entry: StoredEntry) -> Option<StoredEntry> {
        if let (Some(left), Ok((_, v))) = (self.budget, &entry) {
            self.budget = Some(left.saturating_sub(v.len()));
        }
        self.yielded = true;
        Some(entry)
    }

    /// A slotted value's head, as its key and whole value. When its slots cannot be read,
    /// the head is looked up again: a value removed since the iterator saw its head
    /// (retention, truncation, a reset: head and slots go in one batch) is simply not there
    /// any more (`None`), and one replaced since is read as it is now. A head still there
    /// whose slots cannot be read is damage: the value comes out empty under its key, so the
    /// partition's checks see a damaged batch at that offset (and take the partition
    /// offline, drop a torn tail, or repair) rather than an error without a place.
    fn slotted(&self, k: &IVec, head: &IVec) -> Option<StoredEntry> {
        let key = IVec::from(&k[..8]);
        let e = match self.slots.read(head) {
            Ok(v) => return Some(Ok((key, v))),
            Err(e) => e,
        };
        let mut full = self.prefix.to_vec();
        full.extend_from_slice(k);
        let now = match self.slots.tree.get(full) {
            Ok(Some(now)) => now,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let read = if now == *head {
            Err(e)
        } else {
            self.slots.read(&now)
        };
        Some(Ok(match read {
            Ok(v) => (key, v),
            Err(e) => {
                tracing::warn!(error = %e, "a slotted value cannot be read whole");
                (key, Stored::Whole(IVec::default()))
            }
        }))
    }

    fn is_chunk_of(chunk: &[u8], first: &[u8]) -> bool {
        chunk.len() == CHUNK_SUFFIX_LEN && first.len() == 8 && chunk[..8] == *first
    }
}

impl<I: DoubleEndedIterator<Item = Entry>> Iterator for Chunked<I> {
    type Item = StoredEntry;

    fn next(&mut self) -> Option<StoredEntry> {
        if self.ended {
            return None;
        }
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
            if k.len() == SLOT_HEAD_SUFFIX_LEN {
                // A head that cannot be read goes to `slotted`, which reports it.
                let len = SlotHead::decode(&v).map_or(0, |h| h.len);
                if !self.fits(len) {
                    return None;
                }
                match self.slotted(&k, &v) {
                    Some(entry) => return self.spent(entry),
                    None => continue,
                }
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
            let v = joined.map_or(v, IVec::from);
            if !self.fits(v.len() as u64) {
                return None;
            }
            return self.spent(Ok((k, Stored::Whole(v))));
        }
    }
}

impl<I: DoubleEndedIterator<Item = Entry>> DoubleEndedIterator for Chunked<I> {
    fn next_back(&mut self) -> Option<StoredEntry> {
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
            if k.len() == SLOT_HEAD_SUFFIX_LEN {
                match self.slotted(&k, &v) {
                    Some(entry) => return Some(entry),
                    None => continue,
                }
            }
            if chunks
                .first()
                .is_none_or(|(c, _)| !Self::is_chunk_of(c, &k))
            {
                return Some(Ok((k, Stored::Whole(v))));
            }
            let mut joined = v.to_vec();
            for (_, c) in chunks.iter().rev() {
                joined.extend_from_slice(c);
            }
            return Some(Ok((k, Stored::Whole(IVec::from(joined)))));
        }
    }
}

/// Moves a partition's entries from its own legacy tree (`name`, when `legacy` lists it)
/// into its slice of the shared tree, then drops the legacy tree.
pub fn migrate_legacy(
    db: &super::store::Database,
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

    /// Removes `guards` (as a range an older broker wrote would lack them).
    fn drop_guards(tree: &sled::Tree, guards: &Guards) {
        for g in 0..GUARDS {
            tree.remove(guards.key(g)).unwrap();
        }
    }

    /// Every one of `guards` is there, and empty.
    fn guards_are_there(tree: &sled::Tree, guards: &Guards) -> bool {
        (0..GUARDS).all(|g| {
            tree.get(guards.key(g))
                .unwrap()
                .is_some_and(|v| v.is_empty())
        })
    }

    /// A value of `len` bytes whose every byte says where it is.
    fn patterned(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// The keys of `tree` outside partition `topic`/`partition`'s slice and slot region.
    fn keys_outside(tree: &sled::Tree, topic: u64, partition: u32) -> usize {
        let own = [
            partition_prefix(topic, partition),
            partition_prefix(topic | SLOT_REGION_BIT, partition),
        ];
        tree.iter()
            .keys()
            .filter(|k| !own.iter().any(|p| k.as_ref().unwrap().starts_with(p)))
            .count()
    }

    #[test]
    fn large_values_are_stored_in_slots_and_read_back_whole() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 7, 0);
        let next = PartitionKeys::new(tree.clone(), 7, 1);
        next.insert(&0u64.to_be_bytes(), patterned(CHUNK_BYTES * 2, 9))
            .unwrap();
        // Offsets 0 (small), 10 (exactly one slot), 20 (2.5 slots), 30 (small), 40 (3 slots
        // + 1 byte), 50 (just large enough for slots).
        let values: Vec<(u64, Vec<u8>)> = vec![
            (0, patterned(100, 1)),
            (10, patterned(SLOT_BYTES, 2)),
            (20, patterned(SLOT_BYTES * 5 / 2, 3)),
            (30, patterned(7, 4)),
            (40, patterned(SLOT_BYTES * 3 + 1, 5)),
            (50, patterned(SLOTTED_MIN, 6)),
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
        assert_eq!(a.last().unwrap().unwrap().1.to_vec(), expect(50));
        assert_eq!(a.first().unwrap().unwrap().1.to_vec(), expect(0));
        // Both ends at once meet in the middle without losing or repeating a value.
        let mut both = a.iter();
        let mut seen = vec![both.next().unwrap().unwrap().0.to_vec()];
        seen.push(both.next_back().unwrap().unwrap().0.to_vec());
        seen.push(both.next().unwrap().unwrap().0.to_vec());
        seen.push(both.next_back().unwrap().unwrap().0.to_vec());
        seen.push(both.next().unwrap().unwrap().0.to_vec());
        seen.push(both.next_back().unwrap().unwrap().0.to_vec());
        assert!(both.next().is_none() && both.next_back().is_none());
        seen.sort();
        let keys: Vec<Vec<u8>> = values
            .iter()
            .map(|(o, _)| o.to_be_bytes().to_vec())
            .collect();
        assert_eq!(seen, keys);
        // Storing a shorter value under a slotted key leaves nothing of the old one.
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
        // Removing a slotted value removes all of it.
        let before = tree.len();
        a.remove(&40u64.to_be_bytes()).unwrap();
        assert_eq!(
            a.range_through(&45u64.to_be_bytes())
                .next_back()
                .unwrap()
                .unwrap()
                .1
                .to_vec(),
            expect(30)
        );
        assert_eq!(
            tree.len(),
            before - 1 - 4,
            "its head and its four slots are gone"
        );
        let neighbour = keys_outside(&tree, 7, 0);
        a.clear().unwrap();
        assert_eq!(a.iter().count(), 0);
        assert_eq!(
            next.iter().next().unwrap().unwrap().1.to_vec(),
            patterned(CHUNK_BYTES * 2, 9),
            "the neighbouring partition keeps its value"
        );
        assert_eq!(
            tree.len(),
            neighbour + 1 + 2 * usize::from(GUARDS),
            "nothing of the cleared partition is left but its slot cursor and its two sets of guards"
        );
        a.erase().unwrap();
        assert_eq!(tree.len(), neighbour, "nothing at all once erased");
    }

    /// Each value's slots are the placeholders the value before it left: sled replaces
    /// entries of leaves that no longer split instead of appending to the one that does.
    #[test]
    fn values_fill_the_placeholders_left_ahead_of_them() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 5, 1);
        let slot_keys = || -> Vec<(u64, usize)> {
            a.slots
                .tree
                .range(a.slots.key(0)..a.slots.key(CURSOR_SLOT))
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (
                        u64::from_be_bytes(k[PREFIX_LEN..].try_into().unwrap()),
                        v.len(),
                    )
                })
                .collect()
        };
        let mb = 1024 * 1024;
        a.insert(&0u64.to_be_bytes(), patterned(mb, 1)).unwrap();
        let per_value = (mb / SLOT_BYTES) as u64;
        let after_one = slot_keys();
        assert_eq!(
            after_one.len() as u64,
            per_value + 2 * per_value,
            "its slots, then twice as many placeholders"
        );
        assert!(after_one[per_value as usize..]
            .iter()
            .all(|(_, len)| *len == 0));
        for (i, o) in [100u64, 200, 300].into_iter().enumerate() {
            let placeholders_before: Vec<u64> = slot_keys()
                .into_iter()
                .filter(|(_, len)| *len == 0)
                .map(|(s, _)| s)
                .collect();
            a.insert(&o.to_be_bytes(), patterned(mb, i as u8)).unwrap();
            let used: Vec<u64> = slot_keys()
                .into_iter()
                .filter(|(_, len)| *len > 0)
                .map(|(s, _)| s)
                .collect();
            let new: Vec<u64> = used
                .iter()
                .copied()
                .filter(|s| *s >= per_value * (i as u64 + 1))
                .collect();
            assert_eq!(new.len() as u64, per_value);
            assert!(
                new.iter().all(|s| placeholders_before.contains(s)),
                "value {o} went into the placeholders"
            );
        }
        let (next, end) = a.slots.cursor(0).unwrap();
        assert_eq!((next, end), (4 * per_value, 6 * per_value));
        // Read back whole, in order.
        let firsts: Vec<u8> = a.iter().map(|e| e.unwrap().1[0]).collect();
        assert_eq!(firsts, vec![1, 0, 1, 2]);
    }

    /// A region whose cursor entry is gone, or names slots in use, continues after its last
    /// slot, overwriting nothing; a value whose head or slots are damaged reads as an empty
    /// value at its key (which the partition's checks take for a damaged batch), never as an
    /// error without a place, a short value or an allocation of what a bad head says.
    #[test]
    fn a_lost_cursor_or_damaged_head_overwrites_nothing_and_reads_as_damage() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 6, 0);
        let v1 = patterned(SLOT_BYTES * 2, 1);
        a.insert(&1u64.to_be_bytes(), v1.clone()).unwrap();
        tree.remove(a.slots.key(CURSOR_SLOT)).unwrap();
        let v2 = patterned(SLOT_BYTES * 3, 2);
        a.insert(&2u64.to_be_bytes(), v2.clone()).unwrap();
        // A cursor pointing back at slots in use is not believed either.
        let mut back = [0u8; 16];
        back[8..].copy_from_slice(&100u64.to_be_bytes());
        tree.insert(a.slots.key(CURSOR_SLOT), &back[..]).unwrap();
        let v3 = patterned(SLOT_BYTES + 5, 3);
        a.insert(&3u64.to_be_bytes(), v3.clone()).unwrap();
        let all: Vec<Vec<u8>> = a.iter().map(|e| e.unwrap().1.to_vec()).collect();
        assert_eq!(all, vec![v1, v2.clone(), v3]);
        // Slot 0 of value 1 disappears: it reads empty, under its key.
        tree.remove(a.slots.key(0)).unwrap();
        let (k, v) = a.first().unwrap().unwrap();
        assert_eq!((&k[..], v.len()), (&1u64.to_be_bytes()[..], 0));
        // Heads that are not one, or that claim what cannot be (2^56 bytes in one slot).
        let head_key = |o: u64| {
            let mut k = full_key(&partition_prefix(6, 0), &o.to_be_bytes()).to_vec();
            k.push(0);
            k
        };
        tree.insert(head_key(9), &b"junk"[..]).unwrap();
        let huge = SlotHead {
            first: 0,
            count: 1,
            len: 1 << 56,
        };
        tree.insert(head_key(8), &huge.encode()[..]).unwrap();
        // Consistent, but more slots than any value can have (removing it would list them).
        let many = SlotHead {
            first: 0,
            count: u32::MAX,
            len: u64::from(u32::MAX) * SLOT_BYTES as u64,
        };
        assert!(SlotHead::decode(&many.encode()).is_err());
        let read: Vec<(u64, usize)> = a
            .range_from(&8u64.to_be_bytes())
            .map(|e| {
                let (k, v) = e.unwrap();
                (u64::from_be_bytes(k[..].try_into().unwrap()), v.len())
            })
            .collect();
        assert_eq!(read, vec![(8, 0), (9, 0)]);
        // Neither stops retention: both go.
        a.remove(&9u64.to_be_bytes()).unwrap();
        a.remove(&8u64.to_be_bytes()).unwrap();
        a.remove(&1u64.to_be_bytes()).unwrap();
        assert_eq!(
            a.range_through(&2u64.to_be_bytes())
                .map(|e| e.unwrap().1.to_vec())
                .collect::<Vec<_>>(),
            vec![v2]
        );
    }

    /// A write cut short before its head (a crash: sled recovers a prefix of its log) leaves
    /// slots that no head names. They read as nothing, and the next value goes after them.
    #[test]
    fn slots_written_without_their_head_read_as_nothing_and_are_written_around() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 7, 0);
        let v1 = patterned(SLOT_BYTES * 2, 1);
        a.insert(&1u64.to_be_bytes(), v1.clone()).unwrap();
        // What a crash after the slots of offset 2 and before its head leaves behind.
        let (next, _) = a.slots.cursor(2).unwrap();
        let orphan = patterned(SLOT_BYTES, 8);
        for s in next..next + 2 {
            tree.insert(a.slots.key(s), &orphan[..]).unwrap();
        }
        let values = |a: &PartitionKeys| -> Vec<(u64, Vec<u8>)> {
            a.iter()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (u64::from_be_bytes(k[..].try_into().unwrap()), v.to_vec())
                })
                .collect()
        };
        assert_eq!(values(&a), vec![(1, v1.clone())]);
        let v2 = patterned(SLOT_BYTES * 2 + 7, 2);
        a.insert(&2u64.to_be_bytes(), v2.clone()).unwrap();
        assert_eq!(values(&a), vec![(1, v1), (2, v2)]);
        for s in next..next + 2 {
            assert_eq!(tree.get(a.slots.key(s)).unwrap().unwrap(), orphan[..]);
        }
    }

    /// A read within a byte budget takes the first value whatever its size, then values
    /// while they fit, and stops at one that does not fit before reading its slots.
    #[test]
    fn a_read_within_a_budget_stops_before_reading_a_value_that_does_not_fit() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 8, 0);
        let vs: Vec<Vec<u8>> = (1..=3).map(|i| patterned(SLOT_BYTES * 2, i)).collect();
        for (i, v) in vs.iter().enumerate() {
            a.insert(&(i as u64).to_be_bytes(), v.clone()).unwrap();
        }
        let read = |max: usize| -> Vec<Vec<u8>> {
            a.stored_from_within(&0u64.to_be_bytes(), max)
                .map(|e| e.unwrap().1.joined().to_vec())
                .collect()
        };
        assert_eq!(read(1), vs[..1].to_vec());
        assert_eq!(read(SLOT_BYTES * 4), vs[..2].to_vec());
        assert_eq!(read(usize::MAX), vs.clone());
        // The value past the budget is not read: with its slots gone it would read as
        // damage (an empty value).
        let mut head = full_key(&partition_prefix(8, 0), &1u64.to_be_bytes()).to_vec();
        head.push(0);
        let h = SlotHead::decode(&tree.get(&head).unwrap().unwrap()).unwrap();
        tree.remove(a.slots.key(h.first)).unwrap();
        assert_eq!(read(SLOT_BYTES * 3), vs[..1].to_vec());
        let mut out = bytes::BytesMut::new();
        for e in a.stored_from_within(&0u64.to_be_bytes(), usize::MAX) {
            e.unwrap().1.append_to(&mut out);
        }
        assert_eq!(
            out.len(),
            SLOT_BYTES * 2 * 2,
            "the damaged value reads empty"
        );
    }

    /// An iterator that saw a value's head before the value was removed (retention,
    /// truncation, a reset, in one batch with its slots) skips it, and reads one replaced
    /// since as it is now: neither is damage, and neither may read as an empty (damaged)
    /// batch, in either direction.
    #[test]
    fn a_value_removed_after_its_head_was_seen_is_skipped_not_damaged() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 4, 4);
        a.insert(&1u64.to_be_bytes(), patterned(SLOT_BYTES * 2, 1))
            .unwrap();
        a.insert(&2u64.to_be_bytes(), patterned(SLOT_BYTES * 2, 2))
            .unwrap();
        // What an iterator read before the removal: both heads.
        let seen: Vec<Entry> = [1u64, 2]
            .iter()
            .map(|o| {
                let mut suffix = o.to_be_bytes().to_vec();
                suffix.push(0);
                let mut full = partition_prefix(4, 4).to_vec();
                full.extend_from_slice(&suffix);
                Ok((IVec::from(suffix), tree.get(&full).unwrap().unwrap()))
            })
            .collect();
        // Replaced since it was seen: read as it is now.
        a.insert(&1u64.to_be_bytes(), patterned(SLOT_BYTES * 3, 9))
            .unwrap();
        let now: Vec<Vec<u8>> = Chunked::new(seen.clone().into_iter(), a.slots.clone(), a.prefix)
            .take(1)
            .map(|e| e.unwrap().1.joined().to_vec())
            .collect();
        assert_eq!(now, vec![patterned(SLOT_BYTES * 3, 9)]);
        a.remove(&2u64.to_be_bytes()).unwrap();
        let forward: Vec<u64> = Chunked::new(seen.clone().into_iter(), a.slots.clone(), a.prefix)
            .map(|e| {
                let (k, v) = e.unwrap();
                assert!(!v.is_empty(), "a removed value read as damaged");
                u64::from_be_bytes(k[..].try_into().unwrap())
            })
            .collect();
        assert_eq!(forward, vec![1]);
        let backward: Vec<u64> = Chunked::new(seen.into_iter(), a.slots.clone(), a.prefix)
            .rev()
            .map(|e| u64::from_be_bytes(e.unwrap().0[..].try_into().unwrap()))
            .collect();
        assert_eq!(backward, vec![1]);
    }

    /// A region ends in its guards, after its cursor and before the next region's first key;
    /// a region written before guards existed gets them with its next value.
    #[test]
    fn a_slot_region_ends_in_guards_before_the_next_region() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 9, 2);
        let next = PartitionKeys::new(tree.clone(), 9, 3);
        a.insert(&0u64.to_be_bytes(), patterned(SLOT_BYTES * 2, 1))
            .unwrap();
        next.insert(&0u64.to_be_bytes(), patterned(SLOT_BYTES * 2, 2))
            .unwrap();
        let region: Vec<IVec> = tree
            .scan_prefix(a.slots.prefix)
            .keys()
            .map(|k| k.unwrap())
            .collect();
        let cursor_at = region
            .iter()
            .position(|k| k[..] == a.slots.key(CURSOR_SLOT)[..])
            .unwrap();
        let after: Vec<&IVec> = region[cursor_at + 1..].iter().collect();
        assert_eq!(
            after.len(),
            usize::from(GUARDS),
            "the guards follow the cursor"
        );
        for (g, k) in after.iter().enumerate() {
            assert_eq!(k[..], a.slots.guards.key(g as u8)[..]);
            assert!(
                tree.get(k).unwrap().unwrap().is_empty(),
                "a guard holds nothing"
            );
            assert!(k[..] < next.slots.key(0)[..], "before the next region");
        }

        // A region without guards (written by an older broker) gets them with its next value.
        drop_guards(&tree, &a.slots.guards);
        let reopened = PartitionKeys::new(tree.clone(), 9, 2);
        reopened
            .insert(&10u64.to_be_bytes(), patterned(SLOT_BYTES, 3))
            .unwrap();
        assert!(guards_are_there(&tree, &a.slots.guards));
        assert_eq!(reopened.iter().count(), 2, "both values read back");

        // A region whose cursor is gone goes on after its last slot, not after a guard.
        tree.remove(a.slots.key(CURSOR_SLOT)).unwrap();
        // Slots 0-1 and 2 hold values, placeholders run to 34: the next is 35.
        assert_eq!(reopened.slots.cursor(1).unwrap(), (35, 35));
        reopened
            .insert(&20u64.to_be_bytes(), patterned(SLOT_BYTES, 4))
            .unwrap();
        let (_, v) = reopened
            .range_from(&20u64.to_be_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(v.to_vec(), patterned(SLOT_BYTES, 4));
    }

    /// A partition's values end in guards, before the next partition's first key; no reader
    /// sees them; a partition written before guards existed gets them with its next value;
    /// a tree other than the batches tree gets none.
    #[test]
    fn a_partitions_values_end_in_guards_no_reader_sees() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 9, 2);
        let next = PartitionKeys::new(tree.clone(), 9, 3);
        for o in [0u64, 10] {
            a.insert(&o.to_be_bytes(), patterned(100, o as u8)).unwrap();
        }
        next.insert(&0u64.to_be_bytes(), patterned(100, 9)).unwrap();
        let guards = a.guards.as_ref().unwrap();
        assert!(guards_are_there(&tree, guards));
        for g in 0..GUARDS {
            let k = guards.key(g);
            assert!(
                k[..] > a.past_chunks_of(&[0xff; 8])[..],
                "after every value key"
            );
            assert!(
                k[..] < next.key(&0u64.to_be_bytes())[..],
                "before the next partition"
            );
        }
        assert_eq!(a.iter().count(), 2);
        assert_eq!(a.iter().rev().count(), 2);
        assert_eq!(&a.last().unwrap().unwrap().0[..], &10u64.to_be_bytes());
        assert_eq!(a.range_from(&11u64.to_be_bytes()).count(), 0);
        assert_eq!(
            a.last_suffix_through(&[0xff; 8]).unwrap(),
            Some(10u64.to_be_bytes())
        );
        assert_eq!(a.range_through(&[0xff; 8]).count(), 2);
        assert_eq!(a.range_before(&[0xff; 8]).count(), 2);
        assert_eq!(
            a.stored_from_within(&0u64.to_be_bytes(), usize::MAX)
                .count(),
            2
        );
        a.remove(&10u64.to_be_bytes()).unwrap();
        assert_eq!(a.iter().count(), 1);
        assert!(guards_are_there(&tree, guards), "a removal keeps them");

        drop_guards(&tree, guards);
        let reopened = PartitionKeys::new(tree.clone(), 9, 2);
        reopened
            .insert(&20u64.to_be_bytes(), patterned(100, 20))
            .unwrap();
        assert!(guards_are_there(&tree, guards));

        let db = sled::Config::new().temporary(true).open().unwrap();
        let index = PartitionKeys::new(db.open_tree(TIME_INDEX_TREE).unwrap(), 9, 2);
        index.insert(&1u64.to_be_bytes(), &[0u8; 8][..]).unwrap();
        assert!(index.guards.is_none());
        assert_eq!(index.tree.len(), 1, "the time index gets no guards");
    }

    /// Clearing a partition that lives on keeps its slot numbers going (a reader holding an
    /// old head never reads a new value in its slots); erasing one removes all of it.
    #[test]
    fn clear_keeps_the_slot_numbering_and_erase_leaves_nothing() {
        let (_dir, tree) = batches_tree();
        let a = PartitionKeys::new(tree.clone(), 9, 2);
        for o in 0..3u64 {
            a.insert(&o.to_be_bytes(), patterned(SLOT_BYTES * 2, o as u8))
                .unwrap();
        }
        let (next, _) = a.slots.cursor(0).unwrap();
        assert_eq!(next, 6);
        a.clear().unwrap();
        assert_eq!(a.iter().count(), 0);
        assert_eq!(
            tree.len(),
            1 + 2 * usize::from(GUARDS),
            "only the cursor and the guards (of the slot region and of the values) are left"
        );
        a.insert(&0u64.to_be_bytes(), patterned(SLOT_BYTES * 2, 7))
            .unwrap();
        let first_slot = a
            .slots
            .tree
            .range(a.slots.key(0)..a.slots.key(CURSOR_SLOT))
            .keys()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(&first_slot[PREFIX_LEN..], &6u64.to_be_bytes()[..]);
        assert_eq!(
            a.first().unwrap().unwrap().1.to_vec(),
            patterned(SLOT_BYTES * 2, 7)
        );
        a.erase().unwrap();
        assert_eq!(tree.len(), 0);
        // A partition that never held a slotted value gets no cursor from a clear (only
        // the guards after its values stay).
        let b = PartitionKeys::new(tree.clone(), 9, 3);
        b.insert(&0u64.to_be_bytes(), &b"small"[..]).unwrap();
        b.clear().unwrap();
        assert_eq!(tree.len(), usize::from(GUARDS));
        b.erase().unwrap();
        assert_eq!(tree.len(), 0);
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
        let legacy_keys = |tree: &sled::Tree| {
            tree.scan_prefix(partition_prefix(4, 0))
                .keys()
                .filter(|k| k.as_ref().unwrap().len() == PREFIX_LEN + CHUNK_SUFFIX_LEN)
                .count()
        };
        assert_eq!(legacy_keys(&tree), 2, "offset 5's two later chunks");
        let all: Vec<Vec<u8>> = a.iter().map(|e| e.unwrap().1.to_vec()).collect();
        assert_eq!(all, vec![old.clone(), new.clone()]);
        let back: Vec<Vec<u8>> = a.iter().rev().map(|e| e.unwrap().1.to_vec()).collect();
        assert_eq!(back, vec![new.clone(), old]);
        // Storing a value under the old key drops every old chunk, of whatever size.
        let replacement = patterned(CHUNK_BYTES + 1, 5);
        a.insert(&5u64.to_be_bytes(), replacement.clone()).unwrap();
        let all: Vec<Vec<u8>> = a.iter().map(|e| e.unwrap().1.to_vec()).collect();
        assert_eq!(all, vec![replacement, new]);
        assert_eq!(legacy_keys(&tree), 0, "no chunk of the old form is left");
    }

    #[test]
    fn a_legacy_tree_is_moved_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::log::store::open(dir.path()).unwrap();
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
