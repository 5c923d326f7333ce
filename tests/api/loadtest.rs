//! `seckill loadtest` against a running server: it sells out, verifies, and exits 0.

use seckill::startup::Role;

use crate::helpers::{SECRET_VARS, TestApp, seckill_command};

#[tokio::test(flavor = "multi_thread")]
async fn the_load_test_runs_a_sale_prints_figures_and_passes_its_checks() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let (http, admin) = (app.api.http.clone(), app.api.admin.clone());
    let out = tokio::task::spawn_blocking(move || {
        seckill_command()
            .args(["loadtest", "--target", &http, "--admin", &admin])
            .args([
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
            ])
            .envs(SECRET_VARS)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("req/s"), "{stdout}");
    assert!(stdout.contains("latency ms: p50"), "{stdout}");
    assert!(stdout.contains("PASS winners 25 <= stock 25"), "{stdout}");
    assert!(stdout.contains("PASS orders == winners"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    app.stop().await;
}
