//! Clean-up shared by the IO benches: each leaves nothing behind in Redis, Postgres or RabbitMQ.

#![allow(dead_code)] // each bench uses the parts it needs

use sea_orm::ConnectionTrait;

/// Deletes every key under `prefix:` (single-node Redis: benches run against loopback).
pub async fn delete_keys(pool: &fred::prelude::Pool, prefix: &str) {
    let keys: Vec<String> = fred::prelude::ClientLike::custom(
        pool.next(),
        fred::cmd!("KEYS"),
        vec![format!("{prefix}:*")],
    )
    .await
    .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = fred::prelude::KeysInterface::del(pool, keys).await;
    }
}

/// Drops a scratch database.
pub async fn drop_database(name: &str) {
    if let Ok(admin) =
        sea_orm::Database::connect("postgres://postgres@127.0.0.1:5432/postgres").await
    {
        let _ = admin
            .execute_unprepared(&format!("drop database if exists \"{name}\" with (force)"))
            .await;
    }
}

/// Deletes a queue and its dead-letter queue.
pub async fn delete_queues(amqp_url: &str, queue: &str) {
    if let Ok(conn) =
        lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await
    {
        if let Ok(ch) = conn.create_channel().await {
            for q in [queue.to_owned(), format!("{queue}.dlq")] {
                let _ = ch
                    .queue_delete(
                        q.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
        }
        let _ = conn.close(200, "bench done".into()).await;
    }
}

/// Puts `product` on sale now with stock that never runs out, so every attempt by a user who
/// has not tried before wins (see [`FreshUsers`]).
pub async fn ample_sale(
    r: &seckill::reservations::Reservations,
    product: seckill::domain::ProductId,
) -> Result<(), seckill::reservations::Unavailable> {
    let now = chrono::Utc::now().timestamp_millis();
    let plan = seckill::reservations::PreheatPlan {
        product,
        stock: 1_000_000_000,
        live_orders: 0,
        buyers: vec![],
        pending: Default::default(),
        closed: vec![],
        starts_ms: now - 1_000,
        ends_ms: now + 86_400_000,
        force: false,
    };
    r.preheat(&plan).await.map(drop)
}

/// Users who have never tried, numbered up from 1: each one's first attempt wins.
#[derive(Default)]
pub struct FreshUsers(std::sync::atomic::AtomicI64);

impl FreshUsers {
    pub fn next(&self) -> seckill::domain::UserId {
        let id = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        seckill::domain::UserId::try_from(id)
            .unwrap_or_else(|_| unreachable!("ids count up from 1"))
    }
}
