//! Keyed state for processors: the [`StateStore`] a host gives a processor instance (one store
//! per scope — pipeline, stage, input topic and partition — so the caller does the scoping),
//! the in-memory [`MemoryStateStore`] with a size limit, and the per-call transaction both
//! runtimes use ([`CallState`]): a call's writes are buffered, checked against the store's
//! limit as they happen, and applied to the store in one [`StateStore::apply`] only if the call
//! succeeds, so a failed call (trap, limit, Lua error) leaves the store as it was.
//!
//! The store records which keys changed; [`StateStore::drain_changes`] hands them to the host
//! after a call (the latest value of each changed key, or `None` for a deleted one), which a
//! later slice writes to a changelog topic.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

/// One change to a key: its new value, or `None` when it was deleted.
pub type StateChange = (Vec<u8>, Option<Vec<u8>>);

/// What a state store belongs to: one stage of one pipeline, for one input partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateScope {
    /// Pipeline name.
    pub pipeline: String,
    /// Stage index in the pipeline (0-based).
    pub stage: u32,
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
}

impl StateScope {
    /// A scope for `pipeline`'s stage `stage` reading `topic`/`partition`.
    pub fn new(
        pipeline: impl Into<String>,
        stage: u32,
        topic: impl Into<String>,
        partition: i32,
    ) -> Self {
        StateScope {
            pipeline: pipeline.into(),
            stage,
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for StateScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pipeline {} stage {} input {}/{}",
            self.pipeline, self.stage, self.topic, self.partition
        )
    }
}

/// Why a state operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The processor has no store (it does not run in a pipeline), or the caller is not a
    /// processor, or the call happens outside record processing.
    #[error("state is not available: {0}")]
    Unavailable(&'static str),
    /// A write would make the scope's keys and values larger than its limit.
    #[error("state limit exceeded for {scope}: its entries would take {needed} bytes (keys, values and 64 bytes each), the limit is {limit} bytes")]
    Limit {
        /// The store's scope, as text.
        scope: String,
        /// The scope's size ([`entry_size`] of every entry) the write would have led to.
        needed: usize,
        /// The store's limit.
        limit: usize,
    },
    /// The store itself failed.
    #[error("state store for {scope} failed: {message}")]
    Store {
        /// The store's scope, as text.
        scope: String,
        /// What failed.
        message: String,
    },
}

/// The reason given when a processor was built without a store.
pub(crate) const NO_PIPELINE: &str = "this processor runs without a pipeline";
/// The reason given to a partitioner.
pub(crate) const NOT_A_PROCESSOR: &str = "only processors have state, not partitioners";
/// The reason given outside a call (e.g. while a Lua script's top level runs).
pub(crate) const OUTSIDE_A_CALL: &str = "state is only reachable while processing records";

/// What one entry costs beyond its key and value bytes (its map slot, the key's and value's
/// allocations, its place among the changes to write): counted in a scope's size, so that
/// millions of tiny entries cannot hold many times the limit in memory.
pub const ENTRY_OVERHEAD_BYTES: usize = 64;

/// The size an entry of a `key_len`-byte key and a `value_len`-byte value counts for.
pub fn entry_size(key_len: usize, value_len: usize) -> usize {
    key_len + value_len + ENTRY_OVERHEAD_BYTES
}

/// Keyed state of one scope. Keys and values are bytes; the size of a scope is the total bytes
/// of its entries ([`entry_size`]: keys, values and a fixed overhead each), capped by
/// [`StateStore::limit_bytes`]. Implementations use interior
/// mutability: the host keeps an `Arc` to drain changes while the processor holds another.
pub trait StateStore: Send + Sync {
    /// What this store belongs to (named in errors).
    fn scope(&self) -> &StateScope;
    /// The value of `key`, if set.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Set `key` to `value`; fails with [`StateError::Limit`] if the scope would outgrow its
    /// limit (nothing is changed then).
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StateError>;
    /// Remove `key` (no error if it is not set).
    fn delete(&self, key: &[u8]) -> Result<(), StateError>;
    /// Apply a call's changes atomically: all of them, or none if the result would break the
    /// limit. The default applies deletes, then puts, one by one (not atomic on failure).
    fn apply(&self, changes: Vec<StateChange>) -> Result<(), StateError> {
        let (deletes, puts): (Vec<_>, Vec<_>) = changes.into_iter().partition(|(_, v)| v.is_none());
        for (k, _) in deletes {
            self.delete(&k)?;
        }
        for (k, v) in puts {
            if let Some(v) = v {
                self.put(&k, &v)?;
            }
        }
        Ok(())
    }
    /// Bytes of keys and values held now.
    fn used_bytes(&self) -> usize;
    /// The most bytes of keys and values this scope may hold.
    fn limit_bytes(&self) -> usize;
    /// The keys changed since the last drain, each with its current value (`None`: deleted),
    /// in key order; the store forgets them.
    fn drain_changes(&self) -> Vec<StateChange>;
}

/// An in-memory [`StateStore`] with a size limit.
pub struct MemoryStateStore {
    scope: StateScope,
    limit: usize,
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    map: HashMap<Vec<u8>, Vec<u8>>,
    used: usize,
    dirty: BTreeSet<Vec<u8>>,
}

impl MemoryInner {
    fn entry_len(&self, key: &[u8]) -> usize {
        self.map
            .get(key)
            .map_or(0, |v| entry_size(key.len(), v.len()))
    }
}

/// The default size limit of a scope's state: 64 MiB of entries.
pub const DEFAULT_STATE_LIMIT_BYTES: usize = 64 * 1024 * 1024;

impl MemoryStateStore {
    /// An empty store for `scope` holding at most `limit_bytes` of keys and values.
    pub fn new(scope: StateScope, limit_bytes: usize) -> Self {
        MemoryStateStore {
            scope,
            limit: limit_bytes,
            inner: Mutex::new(MemoryInner::default()),
        }
    }

    /// Load entries (e.g. read back from a changelog) without marking them changed. `None`
    /// values remove the key. Fails, loading nothing, past the limit.
    pub fn restore(
        &self,
        entries: impl IntoIterator<Item = StateChange>,
    ) -> Result<(), StateError> {
        let mut inner = self.lock();
        let mut next = inner.map.clone();
        for (k, v) in entries {
            match v {
                Some(v) => next.insert(k, v),
                None => next.remove(&k),
            };
        }
        let used = next.iter().map(|(k, v)| entry_size(k.len(), v.len())).sum();
        if used > self.limit {
            return Err(self.limit_err(used));
        }
        inner.map = next;
        inner.used = used;
        Ok(())
    }

    /// Every key and value held, in key order (what a snapshot writes).
    pub fn entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let inner = self.lock();
        let mut all: Vec<(Vec<u8>, Vec<u8>)> = inner
            .map
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort();
        all
    }

    /// Bytes of keys and values held.
    pub fn used_bytes(&self) -> usize {
        self.lock().used
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limit_err(&self, needed: usize) -> StateError {
        StateError::Limit {
            scope: self.scope.to_string(),
            needed,
            limit: self.limit,
        }
    }
}

impl fmt::Debug for MemoryStateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemoryStateStore")
            .field("scope", &self.scope)
            .field("keys", &inner.map.len())
            .field("used_bytes", &inner.used)
            .field("limit_bytes", &self.limit)
            .finish()
    }
}

impl StateStore for MemoryStateStore {
    fn scope(&self) -> &StateScope {
        &self.scope
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.lock().map.get(key).cloned())
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.apply(vec![(key.to_vec(), Some(value.to_vec()))])
    }

    fn delete(&self, key: &[u8]) -> Result<(), StateError> {
        self.apply(vec![(key.to_vec(), None)])
    }

    fn apply(&self, changes: Vec<StateChange>) -> Result<(), StateError> {
        let mut inner = self.lock();
        // The size after every change, computed first so that nothing is applied past the limit.
        let mut sizes: HashMap<&[u8], usize> = HashMap::new();
        let mut used = inner.used as i128;
        for (k, v) in &changes {
            let old = match sizes.get(k.as_slice()) {
                Some(&s) => s,
                None => inner.entry_len(k),
            };
            let new = v.as_ref().map_or(0, |v| entry_size(k.len(), v.len()));
            used += new as i128 - old as i128;
            sizes.insert(k, new);
        }
        let used = used.max(0) as usize;
        if used > self.limit {
            return Err(self.limit_err(used));
        }
        drop(sizes);
        for (k, v) in changes {
            match v {
                Some(v) => {
                    inner.map.insert(k.clone(), v);
                }
                None => {
                    inner.map.remove(&k);
                }
            }
            inner.dirty.insert(k);
        }
        inner.used = used;
        Ok(())
    }

    fn used_bytes(&self) -> usize {
        self.lock().used
    }

    fn limit_bytes(&self) -> usize {
        self.limit
    }

    fn drain_changes(&self) -> Vec<StateChange> {
        let mut inner = self.lock();
        let dirty = std::mem::take(&mut inner.dirty);
        dirty
            .into_iter()
            .map(|k| {
                let v = inner.map.get(&k).cloned();
                (k, v)
            })
            .collect()
    }
}

/// A processor's view of its store during one call: reads see the call's own writes; writes
/// are buffered and checked against the limit at once; [`CallState::commit`] applies them in
/// one [`StateStore::apply`] after a successful call, [`CallState::rollback`] drops them after
/// a failed one.
pub(crate) struct CallState {
    store: Result<Arc<dyn StateStore>, &'static str>,
    pending: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Change in bytes of keys and values the pending writes make.
    delta: i128,
    active: bool,
}

impl CallState {
    /// A processor's state: its store, or unavailable because it runs without a pipeline.
    pub fn processor(store: Option<Arc<dyn StateStore>>) -> Self {
        Self::with(store.ok_or(NO_PIPELINE))
    }

    /// A partitioner's: always unavailable.
    pub fn partitioner() -> Self {
        Self::with(Err(NOT_A_PROCESSOR))
    }

    fn with(store: Result<Arc<dyn StateStore>, &'static str>) -> Self {
        CallState {
            store,
            pending: HashMap::new(),
            delta: 0,
            active: false,
        }
    }

    fn store(&self) -> Result<&Arc<dyn StateStore>, StateError> {
        let store = self
            .store
            .as_ref()
            .map_err(|r| StateError::Unavailable(r))?;
        if !self.active {
            return Err(StateError::Unavailable(OUTSIDE_A_CALL));
        }
        Ok(store)
    }

    /// Start a call: nothing pending.
    pub fn begin(&mut self) {
        self.pending.clear();
        self.delta = 0;
        self.active = true;
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let store = self.store()?;
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => store.get(key),
        }
    }

    fn current_len(&self, key: &[u8]) -> Result<usize, StateError> {
        Ok(self.get(key)?.map_or(0, |v| entry_size(key.len(), v.len())))
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        let store = self.store()?;
        let (used, limit) = (store.used_bytes() as i128, store.limit_bytes());
        let old = self.current_len(key)? as i128;
        let new = entry_size(key.len(), value.len()) as i128;
        let after = used + self.delta - old + new;
        if after > limit as i128 {
            return Err(StateError::Limit {
                scope: store.scope().to_string(),
                needed: after.max(0) as usize,
                limit,
            });
        }
        self.delta += new - old;
        self.pending.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    pub fn delete(&mut self, key: &[u8]) -> Result<(), StateError> {
        self.store()?;
        let old = self.current_len(key)? as i128;
        if old == 0 {
            // Not set (nor set earlier in this call): nothing to remove, and nothing to
            // remember or write, however many absent keys a call deletes.
            return Ok(());
        }
        self.delta -= old;
        self.pending.insert(key.to_vec(), None);
        Ok(())
    }

    /// End a successful call: apply its writes to the store in one step.
    pub fn commit(&mut self) -> Result<(), StateError> {
        self.active = false;
        self.delta = 0;
        if self.pending.is_empty() {
            return Ok(());
        }
        let changes: Vec<StateChange> = self.pending.drain().collect();
        match &self.store {
            Ok(store) => store.apply(changes),
            Err(r) => Err(StateError::Unavailable(r)),
        }
    }

    /// End a failed call: forget its writes.
    pub fn rollback(&mut self) {
        self.active = false;
        self.delta = 0;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: usize = ENTRY_OVERHEAD_BYTES;

    fn store(limit: usize) -> Arc<MemoryStateStore> {
        Arc::new(MemoryStateStore::new(
            StateScope::new("p", 0, "t", 3),
            limit,
        ))
    }

    #[test]
    fn the_memory_store_counts_keys_and_values_against_its_limit() {
        let s = store(10 + E);
        s.put(b"ab", b"cdef").unwrap();
        assert_eq!(s.used_bytes(), 6 + E);
        s.put(b"ab", b"c").unwrap();
        assert_eq!(s.used_bytes(), 3 + E);
        let e = s.put(b"xyz", b"12345").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("state limit exceeded for pipeline p stage 0 input t/3: its entries would take {} bytes (keys, values and 64 bytes each), the limit is {} bytes", 11 + 2 * E, 10 + E)
        );
        assert_eq!(
            s.get(b"xyz").unwrap(),
            None,
            "a refused put changes nothing"
        );
        s.delete(b"ab").unwrap();
        assert_eq!(s.used_bytes(), 0);
        s.put(b"xyz", b"1234567").unwrap();
        assert_eq!(
            s.drain_changes(),
            vec![
                (b"ab".to_vec(), None),
                (b"xyz".to_vec(), Some(b"1234567".to_vec()))
            ]
        );
        assert!(s.drain_changes().is_empty());
    }

    #[test]
    fn tiny_entries_count_their_overhead() {
        // A 1 MiB scope holds about 16,000 entries of 1-byte keys and empty values, not a
        // million (which would take some 100 MiB of memory).
        let s = store(1 << 20);
        let mut n = 0u32;
        while s.put(&n.to_le_bytes()[..3], b"").is_ok() {
            n += 1;
        }
        assert_eq!(n as usize, (1 << 20) / (3 + E));
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let s = store(10 + E);
        s.put(b"a", b"123456789").unwrap();
        // Deleting `a` and putting `b` fits; the order inside the batch does not matter.
        s.apply(vec![
            (b"b".to_vec(), Some(b"12345678".to_vec())),
            (b"a".to_vec(), None),
        ])
        .unwrap();
        assert_eq!(s.used_bytes(), 9 + E);
        let e = s
            .apply(vec![
                (b"c".to_vec(), Some(b"1".to_vec())),
                (b"d".to_vec(), Some(b"1".to_vec())),
            ])
            .unwrap_err();
        assert!(
            matches!(e, StateError::Limit { needed, .. } if needed == 13 + 3 * E),
            "{e}"
        );
        assert_eq!(s.get(b"c").unwrap(), None);
        assert_eq!(s.used_bytes(), 9 + E);
    }

    #[test]
    fn restore_does_not_mark_changes() {
        let s = store(100 + E);
        s.restore(vec![(b"k".to_vec(), Some(b"v".to_vec()))])
            .unwrap();
        assert_eq!(s.get(b"k").unwrap(), Some(b"v".to_vec()));
        assert!(s.drain_changes().is_empty());
        assert!(s
            .restore(vec![(b"big".to_vec(), Some(vec![0; 200]))])
            .is_err());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_call_sees_its_own_writes_and_commits_or_rolls_back() {
        let s = store(10 + E);
        let mut c = CallState::processor(Some(s.clone()));
        assert_eq!(
            c.get(b"k").unwrap_err(),
            StateError::Unavailable(OUTSIDE_A_CALL)
        );
        c.begin();
        c.put(b"k", b"1234").unwrap();
        assert_eq!(c.get(b"k").unwrap(), Some(b"1234".to_vec()));
        assert_eq!(s.get(b"k").unwrap(), None, "not applied before commit");
        // 5 pending + 6 = 11 > 10 (and an entry's overhead each), although the store itself
        // is empty.
        assert!(matches!(
            c.put(b"j", b"12345"),
            Err(StateError::Limit { needed, .. }) if needed == 11 + 2 * E
        ));
        c.commit().unwrap();
        assert_eq!(s.get(b"k").unwrap(), Some(b"1234".to_vec()));
        c.begin();
        c.delete(b"k").unwrap();
        c.put(b"j", b"123456789").unwrap();
        c.rollback();
        // Deleting keys that are not set records nothing: no pending entry, no change.
        c.begin();
        for i in 0..10_000u32 {
            c.delete(&i.to_be_bytes()).unwrap();
        }
        assert!(c.pending.is_empty());
        c.commit().unwrap();
        assert_eq!(s.get(b"k").unwrap(), Some(b"1234".to_vec()));
        assert_eq!(
            s.drain_changes(),
            vec![(b"k".to_vec(), Some(b"1234".to_vec()))]
        );
    }

    #[test]
    fn without_a_store_state_is_unavailable() {
        let mut c = CallState::processor(None);
        c.begin();
        let e = c.put(b"k", b"v").unwrap_err();
        assert_eq!(
            e.to_string(),
            "state is not available: this processor runs without a pipeline"
        );
        let mut c = CallState::partitioner();
        c.begin();
        assert_eq!(
            c.get(b"k").unwrap_err(),
            StateError::Unavailable(NOT_A_PROCESSOR)
        );
    }
}
