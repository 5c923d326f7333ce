//! What this process remembers about products between Redis calls.
//!
//! Recovering: products Redis lost (see `recovery`); a preheat's `stock:<id>` event ends it.
//!
//! Sold-out in memory: after a `SoldOut` decision this process answers `410 sold_out` for the
//! product without a Redis call, until a release or a preheat (Redis pub/sub `stock:<id>` on
//! `<prefix>:events`) says otherwise, and for at most [`SOLD_OUT_TRUST`]: then the next purchase
//! asks Redis again (and its answer is remembered again). After a lost subscription the whole
//! cache is dropped, since a message may have been missed. The time bound covers a change no
//! message announces and no connection loss reveals — a product's keys put back in place (a
//! restored snapshot; `scripts/chaos`' rollback, replicas:1 seed 22, where both `serve`s answered
//! `410` for minutes while Redis counted 28 units free): it costs one Redis call per sold-out
//! product per process per second.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::domain::ProductId;

/// How long a sold-out answer from Redis is trusted without a message clearing it.
pub const SOLD_OUT_TRUST: Duration = Duration::from_secs(1);

/// The products this process knows to be sold out, each with when Redis last said so.
pub struct SoldOutCache {
    products: RwLock<HashMap<ProductId, Instant>>,
    trust: Duration,
    /// Only trusted while the subscription that clears it is up.
    listening: AtomicBool,
    /// Bumped by every clear, so a sold-out decision that raced a release is not cached.
    clears: AtomicU64,
}

/// Taken before asking Redis; a later [`SoldOutCache::mark`] with it is ignored if a clear
/// happened in between.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl Default for SoldOutCache {
    fn default() -> Self {
        Self::trusting_for(SOLD_OUT_TRUST)
    }
}

impl SoldOutCache {
    /// A cache whose marks are trusted for `trust` (tests shorten it).
    pub fn trusting_for(trust: Duration) -> Self {
        Self {
            products: RwLock::default(),
            trust,
            listening: AtomicBool::new(false),
            clears: AtomicU64::new(0),
        }
    }

    pub fn is_sold_out(&self, product: ProductId) -> bool {
        self.listening.load(Ordering::Acquire)
            && self
                .products
                .read()
                .is_ok_and(|s| s.get(&product).is_some_and(|at| at.elapsed() < self.trust))
    }

    pub fn ticket(&self) -> Ticket {
        Ticket(self.clears.load(Ordering::Acquire))
    }

    pub fn mark(&self, product: ProductId, ticket: Ticket) {
        if self.listening.load(Ordering::Acquire)
            && let Ok(mut s) = self.products.write()
            && self.clears.load(Ordering::Acquire) == ticket.0
        {
            s.insert(product, Instant::now());
        }
    }

    pub fn clear(&self, product: ProductId) {
        if let Ok(mut s) = self.products.write() {
            self.clears.fetch_add(1, Ordering::AcqRel);
            s.remove(&product);
        }
    }

    /// Subscription up (`true`) or lost (`false`, which also forgets everything).
    pub fn set_listening(&self, up: bool) {
        if !up && let Ok(mut s) = self.products.write() {
            self.clears.fetch_add(1, Ordering::AcqRel);
            s.clear();
        }
        self.listening.store(up, Ordering::Release);
    }

    /// Handles one pub/sub message; `stock:<id>` clears that product.
    pub fn on_event(&self, message: &str) {
        if let Some(id) = message.strip_prefix("stock:")
            && let Ok(id) = ProductId::try_from(id)
        {
            self.clear(id);
        }
    }
}

/// The products this process knows to be recovering.
#[derive(Default)]
pub struct Recovering {
    products: RwLock<HashSet<ProductId>>,
}

impl Recovering {
    pub fn contains(&self, product: ProductId) -> bool {
        self.products.read().is_ok_and(|s| s.contains(&product))
    }

    /// Whether `product` was not recovering before.
    pub fn insert(&self, product: ProductId) -> bool {
        self.products.write().is_ok_and(|mut s| s.insert(product))
    }

    /// Forgets `product` (it is in Redis again); whether it was recovering.
    pub fn remove(&self, product: ProductId) -> bool {
        self.products.write().is_ok_and(|mut s| s.remove(&product))
    }

    pub fn len(&self) -> usize {
        self.products.read().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Handles one pub/sub message: `stock:<id>` (a preheat wrote the product) ends recovery.
    pub fn on_event(&self, message: &str) {
        if let Some(id) = message.strip_prefix("stock:")
            && let Ok(id) = ProductId::try_from(id)
        {
            self.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stock_event_clears_only_its_product_and_a_lost_subscription_clears_all() {
        let cache = SoldOutCache::default();
        let (a, b) = (
            ProductId::try_from(1_i64).unwrap(),
            ProductId::try_from(2_i64).unwrap(),
        );
        cache.mark(a, cache.ticket());
        assert!(
            !cache.is_sold_out(a),
            "not trusted before the subscription is up"
        );
        cache.set_listening(true);
        cache.mark(a, cache.ticket());
        cache.mark(b, cache.ticket());
        cache.on_event("stock:1");
        assert!(!cache.is_sold_out(a));
        assert!(cache.is_sold_out(b));
        cache.on_event("stock:nonsense");
        cache.set_listening(false);
        cache.set_listening(true);
        assert!(!cache.is_sold_out(b));
    }

    #[test]
    fn a_sold_out_answer_that_raced_a_release_is_not_cached() {
        let cache = SoldOutCache::default();
        cache.set_listening(true);
        let p = ProductId::try_from(3_i64).unwrap();
        let ticket = cache.ticket();
        cache.on_event("stock:3"); // the release landed while Redis was answering
        cache.mark(p, ticket);
        assert!(!cache.is_sold_out(p));
    }

    #[test]
    fn a_sold_out_mark_is_trusted_for_a_bounded_time_then_marked_again() {
        let cache = SoldOutCache::trusting_for(Duration::from_millis(30));
        cache.set_listening(true);
        let p = ProductId::try_from(4_i64).unwrap();
        cache.mark(p, cache.ticket());
        assert!(cache.is_sold_out(p));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!cache.is_sold_out(p), "Redis is asked again");
        cache.mark(p, cache.ticket());
        assert!(cache.is_sold_out(p), "and its answer remembered again");
    }

    #[test]
    fn a_preheat_event_ends_recovery_of_its_product_only() {
        let r = Recovering::default();
        let (a, b) = (
            ProductId::try_from(1_i64).unwrap(),
            ProductId::try_from(2_i64).unwrap(),
        );
        assert!(r.insert(a) && r.insert(b) && !r.insert(a));
        r.on_event("stock:1");
        assert!(!r.contains(a) && r.contains(b));
        r.on_event("status:2:7");
        assert!(r.contains(b));
    }
}
