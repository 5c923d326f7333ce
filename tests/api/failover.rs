//! A `202` survives a Redis that went back in time and a worker that stalls while holding
//! winners: the product is `recovering` until every winner that ever left Redis is accounted
//! for in Postgres, and then rebuilt by counting — never a unit sold twice, never a `202`
//! without an order.

use std::{collections::HashMap, time::Duration};

use fred::{prelude::*, types::Value as Dumped};
use seckill::startup::Role;

use crate::helpers::{
    Proc, TestApp, amqp_channel, assert_problem, delete_prefix, eventually, http_sale,
    passive_declare, pg_count, purchase_token, queue_len, scan_prefix,
};

/// Every Redis key of one product, as `DUMP` gives them (a moment to go back to).
async fn snapshot(app: &TestApp, product: i64) -> Vec<(String, Dumped)> {
    let client = app.redis.next();
    let tag = format!("{{p{product}}}");
    let mut keys = Vec::new();
    for key in scan_prefix(client, &app.iso.prefix).await.unwrap() {
        if key.contains(&tag) {
            let dumped: Dumped = client.dump(&key).await.unwrap();
            keys.push((key, dumped));
        }
    }
    assert!(!keys.is_empty());
    keys
}

/// Puts the product's keys back to `moment`, as a failover to a replica that had received
/// only the writes up to then would: every later key gone, every earlier one as it was.
async fn roll_back(app: &TestApp, product: i64, moment: &[(String, Dumped)]) {
    let client = app.redis.next();
    let tag = format!("{{p{product}}}");
    let now: Vec<String> = scan_prefix(client, &app.iso.prefix)
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.contains(&tag))
        .collect();
    let _: i64 = client.del(now).await.unwrap();
    for (key, dumped) in moment {
        let _: () = client
            .restore(key, 0, dumped.clone(), true, false, None, None)
            .await
            .unwrap();
    }
}

async fn orders_of(app: &TestApp, product: i64) -> i64 {
    pg_count(
        &app.db,
        &format!("select count(*) from orders where product_id = {product}"),
    )
    .await
}

/// Every `202` in `winners` ended as this shopper's order, with the reservation id it named.
async fn every_202_is_an_order(app: &TestApp, product: i64, winners: &HashMap<i64, String>) {
    for (user, rid) in winners {
        let n = pg_count(
            &app.db,
            &format!(
                "select count(*) from orders where product_id = {product} and user_id = {user} \
                 and reservation_id = '{rid}'"
            ),
        )
        .await;
        assert_eq!(n, 1, "the 202 of user {user} ({rid}) has no order");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_rolled_back_after_relaying_later_winners_sells_nothing_twice() {
    // API + relay; the worker comes later, so the relayed winners wait in RabbitMQ.
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let product = app.api.live_product(200).await;
    let queue = app.iso.queue.clone();
    let relayed = |n: u32| {
        let q = queue.clone();
        eventually(Duration::from_secs(15), move || {
            let q = q.clone();
            async move { queue_len(&q).await == n }
        })
    };
    let (first, _) = http_sale(&app.api, product, 1..=60, 1).await;
    assert_eq!(first.len(), 60);
    assert!(relayed(60).await, "the first 60 winners reach RabbitMQ");
    // The moment a lagging replica holds: the first 60 wins, relayed and acknowledged.
    let outbox_empty = eventually(Duration::from_secs(10), || async {
        app.api.admin_product(product).await["pending"] == 60
            && app.reservations().outbox_len(pid(product)).await.unwrap() == 0
    })
    .await;
    assert!(outbox_empty);
    let moment = snapshot(&app, product).await;

    let (second, _) = http_sale(&app.api, product, 61..=120, 1).await;
    assert_eq!(second.len(), 60);
    assert!(relayed(120).await, "the next 60 winners reach RabbitMQ too");

    // The failover: Redis is back at the moment of the first 60.
    roll_back(&app, product, &moment).await;

    // Not a 202 from the 140 units the old moment shows: the rollback is recognised.
    let token = purchase_token(1_000, product);
    assert_problem(
        app.api.reserve(1_000, product, &token).await,
        503,
        "recovering",
    )
    .await;
    assert_eq!(app.api.product(product).await["state"], "recovering");

    // A worker persists the 120 relayed winners; then the product is rebuilt by counting.
    let _worker = Proc::start(&app.iso, "worker", &[]);
    let rebuilt = eventually(Duration::from_secs(40), || async {
        app.api.product(product).await["state"] == "live"
    })
    .await;
    assert!(
        rebuilt,
        "rebuilt by itself: {}",
        app.api.product(product).await
    );
    assert_eq!(orders_of(&app, product).await, 120);
    assert_eq!(app.api.product(product).await["remaining"], 80);

    // The rest of the sale sells exactly the 80 units left.
    let (third, _) = http_sale(&app.api, product, 2_001..=2_300, 1).await;
    assert_eq!(third.len(), 80);
    let persisted = eventually(Duration::from_secs(30), || async {
        orders_of(&app, product).await == 200
    })
    .await;
    assert!(persisted, "{} orders", orders_of(&app, product).await);
    for winners in [&first, &second, &third] {
        every_202_is_an_order(&app, product, winners).await;
    }
    assert_eq!(
        pg_count(
            &app.db,
            &format!("select count(*) from rejection where product_id = {product}"),
        )
        .await,
        0,
        "no 202 ended rejected"
    );
    app.stop().await;
}

fn pid(product: i64) -> seckill::domain::ProductId {
    seckill::domain::ProductId::try_from(product).unwrap()
}

fn signal(proc: &Proc, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &proc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Consumers on a queue (on a fresh connection).
async fn consumers(queue: &str) -> u32 {
    let (conn, ch) = amqp_channel().await.unwrap();
    let q = passive_declare(&ch, queue).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    q.consumer_count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stalled_with_winners_keeps_a_lost_product_recovering_until_they_are_orders() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let product = app.api.live_product(300).await;
    // A real worker process, stopped (as a long pause or a stuck host would) while its
    // consumers hold every winner the broker pushes to them: delivered, not acknowledged.
    let worker = Proc::start(&app.iso, "worker", &[]);
    let queue = app.iso.queue.clone();
    assert!(
        eventually(Duration::from_secs(20), || {
            let q = queue.clone();
            async move { consumers(&q).await >= 1 }
        })
        .await
    );
    signal(&worker, "-STOP");
    let (first, _) = http_sale(&app.api, product, 1..=300, 1).await;
    assert_eq!(first.len(), 300);
    let all_out = eventually(Duration::from_secs(15), || async {
        app.reservations().outbox_len(pid(product)).await.unwrap() == 0
            && queue_len(&app.iso.queue).await == 0
    })
    .await;
    assert!(
        all_out,
        "the winners left Redis and sit unacknowledged at the worker"
    );
    assert_eq!(orders_of(&app, product).await, 0);

    // Redis loses the product while the worker is stalled.
    delete_prefix(app.redis.next(), &app.iso.prefix)
        .await
        .unwrap();

    // Found lost (the product view may say `live` from its cache for a moment).
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.api.product(product).await["state"] == "recovering"
        })
        .await
    );
    // For as long as the worker holds them, no rebuild: a rebuild from Postgres now would put
    // the 300 units on sale a second time.
    let stalled_until = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut user = 10_000;
    while tokio::time::Instant::now() < stalled_until {
        let view = app.api.product(product).await;
        assert_eq!(view["state"], "recovering", "{view}");
        user += 1;
        let token = purchase_token(user, product);
        let res = app.api.reserve(user, product, &token).await;
        assert_ne!(
            res.status(),
            202,
            "a unit sold twice while the worker stalled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The worker resumes: the 300 become orders, then the product is rebuilt, sold out.
    signal(&worker, "-CONT");
    let persisted = eventually(Duration::from_secs(30), || async {
        orders_of(&app, product).await == 300
    })
    .await;
    assert!(persisted, "{} orders", orders_of(&app, product).await);
    let rebuilt = eventually(Duration::from_secs(30), || async {
        app.api.product(product).await["state"] == "sold_out"
    })
    .await;
    assert!(rebuilt, "{}", app.api.product(product).await);
    let (late, _) = http_sale(&app.api, product, 20_001..=20_100, 1).await;
    assert!(late.is_empty(), "nothing left to win");
    every_202_is_an_order(&app, product, &first).await;
    assert_eq!(
        pg_count(
            &app.db,
            &format!("select count(*) from rejection where product_id = {product}"),
        )
        .await,
        0
    );
    drop(worker);
    app.stop().await;
}
