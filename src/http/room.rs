//! The shoppers' side of a waiting room (`src/room.rs`): joining, and where one stands — with
//! the admission token once it is one's turn.

use actix_web::{HttpRequest, HttpResponse, get, http::header, post, web};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{
    domain::ProductId,
    http::{
        Ctx,
        extract::{AuthUser, product_id},
        problem::ApiError,
    },
    products::ProductInfo,
    room::{Joined, Place, draw_key},
};
use serde::Deserialize;
use std::{sync::Arc, time::Duration};

/// How long a proof-of-work challenge may be solved and used.
const CHALLENGE_TTL: Duration = Duration::from_secs(120);

/// A proof-of-work challenge: find a `solution` such that SHA-256 of
/// `"<challenge>:<solution>"` starts with `difficulty` zero bits.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProofChallenge {
    pub challenge: String,
    /// Leading zero bits asked (about 2^difficulty hashes).
    pub difficulty: u32,
    pub expires_at: DateTime<Utc>,
}

/// What a join takes: nothing, or for a room with proof of work the solved challenge.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub challenge: Option<String>,
    pub solution: Option<String>,
}

/// Where a shopper stands in a product's waiting room.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomView {
    /// `awaiting_draw` (joined before the start: the place is drawn at the start),
    /// `waiting` (in line), `admitted` (buy now: `admission_token` is for
    /// `POST …/token`), `sold_out` (nothing left for anyone still waiting; units that come back
    /// admit more), or `turn_passed` (admitted before; that admission was used or ran out).
    #[schema(pattern = "^(awaiting_draw|waiting|admitted|sold_out|turn_passed)$")]
    pub state: String,
    /// The shopper's place in line, 1 first (none before the draw).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub place: Option<i64>,
    /// Shoppers ahead who are not admitted yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ahead: Option<i64>,
    /// Seconds until this place is likely admitted, at the room's admission rate (more when
    /// admission waits for units to come back).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_wait_secs: Option<i64>,
    /// Shoppers in the room.
    pub in_room: i64,
    /// Every place up to this one was admitted.
    pub admitted_through: i64,
    /// With `admitted`: sent as `{"admission_token": …}` to `POST …/token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admitted_until: Option<DateTime<Utc>>,
}

/// The product, if it has a waiting room whose sale has not ended.
async fn room_product(ctx: &Ctx, id: ProductId) -> Result<Arc<ProductInfo>, ApiError> {
    let product = ctx
        .products
        .get(&ctx.deps.db, id)
        .await?
        .ok_or(ApiError::ProductNotFound)?;
    if !product.waiting_room {
        return Err(ApiError::NoWaitingRoom);
    }
    if Utc::now() >= product.ends_at {
        return Err(ApiError::Ended);
    }
    Ok(product)
}

/// A proof-of-work challenge for joining the product's waiting room (its difficulty follows
/// the room's join rate).
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = ProofChallenge),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found` or `no_waiting_room`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 410, description = "`ended`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "shoppers"
)]
#[post("/api/v1/products/{id}/room/challenge")]
pub async fn room_challenge(
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    room_product(&ctx, id).await?;
    let difficulty = ctx.rooms.difficulty(id);
    let issued = ctx
        .auth
        .issue_challenge(user.0, id, difficulty, CHALLENGE_TTL)?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "private, no-store"))
        .json(ProofChallenge {
            challenge: issued.token,
            difficulty,
            expires_at: issued.expires_at,
        }))
}

/// Joins the product's waiting room (once: joining again answers the same place). With proof
/// of work, the body is a challenge of `POST …/room/challenge` and its solution.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    request_body(content = Option<JoinRequest>, description = "Only for a room with proof of work", content_type = "application/json"),
    responses(
        (status = 400, description = "`bad_request`: a body that is not that JSON", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`proof_required` or `invalid_proof` (wrong, expired, used before, another shopper's)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 200, description = "In the room: `awaiting_draw` before the start, else the place", body = RoomView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found` or `no_waiting_room`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 410, description = "`ended`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 425, description = "`room_not_open`: joins open `SECKILL_ROOM_OPENS_SECS` before the start", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "shoppers"
)]
#[post("/api/v1/products/{id}/room")]
pub async fn join_room(
    req: HttpRequest,
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let proof: JoinRequest = crate::http::shop::read_optional_json(&req, payload).await?;
    let product = room_product(&ctx, id).await?;
    if product.proof_of_work {
        let (Some(challenge), Some(solution)) = (proof.challenge, proof.solution) else {
            return Err(ApiError::ProofRequired);
        };
        let c = ctx
            .auth
            .check_challenge(&challenge, user.0, id)
            .filter(|c| crate::pow::solves(&challenge, &solution, c.bits))
            .ok_or(ApiError::InvalidProof)?;
        if !ctx.rooms.use_challenge(id, &c.nonce, c.exp).await? {
            return Err(ApiError::InvalidProof);
        }
    }
    match ctx
        .rooms
        .join(id, user.0, product.starts_at, draw_key())
        .await?
    {
        Joined::NotOpen => Err(ApiError::RoomNotOpen),
        Joined::AwaitingDraw { .. } | Joined::Placed(_) => standing(&ctx, user, id, &product).await,
    }
}

/// Where the caller stands in the product's waiting room; once it is their turn, with an
/// admission token.
#[utoipa::path(
    params(("id" = String, Path, description = "product id")),
    responses(
        (status = 200, description = "OK", body = RoomView),
        (status = 401, description = "`unauthorized`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`, `no_waiting_room` or `not_in_room`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 410, description = "`ended`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = [])),
    tag = "shoppers"
)]
#[get("/api/v1/products/{id}/room/me")]
pub async fn my_room(
    ctx: web::Data<Ctx>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let product = room_product(&ctx, id).await?;
    standing(&ctx, user, id, &product).await
}

async fn standing(
    ctx: &Ctx,
    user: AuthUser,
    id: ProductId,
    product: &ProductInfo,
) -> Result<HttpResponse, ApiError> {
    let s = ctx.rooms.standing(id, user.0, product.starts_at).await?;
    let place = match s.place {
        None => return Err(ApiError::NotInRoom),
        Some(Place::AwaitingDraw) => None,
        Some(Place::At(p)) => Some(p),
    };
    let mut view = RoomView {
        state: "awaiting_draw".into(),
        place,
        ahead: None,
        estimated_wait_secs: None,
        in_room: s.total,
        admitted_through: s.admitted,
        admission_token: None,
        admitted_until: None,
    };
    if let Some(place) = place {
        let now_ms = Utc::now().timestamp_millis();
        if let Some(until) = s.admitted_until.filter(|u| *u > now_ms) {
            let ttl = std::time::Duration::from_millis(u64::try_from(until - now_ms).unwrap_or(0));
            let issued = ctx.auth.issue_admission_token(user.0, id, ttl)?;
            view.state = "admitted".into();
            view.admission_token = Some(issued.token);
            view.admitted_until = DateTime::from_timestamp_millis(until);
        } else if place <= s.admitted {
            view.state = "turn_passed".into();
        } else if s.remaining == Some(0) {
            view.state = "sold_out".into();
        } else {
            let ahead = place - s.admitted - 1;
            view.state = "waiting".into();
            view.ahead = Some(ahead);
            let rate = i64::try_from(ctx.rooms.settings.rate)
                .unwrap_or(i64::MAX)
                .max(1);
            view.estimated_wait_secs = Some((ahead + rate - 1) / rate);
        }
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "private, no-store"))
        .json(view))
}
