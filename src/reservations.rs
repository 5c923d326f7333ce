//! The atomic reservation: every decision about a unit of stock is one Lua script call.
//!
//! `reserve.lua` decides a purchase attempt (sale window, user rate window, product admission
//! gate, dedup, stock, outbox) in one step; `release.lua` returns a unit exactly once;
//! `preheat.lua` loads a sale; `pause.lua` pauses a product while a forced preheat rebuilds it.
//! Scripts run by SHA and are reloaded on `NOSCRIPT` (empty script cache after a restart).
//! Under `SECKILL_REDIS_DURABILITY=replicas:N` a win waits for its replicas before it is
//! answered ([`crate::durability::ReplicaWait`]).

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use fred::{
    prelude::*,
    types::{Value, scripts::Script},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    config::{Durability, Rate},
    domain::{ProductId, UserId},
    durability::{ReplicaWait, Replication},
    keys::Keys,
    outbox::OutboxWake,
};

static RESERVE: &str = include_str!("../lua/reserve.lua");
static RESERVE_BATCH: &str = include_str!("../lua/reserve_batch.lua");
static RELEASE: &str = include_str!("../lua/release.lua");
static PREHEAT: &str = include_str!("../lua/preheat.lua");
static PAUSE: &str = include_str!("../lua/pause.lua");
static STATUS: &str = include_str!("../lua/status.lua");
static UNLOCK: &str = include_str!("../lua/unlock.lua");
static RETIRE: &str = include_str!("../lua/retire.lua");

/// How long a rebuild lock lives if its holder dies.
const REBUILD_LOCK_TTL_MS: u64 = 60_000;

/// Statuses recorded per `status.lua` call.
const STATUS_CHUNK: usize = 500;

/// Buyers are loaded into Redis this many at a time before a preheat.
const BUYER_CHUNK: usize = 1_000;

/// Where the scripts take their time from.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// Redis `TIME` (production).
    #[default]
    Redis,
    /// A controlled clock in µs since the epoch (tests).
    Manual(Arc<AtomicI64>),
}

impl Clock {
    fn arg(&self) -> String {
        match self {
            Clock::Redis => String::new(),
            Clock::Manual(us) => us.load(Ordering::SeqCst).to_string(),
        }
    }
}

/// What one purchase attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Won {
        reservation_id: Uuid,
        remaining: i64,
    },
    AlreadyReserved {
        reservation_id: Uuid,
    },
    SoldOut,
    RateLimited {
        retry_after: Duration,
    },
    NotStarted,
    Ended,
    Paused,
    UnknownProduct,
}

/// A sale's figures in Redis ([`Reservations::figures`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaleFigures {
    pub preheated: bool,
    pub remaining: Option<i64>,
    pub paused: bool,
    pub pending: i64,
}

impl Outcome {
    /// Every outcome's stable label (metrics, logs), in [`Self::index`] order.
    pub const LABELS: [&'static str; 8] = [
        "won",
        "already_reserved",
        "sold_out",
        "rate_limited",
        "not_started",
        "ended",
        "paused",
        "unknown_product",
    ];

    /// The outcome's position in [`Self::LABELS`].
    pub fn index(&self) -> usize {
        match self {
            Outcome::Won { .. } => 0,
            Outcome::AlreadyReserved { .. } => 1,
            Outcome::SoldOut => 2,
            Outcome::RateLimited { .. } => 3,
            Outcome::NotStarted => 4,
            Outcome::Ended => 5,
            Outcome::Paused => 6,
            Outcome::UnknownProduct => 7,
        }
    }

    /// A stable label (metrics, logs).
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// The user's rate window as the script saw it (for `RateLimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateWindow {
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

/// A decision: the outcome plus the user's window (and, for a win under `replicas:N`, whether
/// the replicas took it before the answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub window: RateWindow,
    pub replication: Replication,
}

/// Redis could not be reached (or answered nonsense): the caller answers `503`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("Redis did not answer")]
    Redis(#[from] fred::error::Error),
    #[error("Redis answered unexpectedly: {0}")]
    BadReply(String),
}

/// Where a won reservation stands. It never goes backwards: [`Status::rank`] orders the
/// lifecycle `pending → confirmed → paid | cancelled | expired`, or `pending → rejected` (a
/// win that could not become an order); the last four are final.
/// `lua/status.lua` keeps the same ranking (a unit test holds the two together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Won; the order is being persisted.
    Pending,
    /// Persisted as an order awaiting payment.
    Confirmed,
    Paid,
    Cancelled,
    Expired,
    /// The win could not become an order (only after Redis lost data); `reason` says why.
    Rejected,
}

impl Status {
    /// Position in the lifecycle: a status only ever moves to a higher rank.
    pub fn rank(self) -> u8 {
        match self {
            Status::Pending => 0,
            Status::Confirmed => 1,
            Status::Paid | Status::Cancelled | Status::Expired | Status::Rejected => 2,
        }
    }

    /// Whether no further change can come.
    pub fn is_terminal(self) -> bool {
        self.rank() == 2
    }

    /// Parses a bare status name (as Redis' status hash holds `pending`).
    pub fn parse(name: &str) -> Option<Self> {
        use serde::de::{IntoDeserializer, value::Error};
        Self::deserialize(IntoDeserializer::<Error>::into_deserializer(name)).ok()
    }
}

/// What a shopper sees of their reservation (also the JSON kept in Redis per reservation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReservationView {
    pub reservation_id: Uuid,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Why the reservation was `rejected`, in plain words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ReservationView {
    pub fn pending(reservation_id: Uuid) -> Self {
        Self {
            reservation_id,
            status: Status::Pending,
            order_id: None,
            expires_at: None,
            reason: None,
        }
    }

    /// A win that could not become an order, and why.
    pub fn rejected(reservation_id: Uuid, reason: impl Into<String>) -> Self {
        Self {
            reservation_id,
            status: Status::Rejected,
            order_id: None,
            expires_at: None,
            reason: Some(reason.into()),
        }
    }

    /// Whether no further change can come.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The JSON stored in Redis.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads Redis' value: a bare `pending` (written by `reserve.lua`) or the JSON above.
    pub fn from_redis(reservation_id: Uuid, raw: &str) -> Option<Self> {
        match Status::parse(raw) {
            Some(Status::Pending) => Some(Self::pending(reservation_id)),
            Some(_) => None,
            None => serde_json::from_str(raw).ok(),
        }
    }
}

/// `reserve.lua`'s answer: `{code, reservation_id|"", remaining, rl_limit, rl_remaining,
/// rl_reset_ms, retry_ms}`.
pub type ReserveReply = (i64, String, i64, i64, i64, i64, i64);

fn parse_uuid(s: &str) -> Result<Uuid, Unavailable> {
    Uuid::parse_str(s).map_err(|_| Unavailable::BadReply(format!("bad reservation id {s:?}")))
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Decodes `reserve.lua`'s answer; an unknown code is an error, never a default outcome.
pub fn decode_reserve(reply: ReserveReply) -> Result<Decision, Unavailable> {
    let (code, id, remaining, limit, left, reset_ms, retry_ms) = reply;
    let window = RateWindow {
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        remaining: u32::try_from(left).unwrap_or(0),
        reset: millis(reset_ms),
    };
    let outcome = match code {
        0 => Outcome::Won {
            reservation_id: parse_uuid(&id)?,
            remaining,
        },
        1 => Outcome::AlreadyReserved {
            reservation_id: parse_uuid(&id)?,
        },
        2 => Outcome::SoldOut,
        3 | 4 => Outcome::RateLimited {
            retry_after: millis(retry_ms),
        },
        5 => Outcome::NotStarted,
        6 => Outcome::Ended,
        7 => Outcome::Paused,
        8 => Outcome::UnknownProduct,
        other => {
            return Err(Unavailable::BadReply(format!(
                "reserve.lua answered code {other}"
            )));
        }
    };
    Ok(Decision {
        outcome,
        window,
        replication: Replication::NotAsked,
    })
}

/// Decodes `reserve_batch.lua`'s flat answer: `attempts` groups of [`ReserveReply`]'s seven
/// values. A reply of the wrong length or shape is an error, never a guess.
pub fn decode_reserve_batch(
    reply: Vec<Value>,
    attempts: usize,
) -> Result<Vec<Decision>, Unavailable> {
    if reply.len() != attempts * 7 {
        return Err(Unavailable::BadReply(format!(
            "reserve_batch.lua answered {} values for {attempts} attempts",
            reply.len()
        )));
    }
    let bad = |e: fred::error::Error| Unavailable::BadReply(format!("reserve_batch.lua: {e}"));
    let mut values = reply.into_iter();
    // The length was checked above: each attempt has its seven values.
    let mut next = || values.next().unwrap_or(Value::Null);
    (0..attempts)
        .map(|_| {
            let code = next().convert::<i64>().map_err(bad)?;
            let id = next().convert::<String>().map_err(bad)?;
            let [remaining, limit, left, reset_ms, retry_ms] =
                [(); 5].map(|()| next().convert::<i64>().map_err(bad));
            decode_reserve((code, id, remaining?, limit?, left?, reset_ms?, retry_ms?))
        })
        .collect()
}

/// Decodes `release.lua`'s answer `{code, remaining}`; an unknown code is an error.
pub fn decode_release((code, remaining): (i64, i64)) -> Result<Released, Unavailable> {
    match code {
        1 => Ok(Released::Returned { remaining }),
        0 => Ok(Released::AlreadyReturned),
        -1 => Ok(Released::NotPreheated),
        other => Err(Unavailable::BadReply(format!(
            "release.lua answered code {other}"
        ))),
    }
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The unit is back on sale.
    Returned { remaining: i64 },
    /// This reservation's unit was returned before: nothing changed.
    AlreadyReturned,
    /// The product is not in Redis; the next preheat rebuilds remaining from Postgres.
    NotPreheated,
}

/// Everything a preheat needs, read from Postgres (and Redis, for a forced rebuild).
#[derive(Debug, Clone)]
pub struct PreheatPlan {
    pub product: ProductId,
    pub stock: i64,
    /// Orders in Postgres that hold a unit (`pending_payment` or `paid`).
    pub live_orders: i64,
    /// Every (user, reservation) already in Postgres, whatever its status.
    pub buyers: Vec<(UserId, Uuid)>,
    /// Reservation ids won in Redis but maybe not yet persisted, read (while paused) *before*
    /// Postgres was read; those not among `buyers` still hold a unit.
    pub pending: HashSet<Uuid>,
    /// Reservations whose order was cancelled or expired when Postgres was read: their units
    /// are on sale in `remaining()`, so `preheat.lua` marks them released in the same step.
    pub closed: Vec<Uuid>,
    pub starts_ms: i64,
    pub ends_ms: i64,
    pub force: bool,
}

impl PreheatPlan {
    /// Units on sale: stock − live orders − units won but not yet persisted.
    pub fn remaining(&self) -> i64 {
        let persisted: HashSet<Uuid> = self.buyers.iter().map(|(_, r)| *r).collect();
        let in_flight = self
            .pending
            .iter()
            .filter(|r| !persisted.contains(r))
            .count();
        let in_flight = i64::try_from(in_flight).unwrap_or(i64::MAX);
        (self.stock - self.live_orders - in_flight).clamp(0, self.stock.max(0))
    }
}

/// What a retirement attempt did (`retire.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The sale's keys expire in `ttl` (set now, or by an earlier attempt).
    Expiring { ttl: Duration },
    /// Not yet: the sale has not ended by Redis time, or winners are still in flight.
    NotYet,
    /// The product is not in Redis: nothing to expire.
    NotInRedis,
}

/// Decodes `retire.lua`'s answer `{code, ttl_ms}`; an unknown code is an error.
pub fn decode_retire((code, ttl_ms): (i64, i64)) -> Result<Retired, Unavailable> {
    match code {
        1 => Ok(Retired::Expiring {
            ttl: millis(ttl_ms),
        }),
        0 => Ok(Retired::NotYet),
        -1 => Ok(Retired::NotInRedis),
        other => Err(Unavailable::BadReply(format!(
            "retire.lua answered code {other}"
        ))),
    }
}

/// What a preheat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preheated {
    Loaded {
        remaining: i64,
        buyers: i64,
    },
    /// Refused: the sale is live and `force` was not set.
    AlreadyLive {
        remaining: i64,
        buyers: i64,
    },
}

/// The reservation component over a fred pool.
#[derive(Clone)]
pub struct Reservations {
    pool: Pool,
    keys: Keys,
    user_rate: Rate,
    product_rate: Rate,
    clock: Clock,
    /// `replicas:N`: the `WAIT` after each win.
    replica_wait: Option<ReplicaWait>,
    /// This process's outbox relay, told of every win (`serve`).
    wake: Option<Arc<OutboxWake>>,
    reserve: Script,
    reserve_batch: Script,
    release: Script,
    preheat: Script,
    pause: Script,
    status: Script,
    unlock: Script,
    retire: Script,
}

impl Reservations {
    pub fn new(pool: Pool, keys: Keys, user_rate: Rate, product_rate: Rate) -> Self {
        Self {
            pool,
            keys,
            user_rate,
            product_rate,
            clock: Clock::Redis,
            replica_wait: None,
            wake: None,
            reserve: Script::from_lua(RESERVE),
            reserve_batch: Script::from_lua(RESERVE_BATCH),
            release: Script::from_lua(RELEASE),
            preheat: Script::from_lua(PREHEAT),
            pause: Script::from_lua(PAUSE),
            status: Script::from_lua(STATUS),
            unlock: Script::from_lua(UNLOCK),
            retire: Script::from_lua(RETIRE),
        }
    }

    /// Uses `clock` instead of Redis `TIME` in `reserve` (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Makes each win as durable as `durability` asks before it is answered (`replicas:N`:
    /// `WAIT N` after the script; `fsync` is Redis's own doing and `none` asks nothing).
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.replica_wait = ReplicaWait::for_setting(durability);
        self
    }

    /// Tells `wake` of every win (this process's outbox relay).
    pub fn with_wake(mut self, wake: Arc<OutboxWake>) -> Self {
        self.wake = Some(wake);
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Loads every script (on every cluster primary).
    pub async fn load_scripts(&self) -> Result<(), Unavailable> {
        for script in [
            &self.reserve,
            &self.reserve_batch,
            &self.release,
            &self.preheat,
            &self.pause,
            &self.status,
            &self.unlock,
            &self.retire,
        ] {
            for client in self.pool.clients() {
                script.load(client).await?;
            }
        }
        Ok(())
    }

    /// Decides one purchase attempt (`reserve.lua`); under `replicas:N` a win is answered only
    /// after its replicas took it (or the wait ran out: see [`Replication`]).
    #[tracing::instrument(skip_all, fields(%user, %product))]
    pub async fn reserve(&self, user: UserId, product: ProductId) -> Result<Decision, Unavailable> {
        let k = self.keys.product(product);
        let keys = vec![
            k.state.clone(),
            k.buyers.clone(),
            k.pending.clone(),
            k.outbox.clone(),
            k.status.clone(),
            k.user_rate(user),
            k.gate.clone(),
        ];
        let [user_limit, window_ms, gate_count, gate_period_us] = self.rate_args();
        let args = vec![
            user.to_string(),
            Uuid::now_v7().to_string(),
            product.to_string(),
            user_limit,
            window_ms,
            gate_count,
            gate_period_us,
            self.clock.arg(),
        ];
        // One client for the script and the `WAIT`: it covers only its own connection's writes.
        let client = self.pool.next();
        let reply: ReserveReply = self.reserve.evalsha_with_reload(client, keys, args).await?;
        let mut decisions = vec![decode_reserve(reply)?];
        self.after_decisions(client, product, &k.state, &mut decisions)
            .await;
        Ok(decisions.swap_remove(0))
    }

    /// Decides many purchase attempts on one product in one script call
    /// (`reserve_batch.lua`): exactly what [`Self::reserve`] would answer for each, called in
    /// `users`' order at one instant (a user may appear more than once). Under `replicas:N`
    /// one `WAIT` covers every win of the batch.
    #[tracing::instrument(skip_all, fields(%product, attempts = users.len()))]
    pub async fn reserve_many(
        &self,
        product: ProductId,
        users: &[UserId],
    ) -> Result<Vec<Decision>, Unavailable> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys.product(product);
        let mut keys = Vec::with_capacity(6 + users.len());
        keys.extend([
            k.state.clone(),
            k.buyers.clone(),
            k.pending.clone(),
            k.outbox.clone(),
            k.status.clone(),
            k.gate.clone(),
        ]);
        keys.extend(users.iter().map(|u| k.user_rate(*u)));
        let mut args = Vec::with_capacity(6 + 2 * users.len());
        args.push(product.to_string());
        args.extend(self.rate_args());
        args.push(self.clock.arg());
        for user in users {
            args.push(user.to_string());
            args.push(Uuid::now_v7().to_string());
        }
        let client = self.pool.next();
        let reply: Vec<Value> = self
            .reserve_batch
            .evalsha_with_reload(client, keys, args)
            .await?;
        let mut decisions = decode_reserve_batch(reply, users.len())?;
        self.after_decisions(client, product, &k.state, &mut decisions)
            .await;
        Ok(decisions)
    }

    /// The user window and product gate as the reserve scripts take them: user limit, window
    /// ms, gate count, gate period µs.
    fn rate_args(&self) -> [String; 4] {
        let period_us = u64::try_from(self.product_rate.period.as_micros()).unwrap_or(u64::MAX);
        [
            self.user_rate.count.to_string(),
            self.user_rate.period_ms().to_string(),
            self.product_rate.count.to_string(),
            period_us.to_string(),
        ]
    }

    /// After a reserve call: wakes this process's relay, and under `replicas:N` waits (on the
    /// script's own connection, for the slot of `state_key`) for the replicas to take the wins.
    async fn after_decisions(
        &self,
        client: &Client,
        product: ProductId,
        state_key: &str,
        decisions: &mut [Decision],
    ) {
        let won = decisions
            .iter()
            .any(|d| matches!(d.outcome, Outcome::Won { .. }));
        if !won {
            return;
        }
        if let Some(wake) = &self.wake {
            wake.won(product);
        }
        if let Some(wait) = &self.replica_wait {
            let slot = fred::util::redis_keyslot(state_key.as_bytes());
            let replication = wait.after_win(client, slot).await;
            for d in decisions
                .iter_mut()
                .filter(|d| matches!(d.outcome, Outcome::Won { .. }))
            {
                d.replication = replication;
            }
        }
    }

    /// Returns the unit of `reservation` to stock, exactly once; records `status_json`.
    #[tracing::instrument(skip_all, fields(%product, %reservation))]
    pub async fn release(
        &self,
        product: ProductId,
        reservation: Uuid,
        status_json: &str,
    ) -> Result<Released, Unavailable> {
        let k = self.keys.product(product);
        let reply: (i64, i64) = self
            .release
            .evalsha_with_reload(
                self.pool.next(),
                vec![k.state, k.released, k.status],
                vec![
                    reservation.to_string(),
                    status_json.to_owned(),
                    product.to_string(),
                    self.keys.events(),
                ],
            )
            .await?;
        decode_release(reply)
    }

    /// Records a reservation's new status (never backwards) and tells its SSE streams.
    /// Returns whether it changed.
    pub async fn record_status(
        &self,
        product: ProductId,
        user: UserId,
        view: &ReservationView,
    ) -> Result<bool, Unavailable> {
        Ok(self.record_statuses(product, &[(user, view)]).await? == 1)
    }

    /// [`Self::record_status`] for many reservations of one product in one script call
    /// (chunked); returns how many changed.
    pub async fn record_statuses(
        &self,
        product: ProductId,
        updates: &[(UserId, &ReservationView)],
    ) -> Result<i64, Unavailable> {
        let k = self.keys.product(product);
        let mut changed = 0;
        for chunk in updates.chunks(STATUS_CHUNK) {
            let mut args = Vec::with_capacity(1 + chunk.len() * 5);
            args.push(self.keys.events());
            for (user, view) in chunk {
                args.push(view.reservation_id.to_string());
                args.push(view.to_json());
                args.push(view.status.rank().to_string());
                args.push(status_event(product, *user));
                args.push(user.to_string());
            }
            let n: i64 = self
                .status
                .evalsha_with_reload(
                    self.pool.next(),
                    vec![
                        k.status.clone(),
                        k.pending.clone(),
                        k.state.clone(),
                        k.buyers.clone(),
                    ],
                    args,
                )
                .await?;
            changed += n;
        }
        Ok(changed)
    }

    /// Tells the user's SSE streams to look again.
    pub async fn notify_status(&self, product: ProductId, user: UserId) -> Result<(), Unavailable> {
        let _: i64 = self
            .pool
            .next()
            .publish(self.keys.events(), status_event(product, user))
            .await?;
        Ok(())
    }

    /// Pauses (or resumes) reservations of `product`.
    pub async fn set_paused(&self, product: ProductId, paused: bool) -> Result<(), Unavailable> {
        let k = self.keys.product(product);
        let _: i64 = self
            .pause
            .evalsha_with_reload(
                self.pool.next(),
                vec![k.state],
                vec![if paused { "1" } else { "0" }],
            )
            .await?;
        Ok(())
    }

    /// Reservation ids won but not yet persisted.
    pub async fn pending_ids(&self, product: ProductId) -> Result<HashSet<Uuid>, Unavailable> {
        let ids: Vec<String> = self
            .pool
            .smembers(self.keys.product(product).pending)
            .await?;
        ids.iter().map(|s| parse_uuid(s)).collect()
    }

    /// Loads the sale described by `plan`: buyers first (in chunks), then stock and window.
    pub async fn preheat(&self, plan: &PreheatPlan) -> Result<Preheated, Unavailable> {
        let k = self.keys.product(plan.product);
        for chunk in plan.buyers.chunks(BUYER_CHUNK) {
            let pairs: Vec<(String, String)> = chunk
                .iter()
                .map(|(u, r)| (u.to_string(), r.to_string()))
                .collect();
            let _: i64 = self.pool.hset(&k.buyers, pairs).await?;
        }
        let _: i64 = self
            .pool
            .sadd(self.keys.products(), plan.product.get())
            .await?;
        self.load_scripts().await?;
        let mut args = vec![
            plan.stock.to_string(),
            plan.remaining().to_string(),
            plan.starts_ms.to_string(),
            plan.ends_ms.to_string(),
            if plan.force { "1" } else { "0" }.to_owned(),
            self.keys.events(),
            plan.product.to_string(),
        ];
        args.extend(plan.closed.iter().map(Uuid::to_string));
        let (code, remaining, buyers): (i64, i64, i64) = self
            .preheat
            .evalsha_with_reload(self.pool.next(), vec![k.state, k.buyers, k.released], args)
            .await?;
        Ok(if code == 1 {
            Preheated::Loaded { remaining, buyers }
        } else {
            Preheated::AlreadyLive { remaining, buyers }
        })
    }

    /// Takes the product's rebuild lock; `None` if another rebuild holds it. The lock expires
    /// by itself if its holder dies.
    pub async fn lock_rebuild(&self, product: ProductId) -> Result<Option<String>, Unavailable> {
        let token = Uuid::now_v7().to_string();
        let taken: Option<String> = self
            .pool
            .set(
                self.keys.product(product).rebuild,
                token.as_str(),
                Some(Expiration::PX(REBUILD_LOCK_TTL_MS as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(taken.map(|_| token))
    }

    /// Releases the rebuild lock taken with `token` (a no-op if it expired meanwhile).
    pub async fn unlock_rebuild(&self, product: ProductId, token: &str) -> Result<(), Unavailable> {
        let _: i64 = self
            .unlock
            .evalsha_with_reload(
                self.pool.next(),
                vec![self.keys.product(product).rebuild],
                vec![token.to_owned()],
            )
            .await?;
        Ok(())
    }

    /// Whether a preheat or rebuild of the product holds its rebuild lock right now.
    pub async fn being_rebuilt(&self, product: ProductId) -> Result<bool, Unavailable> {
        Ok(self.pool.exists(self.keys.product(product).rebuild).await?)
    }

    /// Entries of the product's outbox not yet relayed to RabbitMQ.
    pub async fn outbox_len(&self, product: ProductId) -> Result<i64, Unavailable> {
        Ok(self.pool.xlen(self.keys.product(product).outbox).await?)
    }

    /// Gives an ended, drained sale's keys an expiry of `grace` (see `lua/retire.lua`). The
    /// caller has checked, after seeing the outbox and the pending set empty, that no order of
    /// the product can still change them.
    pub async fn retire(
        &self,
        product: ProductId,
        grace: Duration,
    ) -> Result<Retired, Unavailable> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let reply: (i64, i64) = self
            .retire
            .evalsha_with_reload(
                self.pool.next(),
                self.keys.product(product).lasting(),
                vec![grace_ms.to_string()],
            )
            .await?;
        decode_retire(reply)
    }

    /// Takes a retired product off the relay's list.
    pub async fn forget(&self, product: ProductId) -> Result<(), Unavailable> {
        let _: i64 = self.pool.srem(self.keys.products(), product.get()).await?;
        Ok(())
    }

    /// Units left on sale, or `None` if the product is not in Redis.
    pub async fn remaining(&self, product: ProductId) -> Result<Option<i64>, Unavailable> {
        let v: Option<i64> = self
            .pool
            .hget(self.keys.product(product).state, "remaining")
            .await?;
        Ok(v)
    }

    /// How many winners are not yet persisted.
    pub async fn pending_count(&self, product: ProductId) -> Result<i64, Unavailable> {
        Ok(self.pool.scard(self.keys.product(product).pending).await?)
    }

    /// Whether the product is loaded (and not merely paused).
    pub async fn is_preheated(&self, product: ProductId) -> Result<bool, Unavailable> {
        Ok(self
            .pool
            .hexists(self.keys.product(product).state, "stock")
            .await?)
    }

    /// What an operator watches of a sale in Redis, in one round trip per key: units left
    /// (`None` until preheated), whether it is loaded, whether a forced rebuild paused it,
    /// and winners not yet persisted.
    pub async fn figures(&self, product: ProductId) -> Result<SaleFigures, Unavailable> {
        let k = self.keys.product(product);
        type State = (Option<i64>, Option<i64>, Option<String>);
        let ((stock, remaining, paused), pending): (State, i64) = tokio::try_join!(
            self.pool
                .hmget(k.state, vec!["stock", "remaining", "paused"]),
            self.pool.scard(k.pending)
        )?;
        Ok(SaleFigures {
            preheated: stock.is_some(),
            remaining,
            paused: paused.as_deref() == Some("1"),
            pending,
        })
    }

    /// Whether Redis holds the product's whole buyer list: the product is loaded (its state
    /// has `stock`; a preheat or rebuild writes it after every buyer Postgres knows) and its
    /// buyers hash exists. A shopper not in that list never won the product. (Before the first
    /// win there is no buyers hash, and after a loss no state: then Redis cannot say.)
    pub async fn knows_every_buyer(&self, product: ProductId) -> Result<bool, Unavailable> {
        let k = self.keys.product(product);
        let (loaded, buyers): (bool, i64) = tokio::try_join!(
            self.pool.hexists(k.state, "stock"),
            self.pool.exists(k.buyers)
        )?;
        Ok(loaded && buyers > 0)
    }

    /// The user's reservation id for `product`, if they won one.
    pub async fn reservation_of(
        &self,
        product: ProductId,
        user: UserId,
    ) -> Result<Option<Uuid>, Unavailable> {
        let id: Option<String> = self
            .pool
            .hget(self.keys.product(product).buyers, user.to_string())
            .await?;
        id.as_deref().map(parse_uuid).transpose()
    }

    /// The raw status of a reservation (`pending` or the order's JSON).
    pub async fn status_of(
        &self,
        product: ProductId,
        reservation: Uuid,
    ) -> Result<Option<String>, Unavailable> {
        Ok(self
            .pool
            .hget(self.keys.product(product).status, reservation.to_string())
            .await?)
    }
}

/// The pub/sub message announcing a status change of (product, user).
pub fn status_event(product: ProductId, user: UserId) -> String {
    format!("status:{product}:{user}")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn plan(stock: i64, live: i64, buyers: &[u128], pending: &[u128]) -> PreheatPlan {
        PreheatPlan {
            product: ProductId::try_from(1_i64).unwrap(),
            stock,
            live_orders: live,
            buyers: buyers
                .iter()
                .enumerate()
                .map(|(i, r)| (UserId::try_from(i as i64 + 1).unwrap(), Uuid::from_u128(*r)))
                .collect(),
            pending: pending.iter().map(|r| Uuid::from_u128(*r)).collect(),
            closed: Vec::new(),
            starts_ms: 0,
            ends_ms: 1,
            force: true,
        }
    }

    #[test]
    fn remaining_counts_units_in_flight_once() {
        // 10 units, 3 live orders in Postgres; pending 2 and 3 are persisted already, 9 is not.
        assert_eq!(plan(10, 3, &[1, 2, 3], &[2, 3, 9]).remaining(), 6);
        assert_eq!(plan(10, 0, &[], &[]).remaining(), 10);
        // Never below zero, never above stock.
        assert_eq!(plan(2, 5, &[], &[7]).remaining(), 0);
        assert_eq!(plan(2, -3, &[], &[]).remaining(), 2);
    }

    fn reply(code: i64, id: &str) -> ReserveReply {
        (code, id.to_owned(), 4, 1, 0, 900, 250)
    }

    #[test]
    fn every_reserve_code_decodes_and_an_unknown_one_is_an_error() {
        let id = "0190a000-0000-7000-8000-000000000001";
        let rid = Uuid::parse_str(id).unwrap();
        let cases = [
            (
                0,
                Outcome::Won {
                    reservation_id: rid,
                    remaining: 4,
                },
            ),
            (
                1,
                Outcome::AlreadyReserved {
                    reservation_id: rid,
                },
            ),
            (2, Outcome::SoldOut),
            (
                3,
                Outcome::RateLimited {
                    retry_after: Duration::from_millis(250),
                },
            ),
            (
                4,
                Outcome::RateLimited {
                    retry_after: Duration::from_millis(250),
                },
            ),
            (5, Outcome::NotStarted),
            (6, Outcome::Ended),
            (7, Outcome::Paused),
            (8, Outcome::UnknownProduct),
        ];
        for (code, outcome) in cases {
            let d = decode_reserve(reply(code, id)).unwrap();
            assert_eq!(d.outcome, outcome, "code {code}");
            assert_eq!(
                d.window,
                RateWindow {
                    limit: 1,
                    remaining: 0,
                    reset: Duration::from_millis(900)
                }
            );
        }
        for bad in [
            reply(9, id),
            reply(-1, id),
            reply(0, ""),
            reply(1, "not-a-uuid"),
        ] {
            assert!(decode_reserve(bad).is_err());
        }
    }

    /// `reply` as `reserve_batch.lua` sends it: seven flat values.
    fn flat(code: i64, id: &str) -> Vec<Value> {
        let (code, id, remaining, limit, left, reset_ms, retry_ms) = reply(code, id);
        vec![
            Value::Integer(code),
            Value::from(id),
            Value::Integer(remaining),
            Value::Integer(limit),
            Value::Integer(left),
            Value::Integer(reset_ms),
            Value::Integer(retry_ms),
        ]
    }

    #[test]
    fn a_batch_reply_decodes_attempt_by_attempt_and_a_misshapen_one_is_an_error() {
        let id = "0190a000-0000-7000-8000-000000000001";
        let mut two = flat(0, id);
        two.extend(flat(2, ""));
        let decisions = decode_reserve_batch(two.clone(), 2).unwrap();
        assert_eq!(
            decisions,
            vec![
                decode_reserve(reply(0, id)).unwrap(),
                decode_reserve(reply(2, "")).unwrap()
            ]
        );
        assert!(decode_reserve_batch(two.clone(), 3).is_err(), "too short");
        assert!(decode_reserve_batch(two.clone(), 1).is_err(), "too long");
        let mut not_a_number = two;
        not_a_number[9] = Value::from("many");
        assert!(decode_reserve_batch(not_a_number, 2).is_err());
        assert!(
            decode_reserve_batch(flat(9, id), 1).is_err(),
            "unknown code"
        );
        assert_eq!(decode_reserve_batch(Vec::new(), 0).unwrap(), Vec::new());
    }

    #[test]
    fn every_release_code_decodes_and_an_unknown_one_is_an_error() {
        assert_eq!(
            decode_release((1, 7)).unwrap(),
            Released::Returned { remaining: 7 }
        );
        assert_eq!(decode_release((0, 7)).unwrap(), Released::AlreadyReturned);
        assert_eq!(decode_release((-1, -1)).unwrap(), Released::NotPreheated);
        for bad in [2, -2, 99] {
            assert!(decode_release((bad, 0)).is_err(), "code {bad}");
        }
    }

    #[test]
    fn every_retire_code_decodes_and_an_unknown_one_is_an_error() {
        assert_eq!(
            decode_retire((1, 86_400_000)).unwrap(),
            Retired::Expiring {
                ttl: Duration::from_secs(86_400)
            }
        );
        assert_eq!(decode_retire((0, -1)).unwrap(), Retired::NotYet);
        assert_eq!(decode_retire((-1, -1)).unwrap(), Retired::NotInRedis);
        assert!(decode_retire((2, 0)).is_err());
    }

    #[test]
    fn outcome_labels_are_one_list() {
        let all = [
            Outcome::Won {
                reservation_id: Uuid::nil(),
                remaining: 0,
            },
            Outcome::AlreadyReserved {
                reservation_id: Uuid::nil(),
            },
            Outcome::SoldOut,
            Outcome::RateLimited {
                retry_after: Duration::ZERO,
            },
            Outcome::NotStarted,
            Outcome::Ended,
            Outcome::Paused,
            Outcome::UnknownProduct,
        ];
        let labels: Vec<&str> = all.iter().map(Outcome::label).collect();
        assert_eq!(labels, Outcome::LABELS);
    }

    const ALL_STATUSES: [Status; 6] = [
        Status::Pending,
        Status::Confirmed,
        Status::Paid,
        Status::Cancelled,
        Status::Expired,
        Status::Rejected,
    ];

    /// The `local rank = { name = n, ... }` table of `status.lua`.
    fn lua_ranks() -> HashMap<String, u8> {
        let line = STATUS
            .lines()
            .find(|l| l.trim_start().starts_with("local rank = {"))
            .expect("status.lua has a rank table");
        let inner = line.split_once('{').unwrap().1.split_once('}').unwrap().0;
        inner
            .split(',')
            .map(|pair| {
                let (name, n) = pair.split_once('=').unwrap();
                (name.trim().to_owned(), n.trim().parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn the_rust_and_lua_status_rankings_agree() {
        let lua = lua_ranks();
        assert_eq!(lua.len(), ALL_STATUSES.len(), "{lua:?}");
        for status in ALL_STATUSES {
            let name = serde_json::to_value(status).unwrap();
            let name = name.as_str().unwrap();
            assert_eq!(lua.get(name), Some(&status.rank()), "{name}");
            assert_eq!(Status::parse(name), Some(status));
        }
        assert_eq!(Status::parse("pending_payment"), None);
    }

    #[test]
    fn the_redis_status_round_trips() {
        let id = Uuid::now_v7();
        assert_eq!(
            ReservationView::from_redis(id, "pending"),
            Some(ReservationView::pending(id))
        );
        let v = ReservationView {
            reservation_id: id,
            status: Status::Confirmed,
            order_id: Some(Uuid::now_v7()),
            expires_at: Some(Utc::now()),
            reason: None,
        };
        assert_eq!(
            ReservationView::from_redis(id, &v.to_json()),
            Some(v.clone())
        );
        assert!(v.to_json().contains(r#""status":"confirmed""#));
        assert!(!v.is_terminal());
        assert!(ReservationView::from_redis(id, "garbage").is_none());
        assert!(ReservationView::from_redis(id, "paid").is_none());
        assert!(!v.to_json().contains("reason"));

        let rejected = ReservationView::rejected(id, "sold out");
        assert!(rejected.is_terminal());
        assert_eq!(
            ReservationView::from_redis(id, &rejected.to_json()),
            Some(rejected.clone())
        );
        let json: serde_json::Value = serde_json::from_str(&rejected.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"reservation_id": id, "status": "rejected", "reason": "sold out"})
        );
    }
}
