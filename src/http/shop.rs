//! The shoppers' API: product view, purchase tokens, the purchase decision, reservation status.

use actix_web::{
    HttpResponse, ResponseError, get,
    http::header::{HeaderName, HeaderValue},
    post, web,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use std::{sync::Arc, time::Duration};

use actix_web::web::Bytes;
use tokio::sync::broadcast;

use crate::{
    domain::{ProductId, UserId},
    http::{
        Ctx,
        extract::{AuthUser, product_id},
        problem::ApiError,
    },
    orders, rejections,
    reservations::{Decision, Outcome, RateWindow, ReservationView, Status, status_event},
};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(product_view)
        .service(issue_token)
        .service(reserve)
        .service(my_reservation)
        .service(my_reservation_events);
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
    pub price_cents: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub state: SaleState,
    /// Units left on sale.
    pub remaining: i64,
}

/// A product and where its sale stands.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = PublicProduct),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    tag = "shoppers"
)]
#[get("/api/v1/products/{id}")]
pub async fn product_view(
    ctx: web::Data<Ctx>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let product = crate::products::find(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::ProductNotFound)?;
    let (remaining, lost) = match ctx.reservations.remaining(id).await? {
        Some(r) => (r, false),
        None => (
            i64::from(product.stock - product.sold),
            ctx.recovery.view_lost(&product),
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
    Ok(HttpResponse::Ok().json(PublicProduct {
        product_id: product.product_id,
        name: product.name,
        price_cents: product.price_cents,
        starts_at: product.starts_at,
        ends_at: product.ends_at,
        state,
        remaining,
    }))
}

/// A purchase token: bound to this user and product, valid until `expires_at`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurchaseToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// The hidden purchase path: a token, issued only while the sale is live.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = PurchaseToken),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
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
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
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
    let issued = ctx.auth.issue_purchase_token(user.0, id)?;
    Ok(HttpResponse::Ok().json(PurchaseToken {
        token: issued.token,
        expires_at: issued.expires_at,
    }))
}

/// A purchase attempt.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    /// The purchase token from `POST /api/v1/products/{id}/token`.
    pub token: String,
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
    };
    with_window(response, d.window)
}

/// Decides one purchase attempt: one atomic Redis step.
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
        (status = 413, description = "`payload_too_large`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 425, description = "`not_started`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`, `paused` or `recovering`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
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
    let info = ctx
        .products
        .get(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::ProductNotFound)?;
    // Read the body first, whatever the answer: a response that leaves it unread cannot keep
    // the connection alive (measured: sold-out answers fell to a third).
    let body = read_body(&req, payload).await?;
    let metrics = &ctx.deps.metrics;
    // Sold out is public (the product view says so) and answered from memory before anything
    // else costs CPU: no identity or token can buy a unit that is not there.
    if ctx.soldout.is_sold_out(id) {
        metrics.soldout_cache_hits.inc();
        metrics.decided(&Outcome::SoldOut);
        return Ok(sold_out_response());
    }
    let user = <AuthUser as actix_web::FromRequest>::extract(&req).await?;
    let body: PurchaseRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if !ctx.auth.check_purchase_token(&body.token, user.0, id) {
        return Err(ApiError::InvalidToken);
    }
    if ctx.recovery.is_recovering(id) {
        return Err(ApiError::Recovering);
    }
    let ticket = ctx.soldout.ticket();
    let decision = ctx.reservations.reserve(user.0, id).await?;
    metrics.decided(&decision.outcome);
    metrics.replicated(decision.replication);
    if decision.outcome == Outcome::UnknownProduct {
        if Utc::now() >= info.ends_at {
            return Err(ApiError::Ended);
        }
        if ctx.recovery.lost(id).await? {
            return Err(ApiError::Recovering);
        }
    }
    match decision.outcome {
        Outcome::SoldOut | Outcome::Won { remaining: 0, .. } => ctx.soldout.mark(id, ticket),
        _ => {}
    }
    Ok(decision_response(&decision))
}

/// Reads a JSON request body (at most 16 KiB, `application/json`), unparsed.
async fn read_body(req: &actix_web::HttpRequest, payload: web::Payload) -> Result<Bytes, ApiError> {
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
        return Err(ApiError::BadRequest(
            "expected Content-Type: application/json".into(),
        ));
    }
    payload
        .to_bytes_limited(crate::http::MAX_BODY)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(crate::http::MAX_BODY))?
        .map_err(|_| ApiError::BadRequest("could not read the request body".into()))
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
pub async fn reservation_view(
    ctx: &Ctx,
    user: crate::domain::UserId,
    id: ProductId,
) -> Result<Option<ReservationView>, ApiError> {
    let mut cached = None;
    if let Some(rid) = ctx.reservations.reservation_of(id, user).await?
        && let Some(raw) = ctx.reservations.status_of(id, rid).await?
    {
        cached = ReservationView::from_redis(rid, &raw);
    }
    // A rejected win may be the second win of a shopper who holds an order: show the order.
    if cached
        .as_ref()
        .is_some_and(|v| v.status != Status::Rejected)
    {
        return Ok(cached);
    }
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

/// The caller's reservation for this product.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = ReservationView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`no_reservation` or `product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
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
    Ok(HttpResponse::Ok().json(view))
}

/// How often an idle event stream gets a keep-alive comment (and a fresh look at the status,
/// in case a notification was lost).
const SSE_HEARTBEAT: Duration = Duration::from_secs(15);

fn sse_frame(view: &ReservationView) -> Bytes {
    Bytes::from(format!("event: status\ndata: {}\n\n", view.to_json()))
}

struct SseState {
    ctx: web::Data<Ctx>,
    user: UserId,
    product: ProductId,
    topic: String,
    rx: broadcast::Receiver<Arc<str>>,
    last: Option<ReservationView>,
    first: Option<ReservationView>,
    done: bool,
}

async fn next_frame(mut st: SseState) -> Option<(Result<Bytes, actix_web::Error>, SseState)> {
    if st.done {
        return None;
    }
    if let Some(view) = st.first.take() {
        st.done = view.is_terminal();
        let frame = sse_frame(&view);
        st.last = Some(view);
        return Some((Ok(frame), st));
    }
    loop {
        let heartbeat = tokio::select! {
            msg = st.rx.recv() => match msg {
                Ok(m) if *m == *st.topic => false,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => false,
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = tokio::time::sleep(SSE_HEARTBEAT) => true,
        };
        let view = reservation_view(&st.ctx, st.user, st.product)
            .await
            .ok()
            .flatten();
        match view {
            Some(view) if st.last.as_ref() != Some(&view) => {
                st.done = view.is_terminal();
                let frame = sse_frame(&view);
                st.last = Some(view);
                return Some((Ok(frame), st));
            }
            _ if heartbeat => return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), st)),
            _ => {}
        }
    }
}

/// The caller's reservation as Server-Sent Events: a `status` event now and at every change
/// (pushed through Redis pub/sub, not polled), ending after a terminal state.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "`text/event-stream` of `status` events whose data is a ReservationView", content_type = "text/event-stream", body = ReservationView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`no_reservation` or `product_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "shoppers"
)]
#[get("/api/v1/products/{id}/reservations/me/events")]
pub async fn my_reservation_events(
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    // Subscribe before the first read, so no change between the two is missed.
    let rx = ctx.deps.events.subscribe();
    let first = reservation_view(&ctx, user.0, id)
        .await?
        .ok_or(ApiError::NoReservation)?;
    let state = SseState {
        topic: status_event(id, user.0),
        ctx,
        user: user.0,
        product: id,
        rx,
        last: None,
        first: Some(first),
        done: false,
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(futures_util::stream::unfold(state, next_frame)))
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
