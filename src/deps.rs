//! The connections and process-wide state every component shares (a leaf: it knows nothing of
//! the HTTP layer or of how the application is wired).

use std::{sync::Arc, time::Duration};

use fred::prelude::{ClientLike, Pool};
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::Broker,
    cache::TtlCache,
    config::Settings,
    db,
    drain::Drain,
    durability::{self, ReadyCheck},
    metrics::Metrics,
    sse::SseStreams,
};

/// How long a readiness answer is reused: whatever the rate of `/readyz`, a process checks its
/// dependencies at most once per this period (concurrent requests share one check).
pub const READY_TTL: Duration = Duration::from_secs(1);

/// What `/readyz` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// `ok`, `unreachable`, or why Redis is not as durable as `SECKILL_REDIS_DURABILITY` asks.
    pub redis: String,
    pub rabbitmq: bool,
    pub postgres: bool,
}

impl Readiness {
    /// The dependencies that are not ready, by name.
    pub fn failing(&self) -> Vec<&'static str> {
        [
            ("redis", self.redis == "ok"),
            ("rabbitmq", self.rabbitmq),
            ("postgres", self.postgres),
        ]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect()
    }
}

/// The connections every component shares.
pub struct Deps {
    pub settings: Arc<Settings>,
    pub redis: Pool,
    pub db: DatabaseConnection,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    /// The shoppers' open event streams (caps and wake-ups).
    pub sse: Arc<SseStreams>,
    /// Whether Redis still gives what `SECKILL_REDIS_DURABILITY` asks (for `/readyz`).
    pub durability: Arc<ReadyCheck>,
    /// The last readiness answer, reused for [`READY_TTL`].
    ready: TtlCache<(), Readiness>,
    /// Where this process is in its shutdown (`/readyz` answers `503 draining` once it began).
    pub drain: Drain,
}

impl Deps {
    /// Connects to Redis and checks that it is new enough and gives the durability
    /// `SECKILL_REDIS_DURABILITY` asks (failing before anything else is touched), applies
    /// migrations (creating the database if missing), connects to Postgres, and starts the
    /// self-healing RabbitMQ connection (which may come up later).
    pub async fn connect(
        settings: Arc<Settings>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let redis =
            crate::redis::connect(&settings.redis, settings.redis_pool, Duration::from_secs(5))
                .await?;
        let checked = match crate::redis::check_version(&redis).await {
            Ok(()) => durability::check_at_start(settings.redis_durability, &redis).await,
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            redis.quit().await.ok();
            return Err(e);
        }
        if settings.migrate {
            db::migrate(&settings.database_url).await?;
        } else {
            db::check_migrated(&settings.database_url).await?;
        }
        let mut db = db::connect(&settings.database_url, settings.pg_pool).await?;
        let metrics = Arc::new(Metrics::new()?);
        let counted = metrics.clone();
        db.set_metric_callback(move |info| counted.db_query(&info.statement.sql));
        let broker = Broker::start(&settings.amqp_url, shutdown.child_token());
        Ok(Self::assemble(settings, redis, db, broker, metrics))
    }

    /// The shared state over connections made elsewhere (`connect`, benches).
    pub fn assemble(
        settings: Arc<Settings>,
        redis: Pool,
        db: DatabaseConnection,
        broker: Broker,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            durability: Arc::new(ReadyCheck::new(settings.redis_durability)),
            ready: TtlCache::new(1, READY_TTL),
            drain: Drain::default(),
            sse: Arc::new(SseStreams::new(settings.sse, metrics.clone())),
            settings,
            redis,
            db,
            broker,
            metrics,
        }
    }

    /// Whether Redis, RabbitMQ and Postgres answer (and Redis is as durable as asked): checked
    /// at most once per [`READY_TTL`], the answer shared by every request meanwhile.
    pub async fn readiness(&self) -> Readiness {
        let (redis, db, broker) = (self.redis.clone(), self.db.clone(), self.broker.clone());
        let (durability, metrics) = (self.durability.clone(), self.metrics.clone());
        let checked = self.ready.get((), move || async move {
            metrics.readiness_checks.inc();
            let ready = check_readiness(&redis, &db, &broker, &durability).await;
            let failing = ready.failing();
            metrics.readiness(|dependency| !failing.contains(&dependency));
            Ok(ready)
        });
        checked.await.unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "readiness could not be checked");
            Readiness {
                redis: "unreachable".into(),
                rabbitmq: false,
                postgres: false,
            }
        })
    }
}

/// One round of readiness checks, each bounded by a second.
async fn check_readiness(
    redis: &Pool,
    db: &DatabaseConnection,
    broker: &Broker,
    durability: &ReadyCheck,
) -> Readiness {
    let (redis, postgres, rabbitmq) = tokio::join!(
        async {
            crate::redis::ping(redis)
                .await
                .map_err(|e| ("unreachable".to_owned(), e.to_string()))?;
            durability
                .check(redis)
                .await
                .map_err(|why| (why.clone(), why))
        },
        async {
            tokio::time::timeout(Duration::from_secs(1), db.ping())
                .await
                .map_err(|_| anyhow::anyhow!("timed out"))?
                .map_err(anyhow::Error::from)
        },
        rabbitmq_answers(broker),
    );
    if let Err((_, e)) = &redis {
        tracing::warn!(error = %e, "readiness: Redis");
    }
    if let Err(e) = &postgres {
        tracing::warn!(error = %e, "readiness: Postgres");
    }
    Readiness {
        redis: redis.map_or_else(|(state, _)| state, |()| "ok".to_owned()),
        rabbitmq,
        postgres: postgres.is_ok(),
    }
}

/// RabbitMQ is connected and answers: opening (and closing) a channel within a second. A broker
/// that stopped answering keeps a connection "up" until heartbeats time out; this notices it.
async fn rabbitmq_answers(broker: &Broker) -> bool {
    let Some(conn) = broker.current() else {
        return false;
    };
    let opened = tokio::time::timeout(Duration::from_secs(1), conn.create_channel()).await;
    match opened {
        Ok(Ok(ch)) => {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), ch.close(200, "ready".into())).await;
            true
        }
        _ => false,
    }
}
