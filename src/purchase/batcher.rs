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
//!   attempts or its oldest attempt has waited `SECKILL_RESERVE_BATCH_WINDOW_US`.
//!
//! So a queued attempt waits at most one call or one window, whichever is shorter. Each call is
//! its own task: a shopper who hangs up does not cancel the decisions of the others in its
//! batch (as with one call per attempt, an attempt sent is decided; `/me` tells its result).
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
        let (send, arm) = {
            let mut lanes = self.lanes();
            let lane = lanes.entry(product).or_default();
            lane.queue.push(Waiting { user, reply });
            if lane.in_flight == 0 || lane.queue.len() >= self.settings.max {
                (Some(lane.take(self.settings.max)), None)
            } else if lane.queue.len() == 1 {
                (None, Some(lane.sent))
            } else {
                (None, None)
            }
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
        let batch = {
            let mut lanes = self.lanes();
            match lanes.get_mut(&product) {
                Some(lane) if lane.sent == sent && !lane.queue.is_empty() => {
                    lane.take(self.settings.max)
                }
                _ => return,
            }
        };
        tokio::spawn(self.run(product, batch));
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
