//! The purchase hot path: JWT and purchase-token verification alone, and the whole purchase
//! handler in process (JWT check, token check, one reserve round trip, response) against the
//! real Redis and Postgres. The handler bench skips with a message when a service is absent.
//!
//! `cargo bench --bench hot_path`

#![allow(clippy::expect_used)] // a bench that cannot set up should stop loudly

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

mod common;

use actix_web::{App, test, web};
use common::{ADMIN_TOKEN, JWT_SECRET, PG, SECRET_VARS, TOKEN_SECRET};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use seckill::{
    amqp::Broker,
    auth::Auth,
    config::{Secrets, Settings},
    deps::Deps,
    domain::{ProductId, UserId},
    http::{Ctx, configure_public},
    keys::Keys,
    metrics::Metrics,
    products::{self, NewProduct},
    reservations::Reservations,
    soldout::{Recovering, SoldOutCache},
    startup::{Application, Role},
};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

fn secrets() -> Secrets {
    Secrets {
        jwt_secret: Some(SecretString::from(JWT_SECRET)),
        admin_token: SecretString::from(ADMIN_TOKEN),
        token_secret: SecretString::from(TOKEN_SECRET),
        service_tokens: Vec::new(),
    }
}

fn jwt(user: i64) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3_600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": user.to_string(), "exp": exp}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("jwt")
}

fn bench_auth(c: &mut Criterion) {
    let auth = Auth::new(&secrets(), Duration::from_secs(60));
    let (u, p) = (
        UserId::try_from(42_i64).expect("id"),
        ProductId::try_from(7_i64).expect("id"),
    );
    let user_jwt = jwt(42);
    let token = auth.issue_purchase_token(u, p).expect("token").token;
    let mut group = c.benchmark_group("auth");
    group.throughput(Throughput::Elements(1));
    group.bench_function("user JWT verify", |b| {
        b.iter(|| auth.user(&user_jwt).expect("valid"))
    });
    group.bench_function("purchase token verify", |b| {
        b.iter(|| assert!(auth.check_purchase_token(&token, u, p)))
    });
    group.finish();
}

fn bench_handler(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tag = std::process::id();
    let database = format!("seckill_bench_{tag}");
    let prefix = format!("benchh{tag}");
    let vars = [
        ("SECKILL_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("SECKILL_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("SECKILL_DATABASE_URL", format!("{PG}/{database}")),
        ("SECKILL_REDIS_PREFIX", prefix.clone()),
        ("SECKILL_AMQP_QUEUE", format!("bench.{tag}")),
        ("SECKILL_USER_RATE", "1000/1s".to_owned()),
        ("SECKILL_PRODUCT_RATE", "1000000000/1s".to_owned()),
    ];
    let secret_vars = SECRET_VARS.map(|(k, v)| (k, v.to_owned()));
    let settings = Settings::from_vars(
        vars.iter()
            .chain(&secret_vars)
            .map(|(k, v)| (k.to_string(), v.clone())),
    )
    .expect("settings");
    let shutdown = CancellationToken::new();
    let app = match rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(20),
            Application::build(settings.clone(), Role::Serve, shutdown.clone()),
        )
        .await
    }) {
        Ok(Ok(app)) => app,
        Ok(Err(e)) => {
            eprintln!("purchase handler bench skipped: services not reachable ({e:#})");
            return;
        }
        Err(_) => {
            eprintln!("purchase handler bench skipped: start-up timed out");
            return;
        }
    };
    // Pools of the bench's own (the app has created and migrated the database by now).
    let (db, redis) = rt.block_on(async {
        let db = seckill::db::connect(&settings.database_url, 16).await;
        let redis = seckill::redis::connect(&settings.redis, 4, Duration::from_secs(5)).await;
        (db.expect("Postgres pool"), redis.expect("Redis pool"))
    });
    let reservations = Reservations::new(
        redis.clone(),
        Keys::new(prefix.clone()),
        settings.user_rate,
        settings.product_rate,
    );
    let product = rt.block_on(async {
        let now = chrono::Utc::now();
        let p = products::create(
            &db,
            &NewProduct {
                name: "bench".into(),
                stock: 10_000_000,
                price_cents: 1,
                currency: "USD".into(),
                starts_at: now - chrono::Duration::seconds(1),
                ends_at: now + chrono::Duration::hours(1),
                waiting_room: false,
                proof_of_work: false,
            },
        )
        .await
        .expect("product");
        ProductId::try_from(p.product_id).expect("id")
    });
    // The handlers' context, as the app wires it, over the bench's own pools.
    let deps = rt.block_on(async {
        Deps::assemble(
            Arc::new(settings.clone()),
            redis.clone(),
            db.clone(),
            Broker::start(&settings.amqp_url, shutdown.child_token()),
            Arc::new(Metrics::new().expect("metrics")),
        )
    });
    let ctx = web::Data::new(
        Ctx::new(
            Arc::new(deps),
            reservations,
            Arc::new(SoldOutCache::default()),
            Arc::new(Recovering::default()),
            seckill::auth::keys::UserKeys::new(Some(JWT_SECRET.as_bytes()), Vec::new(), None),
        )
        .expect("ctx"),
    );
    rt.block_on(ctx.recovery.preheat(product, false))
        .expect("preheat");
    let auth = Auth::new(&secrets(), Duration::from_secs(3_600));
    let service = rt.block_on(test::init_service(
        App::new().configure(configure_public(ctx)),
    ));
    let uri = format!("/api/v1/products/{product}/reservations");
    let next_user = AtomicI64::new(1);

    let mut group = c.benchmark_group("purchase handler in process");
    group.throughput(Throughput::Elements(1));
    group.bench_function("winning purchase (JWT, token, reserve, response)", |b| {
        b.iter_batched(
            || {
                let u = next_user.fetch_add(1, Ordering::Relaxed);
                let token = auth
                    .issue_purchase_token(UserId::try_from(u).expect("id"), product)
                    .expect("token")
                    .token;
                test::TestRequest::post()
                    .uri(&uri)
                    .insert_header(("authorization", format!("Bearer {}", jwt(u))))
                    .set_json(serde_json::json!({"token": token}))
                    .to_request()
            },
            |req| {
                let res = rt.block_on(test::call_service(&service, req));
                assert_eq!(res.status(), 202);
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();

    rt.block_on(async {
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), app.run_until_stopped()).await;
        db.close().await.ok();
        common::drop_database(&database).await;
        common::delete_queues(&settings.amqp_queue).await;
        common::delete_keys(&redis, &prefix).await;
        let _ = fred::prelude::ClientLike::quit(&redis).await;
    });
}

criterion_group!(benches, bench_auth, bench_handler);
criterion_main!(benches);
