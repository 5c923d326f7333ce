//! Shoppers' JWTs from the storefront's login, as it issues them: RS256/ES256/EdDSA, verified
//! against its JWKS served by a local HTTP server — rotation mid-sale, unknown keys, `alg`
//! confusion, the URL down.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Instant,
};

use actix_web::{App, HttpResponse, HttpServer, web};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use seckill::{
    auth::keys::{JWKS_MIN_INTERVAL, UserKeys},
    config::Settings,
    metrics::Metrics,
    startup::Role,
};
use serde_json::{Value, json};

use crate::helpers::{JWT_SECRET, TestApp, epoch_secs, free_port, sign};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name),
    )
    .unwrap()
}

fn jwk(name: &str) -> Value {
    serde_json::from_slice(&fixture(&format!("{name}.jwk.json"))).unwrap()
}

/// A shopper's JWT as the login signs it: `key` is a fixture's name (also its `kid`).
fn login_jwt(user: i64, key: &str) -> String {
    let pem = fixture(&format!("{key}.key.pem"));
    let (alg, encoding) = match key.split('-').next().unwrap() {
        "rsa" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem)),
        "ec" => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem)),
        _ => (Algorithm::EdDSA, EncodingKey::from_ed_pem(&pem)),
    };
    let mut header = Header::new(alg);
    header.kid = Some(key.to_owned());
    let claims = json!({"sub": user.to_string(), "exp": epoch_secs() + 600, "iss": ISSUER});
    jsonwebtoken::encode(&header, &claims, &encoding.unwrap()).unwrap()
}

const ISSUER: &str = "https://login.shop.example";

/// The login's JWKS endpoint: serves `keys`, or 503 while down; counts its fetches.
struct Login {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    up: Arc<AtomicBool>,
    fetches: Arc<AtomicU32>,
    handle: actix_web::dev::ServerHandle,
}

impl Login {
    async fn start(keys: &[&str]) -> Self {
        let keys = Arc::new(Mutex::new(keys.iter().map(|k| jwk(k)).collect::<Vec<_>>()));
        let up = Arc::new(AtomicBool::new(true));
        let fetches = Arc::new(AtomicU32::new(0));
        let port = free_port();
        let (k, u, f) = (keys.clone(), up.clone(), fetches.clone());
        let server = HttpServer::new(move || {
            let (k, u, f) = (k.clone(), u.clone(), f.clone());
            App::new().route(
                "/.well-known/jwks.json",
                web::get().to(move || {
                    let (k, u, f) = (k.clone(), u.clone(), f.clone());
                    async move {
                        f.fetch_add(1, Ordering::SeqCst);
                        if !u.load(Ordering::SeqCst) {
                            return HttpResponse::ServiceUnavailable().finish();
                        }
                        HttpResponse::Ok().json(json!({"keys": *k.lock().unwrap()}))
                    }
                }),
            )
        })
        .workers(1)
        .bind(("127.0.0.1", port))
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url: format!("http://127.0.0.1:{port}/.well-known/jwks.json"),
            keys,
            up,
            fetches,
            handle,
        }
    }

    fn publish(&self, keys: &[&str]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| jwk(k)).collect();
    }

    fn fetches(&self) -> u32 {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// `GET /me` of a product with this bearer token: its status.
async fn me_with(app: &TestApp, product: i64, bearer: &str) -> u16 {
    app.api
        .client
        .get(format!(
            "{}/api/v1/products/{product}/reservations/me",
            app.api.http
        ))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A purchase with this bearer token, as a shopper makes it: its status.
async fn buy_with(app: &TestApp, product: i64, bearer: &str) -> u16 {
    let http = &app.api.http;
    let token = app
        .api
        .client
        .post(format!("{http}/api/v1/products/{product}/token"))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    if token.status() != 200 {
        return token.status().as_u16();
    }
    let token: Value = token.json().await.unwrap();
    app.api
        .client
        .post(format!("{http}/api/v1/products/{product}/reservations"))
        .bearer_auth(bearer)
        .json(&json!({"token": token["token"]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_login_s_jwks_admits_its_shoppers_through_a_key_rotation_and_an_outage() {
    let login = Login::start(&["rsa-1", "ec-1", "ed-1"]).await;
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_JWT_JWKS_URL", login.url.as_str()),
            ("SECKILL_JWT_ISSUER", ISSUER),
        ],
    )
    .await;
    assert_eq!(login.fetches(), 1, "fetched once at start");
    // (After the start's fetch: the interval for the next one runs from it.)
    let started = Instant::now();
    let product = app.api.live_product(10).await;
    // Each kind of key admits its shoppers, as the login signs their tokens.
    for (user, key) in [(1, "rsa-1"), (2, "ec-1"), (3, "ed-1")] {
        assert_eq!(
            buy_with(&app, product, &login_jwt(user, key)).await,
            202,
            "{key}"
        );
        assert_eq!(
            me_with(&app, product, &login_jwt(user, key)).await,
            200,
            "{key}"
        );
    }
    // The HS256 secret still works beside them (with the issuer the deployment requires).
    let hs256 = sign(
        json!({"sub": "1", "exp": epoch_secs() + 600, "iss": ISSUER}),
        JWT_SECRET,
    );
    assert_eq!(me_with(&app, product, &hs256).await, 200);
    assert_eq!(app.api.me(1, product).await.status(), 401, "no iss");

    // A key the login never published: refused, and worth one fetch at most per interval.
    assert_eq!(me_with(&app, product, &login_jwt(4, "rsa-2")).await, 401);
    // alg confusion: HS256 "signed" with the login's RSA public key as the secret.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &json!({"sub": "4", "exp": epoch_secs() + 600, "iss": ISSUER}),
        &EncodingKey::from_secret(&fixture("rsa-1.pub.pem")),
    )
    .unwrap();
    assert_eq!(me_with(&app, product, &confused).await, 401);
    // Without the issuer the deployment requires.
    let pem = fixture("rsa-1.key.pem");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let foreign = jsonwebtoken::encode(
        &header,
        &json!({"sub": "4", "exp": epoch_secs() + 600, "iss": "https://elsewhere.example"}),
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap();
    assert_eq!(me_with(&app, product, &foreign).await, 401);

    // Rotation mid-sale: the login publishes rsa-2, signs with it, and withdraws rsa-1. The first
    // token naming rsa-2 makes seckill fetch the set (once the interval since the last fetch has
    // passed) and is admitted at once.
    let fetched = login.fetches();
    tokio::time::sleep(JWKS_MIN_INTERVAL.saturating_sub(started.elapsed())).await;
    login.publish(&["rsa-2", "ec-1", "ed-1"]);
    assert_eq!(buy_with(&app, product, &login_jwt(5, "rsa-2")).await, 202);
    assert_eq!(login.fetches(), fetched + 1);
    // A withdrawn key's tokens are refused from then on, even one verified before.
    assert_eq!(me_with(&app, product, &login_jwt(1, "rsa-1")).await, 401);
    // A flood of unknown kids right after costs no fetch.
    for _ in 0..20 {
        assert_eq!(me_with(&app, product, &login_jwt(6, "rsa-1")).await, 401);
    }
    assert_eq!(login.fetches(), fetched + 1);

    // The URL down: the keys held keep working (for up to JWKS_STALE_MAX), an unknown kid is
    // a 401, never a 5xx.
    login.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(JWKS_MIN_INTERVAL).await;
    login.publish(&["rsa-1", "rsa-2", "ec-1", "ed-1"]);
    assert_eq!(me_with(&app, product, &login_jwt(1, "rsa-1")).await, 401);
    assert_eq!(
        login.fetches(),
        fetched + 2,
        "one fetch tried for the unknown kid"
    );
    assert_eq!(me_with(&app, product, &login_jwt(5, "rsa-2")).await, 200);
    assert_eq!(me_with(&app, product, &login_jwt(2, "ec-1")).await, 200);
    assert!(
        app.api
            .metric("seckill_jwks_fetches_total{outcome=\"failed\"}")
            .await
            >= 1.0
    );
    assert_eq!(app.api.metric("seckill_jwks_keys").await, 3.0);

    app.stop().await;
    login.handle.stop(true).await;
}

#[tokio::test]
async fn a_process_does_not_start_without_the_login_s_keys() {
    let metrics = Metrics::new().unwrap();
    let settings = |url: &str| {
        Settings::from_vars([
            ("SECKILL_DEV".to_owned(), "1".to_owned()),
            ("SECKILL_JWT_JWKS_URL".to_owned(), url.to_owned()),
        ])
        .unwrap()
    };
    // Nothing listens there.
    let refused = format!("http://127.0.0.1:{}/jwks.json", free_port());
    let err = UserKeys::load(&settings(&refused), &metrics)
        .await
        .err()
        .unwrap();
    let text = format!("{err:#}");
    assert!(
        text.starts_with("SECKILL_JWT_JWKS_URL: could not fetch"),
        "{text}"
    );
    assert!(text.contains(&refused), "{text}");
    // An answer that is not a JWKS, or one without a key seckill can use.
    let login = Login::start(&[]).await;
    let err = UserKeys::load(&settings(&login.url), &metrics)
        .await
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("no RS256, ES256 or EdDSA signing key"),
        "{err:#}"
    );
    login.up.store(false, Ordering::SeqCst);
    let err = UserKeys::load(&settings(&login.url), &metrics)
        .await
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("503"), "{err:#}");
    login.handle.stop(true).await;
}
