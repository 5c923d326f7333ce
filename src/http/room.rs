//! The shoppers' side of a waiting room (`src/room.rs`): joining, and where one stands — with
//! the admission token once it is one's turn.

use actix_web::{HttpRequest, HttpResponse, get, http::header, post, web};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{
    domain::{ProductId, UserId},
    http::{
        Ctx,
        extract::{AuthUser, product_id},
        problem::ApiError,
        shop::{
            KEEP_ALIVE, ReservationEvent, StreamQuery, lifetime_frame, open_stream, status_frame,
            stream_user,
        },
    },
    products::ProductInfo,
    room::{Joined, Place, Standing, draw_key},
    sse::SseStream,
};
use actix_web::web::Bytes;
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
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

/// The caller's view: where they stand (from this process's copy of the room when it knows),
/// with an admission token once it is their turn.
async fn standing(
    ctx: &Ctx,
    user: AuthUser,
    id: ProductId,
    product: &ProductInfo,
) -> Result<HttpResponse, ApiError> {
    let s = ctx.rooms.standing(id, user.0, product.starts_at).await?;
    let mut view = room_view(ctx, &s)?;
    with_token(ctx, user.0, id, &mut view)?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "private, no-store"))
        .json(view))
}

/// A standing as the shopper sees it (without the admission token: [`with_token`]).
fn room_view(ctx: &Ctx, s: &Standing) -> Result<RoomView, ApiError> {
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
            view.state = "admitted".into();
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
    Ok(view)
}

/// An admitted view gets its admission token (valid until the admission ends).
fn with_token(ctx: &Ctx, user: UserId, id: ProductId, view: &mut RoomView) -> Result<(), ApiError> {
    let Some(until) = view.admitted_until.filter(|_| view.state == "admitted") else {
        return Ok(());
    };
    let ttl = (until - Utc::now()).to_std().unwrap_or_default();
    view.admission_token = Some(ctx.auth.issue_admission_token(user, id, ttl)?.token);
    Ok(())
}

/// Position updates a room stream sends at most this often; a change of state goes at once.
const POSITION_EVERY: Duration = Duration::from_secs(1);

struct RoomStream {
    ctx: web::Data<Ctx>,
    user: UserId,
    id: ProductId,
    product: Arc<ProductInfo>,
    /// Counted against the event-stream caps until dropped.
    _stream: SseStream,
    passes: tokio::sync::watch::Receiver<u64>,
    heartbeat: tokio::time::Interval,
    ends_at: tokio::time::Instant,
    /// The last view sent (without its token), and when.
    last: Option<RoomView>,
    sent_at: tokio::time::Instant,
    /// A position update held back by [`POSITION_EVERY`].
    held: Option<RoomView>,
    first: Option<RoomView>,
    done: bool,
}

impl RoomStream {
    fn frame(&mut self, view: RoomView) -> Result<Bytes, actix_web::Error> {
        let mut shown = view.clone();
        with_token(&self.ctx, self.user, self.id, &mut shown)?;
        self.done = view.state == "turn_passed";
        self.last = Some(view);
        self.held = None;
        self.sent_at = tokio::time::Instant::now();
        let json =
            serde_json::to_string(&shown).map_err(actix_web::error::ErrorInternalServerError)?;
        Ok(status_frame(&json))
    }

    /// Where the shopper stands now, if it changed: at once for a new state, else held back
    /// until [`POSITION_EVERY`] after the last frame.
    async fn reread(&mut self) -> Option<RoomView> {
        let s = self
            .ctx
            .rooms
            .standing(self.id, self.user, self.product.starts_at)
            .await
            .ok()?;
        let view = room_view(&self.ctx, &s).ok()?;
        let last = self.last.as_ref()?;
        if view == *last {
            self.held = None;
            return None;
        }
        if view.state != last.state || self.sent_at.elapsed() >= POSITION_EVERY {
            return Some(view);
        }
        self.held = Some(view);
        None
    }
}

async fn next_room_frame(
    mut st: RoomStream,
) -> Option<(Result<Bytes, actix_web::Error>, RoomStream)> {
    if st.done {
        return None;
    }
    if let Some(view) = st.first.take() {
        let frame = st.frame(view);
        return Some((frame, st));
    }
    loop {
        let release = st.sent_at + POSITION_EVERY;
        let turn_ends = st
            .last
            .as_ref()
            .and_then(|v| v.admitted_until.filter(|_| v.state == "admitted"))
            .map(|until| (until - Utc::now()).to_std().unwrap_or_default())
            .map(|left| tokio::time::Instant::now() + left + Duration::from_millis(10));
        tokio::select! {
            biased;
            _ = st.ctx.deps.drain.closing() => {
                st.done = true;
                let retry_ms = fastrand::u64(crate::drain::CLOSE_RETRY_MS);
                return Some((Ok(Bytes::from(crate::drain::close_frame(retry_ms))), st));
            }
            _ = tokio::time::sleep_until(st.ends_at) => {
                st.done = true;
                return Some((Ok(lifetime_frame()), st));
            }
            changed = st.passes.changed() => {
                if changed.is_err() {
                    // The room closed in this process (the sale ended).
                    st.done = true;
                    return Some((Ok(lifetime_frame()), st));
                }
                if let Some(view) = st.reread().await {
                    let frame = st.frame(view);
                    return Some((frame, st));
                }
            }
            // An admission ends by the clock, not by a pass: look again then.
            _ = tokio::time::sleep_until(turn_ends.unwrap_or(release)), if turn_ends.is_some() => {
                if let Some(view) = st.reread().await {
                    let frame = st.frame(view);
                    return Some((frame, st));
                }
            }
            _ = tokio::time::sleep_until(release), if st.held.is_some() => {
                if let Some(view) = st.held.take() {
                    let frame = st.frame(view);
                    return Some((frame, st));
                }
            }
            _ = st.heartbeat.tick() => {
                return Some((Ok(Bytes::from_static(KEEP_ALIVE)), st));
            }
        }
    }
}

/// Where the caller stands in the product's waiting room, as Server-Sent Events: a `status`
/// event now (data: a RoomView), then at every change of state at once (admitted — with its
/// admission token —, sold out, turn passed) and of position at most once a second. The
/// process's admission pass wakes the room's streams when the room changed: no Redis call per
/// stream. It ends after `turn_passed`, after `SECKILL_SSE_LIFETIME_SECS` (a `retry:` hint),
/// when the sale ends, or with a `close` event when the server shuts down; keep-alive comments
/// every `SECKILL_SSE_HEARTBEAT_SECS`.
#[utoipa::path(
    params(("id" = String, Path, description = "product id"), StreamQuery),
    responses(
        (status = 200, description = "`text/event-stream` of `status` events whose data is a RoomView; when the server shuts down, a last `close` event with a `retry:` hint", content_type = "text/event-stream", body = ReservationEvent),
        (status = 400, description = "`bad_request`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized` (also an expired stream token, another product's, or a JWT in `?token=`)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`product_not_found`, `no_waiting_room` or `not_in_room`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 410, description = "`ended`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`too_many_streams`: this shopper holds `SECKILL_SSE_PER_USER` streams already (or `rate_limited` per IP)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`streams_exhausted` (with `Retry-After`) or `unavailable`", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("user_jwt" = []), ("stream_token" = [])),
    tag = "shoppers"
)]
#[get("/api/v1/products/{id}/room/events")]
pub async fn my_room_events(
    ctx: web::Data<Ctx>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = product_id(&path)?;
    let user = stream_user(&ctx, &req, id, query.token.as_deref()).await?;
    let product = room_product(&ctx, id).await?;
    // Opened and subscribed before the first read, so no pass between the two is missed.
    let opened = open_stream(&ctx, id, user)?;
    let passes = ctx.rooms.subscribe(id);
    let s = ctx.rooms.standing(id, user, product.starts_at).await?;
    let first = room_view(&ctx, &s)?;
    let until_end = (product.ends_at - Utc::now()).to_std().unwrap_or_default();
    let ends_at = opened.ends_at.min(tokio::time::Instant::now() + until_end);
    let state = RoomStream {
        ctx,
        user,
        id,
        product,
        _stream: opened.stream,
        passes,
        heartbeat: opened.heartbeat,
        ends_at,
        last: None,
        sent_at: tokio::time::Instant::now(),
        held: None,
        first: Some(first),
        done: false,
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "private, no-store"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(futures_util::stream::unfold(state, next_room_frame)))
}
