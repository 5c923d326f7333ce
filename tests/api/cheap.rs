//! Cheap answers before expensive work: floods of product views, unknown ids, losers polling
//! `/me` and `/readyz` cost Postgres (and the dependencies) a bounded number of looks,
//! counted by the app's own `seckill_db_queries_total` and `seckill_readiness_checks_total`.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use sea_orm::ConnectionTrait;
use seckill::startup::Role;
use serde_json::Value;

use crate::helpers::{Api, TestApp, assert_problem};

/// No per-IP limit in the way of the floods below (one client sends them all).
const UNLIMITED: [(&str, &str); 1] = [("SECKILL_IP_RATE", "1000000/1s")];

/// Statements this process ran on `table` (any verb), from its `/metrics`.
async fn queries_on(api: &Api, table: &str) -> f64 {
    let text = api.get_admin("/metrics").await.text().await.unwrap();
    let label = format!("table=\"{table}\"");
    text.lines()
        .filter(|l| l.starts_with("seckill_db_queries_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends every GET in `paths`, 50 at a time; their statuses.
async fn flood(api: &Api, paths: Vec<String>) -> Vec<u16> {
    stream::iter(paths)
        .map(|p| async move { api.get(&p).await.status().as_u16() })
        .buffer_unordered(50)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_product_views_makes_a_handful_of_postgres_queries() {
    let app = TestApp::spawn_with(Role::Serve, &UNLIMITED).await;
    let p = app.api.live_product(10).await;
    let before = queries_on(&app.api, "product").await;
    let started = Instant::now();
    let statuses = flood(&app.api, vec![format!("/api/v1/products/{p}"); 1_000]).await;
    let took = started.elapsed();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let made = queries_on(&app.api, "product").await - before;
    // At most one row and one highest-id look per second, plus the recovery watch's listing
    // once a second.
    let bound = 3.0 * (took.as_secs_f64().ceil() + 1.0);
    assert!(
        (1.0..=bound).contains(&made),
        "1,000 views in {took:?} made {made} product queries (bound {bound})"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_unknown_product_ids_makes_bounded_queries() {
    let app = TestApp::spawn_with(Role::Serve, &UNLIMITED).await;
    let p = app.api.live_product(10).await;
    // A gap below the highest id: ids between `p` and 1,000,000 do not exist, yet are not
    // above the highest one.
    app.db
        .execute_unprepared(
            "insert into product (product_id, name, stock, price_cents, starts_at, ends_at) \
             values (1000000, 'far', 1, 1, now(), now() + interval '1 hour')",
        )
        .await
        .unwrap();
    let before = queries_on(&app.api, "product").await;
    let started = Instant::now();
    // Random well-formed ids (mostly above the highest), the same few in the gap again and
    // again, and purchases of random ids (looked up before anything else).
    let mut paths: Vec<String> = (1..=1_000_u64)
        .map(|i| {
            let id = i.wrapping_mul(2_654_435_761) % 1_000_000_000_000_000 + 1;
            format!("/api/v1/products/{id}")
        })
        .collect();
    paths.extend((0..500).map(|i| format!("/api/v1/products/{}", 500_000 + i % 5)));
    let statuses = flood(&app.api, paths).await;
    assert!(statuses.iter().all(|s| *s == 404), "{statuses:?}");
    for i in 0..200_u64 {
        let id = i.wrapping_mul(2_654_435_761) % 1_000_000_000_000 + 2_000_000;
        let res = app
            .api
            .user_post(1, &format!("/api/v1/products/{id}/reservations"))
            .await;
        assert_problem(res, 404, "product_not_found").await;
    }
    let took = started.elapsed();
    let made = queries_on(&app.api, "product").await - before;
    let bound = 8.0 * (took.as_secs_f64().ceil() + 1.0);
    assert!(
        (1.0..=bound).contains(&made),
        "1,700 unknown ids in {took:?} made {made} product queries (bound {bound})"
    );
    // The product made at the start is still there.
    assert_eq!(app.api.product(p).await["product_id"], p);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_product_created_after_its_id_was_unknown_is_seen_at_once() {
    let app = TestApp::spawn_with(Role::Serve, &UNLIMITED).await;
    // Id 1 is unknown (and so is everything above the highest id, 0): remembered as such.
    assert_problem(
        app.api.get("/api/v1/products/1").await,
        404,
        "product_not_found",
    )
    .await;
    assert_problem(app.api.token(7, 1).await, 404, "product_not_found").await;
    let p = app.api.create_product(5, -1, 3_600).await;
    assert_eq!(p, 1, "the first product of a fresh database");
    let view: Value = app.api.product(p).await;
    assert_eq!(view["product_id"], p, "{view}");
    assert_eq!(view["state"], "live", "{view}");
    assert_eq!(view["remaining"], 5, "{view}");
    assert_eq!(app.api.token(7, p).await.status(), 200);
    // A preheat is seen at once too (Redis' figure is read again).
    assert_eq!(app.api.preheat(p, false).await.status(), 200);
    assert_eq!(app.api.buy(7, p).await.status(), 202);
    let before = app.api.product(p).await["remaining"].as_i64().unwrap();
    assert!(before == 4 || before == 5, "{before}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loser_polling_me_is_answered_from_redis_without_postgres() {
    // API + relay only: no worker or sweeper reads orders meanwhile.
    let app = TestApp::spawn_with(Role::Serve, &UNLIMITED).await;
    let p = app.api.live_product(1).await;
    let won: Value = app.api.buy(1, p).await.json().await.unwrap();
    assert_problem(app.api.buy(2, p).await, 410, "sold_out").await;
    let before = (
        queries_on(&app.api, "orders").await,
        queries_on(&app.api, "rejection").await,
    );
    for user in 2..=201 {
        assert_problem(app.api.me(user, p).await, 404, "no_reservation").await;
    }
    let after = (
        queries_on(&app.api, "orders").await,
        queries_on(&app.api, "rejection").await,
    );
    assert_eq!(after, before, "200 losers' /me asked Postgres");
    // The winner's "pending" is checked against Postgres once (its order's status writes may
    // have been lost in a failover: Postgres is the record), and is still pending.
    let me: Value = app.api.me(1, p).await.json().await.unwrap();
    assert_eq!(me["status"], "pending", "{me}");
    assert_eq!(me["reservation_id"], won["reservation_id"]);
    assert_eq!(queries_on(&app.api, "orders").await, after.0 + 1.0);
    let after = (
        queries_on(&app.api, "orders").await,
        queries_on(&app.api, "rejection").await,
    );

    // When Redis cannot say (its buyer list is gone), Postgres is asked, as before.
    let k = app
        .keys()
        .product(seckill::domain::ProductId::try_from(p).unwrap());
    let _: i64 = fred::prelude::KeysInterface::del(&app.redis, k.buyers)
        .await
        .unwrap();
    assert_problem(app.api.me(2, p).await, 404, "no_reservation").await;
    assert!(queries_on(&app.api, "orders").await > after.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_hammered_checks_its_dependencies_at_most_once_a_second() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let ready = crate::helpers::eventually(Duration::from_secs(10), || async {
        app.api.get("/readyz").await.status() == 200
    })
    .await;
    assert!(ready, "the app never became ready");
    let checks = || async { app.api.metric("seckill_readiness_checks_total").await };
    let before = checks().await;
    let started = Instant::now();
    let statuses = flood(&app.api, vec!["/readyz".to_owned(); 500]).await;
    let took = started.elapsed();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let made = checks().await - before;
    let bound = took.as_secs_f64().ceil() + 1.0;
    assert!(
        made <= bound,
        "500 readiness requests in {took:?} made {made} rounds of checks (bound {bound})"
    );
    assert!(before >= 1.0, "the checks are counted");
    app.stop().await;
}
