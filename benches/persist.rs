//! The worker's persist against the real Postgres, Redis (the statuses) and RabbitMQ:
//! - `worker batch persist`: one `process_batch` at a time, 100 and 500 orders per transaction;
//! - `worker drain`: a [`Worker`] with this deployment's settings (consumers, batch size, pool;
//!   `SECKILL_WORKER_*` and `SECKILL_PG_POOL` from the environment override the defaults)
//!   draining 20,000 winners queued beforehand, timed from its start until every order exists:
//!   what `scripts/bench` step 5b measures, without the HTTP sale that queues the winners.
//!
//! Skips with a message when a service is absent.
//! `cargo bench --bench persist`; compare with `scripts/bench-pg` (pgbench, batched inserts into
//! the same table) run beside it.

#![allow(clippy::expect_used)] // a bench that cannot set up should stop loudly

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

mod common;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use seckill::{
    amqp::{Broker, OrderMessage, declare_topology},
    config::Settings,
    deps::Deps,
    domain::{ProductId, UserId},
    keys::Keys,
    metrics::Metrics,
    reservations::Reservations,
    worker::{Worker, process_batch},
};
use tokio_util::sync::CancellationToken;

/// Winners queued for each drain.
const DRAIN_WINNERS: usize = 20_000;
/// Publisher confirms in flight while queueing them.
const CONFIRM_WINDOW: usize = 1_000;

struct Setup {
    settings: Arc<Settings>,
    database: String,
    db: DatabaseConnection,
    pool: fred::prelude::Pool,
    reservations: Reservations,
}

/// A scratch database with one product of stock that never runs out; `None` (with a message)
/// when Postgres or Redis is not reachable.
fn setup(rt: &tokio::runtime::Runtime, name: &str) -> Option<Setup> {
    let tag = std::process::id();
    let database = format!("seckill_bench{name}_{tag}");
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("SECKILL_WORKER_") || k == "SECKILL_PG_POOL")
        .collect();
    vars.extend([
        (
            "SECKILL_REDIS_PREFIX".to_owned(),
            format!("bench{name}{tag}"),
        ),
        (
            "SECKILL_AMQP_QUEUE".to_owned(),
            format!("seckill.bench{name}.{tag}"),
        ),
        (
            "SECKILL_DATABASE_URL".to_owned(),
            format!("{}/{database}", common::PG),
        ),
    ]);
    let settings = Arc::new(Settings::from_vars(vars).expect("settings"));
    let setup = rt.block_on(async {
        seckill::db::migrate(&settings.database_url).await?;
        let db = seckill::db::connect(&settings.database_url, settings.pg_pool).await?;
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
            rt.block_on(common::drop_database(&database));
            return None;
        }
    };
    let reservations = Reservations::new(
        pool.clone(),
        Keys::new(settings.redis.prefix.clone()),
        settings.user_rate,
        settings.product_rate,
    );
    Some(Setup {
        settings,
        database,
        db,
        pool,
        reservations,
    })
}

fn teardown(rt: &tokio::runtime::Runtime, s: Setup) {
    rt.block_on(async {
        s.db.close().await.ok();
        common::drop_database(&s.database).await;
        common::delete_keys(&s.pool, &s.settings.redis.prefix).await;
        common::delete_queues(&s.settings.amqp_queue).await;
    });
}

/// `n` winners of `product` by users never seen before.
fn winners(next_user: &AtomicI64, product: ProductId, n: usize) -> Vec<OrderMessage> {
    (0..n)
        .map(|_| OrderMessage {
            v: OrderMessage::VERSION,
            reservation_id: uuid::Uuid::now_v7(),
            user_id: UserId::try_from(next_user.fetch_add(1, Ordering::Relaxed)).expect("id"),
            product_id: product,
            reserved_at: chrono::Utc::now(),
        })
        .collect()
}

fn bench_persist(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(s) = setup(&rt, "p") else { return };
    let product = ProductId::try_from(1_i64).expect("id");
    let next_user = AtomicI64::new(1);
    let mut group = c.benchmark_group("worker batch persist");
    for size in [100_usize, 500] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter_batched(
                || winners(&next_user, product, size),
                |batch| {
                    let out = rt
                        .block_on(process_batch(
                            &s.db,
                            &s.reservations,
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
    teardown(&rt, s);
}

/// Publishes `messages` to `queue` as the relay does (persistent, with confirms).
async fn queue_winners(ch: &lapin::Channel, queue: &str, messages: &[OrderMessage]) {
    for chunk in messages.chunks(CONFIRM_WINDOW) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for m in chunk {
            let body = serde_json::to_vec(m).expect("json");
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    lapin::options::BasicPublishOptions::default(),
                    &body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack(), "broker refused");
        }
    }
}

async fn sold(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "select sold::bigint as sold from product where product_id = 1",
        ))
        .await
        .expect("reading sold")
        .expect("the product");
    row.try_get::<i64>("", "sold").expect("sold")
}

fn bench_drain(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(s) = setup(&rt, "d") else { return };
    let stop_all = CancellationToken::new();
    let broker = rt.block_on(async { Broker::start(&s.settings.amqp_url, stop_all.clone()) });
    let Some((conn, ch)) = rt.block_on(async {
        let (conn, ch) = common::amqp_channel().await.ok()?;
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .ok()?;
        declare_topology(&conn, &s.settings.amqp_queue).await.ok()?;
        Some((conn, ch))
    }) else {
        eprintln!("worker drain bench skipped: RabbitMQ not reachable");
        teardown(&rt, s);
        return;
    };
    let deps = Deps::assemble(
        s.settings.clone(),
        s.pool.clone(),
        s.db.clone(),
        broker,
        Arc::new(Metrics::new().expect("metrics")),
    );
    let product = ProductId::try_from(1_i64).expect("id");
    let next_user = AtomicI64::new(1);
    let mut group = c.benchmark_group("worker drain");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1))
        .throughput(Throughput::Elements(DRAIN_WINNERS as u64));
    group.bench_function(BenchmarkId::from_parameter(DRAIN_WINNERS), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let batch = winners(&next_user, product, DRAIN_WINNERS);
                rt.block_on(queue_winners(&ch, &s.settings.amqp_queue, &batch));
                let target = rt.block_on(sold(&s.db)) + DRAIN_WINNERS as i64;
                let stop = CancellationToken::new();
                let started = Instant::now();
                let worker = Worker::new(&deps, s.reservations.clone());
                let running = rt.spawn(worker.run(stop.clone()));
                rt.block_on(async {
                    while sold(&s.db).await < target {
                        assert!(
                            started.elapsed() < Duration::from_secs(300),
                            "the worker did not drain the queue in 300 s"
                        );
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                });
                total += started.elapsed();
                stop.cancel();
                rt.block_on(running).expect("worker task").expect("worker");
            }
            total
        })
    });
    group.finish();
    stop_all.cancel();
    rt.block_on(async {
        conn.close(200, "bye".into()).await.ok();
    });
    teardown(&rt, s);
}

criterion_group!(benches, bench_persist, bench_drain);
criterion_main!(benches);
