//! Development mode only (`SECKILL_DEV=1`): a shopper's JWT for any user id, so the storefront
//! page can sign in without a storefront login. Outside development mode the route answers
//! `404 not_found`, exactly as a path that does not exist.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, post, web};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    domain::UserId,
    http::{
        Ctx,
        problem::ApiError,
        shop::{parse_json, read_body},
    },
};

/// How long a development JWT is valid.
pub const DEV_JWT_TTL: Duration = Duration::from_secs(3600);

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(dev_token);
}

/// Whom to sign in as.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevTokenRequest {
    /// A positive 64-bit user id.
    #[schema(value_type = i64, minimum = 1)]
    pub user_id: serde_json::Number,
}

/// The user id of a request: a positive integer, also when written as `7.0` (JSON Schema's
/// `integer` takes it, so the OpenAPI document promises it).
fn user_of(n: &serde_json::Number) -> Option<UserId> {
    let id = match n.as_i64() {
        Some(id) => id,
        None => {
            let f = n.as_f64()?;
            if f.fract() != 0.0 || !(1.0..=9_007_199_254_740_992.0).contains(&f) {
                return None;
            }
            f as i64
        }
    };
    UserId::try_from(id).ok()
}

/// A shopper's JWT, as the storefront's own login would issue.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DevToken {
    pub token: String,
    /// Seconds the JWT is valid.
    pub expires_in: u64,
}

/// Development mode only: a shopper's JWT for `user_id` (what `seckill dev-token` prints).
#[utoipa::path(
    request_body = DevTokenRequest,
    responses(
        (status = 200, description = "OK (development mode only)", body = DevToken),
        (status = 400, description = "`bad_request`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: not in development mode", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 408, description = "`body_timeout`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (per IP)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    tag = "shoppers"
)]
#[post("/api/v1/dev/token")]
pub async fn dev_token(
    ctx: web::Data<Ctx>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let settings = &ctx.deps.settings;
    if !settings.dev {
        return Err(ApiError::NotFound);
    }
    let body = read_body(&req, payload).await?;
    let body: DevTokenRequest = parse_json(&body)?;
    let user = user_of(&body.user_id)
        .ok_or_else(|| ApiError::BadRequest("user_id must be a positive integer".into()))?;
    let token =
        crate::auth::dev_user_jwt(settings, user, DEV_JWT_TTL).ok_or(ApiError::NotFound)??;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(DevToken {
            token,
            expires_in: DEV_JWT_TTL.as_secs(),
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_id_is_a_positive_integer_however_it_is_written() {
        let parse = |json: &str| user_of(&serde_json::from_str(json).unwrap()).map(|u| u.get());
        assert_eq!(parse("42"), Some(42));
        assert_eq!(parse("7690.0"), Some(7690));
        assert_eq!(parse("9223372036854775807"), Some(i64::MAX));
        for refused in ["0", "-3", "1.5", "-1.0", "1e300", "18446744073709551615"] {
            assert_eq!(parse(refused), None, "{refused}");
        }
    }
}
