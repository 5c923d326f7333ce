//! Typed settings read once from the environment (docs/configuration.md's table).
//!
//! Every variable has the documented default; a bad value fails start-up with one line that
//! names the variable. Secrets are wrapped in [`SecretString`] so they never reach a log.
//!
//! Here: [`Settings`] and its sections. `vars` is the table of variables ([`VARS`]) and the
//! help made from it; `values`, the value types ([`Rate`], [`Durability`], …); `env`, reading
//! one variable with its default and bounds; `read`, reading the settings section by section.

use std::{fmt, net::SocketAddr, time::Duration};

use secrecy::SecretString;

mod env;
mod read;
mod values;
mod vars;

pub use values::{Durability, IpNet, Rate, RedisSettings, parse_duration, redact_url};
pub use vars::{VARS, Var, VarDefault, help, var};

/// A configuration problem: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &str, message: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            message: message.into(),
        }
    }
}

/// Bounds on the shoppers' event streams (`SECKILL_SSE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseLimits {
    /// Streams one user may hold open at once in one process (beyond: `429 too_many_streams`).
    pub per_user: usize,
    /// Streams one process holds open at once (beyond: `503 streams_exhausted`).
    pub max: usize,
    /// A stream ends (with a `retry:` hint) after at most this long.
    pub lifetime: Duration,
    /// An idle stream gets a keep-alive comment this often.
    pub heartbeat: Duration,
}

/// How a process shuts down on SIGTERM (`SECKILL_DRAIN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// How long `/readyz` answers `503 draining` while everything else is still served, so a
    /// load balancer stops sending before the listeners stop accepting (roles serving shoppers).
    pub grace: Duration,
    /// The longest the whole shutdown takes, grace included; then the process exits anyway.
    pub timeout: Duration,
}

/// Secrets the HTTP API needs; present unless the variable was unset (checked per command).
#[derive(Clone)]
pub struct Secrets {
    /// `SECKILL_JWT_SECRET`: the HS256 key of shoppers' JWTs (`None`: their keys are public
    /// keys only, from `SECKILL_JWT_JWKS_URL` or `SECKILL_JWT_PUBLIC_KEYS`).
    pub jwt_secret: Option<SecretString>,
    pub admin_token: SecretString,
    pub token_secret: SecretString,
    /// The storefront backend's tokens (`SECKILL_SERVICE_TOKENS`; several, so one can be
    /// rotated without downtime); none: no service access.
    pub service_tokens: Vec<SecretString>,
}

/// Where order events are POSTed, and the key that signs them.
#[derive(Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: SecretString,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// How attempts are gathered into one call (`SECKILL_RESERVE_BATCH_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most attempts per call; 1 decides each attempt with its own `reserve.lua` call.
    pub max: usize,
    /// The longest a queued attempt waits for the call in flight before it goes out beside it.
    pub window: Duration,
    /// The most calls of one product in flight at once (`SECKILL_RESERVE_LANE_CALLS`).
    pub calls: usize,
}

/// Proof of work for joining a waiting room (`SECKILL_POW_*`; `src/pow.rs`).
#[derive(Debug, Clone, Copy)]
pub struct PowSettings {
    /// The difficulty (leading zero bits) while joins come at up to `join_rate` a second.
    pub min_bits: u32,
    pub max_bits: u32,
    /// Joins a second above which each doubling adds a bit.
    pub join_rate: u32,
}

/// A product's waiting room (`SECKILL_ROOM_*`; `src/room.rs`).
#[derive(Debug, Clone, Copy)]
pub struct RoomSettings {
    /// Joining opens this long before the start.
    pub opens_before: Duration,
    /// Admitted-but-undecided shoppers are at most `remaining × factor_percent / 100`.
    pub factor_percent: u64,
    /// Places admitted per second per room, at most.
    pub rate: u64,
    /// How long an admission (and its token) lasts.
    pub admission: Duration,
    pub pow: PowSettings,
}

/// The whole configuration of one process.
#[derive(Clone)]
pub struct Settings {
    /// The shoppers' listener.
    pub http_addr: SocketAddr,
    /// The operators' listener (`/api/v1/admin/*`, `/metrics`).
    pub admin_addr: SocketAddr,
    /// A `worker` process's own listener (`/metrics`, `/healthz`, `/readyz`), on a port of its
    /// own so a `serve` and a `worker` on one host do not collide.
    pub worker_addr: SocketAddr,
    pub redis: RedisSettings,
    /// Postgres; the database is created if missing.
    pub database_url: String,
    /// `SECKILL_MIGRATE`: whether `serve`/`worker`/`all` apply migrations at start (else they
    /// only check that none is pending, for a runtime role without DDL rights).
    pub migrate: bool,
    pub amqp_url: String,
    /// Orders queue; its dead-letter queue is `<queue>.dlq`.
    pub amqp_queue: String,
    /// When a win is durable before its `202`.
    pub redis_durability: Durability,
    /// When set, shoppers' JWTs must carry this `aud` (unset: `aud` is not checked).
    pub jwt_audience: Option<String>,
    /// When set, shoppers' JWTs must carry this `iss` (unset: `iss` is not checked).
    pub jwt_issuer: Option<String>,
    /// `SECKILL_JWT_JWKS_URL`: the storefront login's JWKS (RS256/ES256/EdDSA keys by `kid`).
    pub jwt_jwks_url: Option<String>,
    /// `SECKILL_JWT_PUBLIC_KEYS`: PEM files of shoppers' public keys.
    pub jwt_public_keys: Vec<std::path::PathBuf>,
    /// `SECKILL_CURRENCY`: the currency of a product created without one (ISO 4217).
    pub currency: String,
    /// `SECKILL_CHECKOUT_URL`: where the storefront page sends a winner to pay (a template with
    /// `{order_id}`).
    pub checkout_url: Option<String>,
    /// `SECKILL_EVENTS_EXCHANGE`: the topic exchange order events are published to.
    pub events_exchange: String,
    /// `SECKILL_WEBHOOK_URL` with its secret, when order events also go to a webhook.
    pub webhook: Option<WebhookSettings>,
    /// `None` when unset (and not in development mode): `serve`/`all` refuse to start.
    secrets: Result<Secrets, ConfigError>,
    /// Waiting rooms (`SECKILL_ROOM_*`).
    pub room: RoomSettings,
    /// The `Cache-Control` of a product's view (`SECKILL_VIEW_MAX_AGE_SECS`,
    /// `SECKILL_VIEW_STALE_SECS`).
    pub view_cache_control: String,
    /// An unpaid order expires after this and its unit returns to stock.
    pub payment_timeout: Duration,
    /// How long a purchase token stays valid.
    pub purchase_token_ttl: Duration,
    /// Attempts one user may make on one product per window.
    pub user_rate: Rate,
    /// Admission gate per product (token bucket).
    pub product_rate: Rate,
    /// How purchase attempts on one product are gathered into one Redis call.
    pub reserve_batch: BatchSettings,
    /// Per client IP, in process.
    pub ip_rate: Rate,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Per client IP on the operators' listener, in process.
    pub admin_ip_rate: Rate,
    /// A request body must have arrived whole this long after its head (both listeners).
    pub body_timeout: Duration,
    /// Open connections one client address (an IPv6 /64) may hold on the shoppers' listener;
    /// trusted proxies are exempt.
    pub max_connections_per_ip: u32,
    /// Open connections on the shoppers' listener, over all its workers.
    pub max_connections: u32,
    /// Worker: most deliveries persisted in one transaction.
    pub worker_batch_size: usize,
    /// Worker: how long a batch waits to fill.
    pub worker_batch_wait: Duration,
    /// Worker: consumers per process, each persisting its own batches.
    pub worker_consumers: usize,
    /// Expiry sweeper period.
    pub sweep_interval: Duration,
    /// Outbox entries pending this long on a relay are taken over by another.
    pub relay_claim_idle: Duration,
    /// Most Postgres connections this process opens.
    pub pg_pool: u32,
    /// Redis connections of this process's pool (each pipelines every task's commands).
    pub redis_pool: usize,
    /// Event streams: how many one user may hold open at once, how many the process holds,
    /// how long one lives and how often an idle one gets a keep-alive comment.
    pub sse: SseLimits,
    /// The longest an idle relay waits before it looks again: the blocking read's timeout on a
    /// single Redis, the poll for other processes' winners on a cluster.
    pub relay_poll: Duration,
    /// How long a retired sale's keys stay in Redis (ended and drained) before they expire.
    pub key_grace: Duration,
    /// How a shutdown goes: not ready for a grace, then a drain, all within a timeout.
    pub drain: DrainSettings,
    /// Log format: JSON unless `pretty` (the default in development).
    pub log_pretty: bool,
    /// `SECKILL_DEV=1`: fixed development secrets, loopback listeners only.
    pub dev: bool,
    /// The secret variables development mode filled in because they were unset (each is
    /// logged at start).
    dev_filled: Vec<&'static str>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("http_addr", &self.http_addr)
            .field("admin_addr", &self.admin_addr)
            .field("worker_addr", &self.worker_addr)
            .field("redis", &self.redis)
            .field("redis_durability", &self.redis_durability)
            .field("amqp_queue", &self.amqp_queue)
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}
