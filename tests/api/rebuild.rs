//! Rebuilding a sale in Redis (`preheat.lua` with the closed reservations Postgres had):
//! every returned unit counted exactly once around it, one rebuild of a product at a time.

use fred::prelude::*;
use seckill::{
    keys::Keys,
    reservations::{Outcome, PreheatPlan, Released, Reservations},
};
use uuid::Uuid;

use crate::{
    helpers::RedisScope,
    reservations::{live_plan, product, rate, user},
};

async fn setup() -> (RedisScope, Reservations) {
    let scope = RedisScope::new().await;
    let r = Reservations::new(
        scope.pool.clone(),
        Keys::new(scope.prefix.clone()),
        rate("100/1s"),
        rate("100000/1s"),
    );
    (scope, r)
}

#[tokio::test]
async fn a_rebuild_counts_each_unit_returned_around_it_exactly_once() {
    let (_scope, r) = setup().await;
    let p = product(1);
    r.preheat(&live_plan(p, 10)).await.unwrap();
    let mut won = Vec::new();
    for u in 1..=7 {
        match r.reserve(user(u), p).await.unwrap().outcome {
            Outcome::Won { reservation_id, .. } => won.push(reservation_id),
            other => panic!("{other:?}"),
        }
    }
    let remaining = |r: Reservations| async move { r.remaining(p).await.unwrap().unwrap() };
    assert_eq!(remaining(r.clone()).await, 3);

    // Postgres, read for the rebuild, has 7 orders: 0..=4 hold a unit, 5 and 6 were closed.
    // 5's unit came back before the read; 0 is closed after the read and its unit comes back
    // before the rebuild is written (to the old figures).
    assert!(matches!(
        r.release(p, won[5], "{}").await.unwrap(),
        Released::Returned { .. }
    ));
    let plan = PreheatPlan {
        live_orders: 5,
        buyers: (0..7).map(|i| (user(i as i64 + 1), won[i])).collect(),
        closed: vec![won[5], won[6]],
        force: true,
        epoch: 1,
        ..live_plan(p, 10)
    };
    assert_eq!(plan.remaining(), 5);
    assert!(matches!(
        r.release(p, won[0], "{}").await.unwrap(),
        Released::Returned { .. }
    ));
    r.preheat(&plan).await.unwrap();
    // Units out: orders 1..=4 only.
    assert_eq!(remaining(r.clone()).await, 6);

    // 6 was closed before the read: its late return is a no-op (the rebuild counted it).
    assert!(matches!(
        r.release(p, won[6], "{}").await.unwrap(),
        Released::AlreadyReturned { .. }
    ));
    // 0 is not returned twice.
    assert!(matches!(
        r.release(p, won[0], "{}").await.unwrap(),
        Released::AlreadyReturned { .. }
    ));
    // 1 closes after the rebuild: returned once, the third release of the sale.
    assert!(matches!(
        r.release(p, won[1], "{}").await.unwrap(),
        Released::Returned { remaining: 7, at } if at.seq == 3
    ));
    assert_eq!(remaining(r.clone()).await, 10 - 3);
}

#[tokio::test]
async fn only_one_rebuild_holds_a_product_at_a_time() {
    let (scope, r) = setup().await;
    let p = product(2);
    let first = r.lock_rebuild(p).await.unwrap().expect("the lock is free");
    assert!(r.lock_rebuild(p).await.unwrap().is_none());
    // Another holder's token does not release it.
    r.unlock_rebuild(p, &Uuid::now_v7().to_string())
        .await
        .unwrap();
    assert!(r.lock_rebuild(p).await.unwrap().is_none());
    r.unlock_rebuild(p, &first).await.unwrap();
    let second = r.lock_rebuild(p).await.unwrap().expect("free again");
    // A lock whose holder died expires by itself.
    let ttl: i64 = scope
        .pool
        .pttl(Keys::new(scope.prefix.clone()).product(p).rebuild)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
    r.unlock_rebuild(p, &second).await.unwrap();
}
