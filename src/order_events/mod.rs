//! Order events out of seckill: `order.confirmed`, `order.paid`, `order.cancelled`,
//! `order.expired`, `order.rejected`.
//!
//! They are written by Postgres itself, in the transaction of each change (the triggers of
//! `migrations/0008_order_event.sql`: a transactional outbox, so no code path can change an
//! order without its event). Dispatchers in every `worker` deliver them at least once:
//! [`publish`] to the RabbitMQ topic exchange `SECKILL_EVENTS_EXCHANGE` (routing key = type,
//! persistent, with publisher confirms) and [`webhook`] to `SECKILL_WEBHOOK_URL` (signed,
//! retried with backoff). Several workers share the work with `FOR UPDATE SKIP LOCKED`, so
//! under normal operation each event is sent once; after a crash between sending and
//! recording, it is sent again with the same `id`. Per order, an event is sent only once every
//! earlier one of that order was (its `seq` is the order), so receivers see an order's events
//! in order — and may still sort by `data`'s order and the event's `seq` if they fan out.
//!
//! `seckill events list|replay` are the operators' tools ([`list`], [`replay`]).

pub mod publish;
pub mod webhook;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, Statement};
use serde::Serialize;
use uuid::Uuid;

/// The event types, as RabbitMQ routing keys and the events' `type`.
pub const TYPES: [&str; 5] = [
    "order.confirmed",
    "order.paid",
    "order.cancelled",
    "order.expired",
    "order.rejected",
];

/// Events handed to a dispatcher at once.
pub const BATCH: u64 = 100;

/// One event as stored: its body is what is delivered, byte for byte.
#[derive(Debug, Clone, FromQueryResult)]
pub struct Event {
    pub event_id: Uuid,
    pub r#type: String,
    pub body: serde_json::Value,
}

/// An event as `seckill events list` shows it.
#[derive(Debug, Clone, Serialize, FromQueryResult)]
pub struct EventRow {
    pub event_id: Uuid,
    pub r#type: String,
    pub seq: i32,
    pub reservation_id: Uuid,
    pub product_id: i64,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// Which column records a destination's delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The events exchange (`published_at`).
    Exchange,
    /// The webhook (`delivered_at`).
    Webhook,
}

impl Destination {
    fn column(self) -> &'static str {
        match self {
            Destination::Exchange => "published_at",
            Destination::Webhook => "delivered_at",
        }
    }
}

/// Claims up to [`BATCH`] events not yet sent to `to`, oldest first, locked for the caller's
/// transaction (`SKIP LOCKED`: another dispatcher takes others). An event whose order's
/// previous event (`seq - 1`: events are sent in order, so it stands for all earlier ones) is
/// not yet sent there waits for it. Looked up by the `(reservation_id, seq)` key, and not at
/// all for a first event: with 20,000 events waiting, a `seq <` range over the partial index
/// took seconds per claim (`scripts/bench-events 20000`). For the webhook, only events due (their
/// backoff over).
pub async fn claim(db: &impl ConnectionTrait, to: Destination) -> anyhow::Result<Vec<Event>> {
    let col = to.column();
    let due = match to {
        Destination::Exchange => "",
        Destination::Webhook => "and e.next_attempt_at <= now()",
    };
    Event::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        format!(
            "select e.event_id, e.type, e.body from order_event e \
             where e.{col} is null {due} \
             and (e.seq = 1 or not exists (select 1 from order_event p \
                  where p.reservation_id = e.reservation_id and p.seq = e.seq - 1 \
                  and p.{col} is null)) \
             order by e.created_at, e.seq limit {BATCH} for update of e skip locked"
        ),
    ))
    .all(db)
    .await
    .context("claiming order events")
}

/// Records that `ids` reached `to`.
pub async fn mark_sent(
    db: &impl ConnectionTrait,
    to: Destination,
    ids: &[Uuid],
) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        format!(
            "update order_event set {} = now() where event_id = any($1)",
            to.column()
        ),
        [ids.to_vec().into()],
    ))
    .await
    .context("recording order events sent")?;
    Ok(())
}

/// How many events have not reached `to`, and how old (seconds) the oldest of them is.
pub async fn backlog(db: &DatabaseConnection, to: Destination) -> anyhow::Result<(i64, f64)> {
    #[derive(FromQueryResult)]
    struct Row {
        n: i64,
        age: f64,
    }
    let col = to.column();
    let row = Row::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        format!(
            "select count(*)::bigint as n, \
             coalesce(extract(epoch from now() - min(created_at)), 0)::float8 as age \
             from order_event where {col} is null"
        ),
    ))
    .one(db)
    .await
    .context("counting order events not yet sent")?;
    Ok(row.map(|r| (r.n, r.age)).unwrap_or((0, 0.0)))
}

/// What [`list`] shows.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub product: Option<i64>,
    /// Only events not yet sent to the exchange (or, with `webhook`, not yet delivered to it).
    pub undelivered: bool,
    /// Whether a webhook is configured (its deliveries count for `undelivered`).
    pub webhook: bool,
    pub limit: u64,
}

/// The most recent events first, per `filter`.
pub async fn list(db: &DatabaseConnection, filter: &ListFilter) -> anyhow::Result<Vec<EventRow>> {
    let mut conditions = vec!["true".to_owned()];
    let mut values: Vec<sea_orm::Value> = Vec::new();
    if let Some(p) = filter.product {
        values.push(p.into());
        conditions.push(format!("product_id = ${}", values.len()));
    }
    if filter.undelivered {
        conditions.push(if filter.webhook {
            "(published_at is null or delivered_at is null)".to_owned()
        } else {
            "published_at is null".to_owned()
        });
    }
    EventRow::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        format!(
            "select event_id, type, seq, reservation_id, product_id, created_at, published_at, \
             delivered_at, attempts, last_error from order_event where {} \
             order by created_at desc, seq desc limit {}",
            conditions.join(" and "),
            filter.limit.clamp(1, 10_000)
        ),
        values,
    ))
    .all(db)
    .await
    .context("listing order events")
}

/// Which events [`replay`] sends again.
#[derive(Debug, Clone)]
pub enum ReplaySelection {
    One(Uuid),
    /// Every event of one product created at or after a moment.
    ProductSince(i64, DateTime<Utc>),
}

/// Marks events to be sent again — to the exchange and to the webhook (its attempts start over)
/// — with the same ids, so receivers that saw them deduplicate. How many.
pub async fn replay(db: &DatabaseConnection, which: &ReplaySelection) -> anyhow::Result<u64> {
    let (condition, values): (&str, Vec<sea_orm::Value>) = match which {
        ReplaySelection::One(id) => ("event_id = $1", vec![(*id).into()]),
        ReplaySelection::ProductSince(p, since) => (
            "product_id = $1 and created_at >= $2",
            vec![(*p).into(), (*since).into()],
        ),
    };
    let done = db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            format!(
                "update order_event set published_at = null, delivered_at = null, attempts = 0, \
                 next_attempt_at = now(), last_error = null where {condition}"
            ),
            values,
        ))
        .await
        .context("marking order events to send again")?;
    Ok(done.rows_affected())
}
