//! TLS to Redis and Postgres, for real: a `seckill all` process whose Redis listens for TLS only
//! (a `redis-server` of the test's own, with a certificate authority and a server certificate
//! for 127.0.0.1 made here by `openssl`) and whose Postgres URL says `sslmode=require` sells a
//! unit end to end. The certificate authority is trusted through `SSL_CERT_FILE`, as an
//! operator with a private CA would do; without it the same process must not get to Redis.

use std::{path::PathBuf, process::Command, time::Duration};

use crate::helpers::{Isolation, OwnRedis, Proc, eventually, free_port, pg_count};

/// A throwaway certificate authority and a server certificate for 127.0.0.1, in a directory
/// removed on drop.
struct TestCa {
    dir: PathBuf,
}

impl TestCa {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("seckill-test-tls-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl on PATH");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=seckill test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A certificate authority, and a Redis with AOF (the default durability wants it) whose
/// certificate it signed, speaking TLS on the `rediss://` URL returned and plain text on
/// another port, which only the test uses to look.
async fn tls_redis() -> (TestCa, OwnRedis, String) {
    let ca = TestCa::new();
    let tls_port = free_port();
    let (port, cert, key, ca_pem) = (
        tls_port.to_string(),
        ca.path("server.pem"),
        ca.path("server.key"),
        ca.path("ca.pem"),
    );
    let redis = OwnRedis::start(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--tls-port",
        &port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca_pem,
        "--tls-auth-clients",
        "no",
    ])
    .await;
    (ca, redis, format!("rediss://127.0.0.1:{tls_port}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sale_runs_over_tls_to_redis_and_postgres() {
    let (ca, redis, redis_url) = tls_redis().await;
    let iso = Isolation::new();
    let database_url = format!("{}?sslmode=require", iso.database_url());
    let app = Proc::start(
        &iso,
        "all",
        &[
            ("SECKILL_REDIS_URL", &redis_url),
            ("SECKILL_DATABASE_URL", &database_url),
            ("SSL_CERT_FILE", &ca.path("ca.pem")),
        ],
    );
    app.wait_healthy().await;
    let api = app.api();
    let ready = eventually(Duration::from_secs(30), || async {
        api.get("/readyz").await.status() == 200
    })
    .await;
    assert!(ready, "seckill over TLS never became ready");

    let product = api.live_product(1).await;
    assert_eq!(api.buy(7, product).await.status(), 202);
    let confirmed = eventually(Duration::from_secs(30), || async {
        let me: serde_json::Value = api.me(7, product).await.json().await.unwrap_or_default();
        me["status"] == "confirmed"
    })
    .await;
    assert!(confirmed, "the win never became an order");

    // Everything the app wrote to Redis went through the TLS port (it knows no other).
    let keys = redis.cli(&["--scan", "--pattern", &format!("{}:*", iso.prefix)]);
    assert!(!keys.is_empty(), "no keys under the app's prefix");

    // Every connection the app holds to its database is encrypted.
    let db = seckill::db::connect(&iso.database_url(), 1).await.unwrap();
    let by_tls = |ssl: bool| {
        format!(
            "select count(*) from pg_stat_ssl s join pg_stat_activity a using (pid) \
             where a.datname = '{}' and a.pid <> pg_backend_pid() and s.ssl = {ssl}",
            iso.database
        )
    };
    assert!(
        pg_count(&db, &by_tls(true)).await > 0,
        "no TLS connection of the app"
    );
    assert_eq!(
        pg_count(&db, &by_tls(false)).await,
        0,
        "a plain connection of the app"
    );
    let _ = db.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_certificate_nobody_vouches_for_is_refused() {
    let (_ca, redis, redis_url) = tls_redis().await;
    let iso = Isolation::new();
    // The system's roots, which do not include the test's CA.
    let mut app = Proc::start(&iso, "all", &[("SECKILL_REDIS_URL", &redis_url)]);
    let stopped = eventually(Duration::from_secs(30), || {
        let exited = app.child.try_wait().ok().flatten();
        async move { exited.is_some() }
    })
    .await;
    let keys = redis.cli(&["--scan", "--pattern", &format!("{}:*", iso.prefix)]);
    assert!(
        keys.is_empty(),
        "the app wrote to Redis without trusting it: {keys}"
    );
    assert!(stopped, "seckill kept running without reaching Redis");
    let status = app.child.wait().unwrap();
    assert!(!status.success(), "{status}");
}
