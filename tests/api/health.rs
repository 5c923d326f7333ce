use seckill::startup::Role;

use crate::helpers::{Isolation, TestApp, pg_rows};

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_200() {
    let app = TestApp::spawn().await;
    let res = app.api.get("/healthz").await;
    assert_eq!(res.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_names_all_three_dependencies_when_they_answer() {
    let app = TestApp::spawn().await;
    // The AMQP connection is made in the background; give it a moment.
    let mut body = serde_json::Value::Null;
    for _ in 0..50 {
        let res = app.api.get("/readyz").await;
        let status = res.status();
        body = res.json().await.unwrap();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(body["status"], "ready", "{body}");
    for dep in ["redis", "rabbitmq", "postgres"] {
        assert_eq!(body["checks"][dep], "ok", "{body}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_naming_rabbitmq_when_it_is_unreachable() {
    let app = TestApp::spawn_with(
        Role::Serve,
        &[("SECKILL_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    )
    .await;
    let res = app.api.get("/readyz").await;
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");
    for (dep, check) in [
        ("rabbitmq", "unreachable"),
        ("redis", "ok"),
        ("postgres", "ok"),
    ] {
        assert_eq!(body["checks"][dep], check, "{body}");
    }
    assert!(body["detail"].as_str().unwrap().contains("rabbitmq"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_get_a_problem_404() {
    let app = TestApp::spawn().await;
    let res = app.api.get("/no/such/thing").await;
    assert_eq!(res.status(), 404);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    app.stop().await;
}

async fn table_names(url: &str) -> Vec<String> {
    let db = sea_orm::Database::connect(url).await.unwrap();
    let rows = pg_rows(
        &db,
        "select tablename from pg_tables where schemaname = 'public' order by 1",
    )
    .await;
    let names = rows
        .iter()
        .map(|r| r.try_get::<String>("", "tablename").unwrap())
        .collect();
    db.close().await.unwrap();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_a_missing_database_and_is_idempotent() {
    let iso = Isolation::new();
    let url = iso.database_url();
    seckill::db::migrate(&url)
        .await
        .expect("first run creates the database");
    seckill::db::migrate(&url)
        .await
        .expect("second run is a no-op");
    let tables = table_names(&url).await;
    for t in ["orders", "product", "seaql_migrations"] {
        assert!(tables.contains(&t.to_string()), "{tables:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_migrations_do_not_trip_over_each_other() {
    let iso = Isolation::new();
    let url = iso.database_url();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { seckill::db::migrate(&url).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().expect("each concurrent run succeeds");
    }
    assert!(table_names(&url).await.contains(&"orders".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schema_enforces_one_order_per_shopper_and_sold_within_stock() {
    use sea_orm::ConnectionTrait;
    let iso = Isolation::new();
    let url = iso.database_url();
    seckill::db::migrate(&url).await.unwrap();
    let db = sea_orm::Database::connect(&url).await.unwrap();
    db.execute_unprepared(
        "insert into product (name, stock, price_cents, starts_at, ends_at) values ('x', 1, 100, now(), now() + interval '1 hour')",
    )
    .await
    .unwrap();
    let oversold = db.execute_unprepared("update product set sold = 2").await;
    assert!(
        oversold
            .unwrap_err()
            .to_string()
            .contains("product_sold_le_stock")
    );
    let insert = |rid: &str| {
        format!(
            "insert into orders (order_id, reservation_id, user_id, product_id, reserved_at, expires_at) \
             values (gen_random_uuid(), '{rid}', 7, 1, now(), now() + interval '15 minutes')"
        )
    };
    db.execute_unprepared(&insert("00000000-0000-7000-8000-000000000001"))
        .await
        .unwrap();
    let twice = db
        .execute_unprepared(&insert("00000000-0000-7000-8000-000000000002"))
        .await;
    assert!(
        twice
            .unwrap_err()
            .to_string()
            .contains("orders_user_product_key")
    );
    db.close().await.unwrap();
}
