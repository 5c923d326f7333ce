//! What `/metrics` tells an operator beyond the pipeline's own figures: the process (CPU,
//! memory, file descriptors), the build, and whether each dependency answers — the series the
//! dashboard and the alert rules in `deploy/` read.

use std::time::Duration;

use seckill::{build_info, startup::Role};

use crate::helpers::{Api, TestApp, eventually};

async fn metrics(api: &Api) -> String {
    let res = api.get_admin("/metrics").await;
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

/// The sample lines of `name` (exactly that metric, with or without labels).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operators_metrics_carry_the_process_and_the_build_it_runs() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;

    let text = metrics(&app.api).await;

    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        let lines = samples(&text, name);
        assert_eq!(lines.len(), 1, "{name}: {lines:?}\n{text}");
        let value: f64 = lines[0].rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value >= 0.0, "{}", lines[0]);
    }
    let rss: f64 = samples(&text, "process_resident_memory_bytes")[0]
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rss > 1_000_000.0,
        "a running process holds more than 1 MB: {rss}"
    );
    assert_eq!(
        samples(&text, "seckill_build_info"),
        [format!(
            "seckill_build_info{{commit=\"{}\",version=\"{}\"}} 1",
            build_info::COMMIT,
            env!("CARGO_PKG_VERSION")
        )]
    );
    let commit = build_info::COMMIT;
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{commit}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workers_metrics_say_every_dependency_is_ready() {
    let app = TestApp::spawn_with(Role::Worker, &[]).await;

    // The RabbitMQ connection is made in the background: a scrape checks again (at most once a
    // second), so the gauge follows without anything polling /readyz.
    let all_ready = eventually(Duration::from_secs(10), || async {
        let text = metrics(&app.api).await;
        ["redis", "rabbitmq", "postgres"]
            .iter()
            .all(|d| text.contains(&format!("seckill_dependency_ready{{dependency=\"{d}\"}} 1")))
    })
    .await;

    assert!(all_ready, "{}", metrics(&app.api).await);
    assert_eq!(
        samples(&metrics(&app.api).await, "process_open_fds").len(),
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dependency_that_does_not_answer_is_0_in_dependency_ready() {
    let app = TestApp::spawn_with(
        Role::Serve,
        &[("SECKILL_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    )
    .await;

    let text = metrics(&app.api).await;

    for (dependency, value) in [("rabbitmq", 0), ("redis", 1), ("postgres", 1)] {
        let line = format!("seckill_dependency_ready{{dependency=\"{dependency}\"}} {value}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    app.stop().await;
}
