//! The order worker: RabbitMQ → Postgres in batches, idempotently, acking only after commit.
//!
//! [`process_batch`] is one step (testable without a broker): one transaction inserts the
//! batch with `ON CONFLICT DO NOTHING` (unique reservation and `(user_id, product_id)`), adds
//! the newly inserted rows to `product.sold` (the `sold <= stock` CHECK guards it), commits,
//! then records `confirmed` + `order_id` in Redis for the status endpoints. [`Worker::run`] is
//! the loop around it: prefetch-bounded consumer, batching, dead-lettering of poison, backoff
//! while Postgres or RabbitMQ is down (holding the batch: no ack/nack storms), reconnection.

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::Context;
use chrono::Utc;
use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    },
    types::FieldTable,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, Statement, TransactionTrait};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    amqp::{Broker, OrderMessage, declare_topology},
    backoff::{Backoff, sleep_or_stop},
    db::entities::orders,
    deps::Deps,
    metrics::Metrics,
    reservations::{ReservationView, Reservations, Status},
};

/// Rows per INSERT statement (8 parameters each, far below Postgres' 65,535).
const ROWS_PER_STATEMENT: usize = 1_000;

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// New orders.
    pub inserted: usize,
    /// Messages whose order already existed (redeliveries).
    pub duplicates: usize,
}

#[derive(Debug, FromQueryResult)]
struct Inserted {
    order_id: Uuid,
    reservation_id: Uuid,
    user_id: i64,
    product_id: i64,
    expires_at: chrono::DateTime<Utc>,
}

/// Persists a batch of winners in one transaction, then records their status in Redis.
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
    let txn = db.begin().await.context("beginning the batch")?;
    let mut inserted_per_product: HashMap<i64, i64> = HashMap::new();
    let mut new_orders: Vec<Inserted> = Vec::with_capacity(batch.len());
    let mut inserted = 0;
    for chunk in batch.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "insert into orders (order_id, reservation_id, user_id, product_id, status, reserved_at, created_at, expires_at) values ",
        );
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 7);
        for (i, m) in chunk.iter().enumerate() {
            let b = i * 7;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, 'pending_payment', ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7
            ));
            values.extend([
                Uuid::now_v7().into(),
                m.reservation_id.into(),
                m.user_id.get().into(),
                m.product_id.get().into(),
                m.reserved_at.into(),
                now.into(),
                expires_at.into(),
            ]);
        }
        sql.push_str(" on conflict do nothing returning order_id, reservation_id, user_id, product_id, expires_at");
        let rows = Inserted::find_by_statement(Statement::from_sql_and_values(
            txn.get_database_backend(),
            sql,
            values,
        ))
        .all(&txn)
        .await
        .context("inserting orders")?;
        inserted += rows.len();
        for r in rows {
            *inserted_per_product.entry(r.product_id).or_default() += 1;
            new_orders.push(r);
        }
    }
    for (product, n) in &inserted_per_product {
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "update product set sold = sold + $2 where product_id = $1",
            [(*product).into(), (*n).into()],
        ))
        .await
        .context("adding to product.sold")?;
    }
    txn.commit().await.context("committing the batch")?;

    // Tell the status endpoints (and take the winners off the pending set). New orders are
    // known from RETURNING; only redeliveries (orders made by an earlier attempt) are read back.
    let mut views: Vec<(i64, i64, ReservationView)> = new_orders
        .iter()
        .map(|o| {
            let view = ReservationView {
                reservation_id: o.reservation_id,
                status: Status::Confirmed,
                order_id: Some(o.order_id),
                expires_at: Some(o.expires_at),
                reason: None,
            };
            (o.product_id, o.user_id, view)
        })
        .collect();
    if new_orders.len() < batch.len() {
        let fresh: std::collections::HashSet<Uuid> =
            new_orders.iter().map(|o| o.reservation_id).collect();
        let ids: Vec<Uuid> = batch
            .iter()
            .map(|m| m.reservation_id)
            .filter(|r| !fresh.contains(r))
            .collect();
        let earlier = orders::Model::find_by_statement(Statement::from_sql_and_values(
            db.get_database_backend(),
            "select * from orders where reservation_id = any($1)",
            [ids.into()],
        ))
        .all(db)
        .await
        .context("reading redelivered orders")?;
        views.extend(
            earlier
                .iter()
                .map(|o| (o.product_id, o.user_id, ReservationView::from(o))),
        );
    }
    // One status script call per product in the batch (usually one).
    let mut per_product: HashMap<i64, Vec<(crate::domain::UserId, &ReservationView)>> =
        HashMap::new();
    for (product, user, view) in &views {
        if let Ok(user) = crate::domain::UserId::try_from(*user) {
            per_product.entry(*product).or_default().push((user, view));
        }
    }
    for (product, updates) in per_product {
        let Ok(product) = crate::domain::ProductId::try_from(product) else {
            continue;
        };
        reservations
            .record_statuses(product, &updates)
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .context("recording order status in Redis")?;
    }
    Ok(BatchOutcome {
        inserted,
        duplicates: batch.len() - inserted,
    })
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
            if !self.handle(&ch, batch, shutdown).await? {
                break;
            }
        }
        let _ = ch.close(200, "worker stopping".into()).await;
        Ok(())
    }

    /// Queue and dead-letter queue depths for `/metrics` (passive declares).
    async fn update_depths(&self, ch: &Channel) {
        use lapin::options::QueueDeclareOptions;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let dlq = format!("{}.dlq", self.queue);
        for (name, gauge) in [
            (self.queue.as_str(), &self.metrics.queue_depth),
            (dlq.as_str(), &self.metrics.dlq_depth),
        ] {
            if let Ok(q) = ch
                .queue_declare(name.into(), passive, FieldTable::default())
                .await
            {
                gauge.set(i64::from(q.message_count()));
            }
        }
    }

    /// Persists one batch, dead-letters its poison, acks the rest after commit.
    /// `Ok(false)`: shutdown came while the batch was held (it is redelivered later).
    async fn handle(
        &self,
        ch: &Channel,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let mut good = Vec::with_capacity(batch.len());
        let mut last_good = None;
        for d in &batch {
            match OrderMessage::parse(&d.data) {
                Ok(m) => {
                    good.push(m);
                    last_good = Some(d.delivery_tag);
                }
                Err(why) => {
                    tracing::error!(delivery_tag = d.delivery_tag, %why, "poison message dead-lettered");
                    ch.basic_reject(d.delivery_tag, BasicRejectOptions { requeue: false })
                        .await
                        .context("rejecting poison")?;
                    self.metrics.dead_lettered.inc();
                }
            }
        }
        let Some(last_good) = last_good else {
            return Ok(true);
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let started = std::time::Instant::now();
            match process_batch(&self.db, &self.reservations, &good, self.payment_timeout).await {
                Ok(outcome) => {
                    self.metrics
                        .persist_latency
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.worker_batch.observe(good.len() as f64);
                    self.metrics
                        .orders_persisted
                        .inc_by(outcome.inserted as u64);
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %format!("{e:#}"), batch = good.len(), "persisting failed; holding the batch, retry in {delay:?}");
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            let _ = ch.basic_nack(last_good, BasicNackOptions { multiple: true, requeue: true }).await;
                            return Ok(false);
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        // Every earlier delivery on this channel is settled, so `multiple` acks exactly the
        // good ones of this batch (poison was rejected one by one above).
        ch.basic_ack(last_good, BasicAckOptions { multiple: true })
            .await
            .context("acking the batch")?;
        Ok(true)
    }
}
