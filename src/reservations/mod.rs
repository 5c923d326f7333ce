//! The Redis gate: every decision about a unit of stock is one Lua script call.
//!
//! - [`decide`](self::decide): `reserve.lua` decides purchase attempts (sale window, user
//!   rate window, product admission gate, dedup, stock, outbox) in one atomic step, one or
//!   many per call; the [`Outcome`] and [`Decision`] it answers, decoded purely.
//! - [`lifecycle`](self::lifecycle): where a won reservation stands ([`Status`],
//!   [`ReservationView`]), recorded through `status.lua` (never backwards); `release.lua`
//!   returns a closed order's unit exactly once.
//! - [`sale`](self::sale): loading a sale (`preheat.lua`), pausing it while a forced preheat
//!   rebuilds it (`pause.lua`), the rebuild lock, retiring it (`retire.lua`), and the figures
//!   an operator watches.
//!
//! Scripts run by SHA and are reloaded on `NOSCRIPT` (empty script cache after a restart).
//! Under `SECKILL_REDIS_DURABILITY=replicas:N` a win waits for its replicas before it is
//! answered ([`crate::durability::ReplicaWait`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use fred::{prelude::*, types::scripts::Script};
use uuid::Uuid;

use crate::{
    config::{Durability, Rate},
    durability::ReplicaWait,
    keys::Keys,
    outbox::OutboxWake,
};

mod decide;
mod lifecycle;
mod moment;
mod sale;

pub use decide::{Decision, Outcome, RateWindow, decode_reserve};
pub use lifecycle::{Released, ReservationView, Status, decode_release, status_event};
pub use moment::{Fences, Moment};
pub use sale::{
    Checked, PreheatPlan, Preheated, Retired, SaleFigures, decode_behind, decode_retire,
};

static RESERVE: &str = include_str!("../../lua/reserve.lua");
static RELEASE: &str = include_str!("../../lua/release.lua");
static PREHEAT: &str = include_str!("../../lua/preheat.lua");
static PAUSE: &str = include_str!("../../lua/pause.lua");
static STATUS: &str = include_str!("../../lua/status.lua");
static UNLOCK: &str = include_str!("../../lua/unlock.lua");
static RETIRE: &str = include_str!("../../lua/retire.lua");
static BEHIND: &str = include_str!("../../lua/behind.lua");

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

/// Redis could not be reached (or answered nonsense): the caller answers `503`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("Redis did not answer")]
    Redis(#[from] fred::error::Error),
    #[error("Redis answered unexpectedly: {0}")]
    BadReply(String),
    /// A win's wait for its replicas failed: the connection that ran the script broke, so the
    /// primary (and the win) may be gone. Never answered `202`.
    #[error("the win could not be confirmed on its replicas: the connection to the primary broke")]
    Unconfirmed,
}

fn parse_uuid(s: &str) -> Result<Uuid, Unavailable> {
    Uuid::parse_str(s).map_err(|_| Unavailable::BadReply(format!("bad reservation id {s:?}")))
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
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
    /// The latest moment this process saw of each product (shared by every clone).
    fences: Arc<Fences>,
    /// `SECKILL_KEY_GRACE_SECS`: the expiry of a key a script creates for a sale Redis does
    /// not hold (it would otherwise outlive it).
    key_grace: Duration,
    reserve: Script,
    release: Script,
    preheat: Script,
    pause: Script,
    status: Script,
    unlock: Script,
    retire: Script,
    behind: Script,
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
            fences: Arc::default(),
            key_grace: Duration::from_secs(86_400),
            reserve: Script::from_lua(RESERVE),
            release: Script::from_lua(RELEASE),
            preheat: Script::from_lua(PREHEAT),
            pause: Script::from_lua(PAUSE),
            status: Script::from_lua(STATUS),
            unlock: Script::from_lua(UNLOCK),
            retire: Script::from_lua(RETIRE),
            behind: Script::from_lua(BEHIND),
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

    /// Gives a key a script creates for a sale Redis does not hold the expiry `grace`.
    pub fn with_key_grace(mut self, grace: Duration) -> Self {
        self.key_grace = grace;
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

    /// The latest moment this process saw of each product.
    pub fn fences(&self) -> &Fences {
        &self.fences
    }

    /// Loads every script (on every cluster primary).
    pub async fn load_scripts(&self) -> Result<(), Unavailable> {
        for script in [
            &self.reserve,
            &self.release,
            &self.preheat,
            &self.pause,
            &self.status,
            &self.unlock,
            &self.retire,
            &self.behind,
        ] {
            for client in self.pool.clients() {
                script.load(client).await?;
            }
        }
        Ok(())
    }
}
