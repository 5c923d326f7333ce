//! Every error a client sees: `application/problem+json` with a stable `code`, mapped in one place.

use actix_web::{
    HttpResponse, ResponseError,
    http::{StatusCode, header},
};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use sea_orm::DbErr;

use crate::{
    orders::{OrderError, OrderStatus},
    products::PreheatError,
    purchase::Refusal,
    reservations::Unavailable,
};

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
    /// For `order_closed`: the order's status (`cancelled`/`expired`: refund the payment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_status: Option<OrderStatus>,
    /// For `amount_mismatch`: the order's price, the amount a payment must have.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_cents: Option<i64>,
}

/// Errors of the HTTP API, one variant per outcome a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The body did not arrive whole within `SECKILL_BODY_TIMEOUT_MS` of the request's head.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("missing or invalid credentials")]
    Unauthorized,
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
    #[error("this product has no waiting room")]
    NoWaitingRoom,
    #[error("the waiting room does not take joins yet")]
    RoomNotOpen,
    #[error("you have not joined this product's waiting room")]
    NotInRoom,
    #[error(
        "this product's sale has a waiting room: join it, and ask for a purchase token with the admission token it gives you when your turn comes"
    )]
    NotAdmitted,
    #[error(
        "joining this waiting room takes a proof of work: ask POST …/room/challenge, solve it, and join with {{\"challenge\", \"solution\"}}"
    )]
    ProofRequired,
    #[error(
        "the proof of work is wrong, expired, used before, or not this shopper's for this product"
    )]
    InvalidProof,
    #[error("you already hold a reservation for this product")]
    AlreadyReserved(Uuid),
    #[error("the sale is already live; pass force to rebuild")]
    AlreadyLive,
    #[error("the order is {0} and can no longer change")]
    OrderClosed(OrderStatus),
    #[error("the payment's amount must be the order's price, {price_cents} cents")]
    AmountMismatch { price_cents: i64 },
    #[error(
        "the order is already paid under another payment reference, or this reference paid another order"
    )]
    PaymentConflict,
    #[error("sold out")]
    SoldOut,
    #[error("the sale has ended")]
    Ended,
    #[error("the sale has not started yet")]
    NotStarted,
    #[error("too many attempts; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("you already hold {0} open event streams; close one first")]
    TooManyStreams(usize),
    #[error("this server holds as many event streams as it may; retry shortly")]
    StreamsExhausted,
    /// This client address holds `SECKILL_MAX_CONNECTIONS_PER_IP` connections already.
    #[error("too many open connections from your address; reuse one or close some")]
    TooManyConnections,
    /// The process holds `SECKILL_MAX_CONNECTIONS` connections already.
    #[error("the server holds as many connections as it takes; retry shortly")]
    AtCapacity,
    #[error("reservations are paused while the product is rebuilt; retry shortly")]
    Paused,
    #[error("the sale is being restored after a storage failure; retry shortly")]
    Recovering,
    /// Redis did not answer; the source is logged (with its cause chain), never sent.
    #[error("the service is temporarily unavailable")]
    Unavailable(#[source] Unavailable),
    /// Postgres did not answer (no connection, or the connection broke), or Redis did not
    /// answer a load shared by several requests.
    #[error("the service is temporarily unavailable")]
    DatabaseUnavailable(#[source] anyhow::Error),
    /// The request could not finish in time: a dependency stopped answering.
    #[error("the service is temporarily unavailable")]
    TimedOut,
    /// The process is shutting down (`/readyz` only: every other request is still served).
    #[error("this process is shutting down; send requests to another")]
    Draining,
    #[error("a dependency is not reachable: {failing}")]
    NotReady {
        failing: String,
        checks: serde_json::Value,
    },
    #[error("this path does not take that method (it takes {allow})")]
    MethodNotAllowed { allow: String },
    #[error("internal error")]
    Unexpected(anyhow::Error),
}

/// A request body we could not take, worded once for every route that reads one.
impl ApiError {
    pub fn not_json_content_type() -> Self {
        ApiError::BadRequest("expected Content-Type: application/json".into())
    }

    pub fn unreadable_body() -> Self {
        ApiError::BadRequest("could not read the request body".into())
    }

    pub fn invalid_json(why: impl std::fmt::Display) -> Self {
        ApiError::BadRequest(format!("invalid JSON body: {why}"))
    }
}

impl ApiError {
    /// The HTTP status, the stable `code` clients match on, and the problem's title: the one
    /// place an error's outward shape is decided.
    fn shape(&self) -> (StatusCode, &'static str, &'static str) {
        use StatusCode as S;
        match self {
            ApiError::BadRequest(_) => (S::BAD_REQUEST, "bad_request", "Bad request"),
            ApiError::PayloadTooLarge(_) => (
                S::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
            ),
            ApiError::BodyTimeout => (S::REQUEST_TIMEOUT, "body_timeout", "Request body timeout"),
            ApiError::Unauthorized => (S::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::InvalidToken => (S::FORBIDDEN, "invalid_token", "Invalid purchase token"),
            ApiError::ProductNotFound => (S::NOT_FOUND, "product_not_found", "Product not found"),
            ApiError::OrderNotFound => (S::NOT_FOUND, "order_not_found", "Order not found"),
            ApiError::NoReservation => (S::NOT_FOUND, "no_reservation", "No reservation"),
            ApiError::NotFound => (S::NOT_FOUND, "not_found", "Not found"),
            ApiError::NoWaitingRoom => (S::NOT_FOUND, "no_waiting_room", "No waiting room"),
            ApiError::RoomNotOpen => (too_early(), "room_not_open", "Waiting room not open"),
            ApiError::NotInRoom => (S::NOT_FOUND, "not_in_room", "Not in the waiting room"),
            ApiError::NotAdmitted => (S::FORBIDDEN, "not_admitted", "Not admitted"),
            ApiError::ProofRequired => (S::FORBIDDEN, "proof_required", "Proof of work required"),
            ApiError::InvalidProof => (S::FORBIDDEN, "invalid_proof", "Invalid proof of work"),
            ApiError::AlreadyReserved(_) => (S::CONFLICT, "already_reserved", "Already reserved"),
            ApiError::AlreadyLive => (S::CONFLICT, "already_live", "Sale already live"),
            ApiError::OrderClosed(_) => (S::CONFLICT, "order_closed", "Order closed"),
            ApiError::AmountMismatch { .. } => (S::CONFLICT, "amount_mismatch", "Amount mismatch"),
            ApiError::PaymentConflict => (S::CONFLICT, "payment_conflict", "Payment conflict"),
            ApiError::SoldOut => (S::GONE, "sold_out", "Sold out"),
            ApiError::Ended => (S::GONE, "ended", "Sale ended"),
            ApiError::NotStarted => (too_early(), "not_started", "Sale not started"),
            ApiError::RateLimited { .. } => (S::TOO_MANY_REQUESTS, "rate_limited", "Rate limited"),
            ApiError::TooManyStreams(_) => (
                S::TOO_MANY_REQUESTS,
                "too_many_streams",
                "Too many event streams",
            ),
            ApiError::StreamsExhausted => (
                S::SERVICE_UNAVAILABLE,
                "streams_exhausted",
                "No event stream available",
            ),
            ApiError::TooManyConnections => (
                S::TOO_MANY_REQUESTS,
                "too_many_connections",
                "Too many connections",
            ),
            ApiError::AtCapacity => (S::SERVICE_UNAVAILABLE, "at_capacity", "At capacity"),
            ApiError::Paused => (S::SERVICE_UNAVAILABLE, "paused", "Paused"),
            ApiError::Draining => (S::SERVICE_UNAVAILABLE, "draining", "Shutting down"),
            ApiError::Recovering => (S::SERVICE_UNAVAILABLE, "recovering", "Recovering"),
            ApiError::Unavailable(_)
            | ApiError::DatabaseUnavailable(_)
            | ApiError::TimedOut
            | ApiError::NotReady { .. } => {
                (S::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable")
            }
            ApiError::MethodNotAllowed { .. } => (
                S::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
            ),
            ApiError::Unexpected(_) => (S::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }

    /// The stable `code` clients match on.
    pub fn code(&self) -> &'static str {
        self.shape().1
    }

    /// The problem document for this error (nothing internal in it).
    pub fn problem(&self) -> Problem {
        let (status, code, title) = self.shape();
        Problem {
            kind: format!("urn:seckill:problem:{code}"),
            title: title.to_owned(),
            status: status.as_u16(),
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
            order_status: match self {
                ApiError::OrderClosed(status) => Some(*status),
                _ => None,
            },
            price_cents: match self {
                ApiError::AmountMismatch { price_cents } => Some(*price_cents),
                _ => None,
            },
        }
    }
}

/// When to try again for an event stream on a server that holds as many as it may (streams
/// end by themselves within `SECKILL_SSE_LIFETIME_SECS`, so slots free up steadily).
const STREAMS_RETRY_AFTER_SECS: u64 = 5;

/// `425 Too Early` (not among actix's named codes).
fn too_early() -> StatusCode {
    StatusCode::from_u16(425).unwrap_or(StatusCode::BAD_REQUEST)
}

/// The error with its whole cause chain, for logs.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// Whether a Postgres error means "not reachable now" (answer `503`) rather than a bug.
fn database_unreachable(e: &DbErr) -> bool {
    use sea_orm::{RuntimeErr, sqlx::Error as Sqlx};
    match e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match &**e {
                Sqlx::Io(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::WorkerCrashed => true,
                Sqlx::Database(db) => db.code().is_some_and(|c| unavailable_sqlstate(&c)),
                _ => false,
            }
        }
        _ => false,
    }
}

/// SQLSTATEs of a Postgres going away, not of a bad request: class 08 (connection exception)
/// and 57P01–57P03 (shut down by its operator or a crash, or not accepting connections yet).
/// Found by `scripts/chaos` (seed 21): a Postgres stopped with `-m fast` ends the open
/// sessions with 57P01, which was answered `500 internal` instead of `503 unavailable`.
fn unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

/// Anything unforeseen is a `500` — except Postgres being unreachable, or Redis not answering
/// (in a load shared through `cache::TtlCache`), which are a `503`.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        let unreachable = e.chain().any(|c| {
            c.downcast_ref::<DbErr>().is_some_and(database_unreachable) || c.is::<Unavailable>()
        });
        if unreachable {
            ApiError::DatabaseUnavailable(e)
        } else {
            ApiError::Unexpected(e)
        }
    }
}

impl From<Unavailable> for ApiError {
    fn from(e: Unavailable) -> Self {
        ApiError::Unavailable(e)
    }
}

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        match e {
            OrderError::NotFound => ApiError::OrderNotFound,
            OrderError::Closed(status) => ApiError::OrderClosed(status),
            OrderError::AmountMismatch { price_cents } => ApiError::AmountMismatch { price_cents },
            OrderError::PaymentConflict => ApiError::PaymentConflict,
            OrderError::Unexpected(e) => e.into(),
        }
    }
}

impl From<PreheatError> for ApiError {
    fn from(e: PreheatError) -> Self {
        match e {
            PreheatError::NotFound => ApiError::ProductNotFound,
            PreheatError::AlreadyLive => ApiError::AlreadyLive,
            PreheatError::Recovering => ApiError::Recovering,
            PreheatError::Busy => ApiError::Paused,
            PreheatError::Unavailable(e) => ApiError::Unavailable(e),
            PreheatError::Unexpected(e) => e.into(),
        }
    }
}

impl From<Refusal<ApiError>> for ApiError {
    fn from(e: Refusal<ApiError>) -> Self {
        match e {
            Refusal::Body(e) => e,
            Refusal::ProductNotFound => ApiError::ProductNotFound,
            Refusal::BadBody(why) => ApiError::invalid_json(why),
            Refusal::InvalidToken => ApiError::InvalidToken,
            Refusal::Ended => ApiError::Ended,
            Refusal::Recovering => ApiError::Recovering,
            Refusal::Unavailable(e) => ApiError::Unavailable(e),
            Refusal::Unexpected(e) => e.into(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.shape().0
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Unexpected(e) => tracing::error!(error = %format!("{e:#}"), "request failed"),
            ApiError::Unavailable(e) => tracing::warn!(error = %chain(e), "Redis unavailable"),
            ApiError::DatabaseUnavailable(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Postgres unavailable")
            }
            _ => {}
        }
        let mut response = HttpResponse::build(self.status_code());
        response.content_type("application/problem+json");
        match self {
            ApiError::RateLimited { retry_after_secs } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::StreamsExhausted => {
                response.insert_header((header::RETRY_AFTER, STREAMS_RETRY_AFTER_SECS.to_string()));
            }
            ApiError::Paused
            | ApiError::Recovering
            | ApiError::Unavailable(_)
            | ApiError::DatabaseUnavailable(_)
            | ApiError::TimedOut => {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            // The connection itself is the problem: answer, then close it.
            ApiError::TooManyConnections | ApiError::AtCapacity => {
                response.insert_header((header::RETRY_AFTER, "1"));
                response.force_close();
            }
            ApiError::BodyTimeout => {
                response.force_close();
            }
            ApiError::Unauthorized => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                response.insert_header((header::ALLOW, allow.as_str()));
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
    fn a_postgres_going_away_is_unavailable_not_internal() {
        for code in ["57P01", "57P02", "57P03", "08006", "08003", "08000"] {
            assert!(unavailable_sqlstate(code), "{code}");
        }
        // A statement Postgres refused is a bug or bad data, not an outage.
        for code in ["23505", "22P02", "42P01", "40001", "57014"] {
            assert!(!unavailable_sqlstate(code), "{code}");
        }
    }

    /// One value of every variant. The match fails to compile when a variant is added, so
    /// whoever adds one is sent here, and the documentation test below sees it.
    fn one_of_each() -> Vec<ApiError> {
        let all = vec![
            ApiError::BadRequest("x".into()),
            ApiError::PayloadTooLarge(16),
            ApiError::BodyTimeout,
            ApiError::Unauthorized,
            ApiError::InvalidToken,
            ApiError::ProductNotFound,
            ApiError::OrderNotFound,
            ApiError::NoReservation,
            ApiError::NotFound,
            ApiError::AlreadyReserved(Uuid::nil()),
            ApiError::AlreadyLive,
            ApiError::OrderClosed(OrderStatus::Paid),
            ApiError::AmountMismatch { price_cents: 100 },
            ApiError::PaymentConflict,
            ApiError::SoldOut,
            ApiError::Ended,
            ApiError::NotStarted,
            ApiError::RateLimited {
                retry_after_secs: 1,
            },
            ApiError::TooManyStreams(4),
            ApiError::StreamsExhausted,
            ApiError::TooManyConnections,
            ApiError::AtCapacity,
            ApiError::Paused,
            ApiError::Recovering,
            ApiError::Draining,
            ApiError::NoWaitingRoom,
            ApiError::RoomNotOpen,
            ApiError::NotInRoom,
            ApiError::NotAdmitted,
            ApiError::ProofRequired,
            ApiError::InvalidProof,
            ApiError::Unavailable(Unavailable::BadReply("x".into())),
            ApiError::DatabaseUnavailable(anyhow::anyhow!("x")),
            ApiError::TimedOut,
            ApiError::NotReady {
                failing: "redis".into(),
                checks: serde_json::Value::Null,
            },
            ApiError::MethodNotAllowed {
                allow: "GET".into(),
            },
            ApiError::Unexpected(anyhow::anyhow!("x")),
        ];
        for e in &all {
            match e {
                ApiError::BadRequest(_)
                | ApiError::PayloadTooLarge(_)
                | ApiError::BodyTimeout
                | ApiError::Unauthorized
                | ApiError::InvalidToken
                | ApiError::ProductNotFound
                | ApiError::OrderNotFound
                | ApiError::NoReservation
                | ApiError::NotFound
                | ApiError::NoWaitingRoom
                | ApiError::RoomNotOpen
                | ApiError::NotInRoom
                | ApiError::NotAdmitted
                | ApiError::ProofRequired
                | ApiError::InvalidProof
                | ApiError::AlreadyReserved(_)
                | ApiError::AlreadyLive
                | ApiError::OrderClosed(_)
                | ApiError::AmountMismatch { .. }
                | ApiError::PaymentConflict
                | ApiError::SoldOut
                | ApiError::Ended
                | ApiError::NotStarted
                | ApiError::RateLimited { .. }
                | ApiError::TooManyStreams(_)
                | ApiError::StreamsExhausted
                | ApiError::TooManyConnections
                | ApiError::AtCapacity
                | ApiError::Paused
                | ApiError::Recovering
                | ApiError::Draining
                | ApiError::Unavailable(_)
                | ApiError::DatabaseUnavailable(_)
                | ApiError::TimedOut
                | ApiError::NotReady { .. }
                | ApiError::MethodNotAllowed { .. }
                | ApiError::Unexpected(_) => {}
            }
        }
        all
    }

    /// docs/api.md is the contract clients code against: every `code` the service can answer
    /// has its row there, with the status it comes with.
    #[test]
    fn every_error_code_is_documented_with_its_status() {
        let doc = include_str!("../../docs/api.md");
        for e in one_of_each() {
            let (status, code, _) = e.shape();
            let row = format!("| `{code}` | {} |", status.as_u16());
            assert!(doc.contains(&row), "docs/api.md has no row starting {row}");
        }
    }

    #[test]
    fn draining_is_a_503_of_its_own() {
        let p = ApiError::Draining.problem();
        assert_eq!((p.status, p.code), (503, "draining"));
        assert!(p.checks.is_none());
    }

    #[test]
    fn unexpected_errors_leak_nothing() {
        let e = ApiError::Unexpected(anyhow::anyhow!("password=hunter2 at db.internal"));
        let p = e.problem();
        assert_eq!(p.status, 500);
        assert!(!p.detail.contains("hunter2"));
    }

    #[test]
    fn unavailable_keeps_its_cause_for_the_log_and_shows_none_of_it() {
        let e = ApiError::from(Unavailable::BadReply("reserve.lua answered code 99".into()));
        assert!(chain(&e).contains("code 99"), "{}", chain(&e));
        let p = e.problem();
        assert_eq!((p.status, p.code), (503, "unavailable"));
        assert!(!p.detail.contains("99"));
    }

    #[test]
    fn postgres_out_of_reach_is_503_and_other_database_errors_500() {
        let gone = anyhow::Error::from(DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout))
            .context("reading the product");
        assert_eq!(ApiError::from(gone).problem().status, 503);
        let bug = anyhow::Error::from(DbErr::RecordNotFound("x".into()));
        assert_eq!(ApiError::from(bug).problem().status, 500);
    }

    #[tokio::test]
    async fn an_error_shared_by_a_cached_load_keeps_its_status() {
        let cache: crate::cache::TtlCache<u8, u8> =
            crate::cache::TtlCache::new(4, std::time::Duration::from_secs(1));
        let status = |e: anyhow::Error| ApiError::from(e).problem().status;
        let gone = cache.get(1, || async {
            Err(
                anyhow::Error::from(DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout))
                    .context("reading the product"),
            )
        });
        assert_eq!(status(gone.await.unwrap_err()), 503);
        let redis = cache.get(2, || async {
            Err(anyhow::Error::from(Unavailable::BadReply("x".into())))
        });
        assert_eq!(status(redis.await.unwrap_err()), 503);
        let bug = cache.get(3, || async {
            Err(anyhow::Error::from(DbErr::RecordNotFound("x".into())))
        });
        assert_eq!(status(bug.await.unwrap_err()), 500);
    }

    #[test]
    fn an_order_closed_names_its_status() {
        let p = ApiError::from(OrderError::Closed(OrderStatus::Expired)).problem();
        assert_eq!((p.status, p.code), (409, "order_closed"));
        assert!(p.detail.contains("expired"), "{}", p.detail);
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
