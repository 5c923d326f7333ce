//! Many processes: 2 `serve` + 2 `worker` real processes share one deployment (single Redis,
//! then the cluster); one of each is killed with SIGKILL mid-sale. Nothing is lost or doubled.

use std::{collections::HashSet, time::Duration};

use fred::prelude::*;
use futures_util::{StreamExt, stream};
use seckill::{domain::ProductId, keys::Keys};
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, CLUSTER_URL, Isolation, Proc, at, eventually, jwt, pg_count};

/// One purchase attempt; `None` when the process did not answer (it was killed).
async fn attempt(
    client: &reqwest::Client,
    http: &str,
    product: i64,
    user: i64,
    token: &str,
) -> Option<(u16, Value)> {
    let res = client
        .post(format!("{http}/api/v1/products/{product}/reservations"))
        .bearer_auth(jwt(user))
        .json(&json!({"token": token}))
        .send()
        .await
        .ok()?;
    let status = res.status().as_u16();
    Some((status, res.json().await.unwrap_or(Value::Null)))
}

async fn sale_across_processes(redis_url: Option<&str>) {
    let iso = Isolation::new();
    seckill::db::migrate(&iso.database_url()).await.unwrap();
    let mut extra = vec![
        ("SECKILL_RELAY_CLAIM_IDLE_MS", "500"),
        ("SECKILL_WORKER_BATCH_SIZE", "50"),
    ];
    if let Some(url) = redis_url {
        extra.push(("SECKILL_REDIS_URL", url));
    }
    let a = Proc::start(&iso, "serve", &extra);
    let mut b = Proc::start(&iso, "serve", &extra);
    let mut w1 = Proc::start(&iso, "worker", &extra);
    let _w2 = Proc::start(&iso, "worker", &extra);
    a.wait_healthy().await;
    b.wait_healthy().await;
    let (a_http, b_http) = (a.http.clone().unwrap(), b.http.clone().unwrap());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let created: Value = client
        .post(format!("{}/api/v1/admin/products", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "scale", "stock": 500, "price_cents": 1, "starts_at": at(-1), "ends_at": at(3_600)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let p = created["product_id"].as_i64().unwrap();
    let preheat = client
        .post(format!("{}/api/v1/admin/products/{p}/preheat", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(preheat.status(), 200);

    // 5,000 shoppers get tokens (from either process), then buy: half through each API.
    let tokens: Vec<(i64, String)> = stream::iter(1..=5_000_i64)
        .map(|u| {
            let (client, http) = (&client, if u % 2 == 0 { &a_http } else { &b_http });
            async move {
                let res: Value = client
                    .post(format!("{http}/api/v1/products/{p}/token"))
                    .bearer_auth(jwt(u))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                (u, res["token"].as_str().unwrap().to_owned())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let purchases = stream::iter(tokens.iter().flat_map(|t| [t.clone(), t.clone()]))
        .map(|(u, token)| {
            let (client, http) = (
                &client,
                if u % 2 == 0 {
                    a_http.clone()
                } else {
                    b_http.clone()
                },
            );
            async move { (u, attempt(client, &http, p, u, &token).await) }
        })
        .buffer_unordered(96)
        .collect::<Vec<_>>();
    let killer = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        b.kill9();
        w1.kill9();
    };
    let (results, ()) = tokio::join!(purchases, killer);

    let mut observed = HashSet::new();
    let mut unanswered = 0;
    for (u, outcome) in &results {
        match outcome {
            Some((202, body)) => assert!(
                observed.insert((*u, body["reservation_id"].as_str().unwrap().to_owned())),
                "user {u} won twice"
            ),
            Some((s, body)) => assert!([409, 410, 429].contains(s), "{s}: {body}"),
            None => unanswered += 1,
        }
    }
    assert!(
        unanswered > 0,
        "the killed serve process answered everything: kill it earlier"
    );

    // Redis' buyers are the ground truth (a winner whose 202 was lost with process B counts).
    let settings = iso.settings(&extra);
    let pool = seckill::redis::connect(&settings.redis, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let keys = Keys::new(iso.prefix.clone()).product(ProductId::try_from(p).unwrap());
    let buyers: i64 = pool.hlen(&keys.buyers).await.unwrap();
    assert_eq!(buyers, 500, "5,000 shoppers sell out 500 units exactly");
    let db = seckill::db::connect(&iso.database_url(), 2).await.unwrap();
    let all = eventually(Duration::from_secs(30), || async {
        pg_count(
            &db,
            &format!("select count(*) from orders where product_id = {p}"),
        )
        .await
            == 500
    })
    .await;
    assert!(
        all,
        "orders: {}",
        pg_count(
            &db,
            &format!("select count(*) from orders where product_id = {p}")
        )
        .await
    );
    let distinct = pg_count(
        &db,
        &format!("select count(distinct user_id) from orders where product_id = {p}"),
    )
    .await;
    assert_eq!(distinct, 500);
    let sold = pg_count(
        &db,
        &format!("select sold::bigint from product where product_id = {p}"),
    )
    .await;
    assert_eq!(sold, 500);
    for (_, rid) in &observed {
        let found = pg_count(
            &db,
            &format!("select count(*) from orders where reservation_id = '{rid}'"),
        )
        .await;
        assert_eq!(found, 1, "a 202 without its order: {rid}");
    }
    let pending: i64 = pool.scard(&keys.pending).await.unwrap();
    assert_eq!(pending, 0);
    db.close().await.ok();
    let _ = pool.quit().await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_serve_and_two_worker_processes_sell_500_units_to_5000_shoppers_through_kill_9s() {
    sale_across_processes(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_across_processes_on_the_redis_cluster() {
    sale_across_processes(Some(CLUSTER_URL)).await;
}
