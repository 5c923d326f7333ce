//! Many processes: 2 `serve` + 2 `worker` real processes share one deployment (single Redis,
//! then the cluster); one of each is killed with SIGKILL mid-sale. Nothing is lost or doubled.

use std::{collections::HashSet, time::Duration};

use fred::prelude::*;
use futures_util::{StreamExt, stream};
use seckill::{domain::ProductId, keys::Keys};
use serde_json::Value;

use crate::helpers::{
    Api, CLUSTER_URL, Isolation, Proc, await_orders, buyer_count, pg_count, sold_count,
};

/// One purchase attempt; `None` when the process did not answer (it was killed) or did not
/// take the request at all (actix's own plain `408`: the request's head was not read within
/// 5 s on an overloaded machine, so nothing was decided).
async fn attempt(api: &Api, product: i64, user: i64, token: &str) -> Option<(u16, Value)> {
    let res = api.try_reserve(user, product, token).await.ok()?;
    let status = res.status().as_u16();
    if status == 408 {
        return None;
    }
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
    // Owned clients (10 s a request at most), so that process B can be killed under its own.
    let (a_api, b_api) = (
        a.api().clone().with_timeout(Duration::from_secs(10)),
        b.api().clone().with_timeout(Duration::from_secs(10)),
    );
    let api_of = |u: i64| if u % 2 == 0 { &a_api } else { &b_api };
    let p = a_api.live_product(500).await;

    // 5,000 shoppers get tokens (from either process), then buy: half through each API.
    let tokens: Vec<(i64, String)> = stream::iter(1..=5_000_i64)
        .map(|u| async move { (u, api_of(u).fetch_token(u, p).await) })
        .buffer_unordered(64)
        .collect()
        .await;
    let purchases = stream::iter(tokens.iter().flat_map(|t| [t.clone(), t.clone()]))
        .map(|(u, token)| async move { (u, attempt(api_of(u), p, u, &token).await) })
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
    await_orders(&db, p, 500, Duration::from_secs(30)).await;
    let distinct = buyer_count(&db, p).await;
    assert_eq!(distinct, 500);
    let sold = sold_count(&db, p).await;
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
