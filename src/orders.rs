//! Orders after the worker persisted them: the status a shopper sees, payment, cancellation,
//! and returning a closed order's unit to stock exactly once.

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, EntityTrait, FromQueryResult, Statement, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    db::entities::orders,
    domain::{ProductId, UserId},
    reservations::{Released, Reservations},
};

/// What a shopper sees of their reservation (also the JSON kept in Redis per reservation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReservationView {
    pub reservation_id: Uuid,
    /// `pending` (won, not yet an order), `confirmed` (order awaiting payment), `paid`,
    /// `cancelled` or `expired`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl ReservationView {
    pub fn pending(reservation_id: Uuid) -> Self {
        Self {
            reservation_id,
            status: "pending".into(),
            order_id: None,
            expires_at: None,
        }
    }

    /// The view of a persisted order.
    pub fn of_order(o: &orders::Model) -> Self {
        let status = match o.status.as_str() {
            "pending_payment" => "confirmed",
            other => other,
        };
        Self {
            reservation_id: o.reservation_id,
            status: status.into(),
            order_id: Some(o.order_id),
            expires_at: (o.status == "pending_payment").then_some(o.expires_at),
        }
    }

    /// Whether no further change can come.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "paid" | "cancelled" | "expired")
    }

    /// The JSON stored in Redis.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads Redis' value: `pending` or the JSON above.
    pub fn from_redis(reservation_id: Uuid, raw: &str) -> Option<Self> {
        if raw == "pending" {
            Some(Self::pending(reservation_id))
        } else {
            serde_json::from_str(raw).ok()
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
    /// `pending_payment`, `paid`, `cancelled` or `expired`.
    pub status: String,
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
            status: o.status.clone(),
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
    Closed(String),
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
        .record_status(product, user, &ReservationView::of_order(o))
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
        "update orders set status = 'paid', paid_at = now() \
         where order_id = $1 and user_id = $2 and status = 'pending_payment' and expires_at > now() \
         returning *",
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
    match o.status.as_str() {
        "paid" => Ok(o),
        // Past its deadline: the sweeper is about to expire it.
        "pending_payment" => Err(OrderError::Closed("expired".into())),
        other => Err(OrderError::Closed(other.into())),
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
    let sql = "update orders set status = 'cancelled', closed_at = now() \
               where order_id = $1 and user_id = $2 and status = 'pending_payment' returning *";
    let values: Vec<sea_orm::Value> = vec![order_id.into(), user.get().into()];
    let closed = one(&txn, sql, values).await?;
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
    match o.status.as_str() {
        "cancelled" => {
            // Finish a release an earlier attempt may not have completed (idempotent).
            return_unit_or_defer(db, reservations, &o).await;
            Ok(o)
        }
        other => Err(OrderError::Closed(other.into())),
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
    let view = ReservationView::of_order(o);
    match reservations
        .release(product, o.reservation_id, &view.to_json())
        .await
        .map_err(|e| anyhow::anyhow!(e))?
    {
        Released::Returned { .. } | Released::AlreadyReturned | Released::NotPreheated => {}
    }
    if let Ok(user) = UserId::try_from(o.user_id) {
        reservations.notify_status(product, user).await.ok();
    }
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "update orders set released_at = now() where order_id = $1 and released_at is null",
        [o.order_id.into()],
    ))
    .await
    .context("marking the unit released")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redis_status_round_trips() {
        let id = Uuid::now_v7();
        assert_eq!(
            ReservationView::from_redis(id, "pending"),
            Some(ReservationView::pending(id))
        );
        let v = ReservationView {
            reservation_id: id,
            status: "confirmed".into(),
            order_id: Some(Uuid::now_v7()),
            expires_at: Some(Utc::now()),
        };
        assert_eq!(
            ReservationView::from_redis(id, &v.to_json()),
            Some(v.clone())
        );
        assert!(!v.is_terminal());
        assert!(ReservationView::from_redis(id, "garbage").is_none());
    }
}
