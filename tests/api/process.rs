//! The real `seckill` binary: configuration errors and signals.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use seckill::config::VARS;

use crate::helpers::{Api, Isolation, Proc, free_port, seckill_command};

fn isolated(iso: &Isolation) -> Command {
    let mut cmd = seckill_command();
    cmd.env("SECKILL_DEV", "1")
        .env("SECKILL_HTTP_ADDR", "127.0.0.1:0")
        .env("SECKILL_ADMIN_ADDR", "127.0.0.1:0")
        .env("SECKILL_DATABASE_URL", iso.database_url())
        .env("SECKILL_REDIS_PREFIX", &iso.prefix)
        .env("SECKILL_AMQP_QUEUE", &iso.queue)
        .env("RUST_LOG", "info");
    cmd
}

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_without_a_jwt_secret_fails_with_one_line_naming_it() {
    let out = seckill_command().arg("serve").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("SECKILL_JWT_SECRET"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_bad_value_fails_with_one_line_naming_the_variable() {
    let out = seckill_command()
        .arg("serve")
        .env("SECKILL_DEV", "1")
        .env("SECKILL_PRODUCT_RATE", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("SECKILL_PRODUCT_RATE"), "{stderr}");
}

#[test]
fn development_mode_on_a_public_address_exits_2_naming_the_variable() {
    let out = seckill_command()
        .arg("serve")
        .env("SECKILL_DEV", "1")
        .env("SECKILL_HTTP_ADDR", "0.0.0.0:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("SECKILL_HTTP_ADDR: 0.0.0.0:0 is not a loopback address"),
        "{stderr}"
    );
}

#[test]
fn help_explains_every_subcommand() {
    let out = seckill_command().arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["all", "serve", "worker", "migrate"] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn help_lists_every_variable_with_its_default() {
    let out = seckill_command().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for var in VARS {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{} ", var.name)))
            .unwrap_or_else(|| panic!("{} is not in --help:\n{text}", var.name));
        assert!(line.contains(var.default_text()), "{line}");
    }
    assert!(text.contains("[default: 127.0.0.1:8082]"), "{text}");
    // The short help points to the long one.
    let out = seckill_command().arg("-h").output().unwrap();
    let short = String::from_utf8(out.stdout).unwrap();
    assert!(short.contains("--help"), "{short}");
}

#[test]
fn version_names_the_package_version_and_the_git_commit() {
    let out = seckill_command().arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8(out.stdout).unwrap();
    let prefix = format!("seckill {} (commit ", env!("CARGO_PKG_VERSION"));
    let commit = line
        .strip_suffix(")\n")
        .and_then(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{line:?}"));
    assert!(
        commit == "unknown"
            || (commit.len() >= 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{line:?}"
    );
    assert_eq!(commit, seckill::build_info::COMMIT);
    // Built from this checkout (unless the build was told a commit): its HEAD.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    if let Ok(head) = head
        && head.status.success()
        && std::env::var_os("GIT_COMMIT").is_none()
    {
        assert_eq!(commit, String::from_utf8(head.stdout).unwrap().trim());
    }
}

/// `GET url` answers 200.
async fn answers(url: &str) -> bool {
    let client = seckill::tls::http_client()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    client
        .get(url)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_listens_on_its_own_address_beside_a_serve_with_the_same_admin_address() {
    let iso = Isolation::new();
    let serve = Proc::start(&iso, "serve", &[]);
    serve.wait_healthy().await;
    // As on one host with default settings: the same SECKILL_ADMIN_ADDR, which serve holds.
    let admin = serve.api().admin.trim_start_matches("http://").to_owned();
    let worker_addr = format!("127.0.0.1:{}", free_port());
    let mut worker = Proc::start(
        &iso,
        "worker",
        &[
            ("SECKILL_ADMIN_ADDR", &admin),
            ("SECKILL_WORKER_ADDR", &worker_addr),
        ],
    );
    let mut up = false;
    for _ in 0..300 {
        if answers(&format!("http://{worker_addr}/healthz")).await {
            up = true;
            break;
        }
        assert!(
            worker.child.try_wait().unwrap().is_none(),
            "the worker exited (did it bind SECKILL_ADMIN_ADDR?)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the worker never answered on SECKILL_WORKER_ADDR");
    assert!(answers(&format!("http://{worker_addr}/metrics")).await);
    assert!(answers(&format!("{}/healthz", serve.api().admin)).await);
    assert!(worker.child.try_wait().unwrap().is_none());
    let t0 = Instant::now();
    sigterm(worker.child.id());
    let status = wait_exit(&mut worker.child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// The first `503` of `/readyz` after a SIGTERM; fails the test if none comes within `limit`.
async fn until_draining(api: &Api, limit: Duration) -> reqwest::Response {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let res = api.get("/readyz").await;
        if res.status() == 503 {
            return res;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/readyz never answered 503 within {limit:?} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_turns_readyz_to_draining_closes_event_streams_and_exits_zero() {
    let iso = Isolation::new();
    let grace = Duration::from_millis(2_000);
    let timeout = Duration::from_secs(8);
    let mut serve = Proc::start(
        &iso,
        "serve",
        &[
            ("SECKILL_DRAIN_GRACE_MS", "2000"),
            ("SECKILL_DRAIN_TIMEOUT_SECS", "8"),
        ],
    );
    serve.wait_healthy().await;
    let api = serve.api().clone();
    let product = api.live_product(5).await;
    assert_eq!(api.buy(1, product).await.status(), 202);
    let mut events = api.me_events(1, product).await;
    assert_eq!(events.status(), 200);
    let first = events.chunk().await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&first).contains("event: status"),
        "{first:?}"
    );

    let t0 = Instant::now();
    sigterm(serve.child.id());

    // Not ready at once, on both listeners, while everything else is still served.
    let res = until_draining(&api, grace / 2).await;
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "draining", "{body}");
    let admin_ready = api
        .client
        .get(format!("{}/readyz", api.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(admin_ready.status(), 503);
    assert_eq!(api.get("/healthz").await.status(), 200);
    assert_eq!(api.me(1, product).await.status(), 200);
    assert!(t0.elapsed() < grace, "the checks took the whole grace");

    // The open stream gets a last event, then ends (not cut), after the grace.
    let mut rest = String::new();
    loop {
        match events.chunk().await {
            Ok(Some(bytes)) => rest.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(None) => break,
            Err(e) => panic!("the stream was cut: {e}; it had sent {rest:?}"),
        }
    }
    let closed_at = t0.elapsed();
    assert!(closed_at >= grace, "closed during the grace: {closed_at:?}");
    let close = rest
        .split("\n\n")
        .find(|event| event.starts_with("event: close"))
        .unwrap_or_else(|| panic!("no close event: {rest:?}"));
    let data = close
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    let data: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["reason"], "shutting_down");
    let retry: u64 = close
        .lines()
        .find_map(|l| l.strip_prefix("retry: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((1_000..=5_000).contains(&retry), "{retry}");

    let status = wait_exit(&mut serve.child, timeout);
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < timeout, "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_exits_at_once_without_waiting_for_the_drain() {
    let iso = Isolation::new();
    // A drain that would take 30 s: the grace alone is 20 s.
    let mut serve = Proc::start(
        &iso,
        "serve",
        &[
            ("SECKILL_DRAIN_GRACE_MS", "20000"),
            ("SECKILL_DRAIN_TIMEOUT_SECS", "30"),
        ],
    );
    serve.wait_healthy().await;
    let api = serve.api().clone();
    sigterm(serve.child.id());
    until_draining(&api, Duration::from_secs(5)).await;
    // Still draining: it serves, and would for the rest of its grace.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.get("/healthz").await.status(), 200);
    let t1 = Instant::now();
    sigterm(serve.child.id());
    let status = wait_exit(&mut serve.child, Duration::from_secs(5));
    assert!(t1.elapsed() < Duration::from_secs(5), "{:?}", t1.elapsed());
    // Not a clean exit: the drain was cut short on purpose.
    assert_eq!(status.code(), Some(1), "{status:?}");
}

#[test]
fn sigterm_while_idle_exits_zero_within_5_seconds() {
    let iso = Isolation::new();
    let mut child = isolated(&iso)
        .arg("all")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the start-up line.
    let stdout = child.stdout.take().unwrap();
    let started = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("seckill started"))
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    sigterm(child.id());
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(started.join().unwrap(), "never logged its start");
}

#[test]
fn sigterm_during_start_up_exits_zero_within_5_seconds() {
    let iso = Isolation::new();
    let mut child = isolated(&iso)
        .arg("all")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Past exec and the runtime's start (a loaded machine needs more than a few ms for that;
    // a SIGTERM before the handler exists kills the process by the signal), well before the
    // database is created and migrated.
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    sigterm(child.id());
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn migrate_exits_zero_and_can_run_twice() {
    let iso = Isolation::new();
    for _ in 0..2 {
        let out = isolated(&iso).arg("migrate").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The queues are declared too, before any process starts.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (conn, ch) = crate::helpers::amqp_channel().await.unwrap();
        for queue in [iso.queue.clone(), format!("{}.dlq", iso.queue)] {
            crate::helpers::passive_declare(&ch, &queue)
                .await
                .unwrap_or_else(|e| panic!("{queue} not declared by migrate: {e}"));
        }
        let _ = conn.close(200, "bye".into()).await;
    });
}

#[test]
fn dev_token_is_refused_outside_development_mode() {
    let out = seckill_command()
        .args(["dev-token", "--user", "42"])
        .env("SECKILL_JWT_SECRET", crate::helpers::JWT_SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("SECKILL_DEV=1"), "{stderr}");
}

#[tokio::test]
async fn dev_token_signs_a_jwt_the_server_accepts_for_that_user() {
    let app = crate::helpers::TestApp::spawn().await;
    let product = app.api.live_product(5).await;
    let out = seckill_command()
        .args(["dev-token", "--user", "4242"])
        .env("SECKILL_DEV", "1")
        .env("SECKILL_JWT_SECRET", crate::helpers::JWT_SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let jwt = String::from_utf8(out.stdout).unwrap();
    let me = |token: String| {
        app.api
            .client
            .get(format!(
                "{}/api/v1/products/{product}/reservations/me",
                app.api.http
            ))
            .bearer_auth(token)
            .send()
    };
    // Known as user 4242, who has no reservation (not 401).
    let res = me(jwt.trim().to_owned()).await.unwrap();
    assert_eq!(res.status(), 404);
    let won = app.api.buy(4242, product).await;
    assert_eq!(won.status(), 202);
    let res = me(jwt.trim().to_owned()).await.unwrap();
    assert_eq!(res.status(), 200, "the token names user 4242");
    app.stop().await;
}

/// Starts `seckill all` against a queue no one declared yet, waits until its consumers consume,
/// stops it and returns what it logged before the shutdown signal (JSON lines).
fn first_start_log(iso: &Isolation, queue: &str) -> Vec<String> {
    use std::io::BufRead;
    let mut child = isolated(iso)
        .arg("all")
        .env("SECKILL_AMQP_QUEUE", queue)
        .env("SECKILL_LOG_FORMAT", "json")
        .env("SECKILL_WORKER_CONSUMERS", "4")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let consuming = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("worker consuming"))
            .count()
    };
    while consuming(&lines) < 4 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(line);
        }
    }
    // Whatever a late failure would log (lapin logs the broker's close as it reads it).
    std::thread::sleep(Duration::from_millis(500));
    sigterm(child.id());
    let status = wait_exit(&mut child, Duration::from_secs(10));
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    assert!(status.success(), "{status:?}\n{}", lines.join("\n"));
    let shutdown = lines
        .iter()
        .position(|l| l.contains("shutdown signal received"))
        .unwrap_or(lines.len());
    lines.truncate(shutdown);
    assert!(
        consuming(&lines) >= 4,
        "never consumed:\n{}",
        lines.join("\n")
    );
    lines
}

#[test]
fn a_first_start_against_a_fresh_quorum_queue_logs_no_amqp_error() {
    // RabbitMQ 3.10 answers a `basic.consume` that reaches a new quorum queue before its
    // process exists with 541 INTERNAL_ERROR, closing the whole connection (issue 14).
    // The race is intermittent: try several fresh queues.
    let iso = Isolation::new();
    let out = isolated(&iso).arg("migrate").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut failed = Vec::new();
    for round in 0..6 {
        let queue = format!("{}.fresh{round}", iso.queue);
        let lines = first_start_log(&iso, &queue);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(crate::services::delete_queues(&queue));
        let bad: Vec<&String> = lines
            .iter()
            .filter(|l| {
                l.contains(r#""level":"ERROR""#)
                    || l.contains("consumer stopped")
                    || l.contains("RabbitMQ connection failed")
            })
            .collect();
        if !bad.is_empty() {
            failed.push(format!("round {round}: {bad:#?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 6 first starts logged AMQP trouble:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// `SECKILL_MIGRATE=0` (a runtime role without DDL rights): against a database nobody migrated
/// the process refuses to start, exit 2, naming the setting and the missing migrations; once
/// `seckill migrate` ran, it starts without touching the schema.
#[tokio::test(flavor = "multi_thread")]
async fn serve_with_migrate_0_checks_the_schema_instead_of_changing_it() {
    let iso = Isolation::new();
    let migrate = || {
        let out = seckill_command()
            .arg("migrate")
            .env("SECKILL_DATABASE_URL", iso.database_url())
            .env("SECKILL_AMQP_QUEUE", &iso.queue)
            .env("SECKILL_DEV", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    migrate();
    // Take the last migration back out, as if this binary were newer than the schema.
    let db = seckill::db::connect(&iso.database_url(), 1).await.unwrap();
    let last: String = {
        use sea_orm::ConnectionTrait;
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "delete from seaql_migrations where version = (select max(version) from seaql_migrations) returning version",
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get_by_index(0).unwrap()
    };
    let _ = db.close().await;

    let refused = seckill_command()
        .arg("serve")
        .envs(iso.vars("127.0.0.1:0", "127.0.0.1:0"))
        .env("SECKILL_MIGRATE", "0")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("SECKILL_MIGRATE"), "{said}");
    assert!(said.contains(&last), "{said}");

    migrate();
    let mut app = Proc::start(&iso, "serve", &[("SECKILL_MIGRATE", "0")]);
    app.wait_healthy().await;
    app.kill9();
}

/// Postgres unreachable at start: one line naming the variable, where (never the password) and
/// why — refused here — and no backtrace even with `RUST_BACKTRACE=1`.
#[test]
fn postgres_unreachable_at_start_is_one_line_naming_the_variable_and_the_cause() {
    let port = free_port();
    let out = seckill_command()
        .arg("migrate")
        .env("SECKILL_DEV", "1")
        .env(
            "SECKILL_DATABASE_URL",
            format!("postgres://postgres:hunter2-secret@127.0.0.1:{port}/seckill_nowhere"),
        )
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("SECKILL_DATABASE_URL"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("connection refused"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        !stdout.contains("stack backtrace") && !stdout.contains("hunter2"),
        "{stdout}"
    );
}
