//! The relay loop: each step refreshes the tracked products, looks at every outbox when due,
//! and reads (then publishes) what waits; a failing product backs off alone.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::Utc;
use fred::prelude::*;
use lapin::{Channel, options::ConfirmSelectOptions};
use tokio_util::sync::CancellationToken;

use super::{
    FAILING_MAX, FAILING_MIN, Failing, GROUP, ProductError, REFRESH_EVERY, Relay, State, Tracked,
    Window, read::close_reader, slot_groups, worth_reading,
};
use crate::{
    amqp::declare_topology,
    backoff::{Backoff, sleep_or_stop},
    domain::ProductId,
};

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
        declare_topology(&conn, &self.queue)
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
    pub(super) fn fail(&self, id: ProductId, t: &mut Tracked, error: ProductError) {
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
}
