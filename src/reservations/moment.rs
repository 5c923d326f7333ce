//! Where a product's sale stands in Redis, as something that only moves forward: its *epoch*
//! (bumped in Postgres each time the sale is loaded into a Redis that does not hold it) and its
//! *win sequence* within the epoch (+1 per win, written by `reserve.lua` into the state and
//! into each outbox entry).
//!
//! Any moment seen outside Redis — in a reply this process got, or relayed to RabbitMQ and
//! recorded in Postgres — is a *fence*: a Redis found behind it went back in time (a failover
//! to a replica that had not received the last writes, a restore of an old snapshot). Each
//! process keeps the latest moment it saw of each product ([`Fences`]) and hands it to every
//! `reserve.lua` call, which refuses to sell from a state behind it. A Redis that restarted on
//! its own AOF with nothing lost is at or past every fence: it is not a loss.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use crate::domain::ProductId;

/// A product's moment in Redis: ordered by epoch, then win sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Moment {
    pub epoch: i64,
    pub seq: i64,
}

impl Moment {
    pub fn new(epoch: i64, seq: i64) -> Self {
        Self { epoch, seq }
    }

    /// A moment Redis reported; `None` for its "no state" (-1, -1) or anything negative.
    pub fn reported(epoch: i64, seq: i64) -> Option<Self> {
        (epoch >= 0 && seq >= 0).then_some(Self { epoch, seq })
    }
}

/// The latest moment this process saw of each product.
#[derive(Debug, Default)]
pub struct Fences {
    seen: Mutex<HashMap<ProductId, Moment>>,
}

impl Fences {
    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<ProductId, Moment>> {
        // A map of maxima is consistent between statements whatever panicked elsewhere.
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The moment Redis must not be behind for `product` (the zero moment if none was seen).
    pub fn of(&self, product: ProductId) -> Moment {
        self.seen().get(&product).copied().unwrap_or_default()
    }

    /// Records that `moment` of `product` was seen; fences only move forward.
    pub fn saw(&self, product: ProductId, moment: Moment) {
        let mut seen = self.seen();
        let fence = seen.entry(product).or_default();
        if moment > *fence {
            *fence = moment;
        }
    }

    /// Forgets a product (retired: its keys expire, its fence would only cost memory).
    pub fn forget(&self, product: ProductId) {
        self.seen().remove(&product);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_order_by_epoch_then_sequence() {
        assert!(Moment::new(1, 500) < Moment::new(2, 0));
        assert!(Moment::new(2, 60) < Moment::new(2, 120));
        assert_eq!(Moment::default(), Moment::new(0, 0));
        assert_eq!(Moment::reported(-1, -1), None);
        assert_eq!(Moment::reported(3, 7), Some(Moment::new(3, 7)));
    }

    #[test]
    fn a_fence_only_moves_forward_per_product() {
        let f = Fences::default();
        let (a, b) = (
            ProductId::try_from(1_i64).unwrap(),
            ProductId::try_from(2_i64).unwrap(),
        );
        assert_eq!(f.of(a), Moment::default());
        f.saw(a, Moment::new(1, 120));
        f.saw(a, Moment::new(1, 60)); // an older reply arriving late
        assert_eq!(f.of(a), Moment::new(1, 120));
        f.saw(a, Moment::new(2, 0)); // rebuilt: a new epoch passes any sequence of the last
        assert_eq!(f.of(a), Moment::new(2, 0));
        assert_eq!(f.of(b), Moment::default());
        f.forget(a);
        assert_eq!(f.of(a), Moment::default());
    }
}
