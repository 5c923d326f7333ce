//! The shoppers' event streams under hostile traffic: caps per user and per process, a bounded
//! lifetime, wake-ups routed to the one shopper they concern, a heartbeat of each stream's own,
//! and a stream token for browsers that never puts a JWT in a URL or a token in a log.

use std::time::Duration;

use fred::prelude::*;
use reqwest::Response;
use seckill::startup::Role;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::helpers::{
    Api, Isolation, JWT_SECRET, Proc, TOKEN_SECRET, TestApp, assert_problem, epoch_secs,
    eventually, jwt, purchase_token, sign,
};

/// One server-sent frame, as received, and when.
#[derive(Debug)]
pub struct Frame {
    pub at: Instant,
    pub text: String,
}

impl Frame {
    fn is_keep_alive(&self) -> bool {
        self.text.starts_with(": keep-alive")
    }

    /// The data of a `status` event.
    pub fn status(&self) -> Option<Value> {
        let data = self.text.lines().find_map(|l| l.strip_prefix("data: "))?;
        serde_json::from_str(data).ok()
    }
}

/// Reads frames for `limit` at most; whether the server ended the stream within it.
async fn frames(mut res: Response, limit: Duration) -> (Vec<Frame>, bool) {
    let deadline = Instant::now() + limit;
    let mut buf = String::new();
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, res.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let text: String = buf.drain(..end + 2).collect();
                    seen.push(Frame {
                        at: Instant::now(),
                        text,
                    });
                }
            }
            Ok(Ok(None)) => return (seen, true),
            Ok(Err(e)) => panic!("stream broke: {e}"),
            Err(_) => return (seen, false),
        }
    }
}

/// An API process (no worker: reservations stay `pending`) with these stream settings, a live
/// product, and a won unit for each of `users`.
async fn sale(extra: &[(&str, &str)], users: std::ops::RangeInclusive<i64>) -> (TestApp, i64) {
    let app = TestApp::spawn_with(Role::Serve, extra).await;
    let p = app.api.live_product(100).await;
    for u in users {
        assert_eq!(app.api.buy(u, p).await.status(), 202);
    }
    (app, p)
}

async fn open_stream(api: &Api, user: i64, product: i64) -> Response {
    let res = api.me_events(user, product).await;
    assert_eq!(res.status(), 200, "stream of user {user}");
    res
}

async fn open_streams(api: &Api) -> f64 {
    api.metric("seckill_sse_streams_open ").await
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_are_capped_per_shopper_with_429_and_per_process_with_503() {
    let (app, p) = sale(
        &[("SECKILL_SSE_PER_USER", "2"), ("SECKILL_SSE_MAX", "3")],
        1..=3,
    )
    .await;
    let api = &app.api;
    let first = open_stream(api, 1, p).await;
    let second = open_stream(api, 1, p).await;
    assert_problem(api.me_events(1, p).await, 429, "too_many_streams").await;
    // Another shopper is not held back by the first one's streams.
    let other = open_stream(api, 2, p).await;
    let (headers, _) = assert_problem(api.me_events(3, p).await, 503, "streams_exhausted").await;
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert_eq!(open_streams(api).await, 3.0);
    assert_eq!(
        api.metric("seckill_sse_streams_refused_total{limit=\"per_user\"}")
            .await,
        1.0
    );

    // A client that goes away frees its slot: the count is exact, not leaked.
    drop(first);
    assert!(
        eventually(Duration::from_secs(5), || async {
            open_streams(api).await == 2.0
        })
        .await,
        "a disconnected stream is still counted"
    );
    let third = open_stream(api, 3, p).await;
    assert_problem(api.me_events(1, p).await, 503, "streams_exhausted").await;
    drop((second, other, third));
    assert!(
        eventually(Duration::from_secs(5), || async {
            open_streams(api).await == 0.0
        })
        .await
    );
    // A refused or failed attempt holds no slot either.
    assert_problem(api.me_events(9, p).await, 404, "no_reservation").await;
    assert_eq!(open_streams(api).await, 0.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_after_its_lifetime_with_a_retry_hint() {
    let (app, p) = sale(&[("SECKILL_SSE_LIFETIME_SECS", "2")], 1..=1).await;
    let opened = Instant::now();
    let res = open_stream(&app.api, 1, p).await;
    let (seen, ended) = frames(res, Duration::from_secs(6)).await;
    assert!(ended, "still open after 6 s: {seen:?}");
    let lived = seen.last().unwrap().at - opened;
    assert!(
        lived >= Duration::from_millis(1_700) && lived < Duration::from_secs(4),
        "lived {lived:?}"
    );
    assert_eq!(seen[0].status().unwrap()["status"], "pending");
    let last = &seen.last().unwrap().text;
    let retry: u64 = last
        .lines()
        .find_map(|l| l.strip_prefix("retry: "))
        .unwrap_or_else(|| panic!("no retry hint in {last:?}"))
        .parse()
        .unwrap();
    assert!((1_000..=5_000).contains(&retry), "{retry}");
    assert!(
        eventually(Duration::from_secs(2), || async {
            open_streams(&app.api).await == 0.0
        })
        .await
    );
    app.stop().await;
}

/// Publishes `message` on the deployment's pub/sub channel `count` times, in pipelined bursts
/// of 100 a few milliseconds apart.
async fn publish(app: &TestApp, message: &str, count: usize) {
    let channel = app.keys().events();
    for burst in 0..count.div_ceil(100) {
        let n = (count - burst * 100).min(100);
        let client = app.redis.next();
        let sent = futures_util::future::join_all(
            (0..n).map(|_| client.publish::<i64, _, _>(channel.clone(), message)),
        )
        .await;
        assert!(sent.iter().all(Result::is_ok));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_shoppers_events_do_not_wake_a_stream() {
    let (app, p) = sale(&[], 1..=2).await;
    let api = &app.api;
    let res = open_stream(api, 1, p).await;
    let reader = tokio::spawn(frames(res, Duration::from_secs(4)));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 2,000 status events of shopper 2 (who has no stream here) and stock events: none of
    // them is shopper 1's business.
    publish(&app, &format!("status:{p}:2"), 2_000).await;
    publish(&app, &format!("stock:{p}"), 500).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let woken = api.metric("seckill_sse_wakeups_total ").await;
    let resyncs = api.metric("seckill_sse_resyncs_total ").await;
    // A resync (the subscription lagged) wakes each stream once; nothing else may.
    assert!(
        woken <= resyncs && resyncs <= 2.0,
        "woken {woken} times by others' events ({resyncs} resyncs)"
    );

    // Shopper 1's own event wakes it (once, however many arrive together).
    publish(&app, &format!("status:{p}:1"), 1).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            api.metric("seckill_sse_wakeups_total ").await == woken + 1.0
        })
        .await
    );
    let (seen, _) = reader.await.unwrap();
    let statuses = seen.iter().filter(|f| f.status().is_some()).count();
    assert_eq!(
        statuses, 1,
        "only the first view, nothing changed: {seen:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_gets_its_heartbeat_on_time_while_other_shoppers_events_flow() {
    let (app, p) = sale(&[("SECKILL_SSE_HEARTBEAT_SECS", "1")], 1..=2).await;
    let opened = Instant::now();
    let res = open_stream(&app.api, 1, p).await;
    // Shopper 2 watches too, and their events flow all the time (every 20 ms).
    let theirs = open_stream(&app.api, 2, p).await;
    let reader = tokio::spawn(frames(res, Duration::from_millis(3_600)));
    let channel = app.keys().events();
    let client = app.redis.next().clone();
    let message = format!("status:{p}:2");
    let until = Instant::now() + Duration::from_millis(3_600);
    while Instant::now() < until {
        let _: i64 = client.publish(&channel, &message).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (seen, _) = reader.await.unwrap();
    let beats: Vec<Duration> = seen
        .iter()
        .filter(|f| f.is_keep_alive())
        .map(|f| f.at - opened)
        .collect();
    assert!(beats.len() >= 3, "keep-alives at {beats:?}");
    let mut previous = Duration::ZERO;
    for at in &beats {
        assert!(*at - previous < Duration::from_millis(1_600), "{beats:?}");
        previous = *at;
    }
    drop(theirs);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_token_opens_the_stream_without_authorization() {
    let (app, p) = sale(&[], 1..=1).await;
    let api = &app.api;
    let res = api.stream_token(1, p).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["expires_in"], 60);
    let token = body["token"].as_str().unwrap();

    let res = api.me_events_with_token(p, token).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let (seen, _) = frames(res, Duration::from_millis(500)).await;
    assert_eq!(seen[0].status().unwrap()["status"], "pending", "{seen:?}");

    // Minting one needs the JWT itself; unknown products have none.
    let path = format!("/api/v1/products/{p}/reservations/me/stream-token");
    let anonymous = api
        .client
        .post(format!("{}{path}?token={token}", api.http))
        .send()
        .await
        .unwrap();
    assert_problem(anonymous, 401, "unauthorized").await;
    assert_problem(api.stream_token(1, 999_999).await, 404, "product_not_found").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_forged_and_other_products_stream_tokens_and_jwts_in_the_url_get_401() {
    let (app, p) = sale(&[], 1..=1).await;
    let api = &app.api;
    let q = api.live_product(1).await;
    let other_product: Value = api.stream_token(1, q).await.json().await.unwrap();
    let claims = |exp: u64| json!({"sub": "1", "pid": p, "exp": exp, "aud": "seckill:stream"});
    let cases = [
        ("expired", sign(claims(epoch_secs() - 1), TOKEN_SECRET)),
        (
            "forged",
            sign(claims(epoch_secs() + 60), "an-attackers-own-key-0123456789"),
        ),
        (
            "signed with the JWT key",
            sign(claims(epoch_secs() + 60), JWT_SECRET),
        ),
        (
            "another product's",
            other_product["token"].as_str().unwrap().to_owned(),
        ),
        ("the shopper's JWT", jwt(1)),
        ("a purchase token", purchase_token(1, p)),
        ("garbage", "not-a-token".to_owned()),
    ];
    for (what, token) in cases {
        let res = api.me_events_with_token(p, &token).await;
        assert_eq!(res.status(), 401, "{what}");
        assert_problem(res, 401, "unauthorized").await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_token_never_reaches_the_log() {
    let iso = Isolation::new();
    let log_path = std::env::temp_dir().join(format!("seckill-sse-log-{}.json", iso.prefix));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut proc = Proc::start_logging(&iso, "serve", &[("RUST_LOG", "info,seckill=debug")], log);
    proc.wait_healthy().await;
    let api = proc.api().clone();
    let p = api.live_product(5).await;
    assert_eq!(api.buy(1, p).await.status(), 202);
    let body: Value = api.stream_token(1, p).await.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    let res = api.me_events_with_token(p, &token).await;
    assert_eq!(res.status(), 200);
    let (seen, _) = frames(res, Duration::from_millis(300)).await;
    assert!(!seen.is_empty());
    let refused = jwt(1);
    assert_eq!(api.me_events_with_token(p, &refused).await.status(), 401);
    let opened_logged = eventually(Duration::from_secs(5), || async {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .contains("event stream opened")
    })
    .await;
    proc.kill9();
    let text = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(opened_logged, "the stream's request was not logged: {text}");
    // The request is logged, with its path...
    assert!(
        text.contains(&format!("/api/v1/products/{p}/reservations/me/events")),
        "{text}"
    );
    // ...but neither the stream token nor a JWT sent in its place, nor any query string.
    for secret in [token.as_str(), refused.as_str(), "token="] {
        assert!(!text.contains(secret), "{secret} in the log: {text}");
    }
}
