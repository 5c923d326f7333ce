//! Waiting rooms (`src/room.rs`, `lua/room.lua`): the order drawn at the start is independent of
//! when each shopper joined; one place per shopper; late arrivals queue behind in arrival
//! order; admission never has more admitted-but-undecided shoppers than `remaining × factor`,
//! and resumes when units come back; a purchase token needs an admission token.

use std::time::Duration;

use chrono::Utc;
use seckill::{
    config::PowSettings,
    domain::{ProductId, UserId},
    pow,
    room::{Joined, Place, RoomSettings, Rooms, draw_key},
    startup::Role,
};
use serde_json::{Value, json};

use crate::{
    helpers::{Api, Sibling, TestApp, assert_problem, at, eventually, jwt},
    sse::Frame,
};

fn settings() -> RoomSettings {
    RoomSettings {
        opens_before: Duration::from_secs(3_600 * 24),
        factor_percent: 120,
        rate: 1_000,
        admission: Duration::from_secs(60),
        pow: PowSettings {
            min_bits: 16,
            max_bits: 24,
            join_rate: 100,
        },
    }
}

/// Spearman's rank correlation of `places` (a permutation of 1..=n) with the join order 1..=n.
fn rank_correlation(places: &[i64]) -> f64 {
    let n = places.len() as f64;
    let d2: f64 = places
        .iter()
        .enumerate()
        .map(|(i, p)| ((i as f64 + 1.0) - *p as f64).powi(2))
        .sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

/// Chi-square over the deciles of join time of who ends in the first tenth of the line
/// (expected: a tenth of each decile); 9 degrees of freedom.
fn chi_square_first_tenth(places: &[i64]) -> f64 {
    let n = places.len();
    let tenth = (n / 10) as i64;
    let expected = (n / 10) as f64 / 10.0;
    (0..10)
        .map(|d| {
            let seen = places[d * n / 10..(d + 1) * n / 10]
                .iter()
                .filter(|p| **p <= tenth)
                .count() as f64;
            (seen - expected).powi(2) / expected
        })
        .sum()
}

/// 9 degrees of freedom, p = 0.0001 (a fair draw fails this test once in 10,000 runs).
const CHI_SQUARE_9_P0001: f64 = 33.72;

#[tokio::test(flavor = "multi_thread")]
async fn the_order_drawn_at_the_start_is_independent_of_when_each_shopper_joined() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let rooms = Rooms::new(app.redis.clone(), app.keys(), settings());
    let p = ProductId::try_from(777_i64).unwrap();
    let n = 10_000_i64;
    // Shoppers join one after another (user i is the i-th to join), all before the start.
    let later = Utc::now() + chrono::Duration::hours(1);
    for chunk in (1..=n).collect::<Vec<_>>().chunks(200) {
        let joins = chunk.iter().map(|u| {
            let rooms = &rooms;
            async move {
                let u = UserId::try_from(*u).unwrap();
                rooms.join(p, u, later, draw_key()).await.unwrap()
            }
        });
        for joined in futures_util::future::join_all(joins).await {
            assert!(matches!(joined, Joined::AwaitingDraw { .. }), "{joined:?}");
        }
    }
    // Joining twice changes nothing.
    let again = rooms
        .join(p, UserId::try_from(1_i64).unwrap(), later, draw_key())
        .await
        .unwrap();
    assert_eq!(again, Joined::AwaitingDraw { joined: n });

    // The start: the first call past it draws the order.
    let started = Utc::now() - chrono::Duration::seconds(1);
    let mut places = Vec::with_capacity(n as usize);
    for chunk in (1..=n).collect::<Vec<_>>().chunks(200) {
        let reads = chunk.iter().map(|u| {
            let rooms = &rooms;
            async move {
                let u = UserId::try_from(*u).unwrap();
                rooms.standing(p, u, started).await.unwrap()
            }
        });
        for s in futures_util::future::join_all(reads).await {
            let Some(Place::At(place)) = s.place else {
                panic!("no place after the draw: {s:?}")
            };
            assert_eq!(s.total, n);
            places.push(place);
        }
    }
    let mut sorted = places.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=n).collect::<Vec<_>>(), "one place each");
    let rho = rank_correlation(&places);
    let chi = chi_square_first_tenth(&places);
    assert!(rho.abs() < 0.05, "rank correlation with join time {rho}");
    assert!(chi < CHI_SQUARE_9_P0001, "chi-square over deciles {chi}");
    // The same statistics reject first come, first served.
    let fcfs: Vec<i64> = (1..=n).collect();
    assert!(rank_correlation(&fcfs) > 0.99);
    assert!(chi_square_first_tenth(&fcfs) > CHI_SQUARE_9_P0001);

    // After the start, arrivals queue behind, in arrival order; a second join keeps its place.
    for (i, u) in [20_001_i64, 20_002, 20_003].into_iter().enumerate() {
        let joined = rooms
            .join(p, UserId::try_from(u).unwrap(), started, draw_key())
            .await
            .unwrap();
        assert_eq!(joined, Joined::Placed(n + 1 + i as i64));
    }
    let first = rooms
        .join(p, UserId::try_from(1_i64).unwrap(), started, draw_key())
        .await
        .unwrap();
    assert_eq!(first, Joined::Placed(places[0]));
    app.stop().await;
}

/// Creates and preheats a product of `stock` units with a waiting room (and a proof of work to
/// join it, if `proof`), on sale from `starts_in` seconds from now; its id.
async fn room_product(app: &TestApp, stock: i64, starts_in: i64, proof: bool) -> i64 {
    let res = app
        .api
        .post_admin(
            "/api/v1/admin/products",
            Some(json!({"name": "roomed", "stock": stock, "price_cents": 100,
                        "starts_at": at(starts_in), "ends_at": at(3_600),
                        "waiting_room": true, "proof_of_work": proof})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let p = res.json::<Value>().await.unwrap()["product_id"]
        .as_i64()
        .unwrap();
    assert_eq!(app.api.preheat(p, false).await.status(), 200);
    p
}

async fn room_me(app: &TestApp, user: i64, p: i64) -> Value {
    let res = app
        .api
        .user_get(user, &format!("/api/v1/products/{p}/room/me"))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "private, no-store");
    res.json().await.unwrap()
}

/// A shopper's POST to `path` of product `p`'s routes, with `body` as JSON if any.
async fn shopper_post(
    api: &Api,
    user: i64,
    p: i64,
    path: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = api
        .client
        .post(format!("{}/api/v1/products/{p}/{path}", api.http))
        .bearer_auth(jwt(user));
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

async fn token_with(api: &Api, user: i64, p: i64, admission: Option<&str>) -> reqwest::Response {
    let body = admission.map(|t| json!({ "admission_token": t }));
    shopper_post(api, user, p, "token", body).await
}

/// Admits everyone whose state is `admitted` now; their users.
async fn admitted(app: &TestApp, users: &[i64], p: i64) -> Vec<i64> {
    let mut out = Vec::new();
    for u in users {
        if room_me(app, *u, p).await["state"] == "admitted" {
            out.push(*u);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_room_admits_no_more_than_the_units_left_allow_and_more_when_units_come_back() {
    let app = TestApp::spawn_with(Role::All, &[("SECKILL_USER_RATE", "1000/1s")]).await;
    let api = &app.api;
    let p = room_product(&app, 2, 3, false).await;
    assert_eq!(api.product(p).await["waiting_room"], true);

    let users: Vec<i64> = (1..=10).collect();
    for u in &users {
        let res = api
            .user_post(*u, &format!("/api/v1/products/{p}/room"))
            .await;
        assert_eq!(res.status(), 200);
        let view: Value = res.json().await.unwrap();
        assert_eq!(view["state"], "awaiting_draw", "{view}");
    }
    // Not in the room, and a product without one.
    assert_problem(
        api.user_get(99, &format!("/api/v1/products/{p}/room/me"))
            .await,
        404,
        "not_in_room",
    )
    .await;
    let plain = api.live_product(1).await;
    assert_problem(
        api.user_post(1, &format!("/api/v1/products/{plain}/room"))
            .await,
        404,
        "no_waiting_room",
    )
    .await;

    // After the start: stock 2 × 120% = at most 2 admitted and undecided.
    let two = eventually(Duration::from_secs(10), || async {
        admitted(&app, &users, p).await.len() == 2
    })
    .await;
    assert!(two, "two admitted after the start");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let first = admitted(&app, &users, p).await;
    assert_eq!(
        first.len(),
        2,
        "never more than remaining × factor: {first:?}"
    );
    let figure = |f: &str| format!("seckill_room_shoppers{{figure=\"{f}\",product=\"{p}\"}}");
    assert_eq!(api.metric(&figure("in_room")).await, 10.0);
    assert_eq!(api.metric(&figure("undecided")).await, 2.0);
    let waiting = users.iter().copied().find(|u| !first.contains(u)).unwrap();
    let view = room_me(&app, waiting, p).await;
    assert_eq!(view["state"], "waiting", "{view}");
    assert!(view["ahead"].as_i64().unwrap() >= 0);

    // No purchase token without an admission; another shopper's admission is not one.
    assert_problem(
        token_with(&app.api, waiting, p, None).await,
        403,
        "not_admitted",
    )
    .await;
    let a = room_me(&app, first[0], p).await;
    let a_token = a["admission_token"].as_str().unwrap().to_owned();
    assert_problem(
        token_with(&app.api, waiting, p, Some(&a_token)).await,
        403,
        "not_admitted",
    )
    .await;

    // Both admitted buy: sold out for everyone still waiting.
    let mut orders = Vec::new();
    for u in &first {
        let admission = room_me(&app, *u, p).await["admission_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let res = token_with(&app.api, *u, p, Some(&admission)).await;
        assert_eq!(res.status(), 200);
        let purchase = res.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(api.reserve(*u, p, &purchase).await.status(), 202);
        let order = eventually(Duration::from_secs(10), || async {
            api.me(*u, p).await.json::<Value>().await.unwrap()["order_id"].is_string()
        })
        .await;
        assert!(order, "user {u}'s order");
        orders.push(
            api.me(*u, p).await.json::<Value>().await.unwrap()["order_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let sold = eventually(Duration::from_secs(5), || async {
        room_me(&app, waiting, p).await["state"] == "sold_out"
    })
    .await;
    assert!(sold, "the waiting hear sold out");
    assert_eq!(room_me(&app, first[0], p).await["state"], "turn_passed");

    // A unit comes back: the next place is admitted.
    assert_eq!(api.cancel(first[0], &orders[0]).await.status(), 200);
    let next = eventually(Duration::from_secs(10), || async {
        admitted(&app, &users, p).await.len() == 1
    })
    .await;
    assert!(next, "a returned unit admits one more");
    app.stop().await;
}

async fn challenge(app: &TestApp, user: i64, p: i64) -> (String, u32) {
    let res = app
        .api
        .user_post(user, &format!("/api/v1/products/{p}/room/challenge"))
        .await;
    assert_eq!(res.status(), 200);
    let c: Value = res.json().await.unwrap();
    (
        c["challenge"].as_str().unwrap().to_owned(),
        u32::try_from(c["difficulty"].as_u64().unwrap()).unwrap(),
    )
}

async fn join_with(app: &TestApp, user: i64, p: i64, body: Option<Value>) -> reqwest::Response {
    shopper_post(&app.api, user, p, "room", body).await
}

#[tokio::test(flavor = "multi_thread")]
async fn joining_a_room_with_proof_of_work_takes_a_fresh_solved_challenge_of_ones_own() {
    let app = TestApp::spawn_with(
        Role::Serve,
        &[
            ("SECKILL_POW_MIN_BITS", "8"),
            ("SECKILL_POW_MAX_BITS", "12"),
            ("SECKILL_POW_JOIN_RATE", "10"),
        ],
    )
    .await;
    let p = room_product(&app, 5, 300, true).await;
    assert_eq!(app.api.product(p).await["proof_of_work"], true);
    assert_problem(join_with(&app, 1, p, None).await, 403, "proof_required").await;

    let (c, bits) = challenge(&app, 1, p).await;
    assert_eq!(bits, 8, "the minimum while nobody joins");
    let solution = pow::solve(&c, bits);
    // A wrong solution, and another shopper's challenge, are refused.
    let wrong = (0u64..)
        .map(|n| n.to_string())
        .find(|s| !pow::solves(&c, s, bits))
        .unwrap();
    let refused = join_with(&app, 1, p, Some(json!({"challenge": c, "solution": wrong}))).await;
    assert_problem(refused, 403, "invalid_proof").await;
    let stolen = join_with(
        &app,
        2,
        p,
        Some(json!({"challenge": c, "solution": solution})),
    )
    .await;
    assert_problem(stolen, 403, "invalid_proof").await;
    // Solved: in the room. The same proof again is refused (used).
    let joined = join_with(
        &app,
        1,
        p,
        Some(json!({"challenge": c, "solution": solution})),
    )
    .await;
    assert_eq!(joined.status(), 200);
    let again = join_with(
        &app,
        1,
        p,
        Some(json!({"challenge": c, "solution": solution})),
    )
    .await;
    assert_problem(again, 403, "invalid_proof").await;
    // A challenge signed with another key is no challenge.
    let forged = seckill::auth::Auth::new(
        &seckill::config::Secrets {
            jwt_secret: None,
            admin_token: "another-admin-token-of-32-chars!!".to_owned().into(),
            token_secret: "another-token-secret-of-32-chars!".to_owned().into(),
            service_tokens: Vec::new(),
        },
        Duration::from_secs(60),
    )
    .issue_challenge(
        UserId::try_from(3_i64).unwrap(),
        ProductId::try_from(p).unwrap(),
        0,
        Duration::from_secs(60),
    )
    .unwrap()
    .token;
    let res = join_with(
        &app,
        3,
        p,
        Some(json!({"challenge": forged, "solution": "0"})),
    )
    .await;
    assert_problem(res, 403, "invalid_proof").await;

    // Shoppers join fast: 60 joins in about a second, far above 10 a second, so the room's
    // admission passes (4 a second) see the rate and the difficulty rises.
    for u in 10..70 {
        let (c, bits) = challenge(&app, u, p).await;
        let s = pow::solve(&c, bits);
        let res = join_with(&app, u, p, Some(json!({"challenge": c, "solution": s}))).await;
        assert_eq!(res.status(), 200);
    }
    let harder = eventually(Duration::from_secs(3), || async {
        challenge(&app, 99, p).await.1 > 8
    })
    .await;
    assert!(harder, "the difficulty follows the join rate");
    app.stop().await;
}

/// A shopper's room stream, read in a task: every `status` event's data, with when it came.
type Heard = std::sync::Arc<std::sync::Mutex<Vec<(tokio::time::Instant, Value)>>>;

async fn listen_room(api: &Api, user: i64, p: i64) -> Heard {
    let mut res = api
        .user_get(user, &format!("/api/v1/products/{p}/room/events"))
        .await;
    assert_eq!(res.status(), 200, "user {user}'s room stream");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let heard = Heard::default();
    let log = heard.clone();
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Ok(Some(chunk)) = res.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame = Frame {
                    at: tokio::time::Instant::now(),
                    text: buf.drain(..end + 2).collect(),
                };
                if let Some(view) = frame.status() {
                    log.lock().unwrap().push((frame.at, view));
                }
            }
        }
    });
    heard
}

/// The last view `heard`, and when the first one in `state` came.
fn last_and_first(heard: &Heard, state: &str) -> (Value, Option<tokio::time::Instant>) {
    let log = heard.lock().unwrap();
    let last = log.last().map(|(_, v)| v.clone()).unwrap_or(Value::Null);
    let first = log
        .iter()
        .find(|(_, v)| v["state"] == state)
        .map(|(at, _)| *at);
    (last, first)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_place_per_shopper_across_processes_and_every_stream_hears_sold_out_within_a_second() {
    let app = TestApp::spawn_with(Role::All, &[("SECKILL_USER_RATE", "1000/1s")]).await;
    let other = Sibling::spawn(&app.iso, Role::Serve, &[]).await;
    let p = room_product(&app, 2, 3, false).await;
    let users: Vec<i64> = (1..=30).collect();
    let via = |u: i64| if u % 2 == 0 { &app.api } else { &other.api };

    // Each shopper joins through both processes at once: one place each.
    for u in &users {
        let path = format!("/api/v1/products/{p}/room");
        let (a, b) = tokio::join!(app.api.user_post(*u, &path), other.api.user_post(*u, &path));
        assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    }
    let mut heard = Vec::new();
    for u in &users {
        heard.push((*u, listen_room(via(*u), *u, p).await));
    }
    // The draw, then two admitted (2 units × 120%), told over their streams with a token.
    let two = eventually(Duration::from_secs(15), || async {
        heard
            .iter()
            .filter(|(_, h)| last_and_first(h, "admitted").1.is_some())
            .count()
            == 2
    })
    .await;
    assert!(two, "two admitted, over their streams");
    // Each process tells its own streams their places after its own next pass.
    let placed = eventually(Duration::from_secs(3), || async {
        heard
            .iter()
            .all(|(_, h)| last_and_first(h, "").0["place"].is_i64())
    })
    .await;
    assert!(placed, "every stream told its place after the draw");
    let mut places = Vec::new();
    for (u, h) in &heard {
        let (last, _) = last_and_first(h, "");
        let place = last["place"].as_i64().expect("a place after the draw");
        // Both processes answer the same place.
        for api in [&app.api, &other.api] {
            let res = api
                .user_get(*u, &format!("/api/v1/products/{p}/room/me"))
                .await;
            assert_eq!(
                res.json::<Value>().await.unwrap()["place"],
                place,
                "user {u}"
            );
        }
        places.push(place);
    }
    places.sort_unstable();
    assert_eq!(places, (1..=30).collect::<Vec<_>>());

    // Both admitted buy; from the second win, every stream still waiting says sold out
    // within a second, in both processes.
    let winners: Vec<i64> = heard
        .iter()
        .filter(|(_, h)| last_and_first(h, "admitted").1.is_some())
        .map(|(u, _)| *u)
        .collect();
    for u in &winners {
        let h = &heard.iter().find(|(w, _)| w == u).unwrap().1;
        let admission = last_and_first(h, "").0["admission_token"]
            .as_str()
            .expect("an admitted view carries its admission token")
            .to_owned();
        let res = token_with(via(*u), *u, p, Some(&admission)).await;
        assert_eq!(res.status(), 200);
        let purchase = res.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(via(*u).reserve(*u, p, &purchase).await.status(), 202);
    }
    let sold_at = tokio::time::Instant::now();
    let waiting: Vec<&(i64, Heard)> = heard.iter().filter(|(u, _)| !winners.contains(u)).collect();
    let all = eventually(Duration::from_secs(3), || async {
        waiting
            .iter()
            .all(|(_, h)| last_and_first(h, "sold_out").1.is_some())
    })
    .await;
    assert!(all, "every waiting stream hears sold out");
    for (u, h) in &waiting {
        let at = last_and_first(h, "sold_out").1.unwrap();
        let late = at.saturating_duration_since(sold_at);
        assert!(
            late <= Duration::from_secs(1),
            "user {u} heard sold out {late:?} after it"
        );
    }
    // The winners' turn has passed once their orders are in.
    for u in &winners {
        let h = &heard.iter().find(|(w, _)| w == u).unwrap().1;
        let passed = eventually(Duration::from_secs(10), || async {
            last_and_first(h, "turn_passed").1.is_some()
        })
        .await;
        assert!(passed, "user {u}'s stream says their turn passed");
    }
    other.stop().await;
    app.stop().await;
}
