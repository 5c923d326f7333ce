//! `GET /healthz` (process up) and `GET /readyz` ("this process can do its job now": not shutting
//! down, Redis, RabbitMQ and Postgres reachable, Redis durable as `SECKILL_REDIS_DURABILITY`
//! asks). The checks themselves are [`Deps::readiness`]: at most one round per second per
//! process, whatever the request rate.

use actix_web::{HttpResponse, get, web};
use serde_json::json;

use crate::{deps::Deps, http::problem::ApiError};

/// The process is up.
#[utoipa::path(responses((status = 200, description = "Process is up")), tag = "service")]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// This process can do its job now: it is not shutting down, Redis, RabbitMQ and Postgres are
/// all reachable, and Redis gives the durability `SECKILL_REDIS_DURABILITY` asks for.
#[utoipa::path(
    responses(
        (status = 200, description = "Every dependency answers (checked at most once a second; the answer may be up to a second old)"),
        (status = 503, description = "`draining`: the process is shutting down (it still serves requests for `SECKILL_DRAIN_GRACE_MS`, then stops accepting); or `unavailable`: a dependency is unreachable, or Redis no longer gives the configured durability, and `checks` names it", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    tag = "service"
)]
#[get("/readyz")]
pub async fn readyz(deps: web::Data<Deps>) -> Result<HttpResponse, ApiError> {
    if deps.drain.is_draining() {
        return Err(ApiError::Draining);
    }
    let ready = deps.readiness().await;
    let state = |ok: bool| if ok { "ok" } else { "unreachable" };
    let checks = json!({
        "redis": ready.redis,
        "rabbitmq": state(ready.rabbitmq),
        "postgres": state(ready.postgres),
    });
    let failing = ready.failing();
    if failing.is_empty() {
        Ok(HttpResponse::Ok().json(json!({"status": "ready", "checks": checks})))
    } else {
        Err(ApiError::NotReady {
            failing: failing.join(", "),
            checks,
        })
    }
}
