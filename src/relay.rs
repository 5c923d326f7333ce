//! The outbox relay (in every `serve` process): winners recorded in the products' outbox
//! streams are published to RabbitMQ (persistent, mandatory, with publisher confirms) and
//! acknowledged in the stream only after the broker confirmed them.
//!
//! Relays share the work through one consumer group per stream. Entries left pending by a
//! relay that died are reclaimed (`XAUTOCLAIM`) after an idle bound. An entry is deleted
//! (`XDEL`) only after its `XACK`, so trimming never drops an unpublished winner. While
//! RabbitMQ is down nothing is read: winners wait in Redis.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use fred::{prelude::*, types::streams::XReadValue};
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{Broker, OrderMessage, declare_topology},
    backoff::{Backoff, sleep_or_stop},
    deps::Deps,
    domain::{ProductId, UserId},
    keys::Keys,
    metrics::Metrics,
};

/// The consumer group every relay joins.
pub const GROUP: &str = "relay";
/// Most entries read (and in flight to the broker) per stream per round.
const BATCH: u64 = 500;

/// Relay settings and handles.
pub struct Relay {
    pub pool: Pool,
    pub keys: Keys,
    pub broker: Broker,
    pub queue: String,
    pub metrics: Arc<Metrics>,
    /// Entries pending this long on any relay are taken over.
    pub claim_idle: Duration,
    /// This relay's consumer name (unique per process).
    pub consumer: String,
}

impl Relay {
    /// A relay of this deployment's outboxes, under a consumer name unique to this process.
    pub fn new(deps: &Deps, keys: Keys) -> Self {
        Self {
            pool: deps.redis.clone(),
            keys,
            broker: deps.broker.clone(),
            queue: deps.settings.amqp_queue.clone(),
            metrics: deps.metrics.clone(),
            claim_idle: deps.settings.relay_claim_idle,
            consumer: format!(
                "relay-{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
        }
    }
}

type Entry = XReadValue<String, String, String>;

/// Turns an outbox entry into the queue message.
pub fn message_of(fields: &HashMap<String, String>) -> Option<OrderMessage> {
    let ms: i64 = fields.get("t")?.parse().ok()?;
    Some(OrderMessage {
        v: OrderMessage::VERSION,
        reservation_id: fields.get("r")?.parse().ok()?,
        user_id: UserId::try_from(fields.get("u")?.as_str()).ok()?,
        product_id: ProductId::try_from(fields.get("p")?.as_str()).ok()?,
        reserved_at: DateTime::<Utc>::from_timestamp_millis(ms)?,
    })
}

impl Relay {
    /// Relays until shutdown; keeps going (with backoff) while RabbitMQ or Redis is down.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut channel: Option<Channel> = None;
        let mut groups: HashSet<String> = HashSet::new();
        let mut last_claim = Instant::now();
        let mut last_gauge = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        while !shutdown.is_cancelled() {
            if channel.as_ref().is_none_or(|c| !c.status().connected()) {
                channel = match self.open_channel().await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "relay: RabbitMQ not available; winners wait in Redis");
                        None
                    }
                };
            }
            let Some(ch) = channel.clone() else {
                sleep_or_stop(&shutdown, backoff.next_delay()).await;
                continue;
            };
            let claim = last_claim.elapsed() >= self.claim_idle / 2;
            if claim {
                last_claim = Instant::now();
            }
            match self.round(&ch, &mut groups, claim).await {
                Ok(moved) => {
                    backoff.reset();
                    if last_gauge.elapsed() >= Duration::from_secs(2) {
                        last_gauge = Instant::now();
                        self.update_gauges().await;
                    }
                    if moved == 0 {
                        sleep_or_stop(&shutdown, Duration::from_millis(5)).await;
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %format!("{e:#}"), "relay round failed; retrying in {delay:?}");
                    groups.clear();
                    sleep_or_stop(&shutdown, delay).await;
                }
            }
        }
        if let Some(ch) = channel {
            let _ = ch.close(200, "relay stopping".into()).await;
        }
        Ok(())
    }

    async fn open_channel(&self) -> anyhow::Result<Channel> {
        let conn = self
            .broker
            .connected(Duration::from_secs(1))
            .await
            .context("no RabbitMQ connection")?;
        let ch = conn.create_channel().await.context("opening a channel")?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        declare_topology(&ch, &self.queue)
            .await
            .context("declaring the queues")?;
        Ok(ch)
    }

    /// One pass over every product's outbox; returns how many winners were relayed.
    async fn round(
        &self,
        ch: &Channel,
        groups: &mut HashSet<String>,
        claim: bool,
    ) -> anyhow::Result<usize> {
        let products: Vec<i64> = self.pool.smembers(self.keys.products()).await?;
        let mut moved = 0;
        for pid in products {
            let Ok(pid) = ProductId::try_from(pid) else {
                continue;
            };
            let stream = self.keys.product(pid).outbox;
            if !groups.contains(&stream) {
                self.ensure_group(&stream).await?;
                groups.insert(stream.clone());
            }
            let mut entries: Vec<Entry> = Vec::new();
            if claim {
                let raw: Value = self
                    .pool
                    .next()
                    .xautoclaim(
                        &stream,
                        GROUP,
                        &self.consumer,
                        u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX),
                        "0-0",
                        Some(BATCH),
                        false,
                    )
                    .await?;
                let claimed = parse_autoclaim(raw)?;
                if !claimed.is_empty() {
                    tracing::info!(
                        stream,
                        count = claimed.len(),
                        "relay reclaimed idle outbox entries"
                    );
                }
                entries.extend(claimed);
            }
            let fresh: Value = self
                .pool
                .next()
                .xreadgroup(
                    GROUP,
                    &self.consumer,
                    Some(BATCH),
                    None,
                    false,
                    &stream,
                    ">",
                )
                .await?;
            entries.extend(parse_xread(fresh)?);
            if entries.is_empty() {
                continue;
            }
            moved += self.publish(ch, &stream, entries).await?;
        }
        Ok(moved)
    }

    async fn ensure_group(&self, stream: &str) -> anyhow::Result<()> {
        let created: Result<(), fred::error::Error> = self
            .pool
            .next()
            .xgroup_create(stream, GROUP, "0", true)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e).context("creating the relay group"),
        }
    }

    /// Publishes a batch with confirms kept in flight together; acks and deletes the
    /// confirmed entries. Unconfirmed ones stay pending and are reclaimed later.
    async fn publish(
        &self,
        ch: &Channel,
        stream: &str,
        entries: Vec<Entry>,
    ) -> anyhow::Result<usize> {
        self.metrics.relay_batch.observe(entries.len() as f64);
        let mut in_flight = Vec::with_capacity(entries.len());
        let mut done: Vec<String> = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let Some(message) = message_of(&fields) else {
                // Cannot happen with reserve.lua's entries; never let one block the stream.
                tracing::error!(stream, id, ?fields, "malformed outbox entry dropped");
                done.push(id);
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
            in_flight.push((id, message.reserved_at, confirm));
        }
        let mut failed = 0;
        for (id, reserved_at, confirm) in in_flight {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => {
                    let lag = (Utc::now() - reserved_at).num_milliseconds().max(0) as f64 / 1_000.0;
                    self.metrics.relay_lag.observe(lag);
                    done.push(id);
                }
                Ok(other) => {
                    failed += 1;
                    tracing::warn!(id, ?other, "broker did not take a winner; it stays pending");
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(id, error = %e, "no confirm for a winner; it stays pending");
                }
            }
        }
        if !done.is_empty() {
            let _: i64 = self.pool.next().xack(stream, GROUP, done.clone()).await?;
            let _: i64 = self.pool.next().xdel(stream, done.clone()).await?;
            self.metrics.relay_published.inc_by(done.len() as u64);
        }
        if failed > 0 {
            anyhow::bail!("{failed} winners were not confirmed");
        }
        Ok(done.len())
    }

    async fn update_gauges(&self) {
        let Ok(products) = self
            .pool
            .smembers::<Vec<i64>, _>(self.keys.products())
            .await
        else {
            return;
        };
        for pid in products {
            let Ok(id) = ProductId::try_from(pid) else {
                continue;
            };
            if let Ok(len) = self.pool.xlen::<i64, _>(self.keys.product(id).outbox).await {
                self.metrics
                    .outbox_length
                    .with_label_values(&[&pid.to_string()])
                    .set(len);
            }
        }
    }
}

/// Parses `XREADGROUP`'s answer for one stream: nil, or `[[stream, [entries]]]`.
fn parse_xread(raw: Value) -> anyhow::Result<Vec<Entry>> {
    match raw {
        Value::Null => Ok(Vec::new()),
        Value::Array(mut streams) => match streams.pop() {
            None => Ok(Vec::new()),
            Some(Value::Array(mut pair)) if pair.len() == 2 => {
                parse_entries(pair.pop().unwrap_or(Value::Null))
            }
            Some(other) => anyhow::bail!("unexpected XREADGROUP answer: {other:?}"),
        },
        // RESP3 answers a map of stream -> entries.
        Value::Map(map) => {
            let mut out = Vec::new();
            for (_, entries) in map.inner() {
                out.extend(parse_entries(entries)?);
            }
            Ok(out)
        }
        other => anyhow::bail!("unexpected XREADGROUP answer: {other:?}"),
    }
}

/// Parses `XAUTOCLAIM`'s answer: `[cursor, [entries], (deleted ids)]`.
fn parse_autoclaim(raw: Value) -> anyhow::Result<Vec<Entry>> {
    let Value::Array(mut parts) = raw else {
        anyhow::bail!("XAUTOCLAIM answered a non-array");
    };
    anyhow::ensure!(
        parts.len() >= 2,
        "XAUTOCLAIM answered {} parts",
        parts.len()
    );
    parse_entries(parts.swap_remove(1))
}

/// Parses stream entries `[[id, [field, value, ...]], ...]` (raw values: fred's typed stream
/// helpers fail on some Redis 7 answers).
fn parse_entries(raw: Value) -> anyhow::Result<Vec<Entry>> {
    let entries = match raw {
        Value::Null => return Ok(Vec::new()),
        Value::Array(entries) => entries,
        other => anyhow::bail!("stream entries are not an array: {other:?}"),
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut pair) = entry else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        // A deleted entry comes back with a nil field list.
        let fields = pair.pop().unwrap_or(Value::Null);
        let id: String = pair.pop().unwrap_or(Value::Null).convert()?;
        let mut map = HashMap::new();
        if let Value::Array(kv) = fields {
            for chunk in kv.chunks(2) {
                if let [k, v] = chunk {
                    map.insert(
                        k.clone().convert::<String>()?,
                        v.clone().convert::<String>()?,
                    );
                }
            }
        }
        out.push((id, map));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_entry_becomes_a_message() {
        let fields: HashMap<String, String> = [
            ("r", "0190a000-0000-7000-8000-000000000001"),
            ("u", "7"),
            ("p", "3"),
            ("t", "1763719200000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let m = message_of(&fields).unwrap();
        assert_eq!((m.user_id.get(), m.product_id.get()), (7, 3));
        assert_eq!(m.reserved_at.timestamp_millis(), 1_763_719_200_000);
        let mut broken = fields.clone();
        broken.insert("u".into(), "-1".into());
        assert!(message_of(&broken).is_none());
    }

    fn entry(id: &str, kv: &[&str]) -> Value {
        Value::Array(vec![
            Value::from(id),
            Value::Array(kv.iter().map(|s| Value::from(*s)).collect()),
        ])
    }

    #[test]
    fn stream_answers_decode_to_entries() {
        let entries = Value::Array(vec![
            entry("1-0", &["r", "x", "u", "7"]),
            // A deleted entry comes back with a nil field list.
            Value::Array(vec![Value::from("2-0"), Value::Null]),
        ]);
        let xread = Value::Array(vec![Value::Array(vec![
            Value::from("outbox"),
            entries.clone(),
        ])]);
        let got = parse_xread(xread).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "1-0");
        assert_eq!(got[0].1.get("u").map(String::as_str), Some("7"));
        assert!(got[1].1.is_empty());
        assert!(parse_xread(Value::Null).unwrap().is_empty());
        assert!(parse_xread(Value::from(3)).is_err());

        let claimed = parse_autoclaim(Value::Array(vec![
            Value::from("0-0"),
            entries,
            Value::Array(vec![]),
        ]))
        .unwrap();
        assert_eq!(claimed.len(), 2);
        assert!(parse_autoclaim(Value::Array(vec![Value::from("0-0")])).is_err());
        assert!(parse_autoclaim(Value::Null).is_err());
    }
}
