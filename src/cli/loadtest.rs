//! `seckill loadtest`: a whole flash sale against a running server, with live figures.
//!
//! Creates and preheats a product (stock S), mints JWTs for N users, fetches their purchase
//! tokens once the sale is live, then fires purchase attempts at concurrency C for a fixed
//! time or count. Reports requests/s, latency percentiles, outcomes by code, time to
//! sell-out and time until every winner is an order, and verifies the guarantees (orders ==
//! winners <= S, no user twice, no 5xx, no transport error) — a failed check is a non-zero exit.
//! `--mode trivial` hammers `GET /healthz` instead: the HTTP-side limit of the same server;
//! `--mode view` a fresh product's view (`GET /api/v1/products/{id}`): the read path;
//! `--mode room` a waiting room's shoppers waiting, then buying (`loadtest/room.rs`).
//!
//! Two ways to fire. The closed loop (default): C tasks, each sending its next request when its
//! last one is answered, so the offered load follows the server's pace. The open loop
//! (`--rate R`): request i is due i/R seconds after the start whatever became of the others,
//! its latency counts from when it was due (a send the generator itself was late with counts
//! that wait: no coordinated omission), and at most C are in flight — a send due while C are
//! unanswered is not sent but counted and reported. Latencies go into an HdrHistogram.
//!
//! `--winners`: every attempt is a distinct shopper's first (users = stock = `--requests`), so
//! each one is a winning `reserve.lua` call: the same work `redis-benchmark` measures in
//! `scripts/bench-redis`.
//!
//! The client is reqwest (already our HTTP client in tests): a shared keep-alive pool and one
//! task per connection (or per request, in the open loop) is all a load generator needs, so no
//! load-testing framework. The figures it prints name it as the client that measured them.

mod room;
mod tally;

use std::{
    collections::HashSet,
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

pub use tally::{Schedule, Step, Tally, cpu_ticks};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A flash sale: purchases against a fresh product.
    Sale,
    /// `GET /healthz` on the same server (the HTTP-side limit).
    Trivial,
    /// `GET /api/v1/products/{id}` of a fresh product (the read path; the view from memory).
    View,
    /// A waiting room: --users shoppers join before the start, --streams of them follow their
    /// place over event streams, the rest poll; the admitted buy.
    Room,
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
    /// Connections: requests in flight (with --rate, the most in flight at once).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Open loop: offer this many requests per second whatever the answers, latency counted
    /// from each send's scheduled time; a send due while --concurrency requests are in flight
    /// is not sent, only counted. Without it: a closed loop of --concurrency connections.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Every attempt a distinct shopper's first: users = stock = --requests (required), so
    /// every attempt should win (what `redis-benchmark` of winning reserve.lua calls
    /// measures). The server's SECKILL_PRODUCT_RATE must admit the rate fired.
    #[arg(long, requires = "requests", conflicts_with_all = ["users", "stock"])]
    pub winners: bool,
    /// How long to fire (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many purchase attempts instead (whichever comes first).
    #[arg(long)]
    pub requests: Option<u64>,
    /// The sale starts this long after the product is created.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub starts_in: Duration,
    /// Report this process's CPU time per request: user + system from `/proc/<pid>/stat`
    /// (Linux) between the first send and the last answer, e.g. the server's pid.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// --mode room: how many of the shoppers follow their place over an event stream (the
    /// others poll every 2–3 s).
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    /// --mode room: the Redis whose commands a second are reported (`INFO stats`), e.g.
    /// redis://127.0.0.1:6379.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// How long to wait for every winner to become an order (0s: do not wait or check,
    /// e.g. while no worker runs).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub settle: Duration,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive number of requests per second"
        )),
    }
}

/// Counters the live figures read while the load runs.
#[derive(Default)]
struct Live {
    /// Requests sent.
    sent: AtomicU64,
    /// Answers (or transport errors) received.
    answered: AtomicU64,
    /// Open loop: sends the in-flight cap turned away.
    dropped: AtomicU64,
    /// Open loop: requests sent and not answered yet.
    in_flight: AtomicU64,
    won: AtomicU64,
    rate_limited: AtomicU64,
    sold_out: AtomicU64,
    other: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    /// µs from the start of firing to the first sold_out answer (0 = not yet).
    sold_out_at_us: AtomicU64,
}

fn bearer(secret: &str, claims: Value) -> anyhow::Result<String> {
    Ok(format!(
        "Bearer {}",
        crate::auth::sign_user_jwt(secret, &claims)?
    ))
}

/// `Authorization` values of shoppers 1..=`users`, signed with SECKILL_JWT_SECRET for an hour.
fn shopper_auths(secrets: &Secrets, users: i64) -> anyhow::Result<Vec<String>> {
    let jwt_secret = secrets
        .jwt_secret
        .as_ref()
        .context("the load test signs its shoppers' JWTs with SECKILL_JWT_SECRET, which is not set (a login's public keys cannot sign)")?
        .expose_secret();
    let exp = Utc::now().timestamp() + 3_600;
    (1..=users)
        .map(|u| bearer(jwt_secret, json!({"sub": u.to_string(), "exp": exp})))
        .collect()
}

/// What a run fired and got.
struct Fired {
    tally: Tally,
    /// From the first send to the last answer.
    elapsed: Duration,
    live: Arc<Live>,
    /// Open loop: sends that fell due (sent + dropped).
    scheduled: Option<u64>,
    /// `--server-pid`'s CPU time during the firing.
    server_cpu: Option<anyhow::Result<Duration>>,
}

/// User + system CPU time of process `pid` so far (Linux `/proc`; clock ticks converted with
/// `getconf CLK_TCK`).
fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    static TICKS_PER_SEC: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let per_sec = TICKS_PER_SEC
        .get_or_init(|| {
            let out = std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()?;
            String::from_utf8(out.stdout).ok()?.trim().parse().ok()
        })
        .filter(|t| *t > 0)
        .context("`getconf CLK_TCK` did not say the clock tick rate")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = cpu_ticks(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / f64::from(per_sec)))
}
/// Runs the load test; `Ok(true)` when every check passed.
pub async fn run(args: LoadtestArgs, secrets: &Secrets) -> anyhow::Result<bool> {
    anyhow::ensure!(
        !args.winners || args.mode == Mode::Sale,
        "--winners needs --mode sale"
    );
    let client = crate::tls::http_client()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()?;
    match args.mode {
        Mode::Trivial => trivial(&args, &client).await,
        Mode::View => view(&args, &client, secrets).await,
        Mode::Sale => sale(&args, &client, secrets).await,
        Mode::Room => room::room(&args, &client, secrets).await,
    }
}

async fn trivial(args: &LoadtestArgs, client: &reqwest::Client) -> anyhow::Result<bool> {
    get_load(
        args,
        client,
        format!("{}/healthz", args.target),
        "GET /healthz",
    )
    .await
}

async fn view(
    args: &LoadtestArgs,
    client: &reqwest::Client,
    secrets: &Secrets,
) -> anyhow::Result<bool> {
    let starts_at = Utc::now() + chrono::Duration::from_std(args.starts_in)?;
    let product = create_product(args, client, secrets, args.stock, starts_at, json!({})).await?;
    println!("product {product}: its view, sale starts {starts_at}");
    let url = format!("{}/api/v1/products/{product}", args.target);
    get_load(args, client, url, "GET /api/v1/products/{id}").await
}

/// Fires `GET url`; whether no answer was a 5xx or a transport error.
async fn get_load(
    args: &LoadtestArgs,
    client: &reqwest::Client,
    url: String,
    what: &str,
) -> anyhow::Result<bool> {
    let url = Arc::new(url);
    let fired = fire(
        args,
        move |_, client| {
            let req = client.get(url.as_str());
            async move { req.send().await }
        },
        client,
        1,
    )
    .await?;
    report(args, &fired, what);
    Ok(fired.live.server_errors.load(Ordering::Relaxed) == 0
        && fired.live.transport_errors.load(Ordering::Relaxed) == 0)
}

/// Creates and preheats a product of `stock` units whose sale starts at `starts_at` and lasts
/// an hour, with `extra` fields (e.g. `waiting_room`); its id.
async fn create_product(
    args: &LoadtestArgs,
    client: &reqwest::Client,
    secrets: &Secrets,
    stock: i64,
    starts_at: chrono::DateTime<Utc>,
    extra: Value,
) -> anyhow::Result<i64> {
    let admin_auth = format!("Bearer {}", secrets.admin_token.expose_secret());
    let mut body = json!({"name": "loadtest", "stock": stock, "price_cents": 100,
                          "starts_at": starts_at.to_rfc3339(), "ends_at": (starts_at + chrono::Duration::hours(1)).to_rfc3339()});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    let created: Value = client
        .post(format!("{}/api/v1/admin/products", args.admin))
        .header("authorization", &admin_auth)
        .json(&body)
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
    Ok(product)
}

async fn sale(
    args: &LoadtestArgs,
    client: &reqwest::Client,
    secrets: &Secrets,
) -> anyhow::Result<bool> {
    // --winners: one shopper per attempt and a unit for each, so every attempt can win.
    let (users, stock) = match (args.winners, args.requests) {
        (true, Some(n)) => {
            let n = i64::try_from(n).context("--requests is too large")?;
            (n, n)
        }
        (true, None) => anyhow::bail!("--winners needs --requests"),
        (false, _) => (args.users, args.stock),
    };
    anyhow::ensure!(
        users > 0 && stock >= 0 && args.concurrency > 0,
        "users, stock and concurrency must be positive"
    );
    let starts_at = Utc::now() + chrono::Duration::from_std(args.starts_in)?;
    let product = create_product(args, client, secrets, stock, starts_at, json!({})).await?;
    println!(
        "product {product}: stock {stock}, {users} users{}, sale starts {starts_at}",
        if args.winners {
            " (--winners: one attempt each)"
        } else {
            ""
        }
    );

    let auths = shopper_auths(secrets, users)?;
    let wait = (starts_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(20)).await;

    // Purchase tokens (the hidden path), fetched once the sale is live and before the timed
    // part: the firing below sends only purchases.
    let t0 = Instant::now();
    let auths = Arc::new(auths);
    let fetched = Arc::new(AtomicU64::new(0));
    let mut fetchers = tokio::task::JoinSet::new();
    let per = (users as usize).div_ceil(args.concurrency.min(64));
    for chunk_start in (0..users as usize).step_by(per) {
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
                let expires = res["expires_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc));
                bodies.push((
                    i,
                    actix_web::web::Bytes::from(json!({"token": token}).to_string()),
                    expires,
                ));
                fetched.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(bodies)
        });
    }
    let mut bodies = vec![actix_web::web::Bytes::new(); users as usize];
    let mut first_expiry: Option<chrono::DateTime<Utc>> = None;
    while let Some(done) = fetchers.join_next().await {
        for (i, b, expires) in done?? {
            bodies[i] = b;
            if let Some(e) = expires {
                first_expiry = Some(first_expiry.map_or(e, |f| f.min(e)));
            }
        }
    }
    println!(
        "{} purchase tokens in {:.2} s",
        fetched.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    if let Some(expiry) = first_expiry
        && expiry < Utc::now() + chrono::Duration::from_std(args.duration)?
    {
        println!(
            "WARN: the first purchase tokens expire at {expiry}, before the firing ends (SECKILL_PURCHASE_TOKEN_TTL_SECS): later attempts with them get 403 invalid_token"
        );
    }

    let bodies = Arc::new(bodies);
    let url = Arc::new(format!(
        "{}/api/v1/products/{product}/reservations",
        args.target
    ));
    let keyspace = users as u64;
    let admin_auth = format!("Bearer {}", secrets.admin_token.expose_secret());
    // A sale that can sell out (a shopper wins once: stock <= users) is watched while the load
    // runs: when every unit is an order (sold == stock, nothing pending), the time since the
    // firing started. One that cannot is not asked about.
    let all_orders = (stock <= users).then(|| {
        tokio::spawn(every_unit_an_order(
            client.clone(),
            format!("{}/api/v1/admin/products/{product}", args.admin),
            admin_auth.clone(),
            stock,
            Instant::now(),
        ))
    });
    let fired = fire(
        args,
        move |i, client| {
            let idx = (i % keyspace) as usize;
            let req = client
                .post(url.as_str())
                .header("authorization", auths[idx].as_str())
                .header("content-type", "application/json")
                .body(bodies[idx].clone());
            async move { req.send().await }
        },
        client,
        keyspace,
    )
    .await?;
    report(args, &fired, "POST …/reservations");
    let (live, elapsed) = (&fired.live, fired.elapsed);
    // A sale that sold out: give the watcher the settling time, then read what it saw.
    if let Some(all_orders) = all_orders {
        if fired.tally.winners.len() as i64 != stock {
            all_orders.abort();
        } else if let Ok(Ok(Some(at))) = tokio::time::timeout(args.settle, all_orders).await {
            println!(
                "every unit an order {:.3} s after firing started",
                at.as_secs_f64()
            );
        }
    }

    // Verify the guarantees.
    let winners = &fired.tally.winners;
    let distinct: HashSet<i64> = winners.iter().copied().collect();
    let won = winners.len() as i64;
    let answered = fired.tally.answers();
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
    let mut checks = vec![
        (won <= stock, format!("winners {won} <= stock {stock}")),
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
    if args.winners {
        checks.push((
            answered > 0 && won as u64 == answered,
            format!(
                "every attempt won, each a distinct shopper's first ({won} of {answered} answers were 202; a 429 product gate answer means the server's SECKILL_PRODUCT_RATE admits less than the rate fired)"
            ),
        ));
    }
    let mut ok = true;
    for (pass, what) in checks {
        println!("{} {what}", if pass { "PASS" } else { "FAIL" });
        ok &= pass;
    }
    Ok(ok)
}

/// Polls the operators' view of a product every 20 ms until `sold` reaches `stock` with nothing
/// pending; how long after `started` that was (`None` if the view cannot be read).
async fn every_unit_an_order(
    client: reqwest::Client,
    url: String,
    auth: String,
    stock: i64,
    started: Instant,
) -> Option<Duration> {
    loop {
        let view: Value = client
            .get(&url)
            .header("authorization", &auth)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        if view["sold"].as_i64() >= Some(stock) && view["pending"].as_i64() == Some(0) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fires requests in a closed loop (`args.concurrency` tasks) or an open one (`args.rate`)
/// until the duration or count is reached, printing live figures every second. Request `i` is
/// made by user `i mod keyspace + 1`.
async fn fire<F, Fut>(
    args: &LoadtestArgs,
    request: F,
    client: &reqwest::Client,
    keyspace: u64,
) -> anyhow::Result<Fired>
where
    F: Fn(u64, &reqwest::Client) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
{
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = args.server_pid.map(process_cpu);
    let started = Instant::now();
    let reporter = tokio::spawn(live_figures(
        live.clone(),
        stop.clone(),
        started,
        args.duration,
        args.rate.is_some(),
    ));
    let fired = match args.rate {
        None => closed_loop(args, request, client, keyspace, &live, &stop, started).await,
        Some(rate) => open_loop(args, rate, request, client, keyspace, &live, started).await,
    };
    stop.store(true, Ordering::Relaxed);
    reporter.abort();
    let elapsed = started.elapsed();
    let server_cpu = args.server_pid.map(|pid| {
        let before = cpu_before.context("no CPU reading before the firing")??;
        Ok(process_cpu(pid)?.saturating_sub(before))
    });
    let (tally, scheduled) = fired?;
    Ok(Fired {
        tally,
        elapsed,
        live,
        scheduled,
        server_cpu,
    })
}

/// The user who makes request `i`.
fn user_of(i: u64, keyspace: u64) -> i64 {
    i64::try_from(i % keyspace.max(1) + 1).unwrap_or(0)
}

/// `args.concurrency` tasks, each sending its next request when its last one is answered,
/// until the duration has passed or the count is reached; latency from each send.
async fn closed_loop<F, Fut>(
    args: &LoadtestArgs,
    request: F,
    client: &reqwest::Client,
    keyspace: u64,
    live: &Arc<Live>,
    stop: &Arc<AtomicBool>,
    started: Instant,
) -> anyhow::Result<(Tally, Option<u64>)>
where
    F: Fn(u64, &reqwest::Client) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let request = Arc::new(request);
    let (limit, duration) = (args.requests.unwrap_or(u64::MAX), args.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (live, stop, next, request, client) = (
            live.clone(),
            stop.clone(),
            next.clone(),
            request.clone(),
            client.clone(),
        );
        let mut tally = Tally::new()?;
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) && started.elapsed() < duration {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let t = Instant::now();
                live.sent.fetch_add(1, Ordering::Relaxed);
                let got = answer(request(i, &client).await, &live, started).await;
                count_answer(&mut tally, i, keyspace, t.elapsed(), got);
            }
            tally
        });
    }
    let mut total = Tally::new()?;
    while let Some(done) = tasks.join_next().await {
        // The first task to stop (count reached) stops the others after their request.
        stop.store(true, Ordering::Relaxed);
        total.merge(done.context("a load task failed")?)?;
    }
    Ok((total, None))
}

/// One task per request, sent on schedule ([`Schedule`]): `rate` per second whatever the
/// answers, at most `args.concurrency` in flight; latency from when each send was due.
async fn open_loop<F, Fut>(
    args: &LoadtestArgs,
    rate: f64,
    request: F,
    client: &reqwest::Client,
    keyspace: u64,
    live: &Arc<Live>,
    started: Instant,
) -> anyhow::Result<(Tally, Option<u64>)>
where
    F: Fn(u64, &reqwest::Client) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
{
    type Answered = (u64, Duration, Option<(String, bool)>);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Answered>();
    let mut tally = Tally::new()?;
    let collector = tokio::spawn(async move {
        while let Some((i, latency, got)) = rx.recv().await {
            count_answer(&mut tally, i, keyspace, latency, got);
        }
        tally
    });
    let limit = args.requests.unwrap_or(u64::MAX);
    let mut schedule = Schedule::new(rate, args.concurrency, limit, args.duration);
    loop {
        match schedule.step(started.elapsed(), live.in_flight.load(Ordering::Relaxed)) {
            Step::Send { i, due } => {
                live.in_flight.fetch_add(1, Ordering::Relaxed);
                live.sent.fetch_add(1, Ordering::Relaxed);
                let send = request(i, client);
                let (live, tx) = (live.clone(), tx.clone());
                tokio::spawn(async move {
                    let got = answer(send.await, &live, started).await;
                    let latency = started.elapsed().saturating_sub(due);
                    live.in_flight.fetch_sub(1, Ordering::Relaxed);
                    let _ = tx.send((i, latency, got));
                });
            }
            Step::Dropped { .. } => {
                live.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Step::WaitUntil(at) => tokio::time::sleep_until((started + at).into()).await,
            Step::Done => break,
        }
    }
    // The collector ends once every request task has answered (each within the client's
    // 30 s timeout) and dropped its sender.
    drop(tx);
    let tally = collector
        .await
        .context("the open loop's collector failed")?;
    Ok((tally, Some(schedule.scheduled())))
}

/// Counts request `i`'s answer ([`answer`]) in `tally`: a transport error, or its label and
/// latency (and, for a win, its shopper).
fn count_answer(
    tally: &mut Tally,
    i: u64,
    keyspace: u64,
    latency: Duration,
    got: Option<(String, bool)>,
) {
    match got {
        None => tally.count("transport error"),
        Some((label, won)) => tally.record(latency, &label, won.then(|| user_of(i, keyspace))),
    }
}

/// Waits for the whole answer and counts it in `live`: its label (`"<status> <code>"`) and
/// whether it won; `None` for a transport error or timeout.
async fn answer(
    result: reqwest::Result<reqwest::Response>,
    live: &Live,
    started: Instant,
) -> Option<(String, bool)> {
    live.answered.fetch_add(1, Ordering::Relaxed);
    let Ok(res) = result else {
        live.transport_errors.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let status = res.status().as_u16();
    let body = res.bytes().await.unwrap_or_default();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let code = parsed["code"].as_str().unwrap_or("");
    match status {
        202 => {
            live.won.fetch_add(1, Ordering::Relaxed);
        }
        429 => {
            live.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        410 if code == "sold_out" => {
            live.sold_out.fetch_add(1, Ordering::Relaxed);
            let at = u64::try_from(started.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            let _ =
                live.sold_out_at_us
                    .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
        }
        s if s >= 500 => {
            live.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            live.other.fetch_add(1, Ordering::Relaxed);
        }
    }
    Some((format!("{status} {code}").trim().to_owned(), status == 202))
}

/// Prints the live figures every second until `duration` has passed or `stop` is set (it
/// stops nothing itself).
async fn live_figures(
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    started: Instant,
    duration: Duration,
    open: bool,
) {
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let answered = live.answered.load(Ordering::Relaxed);
        let open_loop = if open {
            format!(
                "  in flight {:>5}  not sent {:>7}",
                live.in_flight.load(Ordering::Relaxed),
                live.dropped.load(Ordering::Relaxed)
            )
        } else {
            String::new()
        };
        println!(
            "[{:>5.1}s] {:>8} req/s  sent {:>9}{open_loop}  202 {:>6}  429 {:>8}  410 sold_out {:>8}  other {:>6}  5xx {:>4}  errors {:>4}",
            started.elapsed().as_secs_f64(),
            answered - last,
            live.sent.load(Ordering::Relaxed),
            live.won.load(Ordering::Relaxed),
            live.rate_limited.load(Ordering::Relaxed),
            live.sold_out.load(Ordering::Relaxed),
            live.other.load(Ordering::Relaxed),
            live.server_errors.load(Ordering::Relaxed),
            live.transport_errors.load(Ordering::Relaxed),
        );
        last = answered;
    }
}

/// Prints the figures of a run, naming the client and the loop that measured them.
fn report(args: &LoadtestArgs, fired: &Fired, what: &str) {
    let (tally, live) = (&fired.tally, &fired.live);
    let answered = tally.answers();
    let secs = fired.elapsed.as_secs_f64();
    let how = match args.rate {
        None => format!(
            "seckill loadtest, closed loop, {} connections",
            args.concurrency
        ),
        Some(rate) => format!(
            "seckill loadtest, open loop at {rate:.0} req/s, at most {} in flight",
            args.concurrency
        ),
    };
    println!(
        "\n== {what} ({how}): {answered} requests in {secs:.2} s = {:.0} req/s",
        answered as f64 / secs
    );
    if let Some(scheduled) = fired.scheduled {
        let dropped = live.dropped.load(Ordering::Relaxed);
        println!(
            "open loop: {scheduled} sends due, {} sent, {dropped} not sent (in-flight cap {} reached){}",
            live.sent.load(Ordering::Relaxed),
            args.concurrency,
            if dropped > 0 {
                " — WARN: the offered rate was not sustained"
            } else {
                ""
            }
        );
    }
    println!(
        "latency ms{}: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        if args.rate.is_some() {
            " (from each send's scheduled time)"
        } else {
            ""
        },
        tally.percentile_ms(0.50),
        tally.percentile_ms(0.90),
        tally.percentile_ms(0.99),
        tally.percentile_ms(0.999),
        tally.max_ms(),
    );
    let mut codes: Vec<_> = tally.codes.iter().collect();
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
    match (&fired.server_cpu, args.server_pid) {
        (Some(Ok(cpu)), Some(pid)) => println!(
            "server CPU (pid {pid}, user + system, /proc): {:.0} ms over {answered} requests = {:.1} µs per request",
            cpu.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e6 / answered.max(1) as f64
        ),
        (Some(Err(e)), Some(pid)) => println!("server CPU (pid {pid}): unavailable: {e:#}"),
        _ => {}
    }
}
