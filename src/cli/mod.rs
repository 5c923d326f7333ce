//! Command line: one binary; the roles, migrations, the load test and the operators' DLQ tools.

// `seckill loadtest`: a client of the service, not part of it, so it lives behind the CLI
// only (not in the library's public modules). It stays a subcommand of the one binary the
// design names rather than a second one in `src/bin/`: one build, one `--help`, and it reads
// the same settings (the dev secrets it signs shoppers' JWTs with).
mod loadtest;

use std::{io::Write, process::ExitCode, sync::LazyLock};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{ConfigError, Settings},
    domain::UserId,
    startup::{Application, Role},
};

/// seckill — flash-sale reservation service.
///
/// Configuration comes from SECKILL_* environment variables (`seckill --help` lists them).
#[derive(Debug, Parser)]
#[command(
    name = "seckill",
    version = version(),
    about,
    long_about = None,
    after_help = "Configuration: SECKILL_* environment variables; `seckill --help` lists them with their defaults.",
    after_long_help = crate::config::help(),
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Migrations, API, outbox relay, order worker and expiry sweeper in one process.
    #[command(after_help = crate::config::help())]
    All,
    /// The shoppers' and operators' HTTP API plus the outbox relay.
    #[command(after_help = crate::config::help())]
    Serve,
    /// The order persister (RabbitMQ → Postgres) plus the expiry sweeper.
    #[command(after_help = crate::config::help())]
    Worker,
    /// Create the database if missing, apply migrations, exit.
    #[command(after_help = crate::config::help())]
    Migrate,
    /// Run a whole flash sale against a running server and verify the guarantees.
    Loadtest(loadtest::LoadtestArgs),
    /// Print a shopper's JWT signed with SECKILL_JWT_SECRET, to try a sale by hand
    /// (development mode only, SECKILL_DEV=1: in production the storefront's login issues them).
    DevToken {
        /// The shopper's user id (a positive integer).
        #[arg(long, value_parser = parse_user)]
        user: UserId,
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Inspect or replay the dead-letter queue (`<SECKILL_AMQP_QUEUE>.dlq`).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inspect or send again the order events (the exchange and the webhook).
    #[command(subcommand)]
    Events(EventsCommand),
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print order events as JSON lines, newest first: type, order's reservation and sequence,
    /// when published to the exchange and delivered to the webhook, attempts, last error.
    List {
        /// Only this product's events.
        #[arg(long)]
        product: Option<i64>,
        /// Only events not yet published (or, with a webhook set, not yet delivered).
        #[arg(long)]
        undelivered: bool,
        /// Print at most this many (1 to 10,000).
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Send events again, to the exchange and the webhook, with their ids unchanged (so
    /// receivers that saw them deduplicate): one event, or every event of a product since a
    /// moment.
    Replay {
        /// One event's id.
        #[arg(long, conflicts_with_all = ["product", "since"])]
        id: Option<uuid::Uuid>,
        /// Every event of this product (with --since).
        #[arg(long, requires = "since")]
        product: Option<i64>,
        /// Created at or after this moment (RFC 3339, e.g. 2026-12-07T10:00:00Z).
        #[arg(long, requires = "product")]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Print dead-lettered messages as JSON lines (`{"body": …, "reason": …}`), leaving them
    /// in the queue.
    List {
        /// Print at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move dead-lettered messages back to the orders queue (each confirmed by the broker
    /// before it leaves the DLQ) for the worker to try again.
    Replay {
        /// Move at most this many (default: every message the DLQ holds when it starts).
        #[arg(long)]
        limit: Option<usize>,
    },
}

/// What `seckill --version` prints after the name: `0.1.0 (commit 0123456789ab)`.
fn version() -> &'static str {
    static LINE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "{} (commit {})",
            crate::build_info::VERSION,
            crate::build_info::COMMIT
        )
    });
    LINE.as_str()
}

/// Runs the parsed command; the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("seckill: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let role = match cli.command {
        Command::All => Some(Role::All),
        Command::Serve => Some(Role::Serve),
        Command::Worker => Some(Role::Worker),
        Command::Migrate => None,
        Command::Loadtest(args) => return loadtest(args, &settings),
        Command::Dlq(command) => return dlq(command, &settings),
        Command::Events(command) => return events(command, &settings),
        Command::DevToken { user, ttl_secs } => return dev_token(user, ttl_secs, &settings),
    };
    if role.is_some_and(|r| r.serves_http())
        && let Err(e) = settings.secrets()
    {
        eprintln!("seckill: configuration error: {e}");
        return ExitCode::from(2);
    }
    crate::telemetry::init(settings.log_pretty);
    if settings.dev {
        tracing::warn!(
            "SECKILL_DEV=1: using fixed DEVELOPMENT secrets for any of SECKILL_JWT_SECRET, SECKILL_ADMIN_TOKEN, SECKILL_TOKEN_SECRET left unset — never run like this in production"
        );
        for var in settings.dev_secrets_filled() {
            tracing::warn!(
                variable = var,
                "SECKILL_DEV=1: {var} is unset, using its fixed DEVELOPMENT value"
            );
        }
    }
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        match role {
            None => migrate(&settings).await,
            Some(role) => {
                let app = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    app = Application::build(settings, role, shutdown.clone()) => app?,
                };
                tracing::info!(
                    ?role,
                    http_port = app.http_port(),
                    admin_port = app.admin_port(),
                    worker_port = app.worker_port(),
                    "seckill started"
                );
                app.run_until_stopped().await
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A setting Redis does not honour (SECKILL_REDIS_DURABILITY) is bad configuration too.
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            tracing::error!(error = %e, "seckill refused to start");
            eprintln!("seckill: configuration error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "seckill failed");
            eprintln!("seckill: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn loadtest(args: loadtest::LoadtestArgs, settings: &Settings) -> ExitCode {
    let secrets = match settings.secrets() {
        Ok(s) => s.clone(),
        Err(e) => {
            eprintln!("seckill: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(loadtest::run(args, &secrets)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("seckill loadtest: a guarantee check failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("seckill loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_user(s: &str) -> Result<UserId, String> {
    UserId::try_from(s).map_err(|e| e.to_string())
}

/// `seckill dev-token`: the JWT on stdout; refused (exit 2) outside development mode.
fn dev_token(user: UserId, ttl_secs: u64, settings: &Settings) -> ExitCode {
    match crate::auth::dev_user_jwt(settings, user, std::time::Duration::from_secs(ttl_secs)) {
        None => {
            eprintln!(
                "seckill dev-token: only in development mode (SECKILL_DEV=1); in production shoppers' JWTs come from the storefront's login"
            );
            ExitCode::from(2)
        }
        Some(Ok(jwt)) => {
            println!("{jwt}");
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            eprintln!("seckill dev-token: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `seckill dlq …`: JSON lines (or a summary) on stdout, errors on stderr.
fn dlq(command: DlqCommand, settings: &Settings) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let (url, queue) = (settings.amqp_url.as_str(), settings.amqp_queue.as_str());
    let result = runtime.block_on(async {
        match command {
            DlqCommand::List { limit } => {
                let mut out = std::io::stdout().lock();
                for dead in crate::dlq::list(url, queue, limit).await? {
                    writeln!(out, "{}", serde_json::to_string(&dead)?)?;
                }
            }
            DlqCommand::Replay { limit } => {
                let moved = crate::dlq::replay(url, queue, limit).await?;
                let dlq = crate::amqp::dlq_name(queue);
                writeln!(
                    std::io::stdout(),
                    "replayed {moved} message(s) from {dlq} to {queue}"
                )?;
            }
        }
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seckill dlq: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `seckill events …`: JSON lines (or a summary) on stdout, errors on stderr.
fn events(command: EventsCommand, settings: &Settings) -> ExitCode {
    use crate::order_events::{ListFilter, ReplaySelection};
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let db = crate::db::connect(&settings.database_url, 2).await?;
        match command {
            EventsCommand::List {
                product,
                undelivered,
                limit,
            } => {
                let filter = ListFilter {
                    product,
                    undelivered,
                    webhook: settings.webhook.is_some(),
                    limit,
                };
                let mut out = std::io::stdout().lock();
                for row in crate::order_events::list(&db, &filter).await? {
                    writeln!(out, "{}", serde_json::to_string(&row)?)?;
                }
            }
            EventsCommand::Replay { id, product, since } => {
                let which = match (id, product, since) {
                    (Some(id), _, _) => ReplaySelection::One(id),
                    (None, Some(p), Some(since)) => ReplaySelection::ProductSince(p, since),
                    _ => anyhow::bail!("give --id, or --product with --since"),
                };
                let n = crate::order_events::replay(&db, &which).await?;
                writeln!(std::io::stdout(), "{n} event(s) will be sent again")?;
            }
        }
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seckill events: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The multi-threaded tokio runtime, or the exit code for failing to build one.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("seckill: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Cancels `token` on SIGTERM or ctrl-c; a second one exits the process at once (code 1),
/// without waiting for the drain: an operator who asks twice means now.
async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(not(unix))]
    let mut term = None;
    next_signal(&mut term).await;
    tracing::info!("shutdown signal received");
    token.cancel();
    next_signal(&mut term).await;
    tracing::warn!("second shutdown signal: exiting now, without finishing the drain");
    std::process::exit(1);
}

/// The next SIGTERM (when it can be watched) or ctrl-c.
#[cfg(unix)]
async fn next_signal(term: &mut Option<tokio::signal::unix::Signal>) {
    match term {
        Some(term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The next ctrl-c.
#[cfg(not(unix))]
async fn next_signal(_: &mut Option<()>) {
    let _ = tokio::signal::ctrl_c().await;
}

/// `seckill migrate`: the database's migrations, then the RabbitMQ queues, declared once
/// before any process starts (processes that start together against a new quorum queue can
/// race its creation; see [`crate::amqp::declare_topology`]). A RabbitMQ that does not answer
/// only warns: every process declares the queues itself too.
async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    crate::db::migrate(&settings.database_url).await?;
    let stop = CancellationToken::new();
    let broker = crate::amqp::Broker::start(&settings.amqp_url, stop.clone());
    let declared = match broker.connected(std::time::Duration::from_secs(10)).await {
        Some(conn) => async {
            crate::amqp::declare_topology(&conn, &settings.amqp_queue).await?;
            crate::order_events::publish::declare_exchange(&conn, &settings.events_exchange).await
        }
        .await
        .map_err(anyhow::Error::from),
        None => Err(anyhow::anyhow!("RabbitMQ did not answer within 10 s")),
    };
    stop.cancel();
    match declared {
        Ok(()) => {
            tracing::info!(queue = %settings.amqp_queue, exchange = %settings.events_exchange, "queues and the events exchange declared")
        }
        Err(e) => tracing::warn!(
            error = %format!("{e:#}"),
            "could not declare the RabbitMQ queues (SECKILL_AMQP_URL); the processes will declare them as they start"
        ),
    }
    Ok(())
}
