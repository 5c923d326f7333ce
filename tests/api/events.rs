//! Order events: written with each change, delivered at least once to the events exchange
//! (a real consumer bound to it) and to a signed webhook (a real HTTP receiver on loopback that
//! checks every signature and fails the first deliveries), nothing lost across a `kill -9`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use seckill::startup::Role;
use serde_json::Value;
use sha2::Sha256;

use crate::helpers::{
    Proc, TestApp, amqp_channel, events_exchange, eventually, free_port, http_sale, pg_count,
};

const WEBHOOK_SECRET: &str = "whsec-test-4f1e9a7c2b6d0e8f3a5c7b9d1e2f4a6c";

/// The events of a sale: users 1 to 3 win; 1's payment is recorded, 2 cancels, 3 holds.
async fn sale_with_every_kind(app: &TestApp) -> i64 {
    let api = &app.api;
    let p = api.live_product(5).await;
    let (won, _) = http_sale(api, p, 1..=3, 1).await;
    assert_eq!(won.len(), 3);
    let persisted = eventually(Duration::from_secs(20), || async {
        pg_count(
            &app.db,
            &format!("select count(*) from orders where product_id = {p}"),
        )
        .await
            == 3
    })
    .await;
    assert!(persisted);
    let order = |user: i64| async move {
        let me: Value = api.me(user, p).await.json().await.unwrap();
        me["order_id"].as_str().unwrap().to_owned()
    };
    assert_eq!(api.paid_at_checkout(order(1).await).await.status(), 200);
    assert_eq!(api.cancel(2, order(2).await).await.status(), 200);
    p
}

/// The event bodies received so far, by id.
type Seen = Arc<Mutex<Vec<Value>>>;

#[tokio::test(flavor = "multi_thread")]
async fn every_order_change_reaches_the_events_exchange_once_in_order() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    // A consumer of the storefront's: a queue bound to every order event.
    let (conn, ch) = amqp_channel().await.unwrap();
    let exchange = events_exchange(&app.iso.queue);
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().as_str().into(),
        exchange.as_str().into(),
        "order.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            q.name().as_str().into(),
            "events-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let p = sale_with_every_kind(&app).await;
    let mut got: Vec<(String, Value)> = Vec::new();
    while got.len() < 5 {
        let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("5 events within 20 s")
            .unwrap()
            .unwrap();
        let body: Value = serde_json::from_slice(&delivery.data).unwrap();
        // The message carries the event's id and is routed by its type.
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string()),
            body["id"].as_str().map(str::to_owned)
        );
        assert_eq!(
            delivery.routing_key.as_str(),
            body["type"].as_str().unwrap()
        );
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        got.push((delivery.routing_key.to_string(), body));
    }
    // Nothing more: each change once.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), consumer.next())
            .await
            .is_err()
    );
    let mut kinds: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "order.cancelled",
            "order.confirmed",
            "order.confirmed",
            "order.confirmed",
            "order.paid"
        ]
    );
    // Per order: confirmed first; the data says who, what and for how much.
    let mut by_order: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for (_, e) in &got {
        assert_eq!(e["data"]["product_id"], p);
        assert_eq!(e["data"]["price_cents"], 19_900);
        by_order
            .entry(e["data"]["order_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(e);
    }
    assert_eq!(by_order.len(), 3);
    for events in by_order.values() {
        assert_eq!(events[0]["type"], "order.confirmed");
        assert_eq!(events[0]["data"]["status"], "pending_payment");
        let seqs: Vec<i64> = events
            .iter()
            .map(|e| e["data"]["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "numbered in order"
        );
    }
    let paid = got.iter().find(|(k, _)| k == "order.paid").unwrap();
    assert_eq!(paid.1["data"]["user_id"], 1);
    assert_eq!(paid.1["data"]["amount_cents"], 19_900);
    assert!(paid.1["data"]["payment_reference"].is_string());
    let mut ids: Vec<&str> = got.iter().map(|(_, e)| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "every event its own id");
    // Recorded as published.
    let published = eventually(Duration::from_secs(5), || async {
        pg_count(
            &app.db,
            "select count(*) from order_event where published_at is null",
        )
        .await
            == 0
    })
    .await;
    assert!(published);
    conn.close(200, "bye".into()).await.ok();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_win_is_an_event_too() {
    use sea_orm::ConnectionTrait;
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let p = app.api.live_product(1).await;
    // What the worker writes for a win beyond the stock after a Redis loss.
    app.db
        .execute_unprepared(&format!(
            "insert into rejection (reservation_id, user_id, product_id, reason) \
             values ('{}', 7, {p}, 'sold out: this win could not be honoured')",
            uuid::Uuid::now_v7()
        ))
        .await
        .unwrap();
    let rows = crate::helpers::pg_rows(
        &app.db,
        "select body::text as body from order_event where type = 'order.rejected'",
    )
    .await;
    assert_eq!(rows.len(), 1);
    let body: Value =
        serde_json::from_str(&rows[0].try_get::<String>("", "body").unwrap()).unwrap();
    assert_eq!(body["data"]["status"], "rejected");
    assert_eq!(body["data"]["user_id"], 7);
    assert!(body["data"]["order_id"].is_null());
    assert!(
        body["data"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("sold out")
    );
    app.stop().await;
}

/// A webhook receiver on loopback: checks each delivery's signature (and that its timestamp is
/// fresh), answers `500` to the first `fail_first` deliveries and after that `200` (each after
/// `delay`), and keeps every event it accepted.
struct Receiver {
    url: String,
    accepted: Seen,
    bad_signatures: Arc<Mutex<u32>>,
    calls: Arc<Mutex<u32>>,
    handle: actix_web::dev::ServerHandle,
}

impl Receiver {
    async fn start(fail_first: u32, delay: Duration) -> Self {
        let accepted: Seen = Arc::default();
        let bad: Arc<Mutex<u32>> = Arc::default();
        let calls: Arc<Mutex<u32>> = Arc::default();
        let port = free_port();
        let (a, b, c) = (accepted.clone(), bad.clone(), calls.clone());
        let server = HttpServer::new(move || {
            let (a, b, c) = (a.clone(), b.clone(), c.clone());
            App::new().route(
                "/hook",
                web::post().to(move |req: HttpRequest, body: web::Bytes| {
                    let (a, b, c) = (a.clone(), b.clone(), c.clone());
                    async move {
                        if !verify(&req, &body) {
                            *b.lock().unwrap() += 1;
                            return HttpResponse::BadRequest().finish();
                        }
                        let n = {
                            let mut calls = c.lock().unwrap();
                            *calls += 1;
                            *calls
                        };
                        tokio::time::sleep(delay).await;
                        if n <= fail_first {
                            return HttpResponse::InternalServerError().finish();
                        }
                        a.lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap());
                        HttpResponse::NoContent().finish()
                    }
                }),
            )
        })
        .workers(1)
        .bind(("127.0.0.1", port))
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url: format!("http://127.0.0.1:{port}/hook"),
            accepted,
            bad_signatures: bad,
            calls,
            handle,
        }
    }

    fn ids(&self) -> HashMap<String, u32> {
        let mut ids = HashMap::new();
        for e in self.accepted.lock().unwrap().iter() {
            *ids.entry(e["id"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        ids
    }
}

/// What a receiver does with `Seckill-Signature: t=…,v1=…`: recompute the HMAC over
/// "<t>.<body>" and refuse a timestamp more than 5 minutes away.
fn verify(req: &HttpRequest, body: &[u8]) -> bool {
    let Some(header) = req
        .headers()
        .get("Seckill-Signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x.parse::<i64>().ok(),
            Some(("v1", x)) => v1 = Some(x.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (chrono::Utc::now().timestamp() - t).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::decode(v1).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_that_fails_at_first_gets_every_event_signed_with_backoff() {
    let receiver = Receiver::start(3, Duration::ZERO).await;
    let app = TestApp::spawn_with(
        Role::All,
        &[
            ("SECKILL_WEBHOOK_URL", receiver.url.as_str()),
            ("SECKILL_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    )
    .await;
    sale_with_every_kind(&app).await;
    let all = eventually(Duration::from_secs(30), || async {
        receiver.ids().len() == 5
    })
    .await;
    assert!(all, "5 events delivered: {:?}", receiver.ids());
    assert!(receiver.ids().values().all(|n| *n == 1), "each once");
    assert_eq!(
        *receiver.bad_signatures.lock().unwrap(),
        0,
        "every signature verifies"
    );
    assert!(
        *receiver.calls.lock().unwrap() >= 8,
        "3 failures, then 5 deliveries"
    );
    // Every attempt is on record: the failures with their status, then the deliveries.
    let failed = pg_count(
        &app.db,
        "select count(*) from webhook_attempt where status = 500",
    )
    .await;
    let ok = pg_count(
        &app.db,
        "select count(*) from webhook_attempt where status = 204",
    )
    .await;
    assert_eq!((failed, ok), (3, 5));
    // The retries waited (backoff from 1 s), not hammered.
    let spread = pg_count(
        &app.db,
        "select (extract(epoch from max(at) - min(at)) * 1000)::bigint from webhook_attempt \
         where event_id in (select event_id from webhook_attempt where status = 500)",
    )
    .await;
    assert!(
        spread >= 800,
        "a failed event's attempts spread over {spread} ms"
    );
    assert_eq!(
        pg_count(
            &app.db,
            "select count(*) from order_event where delivered_at is null"
        )
        .await,
        0
    );
    app.stop().await;
    receiver.handle.stop(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_delivery_loses_no_event() {
    // A slow receiver, so the worker is killed with deliveries in flight.
    let receiver = Receiver::start(0, Duration::from_millis(700)).await;
    let vars = [
        ("SECKILL_WEBHOOK_URL", receiver.url.as_str()),
        ("SECKILL_WEBHOOK_SECRET", WEBHOOK_SECRET),
    ];
    let app = TestApp::spawn_with(Role::Serve, &vars).await;
    let mut worker = Proc::start(&app.iso, "worker", &vars);
    let p = app.api.live_product(40).await;
    let (won, _) = http_sale(&app.api, p, 1..=40, 1).await;
    assert_eq!(won.len(), 40);
    let some = eventually(Duration::from_secs(30), || async {
        *receiver.calls.lock().unwrap() >= 1
    })
    .await;
    assert!(some);
    worker.kill9();
    let _again = Proc::start(&app.iso, "worker", &vars);
    let all = eventually(Duration::from_secs(60), || async {
        receiver.ids().len() == 40
    })
    .await;
    assert!(all, "{} of 40 events", receiver.ids().len());
    // At least once: an event in flight at the kill may come twice, with its id unchanged.
    assert!(receiver.ids().values().all(|n| *n <= 2));
    assert_eq!(*receiver.bad_signatures.lock().unwrap(), 0);
    app.stop().await;
    receiver.handle.stop(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_deliveries_without_sending_an_event_twice() {
    let receiver = Receiver::start(0, Duration::from_millis(20)).await;
    let vars = [
        ("SECKILL_WEBHOOK_URL", receiver.url.as_str()),
        ("SECKILL_WEBHOOK_SECRET", WEBHOOK_SECRET),
    ];
    let app = TestApp::spawn_with(Role::Serve, &vars).await;
    let _a = Proc::start(&app.iso, "worker", &vars);
    let _b = Proc::start(&app.iso, "worker", &vars);
    let p = app.api.live_product(60).await;
    let (won, _) = http_sale(&app.api, p, 1..=60, 1).await;
    assert_eq!(won.len(), 60);
    let all = eventually(Duration::from_secs(60), || async {
        receiver.ids().len() == 60
    })
    .await;
    assert!(all, "{} of 60 events", receiver.ids().len());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        receiver.ids().values().all(|n| *n == 1),
        "each event once: {:?}",
        receiver.ids().values().filter(|n| **n > 1).count()
    );
    assert_eq!(
        pg_count(&app.db, "select count(*) from webhook_attempt").await,
        60,
        "one attempt each"
    );
    app.stop().await;
    receiver.handle.stop(true).await;
}
