//! Micro-batched purchase decisions: many attempts on one product, one Redis call.
//!
//! One script call per attempt bounds a hot product at one Redis round trip and one script
//! start per attempt. Here the attempts of one process on one product queue in a *lane*; the
//! lane sends one `reserve.lua` call for all of them, which decides each exactly as a call of
//! its own would, in arrival order ([`Reservations::reserve_many`]).
//!
//! When a lane sends:
//! - at once when it has nothing in flight: a lone attempt never waits;
//! - while a call is in flight, attempts queue, and go out together when it returns;
//! - or sooner, as a second call beside it, when the queue reaches `SECKILL_RESERVE_BATCH_MAX`
//!   attempts or its oldest attempt has waited `SECKILL_RESERVE_BATCH_WINDOW_US` — unless the
//!   lane already has `SECKILL_RESERVE_LANE_CALLS` (2) calls in flight: then the queue waits
//!   for one to return.
//!
//! So a queued attempt waits at most one call or one window, whichever is shorter, while its
//! product has fewer than that many calls in Redis. That bound is what keeps a hot product
//! from taking Redis from the others: without it a product whose calls slow down (Redis busy)
//! sent one more call every window, each up to `SECKILL_RESERVE_BATCH_MAX` attempts long, and a
//! quiet product's lone attempt queued in Redis behind all of them. With it, one process puts at
//! most `SECKILL_RESERVE_LANE_CALLS × SECKILL_RESERVE_BATCH_MAX` attempts of one product ahead
//! of anyone else's.
//!
//! Each call is its own task: a shopper who hangs up does not cancel the decisions of the others
//! in its batch (as with one call per attempt, an attempt sent is decided; `/me` tells its
//! result).
//! `SECKILL_RESERVE_BATCH_MAX=1` turns batching off: one `reserve.lua` call per attempt.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus::Histogram;
use tokio::sync::oneshot;

use crate::{
    config::BatchSettings,
    domain::{ProductId, UserId},
    reservations::{Decision, Reservations, Unavailable},
};

/// An attempt waiting for its decision.
struct Waiting {
    user: UserId,
    reply: oneshot::Sender<Result<Decision, Unavailable>>,
}

/// One product's attempts in this process.
#[derive(Default)]
struct Lane {
    queue: Vec<Waiting>,
    in_flight: usize,
    /// Counts the queues sent: a window timer armed for an earlier queue does nothing.
    sent: u64,
}

impl Lane {
    /// Queues an attempt; the batch to send now, if any: the lane is idle, or its queue is full
    /// and it has room for another call in flight. `Err(sent)`: the first attempt of a new
    /// queue, whose window is to be armed with the lane's `sent` count.
    fn push(&mut self, waiting: Waiting, s: &BatchSettings) -> Result<Option<Vec<Waiting>>, u64> {
        let max = s.max;
        self.queue.push(waiting);
        if self.in_flight == 0 || (self.queue.len() >= max && self.in_flight < s.calls) {
            Ok(Some(self.take(max)))
        } else if self.queue.len() == 1 {
            Err(self.sent)
        } else {
            Ok(None)
        }
    }

    /// The window armed after `sent` calls ran out: the batch to send beside the calls in
    /// flight, unless the queue went out meanwhile or the lane has no room for another call
    /// (then the next call to return takes the queue).
    fn window_ran_out(&mut self, sent: u64, s: &BatchSettings) -> Option<Vec<Waiting>> {
        (self.sent == sent && !self.queue.is_empty() && self.in_flight < s.calls)
            .then(|| self.take(s.max))
    }

    fn take(&mut self, max: usize) -> Vec<Waiting> {
        self.in_flight += 1;
        self.sent += 1;
        let n = self.queue.len().min(max);
        let rest = self.queue.split_off(n);
        std::mem::replace(&mut self.queue, rest)
    }
}

/// Decides purchase attempts, gathering those on one product into one call.
pub struct Batcher {
    reservations: Reservations,
    settings: BatchSettings,
    lanes: Mutex<HashMap<ProductId, Lane>>,
    sizes: Option<Histogram>,
}

impl Batcher {
    /// `sizes`, when given, observes each call's attempt count.
    pub fn new(
        reservations: Reservations,
        settings: BatchSettings,
        sizes: Option<Histogram>,
    ) -> Arc<Self> {
        Arc::new(Self {
            reservations,
            settings,
            lanes: Mutex::default(),
            sizes,
        })
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<ProductId, Lane>> {
        // A lane is consistent between statements: a panic elsewhere cannot leave it half-done.
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides one purchase attempt of `user` on `product`, in a batch with the attempts on
    /// the same product that arrive meanwhile.
    pub async fn reserve(
        self: &Arc<Self>,
        user: UserId,
        product: ProductId,
    ) -> Result<Decision, Unavailable> {
        if self.settings.max <= 1 {
            if let Some(sizes) = &self.sizes {
                sizes.observe(1.0);
            }
            return self.reservations.reserve(user, product).await;
        }
        let (reply, decided) = oneshot::channel();
        let (send, arm) = match self
            .lanes()
            .entry(product)
            .or_default()
            .push(Waiting { user, reply }, &self.settings)
        {
            Ok(send) => (send, None),
            Err(sent) => (None, Some(sent)),
        };
        if let Some(batch) = send {
            tokio::spawn(self.clone().run(product, batch));
        }
        if let Some(sent) = arm {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(this.settings.window).await;
                this.window_ran_out(product, sent);
            });
        }
        decided.await.unwrap_or_else(|_| {
            Err(Unavailable::BadReply(
                "the batch of this attempt ended without an answer".into(),
            ))
        })
    }

    /// The window of the queue that started after `sent` calls ran out: send it now, beside
    /// the call in flight (unless it went out meanwhile).
    fn window_ran_out(self: Arc<Self>, product: ProductId, sent: u64) {
        let batch = self
            .lanes()
            .get_mut(&product)
            .and_then(|lane| lane.window_ran_out(sent, &self.settings));
        if let Some(batch) = batch {
            tokio::spawn(self.run(product, batch));
        }
    }

    /// Sends `batch`, answers each attempt, then sends what queued meanwhile, until the lane
    /// is idle.
    async fn run(self: Arc<Self>, product: ProductId, mut batch: Vec<Waiting>) {
        loop {
            if let Some(sizes) = &self.sizes {
                sizes.observe(batch.len() as f64);
            }
            let users: Vec<UserId> = batch.iter().map(|w| w.user).collect();
            match self.reservations.reserve_many(product, &users).await {
                Ok(decisions) => {
                    for (waiting, decision) in batch.into_iter().zip(decisions) {
                        // The shopper may have hung up; the decision stands either way.
                        let _ = waiting.reply.send(Ok(decision));
                    }
                }
                Err(e) => {
                    for waiting in batch {
                        let _ = waiting.reply.send(Err(e.clone()));
                    }
                }
            }
            batch = {
                let mut lanes = self.lanes();
                let Some(lane) = lanes.get_mut(&product) else {
                    return;
                };
                lane.in_flight -= 1;
                if lane.queue.is_empty() {
                    if lane.in_flight == 0 {
                        lanes.remove(&product);
                    }
                    return;
                }
                lane.take(self.settings.max)
            };
        }
    }

    /// Products with attempts queued or in flight (tests, metrics).
    pub fn busy_lanes(&self) -> usize {
        self.lanes().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt() -> Waiting {
        let (reply, _) = oneshot::channel();
        Waiting {
            user: UserId::try_from(1_i64).unwrap(),
            reply,
        }
    }

    /// A hot product cannot take Redis from the others: however many attempts arrive, and
    /// however long its calls take, its lane never has more than `calls` calls out.
    #[test]
    fn a_lane_never_has_more_than_its_calls_in_flight() {
        let max = 4;
        let s = BatchSettings {
            max,
            window: std::time::Duration::from_millis(1),
            calls: 2,
        };
        let mut lane = Lane::default();
        let sent = |r: Result<Option<Vec<Waiting>>, u64>| r.ok().flatten().map_or(0, |b| b.len());
        assert_eq!(sent(lane.push(attempt(), &s)), 1, "idle: at once");
        assert_eq!(
            lane.push(attempt(), &s).err(),
            Some(1),
            "a new queue arms its window"
        );
        for _ in 0..2 {
            assert_eq!(sent(lane.push(attempt(), &s)), 0);
        }
        assert_eq!(
            sent(lane.push(attempt(), &s)),
            max,
            "full: a second call beside"
        );
        assert_eq!(lane.in_flight, s.calls);
        for _ in 0..3 * max {
            assert_eq!(sent(lane.push(attempt(), &s)), 0, "no third call");
        }
        assert!(
            lane.window_ran_out(lane.sent, &s).is_none(),
            "nor when its window runs out"
        );
        assert_eq!(lane.in_flight, s.calls);
        // A call returns: the queue goes out in it, in batches of at most `max`.
        lane.in_flight -= 1;
        assert_eq!(lane.take(max).len(), max);
        assert_eq!(lane.in_flight, s.calls);
        assert_eq!(lane.queue.len(), 2 * max);
        // With a call fewer in flight, a window that runs out sends beside it again.
        lane.in_flight -= 1;
        assert_eq!(
            lane.window_ran_out(lane.sent, &s).map(|b| b.len()),
            Some(max)
        );
    }
}
