//! Postgres: connecting (creating the database if missing), migrations and entities.

pub mod entities;

use std::time::Duration;

use anyhow::Context;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, Statement};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager, async_trait};

/// Splits `postgres://…/name?query` into the URL of the server's `postgres` database and `name`.
pub fn split_database_name(url: &str) -> anyhow::Result<(String, String)> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base
        .find("://")
        .map(|i| i + 3)
        .context("database URL has no scheme")?;
    let slash = base[after_scheme..]
        .find('/')
        .map(|i| i + after_scheme)
        .context("database URL names no database")?;
    let name = &base[slash + 1..];
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "database name {name:?} must be 1-63 letters, digits, '_' or '-'"
    );
    let mut admin = format!("{}/postgres", &base[..slash]);
    if let Some(q) = query {
        admin.push('?');
        admin.push_str(q);
    }
    Ok((admin, name.to_owned()))
}

fn options(url: &str, max_connections: u32) -> ConnectOptions {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(max_connections)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(3))
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(300))
        .sqlx_logging(false);
    opts
}

/// `host:port` of a URL, without user or password (`?` for a URL that does not parse).
pub fn endpoint(url: &str, default_port: u16) -> (String, u16) {
    reqwest::Url::parse(url).map_or_else(
        |_| ("?".to_owned(), default_port),
        |u| {
            (
                u.host_str().unwrap_or("localhost").to_owned(),
                u.port().unwrap_or(default_port),
            )
        },
    )
}

/// Why Postgres at `url` refused a connection, in one line naming `SECKILL_DATABASE_URL`, the
/// host and port (never the password) and the cause: refused, timed out, authentication, TLS,
/// a missing database, or what the server said.
pub async fn connect_error(url: &str, e: &DbErr) -> anyhow::Error {
    let (host, port) = endpoint(url, 5432);
    let probe = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await;
    let text = e.to_string();
    let cause = match probe {
        Err(_) => {
            "timed out (nothing answered in 3 s: a firewall, or a host that is down)".to_owned()
        }
        Ok(Err(io)) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused (is Postgres running and listening there?)".to_owned()
        }
        Ok(Err(io)) => io.to_string(),
        Ok(Ok(_)) if text.contains("password authentication failed") || text.contains("28P01") => {
            "authentication failed (check the user and password in the URL)".to_owned()
        }
        Ok(Ok(_))
            if text.to_ascii_lowercase().contains("tls")
                || text.to_ascii_lowercase().contains("ssl") =>
        {
            format!("TLS failed ({text})")
        }
        Ok(Ok(_)) if text.contains("does not exist") => text.clone(),
        Ok(Ok(_)) => format!("it answered, then: {text}"),
    };
    anyhow::anyhow!("SECKILL_DATABASE_URL: cannot connect to Postgres at {host}:{port}: {cause}")
}

async fn open(url: &str, max_connections: u32) -> anyhow::Result<DatabaseConnection> {
    match Database::connect(options(url, max_connections)).await {
        Ok(db) => Ok(db),
        Err(e) => Err(connect_error(url, &e).await),
    }
}

/// Creates the database named in `url` if it does not exist (safe when several processes race).
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let (admin_url, name) = split_database_name(url)?;
    let admin = open(&admin_url, 1).await?;
    let exists = admin
        .query_one_raw(Statement::from_sql_and_values(
            admin.get_database_backend(),
            "select 1 from pg_database where datname = $1",
            [name.clone().into()],
        ))
        .await
        .context("looking up the database")?
        .is_some();
    if !exists {
        let sql = format!("create database \"{name}\"");
        match admin.execute_unprepared(&sql).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // 42P04 duplicate_database / 23505: another process created it first.
            Err(e) if is_already_exists(&e) => {}
            Err(e) => return Err(e).context("creating the database"),
        }
    }
    admin.close().await.ok();
    Ok(())
}

fn is_already_exists(e: &DbErr) -> bool {
    let text = e.to_string();
    text.contains("already exists") || text.contains("pg_database_datname_index")
}

/// Connects the application pool.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<DatabaseConnection> {
    open(url, max_connections).await
}

/// Creates the database if missing and applies pending migrations, one process at a time.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    create_database_if_missing(url).await?;
    // One connection, so the advisory lock and the migrations share a session.
    let conn = connect(url, 1).await?;
    conn.execute_unprepared("select pg_advisory_lock(7355608)")
        .await
        .context("taking the migration lock")?;
    let result = Migrator::up(&conn, None)
        .await
        .context("applying migrations");
    conn.execute_unprepared("select pg_advisory_unlock(7355608)")
        .await
        .ok();
    conn.close().await.ok();
    result
}

/// For `SECKILL_MIGRATE=0`: fails, naming them, unless every migration has been applied (by a
/// `seckill migrate` run with a role that may change the schema).
pub async fn check_migrated(url: &str) -> anyhow::Result<()> {
    let conn = connect(url, 1).await?;
    let pending = Migrator::get_pending_migrations(&conn)
        .await
        .context("reading which migrations are applied");
    conn.close().await.ok();
    let names: Vec<String> = pending?.iter().map(|m| m.name().to_owned()).collect();
    anyhow::ensure!(
        names.is_empty(),
        crate::config::ConfigError::new(
            "SECKILL_MIGRATE",
            format!(
                "0, but the database lacks migrations {}: run `seckill migrate` with a role that may change the schema",
                names.join(", ")
            ),
        )
    );
    Ok(())
}

/// The project's migrations: plain SQL files in `migrations/`.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(SqlMigration {
                name: "0001_init",
                sql: include_str!("../../migrations/0001_init.sql"),
            }),
            Box::new(SqlMigration {
                name: "0002_preheated",
                sql: include_str!("../../migrations/0002_preheated.sql"),
            }),
            Box::new(SqlMigration {
                name: "0003_rejection",
                sql: include_str!("../../migrations/0003_rejection.sql"),
            }),
            Box::new(SqlMigration {
                name: "0004_retired",
                sql: include_str!("../../migrations/0004_retired.sql"),
            }),
            Box::new(SqlMigration {
                name: "0005_relayed",
                sql: include_str!("../../migrations/0005_relayed.sql"),
            }),
            Box::new(SqlMigration {
                name: "0006_released_moment",
                sql: include_str!("../../migrations/0006_released_moment.sql"),
            }),
            Box::new(SqlMigration {
                name: "0007_payment",
                sql: include_str!("../../migrations/0007_payment.sql"),
            }),
            Box::new(SqlMigration {
                name: "0008_order_event",
                sql: include_str!("../../migrations/0008_order_event.sql"),
            }),
            Box::new(SqlMigration {
                name: "0009_currency",
                sql: include_str!("../../migrations/0009_currency.sql"),
            }),
            Box::new(SqlMigration {
                name: "0010_waiting_room",
                sql: include_str!("../../migrations/0010_waiting_room.sql"),
            }),
            Box::new(SqlMigration {
                name: "0011_proof_of_work",
                sql: include_str!("../../migrations/0011_proof_of_work.sql"),
            }),
        ]
    }
}

struct SqlMigration {
    name: &'static str,
    sql: &'static str,
}

impl MigrationName for SqlMigration {
    fn name(&self) -> &str {
        self.name
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SqlMigration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(self.sql)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_split_from_the_url() {
        let (admin, name) =
            split_database_name("postgres://postgres@127.0.0.1:5432/seckill").unwrap();
        assert_eq!(admin, "postgres://postgres@127.0.0.1:5432/postgres");
        assert_eq!(name, "seckill");
        let (admin, name) = split_database_name("postgres://u:p@h/db_1?sslmode=disable").unwrap();
        assert_eq!(admin, "postgres://u:p@h/postgres?sslmode=disable");
        assert_eq!(name, "db_1");
        assert!(split_database_name("postgres://h:5432").is_err());
        assert!(split_database_name("postgres://h/bad\"name").is_err());
    }
}
