//! Products: creation, look-up (with an in-process cache of the fields that never change, and
//! brief, bounded, single-flight caches of the row, of unknown ids and of Redis' remaining
//! figure), live figures, the preheat that loads a sale into Redis, and what Postgres says
//! about a sale's place in Redis (loaded, or retired once it ended and drained).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::{
    AccessMode, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait,
    FromQueryResult, IsolationLevel, QueryFilter, Statement, TransactionTrait,
};
use uuid::Uuid;

use crate::{
    cache::TtlCache,
    db::entities::{
        orders::{
            self,
            status_sql::{CLOSED, LIVE, PENDING_PAYMENT},
        },
        product,
    },
    domain::{ProductId, UserId},
    rejections,
    reservations::{Moment, PreheatPlan, Preheated, ReservationView, Reservations, Unavailable},
};

/// Largest stock one product may have.
pub const MAX_STOCK: i64 = 10_000_000;

/// A product as created (validated at the boundary).
#[derive(Debug, Clone)]
pub struct NewProduct {
    pub name: String,
    pub stock: i64,
    /// In the currency's minor unit (cents; yen for JPY).
    pub price_cents: i64,
    /// ISO 4217 code: three capital letters.
    pub currency: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// Shoppers join a waiting room first (`src/room.rs`).
    pub waiting_room: bool,
    /// Joining that room takes a proof of work (`src/pow.rs`).
    pub proof_of_work: bool,
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
        if self.proof_of_work && !self.waiting_room {
            return Err(
                "proof_of_work needs waiting_room: the proof is asked when joining it".into(),
            );
        }
        if !crate::domain::is_currency_code(&self.currency) {
            return Err(
                "currency must be an ISO 4217 code: three capital letters, e.g. EUR".into(),
            );
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
        currency: Set(new.currency.clone()),
        starts_at: Set(new.starts_at),
        ends_at: Set(new.ends_at),
        created_at: Set(Utc::now()),
        waiting_room: Set(new.waiting_room),
        proof_of_work: Set(new.proof_of_work),
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

/// The `limit` most recently created products, newest first.
pub async fn recent(db: &DatabaseConnection, limit: u64) -> anyhow::Result<Vec<product::Model>> {
    use sea_orm::{QueryOrder, QuerySelect};
    product::Entity::find()
        .order_by_desc(product::Column::ProductId)
        .limit(limit)
        .all(db)
        .await
        .context("reading the recent products")
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
    /// Shoppers join a waiting room first (`src/room.rs`).
    pub waiting_room: bool,
    /// Joining it takes a proof of work.
    pub proof_of_work: bool,
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
            waiting_room: m.waiting_room,
            proof_of_work: m.proof_of_work,
        })
    }
}

/// How long a product's row — or the absence of one — is answered from memory. Within one
/// process a change made through it (create, preheat) is seen at once; other processes see it
/// within this time (twice it for a product created elsewhere: see [`ProductCache::row`]).
pub const ROW_TTL: Duration = Duration::from_secs(1);

/// How long Redis' `remaining` figure of a product is reused by the product view.
pub const REMAINING_TTL: Duration = Duration::from_millis(500);

/// Most product ids each brief cache holds; beyond it the least recently used goes first, so a
/// flood of random ids cannot grow memory.
pub const CACHED_IDS: usize = 10_000;

/// Caches [`ProductInfo`] so the purchase path needs no Postgres round trip, and answers the
/// product view and unknown ids from memory for a moment: whatever the request rate, one
/// process asks Postgres at most once per id per [`ROW_TTL`] (ids above the highest product id
/// cost one query per [`ROW_TTL`] in all), and Redis once per id per [`REMAINING_TTL`].
pub struct ProductCache {
    info: RwLock<HashMap<ProductId, Arc<ProductInfo>>>,
    /// The row, or `None` for an id Postgres does not have.
    rows: TtlCache<ProductId, Option<Arc<product::Model>>>,
    /// The highest product id (ids are a sequence: anything above it does not exist yet).
    highest: TtlCache<(), i64>,
    /// Redis' units left (`None`: Redis does not have the product).
    remaining: TtlCache<ProductId, Option<i64>>,
    /// The sales on now or coming ([`listed`]).
    listing: TtlCache<(), Arc<Vec<product::Model>>>,
}

impl Default for ProductCache {
    fn default() -> Self {
        Self {
            info: RwLock::default(),
            rows: TtlCache::new(CACHED_IDS, ROW_TTL),
            highest: TtlCache::new(1, ROW_TTL),
            remaining: TtlCache::new(CACHED_IDS, REMAINING_TTL),
            listing: TtlCache::new(1, ROW_TTL),
        }
    }
}

impl ProductCache {
    /// The product, from memory or Postgres; `None` if it does not exist.
    pub async fn get(
        &self,
        db: &DatabaseConnection,
        id: ProductId,
    ) -> anyhow::Result<Option<Arc<ProductInfo>>> {
        if let Some(info) = self.info.read().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(Some(info));
        }
        let Some(model) = self.row(db, id).await? else {
            return Ok(None);
        };
        let info = Arc::new(ProductInfo::try_from(&*model)?);
        if let Ok(mut m) = self.info.write() {
            m.insert(id, info.clone());
        }
        Ok(Some(info))
    }

    /// The product's row (`sold` and `preheated_at` at most [`ROW_TTL`] old), or `None`. An id
    /// above the highest one is answered without asking for it; an unknown id below it is
    /// remembered as unknown for [`ROW_TTL`].
    pub async fn row(
        &self,
        db: &DatabaseConnection,
        id: ProductId,
    ) -> anyhow::Result<Option<Arc<product::Model>>> {
        let conn = db.clone();
        let highest = self
            .highest
            .get((), move || async move { highest_id(&conn).await })
            .await?;
        if id.get() > highest {
            return Ok(None);
        }
        let conn = db.clone();
        self.rows
            .get(id, move || async move {
                Ok(find(&conn, id).await?.map(Arc::new))
            })
            .await
    }

    /// Units left on sale in Redis (at most [`REMAINING_TTL`] old), `None` if Redis does not
    /// have the product. "Not in Redis" is never remembered: the caller may conclude from it
    /// that Redis lost the product (and mark it recovering), which must not outlive a rebuild.
    pub async fn remaining(
        &self,
        reservations: &Reservations,
        id: ProductId,
    ) -> anyhow::Result<Option<i64>> {
        let redis = reservations.clone();
        let remaining = self
            .remaining
            .get(id, move || async move { Ok(redis.remaining(id).await?) })
            .await?;
        if remaining.is_none() {
            self.remaining.invalidate(&id);
        }
        Ok(remaining)
    }

    /// The sales on now or coming, soonest first ([`listed`]; at most [`ROW_TTL`] old).
    pub async fn listing(
        &self,
        db: &DatabaseConnection,
    ) -> anyhow::Result<Arc<Vec<product::Model>>> {
        let conn = db.clone();
        self.listing
            .get(
                (),
                move || async move { Ok(Arc::new(listed(&conn).await?)) },
            )
            .await
    }

    /// Forgets what this process remembers of `id` (created or preheated here), so its next
    /// answer is current.
    pub fn changed(&self, id: ProductId) {
        self.highest.invalidate(&());
        self.listing.invalidate(&());
        self.rows.invalidate(&id);
        self.remaining.invalidate(&id);
    }
}

/// The highest product id, 0 when there is none.
async fn highest_id(db: &DatabaseConnection) -> anyhow::Result<i64> {
    let row = Count::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "select coalesce(max(product_id), 0) as n from product",
    ))
    .one(db)
    .await
    .context("reading the highest product id")?;
    Ok(row.map_or(0, |r| r.n))
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

/// The product's orders matching `condition` (SQL over `orders`, after `product_id = $1`;
/// `true` counts them all).
pub async fn count_orders(
    db: &impl ConnectionTrait,
    id: ProductId,
    condition: &str,
) -> anyhow::Result<i64> {
    let row = Count::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        format!("select count(*) as n from orders where product_id = $1 and ({condition})"),
        [id.get().into()],
    ))
    .one(db)
    .await
    .with_context(|| format!("counting orders where {condition}"))?;
    Ok(row.map_or(0, |r| r.n))
}

/// Orders holding a unit (`pending_payment` or `paid`).
pub async fn live_orders(db: &impl ConnectionTrait, id: ProductId) -> anyhow::Result<i64> {
    count_orders(db, id, &format!("status in {LIVE}")).await
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
        format!("select reservation_id from orders where product_id = $1 and status in {CLOSED}"),
        [id.get().into()],
    ))
    .all(db)
    .await
    .context("reading closed reservations")?;
    Ok(rows.into_iter().map(|r| r.reservation_id).collect())
}

/// Each order's and rejected win's shopper, and what they see of it.
fn views(
    orders: &[orders::Model],
    rejected: &[crate::db::entities::rejection::Model],
) -> anyhow::Result<Vec<(UserId, ReservationView)>> {
    let orders = orders
        .iter()
        .map(|o| Ok((UserId::try_from(o.user_id)?, ReservationView::from(o))));
    let rejected = rejected
        .iter()
        .map(|r| Ok((UserId::try_from(r.user_id)?, ReservationView::from(r))));
    orders.chain(rejected).collect()
}

/// What every persisted reservation of the product (order or rejected win) looks like to its
/// shopper.
pub async fn order_views(
    db: &impl ConnectionTrait,
    id: ProductId,
) -> anyhow::Result<Vec<(UserId, ReservationView)>> {
    views_of(db, Of::Product(id)).await
}

/// What each of these reservations looks like to its shopper, for those Postgres has decided
/// (an order, or a rejected win); the others are left out.
pub async fn decided_views(
    db: &impl ConnectionTrait,
    ids: &[Uuid],
) -> anyhow::Result<Vec<(UserId, ReservationView)>> {
    views_of(db, Of::Reservations(ids)).await
}

/// Whose persisted reservations [`views_of`] reads.
enum Of<'a> {
    Product(ProductId),
    Reservations(&'a [Uuid]),
}

async fn views_of(
    db: &impl ConnectionTrait,
    of: Of<'_>,
) -> anyhow::Result<Vec<(UserId, ReservationView)>> {
    let (sql, value, rejected) = match of {
        Of::Product(id) => (
            "select * from orders where product_id = $1",
            id.get().into(),
            rejections::of_product(db, id).await?,
        ),
        Of::Reservations(ids) => (
            "select * from orders where reservation_id = any($1)",
            ids.to_vec().into(),
            rejections::of_reservations(db, ids.to_vec()).await?,
        ),
    };
    let rows = orders::Model::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        [value],
    ))
    .all(db)
    .await
    .context("reading orders")?;
    views(&rows, &rejected)
}

/// Products whose sale Redis should still hold, ended or not: preheated and not retired.
pub async fn held_in_redis(db: &DatabaseConnection) -> anyhow::Result<Vec<product::Model>> {
    product::Entity::find()
        .filter(product::Column::PreheatedAt.is_not_null())
        .filter(product::Column::RetiredAt.is_null())
        .all(db)
        .await
        .context("listing the products Redis holds")
}

/// Whether Redis should hold the product's sale, from Postgres alone: it was preheated, has
/// not been retired (an ended, drained sale whose keys were let expire on purpose) and its
/// sale has not ended. A product for which this holds but Redis has nothing is **lost**.
pub fn expected_in_redis(model: &product::Model, now: DateTime<Utc>) -> bool {
    model.preheated_at.is_some() && model.retired_at.is_none() && now < model.ends_at
}

/// Records that the product is (about to be) in Redis, so a later loss is told apart from
/// "never preheated"; a product preheated again is no longer retired.
/// Records the preheat; with `fresh` (Redis does not hold the sale: the first preheat, a
/// rebuild) bumps the product's Redis epoch. Returns the epoch the state is to carry.
async fn mark_preheated(
    db: &DatabaseConnection,
    id: ProductId,
    fresh: bool,
) -> anyhow::Result<i64> {
    #[derive(FromQueryResult)]
    struct Epoch {
        redis_epoch: i64,
    }
    let row = Epoch::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "update product set preheated_at = now(), retired_at = null, \
         redis_epoch = redis_epoch + (case when $2 then 1 else 0 end) \
         where product_id = $1 returning redis_epoch",
        [id.get().into(), fresh.into()],
    ))
    .one(db)
    .await
    .context("recording the preheat")?
    .context("the product vanished while it was preheated")?;
    Ok(row.redis_epoch)
}

/// Each product's latest moments outside Redis: its current Redis epoch with the highest win
/// sequence of that epoch relayed to RabbitMQ (0 before any), and the highest release sequence
/// of that epoch recorded with a returned unit's order (0 before any). A Redis state behind
/// either went back in time.
pub async fn relayed_moments(
    db: &impl ConnectionTrait,
    ids: &[ProductId],
) -> anyhow::Result<HashMap<ProductId, Outside>> {
    #[derive(FromQueryResult)]
    struct Row {
        product_id: i64,
        redis_epoch: i64,
        seq: i64,
        rseq: i64,
    }
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = Row::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        format!(
            "select p.product_id, p.redis_epoch, coalesce((select max(r.seq) from relayed r \
             where r.product_id = p.product_id and r.epoch = p.redis_epoch), 0) as seq, \
             coalesce((select max(o.released_seq) from orders o \
             where o.product_id = p.product_id and o.released_epoch = p.redis_epoch), 0) as rseq \
             from product p where p.product_id in ({})",
            id_list(ids)
        ),
    ))
    .all(db)
    .await
    .context("reading the moments relayed")?;
    rows.into_iter()
        .map(|r| {
            let id = ProductId::try_from(r.product_id)?;
            Ok((
                id,
                Outside {
                    won: Moment::new(r.redis_epoch, r.seq),
                    released: r.rseq,
                },
            ))
        })
        .collect()
}

/// A product's latest moments seen outside Redis (see [`relayed_moments`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outside {
    /// The epoch and the highest win sequence relayed.
    pub won: Moment,
    /// The highest release sequence of that epoch recorded with an order.
    pub released: i64,
}

/// A winner handed to RabbitMQ: its reservation and its moment in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub reservation_id: Uuid,
    pub at: Moment,
}

/// Records winners of `id` the broker confirmed, before their outbox entries are
/// acknowledged (a winner recorded twice, relayed again after a crash, is recorded once).
pub async fn record_relayed(
    db: &impl ConnectionTrait,
    id: ProductId,
    wins: &[Relayed],
) -> anyhow::Result<()> {
    // 4 parameters a row: far below Postgres' 65,535 per statement for a relay batch.
    for chunk in wins.chunks(1_000) {
        let mut sql =
            String::from("insert into relayed (reservation_id, product_id, epoch, seq) values ");
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 4);
        for (i, w) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            let n = i * 4;
            sql.push_str(&format!("(${}, ${}, ${}, ${})", n + 1, n + 2, n + 3, n + 4));
            values.extend([
                w.reservation_id.into(),
                id.get().into(),
                w.at.epoch.into(),
                w.at.seq.into(),
            ]);
        }
        sql.push_str(" on conflict (reservation_id) do nothing");
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            values,
        ))
        .await
        .context("recording relayed winners")?;
    }
    Ok(())
}

/// Product ids as a SQL list. Ids are integers: written into a statement, they cannot inject
/// anything.
fn id_list(ids: &[ProductId]) -> String {
    ids.iter()
        .map(|p| p.get().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// [`unaccounted`] for several products at once (products with none are absent).
pub async fn unaccounted_of(
    db: &impl ConnectionTrait,
    ids: &[ProductId],
) -> anyhow::Result<HashMap<ProductId, i64>> {
    #[derive(FromQueryResult)]
    struct Row {
        product_id: i64,
        n: i64,
    }
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = Row::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        format!(
            "select r.product_id, count(*) as n from relayed r where r.product_id in ({}) \
             and not exists (select 1 from orders o where o.reservation_id = r.reservation_id) \
             and not exists (select 1 from rejection j where j.reservation_id = r.reservation_id) \
             group by r.product_id",
            id_list(ids)
        ),
    ))
    .all(db)
    .await
    .context("counting relayed winners not yet persisted")?;
    rows.into_iter()
        .map(|r| Ok((ProductId::try_from(r.product_id)?, r.n)))
        .collect()
}

/// Winners of the product that left Redis (relayed to RabbitMQ) and are not yet accounted for
/// in Postgres: neither an order nor a rejection. Each is in the queue, held by a worker (maybe
/// a stalled one), in a worker's backoff, or in the dead-letter queue. A lost product is
/// rebuilt only at 0.
pub async fn unaccounted(db: &impl ConnectionTrait, id: ProductId) -> anyhow::Result<i64> {
    Ok(unaccounted_of(db, &[id])
        .await?
        .get(&id)
        .copied()
        .unwrap_or(0))
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
    // Whether Redis holds the sale, asked under the rebuild lock: a state this load creates
    // starts a new epoch.
    let fresh = !reservations.is_preheated(id).await?;
    // Order matters: what is in flight is read from Redis before Postgres (see PreheatPlan).
    let pending = reservations.pending_ids(id).await?;
    // Every Postgres read of one rebuild sees one snapshot: an order committed or closed
    // between two reads is counted in both or in neither.
    let read = db
        .begin_with_config(
            Some(IsolationLevel::RepeatableRead),
            Some(AccessMode::ReadOnly),
        )
        .await
        .context("starting the rebuild's read")?;
    let live = live_orders(&read, id).await?;
    let buyers = buyers(&read, id).await?;
    let closed = closed_reservations(&read, id).await?;
    let views = order_views(&read, id).await?;
    read.commit().await.context("ending the rebuild's read")?;
    let epoch = mark_preheated(db, id, fresh).await?;
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
        epoch,
    };
    match reservations.preheat(&plan).await? {
        Preheated::AlreadyLive { .. } => Err(PreheatError::AlreadyLive),
        loaded => Ok(loaded),
    }
}

/// Most sales the public listing shows.
pub const LISTED: u64 = 50;

/// The sales that have not ended, the soonest start first (live ones, then upcoming), at most
/// [`LISTED`]: the storefront's listing.
pub async fn listed(db: &DatabaseConnection) -> anyhow::Result<Vec<product::Model>> {
    use sea_orm::{QueryOrder, QuerySelect};
    product::Entity::find()
        .filter(product::Column::EndsAt.gt(Utc::now()))
        .order_by_asc(product::Column::StartsAt)
        .order_by_asc(product::Column::ProductId)
        .limit(LISTED)
        .all(db)
        .await
        .context("listing the sales")
}

/// Products loaded into Redis whose sale has not ended (the ones a loss would hurt).
pub async fn preheated_unended(db: &DatabaseConnection) -> anyhow::Result<Vec<product::Model>> {
    product::Entity::find()
        .filter(product::Column::PreheatedAt.is_not_null())
        .filter(product::Column::RetiredAt.is_null())
        .filter(product::Column::EndsAt.gt(Utc::now()))
        .all(db)
        .await
        .context("listing preheated products")
}

/// The products with a waiting room open for joins (from `opens_before` ahead of the start)
/// whose sale has not ended and that Redis holds (preheated, not retired), with their start.
pub async fn live_rooms(
    db: &DatabaseConnection,
    opens_before: std::time::Duration,
) -> anyhow::Result<Vec<(ProductId, DateTime<Utc>)>> {
    let now = Utc::now();
    let opened = now + chrono::Duration::from_std(opens_before).unwrap_or_default();
    product::Entity::find()
        .filter(product::Column::WaitingRoom.eq(true))
        .filter(product::Column::PreheatedAt.is_not_null())
        .filter(product::Column::RetiredAt.is_null())
        .filter(product::Column::StartsAt.lte(opened))
        .filter(product::Column::EndsAt.gt(now))
        .all(db)
        .await
        .context("listing the live waiting rooms")?
        .into_iter()
        .map(|m| Ok((ProductId::try_from(m.product_id)?, m.starts_at)))
        .collect()
}

/// Most products one retirement pass looks at.
const RETIRE_BATCH: u64 = 100;

/// Preheated products whose sale has ended and that are not retired yet, earliest end first.
pub async fn retire_candidates(db: &DatabaseConnection) -> anyhow::Result<Vec<product::Model>> {
    use sea_orm::{QueryOrder, QuerySelect};
    product::Entity::find()
        .filter(product::Column::PreheatedAt.is_not_null())
        .filter(product::Column::RetiredAt.is_null())
        .filter(product::Column::EndsAt.lte(Utc::now()))
        .order_by_asc(product::Column::EndsAt)
        .limit(RETIRE_BATCH)
        .all(db)
        .await
        .context("listing ended products to retire")
}

/// Orders of the product that can still change its keys in Redis: awaiting payment (paid,
/// cancelled or expired later), or closed with their unit not yet returned (`release.lua`).
pub async fn unsettled_orders(db: &impl ConnectionTrait, id: ProductId) -> anyhow::Result<i64> {
    count_orders(
        db,
        id,
        &format!("status = {PENDING_PAYMENT} or status in {CLOSED} and released_at is null"),
    )
    .await
}

/// Records that the product's sale was retired from Redis (unless a preheat brought it back
/// meanwhile: only a product still marked preheated before `since` is retired), and drops the
/// records of its relayed winners: each is an order or a rejection by then (the caller checked
/// [`unaccounted`]), and no rebuild of an ended sale will count them.
pub async fn mark_retired(
    db: &DatabaseConnection,
    id: ProductId,
    since: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let done = db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "update product set retired_at = now()
             where product_id = $1 and retired_at is null and preheated_at <= $2",
            [id.get().into(), since.into()],
        ))
        .await
        .context("recording the retirement")?;
    if done.rows_affected() == 1 {
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "delete from relayed where product_id = $1",
            [id.get().into()],
        ))
        .await
        .context("dropping the retired sale's relayed records")?;
    }
    Ok(done.rows_affected() == 1)
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
            currency: "EUR".into(),
            starts_at: start,
            ends_at: start + chrono::Duration::seconds(span_secs),
            waiting_room: false,
            proof_of_work: false,
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
        for bad in ["eur", "EURO", "E1R", "", "€"] {
            let mut p = new("p", 1, 1, 60);
            p.currency = bad.into();
            assert!(p.validate().is_err(), "{bad:?}");
        }
    }

    fn model(preheated: bool, retired: bool, ends_in_secs: i64) -> product::Model {
        let now = Utc::now();
        product::Model {
            product_id: 1,
            name: "p".into(),
            stock: 1,
            sold: 0,
            price_cents: 1,
            starts_at: now - chrono::Duration::hours(1),
            ends_at: now + chrono::Duration::seconds(ends_in_secs),
            created_at: now,
            currency: "USD".into(),
            preheated_at: preheated.then_some(now),
            retired_at: retired.then_some(now),
            waiting_room: false,
            proof_of_work: false,
        }
    }

    #[test]
    fn only_a_preheated_unretired_unended_sale_belongs_in_redis() {
        let now = Utc::now();
        assert!(expected_in_redis(&model(true, false, 60), now));
        // Never loaded: Redis not knowing it is no loss.
        assert!(!expected_in_redis(&model(false, false, 60), now));
        // Ended: nothing more can be sold, whether or not it was retired yet.
        assert!(!expected_in_redis(&model(true, false, -60), now));
        // Retired: its keys expired on purpose.
        assert!(!expected_in_redis(&model(true, true, -60), now));
        assert!(!expected_in_redis(&model(true, true, 60), now));
    }
}
