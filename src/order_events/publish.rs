//! Order events to the RabbitMQ topic exchange `SECKILL_EVENTS_EXCHANGE`: routing key = the
//! event's type, persistent, `message_id` = the event's id, with publisher confirms. An event
//! is recorded as published only once RabbitMQ confirmed it, in the transaction that claimed
//! it (so a dispatcher that dies mid-batch leaves its events to be sent again, same ids).
//! Nobody bound to the exchange is not an error: a topic exchange drops what no queue wants,
//! as subscribers expect.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::FieldTable,
};
use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio_util::sync::CancellationToken;

use super::{BATCH, Destination, backlog, claim, mark_sent};
use crate::{
    amqp::Broker,
    backoff::{Backoff, sleep_or_stop},
    deps::Deps,
    metrics::Metrics,
};

/// How long an idle dispatcher waits before it looks again.
const IDLE: Duration = Duration::from_millis(250);
/// How often the backlog gauge is refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);

/// Declares the events exchange (durable topic); idempotent.
pub async fn declare_exchange(conn: &Connection, exchange: &str) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.close(200, "declared".into()).await.ok();
    Ok(())
}

/// The exchange dispatcher of one `worker` process.
pub struct Publisher {
    db: DatabaseConnection,
    broker: Broker,
    exchange: String,
    metrics: Arc<Metrics>,
}

impl Publisher {
    pub fn new(deps: &Deps) -> Self {
        Self {
            db: deps.db.clone(),
            broker: deps.broker.clone(),
            exchange: deps.settings.events_exchange.clone(),
            metrics: deps.metrics.clone(),
        }
    }

    /// Publishes until `shutdown`, reconnecting with backoff while RabbitMQ or Postgres is down.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        while !shutdown.is_cancelled() {
            let Some(conn) = self.broker.connected(Duration::from_secs(1)).await else {
                continue;
            };
            match self.session(&conn, &shutdown, &mut backoff).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "order events: publishing failed; retrying");
                    sleep_or_stop(&shutdown, backoff.next_delay()).await;
                }
            }
        }
        Ok(())
    }

    /// One channel's life: declare, then publish batches until shutdown (`Ok`) or an error.
    async fn session(
        &self,
        conn: &Connection,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        declare_exchange(conn, &self.exchange)
            .await
            .context("declaring the events exchange")?;
        let ch = conn.create_channel().await.context("opening a channel")?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        let mut gauge_at = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            let sent = self.publish_once(&ch).await?;
            backoff.reset();
            if gauge_at.elapsed() >= GAUGE_EVERY {
                gauge_at = tokio::time::Instant::now();
                if let Ok((n, _)) = backlog(&self.db, Destination::Exchange).await {
                    self.metrics.events_unpublished.set(n);
                }
            }
            if sent < BATCH as usize {
                sleep_or_stop(shutdown, IDLE).await;
            }
        }
        Ok(())
    }

    /// Claims a batch, publishes it with its confirms in flight together, and records it as
    /// published in the same transaction; how many. A batch not wholly confirmed is rolled
    /// back (sent again later: the same ids).
    pub async fn publish_once(&self, ch: &Channel) -> anyhow::Result<usize> {
        let txn = self.db.begin().await.context("beginning a batch")?;
        let events = claim(&txn, Destination::Exchange).await?;
        if events.is_empty() {
            txn.commit().await.ok();
            return Ok(0);
        }
        let mut in_flight = Vec::with_capacity(events.len());
        for e in &events {
            let payload = serde_json::to_vec(&e.body)?;
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(e.event_id.to_string().into())
                .with_type(e.r#type.as_str().into());
            let confirm = ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    e.r#type.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties,
                )
                .await
                .context("publishing an order event")?;
            in_flight.push(confirm);
        }
        for confirm in in_flight {
            match confirm.await.context("waiting for a confirm")? {
                Confirmation::Ack(_) => {}
                other => anyhow::bail!("RabbitMQ did not take an order event: {other:?}"),
            }
        }
        let ids: Vec<_> = events.iter().map(|e| e.event_id).collect();
        mark_sent(&txn, Destination::Exchange, &ids).await?;
        txn.commit().await.context("recording a published batch")?;
        for e in &events {
            self.metrics
                .events_published
                .with_label_values(&[e.r#type.as_str()])
                .inc();
        }
        Ok(events.len())
    }
}
