//! The worker never wedges and never drops a winner for another's fault: a message Postgres
//! refuses goes to the dead-letter queue alone, with its reason; a winner beyond stock ends
//! `rejected`; operators list and replay the DLQ with `seckill dlq`.

use std::{collections::HashSet, time::Duration};

use fred::prelude::*;
use lapin::{
    options::{BasicGetOptions, ConfirmSelectOptions},
    types::AMQPValue,
};
use seckill::{
    amqp::{declare_topology, dlq_name},
    dlq::REASON_HEADER,
    domain::{ProductId, UserId},
    reservations::Outcome,
    startup::Role,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    Isolation, Sibling, TestApp, amqp_channel, await_orders, eventually, order_count, pg_count,
    publish_persistent, queue_len, seckill_command, sold_count,
};

/// A winner as the relay publishes it.
fn winner(user: i64, product: i64, reserved_at: &str) -> Vec<u8> {
    json!({"v": 1, "reservation_id": Uuid::now_v7(), "user_id": user, "product_id": product,
           "reserved_at": reserved_at})
    .to_string()
    .into_bytes()
}

/// Publishes each body to `queue` (persistent), every one confirmed by the broker. A nack (a
/// quorum queue declared a moment ago may not take messages yet on a loaded machine) is
/// published again, as the relay does.
async fn publish(queue: &str, bodies: &[Vec<u8>]) {
    let (conn, ch) = amqp_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare_topology(&conn, queue).await.unwrap();
    for body in bodies {
        let mut attempts = 0;
        loop {
            if publish_persistent(&ch, queue, body).await {
                break;
            }
            attempts += 1;
            assert!(
                attempts < 20,
                "the broker kept refusing a message to {queue}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Whether `queue` holds `count` ready messages within 10 s.
async fn holds(queue: &str, count: u32) -> bool {
    eventually(Duration::from_secs(10), || async {
        queue_len(queue).await == count
    })
    .await
}

/// Takes every message out of `queue`'s DLQ: (body, reason header).
async fn drain_dlq(queue: &str) -> Vec<(Vec<u8>, String)> {
    let (conn, ch) = amqp_channel().await.unwrap();
    let mut dead = Vec::new();
    while let Some(got) = ch
        .basic_get(
            dlq_name(queue).as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let headers = got
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let reason = match headers.inner().get(REASON_HEADER) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("no {REASON_HEADER} header: {other:?}"),
        };
        dead.push((got.delivery.data.clone(), reason));
    }
    let _ = conn.close(200, "bye".into()).await;
    dead
}

/// Runs `seckill dlq <args>` against this deployment (the real binary); its stdout.
async fn seckill_dlq(iso: &Isolation, args: &[&str]) -> String {
    let mut cmd = seckill_command();
    cmd.arg("dlq")
        .args(args)
        .envs(iso.vars("127.0.0.1:0", "127.0.0.1:0"));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "seckill dlq {args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// `seckill dlq list`'s JSON lines.
async fn dlq_list(iso: &Isolation, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["list"];
    all.extend_from_slice(args);
    seckill_dlq(iso, &all)
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_and_a_winner_beyond_stock_in_one_batch_leave_198_orders_and_the_worker_going() {
    // API + relay only: the winners wait in the queue until a worker joins.
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.live_product(198).await;
    let pid = ProductId::try_from(p).unwrap();
    // As if Redis lost data (durability `none`) and now believes in one unit more than
    // Postgres has: 199 shoppers win.
    let k = app.keys().product(pid);
    let _: i64 = app.redis.hset(&k.state, ("remaining", 199)).await.unwrap();
    let r = app.reservations();
    let mut wins = Vec::new();
    for u in 1..=199_i64 {
        if u == 199 {
            // The last win is strictly the latest (reserved_at has millisecond precision).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match r
            .reserve(UserId::try_from(u).unwrap(), pid)
            .await
            .unwrap()
            .outcome
        {
            Outcome::Won { reservation_id, .. } => wins.push((u, reservation_id)),
            other => panic!("user {u}: {other:?}"),
        }
    }
    let queue = app.iso.queue.clone();
    assert!(
        holds(&queue, 199).await,
        "the relay did not publish the 199 winners"
    );
    // Two poison messages in the same batch: a winner of a product that does not exist
    // (foreign key, SQLSTATE 23503) and one whose time Postgres cannot store (22008).
    let unknown_product = winner(5_001, 999_999_999, &chrono::Utc::now().to_rfc3339());
    let bad_value = winner(5_002, p, "-5000-01-01T00:00:00Z");
    publish(&queue, &[unknown_product.clone(), bad_value.clone()]).await;
    assert_eq!(queue_len(&queue).await, 201);

    // One consumer, one batch of all 201.
    let worker = Sibling::spawn(
        &app.iso,
        Role::Worker,
        &[
            ("SECKILL_WORKER_BATCH_SIZE", "500"),
            ("SECKILL_WORKER_BATCH_WAIT_MS", "1000"),
            ("SECKILL_WORKER_CONSUMERS", "1"),
        ],
    )
    .await;
    await_orders(&app.db, p, 198, Duration::from_secs(30)).await;
    assert_eq!(sold_count(&app.db, p).await, 198);

    // The two poison messages are in the DLQ, each alone, with the database's reason.
    let dlq = dlq_name(&queue);
    assert!(holds(&dlq, 2).await);
    let dead = drain_dlq(&queue).await;
    let bodies: HashSet<Vec<u8>> = dead.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(
        bodies,
        HashSet::from([unknown_product.clone(), bad_value.clone()])
    );
    for (body, reason) in &dead {
        let expected = if *body == unknown_product {
            "permanent database error 23503: "
        } else {
            "permanent database error 22008: "
        };
        assert!(reason.starts_with(expected), "{reason}");
    }

    // The latest winner found no unit left: rejected, visibly, with a reason.
    let (late_user, late_rid) = wins[198];
    let rejected = pg_count(
        &app.db,
        &format!(
            "select count(*) from rejection where product_id = {p} and reservation_id = '{late_rid}'"
        ),
    )
    .await;
    assert_eq!(rejected, 1);
    assert_eq!(
        pg_count(
            &app.db,
            &format!("select count(*) from rejection where product_id = {p}")
        )
        .await,
        1
    );
    let me = app.api.me(late_user, p).await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!(me["status"], "rejected", "{me}");
    assert_eq!(me["reservation_id"], late_rid.to_string());
    assert!(
        me["reason"].as_str().unwrap().starts_with("sold out: "),
        "{me}"
    );
    assert!(me.get("order_id").is_none(), "{me}");
    // Its status stream shows it and ends (a terminal state).
    let events = app.api.me_events(late_user, p).await;
    let text = tokio::time::timeout(Duration::from_secs(5), events.text())
        .await
        .expect("the stream ends after rejected")
        .unwrap();
    assert!(text.contains(r#""status":"rejected""#), "{text}");
    // Every winner was decided: none is left pending in Redis.
    assert_eq!(r.pending_count(pid).await.unwrap(), 0);
    assert_eq!(
        worker
            .api
            .metric(r#"seckill_reservations_rejected_total{cause="sold_out"}"#)
            .await,
        1.0
    );
    assert_eq!(worker.api.metric("seckill_dead_lettered_total").await, 2.0);

    // Had Redis lost it all again, the shopper still sees the rejection (from Postgres).
    let _: i64 = app.redis.del(vec![k.status, k.buyers]).await.unwrap();
    let me: Value = app.api.me(late_user, p).await.json().await.unwrap();
    assert_eq!(me["status"], "rejected", "{me}");
    assert_eq!(me["reservation_id"], late_rid.to_string());
    let (early_user, _) = wins[0];
    let me: Value = app.api.me(early_user, p).await.json().await.unwrap();
    assert_eq!(me["status"], "confirmed", "{me}");

    // The worker did not wedge: a later winner becomes an order.
    let p2 = app.api.live_product(5).await;
    assert_eq!(app.api.buy(7, p2).await.status(), 202);
    await_orders(&app.db, p2, 1, Duration::from_secs(10)).await;
    worker.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_list_shows_reasons_and_replay_moves_messages_back_once_the_cause_is_fixed() {
    // One consumer with a long batch window: the replayed winners arrive in one batch.
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_WORKER_CONSUMERS", "1"),
            ("SECKILL_WORKER_BATCH_WAIT_MS", "500"),
        ],
    )
    .await;
    let queue = app.iso.queue.clone();
    // Two winners of a product Postgres does not know yet, and a message nobody can read.
    let missing: i64 = 424_242;
    let now = chrono::Utc::now();
    let first = winner(7, missing, &now.to_rfc3339());
    let second = winner(
        8,
        missing,
        &(now + chrono::Duration::seconds(1)).to_rfc3339(),
    );
    let unreadable = b"{not an order".to_vec();
    publish(&queue, &[first.clone(), second.clone(), unreadable.clone()]).await;
    let dlq = dlq_name(&queue);
    assert!(holds(&dlq, 3).await);

    // `list` prints body and reason, and leaves the messages where they are.
    let listed = dlq_list(&app.iso, &[]).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    let first_json: Value = serde_json::from_slice(&first).unwrap();
    let second_json: Value = serde_json::from_slice(&second).unwrap();
    let bodies: HashSet<String> = listed.iter().map(|l| l["body"].to_string()).collect();
    let expected: HashSet<String> = [
        first_json.to_string(),
        second_json.to_string(),
        json!("{not an order").to_string(),
    ]
    .into();
    assert_eq!(bodies, expected);
    for line in &listed {
        let reason = line["reason"].as_str().unwrap();
        if line["body"].is_string() {
            assert!(reason.starts_with("unreadable message: "), "{reason}");
        } else {
            assert!(
                reason.starts_with("permanent database error 23503: "),
                "{reason}"
            );
        }
    }
    assert_eq!(dlq_list(&app.iso, &["--limit", "1"]).await.len(), 1);
    assert!(holds(&dlq, 3).await, "list removed messages");

    // The cause is fixed (the product exists, with one unit); replay.
    use sea_orm::ConnectionTrait;
    app.db
        .execute_unprepared(&format!(
            "insert into product (product_id, name, stock, price_cents, starts_at, ends_at) \
             values ({missing}, 'late', 1, 1, now(), now() + interval '1 hour')"
        ))
        .await
        .unwrap();
    let out = seckill_dlq(&app.iso, &["replay"]).await;
    assert!(out.contains("replayed 3 message(s)"), "{out}");
    // One winner gets the unit, the later one is rejected, the unreadable one is back.
    await_orders(&app.db, missing, 1, Duration::from_secs(10)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            pg_count(
                &app.db,
                &format!("select count(*) from rejection where product_id = {missing}"),
            )
            .await
                == 1
        })
        .await
    );
    let owner = pg_count(
        &app.db,
        &format!("select user_id from orders where product_id = {missing}"),
    )
    .await;
    assert_eq!(owner, 7, "the earlier win gets the unit");
    assert!(holds(&dlq, 1).await);
    let listed = dlq_list(&app.iso, &[]).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["body"], json!("{not an order"));
    assert_eq!(order_count(&app.db, missing).await, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_win_after_redis_lost_the_first_is_rejected_and_the_shopper_keeps_the_order() {
    // API + relay only, so the first win is still in flight when Redis loses it.
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.live_product(5).await;
    let pid = ProductId::try_from(p).unwrap();
    let r = app.reservations();
    let user = UserId::try_from(1).unwrap();
    let Outcome::Won {
        reservation_id: first,
        ..
    } = r.reserve(user, pid).await.unwrap().outcome
    else {
        panic!("the first attempt wins")
    };
    // Redis loses what it knew of that win, and a rebuild (which cannot see it) counts its
    // unit as on sale again: the same shopper wins a second time.
    let k = app.keys().product(pid);
    let _: i64 = app.redis.hdel(&k.buyers, "1").await.unwrap();
    let _: i64 = app.redis.hdel(&k.status, first.to_string()).await.unwrap();
    let _: i64 = app.redis.srem(&k.pending, first.to_string()).await.unwrap();
    let _: i64 = app.redis.hincrby(&k.state, "remaining", 1).await.unwrap();
    // As a rebuild writes it: a new epoch, its win sequence from 0 (a state that won before
    // and has no buyers left would be taken for a partial loss).
    let _: i64 = app.redis.hincrby(&k.state, "epoch", 1).await.unwrap();
    let _: i64 = app.redis.hset(&k.state, ("seq", 0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let Outcome::Won {
        reservation_id: second,
        ..
    } = r.reserve(user, pid).await.unwrap().outcome
    else {
        panic!("the second attempt wins too")
    };

    let worker = Sibling::spawn(
        &app.iso,
        Role::Worker,
        &[
            ("SECKILL_WORKER_CONSUMERS", "1"),
            ("SECKILL_WORKER_BATCH_WAIT_MS", "500"),
        ],
    )
    .await;
    await_orders(&app.db, p, 1, Duration::from_secs(10)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            r.pending_count(pid).await.unwrap() == 0
        })
        .await,
        "the second win is still pending"
    );
    let reason = pg_count(
        &app.db,
        &format!(
            "select count(*) from rejection where reservation_id = '{second}' \
             and reason like 'already holds an order:%'"
        ),
    )
    .await;
    assert_eq!(reason, 1);
    let ordered = pg_count(
        &app.db,
        &format!("select count(*) from orders where reservation_id = '{first}'"),
    )
    .await;
    assert_eq!(ordered, 1, "the earlier win is the order");
    // The shopper sees their order, not the rejected second win.
    let me: Value = app.api.me(1, p).await.json().await.unwrap();
    assert_eq!(me["status"], "confirmed", "{me}");
    assert_eq!(me["reservation_id"], first.to_string());
    assert_eq!(
        worker
            .api
            .metric(r#"seckill_reservations_rejected_total{cause="already_holds_order"}"#)
            .await,
        1.0
    );
    // The ledger adds up: Redis remaining + pending + live orders = stock.
    let remaining = r.remaining(pid).await.unwrap().unwrap();
    assert_eq!(remaining + 1, 5);
    assert_eq!(sold_count(&app.db, p).await, 1);
    worker.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_an_older_seckill_declared_with_delivery_limit_5_is_used_as_it_is() {
    use lapin::{
        options::QueueDeclareOptions,
        types::{FieldTable, LongString},
    };
    let iso = Isolation::new();
    // The queues as an older seckill declared them: its x-delivery-limit was 5.
    let (conn, ch) = amqp_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let dlq = dlq_name(&iso.queue);
    let mut dlq_args = FieldTable::default();
    dlq_args.insert("x-queue-type".into(), text("quorum"));
    ch.queue_declare(dlq.as_str().into(), durable, dlq_args)
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(&dlq));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    ch.queue_declare(iso.queue.as_str().into(), durable, args)
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;

    // Today's seckill declares it with other arguments: it uses it as it is, and a sale goes
    // through it to Postgres.
    let app = TestApp::spawn_isolated(iso, Role::All, &[]).await;
    let product = app.api.live_product(5).await;
    let (won, _) = crate::helpers::http_sale(&app.api, product, 1..=5, 1).await;
    assert_eq!(won.len(), 5);
    assert!(
        eventually(Duration::from_secs(20), || async {
            order_count(&app.db, product).await == 5
        })
        .await
    );
    app.stop().await;
}
