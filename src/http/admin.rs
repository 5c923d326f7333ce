//! The operators' API (only on `SECKILL_ADMIN_ADDR`): products, preheat, metrics.

use actix_web::{HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    db::entities::product,
    domain::ProductId,
    http::{
        Ctx,
        extract::{Admin, product_id},
        problem::ApiError,
        shop::{parse_json, read_bytes},
    },
    products::{self, NewProduct},
    reservations::{Outcome, Preheated},
};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(create_product)
        .service(get_product)
        .service(overview)
        .service(preheat)
        .service(metrics);
}

/// A product to put on sale.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    /// 1 to 200 characters, not all spaces (trimmed).
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: String,
    /// Units on sale, 0 to 10,000,000.
    #[schema(minimum = 0, maximum = 10_000_000)]
    pub stock: i64,
    /// In the currency's minor unit (cents; yen for JPY).
    #[schema(minimum = 0)]
    pub price_cents: i64,
    /// ISO 4217 code (three capital letters); default `SECKILL_CURRENCY`.
    #[schema(pattern = "^[A-Z]{3}$", min_length = 3, max_length = 3)]
    #[serde(default)]
    pub currency: Option<String>,
    pub starts_at: DateTime<Utc>,
    /// After `starts_at` (else `400 bad_request`).
    pub ends_at: DateTime<Utc>,
    /// Shoppers join a waiting room from `SECKILL_ROOM_OPENS_SECS` before the start, are put
    /// in a random order at the start, and may buy once admitted (docs/fairness.md).
    #[serde(default)]
    pub waiting_room: bool,
    /// With `waiting_room`: joining takes a proof of work (a SHA-256 with leading zero bits,
    /// harder as shoppers join faster; docs/fairness.md).
    #[serde(default)]
    pub proof_of_work: bool,
}

/// A product as operators see it, with live figures on `GET`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminProduct {
    pub product_id: i64,
    pub name: String,
    pub stock: i64,
    /// Orders holding a unit, from Postgres.
    pub sold: i64,
    pub price_cents: i64,
    /// ISO 4217 code of `price_cents`' currency.
    pub currency: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub waiting_room: bool,
    pub proof_of_work: bool,
    /// Units on sale in Redis (`null` until preheated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<i64>,
    /// Won, not yet persisted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preheated: Option<bool>,
}

impl From<&product::Model> for AdminProduct {
    fn from(p: &product::Model) -> Self {
        Self {
            product_id: p.product_id,
            name: p.name.clone(),
            stock: i64::from(p.stock),
            sold: i64::from(p.sold),
            price_cents: p.price_cents,
            currency: p.currency.clone(),
            starts_at: p.starts_at,
            ends_at: p.ends_at,
            created_at: p.created_at,
            waiting_room: p.waiting_room,
            proof_of_work: p.proof_of_work,
            remaining: None,
            pending: None,
            preheated: None,
        }
    }
}

/// Creates a product.
#[utoipa::path(
    request_body = CreateProduct,
    responses(
        (status = 201, description = "OK", body = AdminProduct),
        (status = 400, description = "`bad_request`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (per client address, `SECKILL_ADMIN_IP_RATE`), with `Retry-After`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 408, description = "`body_timeout`: the body did not arrive within `SECKILL_BODY_TIMEOUT_MS`; the connection is closed", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "operators"
)]
#[post("/api/v1/admin/products")]
pub async fn create_product(
    ctx: web::Data<Ctx>,
    _admin: Admin,
    body: web::Json<CreateProduct>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let new = NewProduct {
        name: body.name,
        stock: body.stock,
        price_cents: body.price_cents,
        currency: body
            .currency
            .unwrap_or_else(|| ctx.deps.settings.currency.clone()),
        starts_at: body.starts_at,
        ends_at: body.ends_at,
        waiting_room: body.waiting_room,
        proof_of_work: body.proof_of_work,
    };
    new.validate().map_err(ApiError::BadRequest)?;
    let created = products::create(&ctx.deps.db, &new).await?;
    if let Ok(id) = ProductId::try_from(created.product_id) {
        // This process may remember the id as unknown: shoppers see the product at once.
        ctx.products.changed(id);
    }
    tracing::info!(
        product_id = created.product_id,
        stock = created.stock,
        "product created"
    );
    Ok(HttpResponse::Created().json(AdminProduct::from(&created)))
}

/// A product with live figures.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = AdminProduct),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (per client address, `SECKILL_ADMIN_IP_RATE`), with `Retry-After`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "operators"
)]
#[get("/api/v1/admin/products/{id}")]
pub async fn get_product(
    ctx: web::Data<Ctx>,
    _admin: Admin,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let p = products::find(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::ProductNotFound)?;
    let (view, _) = with_figures(&ctx, &p).await?;
    Ok(HttpResponse::Ok().json(view))
}

/// A product with its figures from Redis, and whether a forced rebuild paused it.
async fn with_figures(ctx: &Ctx, p: &product::Model) -> Result<(AdminProduct, bool), ApiError> {
    let mut view = AdminProduct::from(p);
    let id = ProductId::try_from(p.product_id).map_err(|_| ApiError::ProductNotFound)?;
    let figures = ctx.reservations.figures(id).await?;
    view.preheated = Some(figures.preheated);
    view.remaining = figures.remaining;
    view.pending = Some(figures.pending);
    Ok((view, figures.paused))
}

/// How many products the overview shows: the most recently created.
pub const OVERVIEW_PRODUCTS: u64 = 20;

/// What the operators' console shows, read in one request a second.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Overview {
    /// This server's clock (the console's charts and countdowns use it, not the browser's).
    pub server_time: DateTime<Utc>,
    /// Messages ready in the orders queue, read from RabbitMQ now (`null` if it did not answer).
    pub queue_depth: Option<u32>,
    /// Messages in the dead-letter queue, read from RabbitMQ now (`null` if it did not answer).
    pub dlq_depth: Option<u32>,
    /// Win → broker confirm of this process's relay, since it started (`seckill_relay_lag_seconds`):
    /// two readings give the mean lag between them. Not per product.
    pub relay_lag: LagTotals,
    /// The most recently created products (at most 20), newest first.
    pub products: Vec<ProductOverview>,
}

/// Totals of a latency histogram since the process started.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LagTotals {
    pub count: u64,
    pub sum_seconds: f64,
}

/// One product's live figures.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductOverview {
    #[serde(flatten)]
    pub product: AdminProduct,
    /// Redis lost this sale and it is being rebuilt (this process's view).
    pub recovering: bool,
    /// A forced preheat is rebuilding it: purchases answer `503 paused`.
    pub paused: bool,
    /// Winners relayed to RabbitMQ that are neither an order nor a rejection yet: in the queue,
    /// held by a worker, or in the dead-letter queue. Counted for a sale that has ended or is
    /// recovering (`null` while it is live: the count would cost a scan of its winners every
    /// second; `pending` and the queue show the flow then). After the sale ended and the queue
    /// drained, a count that stays above 0 is a winner in the DLQ, and the sale cannot retire.
    pub in_flight: Option<i64>,
    /// Purchase decisions on this product by outcome (`won`, `sold_out`, `rate_limited`, …),
    /// counted by *this process* since it started (not summed over several `serve`
    /// processes): two readings give decisions per second.
    pub decisions: std::collections::BTreeMap<String, u64>,
    /// A product with a waiting room: its figures at this process's last admission pass (4 a
    /// second while the room is open; `null` before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomFigures>,
}

/// A waiting room, for the console.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoomFigures {
    /// Shoppers who joined.
    pub in_room: i64,
    /// Places admitted so far.
    pub admitted: i64,
    /// Admitted, not yet bought, admission running.
    pub undecided: i64,
    /// `SECKILL_ROOM_ADMIT_RATE`: most admitted a second.
    pub admit_rate: u64,
    /// `SECKILL_ROOM_FACTOR_PERCENT`: undecided at most this % of the units left.
    pub factor_percent: u64,
}

/// Live figures of the most recent products, the queues and the relay, for the console.
#[utoipa::path(
    responses(
        (status = 200, description = "OK", body = Overview),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (per client address, `SECKILL_ADMIN_IP_RATE`), with `Retry-After`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "operators"
)]
#[get("/api/v1/admin/overview")]
pub async fn overview(ctx: web::Data<Ctx>, _admin: Admin) -> Result<HttpResponse, ApiError> {
    let recent = products::recent(&ctx.deps.db, OVERVIEW_PRODUCTS).await?;
    let m = &ctx.deps.metrics;
    let views = futures_util::future::try_join_all(recent.iter().map(|p| with_figures(&ctx, p)));
    let (views, [queue_depth, dlq_depth]) = tokio::join!(
        views,
        ctx.deps.broker.queue_depths(&ctx.deps.settings.amqp_queue)
    );
    let now = Utc::now();
    let counted: Vec<ProductId> = recent
        .iter()
        .filter_map(|p| ProductId::try_from(p.product_id).ok().map(|id| (p, id)))
        .filter(|(p, id)| now >= p.ends_at || ctx.recovery.is_recovering(*id))
        .map(|(_, id)| id)
        .collect();
    let in_flight = products::unaccounted_of(&ctx.deps.db, &counted).await?;
    let products = views?
        .into_iter()
        .map(|(product, paused)| {
            let id = ProductId::try_from(product.product_id).ok();
            let counts = id.map(|id| m.product_decisions.counts(id));
            ProductOverview {
                recovering: id.is_some_and(|id| ctx.recovery.is_recovering(id)),
                paused,
                in_flight: id
                    .filter(|id| counted.contains(id))
                    .map(|id| in_flight.get(&id).copied().unwrap_or(0)),
                decisions: Outcome::LABELS
                    .iter()
                    .zip(counts.unwrap_or_default())
                    .map(|(label, n)| ((*label).to_owned(), n))
                    .collect(),
                room: id
                    .filter(|_| product.waiting_room)
                    .and_then(|id| ctx.rooms.last_pass(id))
                    .map(|a| RoomFigures {
                        in_room: a.total,
                        admitted: a.admitted,
                        undecided: a.undecided,
                        admit_rate: ctx.rooms.settings.rate,
                        factor_percent: ctx.rooms.settings.factor_percent,
                    }),
                product,
            }
        })
        .collect();
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(Overview {
            server_time: Utc::now(),
            queue_depth,
            dlq_depth,
            relay_lag: LagTotals {
                count: m.relay_lag.get_sample_count(),
                sum_seconds: m.relay_lag.get_sample_sum(),
            },
            products,
        }))
}

/// Options of a preheat.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreheatRequest {
    /// Rebuild a live sale from Postgres (the recovery path after Redis lost its data).
    #[serde(default)]
    pub force: bool,
}

/// What a preheat loaded.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PreheatResult {
    pub product_id: i64,
    pub remaining: i64,
    /// Shoppers who already hold this product (they cannot win it again).
    pub buyers: i64,
}

/// Loads stock, sale window, known buyers and the scripts into Redis. Idempotent.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    request_body(content = Option<PreheatRequest>, description = "optional; no body, `null` or `{}` means `force: false`"),
    responses(
        (status = 200, description = "OK", body = PreheatResult),
        (status = 400, description = "`bad_request`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (per client address, `SECKILL_ADMIN_IP_RATE`), with `Retry-After`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 408, description = "`body_timeout`: the body did not arrive within `SECKILL_BODY_TIMEOUT_MS`; the connection is closed", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already_live`: the sale started; pass `force`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`; `recovering`: Redis lost the sale and winners are still in flight (it is rebuilt by itself once they are persisted); `paused`: another rebuild is running", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "operators"
)]
#[post("/api/v1/admin/products/{id}/preheat")]
pub async fn preheat(
    ctx: web::Data<Ctx>,
    _admin: Admin,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let body = read_bytes(payload).await?;
    // No body, `null` and `{}` all mean the defaults.
    let request: PreheatRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PreheatRequest::default()
    } else {
        parse_json::<Option<PreheatRequest>>(&body)?.unwrap_or_default()
    };
    let (Preheated::Loaded { remaining, buyers } | Preheated::AlreadyLive { remaining, buyers }) =
        ctx.recovery.preheat(id, request.force).await?;
    ctx.products.changed(id);
    tracing::info!(
        product_id = id.get(),
        remaining,
        buyers,
        force = request.force,
        "product preheated"
    );
    Ok(HttpResponse::Ok().json(PreheatResult {
        product_id: id.get(),
        remaining,
        buyers,
    }))
}

/// Prometheus metrics.
///
/// A scrape first brings `seckill_dependency_ready` up to date: it shares the readiness
/// checks of `/readyz` (at most one round a second, each check bounded), so the gauge is never
/// older than a second whether or not anything polls `/readyz`.
#[utoipa::path(responses((status = 200, description = "Prometheus text format", content_type = "text/plain")), tag = "service")]
#[get("/metrics")]
pub async fn metrics(deps: web::Data<crate::deps::Deps>) -> HttpResponse {
    deps.readiness().await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(deps.metrics.render())
}
