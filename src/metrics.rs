//! Prometheus metrics an operator would page on, served at `/metrics` on the operators' listener.
//!
//! Ours are named `seckill_*`; the process's own (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_start_time_seconds`, …) keep
//! the names every exporter gives them, so the usual dashboards and alerts apply unchanged.

use std::{
    collections::BTreeMap,
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{
    build_info, domain::ProductId, durability::Replication, rejections::Cause,
    reservations::Outcome,
};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The dependencies `/readyz` checks, as the `dependency` label of
/// [`Metrics::dependency_ready`].
pub const DEPENDENCIES: [&str; 3] = ["redis", "rabbitmq", "postgres"];

/// Every metric of one process.
pub struct Metrics {
    /// Ours, each name prefixed `seckill_`.
    registry: Registry,
    /// The process collector's, unprefixed (`process_*`).
    process: Registry,
    /// Always 1, labelled with the version and git commit built ([`build_info`]).
    pub build_info: IntGaugeVec,
    /// 1 while a dependency passes its readiness check, else 0, by `dependency`
    /// ([`DEPENDENCIES`]); Redis must also be as durable as `SECKILL_REDIS_DURABILITY` asks.
    pub dependency_ready: IntGaugeVec,
    pub http_requests: IntCounterVec,
    pub http_latency: HistogramVec,
    pub decisions: IntCounterVec,
    pub soldout_cache_hits: IntCounter,
    pub ip_limited: IntCounter,
    /// Open connections on the shoppers' listener.
    pub connections_open: IntGauge,
    /// Connections refused over a cap, by `reason`: `per_ip` or `total`.
    pub connections_refused: IntCounterVec,
    pub body_timeouts: IntCounter,
    pub relay_published: IntCounter,
    pub relay_batch: Histogram,
    pub reserve_batch: Histogram,
    pub relay_lag: Histogram,
    pub outbox_length: IntGaugeVec,
    /// A waiting room's figures at this process's last admission pass, by product and figure
    /// (`in_room`, `admitted`, `undecided`).
    pub room: IntGaugeVec,
    /// Products the relay tracks (preheated, not retired) and the ones it reads (live or
    /// draining).
    pub relay_products: IntGauge,
    pub relay_reading: IntGauge,
    /// Read, claim or acknowledge steps of one product's outbox that failed (that product is
    /// backed off alone).
    pub relay_product_errors: IntCounter,
    /// Products whose outbox the relay is backing off from.
    pub relay_products_failing: IntGauge,
    /// Sales retired from Redis (their keys expire).
    pub retired: IntCounter,
    /// Winners Postgres had decided that Redis still called pending (a lost status write).
    pub pending_settled: IntCounter,
    /// Fetches of the shoppers' JWKS, by outcome (`ok`, `failed`).
    pub jwks_fetches: IntCounterVec,
    /// Keys of the shoppers' JWKS held.
    pub jwks_keys: IntGauge,
    pub queue_depth: IntGauge,
    pub dlq_depth: IntGauge,
    pub worker_batch: Histogram,
    pub persist_latency: Histogram,
    pub orders_persisted: IntCounter,
    pub dead_lettered: IntCounter,
    /// Wins the worker could not turn into orders, by [`Cause`] (only after Redis lost data).
    pub rejected: IntCounterVec,
    pub expirations: IntCounter,
    pub releases: IntCounterVec,
    pub recovering: IntGauge,
    pub recoveries: IntCounter,
    /// Times this process found a product's Redis state behind a moment seen outside Redis.
    pub rollbacks: IntCounter,
    /// Winners of ended sales that left Redis and are not orders or rejections (the sweeper's
    /// last retirement pass): they keep their sale from retiring.
    pub ended_unpersisted: IntGauge,
    /// Deliveries the worker got a second time (or more): its connection dropped while it
    /// held them. Past `x-delivery-limit` RabbitMQ dead-letters a message.
    pub worker_redeliveries: IntCounter,
    pub durability_wait_timeouts: IntCounter,
    pub unreplicated_wins: IntCounter,
    /// Statements sent to Postgres by the application pool, by [`classify_sql`].
    pub db_queries: IntCounterVec,
    /// Rounds of `/readyz` dependency checks actually made (the rest were answered from memory).
    pub readiness_checks: IntCounter,
    /// Event streams open in this process (exact: counted by the streams' guards).
    pub sse_open: IntGauge,
    /// Event streams refused, by the limit that refused them (`per_user`, `process`).
    pub sse_refused: IntCounterVec,
    /// Times an open event stream woke to read its reservation again (its own status event,
    /// or a resync after the pub/sub subscription lost messages).
    pub sse_wakeups: IntCounter,
    /// Resyncs: every open stream woken (spread over time) after the subscription lost messages.
    pub sse_resyncs: IntCounter,
    /// Order events published to the events exchange (confirmed by RabbitMQ), by `type`.
    pub events_published: IntCounterVec,
    /// Order events not yet published to the exchange (last seen by this process's dispatcher).
    pub events_unpublished: IntGauge,
    /// Webhook deliveries by `result` (`delivered`, `failed`: a non-2xx answer or none).
    pub webhook_deliveries: IntCounterVec,
    /// Order events not yet delivered to the webhook (last seen), and the age in seconds of the
    /// oldest of them: the figure to page on.
    pub webhook_undelivered: IntGauge,
    pub webhook_oldest_undelivered: Gauge,
    /// Time from sending an event to the webhook's answer.
    pub webhook_latency: Histogram,
    /// `decisions` children resolved once, in [`Outcome::index`] order (the purchase path
    /// counts without a label lookup).
    decision_counters: Vec<IntCounter>,
    /// The same decisions by product, in memory only (never a label: see [`ProductDecisions`]).
    pub product_decisions: ProductDecisions,
}

/// Decisions by outcome, counted since this process started, in [`Outcome::LABELS`] order.
pub type DecisionCounts = [u64; Outcome::LABELS.len()];

/// This process's purchase decisions per product, for the operators' console
/// (`GET /api/v1/admin/overview`), which turns two readings a second apart into decisions per
/// second. Kept in memory and never exported as a Prometheus label (a product id is an
/// unbounded label value; see docs/hostile-traffic.md). Only products that exist are decided,
/// and at most [`Self::CAPACITY`] are tracked: past it the oldest (lowest id) is forgotten.
#[derive(Default)]
pub struct ProductDecisions {
    by_product: RwLock<BTreeMap<ProductId, [AtomicU64; Outcome::LABELS.len()]>>,
}

impl ProductDecisions {
    pub const CAPACITY: usize = 1024;

    /// Counts one decision on `product`: once it is tracked, an atomic add under a read lock.
    pub fn record(&self, product: ProductId, outcome: &Outcome) {
        let i = outcome.index();
        if let Ok(map) = self.by_product.read()
            && let Some(counters) = map.get(&product)
        {
            if let Some(c) = counters.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let Ok(mut map) = self.by_product.write() else {
            return;
        };
        if !map.contains_key(&product) && map.len() >= Self::CAPACITY {
            map.pop_first();
        }
        if let Some(c) = map.entry(product).or_default().get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts of `product` so far (all zero if this process decided none).
    pub fn counts(&self, product: ProductId) -> DecisionCounts {
        let mut out = [0; Outcome::LABELS.len()];
        if let Ok(map) = self.by_product.read()
            && let Some(counters) = map.get(&product)
        {
            for (o, c) in out.iter_mut().zip(counters) {
                *o = c.load(Ordering::Relaxed);
            }
        }
        out
    }
}

fn buckets_latency() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ]
}

fn buckets_size() -> Vec<f64> {
    vec![
        1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
    ]
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new_custom(Some("seckill".into()), None)?;
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let hist_vec = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        };
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        let m = Self {
            build_info: IntGaugeVec::new(
                Opts::new(
                    "build_info",
                    "Always 1: the version and git commit this binary was built from",
                ),
                &["version", "commit"],
            )?,
            dependency_ready: IntGaugeVec::new(
                Opts::new(
                    "dependency_ready",
                    "1 if the dependency passed its last readiness check (Redis: reachable and as durable as SECKILL_REDIS_DURABILITY asks), else 0",
                ),
                &["dependency"],
            )?,
            http_requests: counter_vec(
                "http_requests_total",
                "HTTP requests by route, method and status",
                &["route", "method", "status"],
            )?,
            http_latency: hist_vec(
                "http_request_duration_seconds",
                "HTTP latency by route",
                &["route"],
                buckets_latency(),
            )?,
            decisions: counter_vec(
                "reservation_decisions_total",
                "Purchase decisions by outcome",
                &["outcome"],
            )?,
            soldout_cache_hits: IntCounter::new(
                "soldout_cache_hits_total",
                "Purchases answered sold_out from memory, without Redis",
            )?,
            ip_limited: IntCounter::new(
                "ip_rate_limited_total",
                "Requests refused by the per-IP limit",
            )?,
            connections_open: IntGauge::new(
                "connections_open",
                "Open connections on the shoppers' listener",
            )?,
            connections_refused: counter_vec(
                "connections_refused_total",
                "Connections answered 429/503 and closed because a connection cap was reached",
                &["reason"],
            )?,
            body_timeouts: IntCounter::new(
                "body_timeouts_total",
                "Requests answered 408 because their body did not arrive in time",
            )?,
            relay_published: IntCounter::new(
                "relay_published_total",
                "Winners confirmed by RabbitMQ and acknowledged in the outbox",
            )?,
            reserve_batch: hist(
                "reserve_batch_size",
                "Purchase attempts decided per reserve script call",
                buckets_size(),
            )?,
            relay_batch: hist(
                "relay_batch_size",
                "Outbox entries per relay batch",
                buckets_size(),
            )?,
            relay_lag: hist(
                "relay_lag_seconds",
                "Time from winning to broker confirm",
                buckets_latency(),
            )?,
            outbox_length: IntGaugeVec::new(
                Opts::new(
                    "outbox_length",
                    "Outbox entries not yet relayed, by product",
                ),
                &["product"],
            )?,
            room: IntGaugeVec::new(
                Opts::new(
                    "room_shoppers",
                    "A waiting room's shoppers by product and figure: in_room (joined), admitted (places admitted so far), undecided (admitted, not yet bought, admission running)",
                ),
                &["product", "figure"],
            )?,
            relay_products: IntGauge::new(
                "relay_products",
                "Products the relay tracks: preheated and not retired",
            )?,
            relay_reading: IntGauge::new(
                "relay_products_read",
                "Products whose outbox the relay reads: sale live, or winners not yet relayed",
            )?,
            relay_product_errors: IntCounter::new(
                "relay_product_errors_total",
                "Failed reads, claims or acknowledgements of one product's outbox (that product is backed off alone)",
            )?,
            relay_products_failing: IntGauge::new(
                "relay_products_failing",
                "Products whose outbox the relay is backing off from after an error",
            )?,
            retired: IntCounter::new(
                "products_retired_total",
                "Ended, drained sales whose Redis keys were given an expiry",
            )?,
            jwks_fetches: counter_vec(
                "jwks_fetches_total",
                "Fetches of the shoppers' JWKS (SECKILL_JWT_JWKS_URL), by outcome",
                &["outcome"],
            )?,
            jwks_keys: IntGauge::new("jwks_keys", "Keys of the shoppers' JWKS held")?,
            pending_settled: IntCounter::new(
                "pending_settled_total",
                "Winners Postgres had decided that Redis still called pending (their status write was lost), recorded again",
            )?,
            dlq_depth: IntGauge::new("dlq_depth", "Messages in the dead-letter queue (last seen)")?,
            queue_depth: IntGauge::new(
                "queue_depth",
                "Messages ready in the orders queue (last seen)",
            )?,
            worker_batch: hist(
                "worker_batch_size",
                "Deliveries persisted per transaction",
                buckets_size(),
            )?,
            persist_latency: hist(
                "worker_persist_seconds",
                "Time to persist one batch",
                buckets_latency(),
            )?,
            orders_persisted: IntCounter::new("orders_persisted_total", "Orders inserted")?,
            events_published: IntCounterVec::new(
                Opts::new(
                    "events_published_total",
                    "Order events published to the events exchange and confirmed, by type",
                ),
                &["type"],
            )?,
            events_unpublished: IntGauge::new(
                "events_unpublished",
                "Order events not yet published to the events exchange (last seen)",
            )?,
            webhook_deliveries: IntCounterVec::new(
                Opts::new(
                    "webhook_deliveries_total",
                    "Webhook deliveries of order events, by result (delivered, failed)",
                ),
                &["result"],
            )?,
            webhook_undelivered: IntGauge::new(
                "webhook_undelivered",
                "Order events not yet delivered to the webhook (last seen)",
            )?,
            webhook_oldest_undelivered: Gauge::new(
                "webhook_oldest_undelivered_seconds",
                "Age of the oldest order event not yet delivered to the webhook (last seen)",
            )?,
            webhook_latency: hist(
                "webhook_latency_seconds",
                "Time from sending an order event to the webhook's answer",
                buckets_latency(),
            )?,
            dead_lettered: IntCounter::new(
                "dead_lettered_total",
                "Messages sent to the dead-letter queue",
            )?,
            rejected: counter_vec(
                "reservations_rejected_total",
                "Wins that could not become orders (status rejected), by cause",
                &["cause"],
            )?,
            expirations: IntCounter::new(
                "orders_expired_total",
                "Unpaid orders expired by the sweeper",
            )?,
            releases: counter_vec(
                "units_released_total",
                "Units returned to stock, by reason",
                &["reason"],
            )?,
            recovering: IntGauge::new(
                "products_recovering",
                "Products Redis lost, not yet rebuilt (this process's view)",
            )?,
            recoveries: IntCounter::new(
                "product_losses_total",
                "Times this process found a preheated product missing from Redis",
            )?,
            worker_redeliveries: IntCounter::new(
                "worker_redeliveries_total",
                "Deliveries the worker got again after a connection that held them dropped (past x-delivery-limit, 20, RabbitMQ dead-letters the message)",
            )?,
            ended_unpersisted: IntGauge::new(
                "ended_sales_unpersisted_winners",
                "Winners of ended sales that were relayed to RabbitMQ but are neither an order nor a rejection (in the queue, held by a worker, or in the dead-letter queue); while any remain the sale cannot retire",
            )?,
            rollbacks: IntCounter::new(
                "product_rollbacks_total",
                "Times this process found a product's Redis state behind a win already seen outside Redis (Redis went back in time) and dropped it for a rebuild",
            )?,
            durability_wait_timeouts: IntCounter::new(
                "durability_wait_timeouts_total",
                "Wins whose WAIT for replicas (SECKILL_REDIS_DURABILITY=replicas:N) timed out or failed; answered 202 anyway",
            )?,
            unreplicated_wins: IntCounter::new(
                "durability_unreplicated_wins_total",
                "Wins answered 202 before N replicas took them (WAIT timed out, failed, or was skipped while replicas were missing)",
            )?,
            db_queries: counter_vec(
                "db_queries_total",
                "Statements run on Postgres by this process's pool, by verb and first table",
                &["verb", "table"],
            )?,
            readiness_checks: IntCounter::new(
                "readiness_checks_total",
                "Rounds of readiness checks of Redis, RabbitMQ and Postgres (at most one a second)",
            )?,
            sse_open: IntGauge::new("sse_streams_open", "Event streams open in this process")?,
            sse_refused: counter_vec(
                "sse_streams_refused_total",
                "Event streams refused, by limit (per_user: 429, process: 503)",
                &["limit"],
            )?,
            sse_wakeups: IntCounter::new(
                "sse_wakeups_total",
                "Times an open event stream woke to read its reservation again",
            )?,
            sse_resyncs: IntCounter::new(
                "sse_resyncs_total",
                "Times every open event stream was woken (spread) after pub/sub lost messages",
            )?,
            decision_counters: Vec::new(),
            product_decisions: ProductDecisions::default(),
            registry,
            process: Registry::new(),
        };
        let mut m = m;
        m.decision_counters = Outcome::LABELS
            .iter()
            .map(|o| m.decisions.with_label_values(&[*o]))
            .collect();
        m.registry.register(Box::new(m.build_info.clone()))?;
        m.build_info
            .with_label_values(&[build_info::VERSION, build_info::COMMIT])
            .set(1);
        m.registry.register(Box::new(m.dependency_ready.clone()))?;
        #[cfg(target_os = "linux")]
        m.process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        m.registry.register(Box::new(m.http_requests.clone()))?;
        m.registry.register(Box::new(m.http_latency.clone()))?;
        m.registry.register(Box::new(m.decisions.clone()))?;
        m.registry
            .register(Box::new(m.soldout_cache_hits.clone()))?;
        m.registry.register(Box::new(m.ip_limited.clone()))?;
        m.registry.register(Box::new(m.connections_open.clone()))?;
        m.registry
            .register(Box::new(m.connections_refused.clone()))?;
        for reason in ["per_ip", "total"] {
            m.connections_refused.with_label_values(&[reason]); // exported at 0 from the start
        }
        m.registry.register(Box::new(m.body_timeouts.clone()))?;
        m.registry.register(Box::new(m.relay_published.clone()))?;
        m.registry.register(Box::new(m.reserve_batch.clone()))?;
        m.registry.register(Box::new(m.relay_batch.clone()))?;
        m.registry.register(Box::new(m.relay_lag.clone()))?;
        m.registry.register(Box::new(m.outbox_length.clone()))?;
        m.registry.register(Box::new(m.room.clone()))?;
        m.registry.register(Box::new(m.relay_products.clone()))?;
        m.registry.register(Box::new(m.relay_reading.clone()))?;
        m.registry
            .register(Box::new(m.relay_product_errors.clone()))?;
        m.registry
            .register(Box::new(m.relay_products_failing.clone()))?;
        m.registry.register(Box::new(m.retired.clone()))?;
        m.registry.register(Box::new(m.pending_settled.clone()))?;
        m.registry.register(Box::new(m.jwks_fetches.clone()))?;
        m.registry.register(Box::new(m.jwks_keys.clone()))?;
        m.registry.register(Box::new(m.queue_depth.clone()))?;
        m.registry.register(Box::new(m.dlq_depth.clone()))?;
        m.registry.register(Box::new(m.worker_batch.clone()))?;
        m.registry.register(Box::new(m.persist_latency.clone()))?;
        m.registry.register(Box::new(m.orders_persisted.clone()))?;
        m.registry.register(Box::new(m.dead_lettered.clone()))?;
        m.registry.register(Box::new(m.rejected.clone()))?;
        for cause in Cause::LABELS {
            m.rejected.with_label_values(&[cause]); // exported at 0 before the first one
        }
        m.registry.register(Box::new(m.expirations.clone()))?;
        m.registry.register(Box::new(m.releases.clone()))?;
        m.registry.register(Box::new(m.recovering.clone()))?;
        m.registry.register(Box::new(m.recoveries.clone()))?;
        m.registry.register(Box::new(m.rollbacks.clone()))?;
        m.registry.register(Box::new(m.ended_unpersisted.clone()))?;
        m.registry
            .register(Box::new(m.worker_redeliveries.clone()))?;
        m.registry
            .register(Box::new(m.durability_wait_timeouts.clone()))?;
        m.registry.register(Box::new(m.unreplicated_wins.clone()))?;
        m.registry.register(Box::new(m.db_queries.clone()))?;
        m.registry.register(Box::new(m.readiness_checks.clone()))?;
        m.registry.register(Box::new(m.sse_open.clone()))?;
        m.registry.register(Box::new(m.sse_refused.clone()))?;
        for limit in ["per_user", "process"] {
            m.sse_refused.with_label_values(&[limit]);
        }
        m.registry.register(Box::new(m.sse_wakeups.clone()))?;
        m.registry.register(Box::new(m.sse_resyncs.clone()))?;
        m.registry.register(Box::new(m.events_published.clone()))?;
        m.registry
            .register(Box::new(m.events_unpublished.clone()))?;
        m.registry
            .register(Box::new(m.webhook_deliveries.clone()))?;
        for result in ["delivered", "failed"] {
            m.webhook_deliveries.with_label_values(&[result]);
        }
        m.registry
            .register(Box::new(m.webhook_undelivered.clone()))?;
        m.registry
            .register(Box::new(m.webhook_oldest_undelivered.clone()))?;
        m.registry.register(Box::new(m.webhook_latency.clone()))?;
        Ok(m)
    }

    /// Counts one purchase decision on `product`.
    pub fn decided(&self, product: ProductId, outcome: &Outcome) {
        if let Some(counter) = self.decision_counters.get(outcome.index()) {
            counter.inc();
        }
        self.product_decisions.record(product, outcome);
    }

    /// Counts wins rejected for `cause`.
    pub fn count_rejected(&self, cause: Cause, n: usize) {
        if n > 0 {
            self.rejected
                .with_label_values(&[cause.label()])
                .inc_by(n as u64);
        }
    }

    /// Counts a win that `replicas:N` could not confirm before its answer.
    pub fn replicated(&self, replication: Replication) {
        match replication {
            Replication::NotAsked | Replication::Confirmed => {}
            Replication::TimedOut => {
                self.durability_wait_timeouts.inc();
                self.unreplicated_wins.inc();
            }
            Replication::Skipped => self.unreplicated_wins.inc(),
            // Answered 503, not 202: not an unreplicated win.
            Replication::Failed => self.durability_wait_timeouts.inc(),
        }
    }

    /// Counts one statement run on Postgres.
    pub fn db_query(&self, sql: &str) {
        let (verb, table) = classify_sql(sql);
        self.db_queries.with_label_values(&[verb, table]).inc();
    }

    /// Records one round of readiness checks: `ready(dependency)` for each of [`DEPENDENCIES`].
    pub fn readiness(&self, ready: impl Fn(&str) -> bool) {
        for dependency in DEPENDENCIES {
            self.dependency_ready
                .with_label_values(&[dependency])
                .set(i64::from(ready(dependency)));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut buf = Vec::new();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The labels of a statement: its verb and the first table it names, each from a fixed set
/// (`other` beyond it), so the series stay few whatever SQL runs.
pub fn classify_sql(sql: &str) -> (&'static str, &'static str) {
    const VERBS: [&str; 4] = ["select", "insert", "update", "delete"];
    const TABLES: [&str; 3] = ["product", "orders", "rejection"];
    let known = |set: &[&'static str], word: &str| {
        let word = word.trim_matches(|c: char| c == '"' || c == '(' || c == ',' || c == ';');
        let word = word.rsplit('.').next().unwrap_or(word).trim_matches('"');
        set.iter()
            .find(|k| k.eq_ignore_ascii_case(word))
            .copied()
            .unwrap_or("other")
    };
    let mut words = sql.split_whitespace();
    let verb = words.next().map_or("other", |w| known(&VERBS, w));
    let mut table = "other";
    if verb == "update" {
        table = words.next().map_or("other", |w| known(&TABLES, w));
    } else {
        let mut words = words
            .skip_while(|w| !(w.eq_ignore_ascii_case("from") || w.eq_ignore_ascii_case("into")));
        if words.next().is_some() {
            table = words.next().map_or("other", |w| known(&TABLES, w));
        }
    }
    (verb, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_per_product_and_the_oldest_product_makes_room() {
        let tally = ProductDecisions::default();
        let p = |n: i64| ProductId::try_from(n).unwrap();
        tally.record(p(1), &Outcome::SoldOut);
        tally.record(p(1), &Outcome::SoldOut);
        tally.record(p(2), &Outcome::NotStarted);
        let sold_out = Outcome::SoldOut.index();
        assert_eq!(tally.counts(p(1))[sold_out], 2);
        assert_eq!(tally.counts(p(2))[Outcome::NotStarted.index()], 1);
        assert_eq!(tally.counts(p(3)), [0; Outcome::LABELS.len()]);
        for n in 3..=(ProductDecisions::CAPACITY as i64 + 1) {
            tally.record(p(n), &Outcome::Ended);
        }
        assert_eq!(tally.counts(p(1))[sold_out], 0, "forgotten: lowest id");
        assert_eq!(tally.counts(p(2))[Outcome::NotStarted.index()], 1);
        let last = ProductDecisions::CAPACITY as i64 + 1;
        assert_eq!(tally.counts(p(last))[Outcome::Ended.index()], 1);
    }

    #[test]
    fn statements_are_labelled_by_verb_and_first_table_from_fixed_sets() {
        for (sql, want) in [
            (
                r#"SELECT "product"."product_id", "product"."name" FROM "product" WHERE "product"."product_id" = $1 LIMIT $2"#,
                ("select", "product"),
            ),
            (
                "select count(*) as n from orders where product_id = $1",
                ("select", "orders"),
            ),
            (
                r#"INSERT INTO "orders" ("order_id") VALUES ($1) ON CONFLICT DO NOTHING"#,
                ("insert", "orders"),
            ),
            (
                "update product set preheated_at = now() where product_id = $1",
                ("update", "product"),
            ),
            (
                "select * from rejection where user_id = $1",
                ("select", "rejection"),
            ),
            (
                "select max(product_id) from public.product",
                ("select", "product"),
            ),
            ("select 1", ("select", "other")),
            ("with x as (select 1) select * from x", ("other", "other")),
            ("delete from somewhere_else", ("delete", "other")),
            ("", ("other", "other")),
        ] {
            assert_eq!(classify_sql(sql), want, "{sql}");
        }
    }
}
