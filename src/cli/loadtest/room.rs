//! `seckill loadtest --mode room`: a waiting room at scale. `--users` shoppers join a fresh
//! product's room before its start; the first `--streams` of them follow their place over the
//! room's event stream, the others poll `…/room/me` every 2–3 s (the fallback a page uses when
//! it cannot hold a stream); whoever is admitted buys at once. Two phases are measured apart:
//! waiting (everyone in, before the start) and the sale (from the start, `--duration` long):
//! polls and stream frames a second, the server's CPU per waiting shopper (`--server-pid`), and
//! Redis' commands a second (`--redis-url`: the whole server's `total_commands_processed`, less
//! its idle rate measured first). Checks: winners ≤ stock, none twice, every stream heard "sold
//! out" within a second of the last win, no 5xx, no transport error.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::Utc;
use fred::prelude::*;
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};

use super::{LoadtestArgs, Tally, create_product, process_cpu, shopper_auths};
use crate::config::Secrets;

/// Counters the phases and the live figures read.
#[derive(Default)]
struct Live {
    polls: AtomicU64,
    frames: AtomicU64,
    frame_bytes: AtomicU64,
    streams_open: AtomicU64,
    admitted: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
}

/// What the shoppers saw, for the report and the checks.
struct Seen {
    polls: Tally,
    /// The purchases of the admitted (the winners among them: `buys.winners`).
    buys: Tally,
    last_win: Option<Instant>,
    /// When each stream (by shopper) first heard `sold_out`.
    stream_sold_out: Vec<Instant>,
    /// When each poller first read `sold_out`.
    poll_sold_out: Vec<Instant>,
    /// Answers that were not the one hoped for, by `"<request> <status> <code>"`.
    refusals: std::collections::BTreeMap<String, u64>,
}

struct Shared {
    live: Live,
    seen: Mutex<Seen>,
    target: String,
    product: i64,
    auths: Vec<String>,
    /// Shoppers who bought already (one purchase each).
    bought: Mutex<HashSet<usize>>,
}

impl Shared {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn status(&self, status: u16) {
        if status >= 500 {
            self.live.server_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an answer that refused `what` (its status and problem code).
    async fn refused(&self, what: &str, res: reqwest::Response) {
        let status = res.status().as_u16();
        self.status(status);
        let code = res
            .json::<Value>()
            .await
            .ok()
            .and_then(|b| b["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        *self
            .seen()
            .refusals
            .entry(format!("{what} {status} {code}"))
            .or_default() += 1;
    }

    /// Sends `req`, which answers `{"token": …}` on `200`; the token, or `None` with the
    /// refusal or transport error counted under `what`.
    async fn fetch_token(&self, what: &str, req: reqwest::RequestBuilder) -> Option<String> {
        match req.send().await {
            Ok(res) if res.status() == 200 => {
                let body = res.json::<Value>().await.ok()?;
                body["token"].as_str().map(str::to_owned)
            }
            Ok(res) => {
                self.refused(what, res).await;
                None
            }
            Err(_) => {
                self.transport_error();
                None
            }
        }
    }

    fn transport_error(&self) {
        self.live.transport_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A shopper's view: buys when admitted (once), notes the first `sold_out`.
    async fn saw(&self, client: &reqwest::Client, i: usize, view: &Value, stream: bool) -> bool {
        match view["state"].as_str() {
            Some("admitted") => {
                if let Some(admission) = view["admission_token"].as_str()
                    && self
                        .bought
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(i)
                {
                    self.live.admitted.fetch_add(1, Ordering::Relaxed);
                    self.buy(client, i, admission).await;
                }
                false
            }
            Some("sold_out") => {
                let mut seen = self.seen();
                let at = Instant::now();
                if stream {
                    seen.stream_sold_out.push(at);
                } else {
                    seen.poll_sold_out.push(at);
                }
                true
            }
            Some("turn_passed") => true,
            _ => false,
        }
    }

    /// A purchase token with the admission token, then the purchase.
    async fn buy(&self, client: &reqwest::Client, i: usize, admission: &str) {
        let base = format!("{}/api/v1/products/{}", self.target, self.product);
        let started = Instant::now();
        let purchase = client
            .post(format!("{base}/token"))
            .header("authorization", &self.auths[i])
            .json(&json!({ "admission_token": admission }));
        let Some(token) = self.fetch_token("purchase token", purchase).await else {
            return;
        };
        match client
            .post(format!("{base}/reservations"))
            .header("authorization", &self.auths[i])
            .json(&json!({ "token": token }))
            .send()
            .await
        {
            Ok(res) => {
                let status = res.status().as_u16();
                self.status(status);
                let won = status == 202;
                let mut seen = self.seen();
                seen.buys.record(
                    started.elapsed(),
                    &format!("reserve {status}"),
                    won.then_some(i as i64 + 1),
                );
                if won {
                    seen.last_win = Some(Instant::now());
                }
            }
            Err(_) => self.transport_error(),
        }
    }
}

/// Follows shopper `i`'s room stream until it ends or the run does (opening it while holding
/// one of `opening`'s permits: --concurrency streams open at once).
async fn follow(
    shared: Arc<Shared>,
    client: reqwest::Client,
    streams: reqwest::Client,
    i: usize,
    opening: Arc<tokio::sync::Semaphore>,
) {
    let Ok(permit) = opening.acquire_owned().await else {
        return;
    };
    let base = format!("{}/api/v1/products/{}", shared.target, shared.product);
    let asked = client
        .post(format!("{base}/reservations/me/stream-token"))
        .header("authorization", &shared.auths[i]);
    let Some(token) = shared.fetch_token("stream token", asked).await else {
        return;
    };
    let mut res = match streams
        .get(format!("{base}/room/events?token={token}"))
        .send()
        .await
    {
        Ok(res) if res.status() == 200 => res,
        Ok(res) => {
            shared.refused("room stream", res).await;
            return;
        }
        Err(_) => {
            shared.transport_error();
            return;
        }
    };
    drop(permit);
    shared.live.streams_open.fetch_add(1, Ordering::Relaxed);
    let mut buf = String::new();
    let mut heard_sold_out = false;
    loop {
        match res.chunk().await {
            Ok(Some(chunk)) => {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else {
                        continue;
                    };
                    shared.live.frames.fetch_add(1, Ordering::Relaxed);
                    shared
                        .live
                        .frame_bytes
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                    if let Ok(view) = serde_json::from_str::<Value>(data) {
                        let sold_out = view["state"] == "sold_out";
                        if !(sold_out && heard_sold_out) {
                            shared.saw(&client, i, &view, true).await;
                        }
                        heard_sold_out |= sold_out;
                    }
                }
            }
            Ok(None) => break,
            Err(_) => {
                shared.transport_error();
                break;
            }
        }
    }
    shared.live.streams_open.fetch_sub(1, Ordering::Relaxed);
}

/// Polls shopper `i`'s place every 2–3 s until their turn passes or the run ends.
async fn poll(shared: Arc<Shared>, client: reqwest::Client, i: usize) {
    let url = format!(
        "{}/api/v1/products/{}/room/me",
        shared.target, shared.product
    );
    // Spread over the first period, as pages opened at different moments are.
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3_000))).await;
    let mut heard_sold_out = false;
    loop {
        let started = Instant::now();
        match client
            .get(&url)
            .header("authorization", &shared.auths[i])
            .send()
            .await
        {
            Ok(res) if res.status() != 200 => shared.refused("poll", res).await,
            Ok(res) => {
                let status = res.status().as_u16();
                let view: Value = res.json().await.unwrap_or(Value::Null);
                shared.live.polls.fetch_add(1, Ordering::Relaxed);
                shared
                    .seen()
                    .polls
                    .record(started.elapsed(), &status.to_string(), None);
                if view["state"] == "sold_out" {
                    if !heard_sold_out {
                        shared.saw(&client, i, &view, false).await;
                    }
                    heard_sold_out = true;
                } else if shared.saw(&client, i, &view, false).await {
                    // The turn passed: nothing more to wait for.
                    return;
                }
            }
            Err(_) => shared.transport_error(),
        }
        tokio::time::sleep(Duration::from_millis(2_000 + fastrand::u64(0..1_000))).await;
    }
}

/// A moment of the run: the counters, the server's CPU and Redis' commands.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    polls: u64,
    frames: u64,
    cpu: Option<Duration>,
    redis: Option<u64>,
}

async fn redis_commands(redis: Option<&Client>) -> Option<u64> {
    let info: String = redis?.info(Some(fred::types::InfoKind::Stats)).await.ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
}

async fn mark(shared: &Shared, args: &LoadtestArgs, redis: Option<&Client>) -> Mark {
    Mark {
        at: Instant::now(),
        polls: shared.live.polls.load(Ordering::Relaxed),
        frames: shared.live.frames.load(Ordering::Relaxed),
        cpu: args.server_pid.and_then(|pid| process_cpu(pid).ok()),
        redis: redis_commands(redis).await,
    }
}

/// Prints one phase's figures.
fn phase(name: &str, from: Mark, to: Mark, waiting: usize, idle_redis: f64) {
    let secs = to.at.duration_since(from.at).as_secs_f64().max(1e-3);
    let mut line = format!(
        "{name}: {secs:.1} s, {waiting} shoppers waiting: {:.0} polls/s, {:.0} stream frames/s",
        (to.polls - from.polls) as f64 / secs,
        (to.frames - from.frames) as f64 / secs
    );
    if let (Some(a), Some(b)) = (from.cpu, to.cpu) {
        let cpu = b.saturating_sub(a).as_secs_f64();
        line += &format!(
            "; server CPU {:.2} s = {:.1}% of a core, {:.2} µs per waiting shopper per second",
            cpu,
            cpu / secs * 100.0,
            cpu * 1e6 / secs / waiting.max(1) as f64
        );
    }
    if let (Some(a), Some(b)) = (from.redis, to.redis) {
        let rate = (b - a) as f64 / secs;
        line += &format!(
            "; Redis {rate:.0} commands/s ({:.0} above its idle rate)",
            rate - idle_redis
        );
    }
    println!("{line}");
}

pub(super) async fn room(
    args: &LoadtestArgs,
    client: &reqwest::Client,
    secrets: &Secrets,
) -> anyhow::Result<bool> {
    let users = usize::try_from(args.users).context("--users")?;
    let streams = args.streams.min(users);
    anyhow::ensure!(
        users > 0 && args.stock >= 0,
        "users and stock must be positive"
    );
    let redis = match &args.redis_url {
        Some(url) => {
            let c = Builder::from_config(Config::from_url(url)?).build()?;
            c.init().await.context("connecting to --redis-url")?;
            Some(c)
        }
        None => None,
    };
    // Redis' own rate while nothing of this run happens (the server's passes, other clients).
    let idle_from = redis_commands(redis.as_ref()).await;
    let idle_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_redis = match (idle_from, redis_commands(redis.as_ref()).await) {
        (Some(a), Some(b)) => (b - a) as f64 / idle_at.elapsed().as_secs_f64(),
        _ => 0.0,
    };

    let starts_at = Utc::now() + chrono::Duration::from_std(args.starts_in)?;
    let product = create_product(
        args,
        client,
        secrets,
        args.stock,
        starts_at,
        // The room closes soon after the run (its admission passes stop with it).
        json!({"waiting_room": true, "ends_at": (starts_at
            + chrono::Duration::from_std(args.duration)?
            + chrono::Duration::seconds(1))
        .to_rfc3339()}),
    )
    .await?;
    println!(
        "product {product}: stock {}, waiting room; {users} shoppers ({streams} on event streams, {} polling every 2–3 s); sale starts {starts_at}",
        args.stock,
        users - streams
    );
    let auths = shopper_auths(secrets, args.users)?;
    let shared = Arc::new(Shared {
        live: Live::default(),
        seen: Mutex::new(Seen {
            polls: Tally::new()?,
            buys: Tally::new()?,
            last_win: None,
            stream_sold_out: Vec::new(),
            poll_sold_out: Vec::new(),
            refusals: std::collections::BTreeMap::new(),
        }),
        target: args.target.clone(),
        product,
        auths,
        bought: Mutex::default(),
    });

    // Everyone joins.
    let t0 = Instant::now();
    let url = format!("{}/api/v1/products/{product}/room", args.target);
    let mut joins = Tally::new()?;
    let answers: Vec<(Duration, Result<u16, ()>)> = stream::iter(0..users)
        .map(|i| {
            let (client, url, shared) = (client.clone(), url.clone(), shared.clone());
            async move {
                let started = Instant::now();
                let res = client
                    .post(&url)
                    .header("authorization", &shared.auths[i])
                    .send()
                    .await;
                (
                    started.elapsed(),
                    res.map(|r| r.status().as_u16()).map_err(|_| ()),
                )
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    for (latency, status) in answers {
        match status {
            Ok(s) => {
                shared.status(s);
                joins.record(latency, &s.to_string(), None);
            }
            Err(()) => {
                shared.transport_error();
                joins.count("transport error");
            }
        }
    }
    println!(
        "{users} joins in {:.2} s: p50 {:.2} ms, p99 {:.2} ms; answers {:?}",
        t0.elapsed().as_secs_f64(),
        joins.percentile_ms(0.5),
        joins.percentile_ms(0.99),
        joins.codes
    );

    // Streams and pollers.
    let stream_client = crate::tls::http_client()
        .pool_max_idle_per_host(0)
        .tcp_nodelay(true)
        .build()?;
    let mut tasks = tokio::task::JoinSet::new();
    let opening = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    for i in 0..users {
        let shared = shared.clone();
        if i < streams {
            let (client, streams) = (client.clone(), stream_client.clone());
            tasks.spawn(follow(shared, client, streams, i, opening.clone()));
        } else {
            tasks.spawn(poll(shared, client.clone(), i));
        }
    }
    let open_by = Instant::now() + Duration::from_secs(30);
    while (shared.live.streams_open.load(Ordering::Relaxed) as usize) < streams
        && Instant::now() < open_by
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} streams open {:.2} s after the first join",
        shared.live.streams_open.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    let waiting_from = mark(&shared, args, redis.as_ref()).await;
    let until_start = (starts_at - Utc::now()).to_std().unwrap_or_default();
    if until_start.is_zero() {
        println!(
            "WARN: the sale started before everyone was waiting: no waiting phase (raise --starts-in)"
        );
    }
    let live_figures = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let (mut polls, mut frames) = (0, 0);
            loop {
                tick.tick().await;
                let l = &shared.live;
                let (p, f) = (
                    l.polls.load(Ordering::Relaxed),
                    l.frames.load(Ordering::Relaxed),
                );
                let seen = shared.seen();
                println!(
                    "[{:>5.1}s] {:>6} polls/s {:>6} frames/s  streams {:>6}  admitted {:>6}  won {:>6}  sold out heard: streams {:>6} pollers {:>6}  5xx {:>4}  errors {:>4}",
                    started.elapsed().as_secs_f64(),
                    p - polls,
                    f - frames,
                    l.streams_open.load(Ordering::Relaxed),
                    l.admitted.load(Ordering::Relaxed),
                    seen.buys.winners.len(),
                    seen.stream_sold_out.len(),
                    seen.poll_sold_out.len(),
                    l.server_errors.load(Ordering::Relaxed),
                    l.transport_errors.load(Ordering::Relaxed),
                );
                (polls, frames) = (p, f);
            }
        })
    };
    tokio::time::sleep(until_start).await;
    let sale_from = mark(&shared, args, redis.as_ref()).await;
    tokio::time::sleep(args.duration).await;
    let sale_to = mark(&shared, args, redis.as_ref()).await;
    live_figures.abort();
    tasks.abort_all();

    println!("\n== waiting room (seckill loadtest --mode room, {users} shoppers)");
    if !until_start.is_zero() {
        phase(
            "waiting (before the start)",
            waiting_from,
            sale_from,
            users,
            idle_redis,
        );
    }
    phase(
        "sale (from the start)",
        sale_from,
        sale_to,
        users,
        idle_redis,
    );
    let ok = summarise(&shared, args, streams, sale_from.at);
    if let Some(r) = redis {
        let _ = r.quit().await;
    }
    Ok(ok)
}

/// Prints what the shoppers saw and the checks; whether every check passed.
fn summarise(shared: &Shared, args: &LoadtestArgs, streams: usize, start: Instant) -> bool {
    let users = shared.auths.len();
    let seen = shared.seen();
    println!(
        "polls: {} answers, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; by status {:?}",
        seen.polls.answers(),
        seen.polls.percentile_ms(0.5),
        seen.polls.percentile_ms(0.99),
        seen.polls.max_ms(),
        seen.polls.codes
    );
    if !seen.refusals.is_empty() {
        println!("refused: {:?}", seen.refusals);
    }
    println!(
        "streams: {} frames, {:.0} bytes each on average",
        shared.live.frames.load(Ordering::Relaxed),
        shared.live.frame_bytes.load(Ordering::Relaxed) as f64
            / shared.live.frames.load(Ordering::Relaxed).max(1) as f64
    );
    println!(
        "purchases of the admitted: {} ({} won); by answer {:?}",
        seen.buys.answers(),
        seen.buys.winners.len(),
        seen.buys.codes
    );
    let since_last_win = |at: &[Instant]| -> Option<Duration> {
        let last = seen.last_win?;
        at.iter().map(|t| t.saturating_duration_since(last)).max()
    };
    let won = seen.buys.winners.len();
    let sold_out = won as i64 == args.stock;
    let stream_late = since_last_win(&seen.stream_sold_out);
    // The streams of shoppers never admitted (an admitted one stays `admitted` until its
    // admission ends, bought or not).
    let waiting_streams = streams.saturating_sub(
        shared
            .bought
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|i| **i < streams)
            .count(),
    );
    if let Some(last) = seen.last_win {
        println!(
            "sold out (the last win) {:.3} s after the start; streams told within {:.0} ms of it ({} of {waiting_streams}), pollers within {:.0} ms ({} of {})",
            last.saturating_duration_since(start).as_secs_f64(),
            stream_late.unwrap_or_default().as_secs_f64() * 1e3,
            seen.stream_sold_out.len(),
            since_last_win(&seen.poll_sold_out)
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            seen.poll_sold_out.len(),
            users - streams
        );
    }
    let distinct: HashSet<i64> = seen.buys.winners.iter().copied().collect();
    let errors = (
        shared.live.server_errors.load(Ordering::Relaxed),
        shared.live.transport_errors.load(Ordering::Relaxed),
    );
    let mut checks = vec![
        (
            won as i64 <= args.stock,
            format!("winners {won} <= stock {}", args.stock),
        ),
        (
            distinct.len() == won,
            format!(
                "no shopper won twice ({won} wins, {} distinct)",
                distinct.len()
            ),
        ),
        (errors.0 == 0, format!("no 5xx ({})", errors.0)),
        (
            errors.1 == 0,
            format!("no transport error or timeout ({})", errors.1),
        ),
    ];
    if sold_out && streams > 0 {
        checks.push((
            seen.stream_sold_out.len() == waiting_streams
                && stream_late.is_some_and(|l| l <= Duration::from_secs(1)),
            format!(
                "every waiting stream heard sold out within a second of the last win ({} of {waiting_streams}, the last after {:.0} ms)",
                seen.stream_sold_out.len(),
                stream_late.unwrap_or_default().as_secs_f64() * 1e3
            ),
        ));
    }
    let mut ok = true;
    for (pass, what) in checks {
        println!("{} {what}", if pass { "PASS" } else { "FAIL" });
        ok &= pass;
    }
    ok
}
