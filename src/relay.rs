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

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use fred::{
    prelude::*,
    types::{scripts::Script, streams::XReadValue},
};
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{Broker, OrderMessage, declare_topology},
    backoff::{Backoff, sleep_or_stop},
    config::RedisSettings,
    deps::Deps,
    domain::{ProductId, UserId},
    keys::Keys,
    metrics::Metrics,
    outbox::OutboxWake,
};

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

static OUTBOX_LEN: &str = include_str!("../lua/outbox_len.lua");

/// Relay settings and handles.
pub struct Relay {
    pub pool: Pool,
    /// Where Redis is (the blocking read gets a connection of its own).
    pub redis: RedisSettings,
    pub keys: Keys,
    pub broker: Broker,
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

/// A sale window in ms since the epoch (`starts_ms`, `ends_ms` of the state hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub starts_ms: i64,
    pub ends_ms: i64,
}

impl Window {
    /// Whether the sale may take winners at `now_ms`, give or take [`WINDOW_MARGIN`].
    pub fn live(&self, now_ms: i64) -> bool {
        let margin = i64::try_from(WINDOW_MARGIN.as_millis()).unwrap_or(i64::MAX);
        self.starts_ms.saturating_sub(margin) <= now_ms
            && now_ms < self.ends_ms.saturating_add(margin)
    }
}

/// Whether the relay reads a tracked product's outbox: its sale is live or entries wait in it
/// (an unknown window — the state hash is gone — counts only its entries).
pub fn worth_reading(window: Option<Window>, backlog: i64, now_ms: i64) -> bool {
    backlog > 0 || window.is_some_and(|w| w.live(now_ms))
}

/// Splits streams into the groups one multi-key command may cover: all of them on a single
/// Redis, one group per hash slot on a cluster (each product has a slot of its own).
pub fn slot_groups<T: Clone>(streams: &[(T, String)], cluster: bool) -> Vec<Vec<(T, String)>> {
    if !cluster {
        return if streams.is_empty() {
            Vec::new()
        } else {
            vec![streams.to_vec()]
        };
    }
    let mut by_slot: BTreeMap<u16, Vec<(T, String)>> = BTreeMap::new();
    for (id, stream) in streams {
        by_slot
            .entry(fred::util::redis_keyslot(stream.as_bytes()))
            .or_default()
            .push((id.clone(), stream.clone()));
    }
    by_slot.into_values().collect()
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

impl Relay {
    /// Relays until shutdown; keeps going (with backoff) while RabbitMQ or Redis is down.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut channel: Option<Channel> = None;
        let mut state = State::default();
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
            match self.step(&ch, &mut state, &shutdown).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %format!("{e:#}"), "relay round failed; retrying in {delay:?}");
                    for t in state.products.values_mut() {
                        t.grouped = false;
                    }
                    sleep_or_stop(&shutdown, delay).await;
                }
            }
        }
        if let Some(ch) = channel {
            let _ = ch.close(200, "relay stopping".into()).await;
        }
        if let Some(reader) = state.reader {
            close_reader(reader).await;
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

    /// One step: refresh the list and look at every outbox when due, then relay what waits —
    /// blocking until a winner arrives (or `poll` passes) when nothing is known to wait.
    async fn step(
        &self,
        ch: &Channel,
        st: &mut State,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let woken = self.wake.take();
        let unknown = woken.iter().any(|p| !st.products.contains_key(p));
        if unknown || st.last_refresh.is_none_or(|t| t.elapsed() >= REFRESH_EVERY) {
            self.refresh(st).await?;
        }
        let look_every = (self.claim_idle / 2).max(Duration::from_millis(100));
        if st.last_look.is_none_or(|t| t.elapsed() >= look_every) {
            self.look(ch, st).await?;
        }
        let reading = self.reading(st).await;
        self.metrics.relay_reading.set(reading.len() as i64);
        self.metrics.relay_products_failing.set(
            st.products
                .values()
                .filter(|t| t.backing_off(Instant::now()))
                .count() as i64,
        );
        let groups = slot_groups(&reading, self.redis.cluster);
        let blocking = groups.len() == 1;
        // What is known to wait: a full batch's rest, and (unless Redis wakes a blocking read
        // over it anyway) this process's fresh winners.
        let urgent: Vec<(ProductId, String)> = reading
            .iter()
            .filter(|(p, _)| {
                st.products.get(p).is_some_and(|t| t.full) || (!blocking && woken.contains(p))
            })
            .cloned()
            .collect();
        if !urgent.is_empty() {
            for item in urgent {
                self.read_group(ch, st, &[item], None, shutdown).await?;
            }
            return Ok(());
        }
        if blocking {
            let group = groups.into_iter().next().unwrap_or_default();
            return self
                .read_group(ch, st, &group, Some(self.poll), shutdown)
                .await;
        }
        tokio::select! {
            _ = self.wake.notified() => return Ok(()),
            _ = tokio::time::sleep(self.poll) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        for group in groups {
            self.read_group(ch, st, &group, None, shutdown).await?;
        }
        Ok(())
    }

    /// Reads the tracked products again (`<prefix>:products`), and the sale window of each new
    /// one; a product no longer listed (retired) is dropped, with its gauge.
    async fn refresh(&self, st: &mut State) -> anyhow::Result<()> {
        let listed: Vec<i64> = self
            .pool
            .smembers(self.keys.products())
            .await
            .context("reading the products set")?;
        let listed: HashSet<ProductId> = listed
            .into_iter()
            .filter_map(|id| ProductId::try_from(id).ok())
            .collect();
        st.products.retain(|id, _| {
            let keep = listed.contains(id);
            if !keep {
                let _ = self
                    .metrics
                    .outbox_length
                    .remove_label_values(&[&id.to_string()]);
            }
            keep
        });
        for id in listed {
            let tracked = st
                .products
                .entry(id)
                .or_insert_with(|| Tracked::new(self.keys.product(id).outbox));
            if tracked.window.is_some() || tracked.backing_off(Instant::now()) {
                continue;
            }
            let window: Result<(Option<i64>, Option<i64>), _> = self
                .pool
                .hmget(self.keys.product(id).state, vec!["starts_ms", "ends_ms"])
                .await;
            match window {
                Ok((Some(starts_ms), Some(ends_ms))) => {
                    tracked.window = Some(Window { starts_ms, ends_ms })
                }
                Ok(_) => {} // not in Redis (lost, or being rebuilt): its entries decide
                Err(e) => self.fail(
                    id,
                    tracked,
                    anyhow::Error::from(e).context("reading the sale window"),
                ),
            }
        }
        self.metrics.relay_products.set(st.products.len() as i64);
        st.last_refresh = Some(Instant::now());
        Ok(())
    }

    /// Looks at the length of every tracked outbox (one script call per hash slot), updates the
    /// gauges, and takes over entries idle on a relay that died.
    async fn look(&self, ch: &Channel, st: &mut State) -> anyhow::Result<()> {
        let all: Vec<(ProductId, String)> = st
            .products
            .iter()
            .map(|(id, t)| (*id, t.stream.clone()))
            .collect();
        for group in slot_groups(&all, self.redis.cluster) {
            let keys: Vec<String> = group.iter().map(|(_, s)| s.clone()).collect();
            let lengths: Vec<i64> = self
                .outbox_len
                .evalsha_with_reload(self.pool.next(), keys, Vec::<String>::new())
                .await
                .context("reading the outboxes' lengths")?;
            for ((id, _), len) in group.iter().zip(lengths) {
                let Some(t) = st.products.get_mut(id) else {
                    continue;
                };
                if len < 0 {
                    if !t.backing_off(Instant::now()) {
                        self.fail(*id, t, anyhow::anyhow!("the outbox key is not a stream"));
                    }
                    continue;
                }
                t.backlog = len;
                self.metrics
                    .outbox_length
                    .with_label_values(&[&id.to_string()])
                    .set(len);
            }
        }
        st.last_look = Some(Instant::now());
        let now = Instant::now();
        let claimable: Vec<(ProductId, String)> = st
            .products
            .iter()
            .filter(|(_, t)| t.backlog > 0 && !t.backing_off(now))
            .map(|(id, t)| (*id, t.stream.clone()))
            .collect();
        for (id, stream) in claimable {
            let claimed = match self.ensure_group(st, id).await {
                Ok(()) => self.claim(&stream).await,
                Err(e) => Err(e),
            };
            match claimed {
                Ok(entries) if entries.is_empty() => {}
                Ok(entries) => {
                    tracing::info!(
                        product_id = id.get(),
                        count = entries.len(),
                        "relay reclaimed idle outbox entries"
                    );
                    self.publish(ch, st, id, entries).await?;
                }
                Err(e) => {
                    if let Some(t) = st.products.get_mut(&id) {
                        self.fail(id, t, e.context("reclaiming idle entries"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The tracked products to read now (sale live or entries waiting, not backing off), each
    /// with its consumer group in place.
    async fn reading(&self, st: &mut State) -> Vec<(ProductId, String)> {
        let now_ms = Utc::now().timestamp_millis();
        let now = Instant::now();
        let wanted: Vec<ProductId> = st
            .products
            .iter()
            .filter(|(_, t)| !t.backing_off(now) && worth_reading(t.window, t.backlog, now_ms))
            .map(|(id, _)| *id)
            .collect();
        let mut reading = Vec::with_capacity(wanted.len());
        for id in wanted {
            match self.ensure_group(st, id).await {
                Ok(()) => {
                    if let Some(t) = st.products.get(&id) {
                        reading.push((id, t.stream.clone()));
                    }
                }
                Err(e) => {
                    if let Some(t) = st.products.get_mut(&id) {
                        self.fail(id, t, e);
                    }
                }
            }
        }
        reading
    }

    async fn ensure_group(&self, st: &mut State, id: ProductId) -> Result<(), ProductError> {
        let Some(t) = st.products.get_mut(&id) else {
            return Ok(());
        };
        if t.grouped {
            return Ok(());
        }
        let created: Result<(), fred::error::Error> = self
            .pool
            .next()
            .xgroup_create(&t.stream, GROUP, "0", true)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.details().contains("BUSYGROUP") => {}
            Err(e) => return Err(e).context("creating the relay group"),
        }
        t.grouped = true;
        Ok(())
    }

    /// Marks one product failing: logged with its id, counted, backed off alone.
    fn fail(&self, id: ProductId, t: &mut Tracked, error: ProductError) {
        self.metrics.relay_product_errors.inc();
        let failing = t.failing.get_or_insert_with(|| Failing {
            until: Instant::now(),
            backoff: Backoff::new(FAILING_MIN, FAILING_MAX),
        });
        let delay = failing.backoff.next_delay();
        failing.until = Instant::now() + delay;
        t.grouped = false;
        t.full = false;
        tracing::warn!(
            product_id = id.get(),
            stream = t.stream,
            error = %format!("{error:#}"),
            "relay: this product's outbox failed; the others go on, it is retried in {delay:?}"
        );
    }

    /// Reads new entries of `group` (one call; blocking up to `block`, on the relay's own
    /// connection, when set) and publishes them. If the call fails, each product is read on its
    /// own, so that one broken outbox does not hold up the others. Shutdown cuts a blocking
    /// read short (entries it may have taken are reclaimed after SECKILL_RELAY_CLAIM_IDLE_MS
    /// by any relay), never a publication.
    async fn read_group(
        &self,
        ch: &Channel,
        st: &mut State,
        group: &[(ProductId, String)],
        block: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let streams: Vec<String> = group.iter().map(|(_, s)| s.clone()).collect();
        let result = match block {
            Some(block) => tokio::select! {
                read = self.read_blocking(st, streams, block) => read,
                _ = shutdown.cancelled() => return Ok(()),
            },
            None => self.read(&self.pool.next().clone(), streams, None).await,
        };
        match result {
            Ok(batches) => self.publish_batches(ch, st, group, batches).await,
            Err(e) if group.len() == 1 && block.is_none() => self.isolate(st, group, e).await,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "relay: a read over several outboxes failed; reading each alone");
                let mut any = false;
                for item in group {
                    match self
                        .read(&self.pool.next().clone(), vec![item.1.clone()], None)
                        .await
                    {
                        Ok(batches) => {
                            any = true;
                            self.publish_batches(ch, st, std::slice::from_ref(item), batches)
                                .await?;
                        }
                        Err(e) => {
                            let isolated = self.isolate(st, std::slice::from_ref(item), e).await;
                            // Redis itself failed: the whole relay backs off, unless some
                            // product was read (then the next step finds out again).
                            if !any {
                                isolated?;
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// A read of one product failed: its own fault when Redis still answers (the product
    /// backs off alone), else Redis's (the whole relay backs off).
    async fn isolate(
        &self,
        st: &mut State,
        one: &[(ProductId, String)],
        error: anyhow::Error,
    ) -> anyhow::Result<()> {
        let pong: Result<String, _> = self.pool.next().ping(None).await;
        if pong.is_err() {
            return Err(error);
        }
        if let Some((id, _)) = one.first()
            && let Some(t) = st.products.get_mut(id)
        {
            self.fail(*id, t, error);
        }
        Ok(())
    }

    async fn read_blocking(
        &self,
        st: &mut State,
        streams: Vec<String>,
        block: Duration,
    ) -> anyhow::Result<Vec<(String, Vec<Entry>)>> {
        if st.reader.is_none() {
            st.reader = Some(
                crate::redis::connect(&self.redis, 1, Duration::from_secs(2))
                    .await
                    .context("connecting the relay's blocking reader")?,
            );
        }
        let Some(reader) = st.reader.as_ref() else {
            anyhow::bail!("no blocking reader");
        };
        let read = self
            .read(&reader.next().clone(), streams, Some(block))
            .await;
        if let Err(e) = &read
            && !answered_by_redis(e)
        {
            // A connection whose blocked read went unanswered may never be unblocked: start
            // afresh next time (the outboxes are read again on the pool meanwhile).
            if let Some(reader) = st.reader.take() {
                tokio::spawn(close_reader(reader));
            }
        }
        read
    }

    /// `XREADGROUP … STREAMS s1 s2 … > > …` (blocking up to `block` when set).
    async fn read(
        &self,
        client: &Client,
        streams: Vec<String>,
        block: Option<Duration>,
    ) -> anyhow::Result<Vec<(String, Vec<Entry>)>> {
        let ids = vec![">"; streams.len()];
        let block_ms = block.map(|b| u64::try_from(b.as_millis()).unwrap_or(u64::MAX));
        let options = Options {
            timeout: block.map(|b| b + crate::redis::COMMAND_TIMEOUT),
            ..Options::default()
        };
        let raw: Value = client
            .with_options(&options)
            .xreadgroup(
                GROUP,
                &self.consumer,
                Some(BATCH),
                block_ms,
                false,
                streams,
                ids,
            )
            .await
            .context("reading the outbox")?;
        parse_xread(raw)
    }

    async fn claim(&self, stream: &str) -> Result<Vec<Entry>, ProductError> {
        let raw: Value = self
            .pool
            .next()
            .xautoclaim(
                stream,
                GROUP,
                &self.consumer,
                u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX),
                "0-0",
                Some(BATCH),
                false,
            )
            .await?;
        parse_autoclaim(raw)
    }

    /// Publishes what one read returned, stream by stream.
    async fn publish_batches(
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

    /// Publishes a batch of one product with confirms kept in flight together; acks and
    /// deletes the confirmed entries. Unconfirmed ones stay pending and are reclaimed later.
    /// A broker failure is the caller's (the whole relay backs off); a failed acknowledgement
    /// is this product's.
    async fn publish(
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
            in_flight.push((entry_id, message.reserved_at, confirm));
        }
        let mut failed = 0;
        for (entry_id, reserved_at, confirm) in in_flight {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => {
                    let lag = (Utc::now() - reserved_at).num_milliseconds().max(0) as f64 / 1_000.0;
                    self.metrics.relay_lag.observe(lag);
                    done.push(entry_id);
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
            let acked = self.acknowledge(&stream, &done).await;
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

/// Whether Redis itself answered with this error (a reply such as `WRONGTYPE` or `NOGROUP`:
/// the connection is fine), rather than the connection failing or timing out.
fn answered_by_redis(error: &anyhow::Error) -> bool {
    use fred::error::ErrorKind;
    error.downcast_ref::<fred::error::Error>().is_some_and(|e| {
        !matches!(
            e.kind(),
            ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled | ErrorKind::Unknown
        )
    })
}

/// Closes the blocking reader's connection (a read it may still be blocked in ends within
/// `SECKILL_RELAY_POLL_MS`; this does not wait for it).
async fn close_reader(reader: Pool) {
    let _ = tokio::time::timeout(Duration::from_millis(200), reader.quit()).await;
}

/// Parses `XREADGROUP`'s answer: nil, or `[[stream, [entries]], ...]` (RESP3: a map of
/// stream → entries).
fn parse_xread(raw: Value) -> anyhow::Result<Vec<(String, Vec<Entry>)>> {
    let pairs: Vec<(Value, Value)> = match raw {
        Value::Null => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop().unwrap_or(Value::Null);
                    let name = pair.pop().unwrap_or(Value::Null);
                    Ok((name, entries))
                }
                other => anyhow::bail!("unexpected XREADGROUP answer: {other:?}"),
            })
            .collect::<anyhow::Result<_>>()?,
        Value::Map(map) => map
            .inner()
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
        other => anyhow::bail!("unexpected XREADGROUP answer: {other:?}"),
    };
    pairs
        .into_iter()
        .map(|(name, entries)| Ok((name.convert::<String>()?, parse_entries(entries)?)))
        .collect()
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
        let Ok(id) = pair.pop().unwrap_or(Value::Null).convert::<String>() else {
            continue;
        };
        // A field that is not text leaves it out: the entry is then malformed and dropped
        // with a log line, never a read that fails for good.
        let mut map = HashMap::new();
        if let Value::Array(kv) = fields {
            for chunk in kv.chunks(2) {
                if let [k, v] = chunk
                    && let (Ok(k), Ok(v)) =
                        (k.clone().convert::<String>(), v.clone().convert::<String>())
                {
                    map.insert(k, v);
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
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "outbox");
        let got = &got[0].1;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "1-0");
        assert_eq!(got[0].1.get("u").map(String::as_str), Some("7"));
        assert!(got[1].1.is_empty());
        assert!(parse_xread(Value::Null).unwrap().is_empty());
        assert!(parse_xread(Value::from(3)).is_err());

        // One read over several streams names each.
        let two = Value::Array(vec![
            Value::Array(vec![
                Value::from("a"),
                Value::Array(vec![entry("1-0", &["u", "1"])]),
            ]),
            Value::Array(vec![
                Value::from("b"),
                Value::Array(vec![entry("2-0", &["u", "2"])]),
            ]),
        ]);
        let got = parse_xread(two).unwrap();
        let names: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(got[1].1[0].1.get("u").map(String::as_str), Some("2"));

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

    #[test]
    fn a_reply_from_redis_is_told_from_a_failed_connection() {
        use fred::error::{Error, ErrorKind};
        let wrongtype = anyhow::Error::from(Error::new(ErrorKind::InvalidArgument, "WRONGTYPE"))
            .context("reading the outbox");
        assert!(answered_by_redis(&wrongtype));
        for kind in [ErrorKind::IO, ErrorKind::Timeout, ErrorKind::Canceled] {
            let e = anyhow::Error::from(Error::new(kind, "gone")).context("reading the outbox");
            assert!(!answered_by_redis(&e));
        }
        assert!(!answered_by_redis(&anyhow::anyhow!("other")));
    }

    #[test]
    fn only_live_or_draining_outboxes_are_read() {
        let w = Window {
            starts_ms: 100_000,
            ends_ms: 200_000,
        };
        let margin = WINDOW_MARGIN.as_millis() as i64;
        // Live, with the margin either side for clock skew.
        assert!(worth_reading(Some(w), 0, 150_000));
        assert!(worth_reading(Some(w), 0, 100_000 - margin));
        assert!(worth_reading(Some(w), 0, 200_000 + margin - 1));
        // Upcoming, or ended and drained: not read.
        assert!(!worth_reading(Some(w), 0, 100_000 - margin - 1));
        assert!(!worth_reading(Some(w), 0, 200_000 + margin));
        // Ended with winners not yet relayed: read until they are.
        assert!(worth_reading(Some(w), 3, 900_000));
        // No window known (not in Redis): only waiting entries count.
        assert!(!worth_reading(None, 0, 150_000));
        assert!(worth_reading(None, 1, 150_000));
    }

    #[test]
    fn one_read_covers_a_single_redis_and_one_hash_slot_on_a_cluster() {
        let keys = Keys::new("shop");
        let streams: Vec<(i64, String)> = (1..=5)
            .map(|i| (i, keys.product(ProductId::try_from(i).unwrap()).outbox))
            .collect();
        assert!(slot_groups::<i64>(&[], false).is_empty());
        let single = slot_groups(&streams, false);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].len(), 5);
        let cluster = slot_groups(&streams, true);
        assert_eq!(cluster.len(), 5, "each product has a hash slot of its own");
        for group in &cluster {
            let slots: HashSet<u16> = group
                .iter()
                .map(|(_, s)| fred::util::redis_keyslot(s.as_bytes()))
                .collect();
            assert_eq!(slots.len(), 1);
        }
    }

    #[test]
    fn a_stream_entry_with_a_field_that_is_not_text_is_kept_as_malformed() {
        let raw = Value::Array(vec![Value::Array(vec![
            Value::from("1-0"),
            Value::Array(vec![
                Value::from("u"),
                Value::Array(vec![Value::from(1), Value::from(2)]),
                Value::from("p"),
                Value::from("3"),
            ]),
        ])]);
        let got = parse_entries(raw).unwrap();
        assert_eq!(got.len(), 1);
        assert!(!got[0].1.contains_key("u"));
        assert!(message_of(&got[0].1).is_none());
    }
}
