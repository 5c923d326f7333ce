//! From winner to order: relay, queue, worker, payment and expiry against the real services.

use std::{collections::HashSet, time::Duration};

use fred::prelude::*;
use futures_util::{StreamExt, stream};
use lapin::options::BasicGetOptions;
use seckill::{
    domain::{ProductId, UserId},
    reservations::Outcome,
    startup::Role,
};
use serde_json::{Value, json};

use crate::helpers::{
    Isolation, Proc, Sibling, TestApp, amqp_channel, await_orders, buyer_count, eventually,
    http_sale, order_count, passive_declare, pg_count, pg_rows, publish_persistent, queue_len,
    sold_count,
};

/// `count` winners straight through the script (fast), users `first..first+count`.
async fn winners_via_script(
    app: &TestApp,
    product: i64,
    first: i64,
    count: i64,
) -> Vec<(i64, String)> {
    let r = app.reservations();
    let p = ProductId::try_from(product).unwrap();
    stream::iter(first..first + count)
        .map(|u| {
            let r = r.clone();
            async move {
                match r
                    .reserve(UserId::try_from(u).unwrap(), p)
                    .await
                    .unwrap()
                    .outcome
                {
                    Outcome::Won { reservation_id, .. } => (u, reservation_id.to_string()),
                    other => panic!("{other:?}"),
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// Redis remaining + won-but-not-persisted + live orders, and the stock.
async fn ledger(app: &TestApp, product: i64) -> (i64, i64, i64) {
    let r = app.reservations();
    let p = ProductId::try_from(product).unwrap();
    let remaining = r.remaining(p).await.unwrap().unwrap();
    let pending = r.pending_count(p).await.unwrap();
    let live = pg_count(
        &app.db,
        &format!("select count(*) from orders where product_id = {product} and status in ('pending_payment', 'paid')"),
    )
    .await;
    (remaining, pending, live)
}

/// Waits (`limit` at most) until the ledger reads `expected`; fails the test if it never does.
async fn await_ledger(app: &TestApp, product: i64, expected: (i64, i64, i64), limit: Duration) {
    let done = eventually(limit, || async { ledger(app, product).await == expected }).await;
    assert!(
        done,
        "ledger {:?}, not {expected:?}, after {limit:?}",
        ledger(app, product).await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_202_of_a_2000_shopper_sale_becomes_exactly_one_order_within_5_seconds() {
    let app = TestApp::spawn().await;
    let p = app.api.live_product(100).await;
    let (winners, answers) = http_sale(&app.api, p, 1..=2_000, 2).await;
    assert!(
        answers
            .iter()
            .all(|(s, _)| [202, 409, 410, 429].contains(s)),
        "{answers:?}"
    );
    assert_eq!(winners.len(), 100);

    await_orders(&app.db, p, 100, Duration::from_secs(5)).await;
    let persisted = buyer_count(&app.db, p).await;
    assert_eq!(persisted, 100);
    for (u, rid) in winners.iter().take(10) {
        let ok = eventually(Duration::from_secs(2), || async {
            let me: Value = app.api.me(*u, p).await.json().await.unwrap();
            me["status"] == "confirmed"
                && me["order_id"].is_string()
                && me["reservation_id"] == rid.as_str()
        })
        .await;
        assert!(ok, "user {u} not confirmed");
    }
    let sold = sold_count(&app.db, p).await;
    assert_eq!(sold, 100);
    assert_eq!(ledger(&app, p).await, (0, 0, 100));
    app.stop().await;
}

/// Reads SSE `status` events until `until` matches one (or 10 s pass).
async fn sse_until(mut res: reqwest::Response, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, res.chunk()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                let v: Value = serde_json::from_str(data).unwrap();
                let stop = until(&v);
                seen.push(v);
                if stop {
                    return seen;
                }
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_stream_pushes_pending_then_confirmed_then_paid_and_ends() {
    // The API alone first: the winner stays pending until a worker joins.
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let api = &app.api;
    let p = api.live_product(5).await;
    let won: Value = api.buy(1, p).await.json().await.unwrap();
    let events = api.me_events(1, p).await;
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let reader = tokio::spawn(sse_until(events, |v| v["status"] == "paid"));

    tokio::time::sleep(Duration::from_millis(300)).await;
    let worker = Sibling::spawn(&app.iso, Role::Worker, &[]).await;
    let order_id = loop {
        let me: Value = api.me(1, p).await.json().await.unwrap();
        if me["status"] == "confirmed" {
            break me["order_id"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(api.paid_at_checkout(&order_id).await.status(), 200);
    let seen = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .unwrap()
        .unwrap();
    let statuses: Vec<&str> = seen.iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["pending", "confirmed", "paid"], "{seen:?}");
    assert_eq!(seen[1]["order_id"], order_id.as_str());
    assert_eq!(seen[0]["reservation_id"], won["reservation_id"]);
    assert_eq!(api.me_events(2, p).await.status(), 404);
    worker.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_message_delivered_twice_makes_one_order() {
    let app = TestApp::spawn().await;
    let p = app.api.live_product(5).await;
    let won: Value = app.api.buy(1, p).await.json().await.unwrap();
    let rid = won["reservation_id"].as_str().unwrap().to_owned();
    await_orders(&app.db, p, 1, Duration::from_secs(5)).await;

    let message = json!({"v": 1, "reservation_id": rid, "user_id": 1, "product_id": p,
                         "reserved_at": chrono::Utc::now().to_rfc3339()});
    let (_conn, ch) = amqp_channel().await.unwrap();
    for _ in 0..2 {
        publish_persistent(&ch, &app.iso.queue, message.to_string().as_bytes()).await;
    }
    // Wait until the worker drained the queue, then check.
    assert!(
        eventually(Duration::from_secs(5), || async {
            queue_len(&app.iso.queue).await == 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(order_count(&app.db, p).await, 1);
    let sold = sold_count(&app.db, p).await;
    assert_eq!(sold, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_lands_in_the_dlq_and_does_not_block_the_queue() {
    let app = TestApp::spawn().await;
    let p = app.api.live_product(5).await;
    let (_conn, ch) = amqp_channel().await.unwrap();
    // The queue exists once the relay or worker declared it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            passive_declare(&ch, &app.iso.queue).await.is_ok()
        })
        .await
    );
    let (_conn, ch) = amqp_channel().await.unwrap();
    publish_persistent(&ch, &app.iso.queue, b"{this is not an order").await;
    publish_persistent(&ch, &app.iso.queue, br#"{"v":99,"anything":true}"#).await;
    let won = app.api.buy(2, p).await;
    assert_eq!(won.status(), 202);
    await_orders(&app.db, p, 1, Duration::from_secs(5)).await;
    let dlq = format!("{}.dlq", app.iso.queue);
    assert!(
        eventually(Duration::from_secs(5), || async {
            queue_len(&dlq).await == 2
        })
        .await
    );
    // Consumers run in parallel, so the two may be dead-lettered in either order.
    let mut dead = HashSet::new();
    for _ in 0..2 {
        let got = ch
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap();
        dead.insert(got.delivery.data.clone());
    }
    let expected: HashSet<Vec<u8>> = [
        b"{this is not an order".to_vec(),
        br#"{"v":99,"anything":true}"#.to_vec(),
    ]
    .into();
    assert_eq!(dead, expected);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_while_persisting_10000_winners_loses_and_doubles_nothing() {
    // API + relay in process; the worker is a real process we kill -9.
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.live_product(10_000).await;
    let winners = winners_via_script(&app, p, 1, 10_000).await;
    assert_eq!(winners.len(), 10_000);
    let small_batches = [
        ("SECKILL_WORKER_BATCH_SIZE", "50"),
        ("SECKILL_WORKER_BATCH_WAIT_MS", "5"),
    ];
    let mut worker = Proc::start(&app.iso, "worker", &small_batches);
    assert!(
        eventually(Duration::from_secs(30), || async {
            order_count(&app.db, p).await >= 500
        })
        .await,
        "the worker never started persisting"
    );
    worker.kill9();
    let at_kill = order_count(&app.db, p).await;
    assert!(
        at_kill < 10_000,
        "the worker finished before it could be killed ({at_kill})"
    );

    let _worker = Proc::start(&app.iso, "worker", &[]);
    await_orders(&app.db, p, 10_000, Duration::from_secs(60)).await;
    let distinct = buyer_count(&app.db, p).await;
    assert_eq!(distinct, 10_000);
    let sold = sold_count(&app.db, p).await;
    assert_eq!(sold, 10_000);
    let rids: HashSet<String> = winners.into_iter().map(|(_, r)| r).collect();
    let persisted = pg_count(
        &app.db,
        &format!(
            "select count(*) from orders where reservation_id in ({})",
            rids.iter()
                .map(|r| format!("'{r}'"))
                .collect::<Vec<_>>()
                .join(",")
        ),
    )
    .await;
    assert_eq!(persisted, 10_000);
    await_ledger(&app, p, (0, 0, 10_000), Duration::from_secs(10)).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn winners_recorded_by_a_serve_process_killed_before_relaying_are_published_by_another() {
    let iso = Isolation::new();
    seckill::db::migrate(&iso.database_url()).await.unwrap();
    // Process A serves shoppers but cannot reach RabbitMQ, so its relay publishes nothing.
    let a = Proc::start(
        &iso,
        "serve",
        &[("SECKILL_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    );
    a.wait_healthy().await;
    // The operators' API of this deployment, in process (no relay/worker of its own yet).
    let ops = TestApp::spawn_isolated(
        iso,
        Role::Serve,
        &[("SECKILL_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    )
    .await;
    let p = ops.api.live_product(50).await;
    let (winners, _) = http_sale(a.api(), p, 1..=80, 1).await;
    assert_eq!(winners.len(), 50);

    // A relay that read some entries and then died leaves them pending in the group.
    let stream = ops.keys().product(ProductId::try_from(p).unwrap()).outbox;
    let pool = &ops.redis;
    let _: Result<(), _> = pool
        .next()
        .xgroup_create(&stream, seckill::relay::GROUP, "0", true)
        .await;
    let _: fred::types::Value = pool
        .next()
        .xreadgroup(
            seckill::relay::GROUP,
            "dead-relay",
            Some(20),
            None,
            false,
            &stream,
            ">",
        )
        .await
        .unwrap();
    let summary: Vec<fred::types::Value> = pool
        .next()
        .custom(
            fred::cmd!("XPENDING"),
            vec![stream.clone(), seckill::relay::GROUP.to_owned()],
        )
        .await
        .unwrap();
    assert_eq!(
        summary[0].as_i64(),
        Some(20),
        "20 entries held by the dead relay"
    );
    let mut a = a;
    a.kill9();
    assert_eq!(order_count(&ops.db, p).await, 0);

    // Another serve process (and a worker) take over: every winner becomes an order, the
    // entries the dead relay held are reclaimed after the idle bound.
    let b = Sibling::spawn(
        &ops.iso,
        Role::All,
        &[("SECKILL_RELAY_CLAIM_IDLE_MS", "500")],
    )
    .await;
    await_orders(&ops.db, p, 50, Duration::from_secs(15)).await;
    let persisted: HashSet<String> = pg_rows(
        &ops.db,
        &format!("select reservation_id::text as r from orders where product_id = {p}"),
    )
    .await
    .iter()
    .map(|r| r.try_get::<String>("", "r").unwrap())
    .collect();
    assert_eq!(persisted, winners.values().cloned().collect::<HashSet<_>>());
    let left: i64 = pool.xlen(&stream).await.unwrap();
    assert_eq!(left, 0, "relayed entries are deleted from the outbox");
    b.stop().await;
    ops.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pay_and_two_sweepers_racing_over_1000_orders_end_each_exactly_once() {
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_SWEEP_INTERVAL_MS", "20"),
            ("SECKILL_USER_RATE", "1000/1s"),
        ],
    )
    .await;
    // A second worker process-worth of sweepers races the first one.
    let second = Sibling::spawn(
        &app.iso,
        Role::Worker,
        &[("SECKILL_SWEEP_INTERVAL_MS", "20")],
    )
    .await;
    let p = app.api.live_product(1_000).await;
    let winners = winners_via_script(&app, p, 1, 1_000).await;
    await_ledger(&app, p, (0, 0, 1_000), Duration::from_secs(20)).await;

    // Every order's deadline is now a moment away; shoppers pay while the sweeper expires.
    use sea_orm::ConnectionTrait;
    app.db
        .execute_unprepared(&format!(
            "update orders set expires_at = now() + interval '300 milliseconds' where product_id = {p}"
        ))
        .await
        .unwrap();
    let orders: Vec<(i64, String)> = pg_rows(
        &app.db,
        &format!("select user_id, order_id::text as o from orders where product_id = {p}"),
    )
    .await
    .iter()
    .map(|r| {
        (
            r.try_get::<i64>("", "user_id").unwrap(),
            r.try_get::<String>("", "o").unwrap(),
        )
    })
    .collect();
    assert_eq!(orders.len(), 1_000);
    let answers: Vec<u16> = stream::iter(orders)
        .map(|(_, o)| {
            let api = &app.api;
            async move { api.paid_at_checkout(o).await.status().as_u16() }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        answers.iter().all(|s| *s == 200 || *s == 409),
        "{answers:?}"
    );
    let paid_answers = answers.iter().filter(|s| **s == 200).count() as i64;

    // Let the sweeper finish (expire, then return each unit), then every order is exactly
    // paid or expired. (Generous: on a loaded 2-core machine the sweepers' rounds stretch.)
    assert!(
        eventually(Duration::from_secs(30), || async {
            pg_count(
                &app.db,
                &format!(
                    "select count(*) from orders where product_id = {p} \
                     and (status = 'pending_payment' or (status = 'expired' and released_at is null))"
                ),
            )
            .await
                == 0
        })
        .await
    );
    let paid = pg_count(
        &app.db,
        &format!("select count(*) from orders where product_id = {p} and status = 'paid'"),
    )
    .await;
    let expired = pg_count(
        &app.db,
        &format!("select count(*) from orders where product_id = {p} and status = 'expired'"),
    )
    .await;
    assert_eq!(paid + expired, 1_000);
    let paid_then_expired = pg_count(
        &app.db,
        &format!("select count(*) from orders where product_id = {p} and status = 'expired' and paid_at is not null"),
    )
    .await;
    assert_eq!(paid_then_expired, 0, "an order was paid and then expired");
    assert_eq!(
        paid, paid_answers,
        "a 200 for every paid order, a 409 for every expired one"
    );
    // Units of the expired ones are back in Redis exactly once.
    let pk = app.keys().product(ProductId::try_from(p).unwrap());
    let released: i64 = app.redis.scard(&pk.released).await.unwrap();
    assert_eq!(released, expired);
    let unreleased = pg_count(
        &app.db,
        &format!("select count(*) from orders where product_id = {p} and status = 'expired' and released_at is null"),
    )
    .await;
    assert_eq!(unreleased, 0);
    let (remaining, pending, live) = ledger(&app, p).await;
    assert_eq!((remaining, pending, live), (expired, 0, paid));
    assert_eq!(remaining + pending + live, 1_000);
    let sold = sold_count(&app.db, p).await;
    assert_eq!(sold, paid);
    // The returned units sell again, to other shoppers.
    let more = winners_via_script(&app, p, 5_001, expired).await;
    assert_eq!(more.len() as i64, expired);
    assert_eq!(winners.len(), 1_000);
    second.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unit_left_unreturned_by_a_dead_process_is_reconciled_once() {
    let app = TestApp::spawn_with(Role::All, &[("SECKILL_SWEEP_INTERVAL_MS", "50")]).await;
    let p = app.api.live_product(1).await;
    let won: Value = app.api.buy(1, p).await.json().await.unwrap();
    await_ledger(&app, p, (0, 0, 1), Duration::from_secs(5)).await;
    // As if a process cancelled in Postgres and died before release.lua ran.
    use sea_orm::ConnectionTrait;
    app.db
        .execute_unprepared(&format!(
            "update orders set status = 'cancelled', closed_at = now() - interval '1 minute' where product_id = {p};              update product set sold = sold - 1 where product_id = {p}"
        ))
        .await
        .unwrap();
    await_ledger(&app, p, (1, 0, 0), Duration::from_secs(5)).await;
    // Marked released in Postgres just after release.lua answered.
    let released = crate::helpers::eventually(Duration::from_secs(5), || async {
        pg_count(
            &app.db,
            &format!(
                "select count(*) from orders where product_id = {p} and released_at is not null"
            ),
        )
        .await
            == 1
    })
    .await;
    assert!(released);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ledger(&app, p).await, (1, 0, 0), "released exactly once");
    let me: Value = app.api.me(1, p).await.json().await.unwrap();
    assert_eq!(me["status"], "cancelled");
    assert_eq!(me["reservation_id"], won["reservation_id"]);
    app.stop().await;
}
