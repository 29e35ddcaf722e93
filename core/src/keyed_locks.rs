//! Per-key async locks (one per group, producer id or transactional id) that forget the
//! keys nobody holds or waits for, so a map of them stays as large as what is in use, not
//! as large as every key ever seen.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Below this many keys, idle ones are kept (pruning a small map buys nothing).
const PRUNE_FLOOR: usize = 256;

/// One async mutex per key, made on first use.
#[derive(Debug)]
pub struct KeyedLocks<K> {
    inner: Mutex<Inner<K>>,
}

#[derive(Debug)]
struct Inner<K> {
    locks: HashMap<K, Arc<AsyncMutex<()>>>,
    /// The map is pruned when it grows past this; then this becomes twice what is left,
    /// so pruning costs O(1) per lock taken, amortized.
    prune_at: usize,
}

impl<K: Eq + Hash> Default for KeyedLocks<K> {
    fn default() -> Self {
        KeyedLocks {
            inner: Mutex::new(Inner {
                locks: HashMap::new(),
                prune_at: PRUNE_FLOOR,
            }),
        }
    }
}

impl<K: Eq + Hash> KeyedLocks<K> {
    /// Waits for `key`'s lock; held until the guard is dropped.
    pub async fn lock<Q>(&self, key: &Q) -> OwnedMutexGuard<()>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let m = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if inner.locks.len() >= inner.prune_at {
                // An entry only the map refers to has no holder and no waiter (both keep a
                // clone), and nobody can get one without this map's lock: safe to drop.
                inner.locks.retain(|_, m| Arc::strong_count(m) > 1);
                inner.prune_at = (inner.locks.len() * 2).max(PRUNE_FLOOR);
            }
            match inner.locks.get(key) {
                Some(m) => m.clone(),
                None => inner.locks.entry(key.to_owned()).or_default().clone(),
            }
        };
        m.lock_owned().await
    }

    /// Keys with a lock in the map now (held, awaited, or idle and not yet pruned).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .locks
            .len()
    }

    /// True when no key has a lock in the map.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn idle_keys_are_forgotten_and_held_ones_still_exclude() {
        let locks: KeyedLocks<String> = KeyedLocks::default();
        let held = locks.lock("kept").await;
        for i in 0..10_000 {
            drop(locks.lock(format!("id-{i}").as_str()).await);
        }
        assert!(
            locks.len() <= 2 * PRUNE_FLOOR,
            "{} locks kept for 1 held key",
            locks.len()
        );
        // The held key survived every pruning: a second taker still waits for it.
        let second = tokio::time::timeout(Duration::from_millis(50), locks.lock("kept")).await;
        assert!(second.is_err(), "a held lock was forgotten and taken twice");
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(5), locks.lock("kept")).await;
        assert!(again.is_ok(), "the released lock could not be taken");
    }

    #[tokio::test]
    async fn a_waiter_keeps_its_key_through_pruning() {
        let locks: Arc<KeyedLocks<i64>> = Arc::default();
        let held = locks.lock(&7).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock(&7).await;
            })
        };
        // Let the waiter queue on key 7, then prune many times.
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 100..5_000 {
            drop(locks.lock(&i).await);
        }
        assert!(!waiter.is_finished(), "the waiter got a lock that is held");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter never got the released lock")
            .expect("waiter task");
    }
}
