//! Sales retired from Redis once they ended and drained: their keys expire, they leave the
//! relay's list, and Redis no longer having them is never taken for a loss (`recovering`).

use std::time::Duration;

use fred::prelude::*;
use seckill::{domain::ProductId, startup::Role};
use serde_json::Value;

use crate::helpers::{TestApp, assert_problem, await_orders, eventually, pg_count};

/// `PTTL` of every key the retirement expires (-2: gone, -1: no expiry).
async fn ttls(app: &TestApp, product: i64) -> Vec<(String, i64)> {
    let keys = app.keys().product(ProductId::try_from(product).unwrap());
    let mut out = Vec::new();
    for key in keys.lasting() {
        let ttl: i64 = app.redis.pttl(&key).await.unwrap();
        out.push((key, ttl));
    }
    out
}

async fn in_products_set(app: &TestApp, product: i64) -> bool {
    app.redis
        .sismember(app.keys().products(), product)
        .await
        .unwrap()
}

async fn me(app: &TestApp, user: i64, product: i64) -> Value {
    let res = app.api.me(user, product).await;
    assert_eq!(res.status(), 200, "user {user}");
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ended_drained_sale_expires_from_redis_and_is_never_taken_for_lost() {
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_KEY_GRACE_SECS", "3"),
            ("SECKILL_PAYMENT_TIMEOUT_SECS", "5"),
            ("SECKILL_SWEEP_INTERVAL_MS", "100"),
        ],
    )
    .await;
    let api = &app.api;
    let product = api.create_product(5, -1, 6).await;
    assert_eq!(api.preheat(product, false).await.status(), 200);
    // A sale still on is left alone.
    let other = api.live_product(3).await;
    for user in 1..=3 {
        assert_eq!(api.buy(user, product).await.status(), 202);
    }
    await_orders(&app.db, product, 3, Duration::from_secs(20)).await;
    // One winner pays, one cancels, one lets the order expire.
    let paid = me(&app, 1, product).await["order_id"].clone();
    assert_eq!(
        api.paid_at_checkout(paid.as_str().unwrap()).await.status(),
        200
    );
    let cancelled = me(&app, 2, product).await["order_id"].clone();
    assert_eq!(
        api.cancel(2, cancelled.as_str().unwrap()).await.status(),
        200
    );
    // While the sale is on, nothing of it expires.
    assert!(
        ttls(&app, product)
            .await
            .iter()
            .all(|(_, t)| *t == -1 || *t == -2),
        "{:?}",
        ttls(&app, product).await
    );

    // Ended, every winner relayed and persisted, every order settled (the third expired and
    // its unit came back): retired.
    let retired = eventually(Duration::from_secs(40), || async {
        ttls(&app, product).await.iter().any(|(_, t)| *t > 0)
    })
    .await;
    assert!(retired, "{:?}", ttls(&app, product).await);
    for (key, ttl) in ttls(&app, product).await {
        assert!(ttl == -2 || (ttl > 0 && ttl <= 3_000), "{key}: {ttl}");
    }
    // Recorded in Postgres right after (the expiry comes first, so a crash in between only
    // repeats the retirement).
    let retired_at = format!(
        "select count(*) from product where product_id = {product} and retired_at is not null"
    );
    let recorded = eventually(Duration::from_secs(5), || async {
        pg_count(&app.db, &retired_at).await == 1
    })
    .await;
    assert!(recorded);
    // Its relayed winners' records (what a rebuild counts) go with it; the live sale's stay.
    let relayed = |p: i64| format!("select count(*) from relayed where product_id = {p}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            pg_count(&app.db, &relayed(product)).await == 0
        })
        .await
    );
    assert!(!in_products_set(&app, product).await);
    assert!(in_products_set(&app, other).await);
    assert!(api.metric("seckill_products_retired_total").await >= 1.0);
    assert!(
        ttls(&app, other).await.iter().all(|(_, t)| *t < 0),
        "the live sale keeps its keys"
    );
    // The relay no longer tracks it: only the live sale is left, and its gauge is gone.
    let dropped = eventually(Duration::from_secs(10), || async {
        api.metric("seckill_relay_products ").await == 1.0
    })
    .await;
    assert!(dropped, "{}", api.metric("seckill_relay_products ").await);
    let metrics = api.get_admin("/metrics").await.text().await.unwrap();
    assert!(
        !metrics.contains(&format!("seckill_outbox_length{{product=\"{product}\"}}")),
        "{metrics}"
    );

    // The grace passes: Redis has nothing of it any more.
    let gone = eventually(Duration::from_secs(10), || async {
        ttls(&app, product).await.iter().all(|(_, t)| *t == -2)
    })
    .await;
    assert!(gone, "{:?}", ttls(&app, product).await);

    // Not a loss: the view says ended, shoppers' reads answer from Postgres.
    let view = api.product(product).await;
    assert_eq!(view["state"], "ended", "{view}");
    assert_eq!(me(&app, 1, product).await["status"], "paid");
    assert_eq!(me(&app, 2, product).await["status"], "cancelled");
    assert_eq!(me(&app, 3, product).await["status"], "expired");
    let again = api.paid_at_checkout(paid.as_str().unwrap()).await;
    assert_eq!(again.status(), 200, "paying a paid order is still a no-op");
    assert_problem(api.token(4, product).await, 410, "ended").await;
    // Give the recovery watch a few rounds to be wrong.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.metric("seckill_product_losses_total").await, 0.0);
    assert_eq!(api.metric("seckill_products_recovering").await, 0.0);
    // An operator's preheat of it loads it again, as a preheat, not as a recovery.
    assert_eq!(api.preheat(product, false).await.status(), 200);
    assert_eq!(api.metric("seckill_product_losses_total").await, 0.0);
    assert_eq!(api.product(product).await["state"], "ended");
    app.stop().await;
}

/// A winner whose order is in Postgres but whom Redis still calls pending (the worker's status
/// write went to a Redis that then went back in time, or failed over: found by `scripts/chaos`,
/// fsync seed 21) is taken off the pending set and shown as its order again — else the sale
/// would never retire.
#[tokio::test(flavor = "multi_thread")]
async fn a_winner_left_pending_by_a_lost_status_write_is_settled_and_the_sale_retires() {
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_KEY_GRACE_SECS", "3"),
            ("SECKILL_SWEEP_INTERVAL_MS", "100"),
            // The orders expire (nothing left that could change Redis), so the sale can retire.
            ("SECKILL_PAYMENT_TIMEOUT_SECS", "20"),
        ],
    )
    .await;
    let api = &app.api;
    let product = api.create_product(5, -1, 4).await;
    assert_eq!(api.preheat(product, false).await.status(), 200);
    for user in 1..=2 {
        assert_eq!(api.buy(user, product).await.status(), 202);
    }
    await_orders(&app.db, product, 2, Duration::from_secs(20)).await;
    let keys = app.keys().product(ProductId::try_from(product).unwrap());
    let settled = eventually(Duration::from_secs(10), || async {
        app.redis.scard::<i64, _>(&keys.pending).await.unwrap() == 0
    })
    .await;
    assert!(settled, "the worker takes its winners off the pending set");
    // Redis loses the worker's status write of user 1's order.
    let won = me(&app, 1, product).await;
    assert_eq!(won["status"], "confirmed", "{won}");
    let rid = won["reservation_id"].as_str().unwrap().to_owned();
    let _: i64 = app.redis.sadd(&keys.pending, &rid).await.unwrap();
    let _: i64 = app
        .redis
        .hset(&keys.status, (&rid, "pending"))
        .await
        .unwrap();

    // Within two passes of the sweeper (5 s apart), well before the order expires.
    let cleared = eventually(Duration::from_secs(12), || async {
        app.redis.scard::<i64, _>(&keys.pending).await.unwrap() == 0
    })
    .await;
    assert!(cleared, "the stale pending entry is taken off");
    let status: String = app.redis.hget(&keys.status, &rid).await.unwrap();
    assert!(status.contains("\"confirmed\""), "{status}");
    assert_eq!(api.metric("seckill_pending_settled_total").await, 1.0);
    // And the ended sale retires (once its orders expired and their units came back).
    let retired = eventually(Duration::from_secs(45), || async {
        ttls(&app, product).await.iter().any(|(_, t)| *t > 0)
    })
    .await;
    assert!(retired, "{:?}", ttls(&app, product).await);
    app.stop().await;
}
