//! `seckill loadtest` against a running server: it sells out, verifies, and exits 0.

use seckill::startup::Role;

use crate::helpers::{SECRET_VARS, TestApp, seckill_command};

#[tokio::test(flavor = "multi_thread")]
async fn the_load_test_runs_a_sale_prints_figures_and_passes_its_checks() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let stdout = loadtest_passes(
        &app,
        &[
            "--stock",
            "25",
            "--users",
            "300",
            "--concurrency",
            "16",
            "--duration",
            "2s",
            "--starts-in",
            "500ms",
        ],
    )
    .await;
    assert!(stdout.contains("req/s"), "{stdout}");
    assert!(stdout.contains("latency ms: p50"), "{stdout}");
    assert!(stdout.contains("PASS winners 25 <= stock 25"), "{stdout}");
    assert!(
        stdout.contains("every unit an order "),
        "a sale that sold out says when every unit was an order: {stdout}"
    );
    assert!(stdout.contains("PASS orders == winners"), "{stdout}");
    app.stop().await;
}

/// Runs `seckill loadtest` against `app` with `args`; its stdout, after asserting it passed.
async fn loadtest_passes(app: &TestApp, args: &[&str]) -> String {
    let (http, admin) = (app.api.http.clone(), app.api.admin.clone());
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        seckill_command()
            .args(["loadtest", "--target", &http, "--admin", &admin])
            .args(&args)
            .envs(SECRET_VARS)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_loop_of_first_attempts_wins_every_one_and_accounts_for_every_send() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    // 300 attempts offered at 200/s: every one due is either sent or counted as not sent, and
    // each one sent is a distinct shopper's first attempt, so each one wins.
    let stdout = loadtest_passes(
        &app,
        &[
            "--winners",
            "--requests",
            "300",
            "--rate",
            "200",
            "--concurrency",
            "32",
            "--duration",
            "5s",
            "--starts-in",
            "500ms",
        ],
    )
    .await;
    assert!(
        stdout.contains("open loop at 200 req/s, at most 32 in flight"),
        "{stdout}"
    );
    assert!(
        stdout.contains("latency ms (from each send's scheduled time): p50"),
        "{stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("open loop: "))
        .unwrap_or_else(|| panic!("no open-loop line: {stdout}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (due, sent, dropped) = (n[0], n[1], n[2]);
    assert_eq!(due, 300, "{line}");
    assert_eq!(sent + dropped, due, "{line}");
    assert!(
        stdout.contains(&format!("PASS every attempt won, each a distinct shopper's first ({sent} of {sent} answers were 202")),
        "{stdout}"
    );
    assert!(stdout.contains("PASS orders == winners"), "{stdout}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_loop_of_first_attempts_wins_every_one() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let stdout = loadtest_passes(
        &app,
        &[
            "--winners",
            "--requests",
            "200",
            "--concurrency",
            "8",
            // The count ends the run; the duration only bounds it (a busy machine is slow).
            "--duration",
            "60s",
            "--starts-in",
            "500ms",
        ],
    )
    .await;
    assert!(stdout.contains("closed loop, 8 connections"), "{stdout}");
    assert!(stdout.contains("stock 200, 200 users"), "{stdout}");
    assert!(
        stdout.contains("PASS every attempt won, each a distinct shopper's first (200 of 200"),
        "{stdout}"
    );
    assert!(stdout.contains("PASS winners 200 <= stock 200"), "{stdout}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_load_tests_room_mode_measures_the_waiting_and_every_stream_hears_sold_out() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let pid = std::process::id().to_string();
    let stdout = loadtest_passes(
        &app,
        &[
            "--mode",
            "room",
            "--stock",
            "10",
            "--users",
            "200",
            "--streams",
            "100",
            "--concurrency",
            "32",
            "--starts-in",
            "5s",
            "--duration",
            "4s",
            "--server-pid",
            &pid,
            "--redis-url",
            "redis://127.0.0.1:6379",
        ],
    )
    .await;
    assert!(stdout.contains("100 streams open"), "{stdout}");
    for figure in [
        "waiting (before the start): ",
        "sale (from the start): ",
        "µs per waiting shopper per second",
        "commands/s",
        "PASS winners 10 <= stock 10",
        "PASS every waiting stream heard sold out within a second of the last win",
    ] {
        assert!(stdout.contains(figure), "no {figure:?} in\n{stdout}");
    }
    app.stop().await;
}
