//! The RabbitMQ connection, kept alive in the background.
//!
//! The service starts (and answers `/readyz` with 503) while RabbitMQ is down; a supervisor
//! reconnects with backoff and publishes each new connection to whoever watches it (the relay,
//! the worker), so they re-create their channels after a broker restart.

use std::{sync::Arc, time::Duration};

use lapin::{Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, sleep_or_stop};

/// Heartbeat (seconds) added to the URL unless it sets one.
const HEARTBEAT_SECS: u16 = 10;
/// A connection attempt gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A shared, self-healing AMQP connection.
#[derive(Clone)]
pub struct Broker {
    rx: watch::Receiver<Option<Arc<Connection>>>,
}

impl Broker {
    /// Starts the supervisor; returns at once (the first connection arrives in the background).
    pub fn start(url: &str, shutdown: CancellationToken) -> Self {
        let url = with_defaults(url);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(supervise(url, tx, shutdown));
        Self { rx }
    }

    /// The current connection, if one is up.
    pub fn current(&self) -> Option<Arc<Connection>> {
        self.rx
            .borrow()
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// Waits for a connected connection (or `None` when shutting down / timed out).
    pub async fn connected(&self, wait: Duration) -> Option<Arc<Connection>> {
        let mut rx = self.rx.clone();
        let found = tokio::time::timeout(wait, async {
            loop {
                if let Some(c) = rx
                    .borrow_and_update()
                    .as_ref()
                    .filter(|c| c.status().connected())
                {
                    return Some(c.clone());
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        found.ok().flatten()
    }

    /// A receiver that changes whenever a new connection is made.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Connection>>> {
        self.rx.clone()
    }
}

fn with_defaults(url: &str) -> String {
    let mut url = url.to_owned();
    let sep = if url.contains('?') { '&' } else { '?' };
    if !url.contains("heartbeat=") {
        url.push_str(&format!("{sep}heartbeat={HEARTBEAT_SECS}"));
    }
    url
}

async fn supervise(
    url: String,
    tx: watch::Sender<Option<Arc<Connection>>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let healthy = tx.borrow().as_ref().is_some_and(|c| c.status().connected());
        if !healthy {
            let attempt = tokio::time::timeout(
                CONNECT_TIMEOUT,
                Connection::connect(
                    &url,
                    ConnectionProperties::default().with_connection_name("seckill".into()),
                ),
            );
            let failed = tokio::select! {
                _ = shutdown.cancelled() => break,
                result = attempt => match result {
                    Ok(Ok(conn)) => {
                        tracing::info!("connected to RabbitMQ");
                        tx.send_replace(Some(Arc::new(conn)));
                        backoff.reset();
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("timed out".to_owned()),
                },
            };
            if let Some(why) = failed {
                let delay = backoff.next_delay();
                let (host, port) = crate::db::endpoint(&url, 5672);
                tracing::warn!(error = %why, "SECKILL_AMQP_URL: cannot connect to RabbitMQ at {host}:{port}; retrying in {delay:?}");
                sleep_or_stop(&shutdown, delay).await;
                continue;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    let current = tx.send_replace(None);
    if let Some(conn) = current {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), conn.close(200, "shutdown".into())).await;
    }
}

/// The orders message: one winner, versioned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderMessage {
    /// Schema version (1).
    pub v: u32,
    pub reservation_id: uuid::Uuid,
    pub user_id: crate::domain::UserId,
    pub product_id: crate::domain::ProductId,
    pub reserved_at: chrono::DateTime<chrono::Utc>,
}

impl OrderMessage {
    pub const VERSION: u32 = 1;

    /// Parses a delivery body; anything else (other versions included) is poison.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let m: Self = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if m.v != Self::VERSION {
            return Err(format!("unsupported schema version {}", m.v));
        }
        Ok(m)
    }
}

/// The dead-letter queue of `queue`.
pub fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Messages ready in `queue` and in its dead-letter queue, by passive declares on `ch`
/// (`None` for one that could not be read).
pub async fn queue_depths(ch: &lapin::Channel, queue: &str) -> [Option<u32>; 2] {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut depths = [None; 2];
    for (depth, name) in depths.iter_mut().zip([queue.to_owned(), dlq_name(queue)]) {
        *depth = ch
            .queue_declare(
                name.as_str().into(),
                passive,
                lapin::types::FieldTable::default(),
            )
            .await
            .ok()
            .map(|q| q.message_count());
    }
    depths
}

impl Broker {
    /// [`queue_depths`] on a channel of its own, each step bounded by a second: what the
    /// operators' console shows (a `serve` process's `seckill_queue_depth` is 0, only workers
    /// set it).
    pub async fn queue_depths(&self, queue: &str) -> [Option<u32>; 2] {
        let Some(conn) = self.current() else {
            return [None; 2];
        };
        let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(1), conn.create_channel()).await
        else {
            return [None; 2];
        };
        let depths = tokio::time::timeout(Duration::from_secs(1), queue_depths(&ch, queue))
            .await
            .unwrap_or([None; 2]);
        let _ = tokio::time::timeout(Duration::from_secs(1), ch.close(200, "depths".into())).await;
        depths
    }
}

/// Redeliveries before RabbitMQ dead-letters a message. A valid winner is redelivered each time
/// a worker's connection drops while it holds it (a restart, a network fault): 5 sent valid
/// winners to the DLQ after five such drops. 20 (RabbitMQ 4's own default) keeps a poison
/// message from cycling for ever while outlasting any realistic run of drops; the worker
/// counts every redelivery (`seckill_worker_redeliveries_total`).
pub const DELIVERY_LIMIT: i32 = 20;

/// Held while this process declares queues: see [`declare_topology`].
static DECLARING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Declares (idempotently) the durable quorum queue with at-least-once dead-lettering to
/// `<queue>.dlq`, and the dead-letter queue itself, on a channel of its own (closed after).
/// A queue an older seckill declared with other arguments (a lower `x-delivery-limit`) is
/// used as it is, with a warning: RabbitMQ cannot change a queue's arguments, only a policy
/// can (`rabbitmqctl set_policy … '{"delivery-limit":20}' --apply-to queues`).
///
/// One declaration at a time per process. RabbitMQ (before 4.1) records a new quorum queue
/// before its Raft process exists and answers `declare-ok` to whoever created it only once
/// that process runs, but at once to a declaration that finds the record. A `basic.consume`
/// after such an early answer can reach the queue before its process exists: the broker then
/// closes the whole connection with 541 INTERNAL_ERROR (`{badmatch,{error,noproc}}` in its
/// log). Without the lock the relay, the recovery watch and every worker consumer of one
/// process declare at once at start, and a first start against a new queue hit that in most
/// runs. A passive declare does not tell a ready queue from one still starting (the broker
/// answers `0` messages either way; tried: still 2–4 of 6 first starts), so the creator's
/// answer is the only sure sign. Processes that start together against a new queue can still
/// race one another (measured: 5 of 56 rounds of two workers and a serve started at once);
/// the consumer that hits it logs lapin's error and reconnects.
pub async fn declare_topology(conn: &Connection, queue: &str) -> lapin::Result<lapin::Queue> {
    use lapin::{
        options::QueueDeclareOptions,
        types::{AMQPValue, FieldTable, LongString},
    };
    let _one_at_a_time = DECLARING.lock().await;
    let channel = &conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dlq = dlq_name(queue);
    let mut dlq_args = FieldTable::default();
    dlq_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(dlq.as_str().into(), durable, dlq_args)
        .await?;

    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(DELIVERY_LIMIT),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dlq.as_str())),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString(LongString::from("at-least-once")),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let declared = match channel.queue_declare(queue.into(), durable, args).await {
        Err(e) if is_precondition_failed(&e) => {
            // The broker closed that channel: look at the queue as it is on a fresh one.
            let ch = conn.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let found = ch
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await;
            let _ = ch.close(200, "declared".into()).await;
            tracing::warn!(
                queue,
                delivery_limit = DELIVERY_LIMIT,
                "the orders queue exists with other arguments (an older seckill declared it, with x-delivery-limit 5): using it as it is; raise its delivery limit with a policy"
            );
            found
        }
        other => other,
    };
    let _ = channel.close(200, "declared".into()).await;
    declared
}

/// RabbitMQ's 406 PRECONDITION_FAILED: a declaration whose arguments differ from the queue's.
fn is_precondition_failed(e: &lapin::Error) -> bool {
    e.to_string().contains("PRECONDITION_FAILED")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_messages_are_strict_and_versioned() {
        let ok = br#"{"v":1,"reservation_id":"0190a000-0000-7000-8000-000000000001","user_id":7,"product_id":3,"reserved_at":"2026-11-21T10:00:00Z"}"#;
        let m = OrderMessage::parse(ok).unwrap();
        assert_eq!(m.user_id.get(), 7);
        for bad in [
            &br#"{"v":2,"reservation_id":"0190a000-0000-7000-8000-000000000001","user_id":7,"product_id":3,"reserved_at":"2026-11-21T10:00:00Z"}"#[..],
            br#"{"v":1,"reservation_id":"x","user_id":7,"product_id":3,"reserved_at":"2026-11-21T10:00:00Z"}"#,
            br#"{"v":1,"reservation_id":"0190a000-0000-7000-8000-000000000001","user_id":0,"product_id":3,"reserved_at":"2026-11-21T10:00:00Z"}"#,
            b"not json",
        ] {
            assert!(OrderMessage::parse(bad).is_err());
        }
        assert_eq!(
            OrderMessage::parse(&serde_json::to_vec(&m).unwrap()).unwrap(),
            m
        );
    }
}
