//! `SECKILL_REDIS_DURABILITY` against Redis instances of the tests' own ([`OwnRedis`]: each
//! `redis-server` runs on a free loopback port with a directory of its own, and is killed (by
//! pid) and its directory removed when its guard drops — also when a test fails).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream};
use seckill::{
    domain::ProductId,
    startup::{Application, Role},
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Isolation, OwnRedis, TestApp, eventually, pg_count, pg_rows};

const FSYNC: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];

/// Waits (10 s at most) until `/readyz` answers `status` with `redis` as its Redis check
/// (a prefix of it); the body. (Another check may flap on a loaded machine: wait for this one.)
async fn readyz_until(app: &TestApp, status: u16, redis: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = app.api.get("/readyz").await;
        let now = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let check = body["checks"]["redis"].as_str().unwrap_or_default();
        if now == status && check.starts_with(redis) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status} with redis {redis:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fsync_refuses_a_redis_without_aof_and_starts_on_one_with_it() {
    let bare = OwnRedis::start(&["--appendonly", "no"]).await;
    let iso = Isolation::new();

    let refused = Application::build(
        iso.settings(&[("SECKILL_REDIS_URL", &bare.url())]),
        Role::All,
        CancellationToken::new(),
    )
    .await
    .err()
    .expect("fsync must refuse a Redis without AOF");

    let line = format!("{refused:#}");
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.starts_with("SECKILL_REDIS_DURABILITY: fsync needs"),
        "{line}"
    );
    assert!(
        line.contains(&format!("127.0.0.1:{} has appendonly=no", bare.port)),
        "{line}"
    );

    let durable = OwnRedis::start(FSYNC).await;
    let app =
        TestApp::spawn_isolated(iso, Role::All, &[("SECKILL_REDIS_URL", &durable.url())]).await;
    let body = readyz_until(&app, 200, "ok").await;
    assert_eq!(body["checks"]["redis"], "ok", "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_503_naming_redis_once_appendfsync_is_no_longer_always() {
    let redis = OwnRedis::start(FSYNC).await;
    let app = TestApp::spawn_with(Role::All, &[("SECKILL_REDIS_URL", &redis.url())]).await;
    readyz_until(&app, 200, "ok").await;

    assert_eq!(
        redis.cli(&["config", "set", "appendfsync", "everysec"]),
        "OK"
    );
    let body = readyz_until(&app, 503, "not durable").await;

    assert_eq!(body["code"], "unavailable", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("redis"), "{body}");
    let redis_check = body["checks"]["redis"].as_str().unwrap();
    assert!(redis_check.contains("appendfsync=everysec"), "{body}");

    // Put right, it is ready again.
    assert_eq!(redis.cli(&["config", "set", "appendfsync", "always"]), "OK");
    readyz_until(&app, 200, "ok").await;
    app.stop().await;
}

/// A primary and its replica (Valkey, or Redis 7.0), both `--appendonly aof`, once the
/// replica is online.
async fn replicated(valkey: bool, aof: &str) -> (OwnRedis, OwnRedis) {
    let start = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if valkey {
            OwnRedis::start_valkey(&args).await
        } else {
            OwnRedis::start(&args).await
        }
    };
    let primary = start(vec!["--appendonly".into(), aof.into()]).await;
    let replica = start(vec![
        "--appendonly".into(),
        aof.into(),
        "--replicaof".into(),
        "127.0.0.1".into(),
        primary.port.to_string(),
    ])
    .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            primary.online_replicas() == 1
        })
        .await,
        "the replica never came online"
    );
    (primary, replica)
}

/// User 1 wins one unit of `p`, and `replica` holds the win when the 202 arrives.
async fn the_replica_holds_the_win_at_its_202(app: &TestApp, p: i64, replica: &OwnRedis) {
    let buyers = app.keys().product(ProductId::try_from(p).unwrap()).buyers;
    let token = app.api.fetch_token(1, p).await;
    let res = app.api.reserve(1, p, &token).await;
    assert_eq!(res.status(), 202);
    let won: Value = res.json().await.unwrap();
    assert_eq!(
        replica.cli(&["hget", &buyers, "1"]),
        won["reservation_id"].as_str().unwrap(),
        "the replica must hold the win when the 202 is sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_1_answers_202_once_the_replica_holds_the_win_and_after_the_wait_without_it() {
    let (primary, mut replica) = replicated(false, "no").await;
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_REDIS_URL", &primary.url()),
            ("SECKILL_REDIS_DURABILITY", "replicas:1"),
        ],
    )
    .await;
    let p = app.api.live_product(10).await;
    let timeouts = "seckill_durability_wait_timeouts_total ";
    let unreplicated = "seckill_durability_unreplicated_wins_total ";

    // With the replica: the 202 comes once the replica holds the win.
    the_replica_holds_the_win_at_its_202(&app, p, &replica).await;
    assert_eq!(app.api.metric(timeouts).await, 0.0);
    assert_eq!(app.api.metric(unreplicated).await, 0.0);

    // Without it: still 202 (the unit is taken), after the wait ran out, counted.
    replica.kill9();
    assert!(
        eventually(Duration::from_secs(10), || async {
            primary.online_replicas() == 0
        })
        .await,
        "the primary still sees its replica"
    );
    let token = app.api.fetch_token(2, p).await;
    let started = Instant::now();
    let res = app.api.reserve(2, p, &token).await;
    let took = started.elapsed();
    assert_eq!(res.status(), 202);
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "answered after {took:?}, expected about the 500 ms wait"
    );
    assert_eq!(app.api.metric(timeouts).await, 1.0);
    assert_eq!(app.api.metric(unreplicated).await, 1.0);

    // Right after, a win skips the wait (the replica is known to be missing) — or, on a
    // machine slow enough to let the 1 s skip window pass, waits and times out again.
    let token = app.api.fetch_token(3, p).await;
    assert_eq!(app.api.reserve(3, p, &token).await.status(), 202);
    assert_eq!(app.api.metric(unreplicated).await, 2.0);
    assert!([1.0, 2.0].contains(&app.api.metric(timeouts).await));
    app.stop().await;
}

/// What one shopper finally got.
enum Got {
    Won202(String),
    Won409(String),
    SoldOut,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_202_becomes_one_order_when_an_fsync_redis_is_killed_mid_sale() {
    const STOCK: i64 = 150;
    const USERS: i64 = 300;
    let mut redis = OwnRedis::start(FSYNC).await;
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_REDIS_URL", &redis.url()),
            // Shoppers retry through the outage; the user window must not answer them 429.
            ("SECKILL_USER_RATE", "1000/1s"),
        ],
    )
    .await;
    let p = app.api.live_product(STOCK).await;
    let tokens: Vec<(i64, String)> = stream::iter(1..=USERS)
        .map(|u| {
            let api = &app.api;
            async move { (u, api.fetch_token(u, p).await) }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    // Shoppers keep trying (through 503s and refused connections) until they get an answer
    // the script decided: 202, 409 with the earlier reservation id, or 410 sold out.
    let api = app.api.clone();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let shoppers = tokio::spawn(async move {
        stream::iter(tokens)
            .map(|(u, token)| {
                let (api, counter) = (api.clone(), counter.clone());
                async move {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        assert!(Instant::now() < deadline, "user {u} never got an answer");
                        let Ok(res) = api.try_reserve(u, p, &token).await else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        let status = res.status().as_u16();
                        let body: Value = res.json().await.unwrap_or(Value::Null);
                        let id = || body["reservation_id"].as_str().unwrap().to_owned();
                        match status {
                            202 => {
                                counter.fetch_add(1, Ordering::Relaxed);
                                return (u, Got::Won202(id()));
                            }
                            409 => return (u, Got::Won409(id())),
                            410 => return (u, Got::SoldOut),
                            503 => tokio::time::sleep(Duration::from_millis(20)).await,
                            other => panic!("user {u}: unexpected {other}: {body}"),
                        }
                    }
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
    });

    // Mid-sale: kill -9, and restart the same server on the same port and directory.
    let midway = eventually(Duration::from_secs(30), || async {
        accepted.load(Ordering::Relaxed) >= 40
    })
    .await;
    assert!(midway, "the sale never got going");
    redis.kill9();
    let killed_at = accepted.load(Ordering::Relaxed);
    redis.spawn().await;
    let answers = shoppers.await.unwrap();

    let mut got_202: HashMap<i64, String> = HashMap::new();
    let mut winners: HashMap<String, i64> = HashMap::new();
    for (u, got) in answers {
        match got {
            Got::Won202(id) => {
                got_202.insert(u, id.clone());
                assert!(winners.insert(id, u).is_none());
            }
            Got::Won409(id) => assert!(winners.insert(id, u).is_none()),
            Got::SoldOut => {}
        }
    }
    assert!(
        got_202.len() > killed_at,
        "no purchase was accepted after the restart ({killed_at} before the kill)"
    );
    assert!(winners.len() as i64 <= STOCK, "{} winners", winners.len());

    // The worker persists every winner: exactly one order each, none for anyone else.
    let persisted = eventually(Duration::from_secs(60), || async {
        pg_count(
            &app.db,
            &format!("select count(*) from orders where product_id = {p}"),
        )
        .await
            == winners.len() as i64
    })
    .await;
    let rows = pg_rows(
        &app.db,
        &format!("select reservation_id::text as r, user_id from orders where product_id = {p}"),
    )
    .await;
    let orders: HashMap<String, i64> = rows
        .iter()
        .map(|row| {
            (
                row.try_get::<String>("", "r").unwrap(),
                row.try_get::<i64>("", "user_id").unwrap(),
            )
        })
        .collect();
    assert!(
        persisted,
        "{} orders for {} winners",
        orders.len(),
        winners.len()
    );
    assert_eq!(orders.len(), rows.len(), "a reservation with two orders");
    for (u, id) in &got_202 {
        assert_eq!(
            orders.get(id),
            Some(u),
            "the 202 of user {u} ({id}) has no order"
        );
    }
    assert_eq!(orders, winners);
    let twice = pg_count(
        &app.db,
        &format!("select count(*) - count(distinct user_id) from orders where product_id = {p}"),
    )
    .await;
    assert_eq!(twice, 0, "a user with two orders");
    assert!(orders.len() as i64 <= STOCK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fsync_replicas_1_answers_202_once_both_aofs_hold_the_win_and_is_refused_without_waitaof() {
    // Redis 7.0 has no WAITAOF: refused at start, in one line.
    let old = OwnRedis::start(FSYNC).await;
    let iso = Isolation::new();
    let refused = Application::build(
        iso.settings(&[
            ("SECKILL_REDIS_URL", &old.url()),
            ("SECKILL_REDIS_DURABILITY", "fsync+replicas:1"),
        ]),
        Role::All,
        CancellationToken::new(),
    )
    .await
    .err()
    .expect("fsync+replicas:1 must refuse a Redis without WAITAOF");
    let line = format!("{refused:#}");
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.starts_with("SECKILL_REDIS_DURABILITY: fsync+replicas:N"),
        "{line}"
    );
    assert!(line.contains("no WAITAOF"), "{line}");

    // Valkey 8.1, a primary and a replica, both with an AOF.
    let (primary, mut replica) = replicated(true, "yes").await;
    let app = TestApp::spawn_isolated(
        iso,
        Role::All,
        &[
            ("SECKILL_REDIS_URL", &primary.url()),
            ("SECKILL_REDIS_DURABILITY", "fsync+replicas:1"),
        ],
    )
    .await;
    let p = app.api.live_product(10).await;
    let timeouts = "seckill_durability_wait_timeouts_total ";

    // With the replica: the 202 comes once the primary and the replica fsynced the win.
    the_replica_holds_the_win_at_its_202(&app, p, &replica).await;
    assert_eq!(app.api.metric(timeouts).await, 0.0);

    // Without it: the wait runs out (the unit is taken: still 202, counted).
    replica.kill9();
    assert!(
        eventually(Duration::from_secs(10), || async {
            primary.online_replicas() == 0
        })
        .await
    );
    let token = app.api.fetch_token(2, p).await;
    let started = Instant::now();
    assert_eq!(app.api.reserve(2, p, &token).await.status(), 202);
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert_eq!(app.api.metric(timeouts).await, 1.0);
    app.stop().await;
}
