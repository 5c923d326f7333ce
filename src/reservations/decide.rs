//! Purchase attempts decided by `reserve.lua`: one call for one attempt or a batch of them on
//! one product, and the pure decoder of its reply.

use std::time::Duration;

use fred::{prelude::*, types::Value};
use uuid::Uuid;

use super::{Moment, Reservations, Unavailable, millis, parse_uuid};
use crate::{
    domain::{ProductId, UserId},
    durability::Replication,
};

/// What one purchase attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Won {
        reservation_id: Uuid,
        remaining: i64,
    },
    AlreadyReserved {
        reservation_id: Uuid,
    },
    SoldOut,
    RateLimited {
        retry_after: Duration,
    },
    NotStarted,
    Ended,
    Paused,
    UnknownProduct,
    /// Redis was behind a moment this process had seen ([`Moment`]): it went back in time, and
    /// the script deleted the product's state, so the product is lost everywhere (recovering).
    WentBack,
}

impl Outcome {
    /// Every outcome's stable label (metrics, logs), in [`Self::index`] order.
    pub const LABELS: [&'static str; 9] = [
        "won",
        "already_reserved",
        "sold_out",
        "rate_limited",
        "not_started",
        "ended",
        "paused",
        "unknown_product",
        "went_back",
    ];

    /// The outcome's position in [`Self::LABELS`].
    pub fn index(&self) -> usize {
        match self {
            Outcome::Won { .. } => 0,
            Outcome::AlreadyReserved { .. } => 1,
            Outcome::SoldOut => 2,
            Outcome::RateLimited { .. } => 3,
            Outcome::NotStarted => 4,
            Outcome::Ended => 5,
            Outcome::Paused => 6,
            Outcome::UnknownProduct => 7,
            Outcome::WentBack => 8,
        }
    }

    /// A stable label (metrics, logs).
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// The user's rate window as the script saw it (for `RateLimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateWindow {
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

/// A decision: the outcome plus the user's window (and, for a win under `replicas:N`, whether
/// the replicas took it before the answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub window: RateWindow,
    pub replication: Replication,
}

/// One attempt's seven values in `reserve.lua`'s answer: `{code, reservation_id|"",
/// remaining, rl_limit, rl_remaining, rl_reset_ms, retry_ms}`.
type AttemptReply = (i64, String, i64, i64, i64, i64, i64);

/// Decodes one attempt's answer; an unknown code is an error, never a default outcome.
fn decode_attempt(reply: AttemptReply) -> Result<Decision, Unavailable> {
    let (code, id, remaining, limit, left, reset_ms, retry_ms) = reply;
    let window = RateWindow {
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        remaining: u32::try_from(left).unwrap_or(0),
        reset: millis(reset_ms),
    };
    let outcome = match code {
        0 => Outcome::Won {
            reservation_id: parse_uuid(&id)?,
            remaining,
        },
        1 => Outcome::AlreadyReserved {
            reservation_id: parse_uuid(&id)?,
        },
        2 => Outcome::SoldOut,
        3 | 4 => Outcome::RateLimited {
            retry_after: millis(retry_ms),
        },
        5 => Outcome::NotStarted,
        6 => Outcome::Ended,
        7 => Outcome::Paused,
        8 => Outcome::UnknownProduct,
        9 => Outcome::WentBack,
        other => {
            return Err(Unavailable::BadReply(format!(
                "reserve.lua answered code {other}"
            )));
        }
    };
    Ok(Decision {
        outcome,
        window,
        replication: Replication::NotAsked,
    })
}

/// Decodes `reserve.lua`'s flat answer: `attempts` groups of seven values, one group per
/// attempt in order, then the product's moment after the call (`None`: it has no state). A
/// reply of the wrong length or shape is an error, never a guess.
pub fn decode_reserve(
    reply: Vec<Value>,
    attempts: usize,
) -> Result<(Vec<Decision>, Option<Moment>), Unavailable> {
    if reply.len() != attempts * 7 + 2 {
        return Err(Unavailable::BadReply(format!(
            "reserve.lua answered {} values for {attempts} attempts",
            reply.len()
        )));
    }
    let bad = |e: fred::error::Error| Unavailable::BadReply(format!("reserve.lua: {e}"));
    let mut values = reply.into_iter();
    // The length was checked above: each attempt has its seven values.
    let mut next = || values.next().unwrap_or(Value::Null);
    let decisions = (0..attempts)
        .map(|_| {
            let code = next().convert::<i64>().map_err(bad)?;
            let id = next().convert::<String>().map_err(bad)?;
            let [remaining, limit, left, reset_ms, retry_ms] =
                [(); 5].map(|()| next().convert::<i64>().map_err(bad));
            decode_attempt((code, id, remaining?, limit?, left?, reset_ms?, retry_ms?))
        })
        .collect::<Result<_, _>>()?;
    let epoch = next().convert::<i64>().map_err(bad)?;
    let seq = next().convert::<i64>().map_err(bad)?;
    Ok((decisions, Moment::reported(epoch, seq)))
}

impl Reservations {
    /// Decides one purchase attempt: a batch of one ([`Self::reserve_many`]); under
    /// `replicas:N` a win is answered only after its replicas took it (or the wait ran out:
    /// see [`Replication`]).
    pub async fn reserve(&self, user: UserId, product: ProductId) -> Result<Decision, Unavailable> {
        let mut decisions = self.reserve_many(product, &[user]).await?;
        decisions
            .pop()
            .ok_or_else(|| Unavailable::BadReply("reserve.lua answered no attempt".into()))
    }

    /// Decides purchase attempts on one product in one `reserve.lua` call: each as if it came
    /// alone, in `users`' order, at one instant (a user may appear more than once). The call
    /// carries the latest moment this process saw of the product as a fence, and the moment it
    /// answers becomes the next one. Under `replicas:N` one `WAIT` covers every win of the
    /// call (on the script's own connection: `WAIT` covers only that connection's writes).
    #[tracing::instrument(skip_all, fields(%product, attempts = users.len()))]
    pub async fn reserve_many(
        &self,
        product: ProductId,
        users: &[UserId],
    ) -> Result<Vec<Decision>, Unavailable> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys.product(product);
        let mut keys = Vec::with_capacity(6 + users.len());
        keys.extend([
            k.state.clone(),
            k.buyers.clone(),
            k.pending.clone(),
            k.outbox.clone(),
            k.status.clone(),
            k.gate.clone(),
        ]);
        keys.extend(users.iter().map(|u| k.user_rate(*u)));
        let fence = self.fences.of(product);
        let mut args = Vec::with_capacity(8 + 2 * users.len());
        args.push(product.to_string());
        args.extend(self.rate_args());
        args.push(self.clock.arg());
        args.push(fence.epoch.to_string());
        args.push(fence.seq.to_string());
        for user in users {
            args.push(user.to_string());
            args.push(Uuid::now_v7().to_string());
        }
        let client = self.pool.next();
        let reply: Vec<Value> = self.reserve.evalsha_with_reload(client, keys, args).await?;
        let (mut decisions, moment) = decode_reserve(reply, users.len())?;
        if let Some(moment) = moment {
            self.fences.saw(product, moment);
        }
        self.after_decisions(client, product, &k.state, &mut decisions)
            .await;
        Ok(decisions)
    }

    /// The user window and product gate as `reserve.lua` takes them: user limit, window
    /// ms, gate count, gate period µs.
    fn rate_args(&self) -> [String; 4] {
        let period_us = u64::try_from(self.product_rate.period.as_micros()).unwrap_or(u64::MAX);
        [
            self.user_rate.count.to_string(),
            self.user_rate.period_ms().to_string(),
            self.product_rate.count.to_string(),
            period_us.to_string(),
        ]
    }

    /// After a reserve call: wakes this process's relay, and under `replicas:N` waits (on the
    /// script's own connection, for the slot of `state_key`) for the replicas to take the wins.
    async fn after_decisions(
        &self,
        client: &Client,
        product: ProductId,
        state_key: &str,
        decisions: &mut [Decision],
    ) {
        let won = decisions
            .iter()
            .any(|d| matches!(d.outcome, Outcome::Won { .. }));
        if !won {
            return;
        }
        if let Some(wake) = &self.wake {
            wake.won(product);
        }
        if let Some(wait) = &self.replica_wait {
            let slot = fred::util::redis_keyslot(state_key.as_bytes());
            let replication = wait.after_win(client, slot).await;
            for d in decisions
                .iter_mut()
                .filter(|d| matches!(d.outcome, Outcome::Won { .. }))
            {
                d.replication = replication;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: i64, id: &str) -> AttemptReply {
        (code, id.to_owned(), 4, 1, 0, 900, 250)
    }

    #[test]
    fn every_attempt_code_decodes_and_an_unknown_one_is_an_error() {
        let id = "0190a000-0000-7000-8000-000000000001";
        let rid = Uuid::parse_str(id).unwrap();
        let cases = [
            (
                0,
                Outcome::Won {
                    reservation_id: rid,
                    remaining: 4,
                },
            ),
            (
                1,
                Outcome::AlreadyReserved {
                    reservation_id: rid,
                },
            ),
            (2, Outcome::SoldOut),
            (
                3,
                Outcome::RateLimited {
                    retry_after: Duration::from_millis(250),
                },
            ),
            (
                4,
                Outcome::RateLimited {
                    retry_after: Duration::from_millis(250),
                },
            ),
            (5, Outcome::NotStarted),
            (6, Outcome::Ended),
            (7, Outcome::Paused),
            (8, Outcome::UnknownProduct),
            (9, Outcome::WentBack),
        ];
        for (code, outcome) in cases {
            let d = decode_attempt(reply(code, id)).unwrap();
            assert_eq!(d.outcome, outcome, "code {code}");
            assert_eq!(
                d.window,
                RateWindow {
                    limit: 1,
                    remaining: 0,
                    reset: Duration::from_millis(900)
                }
            );
        }
        for bad in [
            reply(10, id),
            reply(-1, id),
            reply(0, ""),
            reply(1, "not-a-uuid"),
        ] {
            assert!(decode_attempt(bad).is_err());
        }
    }

    /// `reply` as `reserve.lua` sends it: seven flat values.
    fn flat(code: i64, id: &str) -> Vec<Value> {
        let (code, id, remaining, limit, left, reset_ms, retry_ms) = reply(code, id);
        vec![
            Value::Integer(code),
            Value::from(id),
            Value::Integer(remaining),
            Value::Integer(limit),
            Value::Integer(left),
            Value::Integer(reset_ms),
            Value::Integer(retry_ms),
        ]
    }

    /// The moment that ends every reply.
    fn moment(epoch: i64, seq: i64) -> [Value; 2] {
        [Value::Integer(epoch), Value::Integer(seq)]
    }

    #[test]
    fn a_batch_reply_decodes_attempt_by_attempt_and_a_misshapen_one_is_an_error() {
        let id = "0190a000-0000-7000-8000-000000000001";
        let mut two = flat(0, id);
        two.extend(flat(2, ""));
        two.extend(moment(3, 41));
        let (decisions, at) = decode_reserve(two.clone(), 2).unwrap();
        assert_eq!(
            decisions,
            vec![
                decode_attempt(reply(0, id)).unwrap(),
                decode_attempt(reply(2, "")).unwrap()
            ]
        );
        assert_eq!(at, Some(Moment::new(3, 41)));
        assert!(decode_reserve(two.clone(), 3).is_err(), "too short");
        assert!(decode_reserve(two.clone(), 1).is_err(), "too long");
        assert!(decode_reserve(two[..14].to_vec(), 2).is_err(), "no moment");
        let mut not_a_number = two;
        not_a_number[9] = Value::from("many");
        assert!(decode_reserve(not_a_number, 2).is_err());
        let mut unknown = flat(10, id);
        unknown.extend(moment(0, 0));
        assert!(decode_reserve(unknown, 1).is_err(), "unknown code");
        let mut gone = flat(9, "");
        gone.extend(moment(-1, -1));
        let (decisions, at) = decode_reserve(gone, 1).unwrap();
        assert_eq!(decisions[0].outcome, Outcome::WentBack);
        assert_eq!(at, None, "no state, no moment");
        assert_eq!(
            decode_reserve(moment(1, 1).to_vec(), 0).unwrap(),
            (Vec::new(), Some(Moment::new(1, 1)))
        );
    }

    #[test]
    fn outcome_labels_are_one_list() {
        let all = [
            Outcome::Won {
                reservation_id: Uuid::nil(),
                remaining: 0,
            },
            Outcome::AlreadyReserved {
                reservation_id: Uuid::nil(),
            },
            Outcome::SoldOut,
            Outcome::RateLimited {
                retry_after: Duration::ZERO,
            },
            Outcome::NotStarted,
            Outcome::Ended,
            Outcome::Paused,
            Outcome::UnknownProduct,
            Outcome::WentBack,
        ];
        let labels: Vec<&str> = all.iter().map(Outcome::label).collect();
        assert_eq!(labels, Outcome::LABELS);
    }
}
