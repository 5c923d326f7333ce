//! The expiry sweeper (in `worker`): expires unpaid orders past their deadline and returns
//! their units; reconciles closed orders whose unit was not yet returned (a process that died
//! between the Postgres update and `release.lua`). Several sweepers at once are safe: rows are
//! claimed with `FOR UPDATE SKIP LOCKED` and the transition is guarded by status, and
//! `release.lua` is idempotent per reservation.
//!
//! It also **retires** sales from Redis so its memory does not grow with every sale ever held:
//! once a sale has ended, its outbox and pending set are empty (every winner relayed and
//! persisted) and Postgres has no order of it left that could still change Redis (none awaits
//! payment, every closed one had its unit returned), `retire.lua` gives the product's keys an
//! expiry of `SECKILL_KEY_GRACE_SECS`, the product leaves the relay's list and Postgres
//! records `product.retired_at` (so the recovery watch never takes it for lost).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, Statement, TransactionTrait};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    db::entities::orders::{
        self,
        status_sql::{CLOSED, EXPIRED, PENDING_PAYMENT},
    },
    deps::Deps,
    domain::{ProductId, UserId},
    metrics::Metrics,
    orders::{OrderStatus, return_unit},
    products,
    reservations::{ReservationView, Reservations, Retired},
};

/// Orders handled per sweep.
const SWEEP_LIMIT: i64 = 500;
/// A closed order whose unit is still out after this long is released by the reconciler.
const RECONCILE_AFTER_SECS: i64 = 5;

/// How often the sweeper looks for sales to retire.
const RETIRE_EVERY: Duration = Duration::from_secs(5);

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    pub expired: usize,
    pub reconciled: usize,
}

/// One sweep: expire what is due, then reconcile unreturned units.
pub async fn sweep_once(
    db: &DatabaseConnection,
    reservations: &Reservations,
) -> anyhow::Result<Sweep> {
    let txn = db.begin().await.context("beginning the sweep")?;
    let expired = orders::Model::find_by_statement(Statement::from_sql_and_values(
        txn.get_database_backend(),
        format!(
            "with due as (
             select order_id from orders
             where status = {PENDING_PAYMENT} and expires_at <= now()
             order by expires_at limit $1
             for update skip locked)
         update orders o set status = {EXPIRED}, closed_at = now()
         from due where o.order_id = due.order_id and o.status = {PENDING_PAYMENT}
         returning o.*"
        ),
        [SWEEP_LIMIT.into()],
    ))
    .all(&txn)
    .await
    .context("expiring orders")?;
    // In product id order, like every writer of product rows (no deadlock with the worker),
    // and never below zero.
    let mut per_product: BTreeMap<i64, i64> = BTreeMap::new();
    for o in &expired {
        *per_product.entry(o.product_id).or_default() += 1;
    }
    for (product, n) in per_product {
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "update product set sold = greatest(sold - $2, 0) where product_id = $1",
            [product.into(), n.into()],
        ))
        .await
        .context("taking expired orders off product.sold")?;
    }
    txn.commit().await.context("committing the sweep")?;
    // If Redis does not answer, stop here: the reconciler below (next sweeps) returns the rest.
    for o in &expired {
        if let Err(e) = return_unit(db, reservations, o).await {
            tracing::warn!(error = %format!("{e:#}"), "could not return expired units yet; the reconciler will");
            break;
        }
    }

    let stale = orders::Model::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        format!(
            "select * from orders
         where status in {CLOSED} and released_at is null
           and closed_at < now() - make_interval(secs => $1)
         order by closed_at limit $2"
        ),
        [RECONCILE_AFTER_SECS.into(), SWEEP_LIMIT.into()],
    ))
    .all(db)
    .await
    .context("finding unreturned units")?;
    for o in &stale {
        tracing::info!(order_id = %o.order_id, "reconciling a unit that was not returned");
        return_unit(db, reservations, o).await?;
    }
    Ok(Sweep {
        expired: expired.len(),
        reconciled: stale.len(),
    })
}

/// What one retirement pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retirement {
    pub retired: usize,
    /// Winners of the ended sales looked at that left Redis for RabbitMQ and are neither an
    /// order nor a rejection: in the queue, held by a worker, or dead-lettered. A sale with any
    /// cannot retire; a count that stays up is a winner in the DLQ.
    pub unpersisted: i64,
}

/// Retires every ended, drained sale (see the module's doc). A product that fails is logged
/// and left for the next pass.
pub async fn retire_once(
    db: &DatabaseConnection,
    reservations: &Reservations,
    grace: Duration,
) -> anyhow::Result<Retirement> {
    let mut pass = Retirement::default();
    for model in products::retire_candidates(db).await? {
        let id = ProductId::try_from(model.product_id)?;
        let unpersisted = products::unaccounted(db, id).await?;
        if unpersisted > 0 {
            pass.unpersisted += unpersisted;
            continue;
        }
        match retire(db, reservations, &model, id, grace).await {
            Ok(true) => pass.retired += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(product_id = id.get(), error = %format!("{e:#}"), "could not retire an ended sale yet")
            }
        }
    }
    Ok(pass)
}

async fn retire(
    db: &DatabaseConnection,
    reservations: &Reservations,
    model: &crate::db::entities::product::Model,
    id: ProductId,
    grace: Duration,
) -> anyhow::Result<bool> {
    // Redis first: with the outbox and the pending set empty every winner is in Postgres, so
    // the count of unsettled orders read after it misses none.
    if reservations.outbox_len(id).await? > 0 || reservations.pending_count(id).await? > 0 {
        return Ok(false);
    }
    if products::unsettled_orders(db, id).await? > 0 {
        return Ok(false);
    }
    let ttl = match reservations.retire(id, grace).await? {
        Retired::NotYet => return Ok(false),
        Retired::Expiring { ttl } => Some(ttl),
        // Lost by Redis before it was retired: winners of it may still wait in RabbitMQ, so it
        // is recorded only once its grace has passed too.
        Retired::NotInRedis
            if chrono::Utc::now()
                < model.ends_at + chrono::Duration::from_std(grace).unwrap_or_default() =>
        {
            return Ok(false);
        }
        Retired::NotInRedis => None,
    };
    reservations.forget(id).await?;
    let Some(since) = model.preheated_at else {
        return Ok(false);
    };
    let marked = products::mark_retired(db, id, since).await?;
    if marked {
        tracing::info!(product_id = id.get(), expires_in = ?ttl, "retired an ended sale from Redis");
    }
    Ok(marked)
}

/// The pending entries of each sale one [`settle_pending`] pass saw.
pub type PendingSeen = HashMap<ProductId, HashSet<Uuid>>;

/// Takes off each sale's pending set the winners that were already pending at the previous
/// pass and that Postgres has decided (an order, or a rejected win), recording their status
/// again: the worker's status write for them was lost (Redis went back in time, or failed over,
/// after it; found by `scripts/chaos`, fsync seed 21). Left there, such an entry would keep the
/// sale from ever retiring. A winner Postgres does not have is left to the worker. Returns how
/// many were settled.
pub async fn settle_pending(
    db: &DatabaseConnection,
    reservations: &Reservations,
    seen: &mut PendingSeen,
) -> anyhow::Result<usize> {
    let mut settled = 0;
    let mut now_seen = PendingSeen::new();
    for model in products::held_in_redis(db).await? {
        let id = ProductId::try_from(model.product_id)?;
        if reservations.pending_count(id).await? == 0 {
            continue;
        }
        let pending = reservations.pending_ids(id).await?;
        let stale: Vec<Uuid> = seen
            .get(&id)
            .map(|before| pending.intersection(before).copied().collect())
            .unwrap_or_default();
        now_seen.insert(id, pending);
        if stale.is_empty() {
            continue;
        }
        let views = products::decided_views(db, &stale).await?;
        if views.is_empty() {
            continue;
        }
        let updates: Vec<(UserId, &ReservationView)> = views.iter().map(|(u, v)| (*u, v)).collect();
        reservations.record_statuses(id, &updates).await?;
        tracing::warn!(
            product_id = id.get(),
            settled = views.len(),
            "winners Postgres had decided were still pending in Redis (their status write was lost): recorded again"
        );
        settled += views.len();
    }
    *seen = now_seen;
    Ok(settled)
}

/// The sweeper loop around [`sweep_once`] (and, every few seconds, [`retire_once`]).
pub struct Sweeper {
    pub db: DatabaseConnection,
    pub reservations: Reservations,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
    /// How long a retired sale's keys stay in Redis.
    pub key_grace: Duration,
}

impl Sweeper {
    pub fn new(deps: &Deps, reservations: Reservations) -> Self {
        Self {
            db: deps.db.clone(),
            reservations,
            metrics: deps.metrics.clone(),
            interval: deps.settings.sweep_interval,
            key_grace: deps.settings.key_grace,
        }
    }

    /// Sweeps every `interval` until shutdown; errors are logged and retried next time.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut last_retire: Option<Instant> = None;
        let mut pending_seen = PendingSeen::new();
        loop {
            if last_retire.is_none_or(|t| t.elapsed() >= RETIRE_EVERY) {
                last_retire = Some(Instant::now());
                match settle_pending(&self.db, &self.reservations, &mut pending_seen).await {
                    Ok(n) => self.metrics.pending_settled.inc_by(n as u64),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "settling stale pending winners failed")
                    }
                }
                match retire_once(&self.db, &self.reservations, self.key_grace).await {
                    Ok(pass) => {
                        self.metrics.retired.inc_by(pass.retired as u64);
                        self.metrics.ended_unpersisted.set(pass.unpersisted);
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "retirement pass failed"),
                }
            }
            match sweep_once(&self.db, &self.reservations).await {
                Ok(s) => {
                    if s.expired > 0 {
                        tracing::info!(expired = s.expired, "expired unpaid orders");
                        self.metrics.expirations.inc_by(s.expired as u64);
                        self.metrics
                            .releases
                            .with_label_values(&[&OrderStatus::Expired.to_string()])
                            .inc_by(s.expired as u64);
                    }
                    if s.expired as i64 == SWEEP_LIMIT && !shutdown.is_cancelled() {
                        continue; // more are due
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "sweep failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}
