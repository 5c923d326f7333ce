//! The connections and process-wide state every component shares (a leaf: it knows nothing of
//! the HTTP layer or of how the application is wired).

use std::{sync::Arc, time::Duration};

use fred::prelude::{ClientLike, Pool};
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::Broker,
    config::Settings,
    db,
    durability::{self, ReadyCheck},
    events::Events,
    metrics::Metrics,
};

/// Postgres connections per process.
const DB_POOL: u32 = 16;
/// Redis connections per process.
const REDIS_POOL: usize = 4;

/// The connections every component shares.
pub struct Deps {
    pub settings: Arc<Settings>,
    pub redis: Pool,
    pub db: DatabaseConnection,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    /// Whether Redis still gives what `SECKILL_REDIS_DURABILITY` asks (for `/readyz`).
    pub durability: ReadyCheck,
}

impl Deps {
    /// Connects to Redis and checks that it gives the durability `SECKILL_REDIS_DURABILITY`
    /// asks (failing before anything else is touched), applies migrations (creating the
    /// database if missing), connects to Postgres, and starts the self-healing RabbitMQ
    /// connection (which may come up later).
    pub async fn connect(
        settings: Arc<Settings>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let redis =
            crate::redis::connect(&settings.redis, REDIS_POOL, Duration::from_secs(5)).await?;
        if let Err(e) = durability::check_at_start(settings.redis_durability, &redis).await {
            redis.quit().await.ok();
            return Err(e);
        }
        db::migrate(&settings.database_url).await?;
        let db = db::connect(&settings.database_url, DB_POOL).await?;
        let broker = Broker::start(&settings.amqp_url, shutdown.child_token());
        Ok(Self {
            durability: ReadyCheck::new(settings.redis_durability),
            settings,
            redis,
            db,
            broker,
            metrics: Arc::new(Metrics::new()?),
            events: Events::new(),
        })
    }
}
