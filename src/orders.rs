//! Orders after the worker persisted them: the status a shopper sees, payment, cancellation,
//! and returning a closed order's unit to stock exactly once.

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, EntityTrait, FromQueryResult, Statement, TransactionTrait,
};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

pub use crate::db::entities::orders::OrderStatus;
use crate::{
    db::entities::orders::{
        self,
        status_sql::{CANCELLED, PAID, PENDING_PAYMENT},
    },
    domain::{ProductId, UserId},
    reservations::{ReservationView, Reservations, Status},
};

/// The shopper's view of a persisted order: `pending_payment` is `confirmed` to them.
impl From<&orders::Model> for ReservationView {
    fn from(o: &orders::Model) -> Self {
        let status = match o.status {
            OrderStatus::PendingPayment => Status::Confirmed,
            OrderStatus::Paid => Status::Paid,
            OrderStatus::Cancelled => Status::Cancelled,
            OrderStatus::Expired => Status::Expired,
        };
        Self {
            reservation_id: o.reservation_id,
            status,
            order_id: Some(o.order_id),
            expires_at: (o.status == OrderStatus::PendingPayment).then_some(o.expires_at),
            reason: None,
        }
    }
}

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderView {
    pub order_id: Uuid,
    pub reservation_id: Uuid,
    pub user_id: i64,
    pub product_id: i64,
    pub status: OrderStatus,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paid_at: Option<DateTime<Utc>>,
}

impl From<&orders::Model> for OrderView {
    fn from(o: &orders::Model) -> Self {
        Self {
            order_id: o.order_id,
            reservation_id: o.reservation_id,
            user_id: o.user_id,
            product_id: o.product_id,
            status: o.status,
            created_at: o.created_at,
            expires_at: o.expires_at,
            paid_at: o.paid_at,
        }
    }
}

/// Why an order could not change.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("no such order for this user")]
    NotFound,
    #[error("the order is {0}")]
    Closed(OrderStatus),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

async fn one(
    db: &impl ConnectionTrait,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> anyhow::Result<Option<orders::Model>> {
    orders::Model::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        values,
    ))
    .one(db)
    .await
    .context("querying orders")
}

/// The user's order for a product, if any.
pub async fn find_for(
    db: &DatabaseConnection,
    user: UserId,
    product: ProductId,
) -> anyhow::Result<Option<orders::Model>> {
    one(
        db,
        "select * from orders where user_id = $1 and product_id = $2",
        vec![user.get().into(), product.get().into()],
    )
    .await
}

/// The order, only if it belongs to `user`.
async fn find_owned(
    db: &DatabaseConnection,
    order_id: Uuid,
    user: UserId,
) -> anyhow::Result<Option<orders::Model>> {
    Ok(orders::Entity::find_by_id(order_id)
        .one(db)
        .await
        .context("reading the order")?
        .filter(|o| o.user_id == user.get()))
}

/// Records the order's new view in Redis for the status endpoints (best effort: Postgres is
/// the record, and `/reservations/me` falls back to it).
async fn publish_status(reservations: &Reservations, o: &orders::Model) {
    let Ok(product) = ProductId::try_from(o.product_id) else {
        return;
    };
    let Ok(user) = UserId::try_from(o.user_id) else {
        return;
    };
    if let Err(e) = reservations
        .record_status(product, user, &ReservationView::from(o))
        .await
    {
        tracing::warn!(error = %e, order_id = %o.order_id, "could not record the order status in Redis");
    }
}

/// Pays a `pending_payment` order before its deadline. Paying a paid order again is a no-op.
pub async fn pay(
    db: &DatabaseConnection,
    reservations: &Reservations,
    order_id: Uuid,
    user: UserId,
) -> Result<orders::Model, OrderError> {
    let updated = one(
        db,
        &format!(
            "update orders set status = {PAID}, paid_at = now() \
             where order_id = $1 and user_id = $2 and status = {PENDING_PAYMENT} and expires_at > now() \
             returning *"
        ),
        vec![order_id.into(), user.get().into()],
    )
    .await?;
    if let Some(o) = updated {
        publish_status(reservations, &o).await;
        return Ok(o);
    }
    let o = find_owned(db, order_id, user)
        .await?
        .ok_or(OrderError::NotFound)?;
    match o.status {
        OrderStatus::Paid => Ok(o),
        // Past its deadline: the sweeper is about to expire it.
        OrderStatus::PendingPayment => Err(OrderError::Closed(OrderStatus::Expired)),
        other => Err(OrderError::Closed(other)),
    }
}

/// Cancels the user's `pending_payment` order (guarded, so only one closer wins: a racing
/// payment or expiry leaves it alone), decrements `product.sold` in the same transaction, then
/// returns the unit.
async fn cancel_open(
    db: &DatabaseConnection,
    reservations: &Reservations,
    order_id: Uuid,
    user: UserId,
) -> Result<Option<orders::Model>, OrderError> {
    let txn = db.begin().await.context("beginning the cancel")?;
    let sql = format!(
        "update orders set status = {CANCELLED}, closed_at = now() \
         where order_id = $1 and user_id = $2 and status = {PENDING_PAYMENT} returning *"
    );
    let values: Vec<sea_orm::Value> = vec![order_id.into(), user.get().into()];
    let closed = one(&txn, &sql, values).await?;
    if let Some(o) = &closed {
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "update product set sold = sold - 1 where product_id = $1 and sold > 0",
            [o.product_id.into()],
        ))
        .await
        .context("decrementing sold")?;
    }
    txn.commit().await.context("committing the cancel")?;
    if let Some(o) = &closed {
        return_unit_or_defer(db, reservations, o).await;
    }
    Ok(closed)
}

/// Cancels the user's `pending_payment` order. Cancelling a cancelled order again is a no-op.
pub async fn cancel(
    db: &DatabaseConnection,
    reservations: &Reservations,
    order_id: Uuid,
    user: UserId,
) -> Result<orders::Model, OrderError> {
    if let Some(o) = cancel_open(db, reservations, order_id, user).await? {
        return Ok(o);
    }
    let o = find_owned(db, order_id, user)
        .await?
        .ok_or(OrderError::NotFound)?;
    match o.status {
        OrderStatus::Cancelled => {
            // Finish a release an earlier attempt may not have completed (idempotent).
            return_unit_or_defer(db, reservations, &o).await;
            Ok(o)
        }
        other => Err(OrderError::Closed(other)),
    }
}

/// [`return_unit`], or — when Redis or Postgres does not answer — a warning: the order is
/// already closed in Postgres (which is what the caller is told), and the sweeper's reconciler
/// returns the unit within seconds once they answer again.
pub async fn return_unit_or_defer(
    db: &DatabaseConnection,
    reservations: &Reservations,
    o: &orders::Model,
) {
    if let Err(e) = return_unit(db, reservations, o).await {
        tracing::warn!(order_id = %o.order_id, error = %format!("{e:#}"), "unit not returned yet; the reconciler will return it");
    }
}

/// Returns a closed order's unit through `release.lua` (exactly once per reservation) and
/// marks it released in Postgres. If this process dies in between, the reconciler repeats it.
pub async fn return_unit(
    db: &DatabaseConnection,
    reservations: &Reservations,
    o: &orders::Model,
) -> anyhow::Result<()> {
    let product = ProductId::try_from(o.product_id)?;
    let view = ReservationView::from(o);
    // Returned now, returned before, or not in Redis (the next preheat counts Postgres): all
    // three leave the unit accounted for.
    let released = reservations
        .release(product, o.reservation_id, &view.to_json())
        .await
        .context("returning the unit through release.lua")?;
    // The state's (epoch, release sequence) after the release: a Redis found behind it forgot
    // the unit (a failover, a rollback) and is rebuilt by counting (`recovery`).
    let at = released.at();
    if let Ok(user) = UserId::try_from(o.user_id) {
        reservations.notify_status(product, user).await.ok();
    }
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "update orders set released_at = now(), released_epoch = $2, released_seq = $3 \
         where order_id = $1 and released_at is null",
        [
            o.order_id.into(),
            at.map(|m| m.epoch).into(),
            at.map(|m| m.seq).into(),
        ],
    ))
    .await
    .context("marking the unit released")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(status: OrderStatus) -> orders::Model {
        let now = chrono::Utc::now();
        orders::Model {
            order_id: Uuid::now_v7(),
            reservation_id: Uuid::now_v7(),
            user_id: 1,
            product_id: 1,
            status,
            reserved_at: now,
            created_at: now,
            expires_at: now,
            paid_at: None,
            closed_at: None,
            released_at: None,
        }
    }

    #[test]
    fn a_shopper_sees_an_order_awaiting_payment_as_confirmed() {
        for (row, seen, deadline) in [
            (OrderStatus::PendingPayment, Status::Confirmed, true),
            (OrderStatus::Paid, Status::Paid, false),
            (OrderStatus::Cancelled, Status::Cancelled, false),
            (OrderStatus::Expired, Status::Expired, false),
        ] {
            let o = order(row);
            let v = ReservationView::from(&o);
            assert_eq!(v.status, seen, "{row}");
            assert_eq!(v.order_id, Some(o.order_id));
            assert_eq!(v.expires_at.is_some(), deadline, "{row}");
        }
    }
}
