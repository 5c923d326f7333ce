//! `GET /healthz` (process up) and `GET /readyz` (Redis, RabbitMQ and Postgres reachable; Redis
//! durable as `SECKILL_REDIS_DURABILITY` asks).

use std::time::Duration;

use actix_web::{HttpResponse, get, web};
use serde_json::json;

use crate::{deps::Deps, http::problem::ApiError};

/// The process is up.
#[utoipa::path(responses((status = 200, description = "Process is up")), tag = "service")]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// RabbitMQ is connected and answers: opening (and closing) a channel within a second. A broker
/// that stopped answering keeps a connection "up" until heartbeats time out; this notices it.
async fn rabbitmq_answers(broker: &crate::amqp::Broker) -> bool {
    let Some(conn) = broker.current() else {
        return false;
    };
    let opened = tokio::time::timeout(Duration::from_secs(1), conn.create_channel()).await;
    match opened {
        Ok(Ok(ch)) => {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), ch.close(200, "ready".into())).await;
            true
        }
        _ => false,
    }
}

/// Redis, RabbitMQ and Postgres are all reachable (and Redis gives the durability
/// `SECKILL_REDIS_DURABILITY` asks for).
#[utoipa::path(
    responses(
        (status = 200, description = "Every dependency answers"),
        (status = 503, description = "A dependency is unreachable, or Redis no longer gives the configured durability; `checks` names it", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    tag = "service"
)]
#[get("/readyz")]
pub async fn readyz(deps: web::Data<Deps>) -> Result<HttpResponse, ApiError> {
    let (redis, postgres) = tokio::join!(
        async {
            crate::redis::ping(&deps.redis)
                .await
                .map_err(|e| ("unreachable".to_owned(), e.to_string()))?;
            deps.durability
                .check(&deps.redis)
                .await
                .map_err(|why| (why.clone(), why))
        },
        async {
            tokio::time::timeout(Duration::from_secs(1), deps.db.ping())
                .await
                .map_err(|_| anyhow::anyhow!("timed out"))?
                .map_err(anyhow::Error::from)
        }
    );
    let rabbitmq = rabbitmq_answers(&deps.broker).await;
    let state = |ok: bool| if ok { "ok" } else { "unreachable" };
    let checks = json!({
        "redis": redis.as_ref().map_or_else(|(state, _)| state.as_str(), |()| "ok"),
        "rabbitmq": state(rabbitmq),
        "postgres": state(postgres.is_ok()),
    });
    let failing: Vec<&str> = [
        ("redis", redis.is_ok()),
        ("rabbitmq", rabbitmq),
        ("postgres", postgres.is_ok()),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(name, _)| name)
    .collect();
    if failing.is_empty() {
        Ok(HttpResponse::Ok().json(json!({"status": "ready", "checks": checks})))
    } else {
        if let Err((_, e)) = &redis {
            tracing::warn!(error = %e, "readiness: Redis");
        }
        if let Err(e) = &postgres {
            tracing::warn!(error = %e, "readiness: Postgres");
        }
        Err(ApiError::NotReady {
            failing: failing.join(", "),
            checks,
        })
    }
}
