//! The real `seckill` binary: configuration errors and signals.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::helpers::{Isolation, seckill_command};

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
