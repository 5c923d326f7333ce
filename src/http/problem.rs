//! Every error a client sees: `application/problem+json` with a stable `code`, mapped in one place.

use actix_web::{
    HttpResponse, ResponseError,
    http::{StatusCode, header},
};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`urn:seckill:problem:<code>`).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// For `already_reserved`: the reservation the shopper already holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<Uuid>,
    /// For `unavailable` from `/readyz`: which dependency is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<serde_json::Value>,
}

/// Errors of the HTTP API, one variant per outcome a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the purchase token is invalid, expired, or not for this user and product")]
    InvalidToken,
    #[error("no such product")]
    ProductNotFound,
    #[error("no such order")]
    OrderNotFound,
    #[error("you have no reservation for this product")]
    NoReservation,
    #[error("no such resource")]
    NotFound,
    #[error("you already hold a reservation for this product")]
    AlreadyReserved(Uuid),
    #[error("the sale is already live; pass force to rebuild")]
    AlreadyLive,
    #[error("the order is {0} and can no longer change")]
    OrderClosed(String),
    #[error("sold out")]
    SoldOut,
    #[error("the sale has ended")]
    Ended,
    #[error("the sale has not started yet")]
    NotStarted,
    #[error("too many attempts; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("reservations are paused while the product is rebuilt; retry shortly")]
    Paused,
    #[error("the service is temporarily unavailable")]
    Unavailable,
    #[error("a dependency is not reachable: {failing}")]
    NotReady {
        failing: String,
        checks: serde_json::Value,
    },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error")]
    Unexpected(#[from] anyhow::Error),
}

impl ApiError {
    /// The stable `code` clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::InvalidToken => "invalid_token",
            ApiError::ProductNotFound => "product_not_found",
            ApiError::OrderNotFound => "order_not_found",
            ApiError::NoReservation => "no_reservation",
            ApiError::NotFound => "not_found",
            ApiError::AlreadyReserved(_) => "already_reserved",
            ApiError::AlreadyLive => "already_live",
            ApiError::OrderClosed(_) => "order_closed",
            ApiError::SoldOut => "sold_out",
            ApiError::Ended => "ended",
            ApiError::NotStarted => "not_started",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Paused => "paused",
            ApiError::Unavailable | ApiError::NotReady { .. } => "unavailable",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Unexpected(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "Bad request",
            ApiError::PayloadTooLarge(_) => "Payload too large",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::InvalidToken => "Invalid purchase token",
            ApiError::ProductNotFound => "Product not found",
            ApiError::OrderNotFound => "Order not found",
            ApiError::NoReservation => "No reservation",
            ApiError::NotFound => "Not found",
            ApiError::AlreadyReserved(_) => "Already reserved",
            ApiError::AlreadyLive => "Sale already live",
            ApiError::OrderClosed(_) => "Order closed",
            ApiError::SoldOut => "Sold out",
            ApiError::Ended => "Sale ended",
            ApiError::NotStarted => "Sale not started",
            ApiError::RateLimited { .. } => "Rate limited",
            ApiError::Paused => "Paused",
            ApiError::Unavailable | ApiError::NotReady { .. } => "Service unavailable",
            ApiError::MethodNotAllowed => "Method not allowed",
            ApiError::Unexpected(_) => "Internal error",
        }
    }

    /// The problem document for this error (nothing internal in it).
    pub fn problem(&self) -> Problem {
        let code = self.code();
        Problem {
            kind: format!("urn:seckill:problem:{code}"),
            title: self.title().to_owned(),
            status: self.status_code().as_u16(),
            detail: self.to_string(),
            code,
            reservation_id: match self {
                ApiError::AlreadyReserved(id) => Some(*id),
                _ => None,
            },
            checks: match self {
                ApiError::NotReady { checks, .. } => Some(checks.clone()),
                _ => None,
            },
        }
    }
}

/// Redis did not answer: logged here, `503 unavailable` to the client (one place for both).
impl From<crate::reservations::Unavailable> for ApiError {
    fn from(e: crate::reservations::Unavailable) -> Self {
        tracing::warn!(error = %e, "Redis unavailable");
        ApiError::Unavailable
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::InvalidToken => StatusCode::FORBIDDEN,
            ApiError::ProductNotFound
            | ApiError::OrderNotFound
            | ApiError::NoReservation
            | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::AlreadyReserved(_) | ApiError::AlreadyLive | ApiError::OrderClosed(_) => {
                StatusCode::CONFLICT
            }
            ApiError::SoldOut | ApiError::Ended => StatusCode::GONE,
            ApiError::NotStarted => StatusCode::from_u16(425).unwrap_or(StatusCode::BAD_REQUEST),
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Paused | ApiError::Unavailable | ApiError::NotReady { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Unexpected(e) = self {
            tracing::error!(error = ?e, "request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        response.content_type("application/problem+json");
        match self {
            ApiError::RateLimited { retry_after_secs } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::Paused | ApiError::Unavailable => {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            ApiError::Unauthorized => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            _ => {}
        }
        response.json(self.problem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unexpected_errors_leak_nothing() {
        let e = ApiError::Unexpected(anyhow::anyhow!("password=hunter2 at db.internal"));
        let p = e.problem();
        assert_eq!(p.status, 500);
        assert!(!p.detail.contains("hunter2"));
    }

    #[test]
    fn already_reserved_carries_the_earlier_reservation() {
        let id = Uuid::now_v7();
        let p = ApiError::AlreadyReserved(id).problem();
        assert_eq!(
            (p.status, p.code, p.reservation_id),
            (409, "already_reserved", Some(id))
        );
    }
}
