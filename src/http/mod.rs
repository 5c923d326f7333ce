//! The two HTTP listeners: shoppers (`SECKILL_HTTP_ADDR`) and operators (`SECKILL_ADMIN_ADDR`).

pub mod admin;
pub mod docs;
pub mod extract;
pub mod health;
pub mod orders;
pub mod problem;
pub mod shop;

use std::{
    net::{IpAddr, TcpListener},
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{
    App, HttpResponse, HttpServer, ResponseError,
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
    config::{IpNet, Rate},
    deps::Deps,
    http::problem::ApiError,
    products::ProductCache,
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
    pub auth: Auth,
    pub products: ProductCache,
    pub soldout: Arc<SoldOutCache>,
    pub recovery: Arc<Recovery>,
    pub ip_limiter: DefaultKeyedRateLimiter<IpAddr>,
    pub trusted_proxies: Vec<IpNet>,
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
    ) -> anyhow::Result<Self> {
        let settings = deps.settings.clone();
        let recovery = Arc::new(Recovery::new(
            &deps,
            reservations.clone(),
            soldout.clone(),
            recovering,
        ));
        Ok(Self {
            recovery,
            auth: Auth::new(settings.secrets()?, settings.purchase_token_ttl).with_user_claims(
                settings.jwt_audience.as_deref(),
                settings.jwt_issuer.as_deref(),
            ),
            reservations,
            products: ProductCache::default(),
            soldout,
            ip_limiter: RateLimiter::keyed(quota(settings.ip_rate)),
            trusted_proxies: settings.trusted_proxies.clone(),
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
                ctx.ip_limiter.retain_recent();
                ctx.ip_limiter.shrink_to_fit();
            }
        }
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
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
        E::ContentType => ApiError::BadRequest("expected Content-Type: application/json".into()),
        E::Deserialize(e) => ApiError::BadRequest(format!("invalid JSON body: {e}")),
        _ => ApiError::BadRequest("could not read the request body".into()),
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
        let route = res
            .request()
            .match_pattern()
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

/// Per client IP, in process (`SECKILL_IP_RATE`); health checks are exempt.
async fn limit_per_ip(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if let Some(ctx) = req.app_data::<web::Data<Ctx>>().cloned()
        && !matches!(req.path(), "/healthz" | "/readyz")
    {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let peer = req.peer_addr().map(|a| a.ip());
        if let Some(ip) = extract::client_ip(peer, forwarded, &ctx.trusted_proxies)
            && let Err(not_until) = ctx.ip_limiter.check_key(&ip)
        {
            ctx.deps.metrics.ip_limited.inc();
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            let err = ApiError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            };
            let (req, _) = req.into_parts();
            return Ok(ServiceResponse::new(req, err.error_response()));
        }
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
        cfg.app_data(ctx)
            .app_data(deps)
            .configure(common)
            .configure(shop::routes)
            .configure(orders::routes);
    }
}

/// The shoppers' server.
pub fn public_server(listener: TcpListener, ctx: web::Data<Ctx>) -> anyhow::Result<Server> {
    let server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(deadline))
            .wrap(from_fn(limit_per_ip))
            .wrap(from_fn(record_metrics))
            .wrap(TracingLogger::default())
            .configure(configure_public(ctx.clone()))
            .default_service(web::to(not_found))
    })
    .listen(listener)?
    .backlog(4096)
    .max_connection_rate(1024)
    .client_request_timeout(Duration::from_secs(5))
    .client_disconnect_timeout(Duration::from_secs(1))
    .keep_alive(Duration::from_secs(30))
    .shutdown_timeout(5)
    .disable_signals()
    .run();
    Ok(server)
}

/// The operators' server (admin API and metrics live only here).
pub fn admin_server(listener: TcpListener, ctx: web::Data<Ctx>) -> anyhow::Result<Server> {
    let deps = web::Data::from(ctx.deps.clone());
    let server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(record_metrics))
            .wrap(TracingLogger::default())
            .app_data(ctx.clone())
            .app_data(deps.clone())
            .configure(common)
            .configure(admin::routes)
            .default_service(web::to(not_found))
    })
    .workers(1)
    .listen(listener)?
    .client_request_timeout(Duration::from_secs(5))
    .shutdown_timeout(5)
    .disable_signals()
    .run();
    Ok(server)
}

/// A `worker` process's operators' listener: `/metrics`, `/healthz`, `/readyz`.
pub fn worker_ops_server(listener: TcpListener, deps: Arc<Deps>) -> anyhow::Result<Server> {
    let deps = web::Data::from(deps);
    let server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(record_metrics))
            .wrap(TracingLogger::default())
            .app_data(deps.clone())
            .service(health::healthz)
            .service(health::readyz)
            .service(admin::metrics)
            .default_service(web::to(not_found))
    })
    .workers(1)
    .listen(listener)?
    .client_request_timeout(Duration::from_secs(5))
    .shutdown_timeout(5)
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
