//! Products: creation, look-up (with an in-process cache of the fields that never change),
//! live figures, and the preheat that loads a sale into Redis.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait,
    FromQueryResult, QueryFilter, Statement,
};
use uuid::Uuid;

use crate::{
    db::entities::{orders, product},
    domain::{ProductId, UserId},
    rejections,
    reservations::{PreheatPlan, Preheated, ReservationView, Reservations, Unavailable},
};

/// Largest stock one product may have.
pub const MAX_STOCK: i64 = 10_000_000;

/// A product as created (validated at the boundary).
#[derive(Debug, Clone)]
pub struct NewProduct {
    pub name: String,
    pub stock: i64,
    pub price_cents: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

impl NewProduct {
    /// Checks every field; the error says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err("name must be 1 to 200 characters".into());
        }
        if !(0..=MAX_STOCK).contains(&self.stock) {
            return Err(format!("stock must be between 0 and {MAX_STOCK}"));
        }
        if self.price_cents < 0 {
            return Err("price_cents must not be negative".into());
        }
        if self.starts_at >= self.ends_at {
            return Err("starts_at must be before ends_at".into());
        }
        Ok(())
    }
}

/// Creates a product.
pub async fn create(db: &DatabaseConnection, new: &NewProduct) -> anyhow::Result<product::Model> {
    let model = product::ActiveModel {
        name: Set(new.name.trim().to_owned()),
        stock: Set(i32::try_from(new.stock).context("stock")?),
        sold: Set(0),
        price_cents: Set(new.price_cents),
        starts_at: Set(new.starts_at),
        ends_at: Set(new.ends_at),
        created_at: Set(Utc::now()),
        ..Default::default()
    };
    product::Entity::insert(model)
        .exec_with_returning(db)
        .await
        .context("inserting the product")
}

/// Reads a product from Postgres.
pub async fn find(
    db: &DatabaseConnection,
    id: ProductId,
) -> anyhow::Result<Option<product::Model>> {
    product::Entity::find_by_id(id.get())
        .one(db)
        .await
        .context("reading the product")
}

/// The fields of a product that never change after creation, cached per process.
#[derive(Debug, Clone)]
pub struct ProductInfo {
    pub product_id: ProductId,
    pub name: String,
    pub stock: i64,
    pub price_cents: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

impl TryFrom<&product::Model> for ProductInfo {
    type Error = crate::domain::NotAnId;

    fn try_from(m: &product::Model) -> Result<Self, Self::Error> {
        Ok(Self {
            product_id: ProductId::try_from(m.product_id)?,
            name: m.name.clone(),
            stock: i64::from(m.stock),
            price_cents: m.price_cents,
            starts_at: m.starts_at,
            ends_at: m.ends_at,
        })
    }
}

/// Caches [`ProductInfo`] so the purchase path needs no Postgres round trip.
#[derive(Default)]
pub struct ProductCache {
    map: RwLock<HashMap<ProductId, Arc<ProductInfo>>>,
}

impl ProductCache {
    /// The product, from memory or Postgres; `None` if it does not exist.
    pub async fn get(
        &self,
        db: &DatabaseConnection,
        id: ProductId,
    ) -> anyhow::Result<Option<Arc<ProductInfo>>> {
        if let Some(info) = self.map.read().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(Some(info));
        }
        let Some(model) = find(db, id).await? else {
            return Ok(None);
        };
        let info = Arc::new(ProductInfo::try_from(&model)?);
        if let Ok(mut m) = self.map.write() {
            m.insert(id, info.clone());
        }
        Ok(Some(info))
    }
}

#[derive(Debug, FromQueryResult)]
struct Buyer {
    user_id: i64,
    reservation_id: Uuid,
}

#[derive(Debug, FromQueryResult)]
struct Count {
    n: i64,
}

/// Orders holding a unit (`pending_payment` or `paid`).
pub async fn live_orders(db: &impl ConnectionTrait, id: ProductId) -> anyhow::Result<i64> {
    let row = Count::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "select count(*) as n from orders where product_id = $1 and status in ('pending_payment', 'paid')",
        [id.get().into()],
    ))
    .one(db)
    .await
    .context("counting live orders")?;
    Ok(row.map_or(0, |r| r.n))
}

/// Every (user, reservation) in Postgres for this product, whatever the order's status, and
/// every rejected win (so its shopper keeps seeing it). Rejections come first: a shopper who
/// holds an order and also had a second win rejected is mapped to the order.
pub async fn buyers(
    db: &impl ConnectionTrait,
    id: ProductId,
) -> anyhow::Result<Vec<(UserId, Uuid)>> {
    let mut buyers: Vec<(UserId, Uuid)> = rejections::of_product(db, id)
        .await?
        .iter()
        .map(|r| Ok((UserId::try_from(r.user_id)?, r.reservation_id)))
        .collect::<anyhow::Result<_>>()?;
    let rows = Buyer::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "select user_id, reservation_id from orders where product_id = $1",
        [id.get().into()],
    ))
    .all(db)
    .await
    .context("reading buyers")?;
    for b in rows {
        buyers.push((UserId::try_from(b.user_id)?, b.reservation_id));
    }
    Ok(buyers)
}

/// Why a preheat did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PreheatError {
    #[error("no such product")]
    NotFound,
    #[error("the sale is already live")]
    AlreadyLive,
    /// Redis lost the product and winners may still be in flight: not safe to rebuild yet.
    #[error("the product is recovering: winners are still in flight")]
    Recovering,
    /// Another rebuild of this product holds its lock.
    #[error("another rebuild of this product is running")]
    Busy,
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Reservations whose order was cancelled or expired (their units are back on sale).
pub async fn closed_reservations(
    db: &impl ConnectionTrait,
    id: ProductId,
) -> anyhow::Result<Vec<Uuid>> {
    #[derive(FromQueryResult)]
    struct Row {
        reservation_id: Uuid,
    }
    let rows = Row::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "select reservation_id from orders where product_id = $1 and status in ('cancelled', 'expired')",
        [id.get().into()],
    ))
    .all(db)
    .await
    .context("reading closed reservations")?;
    Ok(rows.into_iter().map(|r| r.reservation_id).collect())
}

/// What every persisted reservation of the product (order or rejected win) looks like to its
/// shopper.
pub async fn order_views(
    db: &impl ConnectionTrait,
    id: ProductId,
) -> anyhow::Result<Vec<(UserId, ReservationView)>> {
    let rows = orders::Model::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "select * from orders where product_id = $1",
        [id.get().into()],
    ))
    .all(db)
    .await
    .context("reading the product's orders")?;
    let rejected = rejections::of_product(db, id).await?;
    let orders = rows
        .iter()
        .map(|o| Ok((UserId::try_from(o.user_id)?, ReservationView::from(o))));
    let rejected = rejected
        .iter()
        .map(|r| Ok((UserId::try_from(r.user_id)?, ReservationView::from(r))));
    orders.chain(rejected).collect()
}

/// Records that the product is (about to be) in Redis, so a later loss is told apart from
/// "never preheated".
async fn mark_preheated(db: &DatabaseConnection, id: ProductId) -> anyhow::Result<()> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "update product set preheated_at = now() where product_id = $1",
        [id.get().into()],
    ))
    .await
    .context("recording the preheat")?;
    Ok(())
}

/// Loads (or rebuilds) a product's sale in Redis from Postgres. The caller holds the product's
/// rebuild lock and has made sure no winner is in flight outside Redis and Postgres.
///
/// With `pause` (a forced rebuild of a sale Redis still has), reservations are paused first
/// and the units won but not yet persisted are read from Redis *before* Postgres is read; the
/// pause lifts when `preheat.lua` writes the rebuilt figures — or here, if the rebuild fails.
/// Buyers (so a past winner gets `409`, never a second unit) and every persisted reservation's
/// status are written before the figures, so the sale resumes complete.
pub async fn rebuild(
    db: &DatabaseConnection,
    reservations: &Reservations,
    model: &product::Model,
    force: bool,
    pause: bool,
) -> Result<Preheated, PreheatError> {
    let id = ProductId::try_from(model.product_id).map_err(anyhow::Error::from)?;
    if pause {
        reservations.set_paused(id, true).await?;
    }
    let result = load(db, reservations, model, id, force).await;
    if pause
        && result.is_err()
        && let Err(e) = reservations.set_paused(id, false).await
    {
        tracing::warn!(product_id = id.get(), error = %e, "could not lift the pause after a failed rebuild");
    }
    result
}

async fn load(
    db: &DatabaseConnection,
    reservations: &Reservations,
    model: &product::Model,
    id: ProductId,
    force: bool,
) -> Result<Preheated, PreheatError> {
    // Order matters: what is in flight is read from Redis before Postgres (see PreheatPlan).
    let pending = reservations.pending_ids(id).await?;
    let live = live_orders(db, id).await?;
    let buyers = buyers(db, id).await?;
    let closed = closed_reservations(db, id).await?;
    let views = order_views(db, id).await?;
    mark_preheated(db, id).await?;
    let updates: Vec<(UserId, &ReservationView)> = views.iter().map(|(u, v)| (*u, v)).collect();
    reservations.record_statuses(id, &updates).await?;
    let plan = PreheatPlan {
        product: id,
        stock: i64::from(model.stock),
        live_orders: live,
        buyers,
        pending,
        closed,
        starts_ms: model.starts_at.timestamp_millis(),
        ends_ms: model.ends_at.timestamp_millis(),
        force,
    };
    match reservations.preheat(&plan).await? {
        Preheated::AlreadyLive { .. } => Err(PreheatError::AlreadyLive),
        loaded => Ok(loaded),
    }
}

/// Products loaded into Redis whose sale has not ended (the ones a loss would hurt).
pub async fn preheated_unended(db: &DatabaseConnection) -> anyhow::Result<Vec<product::Model>> {
    product::Entity::find()
        .filter(product::Column::PreheatedAt.is_not_null())
        .filter(product::Column::EndsAt.gt(Utc::now()))
        .all(db)
        .await
        .context("listing preheated products")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str, stock: i64, price: i64, span_secs: i64) -> NewProduct {
        let start = Utc::now();
        NewProduct {
            name: name.into(),
            stock,
            price_cents: price,
            starts_at: start,
            ends_at: start + chrono::Duration::seconds(span_secs),
        }
    }

    #[test]
    fn product_fields_are_validated() {
        assert!(new("phone", 100, 999, 60).validate().is_ok());
        assert!(new("phone", 0, 0, 60).validate().is_ok());
        assert!(new(" ", 1, 1, 60).validate().is_err());
        assert!(new(&"x".repeat(201), 1, 1, 60).validate().is_err());
        assert!(new("p", -1, 1, 60).validate().is_err());
        assert!(new("p", MAX_STOCK + 1, 1, 60).validate().is_err());
        assert!(new("p", 1, -1, 60).validate().is_err());
        assert!(new("p", 1, 1, 0).validate().is_err());
    }
}
