//! The same guarantees on a real 3-master Redis Cluster (`scripts/redis-cluster start`, which
//! `scripts/test` runs), with products whose hash tags land on different masters.

use std::time::Duration;

use fred::prelude::*;
use seckill::{domain::ProductId, keys::Keys, reservations::Reservations, startup::Role};
use serde_json::Value;

use crate::{
    helpers::{CLUSTER_URL, Isolation, TestApp, eventually, http_sale, pg_count, pg_rows},
    reservations::{
        Via, check_concurrent_releases, check_five_thousand_attempts, check_one_user_wins_once,
        product, rate,
    },
};

/// A cluster pool under a key prefix of its own.
struct ClusterScope {
    pool: Pool,
    keys: Keys,
    redis: seckill::config::RedisSettings,
    _iso: Isolation,
}

impl ClusterScope {
    async fn new() -> Self {
        let iso = Isolation::new();
        let settings = iso.settings(&[("SECKILL_REDIS_URL", CLUSTER_URL)]);
        let pool = seckill::redis::connect(&settings.redis, 2, Duration::from_secs(10))
            .await
            .expect("the local cluster is up (scripts/redis-cluster start)");
        Self {
            pool,
            keys: Keys::new(iso.prefix.clone()),
            redis: settings.redis,
            _iso: iso,
        }
    }

    fn reservations(&self, user_rate: &str) -> Reservations {
        Reservations::new(
            self.pool.clone(),
            self.keys.clone(),
            rate(user_rate),
            rate("100000000/1s"),
        )
    }

    /// The master (by the standard 3-way split `--cluster create` makes) that owns a product.
    async fn master_of(&self, p: ProductId) -> usize {
        let slot: i64 = self
            .pool
            .next()
            .custom(
                fred::cmd!("CLUSTER"),
                vec!["KEYSLOT".to_owned(), self.keys.product(p).state],
            )
            .await
            .unwrap();
        match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        }
    }

    /// Asserts the products live on three different masters.
    async fn assert_spread(&self, ids: [i64; 3]) {
        let mut masters = Vec::new();
        for id in ids {
            masters.push(self.master_of(product(id)).await);
        }
        masters.sort_unstable();
        assert_eq!(
            masters,
            [0, 1, 2],
            "products {ids:?} must span the three masters"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_cluster_5000_attempts_by_1000_users_make_exactly_100_winners_per_product() {
    let scope = ClusterScope::new().await;
    scope.assert_spread([1, 2, 3]).await;
    let r = scope.reservations("10/1s");
    let single = Via::single(&r);
    futures_util::future::join_all(
        [1, 2, 3].map(|id| check_five_thousand_attempts(&scope.pool, &r, &single, product(id))),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_cluster_batched_attempts_make_exactly_100_winners_per_product() {
    let scope = ClusterScope::new().await;
    scope.assert_spread([1, 2, 3]).await;
    let r = scope.reservations("10/1s");
    let batched = Via::batched(&r, 32);
    futures_util::future::join_all(
        [1, 2, 3].map(|id| check_five_thousand_attempts(&scope.pool, &r, &batched, product(id))),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_cluster_one_user_with_1000_attempts_wins_once_per_product() {
    let scope = ClusterScope::new().await;
    scope.assert_spread([4, 6, 7]).await;
    let r = scope.reservations("100000/1s");
    let single = Via::single(&r);
    futures_util::future::join_all(
        [4, 6, 7].map(|id| check_one_user_wins_once(&r, &single, product(id))),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_cluster_concurrent_releases_return_exactly_one_unit_per_product() {
    let scope = ClusterScope::new().await;
    scope.assert_spread([5, 10, 11]).await;
    let r = scope.reservations("10/1s");
    futures_util::future::join_all(
        [5, 10, 11].map(|id| check_concurrent_releases(&r, product(id))),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_cluster_a_whole_sale_becomes_orders_and_sold_out_memory_clears_on_release() {
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_REDIS_URL", CLUSTER_URL),
            ("SECKILL_USER_RATE", "1000/1s"),
        ],
    )
    .await;
    // Three products: ids 1, 2, 3 of this fresh database land on the three masters.
    let api = &app.api;
    let mut products = Vec::new();
    for _ in 0..3 {
        products.push(api.live_product(20).await);
    }
    assert_eq!(products, [1, 2, 3]);
    for (i, p) in products.iter().enumerate() {
        let first = i as i64 * 1_000 + 1;
        let (winners, answers) = http_sale(api, *p, first..=first + 199, 2).await;
        assert_eq!(winners.len(), 20);
        assert!(
            answers
                .iter()
                .all(|(s, _)| [202, 409, 410, 429].contains(s)),
            "{answers:?}"
        );
    }
    for p in &products {
        let all = eventually(Duration::from_secs(10), || async {
            pg_count(&app.db, &format!("select count(*) from orders where product_id = {p} and status = 'pending_payment'")).await
                == 20
        })
        .await;
        assert!(all, "product {p} did not get its 20 orders");
    }
    // Sold out is cached; a cancel on another master's product clears it via cluster pub/sub.
    let p = products[1];
    let late = 9_999;
    let token = api.fetch_token(late, p).await;
    assert_eq!(api.reserve(late, p, &token).await.status(), 410);
    let rows = pg_rows(
        &app.db,
        &format!("select user_id, order_id::text as o from orders where product_id = {p} limit 1"),
    )
    .await;
    let (user, order): (i64, String) = (
        rows[0].try_get("", "user_id").unwrap(),
        rows[0].try_get("", "o").unwrap(),
    );
    assert_eq!(api.cancel(user, order).await.status(), 200);
    let won = eventually(Duration::from_secs(5), || async {
        let res = api.reserve(late, p, &token).await;
        res.status() == 202
    })
    .await;
    assert!(won, "the returned unit was not sold again");
    let me: Value = api.me(late, p).await.json().await.unwrap();
    assert!(me["reservation_id"].is_string());
    app.stop().await;
}

/// Waiting rooms on the cluster: two processes (two pools, two `Rooms`) join the same shoppers
/// at once, in rooms on three masters; each shopper has one place, the same whichever process
/// asks, and the places drawn at the start are 1..=n; late arrivals queue behind.
#[tokio::test(flavor = "multi_thread")]
async fn on_the_cluster_one_place_per_shopper_whichever_process_joins_them() {
    use seckill::{
        domain::UserId,
        room::{Joined, Place, Rooms, draw_key},
    };
    let scope = ClusterScope::new().await;
    let ids = [1, 2, 3];
    scope.assert_spread(ids).await;
    // Joins open SECKILL_ROOM_OPENS_SECS (10 minutes) before the start.
    let settings = scope._iso.settings(&[]).room;
    let other = seckill::redis::connect(&scope.redis, 2, Duration::from_secs(10))
        .await
        .unwrap();
    let a = Rooms::new(scope.pool.clone(), scope.keys.clone(), settings);
    let b = Rooms::new(other.clone(), scope.keys.clone(), settings);
    let later = chrono::Utc::now() + chrono::Duration::minutes(5);
    let n = 300_i64;
    for id in ids {
        let p = product(id);
        let joins = (1..=n).map(|u| {
            let (a, b) = (&a, &b);
            async move {
                let u = UserId::try_from(u).unwrap();
                let (x, y) = tokio::join!(
                    a.join(p, u, later, draw_key()),
                    b.join(p, u, later, draw_key())
                );
                assert!(matches!(x.unwrap(), Joined::AwaitingDraw { .. }));
                assert!(matches!(y.unwrap(), Joined::AwaitingDraw { .. }));
            }
        });
        futures_util::future::join_all(joins).await;
        let started = chrono::Utc::now() - chrono::Duration::seconds(1);
        let mut places = Vec::new();
        for u in 1..=n {
            let u = UserId::try_from(u).unwrap();
            let x = a.standing(p, u, started).await.unwrap();
            let y = b.standing(p, u, started).await.unwrap();
            assert_eq!(x.place, y.place, "one place, whichever process asks");
            assert_eq!(x.total, n, "one place per shopper");
            let Some(Place::At(place)) = x.place else {
                panic!("no place after the draw: {x:?}");
            };
            places.push(place);
        }
        places.sort_unstable();
        assert_eq!(places, (1..=n).collect::<Vec<_>>(), "product {id}");
        let late = UserId::try_from(n + 1).unwrap();
        let (x, y) = tokio::join!(
            a.join(p, late, started, draw_key()),
            b.join(p, late, started, draw_key())
        );
        assert_eq!(x.unwrap(), Joined::Placed(n + 1));
        assert_eq!(y.unwrap(), Joined::Placed(n + 1));
    }
    let _ = other.quit().await;
}
