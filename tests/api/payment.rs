//! Payment recorded by the storefront's backend (a service token), never by the shopper
//! outside development mode; orders read by the backend.

use reqwest::Method;
use seckill::startup::Role;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestApp, assert_problem, eventually, jwt};

/// A live product with one winner per user in `users`, each persisted; their order ids.
async fn orders(app: &TestApp, users: &[i64]) -> (i64, Vec<String>) {
    let p = app.api.live_product(10).await;
    for &u in users {
        assert_eq!(app.api.buy(u, p).await.status(), 202);
    }
    let persisted = eventually(std::time::Duration::from_secs(20), || async {
        let mut all = true;
        for &u in users {
            all &= body(app.api.me(u, p).await).await["order_id"].is_string();
        }
        all
    })
    .await;
    assert!(persisted, "every winner's order is persisted");
    let mut ids = Vec::new();
    for &u in users {
        let me = body(app.api.me(u, p).await).await;
        ids.push(me["order_id"].as_str().unwrap().to_owned());
    }
    (p, ids)
}

async fn body(res: reqwest::Response) -> Value {
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_backend_records_a_payment_once_by_its_reference_and_nothing_changes_on_a_refusal() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let api = &app.api;
    let (p, ids) = orders(&app, &[1, 2]).await;
    let (mine, theirs) = (&ids[0], &ids[1]);

    // The wrong amount: refused with the price, the order still awaiting payment.
    let wrong = api.record_payment(mine, "ch_1", 100).await;
    assert_eq!(wrong.status(), 409);
    let problem = body(wrong).await;
    assert_eq!(problem["code"], "amount_mismatch");
    assert_eq!(problem["price_cents"], 19_900);
    assert_eq!(
        body(api.order(mine).await).await["status"],
        "pending_payment"
    );

    let paid = api.record_payment(mine, "ch_1", 19_900).await;
    assert_eq!(paid.status(), 200);
    let paid = body(paid).await;
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["payment_reference"], "ch_1");
    assert_eq!(paid["amount_cents"], 19_900);
    // A retry (the backend timed out and sends it again) answers the same order.
    let again = body(api.record_payment(mine, "ch_1", 19_900).await).await;
    assert_eq!(again, paid);
    // Paid under another reference: a conflict, not a second charge recorded.
    assert_problem(
        api.record_payment(mine, "ch_2", 19_900).await,
        409,
        "payment_conflict",
    )
    .await;
    // One reference pays one order.
    assert_problem(
        api.record_payment(theirs, "ch_1", 19_900).await,
        409,
        "payment_conflict",
    )
    .await;
    assert_eq!(
        body(api.order(theirs).await).await["status"],
        "pending_payment"
    );
    // The shopper sees it paid.
    assert_eq!(body(api.me(1, p).await).await["status"], "paid");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_order_answers_order_closed_with_its_status_so_the_backend_refunds() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let api = &app.api;
    let (_, ids) = orders(&app, &[1, 2]).await;
    assert_eq!(api.cancel(1, &ids[0]).await.status(), 200);
    let res = api.record_payment(&ids[0], "ch_late", 19_900).await;
    assert_eq!(res.status(), 409);
    let problem = body(res).await;
    assert_eq!(problem["code"], "order_closed");
    assert_eq!(problem["order_status"], "cancelled");
    assert_eq!(body(api.order(&ids[0]).await).await["status"], "cancelled");
    // The backend cancels any open order (a shopper only their own).
    assert_problem(api.cancel(1, &ids[1]).await, 404, "order_not_found").await;
    let cancelled = api
        .backend(Method::POST, &format!("/api/v1/orders/{}/cancel", ids[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(body(cancelled).await["status"], "cancelled");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_service_token_records_payments_and_reads_orders() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let api = &app.api;
    let (_, ids) = orders(&app, &[1]).await;
    let order = &ids[0];
    let payment = json!({"payment_reference": "ch_x", "amount_cents": 19_900});
    let pay_path = format!("{}/api/v1/orders/{order}/payment", api.http);
    let get_path = format!("{}/api/v1/orders/{order}", api.http);
    // The shopper's JWT, the operators' token, a wrong token, none.
    for bearer in [
        Some(jwt(1)),
        Some(ADMIN_TOKEN.to_owned()),
        Some("x".repeat(40)),
        None,
    ] {
        let with = |req: reqwest::RequestBuilder| match &bearer {
            Some(b) => req.bearer_auth(b),
            None => req,
        };
        let pay = with(api.client.post(&pay_path).json(&payment))
            .send()
            .await
            .unwrap();
        assert_problem(pay, 401, "unauthorized").await;
        let read = with(api.client.get(&get_path)).send().await.unwrap();
        assert_problem(read, 401, "unauthorized").await;
    }
    assert_eq!(
        body(api.order(order).await).await["status"],
        "pending_payment"
    );
    // Bad input is a 400; an unknown order a 404.
    for bad in [
        json!({"payment_reference": "", "amount_cents": 19_900}),
        json!({"payment_reference": "ch", "amount_cents": -1}),
        json!({"payment_reference": "x".repeat(201), "amount_cents": 19_900}),
        json!({"payment_reference": "ch", "amount_cents": 19_900, "extra": 1}),
        json!({"amount_cents": 19_900}),
    ] {
        let res = api
            .backend(Method::POST, &format!("/api/v1/orders/{order}/payment"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_problem(res, 400, "bad_request").await;
    }
    let unknown = uuid::Uuid::now_v7();
    assert_problem(api.order(unknown).await, 404, "order_not_found").await;
    assert_problem(
        api.record_payment(unknown, "ch_y", 19_900).await,
        404,
        "order_not_found",
    )
    .await;
    // The service token is no operator: it cannot create or preheat a sale.
    let create = api
        .client
        .post(format!("{}/api/v1/admin/products", api.admin))
        .bearer_auth(crate::helpers::SERVICE_TOKEN)
        .json(&json!({"name": "x", "stock": 1, "price_cents": 1,
                      "starts_at": "2030-01-01T00:00:00Z", "ends_at": "2030-01-02T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_problem(create, 401, "unauthorized").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shopper_cannot_mark_their_own_order_paid_outside_development_mode() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let api = &app.api;
    let (p, ids) = orders(&app, &[1]).await;
    assert_problem(api.pay(1, &ids[0]).await, 404, "not_found").await;
    assert_eq!(body(api.me(1, p).await).await["status"], "confirmed");
    // The shopper may still cancel their own unpaid order.
    assert_eq!(api.cancel(1, &ids[0]).await.status(), 200);
    app.stop().await;
}

/// Found by `scripts/chaos` (seed 11): a failover lost the writes that recorded a winner's
/// order in Redis, which kept calling it "pending" while Postgres had it confirmed, then paid.
/// `/me` takes Postgres' word over a Redis "pending".
#[tokio::test(flavor = "multi_thread")]
async fn me_shows_the_order_postgres_has_when_redis_still_says_pending() {
    use fred::prelude::*;
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let (p, ids) = orders(&app, &[1]).await;
    assert_eq!(app.api.paid_at_checkout(&ids[0]).await.status(), 200);
    let me = body(app.api.me(1, p).await).await;
    let rid = me["reservation_id"].as_str().unwrap().to_owned();
    // Redis as the lost writes left it: the win still pending.
    let keys = app
        .keys()
        .product(seckill::domain::ProductId::try_from(p).unwrap());
    let client = app.redis.next();
    let _: i64 = client
        .hset(&keys.status, (rid.as_str(), "pending"))
        .await
        .unwrap();
    let _: i64 = client.sadd(&keys.pending, rid.as_str()).await.unwrap();
    let me = body(app.api.me(1, p).await).await;
    assert_eq!(me["status"], "paid", "{me}");
    app.stop().await;
}
