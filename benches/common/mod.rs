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
