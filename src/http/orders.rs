//! Paying and cancelling an order.

use actix_web::{HttpResponse, post, web};
use uuid::Uuid;

use crate::{
    http::{Ctx, extract::AuthUser, problem::ApiError},
    orders::{self, OrderView},
};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(pay).service(cancel);
}

fn order_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(raw).map_err(|_| ApiError::OrderNotFound)
}

/// Pays a `pending_payment` order.
#[utoipa::path(
    params(("order_id" = String, Path, description = "order id (UUID)")),
    responses(
        (status = 200, description = "The order, now `paid`", body = OrderView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found` (also when it is another user's)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
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
    let id = order_id(&path)?;
    let order = orders::pay(&ctx.deps.db, &ctx.reservations, id, user.0).await?;
    Ok(HttpResponse::Ok().json(OrderView::from(&order)))
}

/// Cancels a `pending_payment` order; its unit goes back on sale.
#[utoipa::path(
    params(("order_id" = String, Path, description = "order id (UUID)")),
    responses(
        (status = 200, description = "The order, now `cancelled`", body = OrderView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found` (also when it is another user's)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`order_closed`: paid or expired", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "orders"
)]
#[post("/api/v1/orders/{order_id}/cancel")]
pub async fn cancel(
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = order_id(&path)?;
    let order = orders::cancel(&ctx.deps.db, &ctx.reservations, id, user.0).await?;
    Ok(HttpResponse::Ok().json(OrderView::from(&order)))
}
