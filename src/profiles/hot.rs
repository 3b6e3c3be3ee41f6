//! The hot set: decoded copies of sled records for the customers the store is serving now
//! (profiles, KPIs), so a decision at the till does not read and decode sled again for what
//! the commit before it has just written.
//!
//! Invariants:
//! - The cache never serves what sled no longer holds. A writer changes sled first, then calls
//!   [`Hot::wrote`], which moves a write counter and applies the writer's own change under the
//!   cache lock. A reader that missed fills the cache only if that counter did not move since
//!   before it read sled; otherwise its copy may predate a write and is handed out once, not
//!   kept.
//! - Bounded by entries; with caching off (`entries = 0`) nothing is ever kept and every read
//!   goes to sled, through the same code.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

/// The entries of one kind of record, by customer id.
pub type Entries<V> = LruCache<Arc<str>, Arc<V>>;

/// A read-through cache of one kind of record, kept coherent with sled by its writers.
pub struct Hot<V> {
    lru: Mutex<Entries<V>>,
    enabled: bool,
    /// Moves on every write to the records this caches, under `lru`'s lock.
    writes: AtomicU64,
}

impl<V> Hot<V> {
    /// Keeps at most `entries` records; 0 keeps none.
    pub fn new(entries: usize) -> Self {
        let cap = NonZeroUsize::new(entries);
        Hot {
            // With caching off, an LRU of one that is never filled keeps the code paths one.
            lru: Mutex::new(LruCache::new(cap.unwrap_or(NonZeroUsize::MIN))),
            enabled: cap.is_some(),
            writes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries<V>> {
        // A panic while holding the lock cannot leave the LRU half-updated in a way that
        // matters: at worst an entry is missing, and the next read goes to sled.
        self.lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached record, else what `read` finds in sled (kept for next time if no write came
    /// in between). Moves the record to the front of the LRU.
    pub fn get_or_read<E>(
        &self,
        id: &str,
        read: impl FnOnce() -> Result<Option<V>, E>,
    ) -> Result<Option<Arc<V>>, E> {
        let before = {
            let mut lru = self.lock();
            if let Some(v) = lru.get(id) {
                return Ok(Some(v.clone()));
            }
            self.writes.load(Ordering::SeqCst)
        };
        let Some(value) = read()?.map(Arc::new) else {
            return Ok(None);
        };
        let mut lru = self.lock();
        if self.enabled && self.writes.load(Ordering::SeqCst) == before {
            lru.put(Arc::from(id), value.clone());
        }
        Ok(Some(value))
    }

    /// The cached record, without moving anyone in the LRU (scans over every customer).
    pub fn peek(&self, id: &str) -> Option<Arc<V>> {
        self.lock().peek(id).cloned()
    }

    /// To be called after every write to sled of the records this caches: `change` applies
    /// the writer's own result to the cache (put, pop, or nothing), under the lock that keeps
    /// reads in flight from entering older copies.
    pub fn wrote(&self, change: impl FnOnce(&mut Entries<V>)) {
        let mut lru = self.lock();
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.enabled {
            change(&mut lru);
        }
    }

    /// The ids held, most recently used first.
    #[cfg(test)]
    pub fn ids(&self) -> Vec<String> {
        self.lock().iter().map(|(k, _)| k.to_string()).collect()
    }

    /// Records held now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_overtaken_by_a_write_is_not_kept() {
        let hot: Hot<u32> = Hot::new(4);
        // The read sees sled before a write lands; the writer's own change wins.
        let got = hot
            .get_or_read::<()>("c1", || {
                hot.wrote(|lru| {
                    lru.put(Arc::from("c1"), Arc::new(2));
                });
                Ok(Some(1))
            })
            .unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&1),
            "the reader gets what it read, once"
        );
        assert_eq!(
            hot.peek("c1").as_deref(),
            Some(&2),
            "the cache keeps the write's"
        );
        // With no write in between, the read is kept and served next time.
        hot.get_or_read::<()>("c2", || Ok(Some(7))).unwrap();
        let again = hot
            .get_or_read::<()>("c2", || panic!("served from the cache"))
            .unwrap();
        assert_eq!(again.as_deref(), Some(&7));
    }

    #[test]
    fn with_no_entries_nothing_is_kept() {
        let hot: Hot<u32> = Hot::new(0);
        hot.get_or_read::<()>("c1", || Ok(Some(1))).unwrap();
        hot.wrote(|lru| {
            lru.put(Arc::from("c2"), Arc::new(2));
        });
        assert_eq!(hot.count(), 0);
    }
}
