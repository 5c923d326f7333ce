//! The order worker: RabbitMQ → Postgres in batches, idempotently, acking only after commit.
//!
//! [`process_batch`] is one step (testable without a broker): one transaction, in which
//! [`plan`] decides each winner, earliest win first: a new order while its product has units
//! free (`stock - sold`); already decided (its order or rejection exists: a redelivery); or
//! `rejected` — no unit left, or its shopper already holds an order for the product (both only
//! possible after Redis lost data). Usually (`persist_unlocked`) the batch waits for no lock
//! until its last statement: it inserts the orders in one statement and then adds them to
//! `product.sold` only if that stays within the stock, so the batches of one product (several
//! consumers, several workers) queue on its row only for that update and the commit. A batch
//! that path cannot decide alone (a win to reject, an order that exists) is rolled back and
//! decided with its products locked first (`persist_locked`). After the commit every status
//! is recorded in Redis through `status.lua`.
//!
//! [`Worker::run`] is the loop around it: prefetch-bounded consumer, batching, backoff while
//! Postgres, Redis or RabbitMQ is down (holding the batch: no ack/nack storms), reconnection.
//! A batch refused for good ([`classify`]: SQLSTATE class 22 or 23) is split ([`bisect`])
//! until the messages refused on their own are found; those, and unreadable messages, go to
//! the dead-letter queue one by one with their reason ([`crate::dlq`]), and the rest of the
//! batch is persisted: one bad message never wedges the queue.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::FieldTable,
};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, FromQueryResult, RuntimeErr, Statement,
    TransactionTrait, sqlx,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    amqp::{Broker, OrderMessage, declare_topology},
    backoff::{Backoff, sleep_or_stop},
    db::entities::{orders, rejection},
    deps::Deps,
    dlq,
    domain::{ProductId, UserId},
    metrics::Metrics,
    rejections::{self, Cause, NewRejection},
    reservations::{ReservationView, Reservations, Status},
};

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// New orders.
    pub inserted: usize,
    /// Messages decided by an earlier attempt (their order or rejection exists: redeliveries),
    /// or repeated within the batch.
    pub duplicates: usize,
    /// Wins rejected now because no unit was left.
    pub rejected_sold_out: usize,
    /// Wins rejected now because their shopper already holds an order for the product.
    pub rejected_holding: usize,
}

/// What becomes of one winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// A new order.
    Order,
    /// Decided before (its order or rejection exists), or the same reservation again.
    Decided,
    /// Rejected now.
    Rejected(Cause),
}

/// What Postgres already holds about a batch (read with the batch's products locked).
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Units still free (`stock - sold`) of each product that exists.
    pub free: HashMap<ProductId, i64>,
    /// Reservations with an order or a rejection.
    pub decided: HashSet<Uuid>,
    /// Shoppers holding an order (whatever its status) for a product.
    pub holders: HashSet<(UserId, ProductId)>,
}

/// Decides each winner of `batch` (the result is in `batch`'s order), earliest win first.
/// A winner of a product that does not exist is planned as an order: its insert then fails on
/// the foreign key, for good, and the worker dead-letters it.
pub fn plan(batch: &[OrderMessage], mut known: Known) -> Vec<Fate> {
    let mut by_time: Vec<usize> = (0..batch.len()).collect();
    by_time.sort_by_key(|&i| (batch[i].reserved_at, i));
    let mut fates = vec![Fate::Decided; batch.len()];
    for i in by_time {
        let m = &batch[i];
        let holder = (m.user_id, m.product_id);
        fates[i] = if !known.decided.insert(m.reservation_id) {
            Fate::Decided
        } else if known.holders.contains(&holder) {
            Fate::Rejected(Cause::AlreadyHoldsOrder)
        } else {
            match known.free.get_mut(&m.product_id) {
                Some(free) if *free <= 0 => Fate::Rejected(Cause::SoldOut),
                free => {
                    if let Some(free) = free {
                        *free -= 1;
                    }
                    known.holders.insert(holder);
                    Fate::Order
                }
            }
        };
    }
    fates
}

/// The winners of `batch` that `fates` makes orders of.
fn planned_orders<'a>(batch: &'a [OrderMessage], fates: &[Fate]) -> Vec<&'a OrderMessage> {
    batch
        .iter()
        .zip(fates)
        .filter(|(_, f)| **f == Fate::Order)
        .map(|(m, _)| m)
        .collect()
}

#[derive(Debug, FromQueryResult)]
struct Inserted {
    order_id: Uuid,
    reservation_id: Uuid,
    user_id: i64,
    product_id: i64,
    expires_at: DateTime<Utc>,
}

#[derive(Debug, FromQueryResult)]
struct Stock {
    product_id: i64,
    stock: i32,
    sold: i32,
}

/// Units still free (`stock - sold`) of the batch's products that exist. With `lock`, the rows
/// are locked (`FOR NO KEY UPDATE`, the lock an `UPDATE` of `sold` takes, in id order like every
/// writer of product rows, so consumers and sweepers never deadlock; this serialises the locked
/// batches of one product, so what is read stays true until commit, and still lets other
/// batches' inserts check their foreign key); without, it is a plain read.
async fn read_free(
    txn: &impl ConnectionTrait,
    batch: &[OrderMessage],
    lock: bool,
) -> anyhow::Result<HashMap<ProductId, i64>> {
    let mut products: Vec<i64> = batch.iter().map(|m| m.product_id.get()).collect();
    products.sort_unstable();
    products.dedup();
    let sql = if lock {
        "select product_id, stock, sold from product where product_id = any($1) order by product_id for no key update"
    } else {
        "select product_id, stock, sold from product where product_id = any($1)"
    };
    let stocks = Stock::find_by_statement(Statement::from_sql_and_values(
        txn.get_database_backend(),
        sql,
        [products.into()],
    ))
    .all(txn)
    .await
    .context(if lock {
        "locking the batch's products"
    } else {
        "reading the batch's products"
    })?;
    stocks
        .into_iter()
        .map(|s| {
            let free = i64::from(s.stock) - i64::from(s.sold);
            Ok((ProductId::try_from(s.product_id)?, free))
        })
        .collect()
}

/// What Postgres holds about the batch, for the locked path: the products locked
/// ([`read_free`]), the orders of the batch's reservations or shoppers, and the batch's
/// rejections.
async fn read_known(
    txn: &impl ConnectionTrait,
    batch: &[OrderMessage],
) -> anyhow::Result<(Known, Vec<orders::Model>, Vec<rejection::Model>)> {
    let backend = txn.get_database_backend();
    let free = read_free(txn, batch, true).await?;
    let ids: Vec<Uuid> = batch.iter().map(|m| m.reservation_id).collect();
    let users: Vec<i64> = batch.iter().map(|m| m.user_id.get()).collect();
    let of_products: Vec<i64> = batch.iter().map(|m| m.product_id.get()).collect();
    let existing = orders::Model::find_by_statement(Statement::from_sql_and_values(
        backend,
        // Two index look-ups (an OR of both would scan the whole table).
        "select o.* from orders o where o.reservation_id = any($1) \
         union \
         select o.* from unnest($2::bigint[], $3::bigint[]) as b (user_id, product_id) \
         join orders o on o.user_id = b.user_id and o.product_id = b.product_id",
        [ids.clone().into(), users.into(), of_products.into()],
    ))
    .all(txn)
    .await
    .context("reading the batch's orders")?;
    let rejected = rejections::of_reservations(txn, ids).await?;

    let mut known = Known {
        free,
        ..Known::default()
    };
    for o in &existing {
        known.decided.insert(o.reservation_id);
        known.holders.insert((
            UserId::try_from(o.user_id)?,
            ProductId::try_from(o.product_id)?,
        ));
    }
    known
        .decided
        .extend(rejected.iter().map(|r| r.reservation_id));
    let in_batch: HashSet<Uuid> = batch.iter().map(|m| m.reservation_id).collect();
    let earlier = existing
        .into_iter()
        .filter(|o| in_batch.contains(&o.reservation_id))
        .collect();
    Ok((known, earlier, rejected))
}

/// Inserts the orders in one statement (`INSERT … SELECT FROM unnest(…)`: seven array
/// parameters whatever the batch's size, one plan, no per-row binding) with `ON CONFLICT DO
/// NOTHING`; the new ones. A conflict leaves a planned order out: the caller sees it missing.
async fn insert_orders(
    txn: &impl ConnectionTrait,
    orders: &[&OrderMessage],
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> anyhow::Result<Vec<Inserted>> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let order_ids: Vec<Uuid> = orders.iter().map(|_| Uuid::now_v7()).collect();
    let reservation_ids: Vec<Uuid> = orders.iter().map(|m| m.reservation_id).collect();
    let users: Vec<i64> = orders.iter().map(|m| m.user_id.get()).collect();
    let products: Vec<i64> = orders.iter().map(|m| m.product_id.get()).collect();
    let reserved_at: Vec<DateTime<Utc>> = orders.iter().map(|m| m.reserved_at).collect();
    Inserted::find_by_statement(Statement::from_sql_and_values(
        txn.get_database_backend(),
        "insert into orders (order_id, reservation_id, user_id, product_id, status, reserved_at, created_at, expires_at) \
         select b.order_id, b.reservation_id, b.user_id, b.product_id, 'pending_payment', b.reserved_at, $6, $7 \
         from unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[], $5::timestamptz[]) \
           as b (order_id, reservation_id, user_id, product_id, reserved_at) \
         on conflict do nothing \
         returning order_id, reservation_id, user_id, product_id, expires_at",
        [
            order_ids.into(),
            reservation_ids.into(),
            users.into(),
            products.into(),
            reserved_at.into(),
            now.into(),
            expires_at.into(),
        ],
    ))
    .all(txn)
    .await
    .context("inserting orders")
}

/// Adds the new orders to `product.sold`, one statement per product in id order (the lock
/// order), each only if it stays within the stock: `false` (nothing more done) when one would
/// not. Each `UPDATE` waits for the product's row lock and then checks the row as the last
/// commit left it, so concurrent batches never take more units than the stock has.
async fn add_sold(txn: &impl ConnectionTrait, new_orders: &[Inserted]) -> anyhow::Result<bool> {
    let mut per_product: BTreeMap<i64, i64> = BTreeMap::new();
    for o in new_orders {
        *per_product.entry(o.product_id).or_default() += 1;
    }
    for (product, n) in per_product {
        let done = txn
            .execute_raw(Statement::from_sql_and_values(
                txn.get_database_backend(),
                "update product set sold = sold + $2 where product_id = $1 and sold + $2 <= stock",
                [product.into(), n.into()],
            ))
            .await
            .context("adding to product.sold")?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Records the statuses in Redis: one `status.lua` call per product (usually one).
async fn record(
    reservations: &Reservations,
    views: &[(ProductId, UserId, ReservationView)],
) -> anyhow::Result<()> {
    let mut per_product: BTreeMap<ProductId, Vec<(UserId, &ReservationView)>> = BTreeMap::new();
    for (product, user, view) in views {
        per_product.entry(*product).or_default().push((*user, view));
    }
    for (product, updates) in per_product {
        reservations
            .record_statuses(product, &updates)
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .context("recording statuses in Redis")?;
    }
    Ok(())
}

/// What a batch's transaction decided.
struct Persisted {
    /// Each winner's fate, in the batch's order.
    fates: Vec<Fate>,
    new_orders: Vec<Inserted>,
    rejected: Vec<NewRejection>,
    /// The batch's orders and rejections made before (redeliveries).
    earlier_orders: Vec<orders::Model>,
    earlier_rejections: Vec<rejection::Model>,
}

/// The usual path: a batch of new winners with units left, decided without waiting for any
/// lock until its last statement. It reads the products' free units and the batch's earlier
/// rejections, inserts the planned orders, and only then adds them to `product.sold` (the row
/// lock, held from there to the commit: batches of one product overlap everything else). `None`
/// (rolled back) when that cannot decide the batch alone — a win to reject, an order that
/// already exists (a redelivery, or a shopper's earlier order), or a product that would go
/// over its stock meanwhile — and the locked path decides it instead.
async fn persist_unlocked(
    db: &DatabaseConnection,
    batch: &[OrderMessage],
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> anyhow::Result<Option<Persisted>> {
    let txn = db.begin().await.context("beginning the batch")?;
    let free = read_free(&txn, batch, false).await?;
    let ids: Vec<Uuid> = batch.iter().map(|m| m.reservation_id).collect();
    let earlier_rejections = rejections::of_reservations(&txn, ids).await?;
    let mut known = Known {
        free,
        ..Known::default()
    };
    known
        .decided
        .extend(earlier_rejections.iter().map(|r| r.reservation_id));
    let fates = plan(batch, known);
    if fates.iter().any(|f| matches!(f, Fate::Rejected(_))) {
        txn.rollback().await.context("rolling back")?;
        return Ok(None);
    }
    let planned = planned_orders(batch, &fates);
    let new_orders = insert_orders(&txn, &planned, now, expires_at).await?;
    if new_orders.len() < planned.len() || !add_sold(&txn, &new_orders).await? {
        txn.rollback().await.context("rolling back")?;
        return Ok(None);
    }
    txn.commit().await.context("committing the batch")?;
    Ok(Some(Persisted {
        fates,
        new_orders,
        rejected: Vec::new(),
        earlier_orders: Vec::new(),
        earlier_rejections,
    }))
}

/// The locked path, for any batch: lock its products, read what Postgres holds about it, plan,
/// insert the orders and the rejections, add the orders to `product.sold`, commit.
async fn persist_locked(
    db: &DatabaseConnection,
    batch: &[OrderMessage],
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> anyhow::Result<Persisted> {
    let txn = db.begin().await.context("beginning the batch")?;
    let (known, earlier_orders, earlier_rejections) = read_known(&txn, batch).await?;
    let fates = plan(batch, known);
    let planned = planned_orders(batch, &fates);
    let new_orders = insert_orders(&txn, &planned, now, expires_at).await?;
    let rejected: Vec<NewRejection> = batch
        .iter()
        .zip(&fates)
        .filter_map(|(m, f)| match f {
            Fate::Rejected(cause) => Some(NewRejection {
                reservation_id: m.reservation_id,
                user: m.user_id,
                product: m.product_id,
                cause: *cause,
            }),
            _ => None,
        })
        .collect();
    rejections::insert(&txn, &rejected).await?;
    // The plan gave out only free units, read under the locks: this cannot fail.
    anyhow::ensure!(
        add_sold(&txn, &new_orders).await?,
        "the batch's orders would exceed a product's stock"
    );
    txn.commit().await.context("committing the batch")?;
    let mut earlier_orders = earlier_orders;
    if new_orders.len() < planned.len() {
        // Cannot happen while every insert holds its product's lock; read back, to be sure.
        let fresh: HashSet<Uuid> = new_orders.iter().map(|o| o.reservation_id).collect();
        let lost: Vec<Uuid> = planned
            .iter()
            .map(|m| m.reservation_id)
            .filter(|r| !fresh.contains(r))
            .collect();
        tracing::warn!(count = lost.len(), "planned orders already existed");
        earlier_orders.extend(
            orders::Model::find_by_statement(Statement::from_sql_and_values(
                db.get_database_backend(),
                "select * from orders where reservation_id = any($1)",
                [lost.into()],
            ))
            .all(db)
            .await
            .context("reading orders made meanwhile")?,
        );
    }
    Ok(Persisted {
        fates,
        new_orders,
        rejected,
        earlier_orders,
        earlier_rejections,
    })
}

/// Persists a batch of winners in one transaction (without waiting for the products' locks
/// until its end when it can, see `persist_unlocked`), then records their statuses in Redis.
pub async fn process_batch(
    db: &DatabaseConnection,
    reservations: &Reservations,
    batch: &[OrderMessage],
    payment_timeout: Duration,
) -> anyhow::Result<BatchOutcome> {
    if batch.is_empty() {
        return Ok(BatchOutcome::default());
    }
    let now = Utc::now();
    let expires_at = now + chrono::Duration::from_std(payment_timeout)?;
    let done = match persist_unlocked(db, batch, now, expires_at).await? {
        Some(done) => done,
        None => {
            tracing::debug!(batch = batch.len(), "the batch needs the locked path");
            persist_locked(db, batch, now, expires_at).await?
        }
    };

    // Tell the status endpoints (and take every decided winner off the pending set).
    let mut views: Vec<(ProductId, UserId, ReservationView)> = Vec::with_capacity(batch.len());
    for o in &done.new_orders {
        let view = ReservationView {
            reservation_id: o.reservation_id,
            status: Status::Confirmed,
            order_id: Some(o.order_id),
            expires_at: Some(o.expires_at),
            reason: None,
        };
        views.push((
            ProductId::try_from(o.product_id)?,
            UserId::try_from(o.user_id)?,
            view,
        ));
    }
    for r in &done.rejected {
        let view = ReservationView::rejected(r.reservation_id, r.cause.reason());
        views.push((r.product, r.user, view));
    }
    for r in &done.earlier_rejections {
        views.push((
            ProductId::try_from(r.product_id)?,
            UserId::try_from(r.user_id)?,
            ReservationView::from(r),
        ));
    }
    for o in &done.earlier_orders {
        views.push((
            ProductId::try_from(o.product_id)?,
            UserId::try_from(o.user_id)?,
            ReservationView::from(o),
        ));
    }
    record(reservations, &views).await?;

    let count = |cause| {
        done.fates
            .iter()
            .filter(|f| **f == Fate::Rejected(cause))
            .count()
    };
    let (rejected_sold_out, rejected_holding) =
        (count(Cause::SoldOut), count(Cause::AlreadyHoldsOrder));
    Ok(BatchOutcome {
        inserted: done.new_orders.len(),
        duplicates: batch.len() - done.new_orders.len() - rejected_sold_out - rejected_holding,
        rejected_sold_out,
        rejected_holding,
    })
}

/// How a failed step is handled.
#[derive(Debug)]
pub enum Failure {
    /// The data itself is refused: retrying cannot help. Why, in plain words.
    Permanent(String),
    /// Anything else (a lost connection, Redis down, a deadlock…): hold and retry.
    Transient(anyhow::Error),
}

/// Whether a SQLSTATE means the data is refused for good: class 22 (data exception: a bad
/// value) or 23 (integrity constraint violation: a check, a foreign key, a unique key).
pub fn is_permanent_sqlstate(code: &str) -> bool {
    code.starts_with("22") || code.starts_with("23")
}

/// Classifies an error of [`process_batch`] by the SQLSTATE Postgres answered, if any.
pub fn classify(e: anyhow::Error) -> Failure {
    let refused = e.chain().find_map(|cause| {
        let (DbErr::Exec(RuntimeErr::SqlxError(sqlx_err))
        | DbErr::Query(RuntimeErr::SqlxError(sqlx_err))
        | DbErr::Conn(RuntimeErr::SqlxError(sqlx_err))) = cause.downcast_ref::<DbErr>()?
        else {
            return None;
        };
        let sqlx::Error::Database(db_err) = sqlx_err.as_ref() else {
            return None;
        };
        let code = db_err.code()?;
        is_permanent_sqlstate(&code)
            .then(|| format!("permanent database error {code}: {}", db_err.message()))
    });
    match refused {
        Some(reason) => Failure::Permanent(reason),
        None => Failure::Transient(e),
    }
}

/// A message that is refused for good on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// Its position in the items given to [`bisect`].
    pub index: usize,
    pub reason: String,
}

/// Runs `attempt` on all of `items`; when that is refused for good, on each half (left first),
/// and so on, until every item was either part of an attempt that succeeded or refused on its
/// own: those are returned, in order. One attempt when nothing is wrong, about 2·k·log2(n) with
/// k bad items of n. A transient failure stops the search: the caller retries later (attempts
/// must be idempotent, as [`process_batch`] is).
pub async fn bisect<'a, T, F, Fut>(items: &'a [T], mut attempt: F) -> anyhow::Result<Vec<Poison>>
where
    F: FnMut(&'a [T]) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let mut poison = Vec::new();
    // A stack of index ranges still to attempt (the top is the leftmost).
    let mut todo: Vec<std::ops::Range<usize>> = Vec::new();
    todo.push(0..items.len());
    while let Some(range) = todo.pop() {
        if range.is_empty() {
            continue;
        }
        match attempt(&items[range.clone()]).await {
            Ok(()) => {}
            Err(Failure::Transient(e)) => return Err(e),
            Err(Failure::Permanent(reason)) if range.len() == 1 => poison.push(Poison {
                index: range.start,
                reason,
            }),
            Err(Failure::Permanent(_)) => {
                let mid = range.start + range.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
        }
    }
    Ok(poison)
}

/// The consumer loop around [`process_batch`].
pub struct Worker {
    pub db: DatabaseConnection,
    pub reservations: Reservations,
    pub broker: Broker,
    pub queue: String,
    pub batch_size: usize,
    pub batch_wait: Duration,
    pub payment_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Consumers (each on its own channel, so each acks its own batches) per process.
    pub consumers: usize,
}

impl Worker {
    /// A worker with this deployment's queue and batch settings.
    pub fn new(deps: &Deps, reservations: Reservations) -> Self {
        let settings = &deps.settings;
        Self {
            db: deps.db.clone(),
            reservations,
            broker: deps.broker.clone(),
            queue: settings.amqp_queue.clone(),
            batch_size: settings.worker_batch_size,
            batch_wait: settings.worker_batch_wait,
            payment_timeout: settings.payment_timeout,
            metrics: deps.metrics.clone(),
            consumers: settings.worker_consumers,
        }
    }

    /// Runs `consumers` consumer loops until shutdown.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let me = Arc::new(self);
        let mut loops = tokio::task::JoinSet::new();
        for _ in 0..me.consumers.max(1) {
            let (me, shutdown) = (me.clone(), shutdown.clone());
            loops.spawn(async move { me.consume_loop(shutdown).await });
        }
        while let Some(done) = loops.join_next().await {
            done.context("consumer task")??;
        }
        Ok(())
    }

    async fn consume_loop(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %format!("{e:#}"), "worker: consumer stopped; reconnecting in {delay:?}");
                    sleep_or_stop(&shutdown, delay).await;
                }
            }
        }
        Ok(())
    }

    async fn consume(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let conn = self
            .broker
            .connected(Duration::from_secs(2))
            .await
            .context("no RabbitMQ connection")?;
        let ch = conn.create_channel().await.context("opening a channel")?;
        // Dead letters are published (with confirms) on a channel of their own.
        let dead = conn
            .create_channel()
            .await
            .context("opening the dead-letter channel")?;
        dead.confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        let prefetch = u16::try_from(self.batch_size * 2).unwrap_or(u16::MAX);
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        let queue = declare_topology(&ch, &self.queue)
            .await
            .context("declaring the queues")?;
        self.metrics
            .queue_depth
            .set(i64::from(queue.message_count()));
        let tag = format!("seckill-worker-{}", Uuid::now_v7().simple());
        let mut consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("consuming")?;
        tracing::info!(queue = %self.queue, prefetch, "worker consuming");
        let mut depth_checked = std::time::Instant::now();
        loop {
            if depth_checked.elapsed() >= Duration::from_secs(2) {
                depth_checked = std::time::Instant::now();
                self.update_depths(&ch).await;
            }
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                next = consumer.next() => match next {
                    Some(d) => d.context("delivery")?,
                    None => anyhow::bail!("the consumer was cancelled"),
                },
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.batch_wait;
            while batch.len() < self.batch_size {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(d)) => batch.push(d.context("delivery")?),
                    Ok(None) => anyhow::bail!("the consumer was cancelled"),
                    Err(_) => break,
                }
            }
            if !self.handle(&ch, &dead, batch, shutdown).await? {
                break;
            }
        }
        let _ = dead.close(200, "worker stopping".into()).await;
        let _ = ch.close(200, "worker stopping".into()).await;
        Ok(())
    }

    /// Queue and dead-letter queue depths for `/metrics` (passive declares).
    async fn update_depths(&self, ch: &Channel) {
        let depths = crate::amqp::queue_depths(ch, &self.queue).await;
        for (depth, gauge) in depths
            .into_iter()
            .zip([&self.metrics.queue_depth, &self.metrics.dlq_depth])
        {
            if let Some(d) = depth {
                gauge.set(i64::from(d));
            }
        }
    }

    /// Persists one batch, dead-letters its poison, acks the rest after commit.
    /// `Ok(false)`: shutdown came while the batch was held (it is redelivered later).
    async fn handle(
        &self,
        ch: &Channel,
        dead: &Channel,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let Some(last) = batch.iter().map(|d| d.delivery_tag).max() else {
            return Ok(true);
        };
        let mut poison: Vec<(&Delivery, String)> = Vec::new();
        let mut readable: Vec<(&Delivery, OrderMessage)> = Vec::with_capacity(batch.len());
        for d in &batch {
            match OrderMessage::parse(&d.data) {
                Ok(m) => readable.push((d, m)),
                Err(why) => poison.push((d, format!("unreadable message: {why}"))),
            }
        }
        // In winning order, so that while a batch is split the earlier wins take free units first.
        readable.sort_by_key(|(_, m)| m.reserved_at);
        let messages: Vec<OrderMessage> = readable.iter().map(|(_, m)| m.clone()).collect();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let refused = loop {
            match self.persist(&messages).await {
                Ok(refused) => break refused,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %format!("{e:#}"), batch = messages.len(), "persisting failed; holding the batch, retry in {delay:?}");
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            let _ = ch.basic_nack(last, BasicNackOptions { multiple: true, requeue: true }).await;
                            return Ok(false);
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        poison.extend(refused.into_iter().map(|p| (readable[p.index].0, p.reason)));
        for (d, reason) in &poison {
            tracing::error!(delivery_tag = d.delivery_tag, %reason, "message dead-lettered");
            dlq::dead_letter(dead, &self.queue, &d.data, &d.properties, reason)
                .await
                .context("dead-lettering")?;
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .context("acking a dead-lettered message")?;
            self.metrics.dead_lettered.inc();
        }
        // Every earlier delivery on this channel is settled (the poison one by one just above),
        // so `multiple` acks exactly the rest of this batch.
        let dead_tags: HashSet<u64> = poison.iter().map(|(d, _)| d.delivery_tag).collect();
        if let Some(last_good) = batch
            .iter()
            .map(|d| d.delivery_tag)
            .filter(|t| !dead_tags.contains(t))
            .max()
        {
            ch.basic_ack(last_good, BasicAckOptions { multiple: true })
                .await
                .context("acking the batch")?;
        }
        Ok(true)
    }

    /// Persists `messages`, splitting them when Postgres refuses them for good; the messages
    /// refused on their own. An error is transient: hold the batch and retry.
    async fn persist(&self, messages: &[OrderMessage]) -> anyhow::Result<Vec<Poison>> {
        bisect(messages, |part| async move {
            let started = Instant::now();
            match process_batch(&self.db, &self.reservations, part, self.payment_timeout).await {
                Ok(outcome) => {
                    self.observe(part.len(), started, outcome);
                    Ok(())
                }
                Err(e) => {
                    let failure = classify(e);
                    if let Failure::Permanent(reason) = &failure {
                        tracing::warn!(batch = part.len(), %reason, "Postgres refused a batch for good; splitting it");
                    }
                    Err(failure)
                }
            }
        })
        .await
    }

    fn observe(&self, size: usize, started: Instant, outcome: BatchOutcome) {
        let m = &self.metrics;
        m.persist_latency.observe(started.elapsed().as_secs_f64());
        m.worker_batch.observe(size as f64);
        m.orders_persisted.inc_by(outcome.inserted as u64);
        m.count_rejected(Cause::SoldOut, outcome.rejected_sold_out);
        m.count_rejected(Cause::AlreadyHoldsOrder, outcome.rejected_holding);
        if outcome.rejected_sold_out + outcome.rejected_holding > 0 {
            tracing::warn!(
                sold_out = outcome.rejected_sold_out,
                already_holding = outcome.rejected_holding,
                "wins rejected: they could not become orders"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, sync::Arc};

    use super::*;

    /// A database error as Postgres would answer it, with a SQLSTATE.
    #[derive(Debug)]
    struct PgError(&'static str);

    impl std::fmt::Display for PgError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for PgError {}

    impl sqlx::error::DatabaseError for PgError {
        fn message(&self) -> &str {
            "insert or update on table \"orders\" violates foreign key constraint \"orders_product_fkey\""
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn failed(err: sqlx::Error, wrap: fn(RuntimeErr) -> DbErr) -> anyhow::Error {
        let e: Result<(), DbErr> = Err(wrap(RuntimeErr::SqlxError(Arc::new(err))));
        e.context("inserting orders").unwrap_err()
    }

    fn pg(code: &'static str) -> anyhow::Error {
        failed(sqlx::Error::Database(Box::new(PgError(code))), DbErr::Query)
    }

    #[test]
    fn sqlstate_classes_22_and_23_are_permanent_the_rest_transient() {
        for code in [
            "22001", "22003", "22008", "22P02", "23502", "23503", "23505", "23514",
        ] {
            assert!(is_permanent_sqlstate(code), "{code}");
        }
        for code in [
            "08006", "40001", "40P01", "53300", "57P01", "42P01", "XX000", "",
        ] {
            assert!(!is_permanent_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn a_refused_batch_is_permanent_with_a_reason_and_anything_else_is_transient() {
        match classify(pg("23503")) {
            Failure::Permanent(reason) => {
                assert!(
                    reason.starts_with("permanent database error 23503: "),
                    "{reason}"
                );
                assert!(reason.contains("orders_product_fkey"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let exec = failed(
            sqlx::Error::Database(Box::new(PgError("22008"))),
            DbErr::Exec,
        );
        assert!(matches!(classify(exec), Failure::Permanent(_)));
        for transient in [
            pg("40P01"),
            pg("57P01"),
            failed(sqlx::Error::PoolTimedOut, DbErr::Conn),
            failed(sqlx::Error::WorkerCrashed, DbErr::Exec),
            anyhow::anyhow!("Redis did not answer").context("recording statuses in Redis"),
        ] {
            let text = format!("{transient:#}");
            match classify(transient) {
                Failure::Transient(e) => assert_eq!(format!("{e:#}"), text),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    /// Attempts of `bisect` over numbers: `bad` ones are refused for good, and any other
    /// attempt containing `flaky` fails transiently.
    async fn run(
        items: &[u32],
        bad: &[u32],
        flaky: Option<u32>,
    ) -> (anyhow::Result<Vec<Poison>>, Vec<Vec<u32>>) {
        let attempts = std::sync::Mutex::new(Vec::new());
        let result = bisect(items, |part| {
            attempts.lock().unwrap().push(part.to_vec());
            let outcome = if let Some(b) = part.iter().find(|i| bad.contains(i)) {
                Err(Failure::Permanent(format!("{b} is bad")))
            } else if flaky.is_some_and(|f| part.contains(&f)) {
                Err(Failure::Transient(anyhow::anyhow!("connection lost")))
            } else {
                Ok(())
            };
            async move { outcome }
        })
        .await;
        (result, attempts.into_inner().unwrap())
    }

    #[tokio::test]
    async fn bisecting_finds_each_bad_item_alone_and_attempts_everything_else() {
        let items: Vec<u32> = (0..200).collect();
        let (found, attempts) = run(&items, &[], None).await;
        assert_eq!(found.unwrap(), vec![]);
        assert_eq!(
            attempts,
            vec![items.clone()],
            "one attempt when nothing is wrong"
        );

        let (found, attempts) = run(&items, &[7, 150], None).await;
        let found = found.unwrap();
        assert_eq!(
            found,
            vec![
                Poison {
                    index: 7,
                    reason: "7 is bad".into()
                },
                Poison {
                    index: 150,
                    reason: "150 is bad".into()
                },
            ]
        );
        // Every good item was in exactly one successful attempt.
        let mut persisted: Vec<u32> = attempts
            .iter()
            .filter(|a| !a.iter().any(|i| [7, 150].contains(i)))
            .flatten()
            .copied()
            .collect();
        persisted.sort_unstable();
        let good: Vec<u32> = items
            .iter()
            .copied()
            .filter(|i| ![7, 150].contains(i))
            .collect();
        assert_eq!(persisted, good);
        assert!(
            attempts.len() <= 2 * 2 * 8 + 1,
            "{} attempts",
            attempts.len()
        );
        // Left halves first: the earlier items are attempted first.
        assert_eq!(attempts[1], items[..100].to_vec());

        let (found, _) = run(&[1, 2, 3], &[1, 2, 3], None).await;
        assert_eq!(found.unwrap().len(), 3);
        let (found, _) = run(&[], &[], None).await;
        assert_eq!(found.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn a_transient_failure_stops_the_search() {
        let items: Vec<u32> = (0..10).collect();
        // 2 is found on the left; the right half then loses the connection.
        let (found, attempts) = run(&items, &[2], Some(8)).await;
        assert_eq!(found.unwrap_err().to_string(), "connection lost");
        assert!(attempts.contains(&vec![2]), "{attempts:?}");
        assert_eq!(attempts.last().unwrap(), &(5..10).collect::<Vec<u32>>());
    }

    fn message(rid: u128, user: i64, product: i64, at_secs: i64) -> OrderMessage {
        OrderMessage {
            v: OrderMessage::VERSION,
            reservation_id: Uuid::from_u128(rid),
            user_id: UserId::try_from(user).unwrap(),
            product_id: ProductId::try_from(product).unwrap(),
            reserved_at: DateTime::from_timestamp(1_800_000_000 + at_secs, 0).unwrap(),
        }
    }

    fn p(id: i64) -> ProductId {
        ProductId::try_from(id).unwrap()
    }

    #[test]
    fn the_plan_gives_free_units_to_the_earliest_wins_and_rejects_the_rest() {
        // Product 1 has 2 units free; the batch arrives out of winning order.
        let batch = [
            message(1, 10, 1, 3),
            message(2, 11, 1, 1),
            message(3, 12, 1, 2),
            message(4, 13, 1, 4),
        ];
        let known = Known {
            free: HashMap::from([(p(1), 2)]),
            ..Known::default()
        };
        assert_eq!(
            plan(&batch, known),
            [
                Fate::Rejected(Cause::SoldOut),
                Fate::Order,
                Fate::Order,
                Fate::Rejected(Cause::SoldOut),
            ]
        );
    }

    #[test]
    fn the_plan_knows_redeliveries_holders_repeats_and_unknown_products() {
        let batch = [
            message(1, 10, 1, 1), // its order exists: a redelivery, takes no unit
            message(2, 11, 1, 2), // rejected before: stays decided
            message(3, 12, 1, 3), // its shopper holds an order under another reservation
            message(4, 13, 1, 4), // new
            message(4, 13, 1, 4), // the same message twice in one batch
            message(5, 13, 1, 5), // a second win of shopper 13 within the batch
            message(6, 14, 9, 6), // product 9 does not exist: the foreign key decides
            message(7, 15, 2, 7), // product 2 is sold out (sold > stock is refused as 0 free)
        ];
        let known = Known {
            free: HashMap::from([(p(1), 1), (p(2), -1)]),
            decided: HashSet::from([Uuid::from_u128(1), Uuid::from_u128(2)]),
            holders: HashSet::from([
                (UserId::try_from(10).unwrap(), p(1)),
                (UserId::try_from(12).unwrap(), p(1)),
            ]),
        };
        assert_eq!(
            plan(&batch, known),
            [
                Fate::Decided,
                Fate::Decided,
                Fate::Rejected(Cause::AlreadyHoldsOrder),
                Fate::Order,
                Fate::Decided,
                Fate::Rejected(Cause::AlreadyHoldsOrder),
                Fate::Order,
                Fate::Rejected(Cause::SoldOut),
            ]
        );
    }
}
