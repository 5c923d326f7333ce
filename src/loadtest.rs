//! `seckill loadtest`: a whole flash sale against a running server, with live figures.
//!
//! Creates and preheats a product (stock S), mints JWTs for N users, fetches their purchase
//! tokens once the sale is live, then fires purchase attempts at concurrency C for a fixed
//! time or count. Reports requests/s, latency percentiles, outcomes by code, time to
//! sell-out and time until every winner is an order, and verifies the guarantees (orders ==
//! winners <= S, no user twice, no 5xx, no transport error) — a failed check is a non-zero exit.
//! `--mode trivial` hammers `GET /healthz` instead: the HTTP-side limit of the same server.
//!
//! The client is reqwest (already our HTTP client in tests): a shared keep-alive pool and one
//! task per connection is all a closed-loop load generator needs, so no load-testing framework.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::Utc;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::config::{Secrets, parse_duration};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A flash sale: purchases against a fresh product.
    Sale,
    /// `GET /healthz` on the same server (the HTTP-side limit).
    Trivial,
}

/// Options of `seckill loadtest` (secrets come from the usual SECKILL_* variables).
#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// The shoppers' base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// The operators' base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub admin: String,
    #[arg(long, value_enum, default_value = "sale")]
    pub mode: Mode,
    /// Units on sale.
    #[arg(long, default_value_t = 1_000)]
    pub stock: i64,
    /// Shoppers.
    #[arg(long, default_value_t = 10_000)]
    pub users: i64,
    /// Connections (requests in flight).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// How long to fire (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many purchase attempts instead (whichever comes first).
    #[arg(long)]
    pub requests: Option<u64>,
    /// The sale starts this long after the product is created.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub starts_in: Duration,
    /// How long to wait for every winner to become an order (0s: do not wait or check,
    /// e.g. while no worker runs).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub settle: Duration,
}

#[derive(Default)]
struct Live {
    sent: AtomicU64,
    won: AtomicU64,
    rate_limited: AtomicU64,
    sold_out: AtomicU64,
    other: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    /// µs from the start of firing to the first sold_out answer (0 = not yet).
    sold_out_at_us: AtomicU64,
}

#[derive(Default)]
struct WorkerResult {
    latencies_us: Vec<u32>,
    codes: HashMap<String, u64>,
    winners: Vec<i64>,
}

fn bearer(secret: &str, claims: Value) -> anyhow::Result<String> {
    Ok(format!(
        "Bearer {}",
        crate::auth::sign_user_jwt(secret, &claims)?
    ))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1_000.0
}

/// Runs the load test; `Ok(true)` when every check passed.
pub async fn run(args: LoadtestArgs, secrets: &Secrets) -> anyhow::Result<bool> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()?;
    match args.mode {
        Mode::Trivial => trivial(&args, &client).await,
        Mode::Sale => sale(&args, &client, secrets).await,
    }
}

async fn trivial(args: &LoadtestArgs, client: &reqwest::Client) -> anyhow::Result<bool> {
    let url = Arc::new(format!("{}/healthz", args.target));
    let (results, elapsed, live) = fire(
        args,
        move |_, client| {
            let req = client.get(url.as_str());
            async move { req.send().await }
        },
        client,
        1,
    )
    .await;
    report(&results, elapsed, &live, "GET /healthz");
    Ok(live.server_errors.load(Ordering::Relaxed) == 0
        && live.transport_errors.load(Ordering::Relaxed) == 0)
}

async fn sale(
    args: &LoadtestArgs,
    client: &reqwest::Client,
    secrets: &Secrets,
) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.users > 0 && args.stock >= 0 && args.concurrency > 0,
        "users, stock and concurrency must be positive"
    );
    let admin_auth = format!("Bearer {}", secrets.admin_token.expose_secret());
    let starts_at = Utc::now() + chrono::Duration::from_std(args.starts_in)?;
    let created: Value = client
        .post(format!("{}/api/v1/admin/products", args.admin))
        .header("authorization", &admin_auth)
        .json(&json!({"name": "loadtest", "stock": args.stock, "price_cents": 100,
                      "starts_at": starts_at.to_rfc3339(), "ends_at": (starts_at + chrono::Duration::hours(1)).to_rfc3339()}))
        .send()
        .await
        .context("creating the product (is the server up, with the same SECKILL_ADMIN_TOKEN?)")?
        .error_for_status()?
        .json()
        .await?;
    let product = created["product_id"].as_i64().context("no product_id")?;
    let preheat = client
        .post(format!(
            "{}/api/v1/admin/products/{product}/preheat",
            args.admin
        ))
        .header("authorization", &admin_auth)
        .send()
        .await?;
    anyhow::ensure!(
        preheat.status().is_success(),
        "preheat answered {}",
        preheat.status()
    );
    println!(
        "product {product}: stock {}, {} users, sale starts {starts_at}",
        args.stock, args.users
    );

    let jwt_secret = secrets.jwt_secret.expose_secret().to_owned();
    let exp = Utc::now().timestamp() + 3_600;
    let auths: Vec<String> = (1..=args.users)
        .map(|u| bearer(&jwt_secret, json!({"sub": u.to_string(), "exp": exp})))
        .collect::<anyhow::Result<_>>()?;
    let wait = (starts_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(20)).await;

    // Purchase tokens (the hidden path), fetched once the sale is live.
    let t0 = Instant::now();
    let auths = Arc::new(auths);
    let fetched = Arc::new(AtomicU64::new(0));
    let mut fetchers = tokio::task::JoinSet::new();
    let per = (args.users as usize).div_ceil(args.concurrency.min(64));
    for chunk_start in (0..args.users as usize).step_by(per) {
        let (client, auths, fetched) = (client.clone(), auths.clone(), fetched.clone());
        let url = format!("{}/api/v1/products/{product}/token", args.target);
        fetchers.spawn(async move {
            let mut bodies = Vec::new();
            for i in chunk_start..(chunk_start + per).min(auths.len()) {
                let res: Value = client
                    .post(&url)
                    .header("authorization", &auths[i])
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let token = res["token"].as_str().context("no token")?;
                bodies.push((
                    i,
                    actix_web::web::Bytes::from(json!({"token": token}).to_string()),
                ));
                fetched.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(bodies)
        });
    }
    let mut bodies = vec![actix_web::web::Bytes::new(); args.users as usize];
    while let Some(done) = fetchers.join_next().await {
        for (i, b) in done?? {
            bodies[i] = b;
        }
    }
    println!(
        "{} purchase tokens in {:.2} s",
        fetched.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );

    let bodies = Arc::new(bodies);
    let url = Arc::new(format!(
        "{}/api/v1/products/{product}/reservations",
        args.target
    ));
    let users = args.users as u64;
    let (results, elapsed, live) = fire(
        args,
        move |i, client| {
            let idx = (i % users) as usize;
            let req = client
                .post(url.as_str())
                .header("authorization", auths[idx].as_str())
                .header("content-type", "application/json")
                .body(bodies[idx].clone());
            async move { req.send().await }
        },
        client,
        users,
    )
    .await;
    report(&results, elapsed, &live, "POST …/reservations");

    // Verify the guarantees.
    let winners: Vec<i64> = results
        .iter()
        .flat_map(|r| r.winners.iter().copied())
        .collect();
    let distinct: HashSet<i64> = winners.iter().copied().collect();
    let won = winners.len() as i64;
    let settle_start = Instant::now();
    let mut persisted = (0, -1);
    while settle_start.elapsed() < args.settle {
        let view: Value = client
            .get(format!("{}/api/v1/admin/products/{product}", args.admin))
            .header("authorization", &admin_auth)
            .send()
            .await?
            .json()
            .await?;
        persisted = (
            view["sold"].as_i64().unwrap_or(-1),
            view["pending"].as_i64().unwrap_or(-1),
        );
        if persisted == (won, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled = persisted == (won, 0) || args.settle.is_zero();
    if args.settle.is_zero() {
        println!("order check skipped (--settle 0s); product {product}, {won} winners");
    } else if settled {
        println!(
            "every winner is an order {:.2} s after firing stopped ({:.2} s after it started)",
            settle_start.elapsed().as_secs_f64(),
            (elapsed + settle_start.elapsed()).as_secs_f64()
        );
    }
    let checks = [
        (
            won <= args.stock,
            format!("winners {won} <= stock {}", args.stock),
        ),
        (
            distinct.len() == winners.len(),
            format!(
                "no user won twice ({} winners, {} distinct)",
                winners.len(),
                distinct.len()
            ),
        ),
        (
            settled,
            format!(
                "orders == winners and nothing pending (sold {}, pending {}, winners {won})",
                persisted.0, persisted.1
            ),
        ),
        (
            live.server_errors.load(Ordering::Relaxed) == 0,
            format!("no 5xx ({})", live.server_errors.load(Ordering::Relaxed)),
        ),
        (
            live.transport_errors.load(Ordering::Relaxed) == 0,
            format!(
                "no transport error or timeout ({})",
                live.transport_errors.load(Ordering::Relaxed)
            ),
        ),
    ];
    let mut ok = true;
    for (pass, what) in checks {
        println!("{} {what}", if pass { "PASS" } else { "FAIL" });
        ok &= pass;
    }
    Ok(ok)
}

/// Fires requests from `args.concurrency` tasks until the duration or count is reached,
/// printing live figures every second.
async fn fire<F, Fut>(
    args: &LoadtestArgs,
    request: F,
    client: &reqwest::Client,
    keyspace: u64,
) -> (Vec<WorkerResult>, Duration, Arc<Live>)
where
    F: Fn(u64, &reqwest::Client) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send,
{
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let limit = args.requests.unwrap_or(u64::MAX);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (live, stop, next, request, client) = (
            live.clone(),
            stop.clone(),
            next.clone(),
            request.clone(),
            client.clone(),
        );
        tasks.spawn(async move {
            let mut out = WorkerResult::default();
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let t = Instant::now();
                let result = request(i, &client).await;
                live.sent.fetch_add(1, Ordering::Relaxed);
                match result {
                    Err(_) => {
                        live.transport_errors.fetch_add(1, Ordering::Relaxed);
                        *out.codes.entry("transport error".into()).or_default() += 1;
                    }
                    Ok(res) => {
                        let status = res.status().as_u16();
                        let body = res.bytes().await.unwrap_or_default();
                        out.latencies_us
                            .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let code = parsed["code"].as_str().unwrap_or("").to_owned();
                        match status {
                            202 => {
                                live.won.fetch_add(1, Ordering::Relaxed);
                                // Request i is made by user (i mod keyspace) + 1.
                                out.winners
                                    .push(i64::try_from(i % keyspace.max(1) + 1).unwrap_or(0));
                            }
                            429 => {
                                live.rate_limited.fetch_add(1, Ordering::Relaxed);
                            }
                            410 if code == "sold_out" => {
                                live.sold_out.fetch_add(1, Ordering::Relaxed);
                                let at = u64::try_from(started.elapsed().as_micros())
                                    .unwrap_or(u64::MAX)
                                    .max(1);
                                let _ = live.sold_out_at_us.compare_exchange(
                                    0,
                                    at,
                                    Ordering::Relaxed,
                                    Ordering::Relaxed,
                                );
                            }
                            s if s >= 500 => {
                                live.server_errors.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                live.other.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        *out.codes
                            .entry(format!("{status} {code}").trim().to_owned())
                            .or_default() += 1;
                    }
                }
            }
            out
        });
    }
    let reporter = {
        let (live, stop) = (live.clone(), stop.clone());
        let duration = args.duration;
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let sent = live.sent.load(Ordering::Relaxed);
                println!(
                    "[{:>5.1}s] {:>8} req/s  sent {sent:>9}  202 {:>6}  429 {:>8}  410 sold_out {:>8}  other {:>6}  5xx {:>4}  errors {:>4}",
                    started.elapsed().as_secs_f64(),
                    sent - last,
                    live.won.load(Ordering::Relaxed),
                    live.rate_limited.load(Ordering::Relaxed),
                    live.sold_out.load(Ordering::Relaxed),
                    live.other.load(Ordering::Relaxed),
                    live.server_errors.load(Ordering::Relaxed),
                    live.transport_errors.load(Ordering::Relaxed),
                );
                last = sent;
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(r) = r {
            results.push(r);
        }
        stop.store(true, Ordering::Relaxed);
    }
    let elapsed = started.elapsed();
    reporter.abort();
    (results, elapsed, live)
}

fn report(results: &[WorkerResult], elapsed: Duration, live: &Live, what: &str) {
    let mut latencies: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let mut codes: HashMap<&str, u64> = HashMap::new();
    for r in results {
        for (code, n) in &r.codes {
            *codes.entry(code.as_str()).or_default() += n;
        }
    }
    let sent = live.sent.load(Ordering::Relaxed);
    println!(
        "\n== {what}: {sent} requests in {:.2} s = {:.0} req/s",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        latencies.last().map_or(0.0, |v| f64::from(*v) / 1_000.0)
    );
    let mut codes: Vec<_> = codes.into_iter().collect();
    codes.sort();
    for (code, n) in codes {
        println!("  {code:<24} {n}");
    }
    let sold_out_at = live.sold_out_at_us.load(Ordering::Relaxed);
    if sold_out_at > 0 {
        println!(
            "sold out {:.3} s after firing started",
            sold_out_at as f64 / 1e6
        );
    }
}
