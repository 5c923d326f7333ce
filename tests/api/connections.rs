//! Hostile connections, over real TCP sockets: trickled bodies, unauthenticated bodies, too many
//! connections from one address or in all, forwarded client addresses (every
//! `X-Forwarded-For` line, IPv6 per /64), and the operators' listener's own rate limit.

use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use reqwest::header::{HeaderMap, HeaderValue};
use seckill::startup::Role;
use serde_json::Value;

use crate::helpers::{ADMIN_TOKEN, Api, TestApp, assert_problem, jwt};

/// An HTTP/1.1 answer read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw TCP connection to `base` (`http://127.0.0.1:<port>`).
fn connect(base: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads one answer (head and a `Content-Length` body), waiting `limit` at most.
fn read_response(s: &mut TcpStream, limit: Duration) -> Option<RawResponse> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some(RawResponse {
        status,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    })
}

/// Whether the server closed the connection within `limit` (end of stream or a reset).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut chunk = [0_u8; 1024];
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A request head announcing a body of `length` bytes (or a chunked one) that will trickle.
fn slow_post_head(path: &str, auth: Option<&str>, length: Option<usize>) -> String {
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: seckill\r\nContent-Type: application/json\r\n");
    if let Some(auth) = auth {
        head.push_str(&format!("Authorization: Bearer {auth}\r\n"));
    }
    match length {
        Some(n) => head.push_str(&format!("Content-Length: {n}\r\n\r\n")),
        None => head.push_str("Transfer-Encoding: chunked\r\n\r\n"),
    }
    head
}

/// Sends `head`, then one byte of body every `every` (a chunk of one byte if chunked) until the
/// server answers; returns the answer, how long it took, and whether the server then closed the
/// connection within 1.5 s.
fn trickle(
    base: &str,
    head: String,
    chunked: bool,
    every: Duration,
) -> (Option<RawResponse>, Duration, bool) {
    let mut s = connect(base);
    let started = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    let mut writer = s.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let sender = std::thread::spawn(move || {
        let byte: &[u8] = if chunked { b"1\r\n{\r\n" } else { b"{" };
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            if writer.write_all(byte).is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    });
    let res = read_response(&mut s, Duration::from_secs(10));
    let took = started.elapsed();
    let closed = closed_within(&mut s, Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = sender.join();
    (res, took, closed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trickled_body_is_answered_408_body_timeout_and_closed_within_the_timeout() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.live_product(5).await;
    let (http, admin) = (app.api.http.clone(), app.api.admin.clone());
    let user = jwt(1);
    let cases = [
        // (listener, path, auth, chunked)
        (
            http.clone(),
            format!("/api/v1/products/{p}/reservations"),
            user.clone(),
            false,
        ),
        (
            http.clone(),
            format!("/api/v1/products/{p}/reservations"),
            user.clone(),
            true,
        ),
        (
            admin.clone(),
            format!("/api/v1/admin/products/{p}/preheat"),
            ADMIN_TOKEN.to_owned(),
            false,
        ),
        (
            admin.clone(),
            "/api/v1/admin/products".to_owned(),
            ADMIN_TOKEN.to_owned(),
            true,
        ),
    ];
    let runs = cases.map(|(base, path, auth, chunked)| {
        let length = (!chunked).then_some(16_384);
        let head = slow_post_head(&path, Some(&auth), length);
        tokio::task::spawn_blocking(move || {
            let (res, took, closed) = trickle(&base, head, chunked, Duration::from_millis(500));
            (format!("{base}{path} chunked={chunked}"), res, took, closed)
        })
    });
    for run in runs {
        let (name, res, took, closed) = run.await.unwrap();
        let res = res.unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(res.status, 408, "{name}: {res:?}");
        assert_eq!(res.body["code"], "body_timeout", "{name}: {res:?}");
        assert_eq!(res.header("content-type"), Some("application/problem+json"));
        assert_eq!(res.header("connection"), Some("close"), "{name}: {res:?}");
        // The default body timeout is 2 s.
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
            "{name}: answered after {took:?}"
        );
        assert!(closed, "{name}: the connection stayed open");
    }
    // Still serving: a purchase wins.
    assert_eq!(app.api.buy(1, p).await.status(), 202);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_body_timeout_is_a_setting() {
    let app = TestApp::spawn_with(Role::Serve, &[("SECKILL_BODY_TIMEOUT_MS", "300")]).await;
    let p = app.api.live_product(5).await;
    let head = slow_post_head(
        &format!("/api/v1/products/{p}/reservations"),
        Some(&jwt(1)),
        Some(100),
    );
    let http = app.api.http.clone();
    let (res, took, closed) = tokio::task::spawn_blocking(move || {
        trickle(&http, head, false, Duration::from_millis(100))
    })
    .await
    .unwrap();
    assert_eq!(res.unwrap().status, 408);
    assert!(took < Duration::from_millis(1300), "{took:?}");
    assert!(closed);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unauthenticated_purchase_gets_401_at_once_without_its_body_being_read() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.live_product(5).await;
    let http = app.api.http.clone();
    let path = format!("/api/v1/products/{p}/reservations");
    let (res, took, closed) = tokio::task::spawn_blocking(move || {
        // A huge announced body (or a chunked one, which actix would otherwise drain for as
        // long as it trickles), a few bytes sent, and no credentials (or forged ones).
        let mut answers = Vec::new();
        for (auth, chunked) in [(None, false), (Some("not.a.jwt"), false), (None, true)] {
            let head = slow_post_head(&path, auth, (!chunked).then_some(16_384));
            answers.push(trickle(&http, head, chunked, Duration::from_millis(200)));
        }
        answers
    })
    .await
    .unwrap()
    .into_iter()
    .fold(
        (Vec::new(), Duration::ZERO, true),
        |(mut all, most, closed), (r, t, c)| {
            all.push(r);
            (all, most.max(t), closed && c)
        },
    );
    for r in res {
        let r = r.expect("an answer");
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (401, Some("unauthorized"))
        );
    }
    assert!(took < Duration::from_millis(500), "answered after {took:?}");
    assert!(closed, "the connection with the unread body stays open");
    app.stop().await;
}

/// Opens a keep-alive connection and makes one request on it; the answer's status.
fn request_on(s: &mut TcpStream, path: &str) -> RawResponse {
    let req = format!("GET {path} HTTP/1.1\r\nHost: seckill\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_response(s, Duration::from_secs(5)).expect("an answer")
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_per_ip_cap_get_429_while_a_purchase_on_a_fresh_one_still_wins() {
    let app = TestApp::spawn_with(
        Role::Serve,
        &[
            ("SECKILL_MAX_CONNECTIONS_PER_IP", "8"),
            ("SECKILL_USER_RATE", "100/1s"),
        ],
    )
    .await;
    let p = app.api.live_product(5).await;
    let http = app.api.http.clone();
    let path = format!("/api/v1/products/{p}");
    let (mut held, refused) = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        for _ in 0..8 {
            let mut s = connect(&http);
            assert_eq!(request_on(&mut s, &path).status, 200);
            held.push(s);
        }
        let mut refused = Vec::new();
        for _ in 0..3 {
            let mut s = connect(&http);
            let res = request_on(&mut s, &path);
            let closed = closed_within(&mut s, Duration::from_secs(2));
            refused.push((res, closed));
        }
        (held, refused)
    })
    .await
    .unwrap();
    for (res, closed) in refused {
        assert_eq!(res.status, 429, "{res:?}");
        assert_eq!(res.body["code"], "too_many_connections", "{res:?}");
        assert_eq!(res.header("connection"), Some("close"));
        assert!(res.header("retry-after").is_some(), "{res:?}");
        assert!(closed, "a refused connection is closed");
    }
    // The connections held are still served.
    let path = format!("/api/v1/products/{p}");
    let mut first = held.remove(0);
    let again = tokio::task::spawn_blocking(move || request_on(&mut first, &path))
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    // Close some; a shopper on fresh connections buys.
    held.truncate(4);
    let api = Api::new(app.api.http.clone(), app.api.admin.clone());
    let bought = crate::helpers::eventually(Duration::from_secs(5), || async {
        let token = api.token(7, p).await;
        if token.status() != 200 {
            return false;
        }
        let token: Value = token.json().await.unwrap();
        let res = api.reserve(7, p, token["token"].as_str().unwrap()).await;
        res.status() == 202
    })
    .await;
    assert!(bought, "a purchase on a fresh connection won");
    drop(held);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_total_cap_get_503_at_capacity() {
    let app = TestApp::spawn_with(Role::Serve, &[("SECKILL_MAX_CONNECTIONS", "4")]).await;
    let http = app.api.http.clone();
    let refused = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut s = connect(&http);
            assert_eq!(request_on(&mut s, "/healthz").status, 200);
            held.push(s);
        }
        let mut s = connect(&http);
        let res = request_on(&mut s, "/healthz");
        drop(held);
        res
    })
    .await
    .unwrap();
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["code"], "at_capacity");
    assert_eq!(refused.header("connection"), Some("close"));
    // Once they are closed, a new connection is served.
    let served = crate::helpers::eventually(Duration::from_secs(5), || async {
        let client = seckill::tls::http_client()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        client
            .get(format!("{}/healthz", app.api.http))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(served);
    app.stop().await;
}

/// A GET with each of `forwarded` as an `X-Forwarded-For` line of its own.
async fn get_forwarded(api: &Api, path: &str, forwarded: &[&str]) -> reqwest::Response {
    let mut headers = HeaderMap::new();
    for f in forwarded {
        headers.append("x-forwarded-for", HeaderValue::from_str(f).unwrap());
    }
    api.client
        .get(format!("{}{path}", api.http))
        .headers(headers)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ip_limit_reads_every_forwarded_line_and_counts_an_ipv6_slash_64_as_one_client() {
    let app = TestApp::spawn_with(
        Role::Serve,
        &[
            ("SECKILL_IP_RATE", "2/1m"),
            ("SECKILL_TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/8"),
        ],
    )
    .await;
    let api = &app.api;
    let path = "/api/v1/products/1";
    // The client is the right-most untrusted address over all the lines, in order: 5.5.5.5
    // each time, whatever the client wrote on the left.
    for left in ["9.9.9.1", "9.9.9.2"] {
        let res = get_forwarded(api, path, &[left, "5.5.5.5, 10.0.0.1"]).await;
        assert_eq!(res.status(), 404);
    }
    let res = get_forwarded(api, path, &["9.9.9.3", "5.5.5.5", "10.0.0.2"]).await;
    assert_problem(res, 429, "rate_limited").await;
    // IPv6: one /64 is one client; another /64 is another.
    for ip in ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9"] {
        assert_eq!(get_forwarded(api, path, &[ip]).await.status(), 404);
    }
    let res = get_forwarded(api, path, &["2001:db8:1:2:abcd::7"]).await;
    assert_problem(res, 429, "rate_limited").await;
    assert_eq!(
        get_forwarded(api, path, &["2001:db8:1:3::1"])
            .await
            .status(),
        404
    );
    // An IPv4-mapped IPv6 address is the IPv4 client.
    let res = get_forwarded(api, path, &["::ffff:5.5.5.5"]).await;
    assert_problem(res, 429, "rate_limited").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operators_listener_is_rate_limited_per_ip() {
    let app = TestApp::spawn_with(Role::Serve, &[("SECKILL_ADMIN_IP_RATE", "3/1m")]).await;
    let api = &app.api;
    for _ in 0..3 {
        assert_eq!(
            api.get_admin("/api/v1/admin/products/424242")
                .await
                .status(),
            404
        );
    }
    let (headers, _) = assert_problem(
        api.get_admin("/api/v1/admin/products/424242").await,
        429,
        "rate_limited",
    )
    .await;
    assert!(headers.contains_key("retry-after"));
    // Health checks are exempt; the shoppers' listener has its own limit.
    assert_eq!(api.get_admin("/healthz").await.status(), 200);
    assert_eq!(api.get("/api/v1/products/424242").await.status(), 404);
    app.stop().await;
}

/// One attack of [`the_attacks_of_a_flash_sale_are_each_answered_fast_with_their_code`]: what
/// it got, and how long the server took to answer it.
struct Attacked {
    status: u16,
    code: String,
    took: Duration,
}

/// Sends `req` and times the answer.
async fn timed(req: reqwest::RequestBuilder) -> Attacked {
    let started = Instant::now();
    let res = req.send().await.unwrap();
    attacked(res, started).await
}

async fn attacked(res: reqwest::Response, started: Instant) -> Attacked {
    let took = started.elapsed();
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    Attacked {
        status,
        code: body["code"].as_str().unwrap_or("").to_owned(),
        took,
    }
}

/// The attacks issue #12 names, one table against one server: each is answered with its own
/// code within its bound, and afterwards the server still serves and a shopper still wins.
#[tokio::test(flavor = "multi_thread")]
async fn the_attacks_of_a_flash_sale_are_each_answered_fast_with_their_code() {
    let app = TestApp::spawn_with(
        Role::Serve,
        &[
            ("SECKILL_BODY_TIMEOUT_MS", "500"),
            ("SECKILL_MAX_CONNECTIONS_PER_IP", "16"),
            ("SECKILL_SSE_PER_USER", "2"),
            ("SECKILL_IP_RATE", "300/1s"),
        ],
    )
    .await;
    let api = app.api.clone();
    let p = api.live_product(5).await;
    assert_eq!(api.buy(1, p).await.status(), 202);
    let (http, reserve) = (
        api.http.clone(),
        format!("{}/api/v1/products/{p}/reservations", api.http),
    );
    let mut rows: Vec<(&str, Attacked, u16, &str, Duration)> = Vec::new();
    let ms = Duration::from_millis;

    // A body trickled a byte every 200 ms.
    let (h, path) = (http.clone(), format!("/api/v1/products/{p}/reservations"));
    let auth = jwt(2);
    let (res, took, closed) = tokio::task::spawn_blocking(move || {
        trickle(
            &h,
            slow_post_head(&path, Some(&auth), Some(4096)),
            false,
            ms(200),
        )
    })
    .await
    .unwrap();
    let res = res.expect("an answer to the trickled body");
    assert!(closed, "the trickling connection is closed");
    let code = res.body["code"].as_str().unwrap_or("").to_owned();
    rows.push((
        "trickled body",
        Attacked {
            status: res.status,
            code,
            took,
        },
        408,
        "body_timeout",
        ms(1_500),
    ));

    // A stranger's 1 MiB body: refused before a byte of it is read.
    let got = timed(
        api.client
            .post(&reserve)
            .header("content-type", "application/json")
            .body(vec![b' '; 1 << 20]),
    )
    .await;
    rows.push((
        "unauthenticated 1 MiB body",
        got,
        401,
        "unauthorized",
        ms(1_000),
    ));

    // A shopper's 1 MiB body.
    let got = timed(
        api.client
            .post(&reserve)
            .bearer_auth(jwt(3))
            .header("content-type", "application/json")
            .body(vec![b' '; 1 << 20]),
    )
    .await;
    rows.push(("1 MiB body", got, 413, "payload_too_large", ms(1_000)));

    // `alg: none` with a made-up subject.
    let got = timed(
        api.client
            .post(&reserve)
            .bearer_auth("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.")
            .json(&serde_json::json!({"token": "x"})),
    )
    .await;
    rows.push(("alg none JWT", got, 401, "unauthorized", ms(500)));

    // The shopper's long-lived JWT in the event stream's URL (it would end up in logs).
    let got = timed(api.client.get(format!(
        "{http}/api/v1/products/{p}/reservations/me/events?token={}",
        jwt(1)
    )))
    .await;
    rows.push(("JWT in a URL", got, 401, "unauthorized", ms(500)));

    // More event streams than one shopper may hold.
    let held = [api.me_events(1, p).await, api.me_events(1, p).await];
    assert!(held.iter().all(|r| r.status() == 200));
    let started = Instant::now();
    let res = api.me_events(1, p).await;
    rows.push((
        "a third stream of one shopper",
        attacked(res, started).await,
        429,
        "too_many_streams",
        ms(500),
    ));
    drop(held);

    // A made-up method on a real path.
    let got = timed(api.client.request(
        reqwest::Method::from_bytes(b"BREW").unwrap(),
        format!("{http}/api/v1/products/{p}"),
    ))
    .await;
    rows.push(("made-up method", got, 405, "method_not_allowed", ms(500)));

    // Random product ids (a scraper): 200 of them cost Postgres a bounded number of looks.
    let statements = || async {
        let text = api.get_admin("/metrics").await.text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("seckill_db_queries_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let queries_before = statements().await;
    let started = Instant::now();
    let mut last = None;
    for i in 0..200_i64 {
        let res = api
            .get(&format!("/api/v1/products/{}", 1_000_000 + i * 7_919))
            .await;
        last = Some(res);
    }
    rows.push((
        "200 unknown ids",
        attacked(last.unwrap(), started).await,
        404,
        "product_not_found",
        ms(5_000),
    ));
    let looks = statements().await - queries_before;
    assert!(
        looks <= 10.0,
        "200 unknown ids made {looks} Postgres statements"
    );

    // More connections than one client may hold (16, the test's own pooled ones included):
    // the one past the cap is refused and closed.
    let h = http.clone();
    let path = format!("/api/v1/products/{p}");
    let (held, refused) = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        for _ in 0..17 {
            let mut s = connect(&h);
            let started = Instant::now();
            let res = request_on(&mut s, &path);
            let took = started.elapsed();
            if res.status == 200 {
                held.push(s);
            } else {
                let closed = closed_within(&mut s, Duration::from_secs(2));
                return (held, Some((res, took, closed)));
            }
        }
        (held, None)
    })
    .await
    .unwrap();
    let (res, took, closed) = refused.expect("a connection past the cap was refused");
    assert!(held.len() <= 16, "{} connections held", held.len());
    assert!(closed, "a refused connection is closed: {res:?}");
    let code = res.body["code"].as_str().unwrap_or("").to_owned();
    rows.push((
        "connection past the cap",
        Attacked {
            status: res.status,
            code,
            took,
        },
        429,
        "too_many_connections",
        ms(500),
    ));
    drop(held);

    // A request flood from one client: 8 at a time (under its connection cap), faster than
    // its 300/s.
    let url = format!("{http}/api/v1/products/{p}");
    let started = Instant::now();
    let limited = futures_util::stream::iter(0..1_000)
        .map(|_| api.client.get(&url).send())
        .buffer_unordered(8)
        .filter_map(|res| async move { res.ok().filter(|r| r.status() == 429) })
        .boxed()
        .next()
        .await;
    let res = limited.expect("the flood was limited");
    rows.push((
        "request flood from one client",
        attacked(res, started).await,
        429,
        "rate_limited",
        ms(3_000),
    ));

    let mut failed = Vec::new();
    for (name, got, status, code, bound) in &rows {
        println!(
            "{name:32} {} {:24} {:>6} ms (bound {} ms)",
            got.status,
            got.code,
            got.took.as_millis(),
            bound.as_millis()
        );
        if got.status != *status || got.code != *code || got.took > *bound {
            failed.push(format!(
                "{name}: {} {} in {:?}, expected {status} {code} within {bound:?}",
                got.status, got.code, got.took
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");

    // Still serving, and a shopper still wins.
    assert_eq!(api.get("/healthz").await.status(), 200);
    // (Once the flood's bucket has refilled: the shopper shares the flooder's address here.)
    let won = crate::helpers::eventually(Duration::from_secs(5), || async {
        let token = api.token(9, p).await;
        if token.status() != 200 {
            return false;
        }
        let token: Value = token.json().await.unwrap();
        let res = api.reserve(9, p, token["token"].as_str().unwrap()).await;
        res.status() == 202
    })
    .await;
    assert!(won, "a legitimate purchase still wins");
    app.stop().await;
}

/// The operators' listener caps connections per client like the shoppers' one, counted apart:
/// a client over the cap there still reaches the shoppers' listener.
#[tokio::test(flavor = "multi_thread")]
async fn the_operators_listener_caps_connections_per_client_apart_from_the_shoppers() {
    let app = TestApp::spawn_with(Role::Serve, &[("SECKILL_MAX_CONNECTIONS_PER_IP", "3")]).await;
    let (admin, http) = (app.api.admin.clone(), app.api.http.clone());
    let (held, refused, shop) = tokio::task::spawn_blocking(move || {
        let held: Vec<TcpStream> = (0..3)
            .map(|_| {
                let mut s = connect(&admin);
                assert_eq!(request_on(&mut s, "/healthz").status, 200);
                s
            })
            .collect();
        let mut s = connect(&admin);
        let refused = request_on(&mut s, "/healthz");
        let mut s = connect(&http);
        let shop = request_on(&mut s, "/healthz");
        (held, refused, shop)
    })
    .await
    .unwrap();
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.body["code"], "too_many_connections");
    assert_eq!(shop.status, 200, "the shoppers' listener counts its own");
    drop(held);
    app.stop().await;
}
