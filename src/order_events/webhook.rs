//! Order events to `SECKILL_WEBHOOK_URL`: a `POST` of the event's JSON, signed in the header
//!
//! ```text
//! Seckill-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" with SECKILL_WEBHOOK_SECRET>
//! ```
//!
//! (the scheme Stripe's webhooks use: the timestamp is signed with the body, so a receiver
//! that rejects a `t` older than its tolerance — docs/events.md says 5 minutes — rejects
//! replays). A 2xx acknowledges; anything else, or no answer within [`TIMEOUT`], is retried
//! with exponential backoff and jitter ([`retry_after`]: 1 s doubling to at most an hour, so a
//! receiver down for hours loses nothing and is not hammered). Every attempt is recorded
//! (`webhook_attempt`: status, latency, error). An event is sent only once every earlier event
//! of its order was delivered, so one order's events arrive in order; different orders'
//! events go out together.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use futures_util::{StreamExt, stream};
use hmac::{Hmac, Mac};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, TransactionTrait};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{BATCH, Destination, Event, backlog, claim, mark_sent};
use crate::{
    backoff::{Backoff, sleep_or_stop},
    config::WebhookSettings,
    deps::Deps,
    metrics::Metrics,
};

/// The longest a delivery waits for the receiver's answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries in flight at once (one per order at most).
const CONCURRENCY: usize = 16;
/// How long an idle dispatcher waits before it looks again.
const IDLE: Duration = Duration::from_millis(250);
/// How often the backlog gauges are refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3_600);

/// The `Seckill-Signature` header's value for `body` sent at `t` (unix seconds).
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// How long to wait after the `attempts`-th failed attempt: 2^(attempts-1) s, at most an hour,
/// then ±20% jitter so that receivers coming back are not met by every sender at once.
pub fn retry_after(attempts: i32, jitter: f64) -> Duration {
    let exp = attempts.clamp(1, 30) - 1;
    let base = Duration::from_secs(1u64 << exp.min(20)).min(MAX_BACKOFF);
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

/// What one attempt got.
#[derive(Debug)]
struct Attempt {
    event_id: Uuid,
    status: Option<u16>,
    latency: Duration,
    error: Option<String>,
}

impl Attempt {
    fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// The webhook dispatcher of one `worker` process.
pub struct Webhook {
    db: DatabaseConnection,
    url: String,
    secret: SecretString,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl Webhook {
    pub fn new(deps: &Deps, settings: &WebhookSettings) -> anyhow::Result<Self> {
        let client = crate::tls::http_client()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("seckill/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the webhook client")?;
        Ok(Self {
            db: deps.db.clone(),
            url: settings.url.clone(),
            secret: settings.secret.clone(),
            client,
            metrics: deps.metrics.clone(),
        })
    }

    /// Delivers until `shutdown`; Postgres errors back off and retry.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut gauge_at: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            if gauge_at.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
                gauge_at = Some(tokio::time::Instant::now());
                if let Ok((n, age)) = backlog(&self.db, Destination::Webhook).await {
                    self.metrics.webhook_undelivered.set(n);
                    self.metrics.webhook_oldest_undelivered.set(age);
                }
            }
            match self.deliver_once().await {
                Ok(n) => {
                    backoff.reset();
                    if n < BATCH as usize {
                        sleep_or_stop(&shutdown, IDLE).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "order events: webhook dispatcher failed; retrying");
                    sleep_or_stop(&shutdown, backoff.next_delay()).await;
                }
            }
        }
        Ok(())
    }

    /// Claims the events due, sends them (one per order, [`CONCURRENCY`] at once), and records
    /// each attempt and each delivery in the claiming transaction; how many were sent.
    pub async fn deliver_once(&self) -> anyhow::Result<usize> {
        let txn = self.db.begin().await.context("beginning a batch")?;
        let events = claim(&txn, Destination::Webhook).await?;
        if events.is_empty() {
            txn.commit().await.ok();
            return Ok(0);
        }
        let sends: Vec<_> = events.iter().map(|e| self.send(e)).collect();
        let attempts: Vec<Attempt> = stream::iter(sends)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let delivered: Vec<Uuid> = attempts
            .iter()
            .filter(|a| a.delivered())
            .map(|a| a.event_id)
            .collect();
        for a in &attempts {
            record_attempt(&txn, a).await?;
            let result = if a.delivered() { "delivered" } else { "failed" };
            self.metrics
                .webhook_deliveries
                .with_label_values(&[result])
                .inc();
            if a.status.is_some() {
                self.metrics
                    .webhook_latency
                    .observe(a.latency.as_secs_f64());
            }
        }
        mark_sent(&txn, Destination::Webhook, &delivered).await?;
        txn.commit().await.context("recording webhook deliveries")?;
        for a in attempts.iter().filter(|a| !a.delivered()) {
            tracing::warn!(event_id = %a.event_id, status = ?a.status, error = ?a.error, "webhook delivery failed; it will be retried");
        }
        Ok(events.len())
    }

    async fn send(&self, e: &Event) -> Attempt {
        let started = std::time::Instant::now();
        let body = match serde_json::to_vec(&e.body) {
            Ok(b) => b,
            Err(err) => {
                return Attempt {
                    event_id: e.event_id,
                    status: None,
                    latency: started.elapsed(),
                    error: Some(format!("encoding: {err}")),
                };
            }
        };
        let t = chrono::Utc::now().timestamp();
        let sent = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                "Seckill-Signature",
                signature(self.secret.expose_secret(), t, &body),
            )
            .header("Seckill-Event-Id", e.event_id.to_string())
            .header("Seckill-Event-Type", e.r#type.as_str())
            .body(body)
            .send()
            .await;
        let latency = started.elapsed();
        match sent {
            Ok(res) => {
                let status = res.status().as_u16();
                // Read (a little of) the answer so the connection can be reused.
                let _ = res.bytes().await;
                Attempt {
                    event_id: e.event_id,
                    status: Some(status),
                    latency,
                    error: (!(200..300).contains(&status)).then(|| format!("answered {status}")),
                }
            }
            Err(err) => Attempt {
                event_id: e.event_id,
                status: None,
                latency,
                error: Some(if err.is_timeout() {
                    format!("no answer within {} s", TIMEOUT.as_secs())
                } else if err.is_connect() {
                    "could not connect".to_owned()
                } else {
                    "the request failed".to_owned()
                }),
            },
        }
    }
}

/// Records one attempt; a failed one also moves the event's next attempt back.
async fn record_attempt(txn: &impl ConnectionTrait, a: &Attempt) -> anyhow::Result<()> {
    let latency_ms = i32::try_from(a.latency.as_millis()).unwrap_or(i32::MAX);
    let status = a.status.map(i32::from);
    // The attempt number and the backoff come from the event's own count, in one statement.
    let wait_ms: Vec<i64> = (1..=30)
        .map(|n| retry_after(n, fastrand::f64()).as_millis() as i64)
        .collect();
    txn.execute_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        "with e as ( \
           update order_event set attempts = attempts + 1, \
             last_error = $4, \
             next_attempt_at = case when $5 then next_attempt_at \
               else now() + make_interval(secs => ($6::bigint[])[least(attempts + 1, 30)] / 1000.0) end \
           where event_id = $1 returning attempts) \
         insert into webhook_attempt (event_id, attempt, status, latency_ms, error) \
         select $1, e.attempts, $2, $3, $4 from e",
        [
            a.event_id.into(),
            status.into(),
            latency_ms.into(),
            a.error.clone().into(),
            a.delivered().into(),
            wait_ms.into(),
        ],
    ))
    .await
    .context("recording a webhook attempt")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_the_timestamp_a_dot_and_the_body() {
        // Computed independently: printf '%s' '1700000000.{"a":1}' |
        //   openssl dgst -sha256 -hmac 'whsec-test-0123456789abcdef0123456789'
        assert_eq!(
            signature(
                "whsec-test-0123456789abcdef0123456789",
                1_700_000_000,
                br#"{"a":1}"#
            ),
            "t=1700000000,v1=9f480abfe284905574e1dc77f6a35e530872c5c0eeb739e6939e9dd39fb03d1e"
        );
    }

    /// docs/events.md's example delivery is one seckill would sign (scripts/check-docs runs its
    /// shell check on the same example).
    #[test]
    fn the_documented_example_is_signed_as_seckill_signs() {
        let doc = include_str!("../../docs/events.md");
        let value = |name: &str| {
            let line = doc
                .lines()
                .find(|l| l.starts_with(&format!("{name}='")))
                .unwrap_or_else(|| panic!("docs/events.md has no {name}= line"));
            let rest = &line[name.len() + 2..];
            rest[..rest.find('\'').unwrap_or(rest.len())].to_owned()
        };
        let (secret, header, body) = (value("SECRET"), value("HEADER"), value("BODY"));
        let t: i64 = header[2..header.find(',').unwrap()].parse().unwrap();
        assert_eq!(signature(&secret, t, body.as_bytes()), header);
        // And the body is what seckill sends: compact JSON with its keys in order.
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), body);
    }

    #[test]
    fn retries_back_off_from_a_second_to_an_hour_with_jitter() {
        assert_eq!(retry_after(1, 0.5), Duration::from_secs(1));
        assert_eq!(retry_after(2, 0.5), Duration::from_secs(2));
        assert_eq!(retry_after(11, 0.5), Duration::from_secs(1_024));
        assert_eq!(retry_after(13, 0.5), Duration::from_secs(3_600));
        assert_eq!(retry_after(500, 0.5), Duration::from_secs(3_600));
        assert_eq!(retry_after(3, 0.0), Duration::from_millis(3_200));
        assert_eq!(retry_after(3, 1.0), Duration::from_millis(4_800));
    }
}
