//! A sale in Redis: loading it (`preheat.lua`), pausing it while a forced preheat rebuilds it
//! (`pause.lua`), the rebuild lock, retiring it (`retire.lua`), and the figures an operator
//! watches.

use std::{collections::HashSet, time::Duration};

use fred::prelude::*;
use uuid::Uuid;

use super::{Moment, Reservations, Unavailable, millis, parse_uuid};
use crate::domain::{ProductId, UserId};

/// How long a rebuild lock lives if its holder dies.
const REBUILD_LOCK_TTL_MS: u64 = 60_000;

/// Buyers are loaded into Redis this many at a time before a preheat.
const BUYER_CHUNK: usize = 1_000;

/// A sale's figures in Redis ([`Reservations::figures`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaleFigures {
    pub preheated: bool,
    pub remaining: Option<i64>,
    pub paused: bool,
    pub pending: i64,
}

/// Everything a preheat needs, read from Postgres (and Redis, for a forced rebuild).
#[derive(Debug, Clone)]
pub struct PreheatPlan {
    pub product: ProductId,
    pub stock: i64,
    /// Orders in Postgres that hold a unit (`pending_payment` or `paid`).
    pub live_orders: i64,
    /// Every (user, reservation) already in Postgres, whatever its status.
    pub buyers: Vec<(UserId, Uuid)>,
    /// Reservation ids won in Redis but maybe not yet persisted, read (while paused) *before*
    /// Postgres was read; those not among `buyers` still hold a unit.
    pub pending: HashSet<Uuid>,
    /// Reservations whose order was cancelled or expired when Postgres was read: their units
    /// are on sale in `remaining()`, so `preheat.lua` marks them released in the same step.
    pub closed: Vec<Uuid>,
    pub starts_ms: i64,
    pub ends_ms: i64,
    pub force: bool,
    /// The product's Redis epoch for a state this preheat creates (a state Redis still holds
    /// keeps its own epoch and win sequence).
    pub epoch: i64,
}

impl PreheatPlan {
    /// Units on sale: stock − live orders − units won but not yet persisted.
    pub fn remaining(&self) -> i64 {
        let persisted: HashSet<Uuid> = self.buyers.iter().map(|(_, r)| *r).collect();
        let in_flight = self
            .pending
            .iter()
            .filter(|r| !persisted.contains(r))
            .count();
        let in_flight = i64::try_from(in_flight).unwrap_or(i64::MAX);
        (self.stock - self.live_orders - in_flight).clamp(0, self.stock.max(0))
    }
}

/// What a retirement attempt did (`retire.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The sale's keys expire in `ttl` (set now, or by an earlier attempt).
    Expiring { ttl: Duration },
    /// Not yet: the sale has not ended by Redis time, or winners are still in flight.
    NotYet,
    /// The product is not in Redis: nothing to expire.
    NotInRedis,
}

/// Decodes `retire.lua`'s answer `{code, ttl_ms}`; an unknown code is an error.
pub fn decode_retire((code, ttl_ms): (i64, i64)) -> Result<Retired, Unavailable> {
    match code {
        1 => Ok(Retired::Expiring {
            ttl: millis(ttl_ms),
        }),
        0 => Ok(Retired::NotYet),
        -1 => Ok(Retired::NotInRedis),
        other => Err(Unavailable::BadReply(format!(
            "retire.lua answered code {other}"
        ))),
    }
}

/// What [`Reservations::check_moment`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The state is at this moment, at or past the fence.
    Held(Moment),
    /// No state: not loaded, or lost.
    NotInRedis,
    /// The state was at this moment, behind the fence: Redis went back in time, and the state
    /// is deleted.
    WentBack(Moment),
}

/// Decodes `behind.lua`'s answer `{code, epoch, seq}`; an unknown code is an error.
pub fn decode_behind((code, epoch, seq): (i64, i64, i64)) -> Result<Checked, Unavailable> {
    let at = Moment::new(epoch, seq);
    match code {
        1 => Ok(Checked::Held(at)),
        0 => Ok(Checked::NotInRedis),
        -1 => Ok(Checked::WentBack(at)),
        other => Err(Unavailable::BadReply(format!(
            "behind.lua answered code {other}"
        ))),
    }
}

/// What a preheat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preheated {
    Loaded {
        remaining: i64,
        buyers: i64,
    },
    /// Refused: the sale is live and `force` was not set.
    AlreadyLive {
        remaining: i64,
        buyers: i64,
    },
}

impl Reservations {
    /// Lists `products` for the relay (`<prefix>:products`, which it reads the outboxes of),
    /// again: idempotent. The recovery watch does it every round for every sale Postgres says
    /// is preheated and not ended, so a listing Redis lost (a failover after the preheat's
    /// write, found by `scripts/chaos`, seed 12: the sale's winners were never relayed) comes
    /// back within a second.
    pub async fn list_for_relay(&self, products: &[ProductId]) -> Result<(), Unavailable> {
        if products.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = products.iter().map(|p| p.get()).collect();
        let _: i64 = self.pool.sadd(self.keys.products(), ids).await?;
        Ok(())
    }

    /// Pauses (or resumes) reservations of `product`.
    pub async fn set_paused(&self, product: ProductId, paused: bool) -> Result<(), Unavailable> {
        let k = self.keys.product(product);
        let _: i64 = self
            .pause
            .evalsha_with_reload(
                self.pool.next(),
                vec![k.state],
                vec![if paused { "1" } else { "0" }],
            )
            .await?;
        Ok(())
    }

    /// Reservation ids won but not yet persisted.
    pub async fn pending_ids(&self, product: ProductId) -> Result<HashSet<Uuid>, Unavailable> {
        let ids: Vec<String> = self
            .pool
            .smembers(self.keys.product(product).pending)
            .await?;
        ids.iter().map(|s| parse_uuid(s)).collect()
    }

    /// Loads the sale described by `plan`: buyers first (in chunks), then stock and window.
    pub async fn preheat(&self, plan: &PreheatPlan) -> Result<Preheated, Unavailable> {
        let k = self.keys.product(plan.product);
        for chunk in plan.buyers.chunks(BUYER_CHUNK) {
            let pairs: Vec<(String, String)> = chunk
                .iter()
                .map(|(u, r)| (u.to_string(), r.to_string()))
                .collect();
            let _: i64 = self.pool.hset(&k.buyers, pairs).await?;
        }
        let _: i64 = self
            .pool
            .sadd(self.keys.products(), plan.product.get())
            .await?;
        self.load_scripts().await?;
        let mut args = vec![
            plan.stock.to_string(),
            plan.remaining().to_string(),
            plan.starts_ms.to_string(),
            plan.ends_ms.to_string(),
            if plan.force { "1" } else { "0" }.to_owned(),
            self.keys.events(),
            plan.product.to_string(),
            plan.epoch.to_string(),
        ];
        args.extend(plan.closed.iter().map(Uuid::to_string));
        let (code, remaining, buyers): (i64, i64, i64) = self
            .preheat
            .evalsha_with_reload(
                self.pool.next(),
                vec![k.state, k.buyers, k.released, k.status],
                args,
            )
            .await?;
        Ok(if code == 1 {
            Preheated::Loaded { remaining, buyers }
        } else {
            Preheated::AlreadyLive { remaining, buyers }
        })
    }

    /// Compares the product's state with `fence`, a moment seen outside Redis, and with
    /// `released`, the highest release sequence of the fence's epoch recorded with an order
    /// (`behind.lua`): `Held` with the state's own moment, `NotInRedis`, or `WentBack` — it was
    /// behind either (it forgot a win or a returned unit), or part
    /// of the sale is gone (buyers or outbox, after a win), and it is deleted now (the product
    /// is lost everywhere and rebuilt by counting).
    pub async fn check_moment(
        &self,
        product: ProductId,
        fence: Moment,
        released: i64,
    ) -> Result<Checked, Unavailable> {
        let reply: (i64, i64, i64) = self
            .behind
            .evalsha_with_reload(
                self.pool.next(),
                {
                    let k = self.keys.product(product);
                    vec![k.state, k.buyers, k.outbox]
                },
                vec![
                    fence.epoch.to_string(),
                    fence.seq.to_string(),
                    released.to_string(),
                ],
            )
            .await?;
        let checked = decode_behind(reply)?;
        if let Checked::Held(at) = checked {
            self.fences.saw(product, at);
        }
        Ok(checked)
    }

    /// Takes the product's rebuild lock; `None` if another rebuild holds it. The lock expires
    /// by itself if its holder dies.
    pub async fn lock_rebuild(&self, product: ProductId) -> Result<Option<String>, Unavailable> {
        let token = Uuid::now_v7().to_string();
        let taken: Option<String> = self
            .pool
            .set(
                self.keys.product(product).rebuild,
                token.as_str(),
                Some(Expiration::PX(REBUILD_LOCK_TTL_MS as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(taken.map(|_| token))
    }

    /// Releases the rebuild lock taken with `token` (a no-op if it expired meanwhile).
    pub async fn unlock_rebuild(&self, product: ProductId, token: &str) -> Result<(), Unavailable> {
        let _: i64 = self
            .unlock
            .evalsha_with_reload(
                self.pool.next(),
                vec![self.keys.product(product).rebuild],
                vec![token.to_owned()],
            )
            .await?;
        Ok(())
    }

    /// Whether a preheat or rebuild of the product holds its rebuild lock right now.
    pub async fn being_rebuilt(&self, product: ProductId) -> Result<bool, Unavailable> {
        Ok(self.pool.exists(self.keys.product(product).rebuild).await?)
    }

    /// Entries of the product's outbox not yet relayed to RabbitMQ.
    pub async fn outbox_len(&self, product: ProductId) -> Result<i64, Unavailable> {
        Ok(self.pool.xlen(self.keys.product(product).outbox).await?)
    }

    /// Gives an ended, drained sale's keys an expiry of `grace` (see `lua/retire.lua`). The
    /// caller has checked, after seeing the outbox and the pending set empty, that no order of
    /// the product can still change them.
    pub async fn retire(
        &self,
        product: ProductId,
        grace: Duration,
    ) -> Result<Retired, Unavailable> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let reply: (i64, i64) = self
            .retire
            .evalsha_with_reload(
                self.pool.next(),
                self.keys.product(product).lasting(),
                vec![grace_ms.to_string()],
            )
            .await?;
        decode_retire(reply)
    }

    /// Takes a retired product off the relay's list.
    pub async fn forget(&self, product: ProductId) -> Result<(), Unavailable> {
        let _: i64 = self.pool.srem(self.keys.products(), product.get()).await?;
        Ok(())
    }

    /// Units left on sale, or `None` if the product is not in Redis.
    pub async fn remaining(&self, product: ProductId) -> Result<Option<i64>, Unavailable> {
        let v: Option<i64> = self
            .pool
            .hget(self.keys.product(product).state, "remaining")
            .await?;
        Ok(v)
    }

    /// How many winners are not yet persisted.
    pub async fn pending_count(&self, product: ProductId) -> Result<i64, Unavailable> {
        Ok(self.pool.scard(self.keys.product(product).pending).await?)
    }

    /// Whether the product is loaded (and not merely paused).
    pub async fn is_preheated(&self, product: ProductId) -> Result<bool, Unavailable> {
        Ok(self
            .pool
            .hexists(self.keys.product(product).state, "stock")
            .await?)
    }

    /// What an operator watches of a sale in Redis, in one round trip per key: units left
    /// (`None` until preheated), whether it is loaded, whether a forced rebuild paused it,
    /// and winners not yet persisted.
    pub async fn figures(&self, product: ProductId) -> Result<SaleFigures, Unavailable> {
        let k = self.keys.product(product);
        type State = (Option<i64>, Option<i64>, Option<String>);
        let ((stock, remaining, paused), pending): (State, i64) = tokio::try_join!(
            self.pool
                .hmget(k.state, vec!["stock", "remaining", "paused"]),
            self.pool.scard(k.pending)
        )?;
        Ok(SaleFigures {
            preheated: stock.is_some(),
            remaining,
            paused: paused.as_deref() == Some("1"),
            pending,
        })
    }

    /// Whether Redis holds the product's whole buyer list: the product is loaded (its state
    /// has `stock`; a preheat or rebuild writes it after every buyer Postgres knows) and its
    /// buyers hash exists. A shopper not in that list never won the product. (Before the first
    /// win there is no buyers hash, and after a loss no state: then Redis cannot say.)
    pub async fn knows_every_buyer(&self, product: ProductId) -> Result<bool, Unavailable> {
        let k = self.keys.product(product);
        let (loaded, buyers): (bool, i64) = tokio::try_join!(
            self.pool.hexists(k.state, "stock"),
            self.pool.exists(k.buyers)
        )?;
        Ok(loaded && buyers > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(stock: i64, live: i64, buyers: &[u128], pending: &[u128]) -> PreheatPlan {
        PreheatPlan {
            product: ProductId::try_from(1_i64).unwrap(),
            stock,
            live_orders: live,
            buyers: buyers
                .iter()
                .enumerate()
                .map(|(i, r)| (UserId::try_from(i as i64 + 1).unwrap(), Uuid::from_u128(*r)))
                .collect(),
            pending: pending.iter().map(|r| Uuid::from_u128(*r)).collect(),
            closed: Vec::new(),
            starts_ms: 0,
            ends_ms: 1,
            force: true,
            epoch: 1,
        }
    }

    #[test]
    fn remaining_counts_units_in_flight_once() {
        // 10 units, 3 live orders in Postgres; pending 2 and 3 are persisted already, 9 is not.
        assert_eq!(plan(10, 3, &[1, 2, 3], &[2, 3, 9]).remaining(), 6);
        assert_eq!(plan(10, 0, &[], &[]).remaining(), 10);
        // Never below zero, never above stock.
        assert_eq!(plan(2, 5, &[], &[7]).remaining(), 0);
        assert_eq!(plan(2, -3, &[], &[]).remaining(), 2);
    }

    #[test]
    fn every_behind_code_decodes_and_an_unknown_one_is_an_error() {
        assert_eq!(
            decode_behind((1, 2, 9)).unwrap(),
            Checked::Held(Moment::new(2, 9))
        );
        assert_eq!(decode_behind((0, -1, -1)).unwrap(), Checked::NotInRedis);
        assert_eq!(
            decode_behind((-1, 2, 3)).unwrap(),
            Checked::WentBack(Moment::new(2, 3))
        );
        assert!(decode_behind((5, 0, 0)).is_err());
    }

    #[test]
    fn every_retire_code_decodes_and_an_unknown_one_is_an_error() {
        assert_eq!(
            decode_retire((1, 86_400_000)).unwrap(),
            Retired::Expiring {
                ttl: Duration::from_secs(86_400)
            }
        );
        assert_eq!(decode_retire((0, -1)).unwrap(), Retired::NotYet);
        assert_eq!(decode_retire((-1, -1)).unwrap(), Retired::NotInRedis);
        assert!(decode_retire((2, 0)).is_err());
    }
}
