//! The reservation scripts against the real Redis, isolated by key prefix.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::AtomicI64},
    time::Duration,
};

use fred::prelude::*;
use futures_util::StreamExt;
use seckill::{
    config::{BatchSettings, Rate},
    domain::{ProductId, UserId},
    keys::Keys,
    purchase::Batcher,
    reservations::{
        Clock, Decision, Outcome, PreheatPlan, Preheated, Released, ReservationView, Reservations,
        Status,
    },
};
use uuid::Uuid;

use crate::helpers::RedisScope;

pub fn rate(s: &str) -> Rate {
    s.parse().unwrap()
}

pub fn user(n: i64) -> UserId {
    UserId::try_from(n).unwrap()
}

pub fn product(n: i64) -> ProductId {
    ProductId::try_from(n).unwrap()
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A live sale plan: started an hour ago, ends in an hour.
pub fn live_plan(p: ProductId, stock: i64) -> PreheatPlan {
    PreheatPlan {
        product: p,
        stock,
        live_orders: 0,
        buyers: vec![],
        pending: HashSet::new(),
        closed: vec![],
        starts_ms: now_ms() - 3_600_000,
        ends_ms: now_ms() + 3_600_000,
        force: false,
        epoch: 1,
    }
}

/// How a check decides its attempts: one `reserve.lua` call each, or gathered by a
/// [`Batcher`] into calls of many attempts.
#[derive(Clone)]
pub enum Via {
    Single(Box<Reservations>),
    Batched(Arc<Batcher>),
}

impl Via {
    /// One `reserve.lua` call per attempt.
    pub fn single(r: &Reservations) -> Self {
        Via::Single(Box::new(r.clone()))
    }

    /// Batches of at most `max` attempts (window 1 ms).
    pub fn batched(r: &Reservations, max: usize) -> Self {
        let settings = BatchSettings {
            max,
            window: Duration::from_millis(1),
            calls: 2,
        };
        Via::Batched(Batcher::new(r.clone(), settings, None))
    }

    pub async fn reserve(&self, u: UserId, p: ProductId) -> Decision {
        match self {
            Via::Single(r) => r.reserve(u, p).await.unwrap(),
            Via::Batched(b) => b.reserve(u, p).await.unwrap(),
        }
    }
}

pub async fn setup(user_rate: &str, product_rate: &str) -> (RedisScope, Reservations) {
    let scope = RedisScope::new().await;
    let r = Reservations::new(
        scope.pool.clone(),
        Keys::new(scope.prefix.clone()),
        rate(user_rate),
        rate(product_rate),
    );
    (scope, r)
}

/// 5,000 concurrent attempts by 1,000 users on stock 100 (shared by the cluster tests).
pub async fn check_five_thousand_attempts(
    pool: &fred::prelude::Pool,
    r: &Reservations,
    via: &Via,
    p: ProductId,
) {
    r.preheat(&live_plan(p, 100)).await.unwrap();

    // 5,000 attempts, 500 in flight at any moment (on 2 cores, 5,000 at once only measures
    // whether a command waits longer than the 2 s command timeout).
    let decisions: Vec<(i64, Decision)> = futures_util::stream::iter(0..5_000)
        .map(|i| {
            let via = via.clone();
            tokio::spawn(async move { (i % 1_000 + 1, via.reserve(user(i % 1_000 + 1), p).await) })
        })
        .buffer_unordered(500)
        .map(|t| t.unwrap())
        .collect()
        .await;
    let mut winners = Vec::new();
    for (u, d) in decisions {
        match d.outcome {
            Outcome::Won { reservation_id, .. } => winners.push((u, reservation_id)),
            Outcome::AlreadyReserved { .. } | Outcome::SoldOut | Outcome::RateLimited { .. } => {}
            other => panic!("undefined outcome for this sale: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 100);
    let users: HashSet<i64> = winners.iter().map(|(u, _)| *u).collect();
    assert_eq!(users.len(), 100, "a user won twice");
    assert_eq!(r.remaining(p).await.unwrap(), Some(0));
    assert_eq!(r.pending_count(p).await.unwrap(), 100);

    // The outbox holds exactly the winners.
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = pool
        .xrange(r.keys().product(p).outbox, "-", "+", None)
        .await
        .unwrap();
    let outbox: HashSet<(i64, Uuid)> = entries
        .iter()
        .map(|(_, f)| (f["u"].parse().unwrap(), f["r"].parse().unwrap()))
        .collect();
    assert_eq!(outbox.len(), 100);
    assert_eq!(outbox, winners.into_iter().collect::<HashSet<_>>());
}

/// One user, 1,000 concurrent attempts (shared by the cluster tests).
pub async fn check_one_user_wins_once(r: &Reservations, via: &Via, p: ProductId) {
    r.preheat(&live_plan(p, 50)).await.unwrap();
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let via = via.clone();
            tokio::spawn(async move { via.reserve(user(7), p).await.outcome })
        })
        .collect();
    let mut won = None;
    let mut already = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Won { reservation_id, .. } => {
                assert!(won.replace(reservation_id).is_none(), "won twice");
            }
            Outcome::AlreadyReserved { reservation_id } => {
                already.insert(reservation_id);
            }
            other => panic!("{other:?}"),
        }
    }
    let won = won.expect("one win");
    assert_eq!(already, HashSet::from([won]));
    assert_eq!(
        r.reserve(user(7), p).await.unwrap().outcome,
        Outcome::AlreadyReserved {
            reservation_id: won
        }
    );
    assert_eq!(r.remaining(p).await.unwrap(), Some(49));
}

/// 100 concurrent releases of one reservation (shared by the cluster tests).
pub async fn check_concurrent_releases(r: &Reservations, p: ProductId) {
    r.preheat(&live_plan(p, 1)).await.unwrap();
    let Outcome::Won {
        reservation_id,
        remaining,
    } = r.reserve(user(1), p).await.unwrap().outcome
    else {
        panic!("first attempt wins");
    };
    assert_eq!(remaining, 0);
    assert_eq!(
        r.reserve(user(2), p).await.unwrap().outcome,
        Outcome::SoldOut
    );

    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move {
                r.release(p, reservation_id, r#"{"status":"cancelled"}"#)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut returned = 0;
    for t in tasks {
        match t.await.unwrap() {
            Released::Returned { remaining, at } => {
                returned += 1;
                assert_eq!(remaining, 1);
                assert_eq!(at.seq, 1, "the sale's first release");
            }
            Released::AlreadyReturned { .. } => {}
            Released::NotPreheated => panic!("product is preheated"),
        }
    }
    assert_eq!(returned, 1);
    assert_eq!(r.remaining(p).await.unwrap(), Some(1), "never above stock");

    // The returned unit goes to another shopper; the first one cannot buy again.
    assert!(matches!(
        r.reserve(user(3), p).await.unwrap().outcome,
        Outcome::Won { .. }
    ));
    assert!(matches!(
        r.reserve(user(1), p).await.unwrap().outcome,
        Outcome::AlreadyReserved { .. }
    ));
    assert_eq!(r.remaining(p).await.unwrap(), Some(0));
    // A late duplicate release of the old reservation changes nothing.
    assert_eq!(
        r.release(p, reservation_id, r#"{"status":"cancelled"}"#)
            .await
            .unwrap()
            .at()
            .map(|at| at.seq),
        Some(1),
        "a no-op: the release sequence stays where the one release put it"
    );
    assert_eq!(r.remaining(p).await.unwrap(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn five_thousand_attempts_by_a_thousand_users_on_stock_100_make_exactly_100_winners() {
    let (scope, r) = setup("10/1s", "1000000/1s").await;
    check_five_thousand_attempts(&scope.pool, &r, &Via::single(&r), product(1)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_thousand_attempts_in_batches_make_exactly_100_winners() {
    let (scope, r) = setup("10/1s", "1000000/1s").await;
    check_five_thousand_attempts(&scope.pool, &r, &Via::batched(&r, 16), product(1)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_user_with_a_thousand_concurrent_attempts_wins_once() {
    let (_scope, r) = setup("100000/1s", "1000000/1s").await;
    check_one_user_wins_once(&r, &Via::single(&r), product(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_user_with_a_thousand_concurrent_attempts_in_batches_wins_once() {
    let (_scope, r) = setup("100000/1s", "1000000/1s").await;
    check_one_user_wins_once(&r, &Via::batched(&r, 64), product(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_releases_return_exactly_one_unit_which_another_user_wins() {
    let (_scope, r) = setup("10/1s", "1000000/1s").await;
    check_concurrent_releases(&r, product(3)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sale_window_follows_the_script_clock() {
    let (_scope, r) = setup("100/1s", "1000000/1s").await;
    let clock = Arc::new(AtomicI64::new(0));
    let r = r.with_clock(Clock::Manual(clock.clone()));
    let p = product(4);
    let start = now_ms() + 60_000;
    let mut plan = live_plan(p, 5);
    plan.starts_ms = start;
    plan.ends_ms = start + 1_000;
    r.preheat(&plan).await.unwrap();
    let at = |ms: i64| clock.store(ms * 1_000, std::sync::atomic::Ordering::SeqCst);

    at(start - 1);
    assert_eq!(
        r.reserve(user(1), p).await.unwrap().outcome,
        Outcome::NotStarted
    );
    at(start);
    assert!(matches!(
        r.reserve(user(1), p).await.unwrap().outcome,
        Outcome::Won { .. }
    ));
    at(start + 999);
    assert!(matches!(
        r.reserve(user(2), p).await.unwrap().outcome,
        Outcome::Won { .. }
    ));
    at(start + 1_000);
    assert_eq!(r.reserve(user(3), p).await.unwrap().outcome, Outcome::Ended);
    assert_eq!(r.remaining(p).await.unwrap(), Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_product_answers_paused_until_resumed() {
    let (_scope, r) = setup("100/1s", "1000000/1s").await;
    let p = product(5);
    r.preheat(&live_plan(p, 5)).await.unwrap();
    r.set_paused(p, true).await.unwrap();
    assert_eq!(
        r.reserve(user(1), p).await.unwrap().outcome,
        Outcome::Paused
    );
    assert_eq!(
        r.remaining(p).await.unwrap(),
        Some(5),
        "a paused attempt takes nothing"
    );
    r.set_paused(p, false).await.unwrap();
    assert!(matches!(
        r.reserve(user(1), p).await.unwrap().outcome,
        Outcome::Won { .. }
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_product_is_reported_and_nothing_is_written() {
    let (scope, r) = setup("100/1s", "1000000/1s").await;
    let d = r.reserve(user(1), product(999)).await.unwrap();
    assert_eq!(d.outcome, Outcome::UnknownProduct);
    assert_eq!(d.window.limit, 100);
    assert_eq!(d.window.remaining, 100);
    let keys: Vec<String> = scope
        .pool
        .next()
        .custom(fred::cmd!("KEYS"), vec![format!("{}:*", scope.prefix)])
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_user_window_limits_attempts_and_reports_headers() {
    let (_scope, r) = setup("2/1m", "1000000/1s").await;
    let p = product(6);
    r.preheat(&live_plan(p, 0)).await.unwrap();
    let first = r.reserve(user(1), p).await.unwrap();
    assert_eq!(first.outcome, Outcome::SoldOut);
    assert_eq!((first.window.limit, first.window.remaining), (2, 1));
    let second = r.reserve(user(1), p).await.unwrap();
    assert_eq!(second.window.remaining, 0);
    let third = r.reserve(user(1), p).await.unwrap();
    let Outcome::RateLimited { retry_after } = third.outcome else {
        panic!("{third:?}")
    };
    assert!(retry_after > Duration::from_secs(50) && retry_after <= Duration::from_secs(60));
    assert!(third.window.reset <= Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread")]
async fn scripts_are_reloaded_after_the_script_cache_is_flushed() {
    let (scope, r) = setup("100/1s", "1000000/1s").await;
    let p = product(7);
    r.preheat(&live_plan(p, 3)).await.unwrap();
    let _: () = scope.pool.next().script_flush(false).await.unwrap();
    assert!(matches!(
        r.reserve(user(1), p).await.unwrap().outcome,
        Outcome::Won { .. }
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn preheat_refuses_a_live_sale_unless_forced_and_the_forced_rebuild_counts_units_in_flight() {
    let (_scope, r) = setup("100/1s", "1000000/1s").await;
    let p = product(8);
    r.preheat(&live_plan(p, 10)).await.unwrap();
    for u in 1..=3 {
        assert!(matches!(
            r.reserve(user(u), p).await.unwrap().outcome,
            Outcome::Won { .. }
        ));
    }
    assert!(matches!(
        r.preheat(&live_plan(p, 10)).await.unwrap(),
        Preheated::AlreadyLive { remaining: 7, .. }
    ));

    // Forced: pause, read what is in flight, then (pretend) Postgres holds one of the three.
    r.set_paused(p, true).await.unwrap();
    let pending = r.pending_ids(p).await.unwrap();
    assert_eq!(pending.len(), 3);
    let persisted = *pending.iter().next().unwrap();
    let mut plan = live_plan(p, 10);
    plan.force = true;
    plan.live_orders = 1;
    plan.buyers = vec![(user(1), persisted)];
    plan.pending = pending;
    assert!(matches!(
        r.preheat(&plan).await.unwrap(),
        Preheated::Loaded { remaining: 7, .. }
    ));
    assert!(matches!(
        r.reserve(user(9), p).await.unwrap().outcome,
        Outcome::Won { remaining: 6, .. }
    ));
}

/// Found by `scripts/chaos` (seed 11): a failover lost the status write that took a winner
/// off the pending set, and the reservation stayed "pending" in Redis for good (its order
/// paid, then expired) — blocking its sale's retirement. Closing the order clears it now.
#[tokio::test(flavor = "multi_thread")]
async fn a_released_reservation_leaves_the_pending_set_even_if_its_order_was_never_recorded() {
    let (_scope, r) = setup("100/1s", "1000000/1s").await;
    let p = product(11);
    r.preheat(&live_plan(p, 2)).await.unwrap();
    let Outcome::Won { reservation_id, .. } = r.reserve(user(1), p).await.unwrap().outcome else {
        panic!("wins")
    };
    // The write that would have recorded the order (and left the pending set) never happened.
    assert!(r.pending_ids(p).await.unwrap().contains(&reservation_id));
    r.release(p, reservation_id, r#"{"status":"expired"}"#)
        .await
        .unwrap();
    assert_eq!(r.pending_count(p).await.unwrap(), 0);
    assert_eq!(r.remaining(p).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn statuses_recorded_in_one_call_never_go_back_and_leave_the_pending_set() {
    use seckill::reservations::{ReservationView, Status};
    let (_scope, r) = setup("100/1s", "1000000/1s").await;
    let p = product(9);
    r.preheat(&live_plan(p, 10)).await.unwrap();
    let mut won = Vec::new();
    for u in 1..=3 {
        let Outcome::Won { reservation_id, .. } = r.reserve(user(u), p).await.unwrap().outcome
        else {
            panic!("wins")
        };
        won.push((u, reservation_id));
    }
    assert_eq!(r.pending_count(p).await.unwrap(), 3);
    let view = |rid: Uuid, status: Status| ReservationView {
        reservation_id: rid,
        status,
        order_id: Some(Uuid::now_v7()),
        expires_at: None,
        reason: None,
    };
    // The first is already paid when a (late) confirmation of all three arrives.
    let paid = view(won[0].1, Status::Paid);
    assert!(r.record_status(p, user(won[0].0), &paid).await.unwrap());
    let confirmed: Vec<ReservationView> = won
        .iter()
        .map(|(_, rid)| view(*rid, Status::Confirmed))
        .collect();
    let updates: Vec<(UserId, &ReservationView)> = won
        .iter()
        .zip(&confirmed)
        .map(|((u, _), v)| (user(*u), v))
        .collect();
    assert_eq!(r.record_statuses(p, &updates).await.unwrap(), 2);
    assert_eq!(r.pending_count(p).await.unwrap(), 0);
    let first = r.status_of(p, won[0].1).await.unwrap().unwrap();
    assert_eq!(
        ReservationView::from_redis(won[0].1, &first)
            .unwrap()
            .status,
        Status::Paid
    );
    let second = r.status_of(p, won[1].1).await.unwrap().unwrap();
    assert_eq!(
        ReservationView::from_redis(won[1].1, &second)
            .unwrap()
            .status,
        Status::Confirmed
    );
}

/// A winner replayed from the DLQ after Redis lost its sale reaches the worker with no buyer
/// entry in Redis. Recording its status records its buyer too: its shopper's `/me` finds it,
/// and the shopper cannot win a second unit.
#[tokio::test(flavor = "multi_thread")]
async fn recording_a_status_records_a_buyer_redis_does_not_know() {
    use seckill::reservations::{ReservationView, Status};
    let (_scope, r) = setup("100/1s", "1000000/1s").await;
    let p = product(10);
    r.preheat(&live_plan(p, 10)).await.unwrap();
    let replayed = Uuid::now_v7();
    let confirmed = ReservationView {
        reservation_id: replayed,
        status: Status::Confirmed,
        order_id: Some(Uuid::now_v7()),
        expires_at: None,
        reason: None,
    };
    assert!(r.record_status(p, user(77), &confirmed).await.unwrap());
    match r.reserve(user(77), p).await.unwrap().outcome {
        Outcome::AlreadyReserved { reservation_id } => assert_eq!(reservation_id, replayed),
        other => panic!("a second win for a shopper who holds an order: {other:?}"),
    }
    // A shopper who already won keeps the reservation they hold.
    let Outcome::Won {
        reservation_id: own,
        ..
    } = r.reserve(user(78), p).await.unwrap().outcome
    else {
        panic!("wins")
    };
    let other = ReservationView {
        reservation_id: Uuid::now_v7(),
        ..confirmed
    };
    r.record_status(p, user(78), &other).await.unwrap();
    match r.reserve(user(78), p).await.unwrap().outcome {
        Outcome::AlreadyReserved { reservation_id } => assert_eq!(reservation_id, own),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn scripts_leave_no_key_without_an_expiry_for_a_sale_redis_does_not_hold() {
    let (scope, r) = setup("10/1s", "1000000/1s").await;
    let r = r.with_key_grace(Duration::from_secs(600));
    let p = product(31);
    let k = r.keys().product(p);
    // No state hash at all (lost, or expired after retirement).
    let view = ReservationView {
        reservation_id: Uuid::now_v7(),
        status: Status::Confirmed,
        order_id: Some(Uuid::now_v7()),
        expires_at: None,
        reason: None,
    };
    assert!(r.record_status(p, user(5), &view).await.unwrap());
    for key in [&k.status, &k.buyers] {
        let ttl: i64 = scope.pool.pttl(key).await.unwrap();
        assert!(
            ttl > 590_000 && ttl <= 600_000,
            "{key}: {ttl} (a key a late status write creates gets the grace)"
        );
    }
    // A pause writes nothing for a sale Redis does not hold.
    r.set_paused(p, true).await.unwrap();
    let exists: i64 = scope.pool.exists(&k.state).await.unwrap();
    assert_eq!(exists, 0, "pause.lua created a state hash");
    // A preheat makes the sale's keys lasting again.
    r.preheat(&live_plan(p, 3)).await.unwrap();
    for key in [&k.state, &k.status, &k.buyers] {
        let ttl: i64 = scope.pool.pttl(key).await.unwrap();
        assert_eq!(ttl, -1, "{key} keeps an expiry after the preheat");
    }
}

#[tokio::test]
async fn a_sale_that_lost_its_buyers_or_its_outbox_after_a_win_is_dropped_as_lost() {
    let (scope, r) = setup("10/1s", "1000000/1s").await;
    for (n, lose) in [(41, "buyers"), (42, "outbox")] {
        let p = product(n);
        let k = r.keys().product(p);
        r.preheat(&live_plan(p, 5)).await.unwrap();
        assert!(matches!(
            r.reserve(user(1), p).await.unwrap().outcome,
            Outcome::Won { .. }
        ));
        let key = if lose == "buyers" {
            &k.buyers
        } else {
            &k.outbox
        };
        let _: i64 = scope.pool.del(key).await.unwrap();
        // Not a second unit for user 1 (whose win the buyers hash held), not a sale from a
        // half-lost state: the state is dropped, and the product is lost everywhere.
        assert_eq!(
            r.reserve(user(1), p).await.unwrap().outcome,
            Outcome::WentBack,
            "{lose}"
        );
        assert_eq!(r.remaining(p).await.unwrap(), None, "{lose}");
    }
}
