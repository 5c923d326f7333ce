//! The outbox relay's work stays bounded: a broken product does not stop the others, and an
//! idle relay barely talks to Redis.

use std::{collections::HashMap, time::Duration};

use fred::prelude::*;
use seckill::{domain::ProductId, startup::Role};

use crate::helpers::{OwnRedis, TestApp, await_orders};

#[tokio::test(flavor = "multi_thread")]
async fn a_product_whose_outbox_is_broken_does_not_stop_the_others_winners() {
    let app = TestApp::spawn().await;
    let api = &app.api;
    // The broken product comes first in the relay's list (lower id).
    let broken = api.live_product(10).await;
    let fine = api.live_product(10).await;
    let outbox = app
        .keys()
        .product(ProductId::try_from(broken).unwrap())
        .outbox;
    let _: () = app
        .redis
        .set(&outbox, "not a stream", None, None, false)
        .await
        .unwrap();
    for user in 1..=5 {
        assert_eq!(api.buy(user, fine).await.status(), 202);
    }
    await_orders(&app.db, fine, 5, Duration::from_secs(20)).await;
    assert!(api.metric("seckill_relay_product_errors_total").await >= 1.0);
    assert!(api.metric("seckill_relay_products_failing").await <= 1.0);
    app.stop().await;
}

/// `INFO commandstats` as command → calls.
fn command_calls(redis: &OwnRedis) -> HashMap<String, u64> {
    redis
        .cli(&["info", "commandstats"])
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_relay_with_fifty_live_sales_makes_few_redis_calls() {
    // A Redis of this test's own, so its command counts are this deployment's alone.
    let redis = OwnRedis::start(&["--appendonly", "no"]).await;
    let url = redis.url();
    let app = TestApp::spawn_with(
        Role::Serve,
        &[
            ("SECKILL_REDIS_URL", url.as_str()),
            ("SECKILL_REDIS_DURABILITY", "none"),
        ],
    )
    .await;
    for _ in 0..50 {
        app.api.live_product(10).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = command_calls(&redis);
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;
    let after = command_calls(&redis);
    let per_sec = |cmd: &str| {
        let n = after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0);
        n as f64 / window.as_secs_f64()
    };
    let mut all: Vec<(String, f64)> = after.keys().map(|c| (c.clone(), per_sec(c))).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("idle Redis calls/s with 50 live sales: {all:?}");
    // One blocking read per SECKILL_RELAY_POLL_MS (1 s) covers all fifty outboxes.
    assert!(per_sec("xreadgroup") <= 2.0, "{all:?}");
    assert!(per_sec("xautoclaim") == 0.0, "{all:?}");
    assert!(per_sec("xgroup|create") == 0.0, "{all:?}");
    app.stop().await;
}
