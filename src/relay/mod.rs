//! The outbox relay (in every `serve` process): winners recorded in the products' outbox
//! streams are published to RabbitMQ (persistent, mandatory, with publisher confirms) and
//! acknowledged in the stream only after the broker confirmed them.
//!
//! Relays share the work through one consumer group per stream. Entries left pending by a
//! relay that died are reclaimed (`XAUTOCLAIM`) after an idle bound. An entry is deleted
//! (`XDEL`) only after its `XACK`, so trimming never drops an unpublished winner. While
//! RabbitMQ is down nothing is read: winners wait in Redis.
//!
//! **Which outboxes.** The relay tracks the products in `<prefix>:products` (preheated, not
//! retired: `sweeper` takes a retired product off it) and reads only those whose sale is live
//! (by this process's clock, with [`WINDOW_MARGIN`] either side for clock skew: Redis's clock
//! decides a win) or whose outbox still holds entries (draining). An upcoming sale and an ended
//! one whose winners were all relayed cost no reads; every tracked outbox's length is looked at
//! every `SECKILL_RELAY_CLAIM_IDLE_MS / 2` in one script call per hash slot.
//!
//! **Blocking, not polling.** One `XREADGROUP` covers every outbox it reads that shares a hash
//! slot — on a single Redis, all of them. When they fit one read, that read blocks
//! (`BLOCK SECKILL_RELAY_POLL_MS`) on a connection of its own, so the shared pool is never
//! held: Redis wakes it the moment any winner is appended, and an idle relay makes about one
//! read per `SECKILL_RELAY_POLL_MS`. On a cluster with live sales in several slots it reads them
//! every `SECKILL_RELAY_POLL_MS` instead, and this process's own winners wake it at once
//! ([`OutboxWake`]).
//!
//! **Errors stay with their product.** A product whose outbox cannot be read, claimed or
//! acknowledged (its key holds the wrong type, its entries cannot be decoded) is logged with
//! its id, counted (`seckill_relay_product_errors_total`) and backed off alone; the others go
//! on. Only when every product fails and Redis does not answer a `PING`, or RabbitMQ fails, does
//! the whole relay back off.
//!
//! Here: `run` is the loop (refresh, look, read, back off); `read` reads and reclaims
//! entries; `publish` publishes them with confirms and acknowledges them; `decode` turns
//! Redis's answers into entries and messages; `select` chooses the outboxes to read and
//! groups them by hash slot.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use fred::{prelude::*, types::scripts::Script};

use crate::{
    amqp::Broker, backoff::Backoff, config::RedisSettings, deps::Deps, domain::ProductId,
    keys::Keys, metrics::Metrics, outbox::OutboxWake,
};

mod decode;
mod publish;
mod read;
mod run;
mod select;

pub use decode::{message_of, moment_of};
pub use select::{Window, slot_groups, worth_reading};

/// The consumer group every relay joins.
pub const GROUP: &str = "relay";
/// Most entries read (and in flight to the broker) per stream per read.
const BATCH: u64 = 500;
/// A sale's outbox is read from this long before its start until this long after its end.
pub const WINDOW_MARGIN: Duration = Duration::from_secs(5);
/// How often the list of tracked products is read again.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// A failing product is tried again after this, doubling up to [`FAILING_MAX`].
const FAILING_MIN: Duration = Duration::from_millis(500);
const FAILING_MAX: Duration = Duration::from_secs(30);

static OUTBOX_LEN: &str = include_str!("../../lua/outbox_len.lua");

/// Relay settings and handles.
pub struct Relay {
    pub pool: Pool,
    /// Where Redis is (the blocking read gets a connection of its own).
    pub redis: RedisSettings,
    pub keys: Keys,
    pub broker: Broker,
    /// Where each winner handed to RabbitMQ is recorded before its entry is acknowledged.
    pub db: sea_orm::DatabaseConnection,
    pub queue: String,
    pub metrics: Arc<Metrics>,
    /// Entries pending this long on any relay are taken over.
    pub claim_idle: Duration,
    /// The longest an idle relay waits before it looks again.
    pub poll: Duration,
    /// This relay's consumer name (unique per process).
    pub consumer: String,
    /// This process's winners (a cluster's relay polls slowly otherwise).
    pub wake: Arc<OutboxWake>,
    outbox_len: Script,
}

impl Relay {
    /// A relay of this deployment's outboxes, under a consumer name unique to this process.
    pub fn new(deps: &Deps, keys: Keys, wake: Arc<OutboxWake>) -> Self {
        Self {
            pool: deps.redis.clone(),
            redis: deps.settings.redis.clone(),
            keys,
            broker: deps.broker.clone(),
            db: deps.db.clone(),
            queue: deps.settings.amqp_queue.clone(),
            metrics: deps.metrics.clone(),
            claim_idle: deps.settings.relay_claim_idle,
            poll: deps.settings.relay_poll,
            consumer: format!(
                "relay-{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
            wake,
            outbox_len: Script::from_lua(OUTBOX_LEN),
        }
    }
}

/// A product the relay tracks.
#[derive(Debug)]
struct Tracked {
    stream: String,
    window: Option<Window>,
    /// Entries in its outbox at the last look (read or not yet acknowledged).
    backlog: i64,
    /// The consumer group is known to exist.
    grouped: bool,
    /// The last read returned a full batch: read again at once.
    full: bool,
    failing: Option<Failing>,
}

#[derive(Debug)]
struct Failing {
    until: Instant,
    backoff: Backoff,
}

impl Tracked {
    fn new(stream: String) -> Self {
        Self {
            stream,
            window: None,
            backlog: 0,
            grouped: false,
            full: false,
            failing: None,
        }
    }

    fn backing_off(&self, now: Instant) -> bool {
        self.failing.as_ref().is_some_and(|f| now < f.until)
    }
}

/// What the relay knows between rounds.
#[derive(Default)]
struct State {
    products: BTreeMap<ProductId, Tracked>,
    last_refresh: Option<Instant>,
    last_look: Option<Instant>,
    /// A one-connection pool for the blocking read.
    reader: Option<Pool>,
}

/// Why a step of one product failed.
type ProductError = anyhow::Error;
