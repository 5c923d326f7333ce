//! The worker's batch step (`process_batch`) against the real Postgres and Redis, many batches
//! of one product at once: what several consumers, or worker processes, persisting a sale do.

use std::time::Duration;

use fred::prelude::*;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use seckill::{
    amqp::OrderMessage,
    domain::{ProductId, UserId},
    startup::Role,
    worker::{BatchOutcome, Failure, classify, process_batch},
};
use uuid::Uuid;

use crate::helpers::{TestApp, pg_count, sold_count};

/// `process_batch` as the worker runs it: a transient failure (a deadlock Postgres broke, a
/// lost connection) holds the batch and tries again.
async fn persist(app: &TestApp, db: &DatabaseConnection, batch: &[OrderMessage]) -> BatchOutcome {
    let reservations = app.reservations();
    for _ in 0..50 {
        match process_batch(db, &reservations, batch, Duration::from_secs(900)).await {
            Ok(outcome) => return outcome,
            Err(e) => match classify(e) {
                Failure::Transient(e) => {
                    eprintln!("transient, retrying: {e:#}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Failure::Permanent(reason) => panic!("refused for good: {reason}"),
            },
        }
    }
    panic!("50 transient failures in a row");
}

/// A pool of `n` connections, all open: `n` batches really run at once.
async fn open_pool(app: &TestApp, n: u32) -> DatabaseConnection {
    let db = seckill::db::connect(&app.iso.database_url(), n)
        .await
        .unwrap();
    let warm = (0..n).map(|_| db.execute_unprepared("select pg_sleep(0.2)"));
    futures_util::future::try_join_all(warm).await.unwrap();
    db
}

fn winner(user: i64, product: ProductId) -> OrderMessage {
    OrderMessage {
        v: OrderMessage::VERSION,
        reservation_id: Uuid::now_v7(),
        user_id: UserId::try_from(user).unwrap(),
        product_id: product,
        reserved_at: chrono::Utc::now(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_batches_of_one_product_never_take_more_units_than_its_stock() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.create_product(300, -1, 3_600).await;
    let pid = ProductId::try_from(p).unwrap();
    // 8 batches of 100 new winners each, all at once: 800 wins for 300 units, as if Redis had
    // lost the sale. Each batch sees 300 units free when it starts.
    let wins: Vec<Vec<OrderMessage>> = (0..8)
        .map(|b| (0..100).map(|i| winner(b * 100 + i + 1, pid)).collect())
        .collect();
    let app = std::sync::Arc::new(app);
    let db = open_pool(&app, 8).await;
    let mut running = tokio::task::JoinSet::new();
    for batch in wins {
        let (app, db) = (app.clone(), db.clone());
        running.spawn(async move { persist(&app, &db, &batch).await });
    }
    let mut inserted = 0;
    while let Some(outcome) = running.join_next().await {
        inserted += outcome.unwrap().inserted;
    }

    assert_eq!(inserted, 300, "exactly the stock became orders");
    assert_eq!(sold_count(&app.db, p).await, 300);
    let orders = pg_count(
        &app.db,
        &format!("select count(*) from orders where product_id = {p}"),
    )
    .await;
    assert_eq!(orders, 300);
    // Every win was decided exactly once: an order or a rejection, never both, never neither.
    let decided = pg_count(
        &app.db,
        &format!(
            "select count(distinct reservation_id) from \
             (select reservation_id from orders where product_id = {p} \
              union all select reservation_id from rejection where product_id = {p}) d"
        ),
    )
    .await;
    let rejected = pg_count(
        &app.db,
        &format!("select count(*) from rejection where product_id = {p}"),
    )
    .await;
    assert_eq!((decided, orders + rejected), (800, 800));
    // Each has its status in Redis.
    let statuses: i64 = app
        .redis
        .hlen(app.keys().product(pid).status)
        .await
        .unwrap();
    assert_eq!(statuses, 800);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_batches_with_units_for_all_make_every_order_once() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.create_product(1_000, -1, 3_600).await;
    let pid = ProductId::try_from(p).unwrap();
    let wins: Vec<OrderMessage> = (1..=800).map(|u| winner(u, pid)).collect();
    let app = std::sync::Arc::new(app);
    let db = open_pool(&app, 8).await;
    let mut running = tokio::task::JoinSet::new();
    // Each batch twice, at once: every winner is either decided already or racing its first
    // try (a redelivery after a consumer's connection dropped).
    for batch in wins.chunks(100).chain(wins.chunks(100)) {
        let (app, db, batch) = (app.clone(), db.clone(), batch.to_vec());
        running.spawn(async move { persist(&app, &db, &batch).await });
    }
    let mut inserted = 0;
    while let Some(outcome) = running.join_next().await {
        let outcome = outcome.unwrap();
        assert_eq!(outcome.rejected_sold_out + outcome.rejected_holding, 0);
        inserted += outcome.inserted;
    }
    assert_eq!(inserted, 800);
    assert_eq!(sold_count(&app.db, p).await, 800);
    assert_eq!(
        pg_count(
            &app.db,
            &format!("select count(*) from rejection where product_id = {p}")
        )
        .await,
        0
    );
}
