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
    /// The payment provider's reference, when the storefront's backend recorded the payment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_cents: Option<i64>,
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
            payment_reference: o.payment_reference.clone(),
            amount_cents: o.paid_amount_cents,
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
    #[error("the amount is not the order's price, {price_cents} cents")]
    AmountMismatch { price_cents: i64 },
    #[error("paid under another reference, or the reference paid another order")]
    PaymentConflict,
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

/// A payment the storefront's backend reports for an order.
#[derive(Debug, Clone)]
pub struct Payment {
    /// The payment provider's reference (a charge id): one reference pays one order.
    pub reference: String,
    pub amount_cents: i64,
}

/// Records `payment` for an order, as its storefront's backend reports it once the payment
/// provider confirmed it. Idempotent by reference: a retry answers the same paid order. The
/// order is read `FOR UPDATE`, so a racing expiry, cancellation or second payment waits and
/// then sees this one's outcome. Nothing changes on a refusal:
/// - an amount other than the product's price: [`OrderError::AmountMismatch`];
/// - a cancelled or expired order (or one past its deadline): [`OrderError::Closed`], so the
///   backend refunds the payment;
/// - an order paid under another reference, or a reference that paid another order:
///   [`OrderError::PaymentConflict`].
pub async fn record_payment(
    db: &DatabaseConnection,
    reservations: &Reservations,
    order_id: Uuid,
    payment: &Payment,
) -> Result<orders::Model, OrderError> {
    #[derive(FromQueryResult)]
    struct Row {
        status: OrderStatus,
        expired: bool,
        payment_reference: Option<String>,
        paid_amount_cents: Option<i64>,
        price_cents: i64,
    }
    let txn = db.begin().await.context("beginning the payment")?;
    let row = Row::find_by_statement(Statement::from_sql_and_values(
        txn.get_database_backend(),
        "select o.status, o.expires_at <= now() as expired, o.payment_reference, \
         o.paid_amount_cents, p.price_cents \
         from orders o join product p on p.product_id = o.product_id \
         where o.order_id = $1 for update of o",
        [order_id.into()],
    ))
    .one(&txn)
    .await
    .context("reading the order to pay")?
    .ok_or(OrderError::NotFound)?;
    let same = row.payment_reference.as_deref() == Some(payment.reference.as_str());
    match row.status {
        OrderStatus::Paid if same && row.paid_amount_cents == Some(payment.amount_cents) => {}
        OrderStatus::Paid if same => {
            return Err(OrderError::AmountMismatch {
                price_cents: row.price_cents,
            });
        }
        OrderStatus::Paid => return Err(OrderError::PaymentConflict),
        OrderStatus::PendingPayment if row.expired => {
            // Past its deadline: the sweeper is about to expire it.
            return Err(OrderError::Closed(OrderStatus::Expired));
        }
        OrderStatus::PendingPayment if payment.amount_cents != row.price_cents => {
            return Err(OrderError::AmountMismatch {
                price_cents: row.price_cents,
            });
        }
        OrderStatus::PendingPayment => {
            let paid = txn
                .execute_raw(Statement::from_sql_and_values(
                    txn.get_database_backend(),
                    format!(
                        "update orders set status = {PAID}, paid_at = now(), payment_reference = $2, \
                         paid_amount_cents = $3 where order_id = $1 and status = {PENDING_PAYMENT}"
                    ),
                    [
                        order_id.into(),
                        payment.reference.clone().into(),
                        payment.amount_cents.into(),
                    ],
                ))
                .await;
            match paid {
                Err(e) if is_unique_violation(&e) => return Err(OrderError::PaymentConflict),
                other => {
                    other.context("recording the payment")?;
                }
            }
        }
        closed => return Err(OrderError::Closed(closed)),
    }
    txn.commit().await.context("committing the payment")?;
    let o = orders::Entity::find_by_id(order_id)
        .one(db)
        .await
        .context("reading the paid order")?
        .ok_or(OrderError::NotFound)?;
    publish_status(reservations, &o).await;
    Ok(o)
}

/// Whether Postgres refused a write for a unique constraint (SQLSTATE 23505).
fn is_unique_violation(e: &sea_orm::DbErr) -> bool {
    matches!(
        e.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

/// The order, whoever's it is (for the storefront's backend).
pub async fn find(
    db: &DatabaseConnection,
    order_id: Uuid,
) -> anyhow::Result<Option<orders::Model>> {
    orders::Entity::find_by_id(order_id)
        .one(db)
        .await
        .context("reading the order")
}

/// Who closes an order: its shopper (their own orders only), or the storefront's backend (any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    Shopper(UserId),
    Backend,
}

impl Closer {
    /// The user id the order must have (`None`: any).
    fn owner(self) -> Option<i64> {
        match self {
            Closer::Shopper(user) => Some(user.get()),
            Closer::Backend => None,
        }
    }
}

/// Most orders one page of a listing may hold.
pub const PAGE_MAX: u64 = 1_000;

/// One page of a product's orders, in order id order (UUID v7: the order they were created
/// in), after `after` (keyset pagination: stable while orders are added or change status), at
/// most `limit` ([`PAGE_MAX`]), only of `status` when given.
pub async fn page(
    db: &DatabaseConnection,
    product: ProductId,
    status: Option<OrderStatus>,
    after: Option<Uuid>,
    limit: u64,
) -> anyhow::Result<Vec<orders::Model>> {
    let mut sql = "select * from orders where product_id = $1".to_owned();
    let mut values: Vec<sea_orm::Value> = vec![product.get().into()];
    if let Some(status) = status {
        values.push(sea_orm::ActiveEnum::to_value(&status).into());
        sql.push_str(&format!(" and status = ${}", values.len()));
    }
    if let Some(after) = after {
        values.push(after.into());
        sql.push_str(&format!(" and order_id > ${}", values.len()));
    }
    sql.push_str(&format!(
        " order by order_id limit {}",
        limit.clamp(1, PAGE_MAX)
    ));
    orders::Model::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        values,
    ))
    .all(db)
    .await
    .context("listing orders")
}

/// The header of [`csv_row`]'s lines.
pub const CSV_HEADER: &str = "order_id,reservation_id,user_id,product_id,status,created_at,expires_at,paid_at,payment_reference,amount_cents\r\n";

/// One order as a CSV line (RFC 4180: a field with a comma, quote or line break is quoted,
/// its quotes doubled; a field that a spreadsheet would run as a formula is prefixed with `'`).
pub fn csv_row(o: &orders::Model) -> String {
    fn field(raw: &str) -> String {
        let safe = if raw.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{raw}")
        } else {
            raw.to_owned()
        };
        if safe.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", safe.replace('"', "\"\""))
        } else {
            safe
        }
    }
    let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    format!(
        "{},{},{},{},{},{},{},{},{},{}\r\n",
        o.order_id,
        o.reservation_id,
        o.user_id,
        o.product_id,
        o.status,
        time(&o.created_at),
        time(&o.expires_at),
        o.paid_at.as_ref().map(time).unwrap_or_default(),
        field(o.payment_reference.as_deref().unwrap_or("")),
        o.paid_amount_cents
            .map(|a| a.to_string())
            .unwrap_or_default(),
    )
}

/// Cancels a `pending_payment` order (guarded, so only one closer wins: a racing payment or
/// expiry leaves it alone), decrements `product.sold` in the same transaction, then returns
/// the unit.
async fn cancel_open(
    db: &DatabaseConnection,
    reservations: &Reservations,
    order_id: Uuid,
    by: Closer,
) -> Result<Option<orders::Model>, OrderError> {
    let txn = db.begin().await.context("beginning the cancel")?;
    let sql = format!(
        "update orders set status = {CANCELLED}, closed_at = now() \
         where order_id = $1 and ($2::bigint is null or user_id = $2) \
         and status = {PENDING_PAYMENT} returning *"
    );
    let values: Vec<sea_orm::Value> = vec![order_id.into(), by.owner().into()];
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

/// Cancels a `pending_payment` order: a shopper's own, or any for the storefront's backend.
/// Cancelling a cancelled order again is a no-op.
pub async fn cancel(
    db: &DatabaseConnection,
    reservations: &Reservations,
    order_id: Uuid,
    by: Closer,
) -> Result<orders::Model, OrderError> {
    if let Some(o) = cancel_open(db, reservations, order_id, by).await? {
        return Ok(o);
    }
    let o = match by {
        Closer::Shopper(user) => find_owned(db, order_id, user).await?,
        Closer::Backend => find(db, order_id).await?,
    }
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

    #[test]
    fn a_csv_field_is_quoted_and_defused_as_rfc_4180_and_spreadsheets_need() {
        let mut o = order(OrderStatus::Paid);
        o.payment_reference = Some(r#"ch_1,"x""#.to_owned());
        o.paid_amount_cents = Some(1999);
        let line = csv_row(&o);
        assert!(line.ends_with(",\"ch_1,\"\"x\"\"\",1999\r\n"), "{line}");
        assert_eq!(
            line.matches(',').count(),
            10,
            "nine separators and the quoted comma"
        );
        o.payment_reference = Some("=HYPERLINK(\"x\")".to_owned());
        assert!(
            csv_row(&o).contains(r#","'=HYPERLINK(""x"")","#),
            "{}",
            csv_row(&o)
        );
        assert_eq!(CSV_HEADER.matches(',').count(), 9);
    }

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
            payment_reference: None,
            paid_amount_cents: None,
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
