//! Publishing outbox entries to RabbitMQ (persistent, mandatory, with confirms kept in
//! flight together), recording the confirmed winners in Postgres (`relayed`: what a rebuild
//! after a loss counts, [`crate::products::unaccounted`]), then acknowledging and deleting
//! their entries in the stream.

use anyhow::Context;
use chrono::Utc;
use fred::prelude::*;
use lapin::{BasicProperties, Channel, Confirmation, options::BasicPublishOptions};

use super::{BATCH, GROUP, ProductError, Relay, State, decode::Entry, message_of, moment_of};
use crate::{
    domain::ProductId,
    products::{Relayed, record_relayed},
};

impl Relay {
    /// Publishes what one read returned, stream by stream.
    pub(super) async fn publish_batches(
        &self,
        ch: &Channel,
        st: &mut State,
        group: &[(ProductId, String)],
        batches: Vec<(String, Vec<Entry>)>,
    ) -> anyhow::Result<()> {
        for (stream, entries) in batches {
            let Some((id, _)) = group.iter().find(|(_, s)| *s == stream) else {
                continue;
            };
            if let Some(t) = st.products.get_mut(id) {
                t.full = entries.len() as u64 >= BATCH;
            }
            if !entries.is_empty() {
                self.publish(ch, st, *id, entries).await?;
            }
        }
        Ok(())
    }

    /// Publishes a batch of one product with confirms kept in flight together; records the
    /// confirmed winners in Postgres, then acks and deletes their entries. Unconfirmed ones
    /// stay pending and are reclaimed later. A broker failure is the caller's (the whole relay
    /// backs off); a failed record or acknowledgement is this product's (its entries stay
    /// pending: published again later, which the worker's idempotence absorbs).
    pub(super) async fn publish(
        &self,
        ch: &Channel,
        st: &mut State,
        id: ProductId,
        entries: Vec<Entry>,
    ) -> anyhow::Result<()> {
        let stream = self.keys.product(id).outbox;
        self.metrics.relay_batch.observe(entries.len() as f64);
        let mut in_flight = Vec::with_capacity(entries.len());
        let mut done: Vec<String> = Vec::with_capacity(entries.len());
        let mut relayed: Vec<Relayed> = Vec::with_capacity(entries.len());
        for (entry_id, fields) in entries {
            let Some(message) = message_of(&fields) else {
                // Cannot happen with reserve.lua's entries; never let one block the stream.
                tracing::error!(
                    product_id = id.get(),
                    stream,
                    id = entry_id,
                    ?fields,
                    "malformed outbox entry dropped"
                );
                self.metrics.relay_product_errors.inc();
                done.push(entry_id);
                continue;
            };
            let payload = serde_json::to_vec(&message)?;
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(message.reservation_id.to_string().into());
            let confirm = ch
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &payload,
                    properties,
                )
                .await
                .context("publishing")?;
            let win = Relayed {
                reservation_id: message.reservation_id,
                at: moment_of(&fields),
            };
            in_flight.push((entry_id, message.reserved_at, win, confirm));
        }
        let mut failed = 0;
        for (entry_id, reserved_at, win, confirm) in in_flight {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => {
                    let lag = (Utc::now() - reserved_at).num_milliseconds().max(0) as f64 / 1_000.0;
                    self.metrics.relay_lag.observe(lag);
                    done.push(entry_id);
                    relayed.push(win);
                }
                Ok(other) => {
                    failed += 1;
                    tracing::warn!(
                        id = entry_id,
                        ?other,
                        "broker did not take a winner; it stays pending"
                    );
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(id = entry_id, error = %e, "no confirm for a winner; it stays pending");
                }
            }
        }
        if !done.is_empty() {
            let acked = match record_relayed(&self.db, id, &relayed).await {
                Ok(()) => self.acknowledge(&stream, &done).await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(()) => self.metrics.relay_published.inc_by(done.len() as u64),
                Err(e) => {
                    if let Some(t) = st.products.get_mut(&id) {
                        self.fail(id, t, e);
                    }
                }
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} winners were not confirmed");
        }
        Ok(())
    }

    /// `XACK` then `XDEL` of the confirmed entries (a failure leaves them pending: reclaimed
    /// and published again, which the worker's idempotence absorbs).
    async fn acknowledge(&self, stream: &str, done: &[String]) -> Result<(), ProductError> {
        let _: i64 = self
            .pool
            .next()
            .xack(stream, GROUP, done.to_vec())
            .await
            .context("acknowledging relayed entries")?;
        let _: i64 = self
            .pool
            .next()
            .xdel(stream, done.to_vec())
            .await
            .context("deleting relayed entries")?;
        Ok(())
    }
}
