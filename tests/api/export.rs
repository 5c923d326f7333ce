//! A sale's orders for the operators and the storefront's backend: pages (keyset) and a CSV
//! export that streams a large sale in bounded memory.

use std::time::Duration;

use reqwest::Method;
use sea_orm::ConnectionTrait;
use seckill::startup::Role;
use serde_json::Value;

use crate::helpers::{ADMIN_TOKEN, Proc, TestApp, assert_problem, jwt};

/// `n` orders of product `p` straight into Postgres (users 1..=n), every third one paid.
async fn orders_in_postgres(app: &TestApp, p: i64, n: i64) {
    app.db
        .execute_unprepared(&format!(
            "insert into orders (order_id, reservation_id, user_id, product_id, status, reserved_at, expires_at, paid_at, payment_reference, paid_amount_cents) \
             select gen_random_uuid(), gen_random_uuid(), g, {p}, \
                    case when g % 3 = 0 then 'paid' else 'pending_payment' end, now(), now() + interval '15 minutes', \
                    case when g % 3 = 0 then now() end, case when g % 3 = 0 then 'ch_' || g end, \
                    case when g % 3 = 0 then 19900 end \
             from generate_series(1, {n}) g"
        ))
        .await
        .unwrap();
}

fn listing(app: &TestApp, p: i64, query: &str) -> reqwest::RequestBuilder {
    app.api.client.get(format!(
        "{}/api/v1/admin/products/{p}/orders{query}",
        app.api.admin
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_come_a_page_at_a_time_each_once_for_the_operators_and_the_backend() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.create_product(300, 60, 3_600).await;
    orders_in_postgres(&app, p, 250).await;

    let mut seen = Vec::new();
    let mut after = String::new();
    let mut pages = Vec::new();
    loop {
        let res = listing(&app, p, &format!("?limit=100{after}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let page: Value = res.json().await.unwrap();
        let orders = page["orders"].as_array().unwrap();
        pages.push(orders.len());
        seen.extend(
            orders
                .iter()
                .map(|o| o["order_id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    assert_eq!(pages, [100, 100, 50]);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 250, "each order once");
    assert_eq!(unique, seen, "in a stable order");

    // The storefront's backend reads them too, filtered by status.
    let paid: Value = app
        .api
        .client
        .get(format!(
            "{}/api/v1/admin/products/{p}/orders?status=paid&limit=1000",
            app.api.admin
        ))
        .bearer_auth(crate::helpers::SERVICE_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paid = paid["orders"].as_array().unwrap();
    assert_eq!(paid.len(), 83);
    assert!(
        paid.iter()
            .all(|o| o["status"] == "paid" && o["amount_cents"] == 19_900)
    );

    // A shopper is refused; bad queries are 400s; an unknown product a 404.
    let shopper = listing(&app, p, "")
        .bearer_auth(jwt(1))
        .send()
        .await
        .unwrap();
    assert_problem(shopper, 401, "unauthorized").await;
    for bad in [
        "?limit=0",
        "?limit=1001",
        "?status=shipped",
        "?after=not-a-uuid",
        "?page=2",
    ] {
        let res = listing(&app, p, bad)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_problem(res, 400, "bad_request").await;
    }
    let res = listing(&app, 999_999, "")
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "product_not_found").await;
    app.stop().await;
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csv_export_of_200_000_orders_streams_in_flat_memory() {
    const N: i64 = 200_000;
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let p = app.api.create_product(N, 60, 3_600).await;
    orders_in_postgres(&app, p, N).await;
    // A `seckill serve` process of its own, whose memory is its alone to measure.
    let server = Proc::start(&app.iso, "serve", &[]);
    server.wait_healthy().await;
    let pid = server.child.id();
    let api = server.api();
    let before = rss_kib(pid);
    let started = std::time::Instant::now();
    let res = api
        .client
        .request(
            Method::GET,
            format!("{}/api/v1/admin/products/{p}/orders", api.admin),
        )
        .bearer_auth(ADMIN_TOKEN)
        .header("accept", "text/csv")
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let mut res = res;
    let (mut lines, mut bytes, mut peak) = (0u64, 0u64, before);
    let mut first = Vec::new();
    while let Some(chunk) = res.chunk().await.unwrap() {
        if first.len() < 300 {
            first.extend_from_slice(&chunk[..chunk.len().min(300)]);
        }
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        bytes += chunk.len() as u64;
        peak = peak.max(rss_kib(pid));
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(lines, N as u64 + 1, "a header and every order");
    assert!(String::from_utf8_lossy(&first).starts_with("order_id,reservation_id,user_id"));
    let grown = peak.saturating_sub(before);
    eprintln!(
        "CSV export: {N} orders, {:.1} MB in {secs:.1} s ({:.0} orders/s); serve's RSS {before} KiB, peak +{grown} KiB",
        bytes as f64 / 1e6,
        N as f64 / secs
    );
    // The whole export is ~40 MB: holding it (or its rows) would show here.
    assert!(
        grown < 24 * 1024,
        "RSS grew {grown} KiB while streaming {bytes} bytes"
    );
    app.stop().await;
}
