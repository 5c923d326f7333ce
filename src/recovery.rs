//! Preheat and recovery: loading a sale into Redis, and rebuilding it — safely, by itself —
//! after Redis lost it.
//!
//! A product Postgres says was preheated (`product.preheated_at`) but Redis does not know is
//! **recovering**: purchases and tokens answer `503 recovering`, the product view says so, and
//! this process forgets its sold-out memory of it. So is a product whose Redis state **went
//! back in time** (a failover to a replica that had not received the last writes): its state is
//! behind a moment seen outside Redis ([`crate::reservations::Moment`]) — found by a purchase
//! against this process's fence, or by this watch against the highest win relayed to RabbitMQ —
//! and is deleted, which makes it lost everywhere.
//!
//! It is rebuilt from Postgres only once every winner of it that ever left Redis is accounted
//! for — **counted, not waited for**: its outbox stream is empty, and every winner the relays
//! recorded as handed to RabbitMQ (`relayed`) has an order or a rejection
//! ([`products::unaccounted`]). A winner in the queue, held by a stalled worker, in a worker's
//! backoff or in the dead-letter queue keeps it recovering, and another product's busy queue
//! does not. Every `serve` process watches its preheated, unended products and starts the
//! rebuild itself; a per-product lock in Redis lets only one rebuild run, and an operator's
//! plain or forced preheat of a recovering product goes through the same checks.
//!
//! A sale that ended and drained is **retired** on purpose (`sweeper`): its keys expire and
//! Postgres records `product.retired_at`. Redis not knowing a retired product is expected,
//! never a loss ([`products::expected_in_redis`]): its view says `ended`, shoppers' reads fall
//! back to Postgres, and a preheat of it simply loads it again.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::sleep_or_stop,
    db::entities::product,
    deps::Deps,
    domain::ProductId,
    metrics::Metrics,
    products::{self, PreheatError},
    reservations::{Checked, Preheated, Reservations, Unavailable},
    soldout::{Recovering, SoldOutCache},
};

/// How often every `serve` process looks for lost products.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Preheats and recovers products.
pub struct Recovery {
    db: DatabaseConnection,
    reservations: Reservations,
    metrics: Arc<Metrics>,
    soldout: Arc<SoldOutCache>,
    recovering: Arc<Recovering>,
    /// The latest moments outside Redis of each watched product, as the watch last read them
    /// from Postgres (at most a second old): what a shopper's `/me` checks Redis against
    /// without asking Postgres.
    outside: std::sync::RwLock<std::collections::HashMap<ProductId, products::Outside>>,
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
            metrics: deps.metrics.clone(),
            soldout,
            recovering,
            outside: std::sync::RwLock::default(),
        }
    }

    /// Whether Redis went back in time for `product`, judged against the moments the watch
    /// last read outside Redis: a shopper Redis does not know may be a winner a failover to a
    /// lagging replica forgot (found by `scripts/chaos`, fsync seed 21: `/me` said `confirmed`,
    /// then `404` for the second before the watch's next pass). If it did, the state is deleted
    /// and the product is recovering, as the watch would have made it.
    pub async fn went_back_for_me(&self, product: ProductId) -> Result<bool, Unavailable> {
        let known = self
            .outside
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&product)
            .copied();
        let Some(outside) = known else {
            return Ok(false);
        };
        match self
            .reservations
            .check_moment(product, outside.won, outside.released)
            .await?
        {
            Checked::WentBack(_) => {
                self.went_back(product);
                Ok(true)
            }
            Checked::Held(_) | Checked::NotInRedis => Ok(false),
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

    /// Redis went back in time for `product`: its state was behind a moment seen outside
    /// Redis and is deleted (by `reserve.lua` or `behind.lua`), so it is lost everywhere.
    pub fn went_back(&self, product: ProductId) {
        self.metrics.rollbacks.inc();
        tracing::error!(
            product_id = product.get(),
            "Redis went back in time for this product (a failover to a replica that had not received the last writes?): its state is dropped and rebuilt from Postgres once every winner that left Redis is an order"
        );
        self.mark(product);
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
        // Asked again under the lock: another process may have rebuilt it meanwhile.
        let result = if !known && started && self.reservations.is_preheated(product).await? {
            Err(PreheatError::AlreadyLive)
        } else {
            products::rebuild(&self.db, &self.reservations, &model, force, known && force).await
        };
        if let Err(e) = self.reservations.unlock_rebuild(product, &token).await {
            tracing::warn!(product_id = product.get(), error = %e, "could not release the rebuild lock; it expires by itself");
        }
        if result.is_ok() {
            self.soldout.clear(product);
            self.unmark(product);
        }
        result
    }

    /// Every winner of `product` that left Redis is accounted for: its outbox is empty, and
    /// each winner relayed to RabbitMQ has an order or a rejection in Postgres.
    async fn drained(&self, product: ProductId) -> Result<bool, PreheatError> {
        if self.reservations.outbox_len(product).await? > 0 {
            return Ok(false);
        }
        Ok(products::unaccounted(&self.db, product).await? == 0)
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
        let models = products::preheated_unended(&self.db).await?;
        let ids = models
            .iter()
            .map(|m| ProductId::try_from(m.product_id))
            .collect::<Result<Vec<_>, _>>()?;
        self.reservations.list_for_relay(&ids).await?;
        // The latest moment of each outside Redis: a state behind it went back in time.
        let moments = products::relayed_moments(&self.db, &ids).await?;
        *self
            .outside
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = moments.clone();
        for id in ids {
            let outside = moments.get(&id).copied().unwrap_or_default();
            let fence = outside.won;
            match self
                .reservations
                .check_moment(id, fence, outside.released)
                .await?
            {
                Checked::Held(_) => {
                    if self.recovering.contains(id) {
                        self.unmark(id);
                    }
                    continue;
                }
                Checked::WentBack(at) => {
                    tracing::warn!(
                        product_id = id.get(),
                        redis_epoch = at.epoch,
                        redis_seq = at.seq,
                        relayed_epoch = fence.epoch,
                        relayed_seq = fence.seq,
                        released_seq = outside.released,
                        "Redis is behind the winners already relayed or the units already returned"
                    );
                    self.went_back(id);
                }
                Checked::NotInRedis => {}
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
