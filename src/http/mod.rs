//! The HTTP listeners: shoppers (`SECKILL_HTTP_ADDR`), operators (`SECKILL_ADMIN_ADDR`) and a
//! `worker`'s own (`SECKILL_WORKER_ADDR`).

pub mod admin;
pub mod cacheable;
pub mod dev;
pub mod docs;
pub mod export;
pub mod extract;
pub mod fallback;
pub mod health;
pub mod limits;
pub mod orders;
pub mod pages;
pub mod problem;
pub mod room;
pub mod shop;

use std::{
    net::{IpAddr, TcpListener},
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{
    App, HttpMessage as _, HttpResponse, HttpServer, ResponseError,
    body::MessageBody,
    dev::{Server, ServiceRequest, ServiceResponse},
    http::{Method, header},
    middleware::{Next, from_fn},
    web,
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _};
use tracing_actix_web::TracingLogger;

use crate::{
    auth::Auth,
    config::Rate,
    deps::Deps,
    http::{
        extract::{ClientSpan, RoutePattern, TrustedProxies},
        fallback::{KnownPaths, fallback},
        limits::{BodyTimeout, Connections},
        problem::ApiError,
    },
    products::ProductCache,
    purchase::{Batcher, Purchase},
    recovery::Recovery,
    reservations::Reservations,
    soldout::{Recovering, SoldOutCache},
};

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024;

/// A shopper's request that has not been answered by then gets `503 unavailable`: a dependency
/// that stops answering (Postgres has no query timeout of its own) costs a bounded wait.
/// Longer than Redis' command timeout, so a Redis outage answers with its own `503` first.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(3);

/// Everything handlers share (one instance per process).
pub struct Ctx {
    pub deps: Arc<Deps>,
    pub reservations: Reservations,
    /// The purchase decision: its checks in order, then `reserve.lua` through the batcher.
    pub purchase: Purchase,
    pub auth: Arc<Auth>,
    pub products: Arc<ProductCache>,
    pub soldout: Arc<SoldOutCache>,
    pub recovery: Arc<Recovery>,
    /// The products' waiting rooms.
    pub rooms: crate::room::Rooms,
    /// Requests per client ([`extract::client_key`]) on the shoppers' listener.
    pub ip_limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Requests per client on the operators' listener (`SECKILL_ADMIN_IP_RATE`).
    pub admin_ip_limiter: DefaultKeyedRateLimiter<IpAddr>,
    pub trusted_proxies: TrustedProxies,
    /// Open connections of the shoppers' listener.
    pub connections: Arc<Connections>,
}

fn quota(rate: Rate) -> Quota {
    let count = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
    let per_cell = rate.period / rate.count.max(1);
    Quota::with_period(per_cell.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(count))
        .allow_burst(count)
}

impl Ctx {
    pub fn new(
        deps: Arc<Deps>,
        reservations: Reservations,
        soldout: Arc<SoldOutCache>,
        recovering: Arc<Recovering>,
        user_keys: crate::auth::keys::UserKeys,
    ) -> anyhow::Result<Self> {
        let settings = deps.settings.clone();
        let trusted = TrustedProxies(settings.trusted_proxies.clone().into());
        let recovery = Arc::new(Recovery::new(
            &deps,
            reservations.clone(),
            soldout.clone(),
            recovering,
        ));
        let auth = Arc::new(
            Auth::new(settings.secrets()?, settings.purchase_token_ttl)
                .with_user_claims(
                    settings.jwt_audience.as_deref(),
                    settings.jwt_issuer.as_deref(),
                )
                .with_user_keys(user_keys),
        );
        let products = Arc::new(ProductCache::default());
        let purchase = Purchase {
            db: deps.db.clone(),
            products: products.clone(),
            soldout: soldout.clone(),
            auth: auth.clone(),
            recovery: recovery.clone(),
            batcher: Batcher::new(
                reservations.clone(),
                settings.reserve_batch,
                Some(deps.metrics.reserve_batch.clone()),
            ),
            metrics: deps.metrics.clone(),
        };
        let rooms = crate::room::Rooms::new(
            reservations.pool().clone(),
            reservations.keys().clone(),
            settings.room,
        );
        Ok(Self {
            recovery,
            rooms,
            auth,
            purchase,
            reservations,
            products,
            soldout,
            ip_limiter: RateLimiter::keyed(quota(settings.ip_rate)),
            admin_ip_limiter: RateLimiter::keyed(quota(settings.admin_ip_rate)),
            trusted_proxies: trusted.clone(),
            connections: Arc::new(
                Connections::new(
                    settings.max_connections_per_ip,
                    settings.max_connections,
                    trusted,
                )
                .with_metrics(deps.metrics.clone()),
            ),
            deps,
        })
    }
}

/// Drops per-IP limiter state of clients that have gone quiet (bounded memory).
pub async fn forget_idle_ips(
    ctx: web::Data<Ctx>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                for limiter in [&ctx.ip_limiter, &ctx.admin_ip_limiter] {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }
        }
    }
}

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_BODY)
        .error_handler(|err, _req| json_error(&err).into())
}

/// Maps a JSON body error to our problem (400, or 413 past the size limit).
pub fn json_error(err: &actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError as E;
    match err {
        E::OverflowKnownLength { .. } | E::Overflow { .. } => ApiError::PayloadTooLarge(MAX_BODY),
        E::Payload(actix_web::error::PayloadError::Overflow) => ApiError::PayloadTooLarge(MAX_BODY),
        E::ContentType => ApiError::not_json_content_type(),
        E::Deserialize(e) => ApiError::invalid_json(e),
        _ => ApiError::unreadable_body(),
    }
}

fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|_, _| ApiError::NotFound.into())
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|e, _| ApiError::BadRequest(e.to_string()).into())
}

/// Records requests and latency by route pattern (never by raw path: bounded label sets).
async fn record_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req
        .app_data::<web::Data<Ctx>>()
        .map(|c| c.deps.metrics.clone());
    let method = method_label(req.method());
    let res = next.call(req).await?;
    if let Some(m) = metrics {
        let request = res.request();
        let found = request
            .extensions()
            .get::<RoutePattern>()
            .map(|r| r.0.clone());
        let route = found
            .unwrap_or_else(|| request.match_pattern())
            .unwrap_or_else(|| "unmatched".into());
        m.http_requests
            .with_label_values(&[route.as_str(), method, res.status().as_str()])
            .inc();
        m.http_latency
            .with_label_values(&[route.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}

/// The `method` label: one of a fixed set, so a client cannot mint label values (any
/// extension method, `FOO` or a 64-character token, is `other`).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Per client ([`extract::client_key`]: an IPv4 address or an IPv6 /64), in process
/// (`SECKILL_IP_RATE`); health checks are exempt.
async fn limit_per_ip(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    limit_requests(req, next, |ctx| &ctx.ip_limiter).await
}

/// The operators' listener's own per-client limit (`SECKILL_ADMIN_IP_RATE`).
async fn limit_admin_per_ip(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    limit_requests(req, next, |ctx| &ctx.admin_ip_limiter).await
}

async fn limit_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
    limiter: fn(&Ctx) -> &DefaultKeyedRateLimiter<IpAddr>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if let Some(ctx) = req.app_data::<web::Data<Ctx>>().cloned()
        && !matches!(req.path(), "/healthz" | "/readyz")
        && let Some(ip) = ctx.trusted_proxies.client_ip(req.request())
        && let Err(not_until) = limiter(&ctx).check_key(&extract::client_key(ip))
    {
        ctx.deps.metrics.ip_limited.inc();
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        let err = ApiError::RateLimited {
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        };
        let (req, _) = req.into_parts();
        return Ok(ServiceResponse::new(req, err.error_response()));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// Answers `503 unavailable` to a request still unanswered after [`REQUEST_DEADLINE`] (as an
/// error, which actix turns into the problem response: the request itself is not cloned).
async fn deadline(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let path = req.path().to_owned();
    // A preheat loads a sale of any size and must never be cut off half way (a forced one
    // pauses the sale until it is done): no deadline.
    if req.method() == actix_web::http::Method::POST && path.ends_with("/preheat") {
        return next.call(req).await;
    }
    match tokio::time::timeout(REQUEST_DEADLINE, next.call(req)).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(path, "request deadline passed: a dependency did not answer");
            Err(ApiError::TimedOut.into())
        }
    }
}

async fn docs_redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, "/docs/"))
        .finish()
}

fn common(cfg: &mut web::ServiceConfig) {
    cfg.app_data(json_config())
        .app_data(path_config())
        .app_data(query_config())
        .service(health::healthz)
        .service(health::readyz)
        .service(docs::openapi_json)
        .route("/docs", web::get().to(docs_redirect))
        .service(docs::swagger());
}

/// The shoppers' routes and shared state (without middleware): what the public server
/// mounts, and what the in-process handler bench calls.
pub fn configure_public(ctx: web::Data<Ctx>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let deps = web::Data::from(ctx.deps.clone());
        // The shoppers' routes first: they are matched in this order, the hottest first.
        cfg.app_data(ctx)
            .app_data(deps)
            .configure(shop::routes)
            .configure(common)
            .configure(orders::routes)
            .configure(dev::routes)
            .configure(pages::shop_routes);
    }
}

/// Actix's own cap on a worker's connections, a backstop on sockets: twice the process's share
/// of `SECKILL_MAX_CONNECTIONS` (past the total, connections still get a fast `503 at_capacity`
/// from [`limits::limit_connections`]; past the backstop, the worker stops accepting).
fn connections_per_worker(total: u32, workers: usize) -> usize {
    usize::try_from(total)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .div_ceil(workers.max(1))
}

/// How long a stopping server waits for its open connections before it drops them: the whole
/// drain's bound (`SECKILL_DRAIN_TIMEOUT_SECS`); the application stops waiting at the same
/// deadline (`startup`).
fn drain_secs(deps: &Deps) -> u64 {
    deps.settings.drain.timeout.as_secs()
}

/// The shoppers' server.
pub fn public_server(listener: TcpListener, ctx: web::Data<Ctx>) -> anyhow::Result<Server> {
    let known = web::Data::new(KnownPaths::of(docs::SHOPPERS));
    let doc = web::Data::new(docs::ListenerDoc::new(docs::SHOPPERS));
    let settings = &ctx.deps.settings;
    let body_timeout = BodyTimeout {
        limit: settings.body_timeout,
        metrics: ctx.deps.metrics.clone(),
    };
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let max_per_worker = connections_per_worker(settings.max_connections, workers);
    let conns = ctx.connections.clone();
    let drain = drain_secs(&ctx.deps);
    let server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(deadline))
            .wrap(from_fn(limit_per_ip))
            .wrap(from_fn(limits::limit_connections))
            .wrap(from_fn(limits::body_deadline))
            .wrap(from_fn(record_metrics))
            .wrap(TracingLogger::<ClientSpan>::new())
            .app_data(body_timeout.clone())
            .app_data(ctx.trusted_proxies.clone())
            .configure(configure_public(ctx.clone()))
            .app_data(doc.clone())
            .app_data(known.clone())
            .default_service(web::to(fallback))
    })
    .on_connect(move |io, data| limits::on_connect(&conns, io, data))
    .workers(workers)
    .max_connections(max_per_worker)
    .listen(listener)?
    .backlog(4096)
    .max_connection_rate(1024)
    .client_request_timeout(Duration::from_secs(5))
    .client_disconnect_timeout(Duration::from_secs(1))
    .keep_alive(Duration::from_secs(30))
    // A client that closes its side is gone: drop what it was being sent at once. With
    // half-closed connections allowed (actix's default), an event stream whose shopper went
    // away would stay open, and counted against the caps, until its next write failed.
    .h1_allow_half_closed(false)
    .shutdown_timeout(drain)
    .disable_signals()
    .run();
    Ok(server)
}

/// The operators' server (admin API and metrics live only here).
pub fn admin_server(listener: TcpListener, ctx: web::Data<Ctx>) -> anyhow::Result<Server> {
    let deps = web::Data::from(ctx.deps.clone());
    let known = web::Data::new(KnownPaths::of(docs::OPERATORS));
    let doc = web::Data::new(docs::ListenerDoc::new(docs::OPERATORS));
    let body_timeout = BodyTimeout {
        limit: ctx.deps.settings.body_timeout,
        metrics: ctx.deps.metrics.clone(),
    };
    let drain = drain_secs(&ctx.deps);
    // Caps of its own, as large as the shoppers' listener's: the operators' connections are
    // not counted against the shoppers' (nor the other way round).
    let settings = &ctx.deps.settings;
    let conns = Arc::new(Connections::new(
        settings.max_connections_per_ip,
        settings.max_connections,
        ctx.trusted_proxies.clone(),
    ));
    let max_per_worker = connections_per_worker(settings.max_connections, 1);
    let server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(deadline))
            .wrap(from_fn(limit_admin_per_ip))
            .wrap(from_fn(limits::limit_connections))
            .wrap(from_fn(limits::body_deadline))
            .wrap(from_fn(record_metrics))
            .wrap(TracingLogger::<ClientSpan>::new())
            .app_data(body_timeout.clone())
            .app_data(ctx.trusted_proxies.clone())
            .app_data(ctx.clone())
            .app_data(deps.clone())
            .configure(common)
            .configure(admin::routes)
            .configure(export::routes)
            .configure(pages::console_routes)
            .app_data(doc.clone())
            .app_data(known.clone())
            .default_service(web::to(fallback))
    })
    .on_connect(move |io, data| limits::on_connect(&conns, io, data))
    .max_connections(max_per_worker)
    .workers(1)
    .listen(listener)?
    .client_request_timeout(Duration::from_secs(5))
    .client_disconnect_timeout(Duration::from_secs(1))
    .shutdown_timeout(drain)
    .disable_signals()
    .run();
    Ok(server)
}

/// A `worker` process's operators' listener: `/metrics`, `/healthz`, `/readyz`.
pub fn worker_ops_server(listener: TcpListener, deps: Arc<Deps>) -> anyhow::Result<Server> {
    let drain = drain_secs(&deps);
    let deps = web::Data::from(deps);
    let known = web::Data::new(KnownPaths::of(docs::WORKER));
    let server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(record_metrics))
            .wrap(TracingLogger::<ClientSpan>::new())
            .app_data(deps.clone())
            .service(health::healthz)
            .service(health::readyz)
            .service(admin::metrics)
            .app_data(known.clone())
            .default_service(web::to(fallback))
    })
    .workers(1)
    .listen(listener)?
    .client_request_timeout(Duration::from_secs(5))
    .shutdown_timeout(drain)
    .disable_signals()
    .run();
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ip_quota_allows_a_full_burst_then_refuses() {
        for (rate, burst) in [("50/1s", 50_u32), ("3/1m", 3), ("1000000/1s", 1_000_000)] {
            let limiter: DefaultKeyedRateLimiter<IpAddr> =
                RateLimiter::keyed(quota(rate.parse().unwrap()));
            let ip: IpAddr = "127.0.0.1".parse().unwrap();
            let allowed = (0..burst.min(5_000) + 1)
                .filter(|_| limiter.check_key(&ip).is_ok())
                .count();
            assert!(allowed as u32 >= burst.min(5_000), "{rate}: {allowed}");
            if burst < 5_000 {
                assert_eq!(allowed as u32, burst, "{rate}");
            }
        }
    }

    #[test]
    fn actix_caps_each_worker_at_twice_its_share_of_the_total() {
        assert_eq!(connections_per_worker(10_000, 2), 10_000);
        assert_eq!(connections_per_worker(10_000, 3), 6_667);
        assert_eq!(connections_per_worker(1, 4), 1);
        assert_eq!(connections_per_worker(5, 0), 10);
    }

    #[test]
    fn method_labels_are_a_fixed_set() {
        for known in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let method = Method::from_bytes(known.as_bytes()).unwrap();
            assert_eq!(method_label(&method), known);
        }
        for made_up in ["BREW", "get", "CONNECT", "TRACE", "X-0123456789abcdef"] {
            let method = Method::from_bytes(made_up.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "other", "{made_up}");
        }
    }
}
