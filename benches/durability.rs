#![allow(clippy::expect_used)] // a bench that cannot set up should stop loudly
//! What each `SECKILL_REDIS_DURABILITY` setting costs per decision: 64 concurrent winning
//! attempts through `Reservations::reserve` (the product's own path, fred pipelining and, for
//! `replicas:1`, the `WAIT` on the connection that ran the script, and for `fsync+replicas:1`
//! its `WAITAOF 1 1`), one Redis per setting.
//!
//! Run by `scripts/bench-redis durability`, which starts the servers (no AOF; AOF with
//! `appendfsync always`; a primary with one replica; a primary and a replica both with AOF) and
//! names them in `SECKILL_BENCH_DURABILITY="none=redis://…;fsync=redis://…;…"`.
//! Skips with a message when that variable is unset.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use seckill::{
    config::{Durability, RedisSettings},
    domain::ProductId,
    durability::Replication,
    keys::Keys,
    reservations::{Outcome, Reservations},
};

/// `(setting, url)` pairs from `SECKILL_BENCH_DURABILITY`.
fn targets() -> Option<Vec<(Durability, String)>> {
    let raw = std::env::var("SECKILL_BENCH_DURABILITY").ok()?;
    raw.split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|pair| {
            let (setting, url) = pair.split_once('=')?;
            Some((setting.trim().parse().ok()?, url.trim().to_owned()))
        })
        .collect()
}

fn bench_durability(c: &mut Criterion) {
    let Some(targets) = targets() else {
        eprintln!(
            "durability bench skipped: run it through `scripts/bench-redis durability` \
             (SECKILL_BENCH_DURABILITY names the Redis instances)"
        );
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let product = ProductId::try_from(1_i64).expect("id");
    let users = common::FreshUsers::default();

    // Each iteration: 64 concurrent winning attempts.
    let mut group = c.benchmark_group("durability");
    group.throughput(Throughput::Elements(64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    for (durability, url) in targets {
        let settings = RedisSettings {
            url,
            cluster: false,
            prefix: "benchdur".into(),
        };
        let pool = rt
            .block_on(seckill::redis::connect(
                &settings,
                4,
                Duration::from_secs(2),
            ))
            .expect("Redis of the bench");
        let r = Reservations::new(
            pool,
            Keys::new(settings.prefix.clone()),
            "1000/1s".parse().expect("rate"),
            "1000000000/1s".parse().expect("rate"),
        )
        .with_durability(durability);
        rt.block_on(common::ample_sale(&r, product))
            .expect("preheat");
        // Every attempt is a fresh user's: every one wins, so every one pays the setting.
        let want = match durability {
            Durability::Replicas(_) | Durability::FsyncReplicas(_) => Replication::Confirmed,
            Durability::Fsync | Durability::None => Replication::NotAsked,
        };
        // Waits that did not come back confirmed (timed out, or skipped right after one that
        // did): counted and printed, since they are part of what the setting costs here.
        let (short, wins) = (AtomicUsize::new(0), AtomicUsize::new(0));
        // Ids `none`, `fsync`, `replicas-1`, `fsync+replicas-1`: scripts/bench-redis reads
        // their estimates.
        group.bench_function(durability.to_string().replace(':', "-"), |b| {
            b.to_async(&rt).iter(|| async {
                let calls = (0..64).map(|_| r.reserve(users.next(), product));
                for d in futures_util::future::join_all(calls).await {
                    let d = d.expect("reserve");
                    assert!(matches!(d.outcome, Outcome::Won { .. }), "{d:?}");
                    assert_ne!(d.replication, Replication::Failed, "{durability}");
                    wins.fetch_add(1, Ordering::Relaxed);
                    if d.replication != want {
                        short.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        });
        eprintln!(
            "{durability}: {} of {} wins answered without their wait confirmed",
            short.load(Ordering::Relaxed),
            wins.load(Ordering::Relaxed)
        );
    }
    group.finish();
}

criterion_group!(benches, bench_durability);
criterion_main!(benches);
