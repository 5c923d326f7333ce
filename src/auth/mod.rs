//! Who is asking: shoppers (their login's JWTs: HS256, RS256, ES256 or EdDSA, see [`keys`]), operators (a bearer token), purchase tokens (the
//! hidden purchase path) and stream tokens (a browser's `EventSource`, which cannot send
//! `Authorization`), both bound to user, product and expiry. Pure functions over secrets; the
//! actix extractors live in `http::extract`.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use hashlink::LruCache;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    config::Secrets,
    domain::{ProductId, UserId},
};

pub mod keys;

use keys::UserKeys;

/// Clock skew tolerated on `exp`/`nbf` of shoppers' JWTs.
const LEEWAY_SECS: u64 = 5;
/// The audience of purchase tokens: a shopper's JWT can never pass as one (other key too).
const PURCHASE_AUDIENCE: &str = "seckill:purchase";
/// The audience of stream tokens: same key as purchase tokens, so neither passes as the other.
const STREAM_AUDIENCE: &str = "seckill:stream";
/// The `aud` of an admission token: a waiting room admitted this shopper (`src/room.rs`).
const ADMISSION_AUDIENCE: &str = "seckill:admission";
/// The `aud` of a proof-of-work challenge (`src/pow.rs`).
const CHALLENGE_AUDIENCE: &str = "seckill:challenge";
/// How long a stream token opens streams (a stream it opened lives on to its own lifetime).
pub const STREAM_TOKEN_TTL: Duration = Duration::from_secs(60);
/// How many verified shoppers' JWTs, and how many verified purchase tokens, a process keeps
/// (each: a token of a few hundred bytes; some 10 MB at most).
pub const VERIFIED_TOKENS: usize = 32_768;

#[derive(Debug, Deserialize)]
struct UserClaims {
    sub: String,
    /// Read as a number of either kind: the validation's own parse accepts both.
    exp: f64,
}

/// What a shopper's JWT is.
pub enum UserCheck {
    Valid(UserId),
    Invalid,
    /// It names a `kid` the JWKS does not hold (yet).
    UnknownKid(String),
}

/// The algorithms a shopper's key may verify (each key verifies one of them, its own).
const USER_ALGORITHMS: [Algorithm; 4] = [
    Algorithm::HS256,
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// One validation of shoppers' JWTs per algorithm in [`USER_ALGORITHMS`], each accepting only
/// that one; `aud`/`iss` required when given.
fn user_validations(audience: Option<&str>, issuer: Option<&str>) -> Vec<Validation> {
    USER_ALGORITHMS
        .iter()
        .map(|alg| {
            let mut v = Validation::new(*alg);
            v.leeway = LEEWAY_SECS;
            v.validate_nbf = true;
            v.validate_aud = false;
            let mut required = vec!["exp", "sub"];
            if let Some(audience) = audience {
                v.set_audience(&[audience]);
                v.validate_aud = true;
                required.push("aud");
            }
            if let Some(issuer) = issuer {
                v.set_issuer(&[issuer]);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            v
        })
        .collect()
}

/// The claims of a proof-of-work challenge.
#[derive(Debug, Serialize, Deserialize)]
struct ChallengeClaims {
    sub: String,
    pid: i64,
    exp: u64,
    aud: String,
    /// A random nonce: the challenge is used once.
    n: String,
    /// The difficulty in leading zero bits.
    d: u32,
}

/// A proof-of-work challenge this server signed, as its solver must meet it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: String,
    pub bits: u32,
    pub exp: u64,
}

/// The claims of purchase and stream tokens (told apart by `aud`).
#[derive(Debug, Serialize, Deserialize)]
struct TokenClaims {
    sub: String,
    pid: i64,
    exp: u64,
    aud: String,
}

/// Verifies shoppers, operators and purchase tokens.
pub struct Auth {
    user_keys: UserKeys,
    /// One validation per algorithm a shopper's key may have (each pinned to it).
    user_validations: Vec<Validation>,
    /// SHA-256 of the operators' token: comparing digests takes the same time whatever the
    /// length of the presented token.
    admin_digest: [u8; 32],
    /// Digests of the storefront backend's tokens (`SECKILL_SERVICE_TOKENS`).
    service_digests: Vec<[u8; 32]>,
    /// `SECKILL_TOKEN_SECRET`: signs purchase and stream tokens.
    token_encoding: EncodingKey,
    token_decoding: DecodingKey,
    purchase_validation: Validation,
    stream_validation: Validation,
    admission_validation: Validation,
    challenge_validation: Validation,
    purchase_ttl: Duration,
    /// Shoppers' JWTs verified here, and who they name.
    users: Verified<UserId>,
    /// Purchase tokens verified here, and the user and product they name.
    purchases: Verified<(UserId, ProductId)>,
}

/// Tokens this process has verified, so a shopper who presses "buy" again with the same JWT
/// and purchase token costs a hash lookup instead of an HMAC and two JSON parses (measured: the
/// JWT alone was 9% of a sold-out answer's CPU).
///
/// An entry is the whole token (matched exactly: a token is only ever answered as the token
/// that was verified), what it names, and its `exp`; it is used only before that `exp`, so an
/// expired token goes back to the full verification, which refuses it. Only tokens that passed
/// enter: a flood of bad tokens costs their verifications but evicts nothing. Bounded
/// ([`VERIFIED_TOKENS`]), the least recently used first out. The secrets are fixed for the
/// life of the process, so a verdict never goes stale but by time.
struct Verified<V> {
    slots: Mutex<LruCache<Box<str>, (V, u64)>>,
}

impl<V: Copy> Verified<V> {
    fn new(capacity: usize) -> Self {
        Self {
            slots: Mutex::new(LruCache::new(capacity.max(1))),
        }
    }

    /// What `token` names: from memory while its `exp` (seconds since the epoch) is ahead of
    /// `now`, else from `verify` — which returns what it names and its `exp`, or `None`.
    fn get_or_verify(
        &self,
        token: &str,
        now: u64,
        verify: impl FnOnce() -> Option<(V, u64)>,
    ) -> Option<V> {
        if let Some(named) = self.get(token, now) {
            return Some(named);
        }
        let (named, exp) = verify()?;
        self.insert(token, named, exp);
        Some(named)
    }

    /// What `token` names, from memory, while its `exp` is ahead of `now`.
    fn get(&self, token: &str, now: u64) -> Option<V> {
        let hit = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .copied();
        hit.and_then(|(named, exp)| (now < exp).then_some(named))
    }

    fn insert(&self, token: &str, named: V, exp: u64) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.into(), (named, exp));
    }

    /// Forgets every token (a key they may have been verified with is withdrawn).
    fn clear(&self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A purchase token and when it stops working.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl Auth {
    pub fn new(secrets: &Secrets, purchase_ttl: Duration) -> Self {
        let token_validation = |audience: &str| {
            let mut v = Validation::new(Algorithm::HS256);
            v.leeway = 0;
            v.set_audience(&[audience]);
            v.set_required_spec_claims(&["exp", "sub", "aud"]);
            v
        };

        let token_secret = secrets.token_secret.expose_secret().as_bytes();
        Self {
            user_keys: UserKeys::new(
                secrets
                    .jwt_secret
                    .as_ref()
                    .map(|s| s.expose_secret().as_bytes()),
                Vec::new(),
                None,
            ),
            user_validations: user_validations(None, None),
            admin_digest: Sha256::digest(secrets.admin_token.expose_secret().as_bytes()).into(),
            service_digests: secrets
                .service_tokens
                .iter()
                .map(|t| Sha256::digest(t.expose_secret().as_bytes()).into())
                .collect(),
            token_encoding: EncodingKey::from_secret(token_secret),
            token_decoding: DecodingKey::from_secret(token_secret),
            purchase_validation: token_validation(PURCHASE_AUDIENCE),
            stream_validation: token_validation(STREAM_AUDIENCE),
            admission_validation: token_validation(ADMISSION_AUDIENCE),
            challenge_validation: token_validation(CHALLENGE_AUDIENCE),
            purchase_ttl,
            users: Verified::new(VERIFIED_TOKENS),
            purchases: Verified::new(VERIFIED_TOKENS),
        }
    }

    /// Requires shoppers' JWTs to carry this `aud` and/or `iss` (`None`: not checked).
    pub fn with_user_claims(mut self, audience: Option<&str>, issuer: Option<&str>) -> Self {
        self.user_validations = user_validations(audience, issuer);
        self
    }

    /// Verifies shoppers' JWTs with these keys (the PEM files' and the JWKS' too).
    pub fn with_user_keys(mut self, keys: UserKeys) -> Self {
        self.user_keys = keys;
        self.users.clear();
        self
    }

    pub fn user_keys(&self) -> &UserKeys {
        &self.user_keys
    }

    /// The shopper a bearer JWT names, or `None` for anything not a valid, unexpired token
    /// signed by one of the shoppers' keys with that key's own algorithm, with a positive
    /// 64-bit `sub` (`alg: none`, other algorithms and keys included). A token verified before
    /// is answered from memory until its `exp` ([`Verified`]). A token naming a `kid` the JWKS
    /// does not hold is refused here; [`Auth::user_after_fetch`] fetches the JWKS for it.
    pub fn user(&self, jwt: &str) -> Option<UserId> {
        match self.check_user(jwt) {
            UserCheck::Valid(user) => Some(user),
            UserCheck::Invalid | UserCheck::UnknownKid(_) => None,
        }
    }

    /// [`Auth::user`] of a token [`Auth::check_user`] found naming `kid`, which the JWKS does
    /// not hold: after one fetch of the JWKS (at most once per [`keys::JWKS_MIN_INTERVAL`] for
    /// every request at once).
    pub async fn user_after_fetch(&self, jwt: &str, kid: &str) -> Option<UserId> {
        let jwks = self.user_keys.jwks()?;
        match jwks.refresh_for(kid).await {
            Some(Ok(fetched)) => self.fetched(fetched),
            Some(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "fetching the JWKS for an unknown kid failed; the keys held are kept");
            }
            None => {}
        }
        self.user(jwt)
    }

    /// After a JWKS fetch: a withdrawn key's tokens must not pass from memory any more.
    pub fn fetched(&self, fetched: keys::Fetched) {
        if fetched.withdrew {
            self.users.clear();
        }
    }

    /// What a shopper's JWT is: verified once (or answered from memory), so a caller can tell
    /// a refused token from one worth a JWKS fetch without verifying it again.
    pub fn check_user(&self, jwt: &str) -> UserCheck {
        let now = unix_now();
        if let Some(user) = self.users.get(jwt, now) {
            return UserCheck::Valid(user);
        }
        let Ok(header) = jsonwebtoken::decode_header(jwt) else {
            return UserCheck::Invalid;
        };
        let candidates = self.user_keys.candidates(&header);
        for key in &candidates.keys {
            let Some(validation) = self
                .user_validations
                .iter()
                .find(|v| v.algorithms == [key.alg])
            else {
                continue;
            };
            let Ok(data) = jsonwebtoken::decode::<UserClaims>(jwt, &key.key, validation) else {
                continue;
            };
            let Ok(user) = UserId::try_from(data.claims.sub.as_str()) else {
                return UserCheck::Invalid;
            };
            self.users.insert(jwt, user, data.claims.exp as u64);
            return UserCheck::Valid(user);
        }
        match header.kid {
            Some(kid) if candidates.unknown_kid => UserCheck::UnknownKid(kid),
            _ => UserCheck::Invalid,
        }
    }

    /// Whether `token` is the operators' token: fixed-length digests compared in constant
    /// time, so neither the content nor the length of the real token leaks through timing.
    pub fn is_admin(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        bool::from(presented.ct_eq(&self.admin_digest))
    }

    /// Whether `token` is one of the storefront backend's tokens: compared with every one of
    /// them, digests in constant time and without stopping at a match, so neither which token
    /// matched nor how many there are leaks through timing.
    pub fn is_service(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let matched = self
            .service_digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, d| acc | presented.ct_eq(d));
        bool::from(matched)
    }

    /// Signs a token for `user` on `product` with `audience`, expiring after `ttl`.
    fn sign(
        &self,
        user: UserId,
        product: ProductId,
        audience: &str,
        ttl: Duration,
    ) -> anyhow::Result<IssuedToken> {
        let exp = expiry(ttl)?;
        self.encode(
            &TokenClaims {
                sub: user.to_string(),
                pid: product.get(),
                exp,
                aud: audience.to_owned(),
            },
            exp,
        )
    }

    /// `claims` signed with the token key (HS256), expiring at `exp`.
    fn encode(&self, claims: &impl Serialize, exp: u64) -> anyhow::Result<IssuedToken> {
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.token_encoding)?;
        let expires_at = DateTime::from_timestamp(i64::try_from(exp)?, 0).unwrap_or_else(Utc::now);
        Ok(IssuedToken { token, expires_at })
    }

    /// The user and product a valid, unexpired token of `validation`'s audience names, and its
    /// `exp`. The signature is checked in constant time (HMAC verification).
    fn verify(&self, token: &str, validation: &Validation) -> Option<((UserId, ProductId), u64)> {
        let claims = jsonwebtoken::decode::<TokenClaims>(token, &self.token_decoding, validation)
            .ok()?
            .claims;
        let user = UserId::try_from(claims.sub.as_str()).ok()?;
        let product = ProductId::try_from(claims.pid).ok()?;
        Some(((user, product), claims.exp))
    }

    /// Issues a purchase token for `user` on `product`, expiring after the configured TTL.
    pub fn issue_purchase_token(
        &self,
        user: UserId,
        product: ProductId,
    ) -> anyhow::Result<IssuedToken> {
        self.sign(user, product, PURCHASE_AUDIENCE, self.purchase_ttl)
    }

    /// Whether `token` is a valid, unexpired purchase token for this user and product.
    /// A token verified before is answered from memory until its `exp` ([`Verified`]).
    pub fn check_purchase_token(&self, token: &str, user: UserId, product: ProductId) -> bool {
        self.purchases.get_or_verify(token, unix_now(), || {
            self.verify(token, &self.purchase_validation)
        }) == Some((user, product))
    }

    /// Issues a stream token for `user` on `product` ([`STREAM_TOKEN_TTL`]).
    pub fn issue_stream_token(
        &self,
        user: UserId,
        product: ProductId,
    ) -> anyhow::Result<IssuedToken> {
        self.sign(user, product, STREAM_AUDIENCE, STREAM_TOKEN_TTL)
    }

    /// Issues an admission token: `product`'s waiting room admitted `user` until `ttl` from
    /// now; the purchase-token endpoint of a product with a room requires one.
    pub fn issue_admission_token(
        &self,
        user: UserId,
        product: ProductId,
        ttl: Duration,
    ) -> anyhow::Result<IssuedToken> {
        self.sign(user, product, ADMISSION_AUDIENCE, ttl)
    }

    /// Whether `token` is a valid, unexpired admission token of `user` for `product` (a
    /// purchase or stream token, of another audience, is not one).
    pub fn check_admission_token(&self, token: &str, user: UserId, product: ProductId) -> bool {
        self.verify(token, &self.admission_validation)
            .is_some_and(|(named, _)| named == (user, product))
    }

    /// A proof-of-work challenge for `user` joining `product`'s room: `bits` of difficulty, a
    /// random nonce, valid for `ttl`.
    pub fn issue_challenge(
        &self,
        user: UserId,
        product: ProductId,
        bits: u32,
        ttl: Duration,
    ) -> anyhow::Result<IssuedToken> {
        let exp = expiry(ttl)?;
        self.encode(
            &ChallengeClaims {
                sub: user.to_string(),
                pid: product.get(),
                exp,
                aud: CHALLENGE_AUDIENCE.to_owned(),
                n: hex::encode(fastrand::u128(..).to_be_bytes()),
                d: bits,
            },
            exp,
        )
    }

    /// The challenge, if `challenge` is one this server signed for `user` and `product` and it
    /// has not expired (whether it was solved, and used before, is the caller's to check).
    pub fn check_challenge(
        &self,
        challenge: &str,
        user: UserId,
        product: ProductId,
    ) -> Option<Challenge> {
        let c = jsonwebtoken::decode::<ChallengeClaims>(
            challenge,
            &self.token_decoding,
            &self.challenge_validation,
        )
        .ok()?
        .claims;
        (c.sub == user.to_string() && c.pid == product.get()).then_some(Challenge {
            nonce: c.n,
            bits: c.d,
            exp: c.exp,
        })
    }

    /// The user a valid, unexpired stream token for `product` names. A shopper's JWT (other
    /// key) or a purchase token (other audience) is not one.
    pub fn stream_token_user(&self, token: &str, product: ProductId) -> Option<UserId> {
        let ((user, named), _) = self.verify(token, &self.stream_validation)?;
        (named == product).then_some(user)
    }
}

/// Unix seconds `ttl` from now.
fn expiry(ttl: Duration) -> anyhow::Result<u64> {
    Ok((SystemTime::now().duration_since(UNIX_EPOCH)? + ttl).as_secs())
}

/// Fetches the shoppers' JWKS every [`keys::JWKS_REFRESH`] until shutdown (without one, it only
/// waits for the shutdown).
pub async fn refresh_jwks(
    auth: std::sync::Arc<Auth>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let Some(jwks) = auth.user_keys().jwks() else {
        // Every task of the process runs until shutdown (one that ends stops the process).
        shutdown.cancelled().await;
        return Ok(());
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(keys::JWKS_REFRESH) => {}
        }
        match jwks.refresh().await {
            Ok(fetched) => auth.fetched(fetched),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "fetching the shoppers' JWKS failed; the keys held are kept")
            }
        }
    }
}

/// Signs a shopper's JWT (HS256) with `secret`, as a storefront's login would: for the tools
/// (`seckill dev-token`, the load test). The server itself only verifies these.
pub fn sign_user_jwt(secret: &str, claims: &serde_json::Value) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The claims of a shopper's JWT for `user`, valid for `ttl` from now, carrying the `aud` and
/// `iss` this deployment checks (if any).
pub fn user_claims(
    user: UserId,
    ttl: Duration,
    audience: Option<&str>,
    issuer: Option<&str>,
) -> serde_json::Value {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ttl)
        .as_secs();
    let mut claims = serde_json::json!({"sub": user.to_string(), "exp": exp});
    if let Some(aud) = audience {
        claims["aud"] = aud.into();
    }
    if let Some(iss) = issuer {
        claims["iss"] = iss.into();
    }
    claims
}

/// A shopper's JWT for `user` signed with this deployment's `SECKILL_JWT_SECRET`, valid for
/// `ttl` (with its `aud`/`iss`): `seckill dev-token` and the storefront page's development
/// login. `None` outside development mode: in production the storefront's own login issues
/// shoppers' JWTs.
pub fn dev_user_jwt(
    settings: &crate::config::Settings,
    user: UserId,
    ttl: Duration,
) -> Option<anyhow::Result<String>> {
    if !settings.dev {
        return None;
    }
    Some((|| {
        let secrets = settings.secrets()?;
        let claims = user_claims(
            user,
            ttl,
            settings.jwt_audience.as_deref(),
            settings.jwt_issuer.as_deref(),
        );
        let secret = secrets.jwt_secret.as_ref().context(
            "development tokens are signed with SECKILL_JWT_SECRET, which is not set (the shoppers' keys come from SECKILL_JWT_JWKS_URL or SECKILL_JWT_PUBLIC_KEYS)",
        )?;
        sign_user_jwt(secret.expose_secret(), &claims)
    })())
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;
    use serde_json::json;

    use super::*;

    fn secrets() -> Secrets {
        Secrets {
            jwt_secret: Some(SecretString::from("jwt-secret-0123456789")),
            admin_token: SecretString::from("admin-token-0123456789"),
            token_secret: SecretString::from("token-secret-0123456789"),
            service_tokens: vec![
                SecretString::from("service-token-a-0123456789abcdef0123"),
                SecretString::from("service-token-b-0123456789abcdef0123"),
            ],
        }
    }

    fn jwt(claims: serde_json::Value, key: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    fn b64(v: &serde_json::Value) -> String {
        use std::fmt::Write;
        // Minimal base64url without padding, so the test needs no extra crate.
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = v.to_string().into_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                let _ = write!(out, "{}", A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn a_signed_user_jwt_passes_the_checks_it_was_made_for() {
        let user = UserId::try_from(42).unwrap();
        let plain = sign_user_jwt(
            "jwt-secret-0123456789",
            &user_claims(user, Duration::from_secs(60), None, None),
        )
        .unwrap();
        assert_eq!(
            Auth::new(&secrets(), Duration::from_secs(60)).user(&plain),
            Some(user)
        );
        let strict = Auth::new(&secrets(), Duration::from_secs(60))
            .with_user_claims(Some("shop"), Some("https://id.example"));
        assert_eq!(
            strict.user(&plain),
            None,
            "aud and iss are required when set"
        );
        let claims = user_claims(
            user,
            Duration::from_secs(60),
            Some("shop"),
            Some("https://id.example"),
        );
        let full = sign_user_jwt("jwt-secret-0123456789", &claims).unwrap();
        assert_eq!(strict.user(&full), Some(user));
        let expired = sign_user_jwt(
            "jwt-secret-0123456789",
            &json!({"sub": "42", "exp": unix_now() - 60}),
        )
        .unwrap();
        assert_eq!(strict.user(&expired), None);
    }

    #[test]
    fn a_challenge_is_its_shoppers_for_its_product_and_expires() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let (u, p) = (
            UserId::try_from(1_i64).unwrap(),
            ProductId::try_from(9_i64).unwrap(),
        );
        let issued = auth
            .issue_challenge(u, p, 12, Duration::from_secs(60))
            .unwrap();
        let c = auth.check_challenge(&issued.token, u, p).unwrap();
        assert_eq!(c.bits, 12);
        assert_eq!(c.nonce.len(), 32, "128 random bits");
        let other = auth
            .issue_challenge(u, p, 12, Duration::from_secs(60))
            .unwrap();
        assert_ne!(
            auth.check_challenge(&other.token, u, p).unwrap().nonce,
            c.nonce
        );
        let (v, q) = (
            UserId::try_from(2_i64).unwrap(),
            ProductId::try_from(8_i64).unwrap(),
        );
        assert!(auth.check_challenge(&issued.token, v, p).is_none());
        assert!(auth.check_challenge(&issued.token, u, q).is_none());
        // Neither a purchase token nor an admission token passes as a challenge.
        let purchase = auth.issue_purchase_token(u, p).unwrap();
        assert!(auth.check_challenge(&purchase.token, u, p).is_none());
        assert!(!auth.check_admission_token(&issued.token, u, p));
        let expired = auth.issue_challenge(u, p, 12, Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(1_100));
        assert!(auth.check_challenge(&expired.token, u, p).is_none());
    }

    #[test]
    fn a_valid_jwt_names_its_user() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let token = jwt(
            json!({"sub": "42", "exp": unix_now() + 60}),
            "jwt-secret-0123456789",
        );
        assert_eq!(auth.user(&token), Some(UserId::try_from(42_i64).unwrap()));
    }

    #[test]
    fn bad_jwts_name_nobody() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let key = "jwt-secret-0123456789";
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&json!({"sub": "42", "exp": unix_now() + 60}))
        );
        let cases = [
            (
                "wrong key",
                jwt(
                    json!({"sub": "42", "exp": unix_now() + 60}),
                    "another-secret-0123456789",
                ),
            ),
            (
                "expired",
                jwt(json!({"sub": "42", "exp": unix_now() - 60}), key),
            ),
            ("no exp", jwt(json!({"sub": "42"}), key)),
            (
                "future nbf",
                jwt(
                    json!({"sub": "42", "exp": unix_now() + 600, "nbf": unix_now() + 300}),
                    key,
                ),
            ),
            (
                "zero sub",
                jwt(json!({"sub": "0", "exp": unix_now() + 60}), key),
            ),
            (
                "negative sub",
                jwt(json!({"sub": "-4", "exp": unix_now() + 60}), key),
            ),
            (
                "numeric sub",
                jwt(json!({"sub": 42, "exp": unix_now() + 60}), key),
            ),
            ("alg none", none),
            ("garbage", "not.a.jwt".to_owned()),
        ];
        for (name, token) in cases {
            assert_eq!(auth.user(&token), None, "{name}");
        }
    }

    #[test]
    fn purchase_tokens_are_bound_to_user_and_product() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let (u, p) = (
            UserId::try_from(1_i64).unwrap(),
            ProductId::try_from(9_i64).unwrap(),
        );
        let issued = auth.issue_purchase_token(u, p).unwrap();
        assert!(auth.check_purchase_token(&issued.token, u, p));
        assert!(!auth.check_purchase_token(&issued.token, UserId::try_from(2_i64).unwrap(), p));
        assert!(!auth.check_purchase_token(&issued.token, u, ProductId::try_from(8_i64).unwrap()));
        let mut altered = issued.token.clone();
        altered.pop();
        altered.push(if issued.token.ends_with('A') {
            'B'
        } else {
            'A'
        });
        assert!(!auth.check_purchase_token(&altered, u, p));
        // A shopper's JWT is not a purchase token.
        let user_jwt = jwt(
            json!({"sub": "1", "exp": unix_now() + 60, "pid": 9}),
            "jwt-secret-0123456789",
        );
        assert!(!auth.check_purchase_token(&user_jwt, u, p));
    }

    #[test]
    fn stream_tokens_name_their_user_for_their_product_only() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let (u, p) = (
            UserId::try_from(1_i64).unwrap(),
            ProductId::try_from(9_i64).unwrap(),
        );
        let other = ProductId::try_from(8_i64).unwrap();
        let stream = auth.issue_stream_token(u, p).unwrap();
        assert_eq!(auth.stream_token_user(&stream.token, p), Some(u));
        assert_eq!(auth.stream_token_user(&stream.token, other), None);
        // Neither kind of token passes as the other, and a shopper's JWT is neither.
        let purchase = auth.issue_purchase_token(u, p).unwrap();
        assert_eq!(auth.stream_token_user(&purchase.token, p), None);
        assert!(!auth.check_purchase_token(&stream.token, u, p));
        let user_jwt = jwt(
            json!({"sub": "1", "exp": unix_now() + 60, "pid": 9, "aud": STREAM_AUDIENCE}),
            "jwt-secret-0123456789",
        );
        assert_eq!(auth.stream_token_user(&user_jwt, p), None);
        let expired = jwt(
            json!({"sub": "1", "exp": unix_now() - 1, "pid": 9, "aud": STREAM_AUDIENCE}),
            "token-secret-0123456789",
        );
        assert_eq!(auth.stream_token_user(&expired, p), None);
    }

    #[test]
    fn a_verified_token_is_answered_from_memory_only_before_its_exp() {
        let cache: Verified<u32> = Verified::new(8);
        let calls = std::cell::Cell::new(0);
        let verify = |named, exp| {
            calls.set(calls.get() + 1);
            Some((named, exp))
        };
        assert_eq!(cache.get_or_verify("a", 100, || verify(1, 110)), Some(1));
        // Before its exp: from memory, whatever the verification would say now.
        assert_eq!(cache.get_or_verify("a", 109, || None), Some(1));
        assert_eq!(calls.get(), 1);
        // At and past its exp: verified again, and what the verification says stands.
        assert_eq!(cache.get_or_verify("a", 110, || None), None);
        assert_eq!(cache.get_or_verify("a", 111, || verify(1, 200)), Some(1));
        assert_eq!(calls.get(), 2);
        // A token is matched exactly: a prefix or an extension of it is another token.
        assert_eq!(cache.get_or_verify("a ", 111, || None), None);
        assert_eq!(cache.get_or_verify("", 111, || None), None);
    }

    #[test]
    fn refused_tokens_never_enter_and_the_cache_is_bounded() {
        let cache: Verified<u32> = Verified::new(3);
        for i in 0..100 {
            assert_eq!(cache.get_or_verify(&format!("bad{i}"), 1, || None), None);
        }
        assert_eq!(cache.len(), 0);
        for i in 0..10_u32 {
            cache.get_or_verify(&format!("ok{i}"), 1, || Some((i, 10)));
        }
        assert_eq!(cache.len(), 3);
        // The least recently used went first: ok9 is still known, ok0 is verified again.
        assert_eq!(cache.get_or_verify("ok9", 2, || None), Some(9));
        assert_eq!(cache.get_or_verify("ok0", 2, || None), None);
    }

    #[test]
    fn a_remembered_purchase_token_is_still_bound_to_its_user_and_product() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let (u, p) = (
            UserId::try_from(1_i64).unwrap(),
            ProductId::try_from(9_i64).unwrap(),
        );
        let issued = auth.issue_purchase_token(u, p).unwrap();
        for _ in 0..3 {
            assert!(auth.check_purchase_token(&issued.token, u, p));
            assert!(!auth.check_purchase_token(&issued.token, UserId::try_from(2_i64).unwrap(), p));
            assert!(!auth.check_purchase_token(
                &issued.token,
                u,
                ProductId::try_from(8_i64).unwrap()
            ));
        }
        assert_eq!(auth.purchases.len(), 1);
        // A stream token is never taken for the purchase token it is not, nor the reverse,
        // whatever either cache holds.
        let stream = auth.issue_stream_token(u, p).unwrap();
        assert_eq!(auth.stream_token_user(&stream.token, p), Some(u));
        assert!(!auth.check_purchase_token(&stream.token, u, p));
        assert_eq!(auth.stream_token_user(&issued.token, p), None);
        // A shopper's JWT, once remembered, still names its user, and is no purchase token.
        let user_jwt = jwt(
            json!({"sub": "1", "exp": unix_now() + 60}),
            "jwt-secret-0123456789",
        );
        assert_eq!(auth.user(&user_jwt), Some(u));
        assert_eq!(auth.user(&user_jwt), Some(u));
        assert_eq!(auth.users.len(), 1);
        assert!(!auth.check_purchase_token(&user_jwt, u, p));
        assert_eq!(auth.users.len(), 1);
    }

    #[test]
    fn an_expired_purchase_token_is_refused() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let claims = TokenClaims {
            sub: "1".into(),
            pid: 9,
            exp: unix_now() - 1,
            aud: PURCHASE_AUDIENCE.into(),
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &auth.token_encoding,
        )
        .unwrap();
        assert!(!auth.check_purchase_token(
            &token,
            UserId::try_from(1_i64).unwrap(),
            ProductId::try_from(9_i64).unwrap()
        ));
    }

    #[test]
    fn any_service_token_opens_the_service_door_and_no_other_token_does() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        assert!(auth.is_service("service-token-a-0123456789abcdef0123"));
        assert!(auth.is_service("service-token-b-0123456789abcdef0123"));
        assert!(!auth.is_service("service-token-c-0123456789abcdef0123"));
        assert!(!auth.is_service("service-token-a-0123456789abcdef012"));
        assert!(!auth.is_service(""));
        // The doors are apart: the admin token is not a service token, nor the reverse.
        assert!(!auth.is_service("admin-token-0123456789"));
        assert!(!auth.is_admin("service-token-a-0123456789abcdef0123"));
        let none = Auth::new(
            &Secrets {
                service_tokens: Vec::new(),
                ..secrets()
            },
            Duration::from_secs(60),
        );
        assert!(!none.is_service("service-token-a-0123456789abcdef0123"));
        assert!(!none.is_service(""));
    }

    #[test]
    fn the_admin_token_must_match_exactly() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        assert!(auth.is_admin("admin-token-0123456789"));
        assert!(!auth.is_admin("admin-token-012345678"));
        assert!(!auth.is_admin(""));
        assert!(!auth.is_admin("admin-token-01234567890"));
        assert!(!auth.is_admin("admin-token-0123456788"));
        assert!(!auth.is_admin(&"admin-token-0123456789".repeat(100)));
        assert!(!auth.is_admin("a"));
        // Only fixed-length digests are kept and compared, never the token itself.
        assert_eq!(
            auth.admin_digest,
            <[u8; 32]>::from(Sha256::digest(b"admin-token-0123456789"))
        );
    }

    #[test]
    fn a_configured_audience_and_issuer_are_required() {
        let key = "jwt-secret-0123456789";
        let exp = unix_now() + 60;
        let user = Some(UserId::try_from(42_i64).unwrap());
        let both = Auth::new(&secrets(), Duration::from_secs(60))
            .with_user_claims(Some("shop"), Some("https://id.example"));
        let right = json!({"sub": "42", "exp": exp, "aud": "shop", "iss": "https://id.example"});
        assert_eq!(both.user(&jwt(right.clone(), key)), user);
        let in_a_list =
            json!({"sub": "42", "exp": exp, "aud": ["other", "shop"], "iss": "https://id.example"});
        assert_eq!(both.user(&jwt(in_a_list, key)), user);
        for (name, claims) in [
            (
                "no aud",
                json!({"sub": "42", "exp": exp, "iss": "https://id.example"}),
            ),
            ("no iss", json!({"sub": "42", "exp": exp, "aud": "shop"})),
            ("neither", json!({"sub": "42", "exp": exp})),
            (
                "other aud",
                json!({"sub": "42", "exp": exp, "aud": "admin", "iss": "https://id.example"}),
            ),
            (
                "other iss",
                json!({"sub": "42", "exp": exp, "aud": "shop", "iss": "https://evil.example"}),
            ),
        ] {
            assert_eq!(both.user(&jwt(claims, key)), None, "{name}");
        }
        let aud_only =
            Auth::new(&secrets(), Duration::from_secs(60)).with_user_claims(Some("shop"), None);
        assert_eq!(
            aud_only.user(&jwt(json!({"sub": "42", "exp": exp, "aud": "shop"}), key)),
            user
        );
        assert_eq!(
            aud_only.user(&jwt(json!({"sub": "42", "exp": exp}), key)),
            None
        );
        let iss_only = Auth::new(&secrets(), Duration::from_secs(60))
            .with_user_claims(None, Some("https://id.example"));
        assert_eq!(
            iss_only.user(&jwt(
                json!({"sub": "42", "exp": exp, "iss": "https://id.example"}),
                key
            )),
            user
        );
        assert_eq!(
            iss_only.user(&jwt(json!({"sub": "42", "exp": exp}), key)),
            None
        );
        // Unset, neither claim is checked (as before).
        let neither = Auth::new(&secrets(), Duration::from_secs(60)).with_user_claims(None, None);
        assert_eq!(neither.user(&jwt(right, key)), user);
        assert_eq!(
            neither.user(&jwt(
                json!({"sub": "42", "exp": exp, "aud": "x", "iss": "y"}),
                key
            )),
            user
        );
        assert_eq!(
            neither.user(&jwt(json!({"sub": "42", "exp": exp}), key)),
            user
        );
    }
}
