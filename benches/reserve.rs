#![allow(clippy::expect_used)] // a bench that cannot set up should stop loudly
//! `reserve.lua` through fred: one caller at a time, 64 concurrent callers (one call each, and
//! gathered by the batcher), and one call deciding 1, 8 and 64 attempts.
//! Skips with a message when Redis is not reachable on `SECKILL_REDIS_URL` (default loopback).
//!
//! `cargo bench --bench reserve`; compare with `scripts/bench-redis` (redis-benchmark running
//! the same script) in the same session.

use std::time::Duration;

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use seckill::{
    config::{BatchSettings, RedisSettings, Settings},
    domain::ProductId,
    keys::Keys,
    purchase::Batcher,
    reservations::Reservations,
};

fn bench_reserve(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        eprintln!("reserve bench skipped: no tokio runtime");
        return;
    };
    let Ok(settings) =
        Settings::from_vars(std::env::vars().filter(|(k, _)| k == "SECKILL_REDIS_URL"))
    else {
        eprintln!("reserve bench skipped: bad SECKILL_REDIS_URL");
        return;
    };
    let prefix = format!("bench{}", std::process::id());
    let redis = RedisSettings {
        prefix: prefix.clone(),
        ..settings.redis
    };
    let pool = match rt.block_on(seckill::redis::connect(&redis, 4, Duration::from_secs(2))) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("reserve bench skipped: Redis is not reachable ({e:#})");
            return;
        }
    };
    let r = Reservations::new(
        pool.clone(),
        Keys::new(prefix.clone()),
        "1000/1s".parse().expect("rate"),
        "1000000000/1s".parse().expect("rate"),
    );
    let product = ProductId::try_from(1_i64).expect("id");
    if let Err(e) = rt.block_on(common::ample_sale(&r, product)) {
        eprintln!("reserve bench skipped: preheat failed ({e})");
        return;
    }
    let users = common::FreshUsers::default();
    let user = || users.next();

    let mut group = c.benchmark_group("reserve");
    group.throughput(Throughput::Elements(1));
    group.bench_function("winning attempt, 1 caller", |b| {
        b.to_async(&rt)
            .iter(|| async { r.reserve(user(), product).await.expect("reserve") })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("winning attempts, 64 concurrent callers", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = (0..64).map(|_| r.reserve(user(), product));
            for d in futures_util::future::join_all(calls).await {
                d.expect("reserve");
            }
        })
    });
    // The same 64 concurrent callers, gathered per product into calls of many attempts.
    let batcher = Batcher::new(
        r.clone(),
        BatchSettings {
            max: 64,
            window: Duration::from_millis(1),
            calls: 2,
        },
        None,
    );
    group.bench_function("winning attempts, 64 concurrent callers, batched", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = (0..64).map(|_| batcher.reserve(user(), product));
            for d in futures_util::future::join_all(calls).await {
                d.expect("reserve");
            }
        })
    });
    group.finish();

    // One reserve.lua call deciding n winning attempts, beside one attempt per call above.
    let mut group = c.benchmark_group("reserve_batch");
    for n in [1_u64, 8, 64] {
        group.throughput(Throughput::Elements(n));
        group.bench_function(format!("{n} winning attempts, one call"), |b| {
            b.to_async(&rt).iter(|| async {
                let users: Vec<_> = (0..n).map(|_| user()).collect();
                r.reserve_many(product, &users).await.expect("reserve_many")
            })
        });
    }
    group.finish();

    rt.block_on(common::delete_keys(&pool, &prefix));
}

criterion_group!(benches, bench_reserve);
criterion_main!(benches);
