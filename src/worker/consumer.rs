//! The consumer loop: [`Worker`] takes batches of deliveries from RabbitMQ, persists them,
//! dead-letters what is refused, and acks only after commit.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
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
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{BatchOutcome, Failure, Poison, bisect, classify, process_batch};
use crate::{
    amqp::{Broker, OrderMessage, declare_topology},
    backoff::{Backoff, sleep_or_stop},
    deps::Deps,
    dlq,
    metrics::Metrics,
    rejections::Cause,
    reservations::Reservations,
};

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
        let queue = declare_topology(&conn, &self.queue)
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
            let redelivered = batch.iter().filter(|d| d.redelivered).count();
            self.metrics.worker_redeliveries.inc_by(redelivered as u64);
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
