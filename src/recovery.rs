//! Preheat and recovery: loading a sale into Redis, and rebuilding it — safely, by itself —
//! after Redis lost it.
//!
//! A product Postgres says was preheated (`product.preheated_at`) but Redis does not know is
//! **recovering**: purchases and tokens answer `503 recovering`, the product view says so, and
//! this process forgets its sold-out memory of it. It is rebuilt from Postgres only once no
//! winner of it can still be in flight outside Postgres: its outbox stream is empty, the
//! orders queue has no ready message, and the product's persisted reservations have not
//! changed for a quiet period (a worker's unacked batch lands within it). Every `serve`
//! process watches its preheated, unended products and starts the rebuild itself; a
//! per-product lock in Redis lets only one rebuild run, and an operator's plain or forced
//! preheat of a recovering product goes through the same checks.
//!
//! A sale that ended and drained is **retired** on purpose (`sweeper`): its keys expire and
//! Postgres records `product.retired_at`. Redis not knowing a retired product is expected,
//! never a loss ([`products::expected_in_redis`]): its view says `ended`, shoppers' reads fall
//! back to Postgres, and a preheat of it simply loads it again.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use chrono::Utc;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{Broker, declare_topology},
    backoff::sleep_or_stop,
    db::entities::product,
    deps::Deps,
    domain::ProductId,
    metrics::Metrics,
    products::{self, PreheatError},
    reservations::{Preheated, Reservations},
    soldout::{Recovering, SoldOutCache},
};

/// How often every `serve` process looks for lost products.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// What "no winner in flight" is judged on, at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flight {
    outbox: i64,
    queue_ready: u32,
    persisted: i64,
}

impl Flight {
    fn clear(&self) -> bool {
        self.outbox == 0 && self.queue_ready == 0
    }
}

/// Preheats and recovers products.
pub struct Recovery {
    db: DatabaseConnection,
    reservations: Reservations,
    broker: Broker,
    queue: String,
    metrics: Arc<Metrics>,
    soldout: Arc<SoldOutCache>,
    recovering: Arc<Recovering>,
    /// How long nothing may move before a lost product counts as drained.
    quiet: Duration,
}

impl Recovery {
    pub fn new(
        deps: &Deps,
        reservations: Reservations,
        soldout: Arc<SoldOutCache>,
        recovering: Arc<Recovering>,
    ) -> Self {
        Self {
            db: deps.db.clone(),
            reservations,
            broker: deps.broker.clone(),
            queue: deps.settings.amqp_queue.clone(),
            metrics: deps.metrics.clone(),
            soldout,
            recovering,
            quiet: (deps.settings.worker_batch_wait * 3).max(Duration::from_secs(1)),
        }
    }

    pub fn is_recovering(&self, product: ProductId) -> bool {
        self.recovering.contains(product)
    }

    /// Marks `product` recovering (once: metric, error log, sold-out memory dropped).
    fn mark(&self, product: ProductId) {
        if self.recovering.insert(product) {
            self.soldout.clear(product);
            self.metrics.recoveries.inc();
            self.metrics.recovering.set(self.recovering.len() as i64);
            tracing::error!(
                product_id = product.get(),
                "Redis lost a preheated product: recovering (purchases answer 503 until it is rebuilt from Postgres)"
            );
        }
    }

    fn unmark(&self, product: ProductId) {
        if self.recovering.remove(product) {
            tracing::info!(product_id = product.get(), "product recovered");
        }
        self.metrics.recovering.set(self.recovering.len() as i64);
    }

    /// Redis answered "unknown product" to a purchase: whether that is a loss, see
    /// [`Recovery::check_lost`].
    pub async fn lost(&self, product: ProductId) -> anyhow::Result<bool> {
        match products::find(&self.db, product).await? {
            Some(model) => self.check_lost(&model).await,
            None => Ok(false),
        }
    }

    /// Redis does not know `model`'s product: whether that means Redis lost it (Postgres says
    /// Redis should hold it, [`products::expected_in_redis`], and no preheat is loading it right
    /// now — the first preheat records `preheated_at` just before it loads Redis). A loss marks
    /// it recovering.
    pub async fn check_lost(&self, model: &product::Model) -> anyhow::Result<bool> {
        let id = ProductId::try_from(model.product_id)?;
        if self.recovering.contains(id) {
            return Ok(true);
        }
        if !products::expected_in_redis(model, Utc::now()) {
            return Ok(false);
        }
        if self.reservations.being_rebuilt(id).await? {
            return Ok(false);
        }
        self.mark(id);
        Ok(true)
    }

    /// Loads a product's sale into Redis (the operators' preheat, and the automatic recovery).
    ///
    /// A sale Redis still has is refused once live unless `force`, and then rebuilt while
    /// paused. A sale Redis lost is rebuilt only once no winner of it is in flight
    /// ([`PreheatError::Recovering`] until then), whatever `force` says.
    pub async fn preheat(
        &self,
        product: ProductId,
        force: bool,
    ) -> Result<Preheated, PreheatError> {
        let model = products::find(&self.db, product)
            .await?
            .ok_or(PreheatError::NotFound)?;
        let known = self.reservations.is_preheated(product).await?;
        let started = Utc::now() >= model.starts_at;
        if known && started && !force {
            return Err(PreheatError::AlreadyLive);
        }
        // Preheated and not retired, yet unknown to Redis: lost (a retired one just loads
        // again) — unless a preheat is loading it right now (it holds the rebuild lock).
        if !known
            && started
            && model.preheated_at.is_some()
            && model.retired_at.is_none()
            && !self.reservations.being_rebuilt(product).await?
        {
            self.mark(product);
            if !self.drained(product).await? {
                return Err(PreheatError::Recovering);
            }
        }
        let token = self
            .reservations
            .lock_rebuild(product)
            .await?
            .ok_or(PreheatError::Busy)?;
        let result =
            products::rebuild(&self.db, &self.reservations, &model, force, known && force).await;
        if let Err(e) = self.reservations.unlock_rebuild(product, &token).await {
            tracing::warn!(product_id = product.get(), error = %e, "could not release the rebuild lock; it expires by itself");
        }
        if result.is_ok() {
            self.soldout.clear(product);
            self.unmark(product);
        }
        result
    }

    /// No winner of `product` is in flight outside Postgres: the outbox and the queue are
    /// empty, and the product's persisted reservations did not change for the quiet period.
    async fn drained(&self, product: ProductId) -> Result<bool, PreheatError> {
        let before = self.flight(product).await?;
        if !before.clear() {
            return Ok(false);
        }
        tokio::time::sleep(self.quiet).await;
        let after = self.flight(product).await?;
        Ok(after.clear() && after == before)
    }

    async fn flight(&self, product: ProductId) -> Result<Flight, PreheatError> {
        let outbox = self.reservations.outbox_len(product).await?;
        let queue_ready = self.queue_ready().await?;
        let persisted = products::count_orders(&self.db, product, "true").await?;
        Ok(Flight {
            outbox,
            queue_ready,
            persisted,
        })
    }

    /// Messages ready in the orders queue (declared idempotently, as relays and workers do).
    async fn queue_ready(&self) -> anyhow::Result<u32> {
        let conn = self
            .broker
            .connected(Duration::from_secs(1))
            .await
            .context("RabbitMQ is not connected: cannot tell whether winners are in flight")?;
        let ch = conn.create_channel().await.context("opening a channel")?;
        let queue = declare_topology(&ch, &self.queue).await;
        let _ = ch.close(200, "checked".into()).await;
        Ok(queue
            .context("reading the orders queue's depth")?
            .message_count())
    }

    /// Watches every preheated, unended product; marks the lost ones recovering and rebuilds
    /// each once it is drained. Runs in every `serve` process until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        while !shutdown.is_cancelled() {
            if let Err(e) = self.watch_once().await {
                tracing::warn!(error = %format!("{e:#}"), "recovery watch failed; retrying");
            }
            sleep_or_stop(&shutdown, WATCH_EVERY).await;
        }
        Ok(())
    }

    async fn watch_once(&self) -> anyhow::Result<()> {
        for model in products::preheated_unended(&self.db).await? {
            let id = ProductId::try_from(model.product_id)?;
            if self.reservations.is_preheated(id).await? {
                if self.recovering.contains(id) {
                    self.unmark(id);
                }
                continue;
            }
            match self.preheat(id, false).await {
                Ok(Preheated::Loaded { remaining, buyers }) => tracing::warn!(
                    product_id = id.get(),
                    remaining,
                    buyers,
                    "rebuilt a product Redis had lost"
                ),
                Ok(Preheated::AlreadyLive { .. })
                | Err(PreheatError::Recovering | PreheatError::Busy | PreheatError::AlreadyLive) => {
                }
                Err(e) => {
                    tracing::warn!(product_id = id.get(), error = %e, "rebuilding a lost product failed; retrying")
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_means_outbox_or_queue_not_empty() {
        let f = |outbox, queue_ready| Flight {
            outbox,
            queue_ready,
            persisted: 0,
        };
        assert!(f(0, 0).clear());
        assert!(!f(1, 0).clear());
        assert!(!f(0, 3).clear());
    }
}
