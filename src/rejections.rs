//! Wins that could not become orders: why, the `rejection` table, and what the shopper sees.
//!
//! Only after Redis lost data (durability `none`) can a winner reach the worker when Postgres
//! has no unit left for it, or as a second win of a shopper who already holds an order for the
//! product. The worker records such a win here, in the transaction that decides its batch; the
//! reservation ends `rejected` (terminal) with a reason in plain words.

use anyhow::Context;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, sea_query::OnConflict,
};
use uuid::Uuid;

use crate::{
    db::entities::rejection,
    domain::{ProductId, UserId},
    reservations::ReservationView,
};

/// Rows per INSERT statement (5 parameters each).
const ROWS_PER_STATEMENT: usize = 1_000;

/// Why a win could not become an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// No unit was left in Postgres for it: Redis sold the unit twice after losing data.
    SoldOut,
    /// The shopper already holds an order for the product under another reservation.
    AlreadyHoldsOrder,
}

impl Cause {
    /// Every cause's stable label (the `cause` of `reservations_rejected_total`), in order.
    pub const LABELS: [&'static str; 2] = ["sold_out", "already_holds_order"];

    /// A stable label (metrics, logs).
    pub fn label(self) -> &'static str {
        match self {
            Cause::SoldOut => Self::LABELS[0],
            Cause::AlreadyHoldsOrder => Self::LABELS[1],
        }
    }

    /// What the shopper reads.
    pub fn reason(self) -> &'static str {
        match self {
            Cause::SoldOut => {
                "sold out: this win could not be honoured after a storage failure, so no order was made"
            }
            Cause::AlreadyHoldsOrder => {
                "already holds an order: you already have an order for this product, so this second win could not become another one"
            }
        }
    }
}

/// The shopper's view of a rejected win.
impl From<&rejection::Model> for ReservationView {
    fn from(r: &rejection::Model) -> Self {
        ReservationView::rejected(r.reservation_id, r.reason.clone())
    }
}

/// A rejection about to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRejection {
    pub reservation_id: Uuid,
    pub user: UserId,
    pub product: ProductId,
    pub cause: Cause,
}

/// Records rejections (a reservation rejected before keeps its first reason).
pub async fn insert(db: &impl ConnectionTrait, rows: &[NewRejection]) -> anyhow::Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let models = chunk.iter().map(|r| rejection::ActiveModel {
            reservation_id: sea_orm::ActiveValue::Set(r.reservation_id),
            user_id: sea_orm::ActiveValue::Set(r.user.get()),
            product_id: sea_orm::ActiveValue::Set(r.product.get()),
            reason: sea_orm::ActiveValue::Set(r.cause.reason().to_owned()),
            created_at: sea_orm::ActiveValue::Set(chrono::Utc::now()),
        });
        rejection::Entity::insert_many(models)
            .on_conflict(
                OnConflict::column(rejection::Column::ReservationId)
                    .do_nothing()
                    .to_owned(),
            )
            .try_insert()
            .exec_without_returning(db)
            .await
            .context("recording rejections")?;
    }
    Ok(())
}

/// The rejections among these reservations.
pub async fn of_reservations(
    db: &impl ConnectionTrait,
    ids: Vec<Uuid>,
) -> anyhow::Result<Vec<rejection::Model>> {
    rejection::Entity::find()
        .filter(rejection::Column::ReservationId.is_in(ids))
        .all(db)
        .await
        .context("reading rejections")
}

/// The user's latest rejected win of a product, if any.
pub async fn find_for(
    db: &impl ConnectionTrait,
    user: UserId,
    product: ProductId,
) -> anyhow::Result<Option<rejection::Model>> {
    rejection::Entity::find()
        .filter(rejection::Column::ProductId.eq(product.get()))
        .filter(rejection::Column::UserId.eq(user.get()))
        .order_by_desc(rejection::Column::CreatedAt)
        .one(db)
        .await
        .context("reading the rejection")
}

/// Every rejected win of a product, oldest first.
pub async fn of_product(
    db: &impl ConnectionTrait,
    product: ProductId,
) -> anyhow::Result<Vec<rejection::Model>> {
    rejection::Entity::find()
        .filter(rejection::Column::ProductId.eq(product.get()))
        .order_by_asc(rejection::Column::CreatedAt)
        .all(db)
        .await
        .context("reading the product's rejections")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservations::Status;

    #[test]
    fn a_rejection_is_seen_as_rejected_with_its_reason() {
        let r = rejection::Model {
            reservation_id: Uuid::now_v7(),
            user_id: 1,
            product_id: 2,
            reason: Cause::SoldOut.reason().to_owned(),
            created_at: chrono::Utc::now(),
        };
        let v = ReservationView::from(&r);
        assert_eq!(v.status, Status::Rejected);
        assert_eq!(v.reservation_id, r.reservation_id);
        assert_eq!(v.reason.as_deref(), Some(Cause::SoldOut.reason()));
        assert_eq!((v.order_id, v.expires_at), (None, None));
        let labels = [Cause::SoldOut, Cause::AlreadyHoldsOrder].map(Cause::label);
        assert_eq!(labels, Cause::LABELS);
    }
}
