//! Who is asking: shoppers (HS256 JWTs), operators (a bearer token), and purchase tokens (the
//! hidden purchase path, bound to user, product and expiry). Pure functions over secrets; the
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

#[derive(Debug, Deserialize)]
struct UserClaims {
    sub: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct PurchaseClaims {
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
    purchase_encoding: EncodingKey,
    purchase_decoding: DecodingKey,
    purchase_validation: Validation,
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

        let mut purchase_validation = Validation::new(Algorithm::HS256);
        purchase_validation.leeway = 0;
        purchase_validation.set_audience(&[PURCHASE_AUDIENCE]);
        purchase_validation.set_required_spec_claims(&["exp", "sub", "aud"]);

        let token_secret = secrets.token_secret.expose_secret().as_bytes();
        Self {
            user_key: DecodingKey::from_secret(secrets.jwt_secret.expose_secret().as_bytes()),
            user_validation,
            admin_digest: Sha256::digest(secrets.admin_token.expose_secret().as_bytes()).into(),
            purchase_encoding: EncodingKey::from_secret(token_secret),
            purchase_decoding: DecodingKey::from_secret(token_secret),
            purchase_validation,
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

    /// Issues a purchase token for `user` on `product`, expiring after the configured TTL.
    pub fn issue_purchase_token(
        &self,
        user: UserId,
        product: ProductId,
    ) -> anyhow::Result<IssuedToken> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let exp = (now + self.purchase_ttl).as_secs();
        let claims = PurchaseClaims {
            sub: user.to_string(),
            pid: product.get(),
            exp,
            aud: PURCHASE_AUDIENCE.to_owned(),
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.purchase_encoding,
        )?;
        let expires_at = DateTime::from_timestamp(i64::try_from(exp)?, 0).unwrap_or_else(Utc::now);
        Ok(IssuedToken { token, expires_at })
    }

    /// Whether `token` is a valid, unexpired purchase token for this user and product.
    /// The signature is checked in constant time (HMAC verification).
    pub fn check_purchase_token(&self, token: &str, user: UserId, product: ProductId) -> bool {
        match jsonwebtoken::decode::<PurchaseClaims>(
            token,
            &self.purchase_decoding,
            &self.purchase_validation,
        ) {
            Ok(data) => data.claims.sub == user.to_string() && data.claims.pid == product.get(),
            Err(_) => false,
        }
    }
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
    fn an_expired_purchase_token_is_refused() {
        let auth = Auth::new(&secrets(), Duration::from_secs(60));
        let claims = PurchaseClaims {
            sub: "1".into(),
            pid: 9,
            exp: now() - 1,
            aud: PURCHASE_AUDIENCE.into(),
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &auth.purchase_encoding,
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
