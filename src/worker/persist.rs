//! Persisting one batch of winners: [`plan`] decides each, and [`process_batch`] writes the
//! orders (and rejections) in one transaction, then records every status in Redis.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, Statement, TransactionTrait};
use uuid::Uuid;

use crate::{
    amqp::OrderMessage,
    db::entities::{
        orders::{self, status_sql::PENDING_PAYMENT},
        rejection,
    },
    domain::{ProductId, UserId},
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
/// writer of product rows, so product-row locks alone never deadlock consumers and sweepers — a
/// batch on this path and one on the unlocked path holding the same winner can still wait on
/// each other through the order's unique key, which Postgres breaks with `40P01`, a transient
/// failure the worker retries ([`super::classify`]); this serialises the locked
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
        format!(
            "insert into orders (order_id, reservation_id, user_id, product_id, status, reserved_at, created_at, expires_at) \
             select b.order_id, b.reservation_id, b.user_id, b.product_id, {PENDING_PAYMENT}, b.reserved_at, $6, $7 \
             from unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[], $5::timestamptz[]) \
               as b (order_id, reservation_id, user_id, product_id, reserved_at) \
             on conflict do nothing \
             returning order_id, reservation_id, user_id, product_id, expires_at"
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

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
