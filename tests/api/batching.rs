//! Micro-batched decisions: one `reserve.lua` call of many attempts decides each exactly as one
//! call per attempt would (a property test: both against the reference model of the window and
//! the gate, and the same keys written), and the [`Batcher`] gathers concurrent attempts into
//! fewer calls without holding a lone one back.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use fred::prelude::*;
use futures_util::StreamExt;
use proptest::prelude::*;
use seckill::{
    config::BatchSettings,
    domain::ProductId,
    keys::Keys,
    purchase::Batcher,
    reservations::{Decision, Outcome, Reservations},
};
use uuid::Uuid;

use crate::{
    helpers::RedisScope,
    rate_limit::{Expect, Model, advances, cases, modelled},
    reservations::{live_plan, now_ms, product, setup, user},
};

/// Everything the scripts keep of a product, with reservation ids replaced by the user who
/// holds them (ids are fresh on each path).
#[derive(Debug, PartialEq, Eq)]
struct Written {
    remaining: Option<String>,
    buyers: Vec<String>,
    pending: usize,
    statuses: usize,
    outbox_users: Vec<String>,
    gate: Option<String>,
    windows: Vec<(i64, HashMap<String, String>, bool)>,
}

async fn written(pool: &Pool, keys: &Keys, p: ProductId, users: &[i64]) -> Written {
    let k = keys.product(p);
    let remaining: Option<String> = pool.hget(&k.state, "remaining").await.unwrap();
    let buyers: HashMap<String, String> = pool.hgetall(&k.buyers).await.unwrap();
    let mut buyer_names: Vec<String> = buyers.keys().cloned().collect();
    buyer_names.sort();
    let pending: usize = pool.scard(&k.pending).await.unwrap();
    let statuses: usize = pool.hlen(&k.status).await.unwrap();
    let entries: Vec<(String, HashMap<String, String>)> =
        pool.xrange(&k.outbox, "-", "+", None).await.unwrap();
    let outbox_users = entries.iter().map(|(_, f)| f["u"].clone()).collect();
    let gate: Option<String> = pool.get(&k.gate).await.unwrap();
    let mut windows = Vec::new();
    for u in users {
        let key = k.user_rate(user(*u));
        let w: HashMap<String, String> = pool.hgetall(&key).await.unwrap();
        let ttl: i64 = pool.pttl(&key).await.unwrap();
        windows.push((*u, w, ttl > 0));
    }
    Written {
        remaining,
        buyers: buyer_names,
        pending,
        statuses,
        outbox_users,
        gate,
        windows,
    }
}

/// A decision with the reservation id replaced by whether it is the id this user won.
fn comparable(
    d: &Decision,
    won: &HashMap<i64, Uuid>,
    u: i64,
) -> (Expect, Option<i64>, u32, Duration, bool) {
    let (remaining, own_id) = match &d.outcome {
        Outcome::Won { remaining, .. } => (Some(*remaining), true),
        Outcome::AlreadyReserved { reservation_id } => (None, won.get(&u) == Some(reservation_id)),
        _ => (None, true),
    };
    (
        Expect::of(&d.outcome),
        remaining,
        d.window.remaining,
        d.window.reset,
        own_id,
    )
}

fn record_wins(won: &mut HashMap<i64, Uuid>, u: i64, d: &Decision) {
    if let Outcome::Won { reservation_id, .. } = d.outcome {
        won.insert(u, reservation_id);
    }
}

fn groups() -> impl Strategy<Value = Vec<(i64, Vec<i64>)>> {
    // (advance in µs, the users attempting at that instant in arrival order); a user may
    // attempt twice in one group.
    prop::collection::vec((advances(), prop::collection::vec(1_i64..=4, 1..=7)), 1..12)
}

#[test]
fn a_batch_decides_each_attempt_as_the_model_and_one_call_each_would() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let scope = rt.block_on(RedisScope::new());
    let clock = Arc::new(AtomicI64::new(0));
    let keys = Keys::new(scope.prefix.clone());
    let r = modelled(&scope, &clock);
    let next_product = AtomicI64::new(1);

    proptest!(cases(48), |(stock in 0_i64..=4, groups in groups())| {
        let single_p = product(next_product.fetch_add(1, Ordering::SeqCst));
        let batch_p = product(next_product.fetch_add(1, Ordering::SeqCst));
        rt.block_on(r.preheat(&live_plan(single_p, stock))).unwrap();
        rt.block_on(r.preheat(&live_plan(batch_p, stock))).unwrap();
        let mut model = Model::new(stock);
        let (mut won_single, mut won_batch) = (HashMap::new(), HashMap::new());
        let mut now_us = now_ms() * 1_000;
        for (advance, users) in &groups {
            now_us += advance;
            clock.store(now_us, Ordering::SeqCst);
            let ids: Vec<_> = users.iter().map(|u| user(*u)).collect();
            let batch = rt.block_on(r.reserve_many(batch_p, &ids)).unwrap();
            prop_assert_eq!(batch.len(), users.len());
            for (u, b) in users.iter().zip(&batch) {
                let s = rt.block_on(r.reserve(user(*u), single_p)).unwrap();
                let (expect, left) = model.attempt(*u, now_us);
                record_wins(&mut won_single, *u, &s);
                record_wins(&mut won_batch, *u, b);
                let (s_cmp, b_cmp) = (
                    comparable(&s, &won_single, *u),
                    comparable(b, &won_batch, *u),
                );
                prop_assert_eq!(&b_cmp, &s_cmp, "user {} in group {:?}", u, users);
                prop_assert_eq!(s_cmp.0, expect, "user {} in group {:?}", u, users);
                prop_assert_eq!(b_cmp.0, expect, "user {} in group {:?}", u, users);
                prop_assert!(s_cmp.4, "an already-reserved answer names the user's own win");
                if !matches!(expect, Expect::Limited { .. }) || left == 0 {
                    prop_assert_eq!(i64::from(s.window.remaining), left);
                }
            }
        }
        let users: Vec<i64> = (1..=4).collect();
        let single_state = rt.block_on(written(&scope.pool, &keys, single_p, &users));
        let batch_state = rt.block_on(written(&scope.pool, &keys, batch_p, &users));
        prop_assert_eq!(batch_state, single_state);
    });
}

/// A batcher over `r` whose call sizes land in a histogram of its own.
fn batcher(
    r: &Reservations,
    max: usize,
    window: Duration,
) -> (Arc<Batcher>, prometheus::Histogram) {
    let sizes =
        prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("sizes", "sizes")).unwrap();
    let settings = BatchSettings {
        max,
        window,
        calls: 2,
    };
    (
        Batcher::new(r.clone(), settings, Some(sizes.clone())),
        sizes,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_attempts_go_out_in_fewer_calls_of_at_most_the_batch_size() {
    let (_scope, r) = setup("1/1s", "1000000/1s").await;
    let p = product(1);
    r.preheat(&live_plan(p, 300)).await.unwrap();
    let (b, sizes) = batcher(&r, 16, Duration::from_millis(1));
    let outcomes: Vec<Outcome> = futures_util::stream::iter(1..=2_000_i64)
        .map(|u| {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(user(u), p).await.unwrap().outcome })
        })
        .buffer_unordered(400)
        .map(|t| t.unwrap())
        .collect()
        .await;
    let won = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Won { .. }))
        .count();
    let sold_out = outcomes.iter().filter(|o| **o == Outcome::SoldOut).count();
    assert_eq!((won, sold_out), (300, 1_700));
    assert_eq!(r.remaining(p).await.unwrap(), Some(0));
    assert_eq!(
        sizes.get_sample_sum(),
        2_000.0,
        "every attempt went out once"
    );
    let calls = sizes.get_sample_count();
    assert!(
        (2_000 / 16..2_000).contains(&calls),
        "{calls} calls for 2,000 attempts in batches of at most 16"
    );
    assert_eq!(b.busy_lanes(), 0, "an idle product keeps no lane");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_attempt_goes_out_at_once_whatever_the_window() {
    let (_scope, r) = setup("10/1s", "1000000/1s").await;
    let p = product(2);
    r.preheat(&live_plan(p, 5)).await.unwrap();
    // A window of a minute: an attempt that waited for it would time the test out.
    let (b, sizes) = batcher(&r, 64, Duration::from_secs(60));
    for u in 1..=3 {
        let started = Instant::now();
        let d = b.reserve(user(u), p).await.unwrap();
        assert!(matches!(d.outcome, Outcome::Won { .. }), "{d:?}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    assert_eq!(sizes.get_sample_count(), 3);
    assert_eq!(r.remaining(p).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_size_of_one_decides_each_attempt_with_its_own_call() {
    let (_scope, r) = setup("10/1s", "1000000/1s").await;
    let p = product(3);
    r.preheat(&live_plan(p, 1)).await.unwrap();
    // Batching off: one `reserve.lua` call per attempt, concurrent calls and all.
    let (b, sizes) = batcher(&r, 1, Duration::from_millis(1));
    let tasks: Vec<_> = (1..=20)
        .map(|u| {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(user(u), p).await.unwrap().outcome })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Outcome::Won { .. }) {
            won += 1;
        }
    }
    assert_eq!(won, 1);
    assert_eq!(sizes.get_sample_count(), 20, "one call per attempt");
}
