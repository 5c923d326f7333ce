//! The worker's batch persist (`process_batch`): 100 and 500 orders per transaction against
//! the real Postgres (and Redis for the status). Skips with a message when either is absent.
//!
//! `cargo bench --bench persist`; compare with `scripts/bench-pg` (pgbench, batched inserts).

#![allow(clippy::expect_used)] // a bench that cannot set up should stop loudly

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sea_orm::ConnectionTrait;
use seckill::{
    amqp::OrderMessage,
    config::Settings,
    domain::{ProductId, UserId},
    keys::Keys,
    reservations::Reservations,
    worker::process_batch,
};

fn bench_persist(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tag = std::process::id();
    let database = format!("seckill_benchp_{tag}");
    let url = format!("{}/{database}", common::PG);
    let settings =
        Settings::from_vars([("SECKILL_REDIS_PREFIX".to_owned(), format!("benchp{tag}"))])
            .expect("settings");
    let setup = rt.block_on(async {
        seckill::db::migrate(&url).await?;
        let db = seckill::db::connect(&url, 4).await?;
        let pool = seckill::redis::connect(&settings.redis, 2, Duration::from_secs(2)).await?;
        db.execute_unprepared(
            "insert into product (name, stock, price_cents, starts_at, ends_at) values ('bench', 100000000, 1, now(), now() + interval '1 day')",
        )
        .await?;
        anyhow::Ok((db, pool))
    });
    let (db, pool) = match setup {
        Ok(s) => s,
        Err(e) => {
            eprintln!("persist bench skipped: Postgres or Redis not reachable ({e:#})");
            return;
        }
    };
    let reservations = Reservations::new(
        pool.clone(),
        Keys::new(settings.redis.prefix.clone()),
        settings.user_rate,
        settings.product_rate,
    );
    let product = ProductId::try_from(1_i64).expect("id");
    let next_user = AtomicI64::new(1);
    let mut group = c.benchmark_group("worker batch persist");
    for size in [100_usize, 500] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter_batched(
                || {
                    (0..size)
                        .map(|_| OrderMessage {
                            v: 1,
                            reservation_id: uuid::Uuid::now_v7(),
                            user_id: UserId::try_from(next_user.fetch_add(1, Ordering::Relaxed))
                                .expect("id"),
                            product_id: product,
                            reserved_at: chrono::Utc::now(),
                        })
                        .collect::<Vec<_>>()
                },
                |batch| {
                    let out = rt
                        .block_on(process_batch(
                            &db,
                            &reservations,
                            &batch,
                            Duration::from_secs(900),
                        ))
                        .expect("persist");
                    assert_eq!(out.inserted, size);
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
    rt.block_on(async {
        db.close().await.ok();
        common::drop_database(&database).await;
        common::delete_keys(&pool, &settings.redis.prefix).await;
    });
}

criterion_group!(benches, bench_persist);
criterion_main!(benches);
