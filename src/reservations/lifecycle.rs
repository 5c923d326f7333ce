//! Where a won reservation stands: its lifecycle, what the shopper sees of it, recording a new
//! status (`status.lua`, never backwards) and returning a closed order's unit (`release.lua`).

use chrono::{DateTime, Utc};
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Moment, Reservations, Unavailable, parse_uuid};
use crate::domain::{ProductId, UserId};

/// Statuses recorded per `status.lua` call.
const STATUS_CHUNK: usize = 500;

/// Where a won reservation stands. It never goes backwards: [`Status::rank`] orders the
/// lifecycle `pending → confirmed → paid | cancelled | expired`, or `pending → rejected` (a
/// win that could not become an order); the last four are final.
/// `lua/status.lua` keeps the same ranking (a unit test holds the two together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Won; the order is being persisted.
    Pending,
    /// Persisted as an order awaiting payment.
    Confirmed,
    Paid,
    Cancelled,
    Expired,
    /// The win could not become an order (only after Redis lost data); `reason` says why.
    Rejected,
}

impl Status {
    /// Position in the lifecycle: a status only ever moves to a higher rank.
    pub fn rank(self) -> u8 {
        match self {
            Status::Pending => 0,
            Status::Confirmed => 1,
            Status::Paid | Status::Cancelled | Status::Expired | Status::Rejected => 2,
        }
    }

    /// Whether no further change can come.
    pub fn is_terminal(self) -> bool {
        self.rank() == 2
    }

    /// Parses a bare status name (as Redis' status hash holds `pending`).
    pub fn parse(name: &str) -> Option<Self> {
        use serde::de::{IntoDeserializer, value::Error};
        Self::deserialize(IntoDeserializer::<Error>::into_deserializer(name)).ok()
    }
}

/// What a shopper sees of their reservation (also the JSON kept in Redis per reservation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReservationView {
    pub reservation_id: Uuid,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Why the reservation was `rejected`, in plain words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ReservationView {
    pub fn pending(reservation_id: Uuid) -> Self {
        Self {
            reservation_id,
            status: Status::Pending,
            order_id: None,
            expires_at: None,
            reason: None,
        }
    }

    /// A win that could not become an order, and why.
    pub fn rejected(reservation_id: Uuid, reason: impl Into<String>) -> Self {
        Self {
            reservation_id,
            status: Status::Rejected,
            order_id: None,
            expires_at: None,
            reason: Some(reason.into()),
        }
    }

    /// Whether no further change can come.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The JSON stored in Redis.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads Redis' value: a bare `pending` (written by `reserve.lua`) or the JSON above.
    pub fn from_redis(reservation_id: Uuid, raw: &str) -> Option<Self> {
        match Status::parse(raw) {
            Some(Status::Pending) => Some(Self::pending(reservation_id)),
            Some(_) => None,
            None => serde_json::from_str(raw).ok(),
        }
    }
}

/// Decodes `release.lua`'s answer `{code, remaining, epoch, rseq}`; an unknown code is an
/// error.
pub fn decode_release(
    (code, remaining, epoch, rseq): (i64, i64, i64, i64),
) -> Result<Released, Unavailable> {
    let at = Moment::new(epoch, rseq);
    match code {
        1 => Ok(Released::Returned { remaining, at }),
        0 => Ok(Released::AlreadyReturned { at }),
        -1 => Ok(Released::NotPreheated),
        other => Err(Unavailable::BadReply(format!(
            "release.lua answered code {other}"
        ))),
    }
}

/// What a release did. `at` is the state's epoch and *release sequence* (+1 per unit returned)
/// after it: recorded with the order, it is a moment Redis must not be found behind (a state
/// that forgot a returned unit is rebuilt by counting; see `behind.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The unit is back on sale.
    Returned { remaining: i64, at: Moment },
    /// This reservation's unit was returned before: nothing changed.
    AlreadyReturned { at: Moment },
    /// The product is not in Redis; the next preheat rebuilds remaining from Postgres.
    NotPreheated,
}

impl Released {
    /// The moment to record with the order (none when the product was not in Redis).
    pub fn at(&self) -> Option<Moment> {
        match *self {
            Self::Returned { at, .. } | Self::AlreadyReturned { at } => Some(at),
            Self::NotPreheated => None,
        }
    }
}

impl Reservations {
    /// Returns the unit of `reservation` to stock, exactly once; records `status_json`.
    #[tracing::instrument(skip_all, fields(%product, %reservation))]
    pub async fn release(
        &self,
        product: ProductId,
        reservation: Uuid,
        status_json: &str,
    ) -> Result<Released, Unavailable> {
        let k = self.keys.product(product);
        let reply: (i64, i64, i64, i64) = self
            .release
            .evalsha_with_reload(
                self.pool.next(),
                vec![k.state, k.released, k.status, k.pending],
                vec![
                    reservation.to_string(),
                    status_json.to_owned(),
                    product.to_string(),
                    self.keys.events(),
                ],
            )
            .await?;
        decode_release(reply)
    }

    /// Records a reservation's new status (never backwards) and tells its SSE streams.
    /// Returns whether it changed.
    pub async fn record_status(
        &self,
        product: ProductId,
        user: UserId,
        view: &ReservationView,
    ) -> Result<bool, Unavailable> {
        Ok(self.record_statuses(product, &[(user, view)]).await? == 1)
    }

    /// [`Self::record_status`] for many reservations of one product in one script call
    /// (chunked); returns how many changed.
    pub async fn record_statuses(
        &self,
        product: ProductId,
        updates: &[(UserId, &ReservationView)],
    ) -> Result<i64, Unavailable> {
        let k = self.keys.product(product);
        let mut changed = 0;
        for chunk in updates.chunks(STATUS_CHUNK) {
            let mut args = Vec::with_capacity(2 + chunk.len() * 5);
            args.push(self.keys.events());
            args.push(self.key_grace.as_millis().to_string());
            for (user, view) in chunk {
                args.push(view.reservation_id.to_string());
                args.push(view.to_json());
                args.push(view.status.rank().to_string());
                args.push(status_event(product, *user));
                args.push(user.to_string());
            }
            let n: i64 = self
                .status
                .evalsha_with_reload(
                    self.pool.next(),
                    vec![
                        k.status.clone(),
                        k.pending.clone(),
                        k.state.clone(),
                        k.buyers.clone(),
                    ],
                    args,
                )
                .await?;
            changed += n;
        }
        Ok(changed)
    }

    /// Tells the user's SSE streams to look again.
    pub async fn notify_status(&self, product: ProductId, user: UserId) -> Result<(), Unavailable> {
        let _: i64 = self
            .pool
            .next()
            .publish(self.keys.events(), status_event(product, user))
            .await?;
        Ok(())
    }

    /// The user's reservation id for `product`, if they won one.
    pub async fn reservation_of(
        &self,
        product: ProductId,
        user: UserId,
    ) -> Result<Option<Uuid>, Unavailable> {
        let id: Option<String> = self
            .pool
            .hget(self.keys.product(product).buyers, user.to_string())
            .await?;
        id.as_deref().map(parse_uuid).transpose()
    }

    /// The raw status of a reservation (`pending` or the order's JSON).
    pub async fn status_of(
        &self,
        product: ProductId,
        reservation: Uuid,
    ) -> Result<Option<String>, Unavailable> {
        Ok(self
            .pool
            .hget(self.keys.product(product).status, reservation.to_string())
            .await?)
    }
}

/// The pub/sub message announcing a status change of (product, user).
pub fn status_event(product: ProductId, user: UserId) -> String {
    format!("status:{product}:{user}")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::reservations::STATUS;

    #[test]
    fn every_release_code_decodes_and_an_unknown_one_is_an_error() {
        let at = Moment::new(2, 5);
        assert_eq!(
            decode_release((1, 7, 2, 5)).unwrap(),
            Released::Returned { remaining: 7, at }
        );
        assert_eq!(
            decode_release((0, 7, 2, 5)).unwrap(),
            Released::AlreadyReturned { at }
        );
        assert_eq!(
            decode_release((-1, -1, -1, -1)).unwrap(),
            Released::NotPreheated
        );
        assert_eq!(Released::NotPreheated.at(), None);
        assert_eq!(Released::AlreadyReturned { at }.at(), Some(at));
        for bad in [2, -2, 99] {
            assert!(decode_release((bad, 0, 0, 0)).is_err(), "code {bad}");
        }
    }

    const ALL_STATUSES: [Status; 6] = [
        Status::Pending,
        Status::Confirmed,
        Status::Paid,
        Status::Cancelled,
        Status::Expired,
        Status::Rejected,
    ];

    /// The `local rank = { name = n, ... }` table of `status.lua`.
    fn lua_ranks() -> HashMap<String, u8> {
        let line = STATUS
            .lines()
            .find(|l| l.trim_start().starts_with("local rank = {"))
            .expect("status.lua has a rank table");
        let inner = line.split_once('{').unwrap().1.split_once('}').unwrap().0;
        inner
            .split(',')
            .map(|pair| {
                let (name, n) = pair.split_once('=').unwrap();
                (name.trim().to_owned(), n.trim().parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn the_rust_and_lua_status_rankings_agree() {
        let lua = lua_ranks();
        assert_eq!(lua.len(), ALL_STATUSES.len(), "{lua:?}");
        for status in ALL_STATUSES {
            let name = serde_json::to_value(status).unwrap();
            let name = name.as_str().unwrap();
            assert_eq!(lua.get(name), Some(&status.rank()), "{name}");
            assert_eq!(Status::parse(name), Some(status));
        }
        assert_eq!(Status::parse("pending_payment"), None);
    }

    #[test]
    fn the_redis_status_round_trips() {
        let id = Uuid::now_v7();
        assert_eq!(
            ReservationView::from_redis(id, "pending"),
            Some(ReservationView::pending(id))
        );
        let v = ReservationView {
            reservation_id: id,
            status: Status::Confirmed,
            order_id: Some(Uuid::now_v7()),
            expires_at: Some(Utc::now()),
            reason: None,
        };
        assert_eq!(
            ReservationView::from_redis(id, &v.to_json()),
            Some(v.clone())
        );
        assert!(v.to_json().contains(r#""status":"confirmed""#));
        assert!(!v.is_terminal());
        assert!(ReservationView::from_redis(id, "garbage").is_none());
        assert!(ReservationView::from_redis(id, "paid").is_none());
        assert!(!v.to_json().contains("reason"));

        let rejected = ReservationView::rejected(id, "sold out");
        assert!(rejected.is_terminal());
        assert_eq!(
            ReservationView::from_redis(id, &rejected.to_json()),
            Some(rejected.clone())
        );
        let json: serde_json::Value = serde_json::from_str(&rejected.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"reservation_id": id, "status": "rejected", "reason": "sold out"})
        );
    }
}
