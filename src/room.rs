//! A product's waiting room (`waiting_room: true` at creation): shoppers join from
//! `SECKILL_ROOM_OPENS_SECS` before the start; at the start everyone who joined so far is put in
//! a uniformly random order, later arrivals queue behind in arrival order; the room admits the
//! next places while the admitted-but-undecided shoppers are at most `remaining × factor`, at a
//! capped rate; an admitted shopper gets an admission token, which the purchase-token endpoint
//! requires. Every step is one call of `lua/room.lua` (how the order is made uniform is written
//! there and in docs/fairness.md). Every `serve` process runs [`admit_rooms`], a few times a
//! second per live room: the calls are atomic, so several processes admitting at once admit
//! each place once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use fred::{prelude::*, types::scripts::Script};
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

pub use crate::config::RoomSettings;
use crate::{
    backoff::sleep_or_stop,
    domain::{ProductId, UserId},
    keys::Keys,
    reservations::Unavailable,
};

static ROOM: &str = include_str!("../lua/room.lua");

/// How often each `serve` process runs the admission of every live room.
pub const ADMIT_EVERY: Duration = Duration::from_millis(250);

/// What joining answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Before `opens_at`.
    NotOpen,
    /// In the room before the start: the place is drawn at the start. `joined` so far.
    AwaitingDraw { joined: i64 },
    /// The shopper's place in line (1 is first).
    Placed(i64),
}

/// Where a shopper stands in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// `None`: not in the room.
    pub place: Option<Place>,
    /// Places admitted so far (every place up to it).
    pub admitted: i64,
    /// Shoppers in the room.
    pub total: i64,
    /// Admitted and undecided until then (ms since the epoch, Redis' clock).
    pub admitted_until: Option<i64>,
    /// Units on sale (`None`: the sale is not in Redis).
    pub remaining: Option<i64>,
}

/// A place, or none yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    AwaitingDraw,
    At(i64),
}

/// One pass of admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub admitted: i64,
    pub total: i64,
    pub undecided: i64,
    pub remaining: Option<i64>,
}

/// The rooms of one Redis.
#[derive(Clone)]
pub struct Rooms {
    pool: Pool,
    keys: Keys,
    script: Script,
    pub settings: RoomSettings,
    /// Each room as this process's admission passes saw it.
    seen: Arc<Mutex<HashMap<ProductId, Seen>>>,
}

/// A room at this process's admission passes: the last pass's figures (the console's), and
/// the join rate (joins a second between the last two measures at least 0.2 s apart).
#[derive(Debug, Clone, Copy)]
struct Seen {
    last: Admission,
    measured_at: Instant,
    measured_total: i64,
    rate: f64,
}

fn ms(t: DateTime<Utc>) -> String {
    t.timestamp_millis().to_string()
}

impl Rooms {
    pub fn new(pool: Pool, keys: Keys, settings: RoomSettings) -> Self {
        Self {
            pool,
            keys,
            script: Script::from_lua(ROOM),
            settings,
            seen: Arc::default(),
        }
    }

    fn seen(&self, product: ProductId) -> Option<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&product)
            .copied()
    }

    /// `product`'s room at this process's last admission pass (none yet: `None`).
    pub fn last_pass(&self, product: ProductId) -> Option<Admission> {
        self.seen(product).map(|s| s.last)
    }

    /// Shoppers joining `product`'s room per second, lately (0 before any measure).
    pub fn join_rate(&self, product: ProductId) -> f64 {
        self.seen(product).map_or(0.0, |s| s.rate)
    }

    /// Records an admission pass: its figures, and the join rate since the last measure.
    fn saw(&self, product: ProductId, pass: Admission) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let s = seen.entry(product).or_insert(Seen {
            last: pass,
            measured_at: now,
            measured_total: pass.total,
            rate: 0.0,
        });
        s.last = pass;
        let secs = now.duration_since(s.measured_at).as_secs_f64();
        if secs >= 0.2 {
            s.rate = (pass.total - s.measured_total).max(0) as f64 / secs;
            (s.measured_at, s.measured_total) = (now, pass.total);
        }
    }

    /// The proof-of-work difficulty for joining `product`'s room now.
    pub fn difficulty(&self, product: ProductId) -> u32 {
        crate::pow::difficulty(self.join_rate(product), &self.settings.pow)
    }

    /// Marks a challenge's nonce used (until `exp`, Unix seconds); `false` if it was already.
    pub async fn use_challenge(
        &self,
        product: ProductId,
        nonce: &str,
        exp: u64,
    ) -> Result<bool, Unavailable> {
        let key = self.keys.product(product).pow_nonce(nonce);
        let until_ms =
            i64::try_from(exp.saturating_mul(1000).saturating_add(1000)).unwrap_or(i64::MAX);
        let set: Option<String> = self
            .pool
            .set(
                key,
                "1",
                Some(fred::types::Expiration::PXAT(until_ms)),
                Some(fred::types::SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.is_some())
    }

    /// When joining `starts_at`'s room opens.
    pub fn opens_at(&self, starts_at: DateTime<Utc>) -> DateTime<Utc> {
        starts_at - chrono::Duration::from_std(self.settings.opens_before).unwrap_or_default()
    }

    fn room_keys(&self, product: ProductId) -> Vec<String> {
        let k = self.keys.product(product);
        let [room, early, late, undecided] = k.room;
        vec![room, early, late, undecided, k.state, k.buyers]
    }

    async fn call(&self, product: ProductId, args: Vec<String>) -> Result<Vec<i64>, Unavailable> {
        Ok(self
            .script
            .evalsha_with_reload(self.pool.next(), self.room_keys(product), args)
            .await?)
    }

    /// Joins `user` to `product`'s room (a second join answers the same place). `random`
    /// orders the shoppers who join before the start: it must be drawn uniformly and
    /// independently for each join ([`draw_key`]).
    pub async fn join(
        &self,
        product: ProductId,
        user: UserId,
        starts_at: DateTime<Utc>,
        random: u64,
    ) -> Result<Joined, Unavailable> {
        let reply = self
            .call(
                product,
                vec![
                    "join".into(),
                    user.to_string(),
                    random.to_string(),
                    ms(self.opens_at(starts_at)),
                    ms(starts_at),
                ],
            )
            .await?;
        match reply.as_slice() {
            [-1] => Ok(Joined::NotOpen),
            [0, joined] => Ok(Joined::AwaitingDraw { joined: *joined }),
            [place] if *place > 0 => Ok(Joined::Placed(*place)),
            other => Err(Unavailable::BadReply(format!(
                "room.lua join answered {other:?}"
            ))),
        }
    }

    /// Where `user` stands in `product`'s room.
    pub async fn standing(
        &self,
        product: ProductId,
        user: UserId,
        starts_at: DateTime<Utc>,
    ) -> Result<Standing, Unavailable> {
        let reply = self
            .call(
                product,
                vec!["status".into(), user.to_string(), ms(starts_at)],
            )
            .await?;
        let [place, admitted, total, until, remaining] = reply.as_slice() else {
            return Err(Unavailable::BadReply(format!(
                "room.lua status answered {reply:?}"
            )));
        };
        Ok(Standing {
            place: match *place {
                0 => None,
                -1 => Some(Place::AwaitingDraw),
                p => Some(Place::At(p)),
            },
            admitted: *admitted,
            total: *total,
            admitted_until: (*until >= 0).then_some(*until),
            remaining: (*remaining >= 0).then_some(*remaining),
        })
    }

    /// One pass of `product`'s admission.
    pub async fn admit(
        &self,
        product: ProductId,
        starts_at: DateTime<Utc>,
    ) -> Result<Admission, Unavailable> {
        let s = &self.settings;
        let reply = self
            .call(
                product,
                vec![
                    "admit".into(),
                    ms(starts_at),
                    (s.factor_percent * 10).to_string(),
                    s.rate.to_string(),
                    s.admission.as_millis().to_string(),
                ],
            )
            .await?;
        let [admitted, total, undecided, remaining] = reply.as_slice() else {
            return Err(Unavailable::BadReply(format!(
                "room.lua admit answered {reply:?}"
            )));
        };
        let pass = Admission {
            admitted: *admitted,
            total: *total,
            undecided: *undecided,
            remaining: (*remaining >= 0).then_some(*remaining),
        };
        self.saw(product, pass);
        Ok(pass)
    }
}

/// A join's ordering key: uniform over [0, 2^53) (a Redis sorted-set score holds it exactly),
/// drawn independently for each join from the process's generator (fastrand, seeded from the
/// OS), so the order of the shoppers who joined before the start is a uniform permutation.
pub fn draw_key() -> u64 {
    fastrand::u64(..1 << 53)
}

/// Runs the admission of every room open for joins every [`ADMIT_EVERY`] until shutdown
/// (every `serve`); before the start a pass only reads how many joined (the join rate).
pub async fn admit_rooms(
    rooms: Rooms,
    db: DatabaseConnection,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    const FIGURES: [&str; 3] = ["in_room", "admitted", "undecided"];
    // The rooms this process shows figures of: a room that closed leaves /metrics.
    let mut shown = std::collections::HashSet::new();
    while !shutdown.is_cancelled() {
        match crate::products::live_rooms(&db, rooms.settings.opens_before).await {
            Ok(live) => {
                let open: std::collections::HashSet<ProductId> =
                    live.iter().map(|(id, _)| *id).collect();
                for gone in shown.difference(&open) {
                    for figure in FIGURES {
                        let _ = metrics
                            .room
                            .remove_label_values(&[&gone.to_string(), figure]);
                    }
                }
                shown = open;
                for (id, starts_at) in live {
                    match rooms.admit(id, starts_at).await {
                        Ok(a) => {
                            let product = id.to_string();
                            for (figure, n) in
                                FIGURES.into_iter().zip([a.total, a.admitted, a.undecided])
                            {
                                metrics.room.with_label_values(&[&product, figure]).set(n);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(product_id = id.get(), error = %e, "a waiting room's admission failed; retrying")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "listing the waiting rooms failed; retrying")
            }
        }
        sleep_or_stop(&shutdown, ADMIT_EVERY).await;
    }
    Ok(())
}
