//! The atomic reservation: every decision about a unit of stock is one Lua script call.
//!
//! `reserve.lua` decides a purchase attempt (sale window, user rate window, product admission
//! gate, dedup, stock, outbox) in one step; `release.lua` returns a unit exactly once;
//! `preheat.lua` loads a sale; `pause.lua` pauses a product while a forced preheat rebuilds it.
//! Scripts run by SHA and are reloaded on `NOSCRIPT` (empty script cache after a restart).

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use fred::{prelude::*, types::scripts::Script};
use uuid::Uuid;

use crate::{
    config::Rate,
    domain::{ProductId, UserId},
    keys::Keys,
};

static RESERVE: &str = include_str!("../lua/reserve.lua");
static RELEASE: &str = include_str!("../lua/release.lua");
static PREHEAT: &str = include_str!("../lua/preheat.lua");
static PAUSE: &str = include_str!("../lua/pause.lua");
static STATUS: &str = include_str!("../lua/status.lua");

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

impl Outcome {
    /// A stable label (metrics, logs).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Won { .. } => "won",
            Outcome::AlreadyReserved { .. } => "already_reserved",
            Outcome::SoldOut => "sold_out",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::NotStarted => "not_started",
            Outcome::Ended => "ended",
            Outcome::Paused => "paused",
            Outcome::UnknownProduct => "unknown_product",
        }
    }
}

/// The user's rate window as the script saw it (for `RateLimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateWindow {
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

/// A decision: the outcome plus the user's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub window: RateWindow,
}

/// Redis could not be reached (or answered nonsense): the caller answers `503`.
#[derive(Debug, thiserror::Error)]
#[error("Redis is unavailable: {0}")]
pub struct Unavailable(String);

impl From<fred::error::Error> for Unavailable {
    fn from(e: fred::error::Error) -> Self {
        Unavailable(e.to_string())
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
    reserve: Script,
    release: Script,
    preheat: Script,
    pause: Script,
    status: Script,
}

fn parse_uuid(s: &str) -> Result<Uuid, Unavailable> {
    Uuid::parse_str(s).map_err(|_| Unavailable(format!("bad reservation id in Redis: {s:?}")))
}

impl Reservations {
    pub fn new(pool: Pool, keys: Keys, user_rate: Rate, product_rate: Rate) -> Self {
        Self {
            pool,
            keys,
            user_rate,
            product_rate,
            clock: Clock::Redis,
            reserve: Script::from_lua(RESERVE),
            release: Script::from_lua(RELEASE),
            preheat: Script::from_lua(PREHEAT),
            pause: Script::from_lua(PAUSE),
            status: Script::from_lua(STATUS),
        }
    }

    /// Uses `clock` instead of Redis `TIME` in `reserve` (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
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
            &self.release,
            &self.preheat,
            &self.pause,
            &self.status,
        ] {
            for client in self.pool.clients() {
                script.load(client).await?;
            }
        }
        Ok(())
    }

    /// Decides one purchase attempt.
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
        let period_us = u64::try_from(self.product_rate.period.as_micros()).unwrap_or(u64::MAX);
        let args = vec![
            user.to_string(),
            Uuid::now_v7().to_string(),
            product.to_string(),
            self.user_rate.count.to_string(),
            self.user_rate.period_ms().to_string(),
            self.product_rate.count.to_string(),
            period_us.to_string(),
            self.clock.arg(),
        ];
        let (code, id, remaining, limit, left, reset_ms, retry_ms): (
            i64,
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = self
            .reserve
            .evalsha_with_reload(self.pool.next(), keys, args)
            .await?;
        let window = RateWindow {
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            remaining: u32::try_from(left).unwrap_or(0),
            reset: Duration::from_millis(u64::try_from(reset_ms).unwrap_or(0)),
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
                retry_after: Duration::from_millis(u64::try_from(retry_ms).unwrap_or(0)),
            },
            5 => Outcome::NotStarted,
            6 => Outcome::Ended,
            7 => Outcome::Paused,
            8 => Outcome::UnknownProduct,
            other => return Err(Unavailable(format!("reserve.lua answered code {other}"))),
        };
        Ok(Decision { outcome, window })
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
        let (code, remaining): (i64, i64) = self
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
        Ok(match code {
            1 => Released::Returned { remaining },
            0 => Released::AlreadyReturned,
            _ => Released::NotPreheated,
        })
    }

    /// Records a reservation's new status (never backwards) and tells its SSE streams.
    /// Returns whether it changed.
    pub async fn record_status(
        &self,
        product: ProductId,
        user: UserId,
        view: &crate::orders::ReservationView,
    ) -> Result<bool, Unavailable> {
        Ok(self.record_statuses(product, &[(user, view)]).await? == 1)
    }

    /// [`Self::record_status`] for many reservations of one product in one script call
    /// (chunked); returns how many changed.
    pub async fn record_statuses(
        &self,
        product: ProductId,
        updates: &[(UserId, &crate::orders::ReservationView)],
    ) -> Result<i64, Unavailable> {
        let k = self.keys.product(product);
        let mut changed = 0;
        for chunk in updates.chunks(STATUS_CHUNK) {
            let mut args = Vec::with_capacity(1 + chunk.len() * 4);
            args.push(self.keys.events());
            for (user, view) in chunk {
                let rank = match view.status.as_str() {
                    "pending" => 0,
                    "confirmed" => 1,
                    _ => 2,
                };
                args.push(view.reservation_id.to_string());
                args.push(view.to_json());
                args.push(rank.to_string());
                args.push(status_event(product, *user));
            }
            let n: i64 = self
                .status
                .evalsha_with_reload(
                    self.pool.next(),
                    vec![k.status.clone(), k.pending.clone()],
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
        let (code, remaining, buyers): (i64, i64, i64) = self
            .preheat
            .evalsha_with_reload(
                self.pool.next(),
                vec![k.state, k.buyers],
                vec![
                    plan.stock.to_string(),
                    plan.remaining().to_string(),
                    plan.starts_ms.to_string(),
                    plan.ends_ms.to_string(),
                    if plan.force { "1" } else { "0" }.to_owned(),
                    self.keys.events(),
                    plan.product.to_string(),
                ],
            )
            .await?;
        Ok(if code == 1 {
            Preheated::Loaded { remaining, buyers }
        } else {
            Preheated::AlreadyLive { remaining, buyers }
        })
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
}
