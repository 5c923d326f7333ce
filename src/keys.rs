//! The Redis key schema. Every key starts with `SECKILL_REDIS_PREFIX`; every key one script
//! touches carries the product's hash tag `{p<id>}`, so each script runs unchanged on a cluster.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<prefix>:{p<id>}:state` | hash | `stock`, `remaining`, `starts_ms`, `ends_ms`, `paused`, `epoch`, `seq` (wins), `rseq` (units returned) |
//! | `<prefix>:{p<id>}:buyers` | hash | user id → reservation id (one win per user, ever) |
//! | `<prefix>:{p<id>}:pending` | set | reservation ids won, not yet persisted as orders |
//! | `<prefix>:{p<id>}:released` | set | reservation ids whose unit went back on sale |
//! | `<prefix>:{p<id>}:status` | hash | reservation id → `pending` or the order's JSON |
//! | `<prefix>:{p<id>}:outbox` | stream | one entry per winner: `r` id, `u` user, `p` product, `t` ms |
//! | `<prefix>:{p<id>}:rl:<user>` | string | the user's attempts in the current window (expires) |
//! | `<prefix>:{p<id>}:gate` | string | the product's admission gate (GCRA arrival time, µs) |
//! | `<prefix>:{p<id>}:rebuild` | string | the per-product rebuild lock (holder's token, expires) |
//! | `<prefix>:products` | set | product ids preheated and not yet retired (the relay's list of outboxes) |
//! | `<prefix>:events` | pub/sub channel | `stock:<id>` (a unit returned / product preheated), `status:<id>:<user>` |
//!
//! Nothing grows without end: the per-user rate windows, the gate and the rebuild lock expire
//! by themselves (every write sets one), and once a sale has ended and drained (every winner relayed and persisted, no
//! order left that could still change Redis) `retire.lua` gives every other key of the product
//! ([`ProductKeys::lasting`]) an expiry of `SECKILL_KEY_GRACE_SECS` and the product leaves
//! `<prefix>:products` (see `sweeper`).

use crate::domain::{ProductId, UserId};

/// Builds key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The keys of one product (all in one hash slot).
#[derive(Debug, Clone)]
pub struct ProductKeys {
    pub state: String,
    pub buyers: String,
    pub pending: String,
    pub released: String,
    pub status: String,
    pub outbox: String,
    pub gate: String,
    pub rebuild: String,
    /// The waiting room (`lua/room.lua`): its hash, the early joiners (zset), the late ones
    /// (hash) and the admitted-but-undecided (zset).
    pub room: [String; 4],
    tag: String,
}

impl ProductKeys {
    /// The keys that live as long as the sale does (every key without an expiry of its own),
    /// in the order `retire.lua` takes them.
    pub fn lasting(&self) -> Vec<String> {
        vec![
            self.state.clone(),
            self.outbox.clone(),
            self.pending.clone(),
            self.buyers.clone(),
            self.status.clone(),
            self.released.clone(),
            self.room[0].clone(),
            self.room[1].clone(),
            self.room[2].clone(),
            self.room[3].clone(),
        ]
    }

    /// A used proof-of-work challenge's nonce (expires with the challenge).
    pub fn pow_nonce(&self, nonce: &str) -> String {
        format!("{}:pow:{nonce}", self.tag)
    }

    /// The per-user rate window key.
    pub fn user_rate(&self, user: UserId) -> String {
        format!("{}:rl:{user}", self.tag)
    }
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn product(&self, product: ProductId) -> ProductKeys {
        let tag = format!("{}:{{p{product}}}", self.prefix);
        ProductKeys {
            state: format!("{tag}:state"),
            buyers: format!("{tag}:buyers"),
            pending: format!("{tag}:pending"),
            released: format!("{tag}:released"),
            status: format!("{tag}:status"),
            outbox: format!("{tag}:outbox"),
            gate: format!("{tag}:gate"),
            rebuild: format!("{tag}:rebuild"),
            room: [
                format!("{tag}:room"),
                format!("{tag}:room:early"),
                format!("{tag}:room:late"),
                format!("{tag}:room:undecided"),
            ],
            tag,
        }
    }

    /// Product ids preheated and not yet retired.
    pub fn products(&self) -> String {
        format!("{}:products", self.prefix)
    }

    /// The pub/sub channel for cross-process notifications.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = key[open..].find('}').unwrap() + open;
        &key[open + 1..close]
    }

    #[test]
    fn every_product_key_shares_one_hash_tag_and_the_prefix() {
        let keys = Keys::new("shop");
        let p = keys.product(ProductId::try_from(42_i64).unwrap());
        let user = UserId::try_from(7_i64).unwrap();
        for key in [
            &p.state,
            &p.buyers,
            &p.pending,
            &p.released,
            &p.status,
            &p.outbox,
            &p.gate,
            &p.rebuild,
            &p.user_rate(user),
            &p.room[0],
            &p.room[1],
            &p.room[2],
            &p.room[3],
        ] {
            assert!(key.starts_with("shop:"), "{key}");
            assert_eq!(slot_tag(key), "p42", "{key}");
        }
    }

    #[test]
    fn retirement_covers_every_key_without_an_expiry_of_its_own() {
        let p = Keys::new("shop").product(ProductId::try_from(42_i64).unwrap());
        let lasting = p.lasting();
        // The state hash first: retire.lua checks the sale through it.
        assert_eq!(lasting[0], p.state);
        for key in [&p.buyers, &p.pending, &p.released, &p.status, &p.outbox]
            .into_iter()
            .chain(&p.room)
        {
            assert!(lasting.contains(key), "{key}");
        }
        // The gate, the rebuild lock and the rate windows expire by themselves.
        assert!(!lasting.contains(&p.rebuild) && !lasting.contains(&p.gate));
    }
}
