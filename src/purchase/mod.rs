//! The purchase decision: what happens to one attempt, from its body to the answer, in one place.
//!
//! [`attempt`] runs the checks in a fixed order, the cheapest first, so the crowd that cannot win
//! costs least:
//! 1. **sold out, from memory** ([`crate::soldout`]): the body is read (so the connection stays
//!    usable) but not parsed; no token check, no Redis call;
//! 2. **the product exists** (the in-process product cache; Postgres on a miss) → `404`, the
//!    body left unread;
//! 3. **the body** arrives (its own errors: type, size, time) and is `{token}` → `400`;
//! 4. **the purchase token** is this shopper's for this product (HMAC, remembered once
//!    verified) → `403`;
//! 5. **the product is not being recovered** (in-process memory) → `503 recovering`;
//! 6. **the decision itself**: `reserve.lua`, gathered with the attempts on the same product
//!    that arrive meanwhile ([`Batcher`]) — sale window, rate windows, dedup, stock, outbox;
//! 7. after it: a Redis found behind a moment this process saw makes the product `recovering`
//!    ([`crate::reservations::Moment`]); a product Redis does not know is `ended` (by its
//!    window in Postgres) or `recovering` (Redis lost it); a sold-out answer is remembered.
//!
//! Who is asking (the shopper's JWT) is the HTTP handler's, before anything here: it extracts
//! the caller and the body's reader, calls [`attempt`] with the process's [`Purchase`], and
//! maps the [`Answer`] or [`Refusal`] to a status. [`Checks`] is what an attempt is checked
//! against: [`Purchase`] is the real one, and a unit test drives [`attempt`] through a
//! recording one to hold the order above.

mod batcher;

use std::{future::Future, sync::Arc};

use chrono::Utc;
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use utoipa::ToSchema;

pub use batcher::Batcher;

use crate::{
    auth::Auth,
    domain::{ProductId, UserId},
    durability::Replication,
    metrics::Metrics,
    products::{ProductCache, ProductInfo},
    recovery::Recovery,
    reservations::{Decision, Outcome, Unavailable},
    soldout::SoldOutCache,
};

/// A purchase attempt's body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    /// The purchase token from `POST /api/v1/products/{id}/token`.
    pub token: String,
}

/// What an attempt that got an answer got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Sold out, known from this process's memory: nothing else was looked at.
    SoldOut,
    /// What `reserve.lua` decided (with the shopper's rate window).
    Decided(Decision),
}

/// Why an attempt was turned away before (or instead of) a decision; `B` is the body reader's
/// own error, passed through as it is.
#[derive(Debug, thiserror::Error)]
pub enum Refusal<B: std::error::Error = std::convert::Infallible> {
    #[error("no such product")]
    ProductNotFound,
    /// The body is not `{token}` (serde's words).
    #[error("invalid JSON body: {0}")]
    BadBody(String),
    /// The body could not be read.
    #[error(transparent)]
    Body(B),
    #[error("the purchase token is not this shopper's for this product")]
    InvalidToken,
    #[error("the sale has ended")]
    Ended,
    #[error("the product is being recovered")]
    Recovering,
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// What an attempt is checked against, in the order [`attempt`] asks.
#[allow(async_fn_in_trait)] // used generically within the crate, never as `dyn`
pub trait Checks {
    /// This process remembers the product sold out (no Redis call).
    fn sold_out(&self, product: ProductId) -> bool;
    /// The product, if it exists.
    async fn product(&self, product: ProductId) -> anyhow::Result<Option<Arc<ProductInfo>>>;
    /// The purchase token is `user`'s for `product` and unexpired.
    fn token_valid(&self, token: &str, user: UserId, product: ProductId) -> bool;
    /// The product is `recovering` (Redis lost it; known in this process).
    fn recovering(&self, product: ProductId) -> bool;
    /// `reserve.lua`'s decision; remembers a sold-out answer.
    async fn decide(&self, user: UserId, product: ProductId) -> Result<Decision, Unavailable>;
    /// Redis lost the product (asked only when Redis did not know it).
    async fn lost(&self, product: ProductId) -> anyhow::Result<bool>;
    /// Redis went back in time for the product (the script found it behind this process's
    /// fence and deleted its state): it is recovering.
    fn went_back(&self, product: ProductId);
}

/// Decides one attempt of `user` on `product`, whose raw JSON body `body` reads, checks in the
/// order of this module's documentation.
pub async fn attempt<B, T, E>(
    checks: &impl Checks,
    user: UserId,
    product: ProductId,
    body: B,
) -> Result<Answer, Refusal<E>>
where
    B: Future<Output = Result<T, E>>,
    T: AsRef<[u8]>,
    E: std::error::Error,
{
    // Sold out is public (the product view says so): no token can buy a unit that is not there.
    if checks.sold_out(product) {
        body.await.map_err(Refusal::Body)?;
        return Ok(Answer::SoldOut);
    }
    let info = checks
        .product(product)
        .await?
        .ok_or(Refusal::ProductNotFound)?;
    let body = body.await.map_err(Refusal::Body)?;
    let request: PurchaseRequest =
        serde_json::from_slice(body.as_ref()).map_err(|e| Refusal::BadBody(e.to_string()))?;
    if !checks.token_valid(&request.token, user, product) {
        return Err(Refusal::InvalidToken);
    }
    if checks.recovering(product) {
        return Err(Refusal::Recovering);
    }
    let decision = checks.decide(user, product).await?;
    if decision.replication == Replication::Failed {
        // The primary that took the unit may be gone with it: never a 202 that cannot be
        // kept. The shopper's /me tells whether the win survived.
        return Err(Refusal::Unavailable(Unavailable::Unconfirmed));
    }
    if decision.outcome == Outcome::WentBack {
        checks.went_back(product);
        return Err(Refusal::Recovering);
    }
    if decision.outcome == Outcome::UnknownProduct {
        // Redis does not know a product Postgres has: its sale is over and retired, or Redis
        // lost it.
        if Utc::now() >= info.ends_at {
            return Err(Refusal::Ended);
        }
        if checks.lost(product).await? {
            return Err(Refusal::Recovering);
        }
    }
    Ok(Answer::Decided(decision))
}

/// The purchase path of a `serve` process: its own components behind [`Checks`].
pub struct Purchase {
    pub db: DatabaseConnection,
    pub products: Arc<ProductCache>,
    pub soldout: Arc<SoldOutCache>,
    pub auth: Arc<Auth>,
    pub recovery: Arc<Recovery>,
    pub batcher: Arc<Batcher>,
    pub metrics: Arc<Metrics>,
}

impl Checks for Purchase {
    /// Counts each attempt the memory answers (a decision, `sold_out`, with no Redis call).
    fn sold_out(&self, product: ProductId) -> bool {
        let sold_out = self.soldout.is_sold_out(product);
        if sold_out {
            self.metrics.soldout_cache_hits.inc();
            self.metrics.decided(product, &Outcome::SoldOut);
        }
        sold_out
    }

    async fn product(&self, product: ProductId) -> anyhow::Result<Option<Arc<ProductInfo>>> {
        self.products.get(&self.db, product).await
    }

    fn token_valid(&self, token: &str, user: UserId, product: ProductId) -> bool {
        self.auth.check_purchase_token(token, user, product)
    }

    fn recovering(&self, product: ProductId) -> bool {
        self.recovery.is_recovering(product)
    }

    async fn decide(&self, user: UserId, product: ProductId) -> Result<Decision, Unavailable> {
        // Taken before the call: a unit released meanwhile clears the memory after this mark.
        let ticket = self.soldout.ticket();
        let decision = self.batcher.reserve(user, product).await?;
        self.metrics.decided(product, &decision.outcome);
        self.metrics.replicated(decision.replication);
        if let Outcome::SoldOut | Outcome::Won { remaining: 0, .. } = decision.outcome {
            self.soldout.mark(product, ticket);
        }
        Ok(decision)
    }

    async fn lost(&self, product: ProductId) -> anyhow::Result<bool> {
        self.recovery.lost(product).await
    }

    fn went_back(&self, product: ProductId) {
        self.recovery.went_back(product);
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::reservations::RateWindow;

    /// A [`Checks`] that answers from fixed facts and records each check asked, in order.
    struct Recorded {
        sold_out: bool,
        exists: bool,
        token_valid: bool,
        recovering: bool,
        decides: Outcome,
        replication: Replication,
        ends_at: DateTime<Utc>,
        lost: bool,
        asked: Mutex<Vec<&'static str>>,
    }

    impl Recorded {
        /// A live product, a valid token, and a decision of `decides`.
        fn live(decides: Outcome) -> Self {
            Self {
                sold_out: false,
                exists: true,
                token_valid: true,
                recovering: false,
                decides,
                replication: Replication::NotAsked,
                ends_at: Utc::now() + chrono::Duration::hours(1),
                lost: false,
                asked: Mutex::default(),
            }
        }

        fn ask(&self, check: &'static str) {
            self.asked.lock().unwrap().push(check);
        }

        fn asked(&self) -> Vec<&'static str> {
            self.asked.lock().unwrap().clone()
        }
    }

    impl Checks for Recorded {
        fn sold_out(&self, _: ProductId) -> bool {
            self.ask("sold_out");
            self.sold_out
        }

        async fn product(&self, product: ProductId) -> anyhow::Result<Option<Arc<ProductInfo>>> {
            self.ask("product");
            Ok(self.exists.then(|| {
                Arc::new(ProductInfo {
                    product_id: product,
                    name: "p".into(),
                    stock: 1,
                    price_cents: 1,
                    starts_at: Utc::now() - chrono::Duration::hours(1),
                    ends_at: self.ends_at,
                    waiting_room: false,
                    proof_of_work: false,
                })
            }))
        }

        fn token_valid(&self, _: &str, _: UserId, _: ProductId) -> bool {
            self.ask("token");
            self.token_valid
        }

        fn recovering(&self, _: ProductId) -> bool {
            self.ask("recovering");
            self.recovering
        }

        async fn decide(&self, _: UserId, _: ProductId) -> Result<Decision, Unavailable> {
            self.ask("decide");
            Ok(Decision {
                outcome: self.decides.clone(),
                window: RateWindow {
                    limit: 1,
                    remaining: 0,
                    reset: Duration::from_secs(1),
                },
                replication: self.replication,
            })
        }

        async fn lost(&self, _: ProductId) -> anyhow::Result<bool> {
            self.ask("lost");
            Ok(self.lost)
        }

        fn went_back(&self, _: ProductId) {
            self.ask("went_back");
        }
    }

    const BODY: &[u8] = br#"{"token":"t"}"#;

    #[derive(Debug, thiserror::Error)]
    #[error("the body did not arrive")]
    struct Unread;

    fn run(c: &Recorded, body: &'static [u8]) -> Result<Answer, Refusal<Unread>> {
        read(c, Ok(body))
    }

    /// The attempt with a body reader that records when it is read and gives `body`.
    fn read(c: &Recorded, body: Result<&'static [u8], Unread>) -> Result<Answer, Refusal<Unread>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (user, product) = (
            UserId::try_from(7_i64).unwrap(),
            ProductId::try_from(1_i64).unwrap(),
        );
        let reader = async {
            c.ask("body");
            body
        };
        rt.block_on(attempt(c, user, product, reader))
    }

    #[test]
    fn a_winning_attempt_passes_every_check_in_order_and_asks_redis_once() {
        let won = Outcome::Won {
            reservation_id: uuid::Uuid::now_v7(),
            remaining: 0,
        };
        let c = Recorded::live(won.clone());
        let answer = run(&c, BODY).unwrap();
        assert!(matches!(answer, Answer::Decided(d) if d.outcome == won));
        assert_eq!(
            c.asked(),
            [
                "sold_out",
                "product",
                "body",
                "token",
                "recovering",
                "decide"
            ]
        );
    }

    #[test]
    fn a_win_whose_replica_wait_failed_is_never_a_202() {
        let won = Outcome::Won {
            reservation_id: uuid::Uuid::now_v7(),
            remaining: 3,
        };
        let failed = Recorded {
            replication: Replication::Failed,
            ..Recorded::live(won.clone())
        };
        assert!(matches!(
            run(&failed, BODY),
            Err(Refusal::Unavailable(Unavailable::Unconfirmed))
        ));
        // A wait that only timed out still answers the win (documented under replicas:N).
        let short = Recorded {
            replication: Replication::TimedOut,
            ..Recorded::live(won.clone())
        };
        assert!(matches!(run(&short, BODY), Ok(Answer::Decided(d)) if d.outcome == won));
    }

    #[test]
    fn sold_out_in_memory_answers_before_anything_that_costs() {
        let c = Recorded {
            sold_out: true,
            exists: false,
            token_valid: false,
            ..Recorded::live(Outcome::SoldOut)
        };
        // The body is read (the connection stays usable) but not parsed: a garbage one gets
        // the same answer.
        assert_eq!(run(&c, b"not json").unwrap(), Answer::SoldOut);
        assert_eq!(c.asked(), ["sold_out", "body"]);
        // One that does not arrive is the reader's own error.
        assert!(matches!(read(&c, Err(Unread)), Err(Refusal::Body(Unread))));
    }

    #[test]
    fn an_unknown_product_is_refused_before_its_body_is_read() {
        let c = Recorded {
            exists: false,
            ..Recorded::live(Outcome::SoldOut)
        };
        assert!(matches!(
            read(&c, Err(Unread)),
            Err(Refusal::ProductNotFound)
        ));
        assert_eq!(c.asked(), ["sold_out", "product"]);
    }

    #[test]
    fn a_bad_body_is_refused_before_the_token_is_verified() {
        let c = Recorded::live(Outcome::SoldOut);
        for body in [&b"not json"[..], br#"{"token":"t","extra":1}"#, b"{}"] {
            assert!(matches!(run(&c, body), Err(Refusal::BadBody(_))));
        }
        assert!(!c.asked().contains(&"token"));
        assert!(matches!(read(&c, Err(Unread)), Err(Refusal::Body(Unread))));
        assert!(!c.asked().contains(&"token"));
    }

    #[test]
    fn a_foreign_token_never_reaches_redis() {
        let c = Recorded {
            token_valid: false,
            recovering: true,
            ..Recorded::live(Outcome::SoldOut)
        };
        assert!(matches!(run(&c, BODY), Err(Refusal::InvalidToken)));
        assert_eq!(c.asked(), ["sold_out", "product", "body", "token"]);
    }

    #[test]
    fn a_recovering_product_is_answered_from_memory_without_redis() {
        let c = Recorded {
            recovering: true,
            ..Recorded::live(Outcome::SoldOut)
        };
        assert!(matches!(run(&c, BODY), Err(Refusal::Recovering)));
        assert_eq!(
            c.asked(),
            ["sold_out", "product", "body", "token", "recovering"]
        );
    }

    #[test]
    fn a_product_redis_does_not_know_is_ended_past_its_window_else_asked_whether_lost() {
        let ended = Recorded {
            ends_at: Utc::now() - chrono::Duration::seconds(1),
            lost: true,
            ..Recorded::live(Outcome::UnknownProduct)
        };
        assert!(matches!(run(&ended, BODY), Err(Refusal::Ended)));
        assert!(
            !ended.asked().contains(&"lost"),
            "an ended sale is not a loss"
        );

        let lost = Recorded {
            lost: true,
            ..Recorded::live(Outcome::UnknownProduct)
        };
        assert!(matches!(run(&lost, BODY), Err(Refusal::Recovering)));
        assert_eq!(lost.asked().last(), Some(&"lost"));

        let behind = Recorded {
            ends_at: Utc::now() - chrono::Duration::seconds(1),
            ..Recorded::live(Outcome::WentBack)
        };
        assert!(matches!(run(&behind, BODY), Err(Refusal::Recovering)));
        assert_eq!(behind.asked().last(), Some(&"went_back"));

        // Neither ended nor lost (e.g. not preheated yet): the script's answer stands.
        let unknown = Recorded::live(Outcome::UnknownProduct);
        assert!(matches!(
            run(&unknown, BODY),
            Ok(Answer::Decided(d)) if d.outcome == Outcome::UnknownProduct
        ));
    }
}
