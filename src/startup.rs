//! Builds the application (listeners bound first, so port 0 works in tests) and runs it until
//! the shutdown token fires; then shuts it down in three steps
//! ([`Application::run_until_stopped`]).

use std::{
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

use actix_web::web;
use anyhow::Context;
use fred::prelude::*;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    deps::Deps,
    events, http,
    keys::Keys,
    outbox::OutboxWake,
    relay::Relay,
    reservations::Reservations,
    soldout::{Recovering, SoldOutCache},
    sweeper::Sweeper,
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

/// A built, not yet running, application.
pub struct Application {
    http_port: Option<u16>,
    admin_port: Option<u16>,
    worker_port: Option<u16>,
    servers: Vec<actix_web::dev::Server>,
    tasks: JoinSet<anyhow::Result<()>>,
    deps: Arc<Deps>,
    /// The signal (SIGTERM, ctrl-c, a test): starts the shutdown.
    shutdown: CancellationToken,
    /// Stops the components (and the broker connection), once the listeners have drained.
    stop: CancellationToken,
    /// How long `/readyz` answers `503 draining` before the listeners stop accepting: the
    /// configured grace for a role behind a load balancer, none for a `worker`.
    grace: Duration,
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<(TcpListener, u16)> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {what} {addr}"))?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}

impl Application {
    /// Connects (refusing to start when Redis does not give the durability
    /// `SECKILL_REDIS_DURABILITY` asks: see [`Deps::connect`]), migrates, binds the listeners
    /// and spawns the components of `role`.
    pub async fn build(
        settings: Settings,
        role: Role,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        if role.serves_http() {
            settings.secrets()?;
        }
        // Not a child of `shutdown`: the components and the broker keep running while the
        // process drains, and stop when `run_until_stopped` says so.
        let stop = CancellationToken::new();
        let deps = Arc::new(Deps::connect(settings.clone(), &stop).await?);
        let reservations = Reservations::new(
            deps.redis.clone(),
            Keys::new(settings.redis.prefix.clone()),
            settings.user_rate,
            settings.product_rate,
        )
        .with_durability(settings.redis_durability)
        .with_key_grace(settings.key_grace);
        // This process's wins wake its relay (which matters on a cluster; see `relay`).
        let wake = Arc::new(OutboxWake::default());
        let reservations = if role.serves_http() {
            reservations.with_wake(wake.clone())
        } else {
            reservations
        };
        reservations.load_scripts().await?;
        let mut app = Self {
            http_port: None,
            admin_port: None,
            worker_port: None,
            servers: Vec::new(),
            tasks: JoinSet::new(),
            grace: if role.serves_http() {
                settings.drain.grace
            } else {
                Duration::ZERO
            },
            deps,
            shutdown,
            stop,
        };
        if role.serves_http() {
            app.start_api(&reservations).await?;
            app.start_relay(&reservations, wake);
        }
        if role.runs_worker() {
            if role == Role::Worker {
                app.start_worker_ops()?;
            }
            app.start_worker(&reservations);
            app.start_sweeper(&reservations);
            app.start_order_events()?;
        }
        Ok(app)
    }

    /// The shoppers' and operators' listeners, with the pub/sub listener that keeps the
    /// sold-out memory and the SSE streams current.
    async fn start_api(&mut self, reservations: &Reservations) -> anyhow::Result<()> {
        let settings = &self.deps.settings;
        let (public, http_port) = bind(settings.http_addr, "SECKILL_HTTP_ADDR")?;
        let (admin, admin_port) = bind(settings.admin_addr, "SECKILL_ADMIN_ADDR")?;
        let user_keys = crate::auth::keys::UserKeys::load(settings, &self.deps.metrics).await?;
        let soldout = Arc::new(SoldOutCache::default());
        let recovering = Arc::new(Recovering::default());
        let listener = events::listen(
            &settings.redis,
            reservations.keys(),
            soldout.clone(),
            recovering.clone(),
            self.deps.sse.clone(),
        )
        .await?;
        let ctx = web::Data::new(http::Ctx::new(
            self.deps.clone(),
            reservations.clone(),
            soldout,
            recovering,
            user_keys,
        )?);
        let listener = listener.with_rooms(ctx.rooms.clone());
        self.tasks.spawn(listener.run(self.stop.child_token()));
        self.tasks.spawn(crate::auth::refresh_jwks(
            ctx.auth.clone(),
            self.stop.child_token(),
        ));
        // Every API process watches for products Redis lost, and rebuilds them.
        self.tasks
            .spawn(ctx.recovery.clone().run(self.stop.child_token()));
        // Every API process admits the waiting rooms' next shoppers (atomic in Redis).
        self.tasks.spawn(crate::room::admit_rooms(
            ctx.rooms.clone(),
            self.deps.db.clone(),
            self.deps.metrics.clone(),
            self.stop.child_token(),
        ));
        self.tasks
            .spawn(http::forget_idle_ips(ctx.clone(), self.stop.child_token()));
        self.servers.push(http::public_server(public, ctx.clone())?);
        self.servers.push(http::admin_server(admin, ctx)?);
        (self.http_port, self.admin_port) = (Some(http_port), Some(admin_port));
        Ok(())
    }

    /// The outbox relay: winners from Redis to RabbitMQ.
    fn start_relay(&mut self, reservations: &Reservations, wake: Arc<OutboxWake>) {
        let relay = Relay::new(&self.deps, reservations.keys().clone(), wake);
        self.tasks.spawn(relay.run(self.stop.child_token()));
    }

    /// A `worker` process's own listener (`/metrics`, `/healthz`, `/readyz`), on a port of its
    /// own: a `serve` on the same host has `SECKILL_ADMIN_ADDR`.
    fn start_worker_ops(&mut self) -> anyhow::Result<()> {
        let (ops, port) = bind(self.deps.settings.worker_addr, "SECKILL_WORKER_ADDR")?;
        self.servers
            .push(http::worker_ops_server(ops, self.deps.clone())?);
        self.worker_port = Some(port);
        Ok(())
    }

    /// The order persister: RabbitMQ to Postgres.
    fn start_worker(&mut self, reservations: &Reservations) {
        let worker = Worker::new(&self.deps, reservations.clone());
        self.tasks.spawn(worker.run(self.stop.child_token()));
    }

    /// The order events' dispatchers: to the events exchange, and to the webhook if one is set.
    fn start_order_events(&mut self) -> anyhow::Result<()> {
        let publisher = crate::order_events::publish::Publisher::new(&self.deps);
        self.tasks.spawn(publisher.run(self.stop.child_token()));
        if let Some(webhook) = &self.deps.settings.webhook {
            let webhook = crate::order_events::webhook::Webhook::new(&self.deps, webhook)?;
            self.tasks.spawn(webhook.run(self.stop.child_token()));
        }
        Ok(())
    }

    /// The expiry sweeper and reconciler.
    fn start_sweeper(&mut self, reservations: &Reservations) {
        let sweeper = Sweeper::new(&self.deps, reservations.clone());
        self.tasks.spawn(sweeper.run(self.stop.child_token()));
    }

    /// The shoppers' port (when this role serves HTTP).
    pub fn http_port(&self) -> Option<u16> {
        self.http_port
    }

    /// The operators' port (when this role serves HTTP).
    pub fn admin_port(&self) -> Option<u16> {
        self.admin_port
    }

    /// A `worker` process's own port (`/metrics`, `/healthz`, `/readyz`).
    pub fn worker_port(&self) -> Option<u16> {
        self.worker_port
    }

    /// Runs until the shutdown token fires, then shuts down within `SECKILL_DRAIN_TIMEOUT_SECS`
    /// of it: not ready ([`Drain::begin`](crate::drain::Drain::begin): `/readyz` answers
    /// `503 draining`, all else is served) for the grace; then the listeners stop accepting and
    /// close idle connections, event streams end with a `close` event and requests in flight
    /// are answered; then the components drain (relay, worker, sweeper) and the connections
    /// close. Whatever is left at the deadline is dropped, and the process exits anyway.
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
        let limit = self.deps.settings.drain.timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let drained = tokio::time::timeout_at(deadline, self.drain(&handles, &mut servers)).await;
        if drained.is_err() {
            tracing::warn!(
                timeout_secs = limit.as_secs(),
                servers_left = servers.len(),
                components_left = self.tasks.len(),
                "SECKILL_DRAIN_TIMEOUT_SECS passed before the drain finished: exiting anyway"
            );
            self.stop.cancel();
            servers.abort_all();
            self.tasks.abort_all();
        }
        tracing::info!("stopped");
        Ok(())
    }

    /// The shutdown's steps, in order (bounded by the caller's deadline).
    async fn drain(
        &mut self,
        handles: &[actix_web::dev::ServerHandle],
        servers: &mut JoinSet<std::io::Result<()>>,
    ) {
        let drain = &self.deps.drain;
        drain.begin();
        tracing::info!(
            grace_ms = self.grace.as_millis(),
            "shutting down: /readyz answers 503 draining; still serving during the grace"
        );
        tokio::time::sleep(self.grace).await;

        tracing::info!(
            "shutting down: no new connections; ending event streams, answering requests in flight"
        );
        drain.close();
        futures_util::future::join_all(handles.iter().map(|h| h.stop(true))).await;
        while let Some(result) = servers.join_next().await {
            if let Ok(Err(e)) = result {
                tracing::warn!(error = %e, "HTTP server stopped with an error");
            }
        }

        tracing::info!("shutting down: draining in-flight work");
        self.stop.cancel();
        while let Some(result) = self.tasks.join_next().await {
            match result {
                Ok(Err(e)) => tracing::warn!(error = ?e, "component stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "component task failed"),
                Ok(Ok(())) => {}
            }
        }
        self.deps.redis.quit().await.ok();
        self.deps.db.clone().close().await.ok();
    }
}
