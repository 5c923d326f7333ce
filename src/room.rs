//! A product's waiting room (`waiting_room: true` at creation): shoppers join from
//! `SECKILL_ROOM_OPENS_SECS` before the start; at the start everyone who joined so far is put in
//! a uniformly random order, later arrivals queue behind in arrival order; the room admits the
//! next places while the admitted-but-undecided shoppers are at most `remaining × factor`, at a
//! capped rate; an admitted shopper gets an admission token, which the purchase-token endpoint
//! requires. Every step is one call of `lua/room.lua` (how the order is made uniform is written
//! there and in docs/fairness.md). Every `serve` process runs [`admit_rooms`], a few times a
//! second per live room: the calls are atomic, so several processes admitting at once admit
//! each place once.
//!
//! Where a shopper stands is answered from a per-process copy, not one Redis call per question:
//! a place never changes once drawn, so each process keeps the places it has read (and the
//! admission deadline, read once when the place is admitted), and its own admission pass gives
//! the room's figures (admitted, in the room, units left) a few times a second. A pass wakes the
//! room's event streams in this process ([`Rooms::subscribe`]), and the shoppers whose place
//! was drawn or admitted since are read in batches of [`READ_BATCH`] — so 100,000 waiting
//! shoppers cost a few Redis calls a second per process, not one per shopper per poll.

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

/// A standing is answered from this process's copy while its last admission pass is at most
/// this old (else from Redis).
pub const FRESH: Duration = Duration::from_secs(1);

/// Shoppers read in one call of `room.lua status`.
pub const READ_BATCH: usize = 500;

/// Shoppers one process keeps per room (beyond: the others are read from Redis each time).
const KEPT_PER_ROOM: usize = 1_000_000;

/// Shoppers read per room after one admission pass (the rest at the next passes).
const READ_PER_PASS: usize = 20 * READ_BATCH;

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
    /// Each room as this process knows it.
    copies: Arc<Mutex<HashMap<ProductId, RoomCopy>>>,
}

/// What this process knows of one shopper in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Joined before the start (true until the start).
    AwaitingDraw,
    /// A place in line, and the admission as read once the place was admitted.
    At { place: i64, turn: Turn },
}

impl Known {
    /// A place whose admission has not been read.
    fn unread(place: i64) -> Self {
        Self::At {
            place,
            turn: Turn::Unread,
        }
    }
}

/// A place's admission, as read from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Not read since the place was admitted (or not admitted yet).
    Unread,
    /// Admitted until then (ms since the epoch, Redis' clock).
    Until(i64),
    /// The place was admitted, and that admission was used, ran out, or skipped (a winner).
    Passed,
}

/// A room in this process: the last admission pass (the console's figures, the standings'),
/// the join rate (joins a second between the last two measures at least 0.2 s apart), the
/// shoppers read so far, and the wake-up of the room's event streams.
struct RoomCopy {
    last: Option<(Admission, Instant)>,
    measured_at: Instant,
    measured_total: i64,
    rate: f64,
    shoppers: HashMap<UserId, Known>,
    passes: tokio::sync::watch::Sender<u64>,
    /// The figures (admitted, in the room, units left) at the last wake-up of the streams.
    woken_with: Option<(i64, i64, Option<i64>)>,
}

impl RoomCopy {
    fn new() -> Self {
        Self {
            last: None,
            measured_at: Instant::now(),
            measured_total: 0,
            rate: 0.0,
            shoppers: HashMap::new(),
            passes: tokio::sync::watch::Sender::new(0),
            woken_with: None,
        }
    }

    fn keep(&mut self, user: UserId, known: Known) {
        if self.shoppers.len() < KEPT_PER_ROOM || self.shoppers.contains_key(&user) {
            self.shoppers.insert(user, known);
        }
    }

    /// Where `user` stands by this copy, if it knows (a fresh pass, the place read, and for an
    /// admitted place its admission read).
    fn standing(&self, user: UserId, started: bool) -> Option<Standing> {
        let (pass, at) = self.last?;
        if at.elapsed() > FRESH {
            return None;
        }
        let (place, admitted_until) = match *self.shoppers.get(&user)? {
            Known::AwaitingDraw if !started => (Place::AwaitingDraw, None),
            Known::AwaitingDraw => return None,
            Known::At { place, .. } if place > pass.admitted => (Place::At(place), None),
            Known::At {
                turn: Turn::Unread, ..
            } => return None,
            Known::At {
                place,
                turn: Turn::Passed,
            } => (Place::At(place), None),
            Known::At {
                place,
                turn: Turn::Until(t),
            } => (Place::At(place), Some(t)),
        };
        Some(Standing {
            place: Some(place),
            admitted: pass.admitted,
            total: pass.total,
            admitted_until,
            remaining: pass.remaining,
        })
    }

    /// The shoppers whose standing this copy cannot answer any more: drawn since (`started`),
    /// or admitted since and not read.
    fn to_read(&self, started: bool, limit: usize) -> Vec<UserId> {
        let admitted = self.last.map_or(0, |(p, _)| p.admitted);
        self.shoppers
            .iter()
            .filter(|(_, k)| match k {
                Known::AwaitingDraw => started,
                Known::At { place, turn } => *turn == Turn::Unread && *place <= admitted,
            })
            .map(|(u, _)| *u)
            .take(limit)
            .collect()
    }
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
            copies: Arc::default(),
        }
    }

    fn copies(&self) -> std::sync::MutexGuard<'_, HashMap<ProductId, RoomCopy>> {
        // Every statement that holds the map leaves it consistent: a panic elsewhere while it
        // was held leaves nothing half-done.
        self.copies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `product`'s room at this process's last admission pass (none yet: `None`).
    pub fn last_pass(&self, product: ProductId) -> Option<Admission> {
        self.copies()
            .get(&product)
            .and_then(|c| c.last)
            .map(|(a, _)| a)
    }

    /// Shoppers joining `product`'s room per second, lately (0 before any measure).
    pub fn join_rate(&self, product: ProductId) -> f64 {
        self.copies().get(&product).map_or(0.0, |c| c.rate)
    }

    /// A receiver that changes at every admission pass of `product`'s room in this process
    /// (the room's event streams wait on it); it closes when the room does.
    pub fn subscribe(&self, product: ProductId) -> tokio::sync::watch::Receiver<u64> {
        self.copies()
            .entry(product)
            .or_insert_with(RoomCopy::new)
            .passes
            .subscribe()
    }

    /// Records an admission pass: its figures, and the join rate since the last measure.
    fn saw(&self, product: ProductId, pass: Admission) {
        let now = Instant::now();
        let mut copies = self.copies();
        let c = copies.entry(product).or_insert_with(RoomCopy::new);
        if c.last.is_none() {
            (c.measured_at, c.measured_total) = (now, pass.total);
        }
        c.last = Some((pass, now));
        let secs = now.duration_since(c.measured_at).as_secs_f64();
        if secs >= 0.2 {
            c.rate = (pass.total - c.measured_total).max(0) as f64 / secs;
            (c.measured_at, c.measured_total) = (now, pass.total);
        }
    }

    /// Wakes the event streams of `product`'s room in this process if what they show may have
    /// changed since the last wake-up: the room's figures, or shoppers read (`read`).
    fn wake(&self, product: ProductId, read: bool) {
        if let Some(c) = self.copies().get_mut(&product) {
            let figures = c.last.map(|(a, _)| (a.admitted, a.total, a.remaining));
            if read || figures != c.woken_with {
                c.woken_with = figures;
                c.passes.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// `user`'s reservation of `product` changed (a win, most often): their admission may be
    /// over, so this process reads them again after its next pass.
    pub fn decided(&self, product: ProductId, user: UserId) {
        if let Some(c) = self.copies().get_mut(&product)
            && let Some(Known::At { turn, .. }) = c.shoppers.get_mut(&user)
        {
            *turn = Turn::Unread;
        }
    }

    /// Forgets the rooms not in `open` (their streams' receivers close).
    fn retain(&self, open: &std::collections::HashSet<ProductId>) {
        self.copies().retain(|id, _| open.contains(id));
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
        let (joined, known) = match reply.as_slice() {
            [-1] => (Joined::NotOpen, None),
            [0, joined] => (
                Joined::AwaitingDraw { joined: *joined },
                Some(Known::AwaitingDraw),
            ),
            [place] if *place > 0 => (Joined::Placed(*place), Some(Known::unread(*place))),
            other => {
                return Err(Unavailable::BadReply(format!(
                    "room.lua join answered {other:?}"
                )));
            }
        };
        if let Some(known) = known {
            self.copies()
                .entry(product)
                .or_insert_with(RoomCopy::new)
                .keep(user, known);
        }
        Ok(joined)
    }

    /// Where `user` stands in `product`'s room: from this process's copy when it knows, else
    /// from Redis (and the copy keeps what it read).
    pub async fn standing(
        &self,
        product: ProductId,
        user: UserId,
        starts_at: DateTime<Utc>,
    ) -> Result<Standing, Unavailable> {
        if let Some(s) = self.standing_here(product, user, starts_at) {
            return Ok(s);
        }
        let read = self.read(product, &[user], starts_at).await?;
        Ok(read[0])
    }

    /// Where `user` stands by this process's copy alone (`None`: it does not know).
    fn standing_here(
        &self,
        product: ProductId,
        user: UserId,
        starts_at: DateTime<Utc>,
    ) -> Option<Standing> {
        let started = Utc::now() >= starts_at;
        self.copies().get(&product)?.standing(user, started)
    }

    /// Reads where `users` stand from Redis (one call), keeping it in the copy.
    async fn read(
        &self,
        product: ProductId,
        users: &[UserId],
        starts_at: DateTime<Utc>,
    ) -> Result<Vec<Standing>, Unavailable> {
        let mut args = Vec::with_capacity(users.len() + 2);
        args.push("status".to_owned());
        args.push(ms(starts_at));
        args.extend(users.iter().map(ToString::to_string));
        let reply = self.call(product, args).await?;
        let bad = || Unavailable::BadReply(format!("room.lua status answered {reply:?}"));
        let (&[admitted, total, remaining], each) =
            reply.split_first_chunk::<3>().ok_or_else(bad)?;
        if each.len() != users.len() * 2 {
            return Err(bad());
        }
        let mut standings = Vec::with_capacity(users.len());
        let mut copies = self.copies();
        let copy = copies.entry(product).or_insert_with(RoomCopy::new);
        // The read is newer than the last pass: its figures are the room's now.
        if let Some((pass, _)) = &mut copy.last {
            pass.admitted = pass.admitted.max(admitted);
            pass.total = pass.total.max(total);
            pass.remaining = (remaining >= 0).then_some(remaining);
        }
        for (user, pair) in users.iter().zip(each.chunks_exact(2)) {
            let until = pair[1];
            let admitted_until = (until >= 0).then_some(until);
            let place = match pair[0] {
                0 => None,
                -1 => Some(Place::AwaitingDraw),
                p => Some(Place::At(p)),
            };
            match place {
                None => {}
                Some(Place::AwaitingDraw) => copy.keep(*user, Known::AwaitingDraw),
                Some(Place::At(p)) if p > admitted => copy.keep(*user, Known::unread(p)),
                Some(Place::At(p)) => copy.keep(
                    *user,
                    Known::At {
                        place: p,
                        turn: admitted_until.map_or(Turn::Passed, Turn::Until),
                    },
                ),
            }
            standings.push(Standing {
                place,
                admitted,
                total,
                admitted_until,
                remaining: (remaining >= 0).then_some(remaining),
            });
        }
        Ok(standings)
    }

    /// After a pass: reads (in batches) the shoppers this process keeps whose place was drawn
    /// or admitted since, so their standings are answered here again; whether it read any.
    async fn read_changed(
        &self,
        product: ProductId,
        starts_at: DateTime<Utc>,
    ) -> Result<bool, Unavailable> {
        let started = Utc::now() >= starts_at;
        let users = match self.copies().get(&product) {
            Some(c) => c.to_read(started, READ_PER_PASS),
            None => return Ok(false),
        };
        for batch in users.chunks(READ_BATCH) {
            self.read(product, batch, starts_at).await?;
        }
        Ok(!users.is_empty())
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
                rooms.retain(&open);
                shown = open;
                for (id, starts_at) in live {
                    let read = match rooms.admit(id, starts_at).await {
                        Ok(a) => {
                            let product = id.to_string();
                            for (figure, n) in
                                FIGURES.into_iter().zip([a.total, a.admitted, a.undecided])
                            {
                                metrics.room.with_label_values(&[&product, figure]).set(n);
                            }
                            rooms.read_changed(id, starts_at).await.unwrap_or_else(|e| {
                                tracing::warn!(product_id = id.get(), error = %e, "reading a waiting room's shoppers failed; retrying");
                                true
                            })
                        }
                        Err(e) => {
                            tracing::warn!(product_id = id.get(), error = %e, "a waiting room's admission failed; retrying");
                            false
                        }
                    };
                    rooms.wake(id, read);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(admitted: i64, remaining: i64) -> Admission {
        Admission {
            admitted,
            total: 100,
            undecided: 0,
            remaining: Some(remaining),
        }
    }

    fn user(u: i64) -> UserId {
        UserId::try_from(u).unwrap()
    }

    #[test]
    fn the_copy_answers_only_what_it_knows_with_a_fresh_pass() {
        let mut c = RoomCopy::new();
        c.keep(user(1), Known::AwaitingDraw);
        c.keep(
            user(2),
            Known::At {
                place: 5,
                turn: Turn::Unread,
            },
        );
        assert_eq!(c.standing(user(1), false), None, "no pass yet");
        c.last = Some((pass(3, 10), Instant::now()));
        let s = c.standing(user(1), false).unwrap();
        assert_eq!(s.place, Some(Place::AwaitingDraw));
        assert_eq!(c.standing(user(1), true), None, "drawn since: read again");
        let s = c.standing(user(2), true).unwrap();
        assert_eq!(
            (s.place, s.admitted, s.remaining),
            (Some(Place::At(5)), 3, Some(10))
        );
        assert_eq!(c.standing(user(3), true), None, "not read");
        // Place 5 admitted: its admission is read once, then answered here.
        c.last = Some((pass(5, 10), Instant::now()));
        assert_eq!(c.standing(user(2), true), None);
        assert_eq!(c.to_read(true, 10).len(), 2, "the drawn and the admitted");
        c.keep(
            user(2),
            Known::At {
                place: 5,
                turn: Turn::Until(42),
            },
        );
        assert_eq!(c.standing(user(2), true).unwrap().admitted_until, Some(42));
        // A pass older than FRESH: the copy does not answer.
        c.last = Some((
            pass(5, 10),
            Instant::now() - FRESH - Duration::from_millis(1),
        ));
        assert_eq!(c.standing(user(2), true), None);
    }

    #[test]
    fn the_copy_keeps_a_bounded_number_of_shoppers() {
        let mut c = RoomCopy::new();
        for u in 1..=i64::try_from(KEPT_PER_ROOM).unwrap() + 10 {
            c.keep(user(u), Known::AwaitingDraw);
        }
        assert_eq!(c.shoppers.len(), KEPT_PER_ROOM);
    }
}
