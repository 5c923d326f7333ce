//! Builds the application (listeners bound first, so port 0 works in tests) and runs it until
//! the shutdown token fires.

use std::{net::TcpListener, sync::Arc, time::Duration};

use anyhow::Context;
use fred::prelude::*;
use sea_orm::DatabaseConnection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::Broker,
    config::Settings,
    db,
    events::{self, Events},
    http,
    keys::Keys,
    metrics::Metrics,
    relay::Relay,
    reservations::Reservations,
    soldout::SoldOutCache,
    sweeper,
    worker::Worker,
};

/// Which components run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API + outbox relay (`seckill serve`).
    Serve,
    /// Order persister + expiry sweeper (`seckill worker`).
    Worker,
    /// Everything (`seckill all`).
    All,
}

impl Role {
    pub fn serves_http(self) -> bool {
        matches!(self, Role::Serve | Role::All)
    }
    pub fn runs_worker(self) -> bool {
        matches!(self, Role::Worker | Role::All)
    }
}

/// The connections every component shares.
pub struct Deps {
    pub settings: Arc<Settings>,
    pub redis: Pool,
    pub db: DatabaseConnection,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    pub events: Events,
}

/// Drops per-IP limiter state of clients that have gone quiet (bounded memory).
async fn forget_idle_ips(
    ctx: actix_web::web::Data<http::Ctx>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                ctx.ip_limiter.retain_recent();
                ctx.ip_limiter.shrink_to_fit();
            }
        }
    }
}

/// A built, not yet running, application.
pub struct Application {
    http_port: Option<u16>,
    admin_port: Option<u16>,
    servers: Vec<actix_web::dev::Server>,
    tasks: JoinSet<anyhow::Result<()>>,
    deps: Arc<Deps>,
    shutdown: CancellationToken,
}

impl Application {
    /// Migrates, connects, binds the listeners and spawns the background components.
    pub async fn build(
        settings: Settings,
        role: Role,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        if role.serves_http() {
            settings.secrets()?;
        }
        db::migrate(&settings.database_url).await?;
        let db = db::connect(&settings.database_url, 16).await?;
        let redis = crate::redis::connect(&settings.redis, 4, Duration::from_secs(5)).await?;
        let broker = Broker::start(&settings.amqp_url, shutdown.child_token());
        let deps = Arc::new(Deps {
            settings: settings.clone(),
            redis,
            db,
            broker,
            metrics: Arc::new(Metrics::new()?),
            events: Events::new(),
        });
        let reservations = Reservations::new(
            deps.redis.clone(),
            Keys::new(settings.redis.prefix.clone()),
            settings.user_rate,
            settings.product_rate,
        );
        reservations.load_scripts().await?;
        let mut tasks = JoinSet::new();

        let mut servers = Vec::new();
        let (mut http_port, mut admin_port) = (None, None);
        if role.serves_http() {
            let public = TcpListener::bind(settings.http_addr)
                .with_context(|| format!("binding SECKILL_HTTP_ADDR {}", settings.http_addr))?;
            let admin = TcpListener::bind(settings.admin_addr)
                .with_context(|| format!("binding SECKILL_ADMIN_ADDR {}", settings.admin_addr))?;
            http_port = Some(public.local_addr()?.port());
            admin_port = Some(admin.local_addr()?.port());
            let soldout = Arc::new(SoldOutCache::default());
            let listener = events::listen(
                &settings.redis,
                reservations.keys(),
                soldout.clone(),
                deps.events.clone(),
            )
            .await?;
            tasks.spawn(listener.run(shutdown.child_token()));
            let ctx = actix_web::web::Data::new(http::Ctx::new(
                deps.clone(),
                reservations.clone(),
                soldout,
            )?);
            tasks.spawn(forget_idle_ips(ctx.clone(), shutdown.child_token()));
            servers.push(http::public_server(public, ctx.clone())?);
            servers.push(http::admin_server(admin, ctx)?);
            let relay = Relay {
                pool: deps.redis.clone(),
                keys: reservations.keys().clone(),
                broker: deps.broker.clone(),
                queue: settings.amqp_queue.clone(),
                metrics: deps.metrics.clone(),
                claim_idle: settings.relay_claim_idle,
                consumer: format!(
                    "relay-{}-{}",
                    std::process::id(),
                    uuid::Uuid::now_v7().simple()
                ),
            };
            tasks.spawn(relay.run(shutdown.child_token()));
        }
        if role == Role::Worker {
            let ops = TcpListener::bind(settings.admin_addr).with_context(|| {
                format!(
                    "binding SECKILL_ADMIN_ADDR {} (the worker's /metrics)",
                    settings.admin_addr
                )
            })?;
            admin_port = Some(ops.local_addr()?.port());
            servers.push(http::worker_ops_server(ops, deps.clone())?);
        }
        if role.runs_worker() {
            let worker = Worker {
                db: deps.db.clone(),
                reservations: reservations.clone(),
                broker: deps.broker.clone(),
                queue: settings.amqp_queue.clone(),
                batch_size: settings.worker_batch_size,
                batch_wait: settings.worker_batch_wait,
                payment_timeout: settings.payment_timeout,
                metrics: deps.metrics.clone(),
                consumers: settings.worker_consumers,
            };
            tasks.spawn(worker.run(shutdown.child_token()));
            tasks.spawn(sweeper::run(
                deps.db.clone(),
                reservations.clone(),
                deps.metrics.clone(),
                settings.sweep_interval,
                shutdown.child_token(),
            ));
        }
        Ok(Self {
            http_port,
            admin_port,
            servers,
            tasks,
            deps,
            shutdown,
        })
    }

    /// The shoppers' port (when this role serves HTTP).
    pub fn http_port(&self) -> Option<u16> {
        self.http_port
    }

    /// The operators' port (when this role serves HTTP).
    pub fn admin_port(&self) -> Option<u16> {
        self.admin_port
    }

    /// Shared connections (tests inspect state through them).
    pub fn deps(&self) -> Arc<Deps> {
        self.deps.clone()
    }

    /// Runs until the shutdown token fires, then drains and stops every component.
    pub async fn run_until_stopped(mut self) -> anyhow::Result<()> {
        let handles: Vec<_> = self.servers.iter().map(|s| s.handle()).collect();
        let mut servers: JoinSet<std::io::Result<()>> = JoinSet::new();
        for server in self.servers.drain(..) {
            servers.spawn(server);
        }
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            Some(result) = servers.join_next() => {
                result.context("HTTP server task")?.context("HTTP server stopped")?;
            }
            Some(result) = self.tasks.join_next() => {
                result.context("component task")??;
            }
        }
        tracing::info!("shutting down: draining in-flight work");
        self.shutdown.cancel();
        for handle in handles {
            handle.stop(true).await;
        }
        while let Some(result) = servers.join_next().await {
            if let Ok(Err(e)) = result {
                tracing::warn!(error = %e, "HTTP server stopped with an error");
            }
        }
        while let Some(result) = self.tasks.join_next().await {
            match result {
                Ok(Err(e)) => tracing::warn!(error = ?e, "component stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "component task failed"),
                Ok(Ok(())) => {}
            }
        }
        self.deps.redis.quit().await.ok();
        self.deps.db.clone().close().await.ok();
        tracing::info!("stopped");
        Ok(())
    }
}
