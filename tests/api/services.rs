//! The local services every test and bench talks to, written once: their loopback addresses,
//! the secrets the app runs with, one AMQP channel, and the clean-up of a scratch database and
//! queue. The benches include this file as well (`benches/common/mod.rs`).
#![allow(dead_code)] // each crate that includes this file uses its own part

use sea_orm::ConnectionTrait;

/// Postgres on loopback; a database name follows.
pub const PG: &str = "postgres://postgres@127.0.0.1:5432";
/// RabbitMQ on loopback.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const TOKEN_SECRET: &str = "test-token-secret-0123456789";
/// The storefront backend's token (`SECKILL_SERVICE_TOKENS`).
pub const SERVICE_TOKEN: &str = "test-service-token-0123456789abcdef01";

/// The secrets as the app reads them from its environment.
pub const SECRET_VARS: [(&str, &str); 4] = [
    ("SECKILL_JWT_SECRET", JWT_SECRET),
    ("SECKILL_ADMIN_TOKEN", ADMIN_TOKEN),
    ("SECKILL_TOKEN_SECRET", TOKEN_SECRET),
    ("SECKILL_SERVICE_TOKENS", SERVICE_TOKEN),
];

/// The events exchange of a deployment whose orders queue is `queue`.
pub fn events_exchange(queue: &str) -> String {
    format!("{queue}.events")
}

/// A fresh connection to the local RabbitMQ and a channel on it; close the connection when done.
pub async fn amqp_channel() -> lapin::Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// Drops a scratch database, whoever is still connected to it.
pub async fn drop_database(name: &str) {
    if let Ok(admin) = sea_orm::Database::connect(format!("{PG}/postgres")).await {
        // A process stopped while it was creating this database (a SIGTERM during start-up)
        // leaves its `CREATE DATABASE` running on the server: a drop before it ends finds
        // nothing, and the database is left behind. Wait for it first (10 s at most).
        let creating = sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!(
                "select count(*)::bigint as n from pg_stat_activity where state = 'active' \
                 and pid <> pg_backend_pid() and query ilike 'create database \"{name}\"%'"
            ),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let busy = match admin.query_one_raw(creating.clone()).await {
                Ok(Some(row)) => row.try_get::<i64>("", "n").unwrap_or(0) > 0,
                _ => false,
            };
            if !busy {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let _ = admin
            .execute_unprepared(&format!("drop database if exists \"{name}\" with (force)"))
            .await;
        let _ = admin.close().await;
    }
}

/// Deletes a queue and its dead-letter queue.
pub async fn delete_queues(queue: &str) {
    if let Ok((conn, ch)) = amqp_channel().await {
        for q in [queue.to_owned(), format!("{queue}.dlq")] {
            let _ = ch
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        // The test's events exchange (named after its queue: see `events_exchange`).
        let _ = ch
            .exchange_delete(
                events_exchange(queue).as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = conn.close(200, "bye".into()).await;
    }
}
