//! Who is asking: shoppers (HS256 JWTs), operators (a bearer token), purchase tokens (the
//! hidden purchase path) and stream tokens (a browser's `EventSource`, which cannot send
//! `Authorization`), both bound to user, product and expiry. Pure functions over secrets; the
//! actix extractors live in `http::extract`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    config::Secrets,
    domain::{ProductId, UserId},
};

/// Clock skew tolerated on `exp`/`nbf` of shoppers' JWTs.
const LEEWAY_SECS: u64 = 5;
/// The audience of purchase tokens: a shopper's JWT can never pass as one (other key too).
const PURCHASE_AUDIENCE: &str = "seckill:purchase";
/// The audience of stream tokens: same key as purchase tokens, so neither passes as the other.
const STREAM_AUDIENCE: &str = "seckill:stream";
/// How long a stream token opens streams (a stream it opened lives on to its own lifetime).
pub const STREAM_TOKEN_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
struct UserClaims {
    sub: String,
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
    user_key: DecodingKey,
    user_validation: Validation,
    /// SHA-256 of the operators' token: comparing digests takes the same time whatever the
    /// length of the presented token.
    admin_digest: [u8; 32],
    /// `SECKILL_TOKEN_SECRET`: signs purchase and stream tokens.
    token_encoding: EncodingKey,
    token_decoding: DecodingKey,
    purchase_validation: Validation,
    stream_validation: Validation,
    purchase_ttl: Duration,
}

/// A purchase token and when it stops working.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl Auth {
    pub fn new(secrets: &Secrets, purchase_ttl: Duration) -> Self {
        let mut user_validation = Validation::new(Algorithm::HS256);
        user_validation.leeway = LEEWAY_SECS;
        user_validation.validate_nbf = true;
        user_validation.validate_aud = false;
        user_validation.set_required_spec_claims(&["exp", "sub"]);

        let token_validation = |audience: &str| {
            let mut v = Validation::new(Algorithm::HS256);
            v.leeway = 0;
            v.set_audience(&[audience]);
            v.set_required_spec_claims(&["exp", "sub", "aud"]);
            v
        };

        let token_secret = secrets.token_secret.expose_secret().as_bytes();
        Self {
            user_key: DecodingKey::from_secret(secrets.jwt_secret.expose_secret().as_bytes()),
            user_validation,
            admin_digest: Sha256::digest(secrets.admin_token.expose_secret().as_bytes()).into(),
            token_encoding: EncodingKey::from_secret(token_secret),
            token_decoding: DecodingKey::from_secret(token_secret),
            purchase_validation: token_validation(PURCHASE_AUDIENCE),
            stream_validation: token_validation(STREAM_AUDIENCE),
            purchase_ttl,
        }
    }

    /// Requires shoppers' JWTs to carry this `aud` and/or `iss` (`None`: not checked).
    pub fn with_user_claims(mut self, audience: Option<&str>, issuer: Option<&str>) -> Self {
        let mut required = vec!["exp", "sub"];
        if let Some(audience) = audience {
            self.user_validation.set_audience(&[audience]);
            self.user_validation.validate_aud = true;
            required.push("aud");
        }
        if let Some(issuer) = issuer {
            self.user_validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        self.user_validation.set_required_spec_claims(&required);
        self
    }

    /// The shopper a bearer JWT names, or `None` for anything not a valid, unexpired HS256
    /// token with a positive 64-bit `sub` (`alg: none`, other algorithms and keys included).
    pub fn user(&self, jwt: &str) -> Option<UserId> {
        let data =
            jsonwebtoken::decode::<UserClaims>(jwt, &self.user_key, &self.user_validation).ok()?;
        UserId::try_from(data.claims.sub.as_str()).ok()
    }

    /// Whether `token` is the operators' token: fixed-length digests compared in constant
    /// time, so neither the content nor the length of the real token leaks through timing.
    pub fn is_admin(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        bool::from(presented.ct_eq(&self.admin_digest))
    }

    /// Signs a token for `user` on `product` with `audience`, expiring after `ttl`.
    fn sign(
        &self,
        user: UserId,
        product: ProductId,
        audience: &str,
        ttl: Duration,
    ) -> anyhow::Result<IssuedToken> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let exp = (now + ttl).as_secs();
        let claims = TokenClaims {
            sub: user.to_string(),
            pid: product.get(),
            exp,
            aud: audience.to_owned(),
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.token_encoding,
        )?;
        let expires_at = DateTime::from_timestamp(i64::try_from(exp)?, 0).unwrap_or_else(Utc::now);
        Ok(IssuedToken { token, expires_at })
    }

    /// The user a valid, unexpired token of `validation`'s audience names for `product`.
    /// The signature is checked in constant time (HMAC verification).
    fn verify(&self, token: &str, validation: &Validation, product: ProductId) -> Option<UserId> {
        let data =
            jsonwebtoken::decode::<TokenClaims>(token, &self.token_decoding, validation).ok()?;
        if data.claims.pid != product.get() {
            return None;
        }
        UserId::try_from(data.claims.sub.as_str()).ok()
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
    pub fn check_purchase_token(&self, token: &str, user: UserId, product: ProductId) -> bool {
        self.verify(token, &self.purchase_validation, product) == Some(user)
    }

    /// Issues a stream token for `user` on `product` ([`STREAM_TOKEN_TTL`]).
    pub fn issue_stream_token(
        &self,
        user: UserId,
        product: ProductId,
    ) -> anyhow::Result<IssuedToken> {
        self.sign(user, product, STREAM_AUDIENCE, STREAM_TOKEN_TTL)
    }

    /// The user a valid, unexpired stream token for `product` names. A shopper's JWT (other
    /// key) or a purchase token (other audience) is not one.
    pub fn stream_token_user(&self, token: &str, product: ProductId) -> Option<UserId> {
        self.verify(token, &self.stream_validation, product)
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
        sign_user_jwt(secrets.jwt_secret.expose_secret(), &claims)
    })())
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;
    use serde_json::json;

    use super::*;

    fn secrets() -> Secrets {
        Secrets {
            jwt_secret: SecretString::from("jwt-secret-0123456789"),
            admin_token: SecretString::from("admin-token-0123456789"),
            token_secret: SecretString::from("token-secret-0123456789"),
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
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
            &json!({"sub": "42", "exp": now() - 60}),
        )
        .unwrap();
        assert_eq!(strict.user(&expired), None);
    }

    #[test]
    fn a_valid_jwt_names_its_user() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let token = jwt(
            json!({"sub": "42", "exp": now() + 60}),
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
            b64(&json!({"sub": "42", "exp": now() + 60}))
        );
        let cases = [
            (
                "wrong key",
                jwt(
                    json!({"sub": "42", "exp": now() + 60}),
                    "another-secret-0123456789",
                ),
            ),
            ("expired", jwt(json!({"sub": "42", "exp": now() - 60}), key)),
            ("no exp", jwt(json!({"sub": "42"}), key)),
            (
                "future nbf",
                jwt(
                    json!({"sub": "42", "exp": now() + 600, "nbf": now() + 300}),
                    key,
                ),
            ),
            ("zero sub", jwt(json!({"sub": "0", "exp": now() + 60}), key)),
            (
                "negative sub",
                jwt(json!({"sub": "-4", "exp": now() + 60}), key),
            ),
            (
                "numeric sub",
                jwt(json!({"sub": 42, "exp": now() + 60}), key),
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
            json!({"sub": "1", "exp": now() + 60, "pid": 9}),
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
            json!({"sub": "1", "exp": now() + 60, "pid": 9, "aud": STREAM_AUDIENCE}),
            "jwt-secret-0123456789",
        );
        assert_eq!(auth.stream_token_user(&user_jwt, p), None);
        let expired = jwt(
            json!({"sub": "1", "exp": now() - 1, "pid": 9, "aud": STREAM_AUDIENCE}),
            "token-secret-0123456789",
        );
        assert_eq!(auth.stream_token_user(&expired, p), None);
    }

    #[test]
    fn an_expired_purchase_token_is_refused() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let claims = TokenClaims {
            sub: "1".into(),
            pid: 9,
            exp: now() - 1,
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
        let exp = now() + 60;
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
