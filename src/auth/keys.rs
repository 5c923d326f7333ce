//! The keys that verify shoppers' JWTs: the HS256 secret (`SECKILL_JWT_SECRET`), public keys
//! from PEM files (`SECKILL_JWT_PUBLIC_KEYS`) and the storefront login's JWKS
//! (`SECKILL_JWT_JWKS_URL`) — any of them, together.
//!
//! **Each key verifies one algorithm, the one it was made for** — RS256 for an RSA key, ES256
//! for a P-256 key, EdDSA for an Ed25519 key, HS256 for the secret — never the one a token's
//! header asks for: a token whose `alg` is not its key's is refused, so a public key can never be
//! used as an HS256 secret (`alg` confusion). A JWK whose own `alg` names another algorithm is
//! left out, and so are symmetric (`oct`) and encryption (`use: enc`) keys.
//!
//! **The JWKS** is fetched at start (a process does not start without it), again every
//! [`JWKS_REFRESH`], and again when a token names a `kid` it does not hold — at most once per
//! [`JWKS_MIN_INTERVAL`], one fetch shared by every request that waits for it. A fetch that
//! fails keeps the keys held, **for at most [`JWKS_STALE_MAX`] after the last fetch that
//! worked**; after that they are dropped and RS256/ES256/EdDSA tokens are refused until the URL
//! answers again. A fetch reads at most [`JWKS_MAX_BYTES`] and keeps at most [`JWKS_MAX_KEYS`].
//! Several keys at once (rotation): the login publishes the new key, signs with it, and
//! withdraws the old one later; a token signed by a withdrawn key is refused from the next
//! fetch on (tokens verified before are forgotten then, see `Auth`'s verified-token memory).

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context;
use jsonwebtoken::{
    Algorithm, DecodingKey, Header,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse},
};
use prometheus::{IntCounterVec, IntGauge};

/// How often the JWKS is fetched again anyway.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// The least time between two fetches caused by unknown `kid`s.
pub const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// How long keys are kept while the JWKS URL keeps failing.
pub const JWKS_STALE_MAX: Duration = Duration::from_secs(24 * 3600);
/// How long one fetch may take.
pub const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS document read.
pub const JWKS_MAX_BYTES: usize = 1 << 20;
/// The most keys kept from one JWKS.
pub const JWKS_MAX_KEYS: usize = 100;

/// A key and the one algorithm it verifies.
pub struct UserKey {
    pub alg: Algorithm,
    pub key: DecodingKey,
}

/// Which keys may verify a token, from its header.
#[derive(Default)]
pub struct Candidates {
    /// Each with its own algorithm, which is the header's `alg`.
    pub keys: Vec<Arc<UserKey>>,
    /// The token names a `kid` the JWKS does not hold (yet): worth one fetch.
    pub unknown_kid: bool,
}

/// The JWKS as last fetched.
#[derive(Default)]
struct Held {
    by_kid: HashMap<String, Arc<UserKey>>,
    /// Keys without a `kid` (tried for tokens without one).
    anonymous: Vec<Arc<UserKey>>,
    /// When a fetch last worked.
    fetched_at: Option<Instant>,
}

/// What a fetch changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    pub keys: usize,
    /// A key held before is gone from the set.
    pub withdrew: bool,
}

/// The storefront login's JWKS, fetched and refreshed.
pub struct Jwks {
    url: String,
    client: reqwest::Client,
    held: RwLock<Arc<Held>>,
    /// When the last fetch was tried (held while fetching: one fetch at a time).
    last_try: tokio::sync::Mutex<Option<Instant>>,
    fetches: Option<IntCounterVec>,
    keys: Option<IntGauge>,
}

impl Jwks {
    pub fn new(url: &str, metrics: Option<(IntCounterVec, IntGauge)>) -> anyhow::Result<Self> {
        let client = crate::tls::http_client()
            .timeout(JWKS_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .context("building the JWKS client")?;
        let (fetches, keys) = metrics.unzip();
        Ok(Self {
            url: url.to_owned(),
            client,
            held: RwLock::default(),
            last_try: tokio::sync::Mutex::new(None),
            fetches,
            keys,
        })
    }

    fn held(&self) -> Arc<Held> {
        self.held
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The keys that may verify a token with this header (`kid`, `alg`).
    fn candidates(&self, header: &Header) -> Candidates {
        let held = self.held();
        match &header.kid {
            Some(kid) => match held.by_kid.get(kid) {
                Some(key) => Candidates {
                    keys: pinned(vec![key.clone()], header.alg),
                    unknown_kid: false,
                },
                None => Candidates {
                    keys: Vec::new(),
                    unknown_kid: true,
                },
            },
            None => Candidates {
                keys: pinned(held.anonymous.clone(), header.alg),
                unknown_kid: false,
            },
        }
    }

    /// Whether the set holds `kid`.
    fn holds(&self, kid: &str) -> bool {
        self.held().by_kid.contains_key(kid)
    }

    /// Fetches now (start, and every [`JWKS_REFRESH`]); an error leaves the keys held, but
    /// drops them once [`JWKS_STALE_MAX`] has passed since the last fetch that worked.
    pub async fn refresh(&self) -> anyhow::Result<Fetched> {
        let mut last_try = self.last_try.lock().await;
        *last_try = Some(Instant::now());
        self.fetch_and_swap().await
    }

    /// Fetches because a token named `kid`, unless the set holds it by now (another request
    /// fetched it) or a fetch was tried less than [`JWKS_MIN_INTERVAL`] ago. `None`: no fetch.
    pub async fn refresh_for(&self, kid: &str) -> Option<anyhow::Result<Fetched>> {
        let mut last_try = self.last_try.lock().await;
        if self.holds(kid) || last_try.is_some_and(|t| t.elapsed() < JWKS_MIN_INTERVAL) {
            return None;
        }
        *last_try = Some(Instant::now());
        Some(self.fetch_and_swap().await)
    }

    async fn fetch_and_swap(&self) -> anyhow::Result<Fetched> {
        match self.fetch().await {
            Ok(set) => {
                let old = self.held();
                let withdrew = old.by_kid.keys().any(|k| !set.by_kid.contains_key(k))
                    || old.anonymous.len() > set.anonymous.len();
                let keys = set.by_kid.len() + set.anonymous.len();
                *self.held.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                self.count("ok", keys);
                Ok(Fetched { keys, withdrew })
            }
            Err(e) => {
                let held = self.held();
                let stale = held
                    .fetched_at
                    .is_none_or(|t| t.elapsed() >= JWKS_STALE_MAX);
                let keys = if stale && (!held.by_kid.is_empty() || !held.anonymous.is_empty()) {
                    tracing::error!(url = %self.url, "the JWKS has not been fetched for {JWKS_STALE_MAX:?}: its keys are dropped");
                    *self.held.write().unwrap_or_else(PoisonError::into_inner) =
                        Arc::new(Held::default());
                    0
                } else {
                    held.by_kid.len() + held.anonymous.len()
                };
                self.count("failed", keys);
                Err(e)
            }
        }
    }

    fn count(&self, outcome: &str, keys: usize) {
        if let Some(c) = &self.fetches {
            c.with_label_values(&[outcome]).inc();
        }
        if let Some(g) = &self.keys {
            g.set(i64::try_from(keys).unwrap_or(i64::MAX));
        }
    }

    async fn fetch(&self) -> anyhow::Result<Held> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
        anyhow::ensure!(
            response.status().is_success(),
            "answered {}",
            response.status()
        );
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?
        {
            anyhow::ensure!(
                body.len() + chunk.len() <= JWKS_MAX_BYTES,
                "the document is larger than {JWKS_MAX_BYTES} bytes"
            );
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet =
            serde_json::from_slice(&body).context("not a JWKS ({\"keys\": [...]})")?;
        let mut held = Held {
            fetched_at: Some(Instant::now()),
            ..Held::default()
        };
        for jwk in set.keys.iter().filter_map(usable) {
            if held.by_kid.len() + held.anonymous.len() >= JWKS_MAX_KEYS {
                tracing::warn!(url = %self.url, "the JWKS has more than {JWKS_MAX_KEYS} keys: the rest are left out");
                break;
            }
            let (kid, key) = jwk;
            match kid {
                Some(kid) => {
                    held.by_kid.insert(kid, Arc::new(key));
                }
                None => held.anonymous.push(Arc::new(key)),
            }
        }
        anyhow::ensure!(
            !held.by_kid.is_empty() || !held.anonymous.is_empty(),
            "no RS256, ES256 or EdDSA signing key in it"
        );
        Ok(held)
    }
}

/// A transport error in a few words: connection refused, timed out, TLS, ... (reqwest's own
/// text says only "error sending request").
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    if e.is_timeout() {
        text = format!("timed out after {JWKS_TIMEOUT:?} ({text})");
    }
    text
}

/// The algorithm a JWK verifies, from its key type (and its own `alg`, which must agree), and
/// its key; `None` for a key seckill does not use to verify shoppers.
fn usable(jwk: &Jwk) -> Option<(Option<String>, UserKey)> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let agrees = match jwk.common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::RS256) => alg == Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
        Some(KeyAlgorithm::EdDSA) => alg == Algorithm::EdDSA,
        Some(_) => false,
    };
    if !agrees {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((jwk.common.key_id.clone(), UserKey { alg, key }))
}

/// One of `DecodingKey`'s PEM readers.
type ReadPem = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

/// Reads a PEM public key: RSA (RS256), P-256 (ES256) or Ed25519 (EdDSA).
pub fn read_pem(path: &Path) -> anyhow::Result<UserKey> {
    let pem = std::fs::read(path).with_context(|| format!("{}: cannot be read", path.display()))?;
    let tries: [(Algorithm, ReadPem); 3] = [
        (Algorithm::RS256, DecodingKey::from_rsa_pem),
        (Algorithm::ES256, DecodingKey::from_ec_pem),
        (Algorithm::EdDSA, DecodingKey::from_ed_pem),
    ];
    tries
        .into_iter()
        .find_map(|(alg, read)| read(&pem).ok().map(|key| UserKey { alg, key }))
        .with_context(|| {
            format!(
                "{}: not a PEM public key of RSA, P-256 or Ed25519 (\"-----BEGIN PUBLIC KEY-----\")",
                path.display()
            )
        })
}

/// The keys whose algorithm is `alg` (none: the token's `alg` is not theirs).
fn pinned(keys: Vec<Arc<UserKey>>, alg: Algorithm) -> Vec<Arc<UserKey>> {
    keys.into_iter().filter(|k| k.alg == alg).collect()
}

/// Every key that verifies shoppers' JWTs.
#[derive(Default)]
pub struct UserKeys {
    secret: Option<Arc<UserKey>>,
    files: Vec<Arc<UserKey>>,
    jwks: Option<Jwks>,
}

impl UserKeys {
    pub fn new(secret: Option<&[u8]>, files: Vec<UserKey>, jwks: Option<Jwks>) -> Self {
        Self {
            secret: secret.map(|s| {
                Arc::new(UserKey {
                    alg: Algorithm::HS256,
                    key: DecodingKey::from_secret(s),
                })
            }),
            files: files.into_iter().map(Arc::new).collect(),
            jwks,
        }
    }

    pub fn jwks(&self) -> Option<&Jwks> {
        self.jwks.as_ref()
    }

    /// The keys that may verify a token with this header: the secret for HS256 only; for the
    /// others, the JWKS key its `kid` names (or the JWKS keys without a `kid`, for a token
    /// without one) and the PEM files' keys of its algorithm.
    pub fn candidates(&self, header: &Header) -> Candidates {
        if header.alg == Algorithm::HS256 {
            return Candidates {
                keys: self.secret.iter().cloned().collect(),
                unknown_kid: false,
            };
        }
        let mut found = self
            .jwks
            .as_ref()
            .map(|jwks| jwks.candidates(header))
            .unwrap_or_default();
        found.keys.extend(pinned(self.files.clone(), header.alg));
        found
    }
}

impl UserKeys {
    /// The keys `settings` names: the secret, each PEM file, and the JWKS, fetched once now
    /// (an error names the variable).
    pub async fn load(
        settings: &crate::config::Settings,
        metrics: &crate::metrics::Metrics,
    ) -> anyhow::Result<Self> {
        let secrets = settings.secrets()?;
        let files = settings
            .jwt_public_keys
            .iter()
            .map(|path| read_pem(path).context("SECKILL_JWT_PUBLIC_KEYS"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let jwks = match &settings.jwt_jwks_url {
            None => None,
            Some(url) => {
                let jwks = Jwks::new(
                    url,
                    Some((metrics.jwks_fetches.clone(), metrics.jwks_keys.clone())),
                )?;
                let fetched = jwks.refresh().await.with_context(|| {
                    format!("SECKILL_JWT_JWKS_URL: could not fetch the shoppers' keys from {url}")
                })?;
                tracing::info!(url, keys = fetched.keys, "fetched the shoppers' JWKS");
                Some(jwks)
            }
        };
        Ok(Self::new(
            secrets.jwt_secret.as_ref().map(|s| {
                use secrecy::ExposeSecret;
                s.expose_secret().as_bytes()
            }),
            files,
            jwks,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jsonwebtoken::EncodingKey;
    use serde_json::json;

    use super::*;
    use crate::{auth::Auth, config::Secrets, domain::UserId};

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn signed(
        alg: Algorithm,
        private: &str,
        kid: Option<&str>,
        claims: serde_json::Value,
    ) -> String {
        let pem = std::fs::read(fixture(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => unreachable!(),
        }
        .unwrap();
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    fn claims(sub: &str) -> serde_json::Value {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        json!({"sub": sub, "exp": exp, "iss": "https://id.example", "aud": "shop"})
    }

    /// An `Auth` whose shoppers' keys are these PEM files (and `secret` for HS256).
    fn auth(secret: Option<&str>, files: &[&str]) -> Auth {
        let secrets = Secrets {
            jwt_secret: secret.map(|s| s.to_owned().into()),
            admin_token: "admin-token-0123456789".to_owned().into(),
            token_secret: "token-secret-0123456789".to_owned().into(),
            service_tokens: Vec::new(),
        };
        let keys = files
            .iter()
            .map(|f| read_pem(&fixture(f)).unwrap())
            .collect();
        Auth::new(&secrets, Duration::from_secs(60)).with_user_keys(UserKeys::new(
            secret.map(str::as_bytes),
            keys,
            None,
        ))
    }

    #[test]
    fn each_public_key_verifies_tokens_of_its_own_algorithm() {
        let auth = auth(None, &["rsa-1.pub.pem", "ec-1.pub.pem", "ed-1.pub.pem"]);
        let user = UserId::try_from(7_i64).unwrap();
        for (alg, private) in [
            (Algorithm::RS256, "rsa-1.key.pem"),
            (Algorithm::ES256, "ec-1.key.pem"),
            (Algorithm::EdDSA, "ed-1.key.pem"),
        ] {
            let token = signed(alg, private, None, claims("7"));
            assert_eq!(auth.user(&token), Some(user), "{alg:?}");
        }
        assert_eq!(
            read_pem(&fixture("rsa-1.pub.pem")).unwrap().alg,
            Algorithm::RS256
        );
        assert_eq!(
            read_pem(&fixture("ec-1.pub.pem")).unwrap().alg,
            Algorithm::ES256
        );
        assert_eq!(
            read_pem(&fixture("ed-1.pub.pem")).unwrap().alg,
            Algorithm::EdDSA
        );
        let err = read_pem(&fixture("README.md")).err().unwrap();
        assert!(
            format!("{err:#}").contains("not a PEM public key"),
            "{err:#}"
        );
    }

    #[test]
    fn a_token_by_another_key_or_with_another_alg_is_refused() {
        let auth = auth(Some("jwt-secret-0123456789"), &["rsa-1.pub.pem"]);
        // Signed by a key seckill does not have.
        assert_eq!(
            auth.user(&signed(
                Algorithm::RS256,
                "rsa-2.key.pem",
                None,
                claims("7")
            )),
            None
        );
        assert_eq!(
            auth.user(&signed(Algorithm::ES256, "ec-1.key.pem", None, claims("7"))),
            None
        );
        // alg confusion: HS256 "signed" with the RSA public key as the HMAC secret.
        let public = std::fs::read(fixture("rsa-1.pub.pem")).unwrap();
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("7"),
            &EncodingKey::from_secret(&public),
        )
        .unwrap();
        assert_eq!(auth.user(&confused), None);
        // Other RSA algorithms are not the key's.
        let pem = std::fs::read(fixture("rsa-1.key.pem")).unwrap();
        let rs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::RS512),
            &claims("7"),
            &EncodingKey::from_rsa_pem(&pem).unwrap(),
        )
        .unwrap();
        assert_eq!(auth.user(&rs512), None);
        // Without a secret, HS256 is refused whatever its key.
        let no_secret = super::tests::auth(None, &["rsa-1.pub.pem"]);
        let hs = crate::auth::sign_user_jwt("jwt-secret-0123456789", &claims("7")).unwrap();
        assert_eq!(no_secret.user(&hs), None);
        assert!(auth.user(&hs).is_some());
        // A non-numeric sub names no shopper.
        assert_eq!(
            auth.user(&signed(
                Algorithm::RS256,
                "rsa-1.key.pem",
                None,
                claims("auth0|abc")
            )),
            None
        );
    }

    #[test]
    fn issuer_and_audience_are_required_of_public_key_tokens_too() {
        let strict = auth(None, &["ed-1.pub.pem"])
            .with_user_claims(Some("shop"), Some("https://id.example"));
        let good = signed(Algorithm::EdDSA, "ed-1.key.pem", None, claims("9"));
        assert!(strict.user(&good).is_some());
        let mut other = claims("9");
        other["aud"] = "another-shop".into();
        assert_eq!(
            strict.user(&signed(Algorithm::EdDSA, "ed-1.key.pem", None, other)),
            None
        );
        let mut missing = claims("9");
        missing.as_object_mut().unwrap().remove("iss");
        assert_eq!(
            strict.user(&signed(Algorithm::EdDSA, "ed-1.key.pem", None, missing)),
            None
        );
    }

    #[test]
    fn jwks_keys_are_taken_by_type_and_pinned() {
        let jwk = |name: &str| -> Jwk {
            serde_json::from_slice(&std::fs::read(fixture(&format!("{name}.jwk.json"))).unwrap())
                .unwrap()
        };
        let algs: Vec<Algorithm> = ["rsa-1", "ec-1", "ed-1"]
            .iter()
            .map(|n| usable(&jwk(n)).unwrap().1.alg)
            .collect();
        assert_eq!(algs, [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]);
        assert_eq!(usable(&jwk("rsa-1")).unwrap().0.as_deref(), Some("rsa-1"));
        // A key whose own alg is another algorithm, an encryption key, a symmetric key: left out.
        let mut rs512: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("rsa-1.jwk.json")).unwrap()).unwrap();
        rs512["alg"] = "RS512".into();
        assert!(usable(&serde_json::from_value(rs512.clone()).unwrap()).is_none());
        rs512["alg"] = "RS256".into();
        rs512["use"] = "enc".into();
        assert!(usable(&serde_json::from_value(rs512).unwrap()).is_none());
        let oct: Jwk =
            serde_json::from_value(json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"})).unwrap();
        assert!(usable(&oct).is_none());
    }
}
