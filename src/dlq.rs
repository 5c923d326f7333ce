//! The dead-letter queue (`<queue>.dlq`): what the worker puts there, and the operators'
//! `seckill dlq list` / `seckill dlq replay`.
//!
//! The worker dead-letters a message itself — it publishes a copy to the DLQ with the reason in
//! the [`REASON_HEADER`] header, waits for the broker's confirm, and only then acks the
//! original — rather than `basic_reject`ing it, so the reason travels with the message and
//! nothing is lost if the worker dies in between (the original is redelivered; at worst the DLQ
//! holds it twice). Messages RabbitMQ dead-letters itself (past `x-delivery-limit`) carry no
//! such header; their reason is read from `x-death`.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::amqp::{Broker, declare_topology, dlq_name};

/// The header that carries why a message was dead-lettered, in plain words.
pub const REASON_HEADER: &str = "x-seckill-reason";

/// Headers describing a past dead-lettering, dropped when a message is replayed.
const DEATH_HEADERS: [&str; 8] = [
    REASON_HEADER,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// How long the CLI waits for RabbitMQ.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Publishes `body` to `queue` (persistent, mandatory) on a channel in confirm mode and waits
/// for the broker to take it.
async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties.with_delivery_mode(2),
        )
        .await
        .with_context(|| format!("publishing to {queue}"))?;
    match confirm
        .await
        .with_context(|| format!("waiting for {queue}'s confirm"))?
    {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => {
            anyhow::bail!("{queue} does not exist: the message came back")
        }
        Confirmation::Nack(_) => anyhow::bail!("{queue} refused the message"),
        Confirmation::NotRequested => anyhow::bail!("the channel is not in confirm mode"),
    }
}

/// Puts a copy of a message of `queue` (its body and properties) into `queue`'s DLQ with
/// `reason`, confirmed by the broker. The caller acks the original afterwards. `ch` must be in
/// confirm mode.
pub async fn dead_letter(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    reason: &str,
) -> anyhow::Result<()> {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        REASON_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    let properties = properties.clone().with_headers(headers);
    publish_confirmed(ch, &dlq_name(queue), body, properties).await
}

/// One dead-lettered message as `seckill dlq list` prints it (one JSON line each).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// The message body: its JSON if it is JSON, else its text (invalid UTF-8 replaced).
    pub body: serde_json::Value,
    /// Why it was dead-lettered, if known.
    pub reason: Option<String>,
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Why a message was dead-lettered: the worker's [`REASON_HEADER`], else RabbitMQ's own
/// `x-death` reason (e.g. `delivery_limit`).
pub fn reason_of(headers: Option<&FieldTable>) -> Option<String> {
    let headers = headers?.inner();
    if let Some(reason) = headers.get(REASON_HEADER).and_then(text) {
        return Some(reason);
    }
    let AMQPValue::FieldArray(deaths) = headers.get("x-death")? else {
        return None;
    };
    deaths.as_slice().iter().find_map(|death| match death {
        AMQPValue::FieldTable(t) => t
            .inner()
            .get("reason")
            .and_then(text)
            .map(|r| format!("dead-lettered by RabbitMQ: {r}")),
        _ => None,
    })
}

impl DeadLetter {
    /// Describes a dead-lettered message.
    pub fn new(body: &[u8], headers: Option<&FieldTable>) -> Self {
        let body = serde_json::from_slice(body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(body).into_owned())
        });
        Self {
            body,
            reason: reason_of(headers),
        }
    }
}

/// The properties a replayed message is published with: the original's, without the headers
/// of its dead-lettering.
pub fn replay_properties(properties: &BasicProperties) -> BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties.clone();
    };
    let kept: BTreeMap<ShortString, AMQPValue> = headers
        .inner()
        .iter()
        .filter(|(k, _)| !DEATH_HEADERS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    properties.clone().with_headers(FieldTable::from(kept))
}

/// The CLI's session with one DLQ: a one-off connection, a channel (the topology declared,
/// publisher confirms on), and how many messages the DLQ held when it opened.
struct Session {
    ch: Channel,
    shutdown: CancellationToken,
    dlq: String,
    depth: usize,
}

impl Session {
    async fn open(amqp_url: &str, queue: &str) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let broker = Broker::start(amqp_url, shutdown.clone());
        let dlq = dlq_name(queue);
        let opened = async {
            let conn = broker
                .connected(CONNECT_WAIT)
                .await
                .context("RabbitMQ is not reachable (SECKILL_AMQP_URL)")?;
            let ch = conn.create_channel().await.context("opening a channel")?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .context("enabling publisher confirms")?;
            declare_topology(&conn, queue)
                .await
                .context("declaring the queues")?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let depth = ch
                .queue_declare(dlq.as_str().into(), passive, FieldTable::default())
                .await
                .context("reading the dead-letter queue's depth")?
                .message_count();
            anyhow::Ok((ch, depth))
        }
        .await;
        match opened {
            Ok((ch, depth)) => Ok(Self {
                ch,
                shutdown,
                dlq,
                depth: usize::try_from(depth).unwrap_or(usize::MAX),
            }),
            Err(e) => {
                shutdown.cancel();
                Err(e)
            }
        }
    }

    /// The next message of the DLQ, taken unacked (it returns to the DLQ when the channel
    /// closes unless acked).
    async fn take(&self) -> anyhow::Result<Option<Delivery>> {
        let got = self
            .ch
            .basic_get(self.dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .context("reading the dead-letter queue")?;
        Ok(got.map(|m| m.delivery))
    }

    /// Closes the channel (returning every message taken and not acked) and the connection.
    async fn close(self) {
        let _ = self.ch.close(200, "done".into()).await;
        self.shutdown.cancel();
        // Let the connection supervisor close the connection cleanly.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Up to `limit` dead-lettered messages of `queue`, left in the DLQ.
pub async fn list(amqp_url: &str, queue: &str, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let session = Session::open(amqp_url, queue).await?;
    let mut out = Vec::new();
    let result = async {
        for _ in 0..limit.min(session.depth) {
            let Some(d) = session.take().await? else {
                break;
            };
            out.push(DeadLetter::new(&d.data, d.properties.headers().as_ref()));
        }
        anyhow::Ok(())
    }
    .await;
    session.close().await;
    result.map(|()| out)
}

/// Moves up to `limit` (default: all it holds now) messages from `queue`'s DLQ back to
/// `queue`: each is published with a confirm and only then acked in the DLQ. Messages
/// dead-lettered again while this runs are not replayed a second time. Returns how many moved.
pub async fn replay(amqp_url: &str, queue: &str, limit: Option<usize>) -> anyhow::Result<usize> {
    let session = Session::open(amqp_url, queue).await?;
    let mut moved = 0;
    let result = async {
        for _ in 0..limit.unwrap_or(usize::MAX).min(session.depth) {
            let Some(d) = session.take().await? else {
                break;
            };
            let properties = replay_properties(&d.properties);
            publish_confirmed(&session.ch, queue, &d.data, properties).await?;
            session
                .ch
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .context("acking the replayed message in the dead-letter queue")?;
            moved += 1;
        }
        anyhow::Ok(())
    }
    .await;
    session.close().await;
    result.map(|()| moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(k.into(), v);
        }
        t
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn a_dead_letter_shows_its_body_and_reason() {
        let ours = table(vec![(
            REASON_HEADER,
            long("permanent database error 23503"),
        )]);
        let d = DeadLetter::new(br#"{"v":1}"#, Some(&ours));
        assert_eq!(d.body, serde_json::json!({"v": 1}));
        assert_eq!(d.reason.as_deref(), Some("permanent database error 23503"));
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"body": {"v": 1}, "reason": "permanent database error 23503"})
        );

        let death = table(vec![("reason", long("delivery_limit"))]);
        let rabbit = table(vec![(
            "x-death",
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        )]);
        let d = DeadLetter::new(b"{not json", Some(&rabbit));
        assert_eq!(d.body, serde_json::json!("{not json"));
        assert_eq!(
            d.reason.as_deref(),
            Some("dead-lettered by RabbitMQ: delivery_limit")
        );
        assert_eq!(DeadLetter::new(b"x", None).reason, None);
    }

    #[test]
    fn a_replayed_message_loses_the_headers_of_its_dead_lettering_only() {
        let headers = table(vec![
            (REASON_HEADER, long("why")),
            ("x-death", AMQPValue::FieldArray(Vec::new().into())),
            ("x-first-death-reason", long("rejected")),
            ("x-custom", long("kept")),
        ]);
        let props = BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(headers);
        let replayed = replay_properties(&props);
        assert_eq!(
            replayed.message_id().as_ref().map(|m| m.as_str()),
            Some("m1")
        );
        let kept: Vec<&str> = replayed
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(kept, ["x-custom"]);
        let bare = BasicProperties::default();
        assert_eq!(replay_properties(&bare), bare);
    }
}
