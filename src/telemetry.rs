//! Builds the tracing subscriber: JSON lines in production, pretty text in development.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// The log directive that silences actix's per-connection errors caused by clients.
const QUIET_CLIENT_ERRORS: &str = "actix_http::h1::dispatcher=off";

/// Postgres' notices ("relation \"seaql_migrations\" already exists, skipping", at every start)
/// read as errors; they are routine: shown from `warn` up only.
const QUIET_NOTICES: &str = "sqlx::postgres::notice=warn";

/// Installs the global subscriber once; `RUST_LOG` is respected (default `info`).
pub fn init(pretty: bool) {
    let default = crate::config::var("RUST_LOG")
        .map(|v| v.default_text())
        .unwrap_or("info");
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // actix logs every malformed request (a bad header, a broken body) at ERROR: a client must
    // not be able to flood the logs with error lines, and actix answers them 400 itself.
    // `RUST_LOG=actix_http=…` brings them back.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("actix_http"))
        && let Ok(directive) = QUIET_CLIENT_ERRORS.parse()
    {
        filter = filter.add_directive(directive);
    }
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("sqlx"))
        && let Ok(directive) = QUIET_NOTICES.parse()
    {
        filter = filter.add_directive(directive);
    }
    let registry = tracing_subscriber::registry().with(filter);
    let result = if pretty {
        registry.with(fmt::layer().with_target(false)).try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init()
    };
    // A second init (tests spawning several apps) keeps the first subscriber.
    let _ = result;
}
