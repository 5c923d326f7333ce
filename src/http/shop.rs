//! The shoppers' API: product view, purchase tokens, the purchase decision, reservation status
//! and its event stream.

use actix_web::{
    FromRequest, HttpRequest, HttpResponse, ResponseError, get,
    http::header::{self, HeaderName, HeaderValue},
    post, web,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use std::time::Duration;

use actix_web::web::Bytes;

use crate::{
    auth::STREAM_TOKEN_TTL,
    domain::{ProductId, UserId},
    http::{
        Ctx, cacheable,
        extract::{AuthUser, product_id},
        problem::ApiError,
    },
    orders,
    purchase::{self, Answer, PurchaseRequest},
    rejections,
    reservations::{Decision, Outcome, RateWindow, ReservationView, Status},
    sse::{Refused, SseStream},
};

/// The purchase comes first: a request is matched against the routes' patterns in this order
/// (by the router, and once more for its metrics label), and it is the hottest route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(reserve)
        .service(product_view)
        .service(product_list)
        .service(issue_token)
        .service(my_reservation)
        .service(my_reservation_events)
        .service(issue_stream_token)
        .service(crate::http::room::room_challenge)
        .service(crate::http::room::join_room)
        .service(crate::http::room::my_room)
        .service(crate::http::room::my_room_events);
}

/// Where a sale stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SaleState {
    Upcoming,
    Live,
    SoldOut,
    Ended,
    /// Redis lost the sale; it is being rebuilt from Postgres (purchases answer `503`).
    Recovering,
}

/// A product as shoppers see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PublicProduct {
    pub product_id: i64,
    pub name: String,
    /// In the currency's minor unit (cents; yen for JPY).
    pub price_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub state: SaleState,
    /// Units left on sale.
    pub remaining: i64,
    /// Shoppers join a waiting room (`POST …/room`) and buy once admitted.
    pub waiting_room: bool,
    /// Joining it takes a proof of work (`POST …/room/challenge` first).
    pub proof_of_work: bool,
}

/// A product and where its sale stands: the same for everyone, so a browser, a proxy or a CDN
/// may keep it for `SECKILL_VIEW_MAX_AGE_SECS` (1 s) and revalidate it (`ETag`, `304`).
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = PublicProduct, headers(
            ("Cache-Control" = String, description = "`public, max-age=1, stale-while-revalidate=2` by default (`SECKILL_VIEW_MAX_AGE_SECS`, `SECKILL_VIEW_STALE_SECS`)"),
            ("ETag" = String, description = "a strong tag of the body: send it as `If-None-Match` to get a `304` while nothing changed"),
        )),
        (status = 304, description = "Not modified: the `If-None-Match` tag is still the view's"),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    tag = "shoppers"
)]
#[get("/api/v1/products/{id}")]
pub async fn product_view(
    req: HttpRequest,
    ctx: web::Data<Ctx>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    // Both from memory for a moment (see `ProductCache`): a flood of views, or of unknown
    // ids, costs Postgres and Redis at most one look per id per process per period.
    let product = ctx
        .products
        .row(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::ProductNotFound)?;
    let (remaining, lost) = match ctx.products.remaining(&ctx.reservations, id).await? {
        Some(r) => (r, false),
        None => (
            i64::from(product.stock - product.sold),
            ctx.recovery.check_lost(&product).await?,
        ),
    };
    let now = Utc::now();
    let state = if now >= product.ends_at {
        SaleState::Ended
    } else if lost {
        SaleState::Recovering
    } else if now < product.starts_at {
        SaleState::Upcoming
    } else if remaining <= 0 {
        SaleState::SoldOut
    } else {
        SaleState::Live
    };
    let view = PublicProduct {
        product_id: product.product_id,
        name: product.name.clone(),
        price_cents: product.price_cents,
        currency: product.currency.clone(),
        starts_at: product.starts_at,
        ends_at: product.ends_at,
        state,
        remaining,
        waiting_room: product.waiting_room,
        proof_of_work: product.proof_of_work,
    };
    Ok(cacheable::json(
        &req,
        &ctx.deps.settings.view_cache_control,
        &view,
    ))
}

/// A sale in the storefront's listing (what changes second to second, units left and state,
/// is in the product's own view).
#[derive(Debug, Serialize, ToSchema)]
pub struct ListedProduct {
    pub product_id: i64,
    pub name: String,
    /// In the currency's minor unit.
    pub price_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

/// The sales on now or coming.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProductList {
    /// Soonest start first, at most 50.
    pub products: Vec<ListedProduct>,
}

/// The sales that have not ended, soonest first (at most 50): public, the same for everyone,
/// and cacheable for 5 s by a CDN (each process reads Postgres at most once a second for it).
#[utoipa::path(
    responses(
        (status = 200, description = "OK", body = ProductList, headers(
            ("Cache-Control" = String, description = "`public, max-age=5`"),
            ("ETag" = String, description = "a strong tag of the body (`If-None-Match` → `304`)"),
        )),
        (status = 304, description = "Not modified: the `If-None-Match` tag is still the listing's"),
        (status = 503, description = "`unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    tag = "shoppers"
)]
#[get("/api/v1/products")]
pub async fn product_list(req: HttpRequest, ctx: web::Data<Ctx>) -> Result<HttpResponse, ApiError> {
    let listed = ctx.products.listing(&ctx.deps.db).await?;
    let products = listed
        .iter()
        .map(|p| ListedProduct {
            product_id: p.product_id,
            name: p.name.clone(),
            price_cents: p.price_cents,
            currency: p.currency.clone(),
            starts_at: p.starts_at,
            ends_at: p.ends_at,
        })
        .collect();
    Ok(cacheable::json(
        &req,
        "public, max-age=5",
        &ProductList { products },
    ))
}

/// A purchase token: bound to this user and product, valid until `expires_at`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurchaseToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// What `POST …/token` takes: nothing, or for a product with a waiting room the admission
/// token its room gave this shopper.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub admission_token: Option<String>,
}

/// The hidden purchase path: a token, issued only while the sale is live (for a product with a
/// waiting room, only to a shopper it admitted: `{"admission_token": …}`).
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    request_body(content = Option<TokenRequest>, description = "Only for a product with a waiting room: the admission token it gave this shopper", content_type = "application/json"),
    responses(
        (status = 200, description = "OK", body = PurchaseToken),
        (status = 400, description = "`bad_request`: a body that is not `{\"admission_token\": …}` JSON", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`not_admitted`: the product has a waiting room and no valid admission token of this shopper came", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 410, description = "`ended`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 425, description = "`not_started`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (per IP)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`recovering`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "shoppers"
)]
#[post("/api/v1/products/{id}/token")]
pub async fn issue_token(
    req: HttpRequest,
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let asked: TokenRequest = read_optional_json(&req, payload).await?;
    let product = ctx
        .products
        .get(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::ProductNotFound)?;
    let now = Utc::now();
    if now < product.starts_at {
        return Err(ApiError::NotStarted);
    }
    if now >= product.ends_at {
        return Err(ApiError::Ended);
    }
    if ctx.recovery.is_recovering(id) {
        return Err(ApiError::Recovering);
    }
    if product.waiting_room {
        let admitted = asked
            .admission_token
            .is_some_and(|t| ctx.auth.check_admission_token(&t, user.0, id));
        if !admitted {
            return Err(ApiError::NotAdmitted);
        }
    }
    let issued = ctx.auth.issue_purchase_token(user.0, id)?;
    Ok(HttpResponse::Ok().json(PurchaseToken {
        token: issued.token,
        expires_at: issued.expires_at,
    }))
}

/// A won unit.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReservationAccepted {
    pub reservation_id: Uuid,
    /// Always `pending`: the order is being persisted.
    pub status: Status,
}

fn with_window(mut response: HttpResponse, w: RateWindow) -> HttpResponse {
    let headers = response.headers_mut();
    let reset_secs = w.reset.as_millis().div_ceil(1_000);
    for (name, value) in [
        ("ratelimit-limit", u128::from(w.limit)),
        ("ratelimit-remaining", u128::from(w.remaining)),
        ("ratelimit-reset", reset_secs),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    response
}

/// The answer to a decision (status, body and rate-limit headers).
pub fn decision_response(d: &Decision) -> HttpResponse {
    let response = match &d.outcome {
        Outcome::Won { reservation_id, .. } => HttpResponse::Accepted().json(ReservationAccepted {
            reservation_id: *reservation_id,
            status: Status::Pending,
        }),
        Outcome::AlreadyReserved { reservation_id } => {
            ApiError::AlreadyReserved(*reservation_id).error_response()
        }
        Outcome::SoldOut => ApiError::SoldOut.error_response(),
        Outcome::RateLimited { retry_after } => ApiError::RateLimited {
            retry_after_secs: u64::try_from(retry_after.as_millis().div_ceil(1_000))
                .unwrap_or(1)
                .max(1),
        }
        .error_response(),
        Outcome::NotStarted => ApiError::NotStarted.error_response(),
        Outcome::Ended => ApiError::Ended.error_response(),
        Outcome::Paused => ApiError::Paused.error_response(),
        Outcome::UnknownProduct => ApiError::ProductNotFound.error_response(),
        // `purchase::attempt` answers it `recovering` before it gets here.
        Outcome::WentBack => ApiError::Recovering.error_response(),
    };
    with_window(response, d.window)
}

/// Decides one purchase attempt ([`crate::purchase`]): one atomic Redis step.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    request_body = PurchaseRequest,
    responses(
        (status = 202, description = "Won a unit; the order is being persisted", body = ReservationAccepted,
         headers(("RateLimit-Limit" = u32), ("RateLimit-Remaining" = u32), ("RateLimit-Reset" = u64))),
        (status = 400, description = "`bad_request`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`invalid_token`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already_reserved` (with the earlier `reservation_id`)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 410, description = "`sold_out` or `ended`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 408, description = "`body_timeout`: the body did not arrive within `SECKILL_BODY_TIMEOUT_MS` of the head; the connection is closed", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 425, description = "`not_started`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`, with `Retry-After`; `too_many_connections` (per client address, the connection is closed)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`, `paused` or `recovering`; `at_capacity` (the process holds `SECKILL_MAX_CONNECTIONS`, the connection is closed)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "shoppers"
)]
#[post("/api/v1/products/{id}/reservations")]
pub async fn reserve(
    ctx: web::Data<Ctx>,
    req: actix_web::HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    // Who is asking comes before the body: a stranger's body is never read (a huge or
    // trickled one costs nothing; the connection is closed after the `401`).
    let user = <AuthUser as actix_web::FromRequest>::extract(&req).await?;
    // Then the body is read whatever the answer (a response that leaves it unread cannot keep
    // the connection alive: measured, sold-out answers fell to a third), except for an
    // unknown product.
    let body = read_body(&req, payload);
    Ok(
        match purchase::attempt(&ctx.purchase, user.0, id, body).await? {
            Answer::SoldOut => sold_out_response(),
            Answer::Decided(decision) => decision_response(&decision),
        },
    )
}

/// Reads a JSON request body (at most 16 KiB, `application/json`), unparsed. A body that does
/// not arrive in time fails here, and [`crate::http::limits::body_deadline`] answers `408`.
pub(crate) async fn read_body(
    req: &actix_web::HttpRequest,
    payload: web::Payload,
) -> Result<Bytes, ApiError> {
    require_json(req)?;
    read_bytes(payload).await
}

/// An optional JSON body: none (or JSON `null`) is `T::default()`; anything else must be JSON
/// (`Content-Type` and content) of `T`, else a `400 bad_request` that says why.
pub(crate) async fn read_optional_json<T: serde::de::DeserializeOwned + Default>(
    req: &actix_web::HttpRequest,
    payload: web::Payload,
) -> Result<T, ApiError> {
    let body = read_bytes(payload).await?;
    if body.is_empty() {
        return Ok(T::default());
    }
    require_json(req)?;
    Ok(parse_json::<Option<T>>(&body)?.unwrap_or_default())
}

/// Checks a JSON body's `Content-Type` (`application/json`, any parameters): else a
/// `400 bad_request` that says so.
fn require_json(req: &actix_web::HttpRequest) -> Result<(), ApiError> {
    let json = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(ApiError::not_json_content_type());
    }
    Ok(())
}

/// Reads a request body of at most [`crate::http::MAX_BODY`] bytes, whatever its type.
pub(crate) async fn read_bytes(payload: web::Payload) -> Result<Bytes, ApiError> {
    payload
        .to_bytes_limited(crate::http::MAX_BODY)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(crate::http::MAX_BODY))?
        .map_err(|_| ApiError::unreadable_body())
}

/// Parses a JSON request body read by [`read_body`]; invalid JSON is a `400` that says why.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::invalid_json)
}

/// The `410 sold_out` problem, serialized once per process.
fn sold_out_response() -> HttpResponse {
    static BODY: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let body = BODY.get_or_init(|| {
        Bytes::from(serde_json::to_vec(&ApiError::SoldOut.problem()).unwrap_or_default())
    });
    HttpResponse::Gone()
        .content_type("application/problem+json")
        .body(body.clone())
}

/// The caller's current view of their reservation, from Redis (falling back to Postgres: their
/// order, else their latest rejected win, so a rejection stays visible after Redis lost data).
/// A shopper Redis knows did not win — the product is loaded with its whole buyer list and
/// they are not on it — is answered without asking Postgres.
pub async fn reservation_view(
    ctx: &Ctx,
    user: crate::domain::UserId,
    id: ProductId,
) -> Result<Option<ReservationView>, ApiError> {
    let (won, knows_every_buyer) = tokio::try_join!(
        ctx.reservations.reservation_of(id, user),
        ctx.reservations.knows_every_buyer(id),
    )?;
    let Some(rid) = won else {
        let mut recovering = ctx.recovery.is_recovering(id);
        if knows_every_buyer && !recovering {
            // Unknown to a Redis that knows every buyer: none — unless that Redis went back in
            // time and forgot this winner (one Redis call; Postgres is not asked).
            if !ctx.recovery.went_back_for_me(id).await? {
                return Ok(None);
            }
            recovering = true;
        }
        let view = persisted_view(ctx, user, id, None).await?;
        // While the product is recovering a win may still be on its way to Postgres (in the
        // queue, at a worker): "no reservation" is not yet definite.
        if view.is_none() && recovering {
            return Err(ApiError::Recovering);
        }
        return Ok(view);
    };
    let cached = ctx
        .reservations
        .status_of(id, rid)
        .await?
        .and_then(|raw| ReservationView::from_redis(rid, &raw));
    // A rejected win may be the second win of a shopper who holds an order: show the order.
    // So may a win Redis still calls pending: its order's status writes may have been lost
    // (a failover; found by `scripts/chaos`, seed 11), and Postgres is the record. (Pending
    // lasts milliseconds normally: this read is rare.)
    if cached
        .as_ref()
        .is_some_and(|v| !matches!(v.status, Status::Rejected | Status::Pending))
    {
        return Ok(cached);
    }
    persisted_view(ctx, user, id, cached).await
}

/// The shopper's order in Postgres, else `cached` (a rejected win Redis has), else their
/// latest rejected win in Postgres.
async fn persisted_view(
    ctx: &Ctx,
    user: UserId,
    id: ProductId,
    cached: Option<ReservationView>,
) -> Result<Option<ReservationView>, ApiError> {
    if let Some(order) = orders::find_for(&ctx.deps.db, user, id).await? {
        return Ok(Some(ReservationView::from(&order)));
    }
    if cached.is_some() {
        return Ok(cached);
    }
    Ok(rejections::find_for(&ctx.deps.db, user, id)
        .await?
        .map(|r| ReservationView::from(&r)))
}

/// One event of a reservation's stream, as an `EventSource` parses it (the OpenAPI schema of
/// each item of the `text/event-stream` answer; the stream itself is built as text).
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationEvent {
    /// `status` (its `data` is a ReservationView, as JSON), or the last one, `close` (its `data`
    /// is `{"reason": "shutting_down", "detail": …}`).
    #[schema(pattern = "^(status|close)$")]
    pub event: Option<String>,
    /// JSON text (see `event`).
    pub data: Option<String>,
    /// Milliseconds the client waits before it reconnects (with the last event, or alone when
    /// the stream's lifetime is reached).
    pub retry: Option<u64>,
}

/// The caller's reservation for this product.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = ReservationView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`no_reservation` or `product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`recovering`: the product is being rebuilt and this shopper's win, if any, may still be on its way to Postgres (ask again shortly); or `unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "shoppers"
)]
#[get("/api/v1/products/{id}/reservations/me")]
pub async fn my_reservation(
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let view = reservation_view(&ctx, user.0, id)
        .await?
        .ok_or(ApiError::NoReservation)?;
    // The shopper's own: no shared cache may keep it, and no browser cache either.
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "private, no-store"))
        .json(view))
}

/// A `status` event of a shopper's event stream, its data `json`.
pub(crate) fn status_frame(json: &str) -> Bytes {
    Bytes::from(format!("event: status\ndata: {json}\n\n"))
}

pub(crate) const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// The last frame of a stream that reached its lifetime: an `EventSource` reconnects after
/// `retry` milliseconds, picked between 1 and 5 s so streams that end together do not all
/// come back in the same instant.
pub(crate) fn lifetime_frame() -> Bytes {
    let retry_ms = fastrand::u64(1_000..=5_000);
    Bytes::from(format!(
        ": stream lifetime reached, reconnect\nretry: {retry_ms}\n\n"
    ))
}

/// When a stream opened now ends: between 90% and 100% of the configured lifetime, so
/// streams opened together (a sale's start) do not all end together.
fn stream_deadline(lifetime: Duration) -> tokio::time::Instant {
    let spread = lifetime.mul_f64(fastrand::f64() * 0.1);
    tokio::time::Instant::now() + lifetime.saturating_sub(spread)
}

struct SseState {
    ctx: web::Data<Ctx>,
    user: UserId,
    product: ProductId,
    /// Counted (caps, gauge) and woken by this shopper's status events until dropped, which
    /// happens when the response ends or the client goes away.
    stream: SseStream,
    /// This stream's own keep-alive clock: nothing else resets it.
    heartbeat: tokio::time::Interval,
    ends_at: tokio::time::Instant,
    last: Option<ReservationView>,
    first: Option<ReservationView>,
    /// A read failed after a wake-up: read again at the next heartbeat.
    stale: bool,
    done: bool,
}

impl SseState {
    /// Reads the reservation again; a frame if it changed.
    async fn reread(&mut self) -> Option<Bytes> {
        match reservation_view(&self.ctx, self.user, self.product).await {
            Ok(view) => {
                self.stale = false;
                let view = view.filter(|v| self.last.as_ref() != Some(v))?;
                Some(self.show(view))
            }
            Err(_) => {
                self.stale = true;
                None
            }
        }
    }

    fn show(&mut self, view: ReservationView) -> Bytes {
        self.done = view.is_terminal();
        let frame = status_frame(&view.to_json());
        self.last = Some(view);
        frame
    }
}

async fn next_frame(mut st: SseState) -> Option<(Result<Bytes, actix_web::Error>, SseState)> {
    if st.done {
        return None;
    }
    if let Some(view) = st.first.take() {
        let frame = st.show(view);
        return Some((Ok(frame), st));
    }
    loop {
        tokio::select! {
            biased;
            // The process is shutting down: a last event rather than a cut connection.
            _ = st.ctx.deps.drain.closing() => {
                st.done = true;
                let retry_ms = fastrand::u64(crate::drain::CLOSE_RETRY_MS);
                return Some((Ok(Bytes::from(crate::drain::close_frame(retry_ms))), st));
            }
            _ = tokio::time::sleep_until(st.ends_at) => {
                st.done = true;
                return Some((Ok(lifetime_frame()), st));
            }
            _ = st.stream.woken() => {
                st.ctx.deps.metrics.sse_wakeups.inc();
                if let Some(frame) = st.reread().await {
                    return Some((Ok(frame), st));
                }
            }
            _ = st.heartbeat.tick() => {
                if st.stale && let Some(frame) = st.reread().await {
                    return Some((Ok(frame), st));
                }
                return Some((Ok(Bytes::from_static(KEEP_ALIVE)), st));
            }
        }
    }
}

/// An event stream just opened: counted against the caps, with its own keep-alive clock and
/// the end of its lifetime.
pub(crate) struct Opened {
    pub stream: SseStream,
    pub heartbeat: tokio::time::Interval,
    pub ends_at: tokio::time::Instant,
}

/// Opens an event stream of `user` on `id` within the caps (`429 too_many_streams`, `503
/// streams_exhausted`).
pub(crate) fn open_stream(ctx: &Ctx, id: ProductId, user: UserId) -> Result<Opened, ApiError> {
    let limits = ctx.deps.sse.limits();
    let stream = ctx
        .deps
        .sse
        .open(id, user)
        .map_err(|refused| match refused {
            Refused::PerUser => ApiError::TooManyStreams(limits.per_user),
            Refused::Process => ApiError::StreamsExhausted,
        })?;
    let start = tokio::time::Instant::now();
    let mut heartbeat = tokio::time::interval_at(start + limits.heartbeat, limits.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Ok(Opened {
        stream,
        heartbeat,
        ends_at: stream_deadline(limits.lifetime),
    })
}

/// How an event stream's caller may sign in.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// A stream token from `POST …/reservations/me/stream-token`, for clients that cannot send
    /// `Authorization` (a browser's `EventSource`). Never a shopper's JWT: that is refused here.
    pub token: Option<String>,
}

/// The shopper of an event stream: `Authorization: Bearer <JWT>` when the header is there,
/// else a stream token for this product in `?token=`.
pub(crate) async fn stream_user(
    ctx: &Ctx,
    req: &HttpRequest,
    product: ProductId,
    token: Option<&str>,
) -> Result<UserId, ApiError> {
    match token {
        Some(token) if !req.headers().contains_key(header::AUTHORIZATION) => ctx
            .auth
            .stream_token_user(token, product)
            .ok_or(ApiError::Unauthorized),
        _ => Ok(AuthUser::extract(req).await?.0),
    }
}

/// The caller's reservation as Server-Sent Events: a `status` event now and at every change
/// (pushed through Redis pub/sub, not polled), ending after a terminal state, or after the
/// stream's lifetime (`SECKILL_SSE_LIFETIME_SECS`) with a `retry:` hint, or when the process
/// shuts down with a `close` event (data `{"reason": "shutting_down", …}`) and a `retry:` hint.
/// An idle stream gets a `: keep-alive` comment every `SECKILL_SSE_HEARTBEAT_SECS`.
#[utoipa::path(
    params(("id" = String, Path, description = "product id"), StreamQuery),
    responses(
        (status = 200, description = "`text/event-stream` of `status` events whose data is a ReservationView; when the server shuts down, a last `close` event (data `{\"reason\": \"shutting_down\", \"detail\": …}`) with a `retry:` hint", content_type = "text/event-stream", body = ReservationEvent),
        (status = 400, description = "`bad_request`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized` (also an expired stream token, another product's, or a JWT in `?token=`)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`no_reservation` or `product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`too_many_streams`: this shopper holds `SECKILL_SSE_PER_USER` streams already (or `rate_limited` per IP)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`streams_exhausted` (with `Retry-After`): the process holds `SECKILL_SSE_MAX` streams; `recovering` (as `/me`); or `unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = []), ("stream_token" = [])),
    tag = "shoppers"
)]
#[get("/api/v1/products/{id}/reservations/me/events")]
pub async fn my_reservation_events(
    ctx: web::Data<Ctx>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let user = stream_user(&ctx, &req, id, query.token.as_deref()).await?;
    // Registered before the first read, so no change between the two is missed.
    let opened = open_stream(&ctx, id, user)?;
    let first = reservation_view(&ctx, user, id)
        .await?
        .ok_or(ApiError::NoReservation)?;
    tracing::debug!(product = %id, user = %user, "event stream opened");
    let state = SseState {
        ctx,
        user,
        product: id,
        stream: opened.stream,
        heartbeat: opened.heartbeat,
        ends_at: opened.ends_at,
        last: None,
        first: Some(first),
        stale: false,
        done: false,
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "private, no-store"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(futures_util::stream::unfold(state, next_frame)))
}

/// A stream token: opens this shopper's event stream of one product (`?token=`) until it
/// expires.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StreamToken {
    pub token: String,
    /// Seconds the token stays valid for opening a stream.
    pub expires_in: u64,
}

/// A short-lived token that opens the caller's event stream of this product, for browsers
/// (`new EventSource(".../events?token=...")`) which cannot send `Authorization`.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = StreamToken),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (per IP)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "shoppers"
)]
#[post("/api/v1/products/{id}/reservations/me/stream-token")]
pub async fn issue_stream_token(
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    ctx.products
        .get(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::ProductNotFound)?;
    let issued = ctx.auth.issue_stream_token(user.0, id)?;
    Ok(HttpResponse::Ok().json(StreamToken {
        token: issued.token,
        expires_in: STREAM_TOKEN_TTL.as_secs(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_web::test]
    async fn the_cached_sold_out_answer_is_the_sold_out_problem() {
        let res = sold_out_response();
        assert_eq!(res.status(), 410);
        let body = actix_web::body::to_bytes(res.into_body()).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "sold_out");
        assert_eq!(v["status"], 410);
    }
}
