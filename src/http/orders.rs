//! Orders after a win: the shopper cancels (and, in development mode only, pays); the
//! storefront's backend records the payment its payment provider confirmed and reads orders.

use actix_web::{HttpResponse, get, post, web};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    http::{
        Ctx,
        extract::{AuthUser, Canceller, Service},
        problem::ApiError,
    },
    orders::{self, OrderView, Payment},
};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(pay)
        .service(cancel)
        .service(record_payment)
        .service(get_order);
}

fn order_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(raw).map_err(|_| ApiError::OrderNotFound)
}

/// Development mode only: the shopper marks their own `pending_payment` order paid (the
/// walkthrough and the browser test pay this way). Outside development mode only the
/// storefront's backend records payments (`POST /api/v1/orders/{order_id}/payment`), and this
/// path answers `404 not_found`, as for a path that does not exist.
#[utoipa::path(
    params(("order_id" = String, Path, description = "order id (UUID)")),
    responses(
        (status = 200, description = "The order, now `paid` (development mode only)", body = OrderView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found` (also when it is another user's); `not_found` outside development mode", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`order_closed`: cancelled or expired", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "orders"
)]
#[post("/api/v1/orders/{order_id}/pay")]
pub async fn pay(
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    if !ctx.deps.settings.dev {
        return Err(ApiError::NotFound);
    }
    let id = order_id(&path)?;
    let order = orders::pay(&ctx.deps.db, &ctx.reservations, id, user.0).await?;
    Ok(HttpResponse::Ok().json(OrderView::from(&order)))
}

/// Cancels a `pending_payment` order — the shopper's own (JWT), or any (the storefront's
/// backend, service token); its unit goes back on sale.
#[utoipa::path(
    params(("order_id" = String, Path, description = "order id (UUID)")),
    responses(
        (status = 200, description = "The order, now `cancelled`", body = OrderView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found` (also when it is another user's)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`order_closed`: paid or expired (with `order_status`)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = []), ("service_token" = [])),
    tag = "orders"
)]
#[post("/api/v1/orders/{order_id}/cancel")]
pub async fn cancel(
    ctx: web::Data<Ctx>,
    by: Canceller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = order_id(&path)?;
    let order = orders::cancel(&ctx.deps.db, &ctx.reservations, id, by.0).await?;
    Ok(HttpResponse::Ok().json(OrderView::from(&order)))
}

/// A payment the payment provider confirmed, as the storefront's backend reports it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordPayment {
    /// The payment provider's reference (1 to 200 characters, not all spaces, no control
    /// characters): one reference pays one order.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub payment_reference: String,
    /// Must equal the product's `price_cents`.
    #[schema(minimum = 0)]
    pub amount_cents: i64,
}

impl RecordPayment {
    fn validate(self) -> Result<Payment, ApiError> {
        let reference = self.payment_reference.trim();
        if reference.is_empty() || reference.chars().count() > 200 {
            return Err(ApiError::BadRequest(
                "payment_reference must be 1 to 200 characters".into(),
            ));
        }
        if reference.chars().any(char::is_control) {
            return Err(ApiError::BadRequest(
                "payment_reference must not contain control characters".into(),
            ));
        }
        if self.amount_cents < 0 {
            return Err(ApiError::BadRequest(
                "amount_cents must not be negative".into(),
            ));
        }
        Ok(Payment {
            reference: reference.to_owned(),
            amount_cents: self.amount_cents,
        })
    }
}

/// Records the payment of an order (the storefront's backend, with a service token, once its
/// payment provider confirmed the charge). Idempotent by `payment_reference`: a retry answers
/// the same paid order. Nothing changes on a `409`.
#[utoipa::path(
    params(("order_id" = String, Path, description = "order id (UUID)")),
    request_body = RecordPayment,
    responses(
        (status = 200, description = "The order, now `paid` (the same answer for a retry with the same reference and amount)", body = OrderView),
        (status = 400, description = "`bad_request`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: not a service token (a shopper's JWT and the admin token are refused)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`amount_mismatch` (with `price_cents`); `order_closed` (with `order_status`: `cancelled` or `expired` — refund the payment); `payment_conflict`: already paid under another reference, or the reference paid another order", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("service_token" = [])),
    tag = "backend"
)]
#[post("/api/v1/orders/{order_id}/payment")]
pub async fn record_payment(
    ctx: web::Data<Ctx>,
    _service: Service,
    path: web::Path<String>,
    body: web::Json<RecordPayment>,
) -> Result<HttpResponse, ApiError> {
    let id = order_id(&path)?;
    let payment = body.into_inner().validate()?;
    let order = orders::record_payment(&ctx.deps.db, &ctx.reservations, id, &payment).await?;
    tracing::info!(order_id = %id, payment_reference = %payment.reference, "payment recorded");
    Ok(HttpResponse::Ok().json(OrderView::from(&order)))
}

/// An order, whoever's it is (the storefront's backend, with a service token).
#[utoipa::path(
    params(("order_id" = String, Path, description = "order id (UUID)")),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 401, description = "`unauthorized`: not a service token", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("service_token" = [])),
    tag = "backend"
)]
#[get("/api/v1/orders/{order_id}")]
pub async fn get_order(
    ctx: web::Data<Ctx>,
    _service: Service,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = order_id(&path)?;
    let order = orders::find(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::OrderNotFound)?;
    Ok(HttpResponse::Ok().json(OrderView::from(&order)))
}
