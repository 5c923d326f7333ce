//! A small in-process cache for answers that may be a moment old: bounded (the least recently
//! used entry goes first, so a flood of distinct keys cannot grow it), each entry lives a short
//! time, and concurrent misses of one key share one load (single flight) — so any request rate
//! costs at most one load per key per lifetime.
//!
//! A failed load is shared by the callers waiting on it, never kept: the next caller loads
//! again. Its error reaches each caller wrapped in [`SharedError`], whose source chain is the
//! original one (so `ApiError` still tells "Postgres is down" from a bug).

use std::{
    fmt,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use hashlink::LruCache;

/// The error of a load shared by several callers.
#[derive(Debug, Clone)]
pub struct SharedError(Arc<anyhow::Error>);

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a load shared by concurrent requests failed")
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let inner: &(dyn std::error::Error + Send + Sync + 'static) = (*self.0).as_ref();
        Some(inner)
    }
}

type Load<V> = Shared<BoxFuture<'static, Result<(V, Instant), SharedError>>>;

/// A bounded cache of `V` by `K` whose entries live `ttl`, loaded once per miss.
pub struct TtlCache<K: Hash + Eq, V> {
    ttl: Duration,
    slots: Mutex<LruCache<K, Load<V>>>,
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq,
    V: Clone + Send + Sync + 'static,
{
    /// At most `capacity` keys, each answered from memory for `ttl` after its load finished.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            ttl,
            slots: Mutex::new(LruCache::new(capacity.max(1))),
        }
    }

    fn slots(&self) -> MutexGuard<'_, LruCache<K, Load<V>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value of `key`: from memory while fresh, else from `load` — which runs once for
    /// every caller that misses while it is in flight.
    pub async fn get<F, Fut>(&self, key: K, load: F) -> anyhow::Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<V>> + Send + 'static,
    {
        let flight = {
            let mut slots = self.slots();
            match slots.get(&key) {
                Some(flight) if fresh(flight, self.ttl) => flight.clone(),
                _ => {
                    let flight = load()
                        .map(|r| {
                            r.map(|v| (v, Instant::now()))
                                .map_err(|e| SharedError(Arc::new(e)))
                        })
                        .boxed()
                        .shared();
                    slots.insert(key, flight.clone());
                    flight
                }
            }
        };
        flight
            .await
            .map(|(value, _)| value)
            .map_err(anyhow::Error::new)
    }

    /// Forgets `key`: the next caller loads it again (a load in flight still answers the
    /// callers already waiting on it).
    pub fn invalidate(&self, key: &K) {
        self.slots().remove(key);
    }

    /// Keys held (fresh or not yet evicted).
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// In flight (join it), or finished well less than `ttl` ago.
fn fresh<V>(flight: &Load<V>, ttl: Duration) -> bool {
    match flight.peek() {
        None => true,
        Some(Ok((_, done))) => done.elapsed() < ttl,
        Some(Err(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counted(
        loads: &Arc<AtomicUsize>,
        value: u32,
        wait: Duration,
    ) -> impl Future<Output = anyhow::Result<u32>> + Send + 'static {
        let loads = loads.clone();
        async move {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(wait).await;
            Ok(value)
        }
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_key_make_one_load() {
        let cache: Arc<TtlCache<u32, u32>> = Arc::new(TtlCache::new(10, Duration::from_secs(60)));
        let loads = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    cache
                        .get(7, || counted(&loads, 42, Duration::from_millis(50)))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for c in callers {
            assert_eq!(c.await.unwrap(), 42);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        // Fresh: answered from memory.
        let again = cache.get(7, || counted(&loads, 0, Duration::ZERO)).await;
        assert_eq!(again.unwrap(), 42);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_entry_expires_and_an_invalidated_one_is_loaded_again() {
        let cache: TtlCache<u32, u32> = TtlCache::new(10, Duration::from_millis(30));
        let loads = Arc::new(AtomicUsize::new(0));
        cache
            .get(1, || counted(&loads, 1, Duration::ZERO))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        let v = cache.get(1, || counted(&loads, 2, Duration::ZERO)).await;
        assert_eq!(v.unwrap(), 2, "expired, loaded again");
        cache.invalidate(&1);
        let v = cache.get(1, || counted(&loads, 3, Duration::ZERO)).await;
        assert_eq!(v.unwrap(), 3, "invalidated, loaded again");
        assert_eq!(loads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_flood_of_distinct_keys_stays_within_capacity() {
        let cache: TtlCache<u64, Option<u32>> = TtlCache::new(100, Duration::from_secs(60));
        for key in 0..10_000 {
            cache.get(key, || async { Ok(None) }).await.unwrap();
        }
        assert_eq!(cache.len(), 100);
    }

    #[tokio::test]
    async fn a_failed_load_is_shared_with_its_waiters_but_not_kept() {
        let cache: Arc<TtlCache<u32, u32>> = Arc::new(TtlCache::new(10, Duration::from_secs(60)));
        let loads = Arc::new(AtomicUsize::new(0));
        let fail = |loads: &Arc<AtomicUsize>| {
            let loads = loads.clone();
            async move {
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                Err::<u32, _>(anyhow::Error::new(std::io::Error::other("db down")))
                    .map_err(|e| e.context("reading the product"))
            }
        };
        let (a, b) = tokio::join!(cache.get(1, || fail(&loads)), cache.get(1, || fail(&loads)));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        for e in [a.unwrap_err(), b.unwrap_err()] {
            // The original chain is still there to be classified.
            assert!(e.chain().any(|c| c.is::<std::io::Error>()), "{e:#}");
            assert!(format!("{e:#}").contains("reading the product: db down"));
        }
        let v = cache.get(1, || counted(&loads, 5, Duration::ZERO)).await;
        assert_eq!(v.unwrap(), 5);
    }
}
