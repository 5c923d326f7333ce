//! Failure injection on the shared servers: RabbitMQ and Postgres stopped mid-sale.
//!
//! These stop services every other test uses, so they are `#[ignore]`d in the parallel run
//! and run alone, one at a time, by `scripts/test` afterwards (`--run-ignored only -j 1`).

use std::{process::Command, time::Duration};

use seckill::startup::Role;

use crate::helpers::{TestApp, await_orders, http_sale, purchase_token, queue_len, sold_count};

fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(status.success(), "{cmd} {args:?} failed");
}

fn postgres_cluster() -> String {
    let out = Command::new("ls").arg("/etc/postgresql").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared RabbitMQ; run alone by scripts/test"]
async fn rabbitmq_stopped_for_10_seconds_during_a_sale_loses_no_winner() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let p = app.api.live_product(300).await;
    let (first, _) = http_sale(&app.api, p, 1..=200, 1).await;

    run("rabbitmqctl", &["-q", "stop_app"]);
    let (during, _) = http_sale(&app.api, p, 201..=400, 1).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    run("rabbitmqctl", &["-q", "start_app"]);
    run("rabbitmqctl", &["-q", "await_startup"]);

    let (after, _) = http_sale(&app.api, p, 401..=600, 1).await;
    let winners = (first.len() + during.len() + after.len()) as i64;
    assert_eq!(winners, 300, "sold out exactly");
    await_orders(&app.db, p, winners, Duration::from_secs(60)).await;
    assert_eq!(queue_len(&format!("{}.dlq", app.iso.queue)).await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared Postgres; run alone by scripts/test"]
async fn postgres_stopped_for_10_seconds_during_a_sale_loses_no_winner() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let p = app.api.live_product(300).await;
    // Tokens need Postgres (the product is cached afterwards); fetch them all first.
    let (first, _) = http_sale(&app.api, p, 1..=100, 1).await;
    let cluster = postgres_cluster();
    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &cluster,
            "main",
            "stop",
            "-m",
            "fast",
        ],
    );
    // Purchases keep working without Postgres: the decision is Redis' alone.
    let mut during = 0;
    for u in 101..=200 {
        let token = purchase_token(u, p);
        if app.api.reserve(u, p, &token).await.status() == 202 {
            during += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &cluster, "main", "start"],
    );
    let winners = first.len() as i64 + during;
    assert_eq!(during, 100);
    await_orders(&app.db, p, winners, Duration::from_secs(60)).await;
    let sold = sold_count(&app.db, p).await;
    assert_eq!(sold, winners);
    assert_eq!(queue_len(&format!("{}.dlq", app.iso.queue)).await, 0);
    app.stop().await;
}
