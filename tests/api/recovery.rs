//! A sale Redis lost: `recovering` (503, never a 404 or a stale 410) until every winner still
//! in flight is an order, then rebuilt from Postgres by itself; no unit sold twice.

use std::time::Duration;

use seckill::startup::Role;
use serde_json::Value;

use crate::helpers::{
    Sibling, TestApp, assert_problem, delete_prefix, eventually, http_sale, pg_count,
    purchase_token, queue_len,
};

async fn state(app: &TestApp, product: i64) -> Value {
    app.api
        .get(&format!("/api/v1/products/{product}"))
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sale_redis_lost_with_winners_in_the_queue_resumes_only_once_they_are_orders() {
    // API + relay only: the worker is down, so the winners wait in RabbitMQ.
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let product = app.api.live_product(100).await;
    let (first, _) = http_sale(&app.api, product, 1..=60, 1).await;
    assert_eq!(first.len(), 60);
    let queue = app.iso.queue.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let q = queue.clone();
            async move { queue_len(&q).await == 60 }
        })
        .await,
        "the relay hands the 60 winners to RabbitMQ"
    );

    // Redis loses everything of this deployment (as a restart without persistence would).
    delete_prefix(app.redis.next(), &app.iso.prefix)
        .await
        .unwrap();

    // Not a 404 (the product exists and was preheated), not a 202 from a rebuilt-from-Postgres
    // stock that would sell the 60 units in the queue a second time.
    let token = purchase_token(1_000, product);
    assert_problem(
        app.api.reserve(1_000, product, &token).await,
        503,
        "recovering",
    )
    .await;
    assert_problem(app.api.token(1_001, product).await, 503, "recovering").await;
    assert_eq!(state(&app, product).await["state"], "recovering");
    assert!(app.api.metric("seckill_product_losses_total").await >= 1.0);
    // An operator's preheat, plain or forced, is the same safe rebuild: not yet.
    assert_problem(app.api.preheat(product, false).await, 503, "recovering").await;
    assert_problem(app.api.preheat(product, true).await, 503, "recovering").await;
    // It stays so while the winners wait for a worker.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let token = purchase_token(1_002, product);
    assert_problem(
        app.api.reserve(1_002, product, &token).await,
        503,
        "recovering",
    )
    .await;

    // The worker comes back, persists the 60; the product is rebuilt without an operator.
    let worker = Sibling::spawn(&app.iso, Role::Worker, &[]).await;
    let rebuilt = eventually(Duration::from_secs(30), || async {
        state(&app, product).await["state"] == "live"
    })
    .await;
    assert!(rebuilt, "rebuilt by itself: {}", state(&app, product).await);
    assert_eq!(state(&app, product).await["remaining"], 40);

    // A past winner keeps their unit and gets it named, never a second one.
    for (user, rid) in first.iter().take(5) {
        let token = purchase_token(*user, product);
        let (_, body) = assert_problem(
            app.api.reserve(*user, product, &token).await,
            409,
            "already_reserved",
        )
        .await;
        assert_eq!(body["reservation_id"], rid.as_str());
        let me: Value = app
            .api
            .user_get(
                *user,
                &format!("/api/v1/products/{product}/reservations/me"),
            )
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(me["status"], "confirmed", "{me}");
    }

    // The sale goes on: exactly the 40 units left are sold.
    let (second, _) = http_sale(&app.api, product, 2_001..=2_100, 1).await;
    assert_eq!(second.len(), 40);
    assert!(second.keys().all(|u| !first.contains_key(u)));
    let all_persisted = eventually(Duration::from_secs(20), || async {
        pg_count(
            &app.db,
            &format!("select count(*) from orders where product_id = {product}"),
        )
        .await
            == 100
    })
    .await;
    assert!(all_persisted);
    assert_eq!(
        pg_count(
            &app.db,
            &format!("select count(distinct user_id) from orders where product_id = {product}"),
        )
        .await,
        100
    );
    let r = app.reservations();
    let p = seckill::domain::ProductId::try_from(product).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = r.clone();
            async move { r.pending_count(p).await.unwrap() == 0 }
        })
        .await
    );
    // remaining + pending + live == stock; the queue and its DLQ are empty.
    assert_eq!(r.remaining(p).await.unwrap(), Some(0));
    assert_eq!(queue_len(&queue).await, 0);
    assert_eq!(queue_len(&format!("{queue}.dlq")).await, 0);
    worker.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_sale_that_has_not_started_is_simply_loaded_again() {
    let app = TestApp::spawn().await;
    let product = app.api.create_product(10, 3_600, 7_200).await;
    assert_eq!(app.api.preheat(product, false).await.status(), 200);
    delete_prefix(app.redis.next(), &app.iso.prefix)
        .await
        .unwrap();
    // Nothing can have been won yet: the watch loads it again at once.
    let back = eventually(Duration::from_secs(10), || async {
        app.reservations()
            .is_preheated(seckill::domain::ProductId::try_from(product).unwrap())
            .await
            .unwrap()
    })
    .await;
    assert!(back);
    assert_eq!(state(&app, product).await["state"], "upcoming");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_preheats_racing_the_sweeper_return_each_expired_unit_exactly_once() {
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_PAYMENT_TIMEOUT_SECS", "8"),
            ("SECKILL_SWEEP_INTERVAL_MS", "50"),
        ],
    )
    .await;
    let product = app.api.live_product(1_000).await;
    let p = seckill::domain::ProductId::try_from(product).unwrap();
    let r = app.reservations();
    for u in 1..=1_000 {
        let d = r
            .reserve(seckill::domain::UserId::try_from(u).unwrap(), p)
            .await
            .unwrap();
        assert!(
            matches!(d.outcome, seckill::reservations::Outcome::Won { .. }),
            "{d:?}"
        );
    }
    let orders = format!("select count(*) from orders where product_id = {product}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            pg_count(&app.db, &orders).await == 1_000
        })
        .await
    );
    // About half are paid (they keep their units); the rest expire 8 s after they were made,
    // and the sweeper returns their units one by one while forced preheats keep rebuilding.
    let paid = pg_count(
        &app.db,
        &format!(
            "with p as (update orders set status = 'paid', paid_at = now() where order_id in
               (select order_id from orders where product_id = {product} and status = 'pending_payment'
                and expires_at > now() order by user_id limit 500)
             returning 1) select count(*) from p"
        ),
    )
    .await;
    // On a slow machine a few may have expired already: they are returned like the rest.
    assert!(paid > 0, "some orders are still open to pay");
    let expiring = 1_000 - paid;
    let unreleased = format!(
        "select count(*) from orders where product_id = {product} and (status = 'pending_payment' or released_at is null and status = 'expired')"
    );
    let mut rebuilds = 0;
    let mut busy = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while pg_count(&app.db, &unreleased).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweeper finishes"
        );
        // Two forced preheats at once: each answers 200 or 503 paused (one rebuild at a time).
        let (a, b) = tokio::join!(
            app.api.preheat(product, true),
            app.api.preheat(product, true)
        );
        for res in [a, b] {
            match res.status().as_u16() {
                200 => rebuilds += 1,
                503 => {
                    let body: Value = res.json().await.unwrap();
                    assert_eq!(body["code"], "paused", "{body}");
                    busy += 1;
                }
                other => panic!("forced preheat answered {other}"),
            }
        }
    }
    assert!(rebuilds > 0, "rebuilds {rebuilds}, refused {busy}");
    // Exactly the expired units are back on sale: none lost, none counted twice.
    assert_eq!(r.remaining(p).await.unwrap(), Some(expiring));
    let released: i64 =
        fred::prelude::SetsInterface::scard(&app.redis, app.keys().product(p).released)
            .await
            .unwrap();
    assert_eq!(released, expiring);
    app.stop().await;
}

/// The first preheat records `preheated_at` in Postgres just before it loads Redis (so that a
/// crash in between is still told apart from "never preheated"). While it loads, the product
/// is not lost: no `recovering`, no loss counted, no error logged.
#[tokio::test(flavor = "multi_thread")]
async fn a_product_being_preheated_is_not_taken_for_one_redis_lost() {
    let app = TestApp::spawn().await;
    let product = app.api.create_product(10, -60, 3_600).await;
    // A preheat in progress, frozen between its two steps: Postgres marked, the rebuild lock
    // held, Redis not yet loaded.
    pg_count(
        &app.db,
        &format!(
            "with marked as (update product set preheated_at = now() \
             where product_id = {product} returning 1) select count(*) from marked"
        ),
    )
    .await;
    let lock = app
        .keys()
        .product(seckill::domain::ProductId::try_from(product).unwrap())
        .rebuild;
    let _: () = fred::interfaces::KeysInterface::set(
        app.redis.next(),
        lock.as_str(),
        "a-preheat-in-progress",
        Some(fred::types::Expiration::EX(30)),
        None,
        false,
    )
    .await
    .unwrap();

    let token = purchase_token(1, product);
    let res = app.api.reserve(1, product, &token).await;
    assert_ne!(res.status(), 503, "{:?}", res.text().await);
    assert_ne!(state(&app, product).await["state"], "recovering");
    // Longer than the recovery watch's period: it must not take it for a loss either.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_ne!(state(&app, product).await["state"], "recovering");
    assert_eq!(app.api.metric("seckill_product_losses_total").await, 0.0);
    app.stop().await;
}

/// Found by `scripts/chaos` (seed 12, `replicas:1`): a failover lost the preheat's listing of
/// the product for the relay (`<prefix>:products`, a write apart from the sale's state), so
/// its winners stayed in their outbox for good. The recovery watch lists every preheated sale
/// again each round.
#[tokio::test(flavor = "multi_thread")]
async fn a_sale_redis_forgot_to_list_for_the_relay_is_listed_again_and_its_winners_relayed() {
    use fred::prelude::*;
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let p = app.api.live_product(5).await;
    let listed = app.keys().products();
    let client = app.redis.next();
    let removed: i64 = client.srem(&listed, p).await.unwrap();
    assert_eq!(removed, 1);
    let back = crate::helpers::eventually(Duration::from_secs(5), || async {
        client.sismember::<bool, _, _>(&listed, p).await.unwrap()
    })
    .await;
    assert!(back, "listed again by the recovery watch");
    let (won, _) = crate::helpers::http_sale(&app.api, p, 1..=5, 1).await;
    assert_eq!(won.len(), 5);
    crate::helpers::await_orders(&app.db, p, 5, Duration::from_secs(20)).await;
    app.stop().await;
}
