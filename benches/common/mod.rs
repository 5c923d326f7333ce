//! Clean-up shared by the IO benches: each leaves nothing behind in Redis, Postgres or RabbitMQ.
//! The local services, the secrets and the clean-up of a database and a queue are the tests'
//! (`tests/api/services.rs`).

#![allow(dead_code)] // each bench uses the parts it needs

#[path = "../../tests/api/services.rs"]
mod services;

#[allow(unused_imports)] // the reserve bench needs none of it
pub use services::*;

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
        epoch: 1,
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
