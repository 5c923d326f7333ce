//! The RabbitMQ connection, kept alive in the background.
//!
//! The service starts (and answers `/readyz` with 503) while RabbitMQ is down; a supervisor
//! reconnects with backoff and publishes each new connection to whoever watches it (the relay,
//! the worker), so they re-create their channels after a broker restart.

use std::{sync::Arc, time::Duration};

use lapin::{Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Heartbeat (seconds) added to the URL unless it sets one.
const HEARTBEAT_SECS: u16 = 10;
/// A connection attempt gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A shared, self-healing AMQP connection.
#[derive(Clone)]
pub struct Broker {
    rx: watch::Receiver<Option<Arc<Connection>>>,
}

impl Broker {
    /// Starts the supervisor; returns at once (the first connection arrives in the background).
    pub fn start(url: &str, shutdown: CancellationToken) -> Self {
        let url = with_defaults(url);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(supervise(url, tx, shutdown));
        Self { rx }
    }

    /// The current connection, if one is up.
    pub fn current(&self) -> Option<Arc<Connection>> {
        self.rx
            .borrow()
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// Waits for a connected connection (or `None` when shutting down / timed out).
    pub async fn connected(&self, wait: Duration) -> Option<Arc<Connection>> {
        let mut rx = self.rx.clone();
        let found = tokio::time::timeout(wait, async {
            loop {
                if let Some(c) = rx
                    .borrow_and_update()
                    .as_ref()
                    .filter(|c| c.status().connected())
                {
                    return Some(c.clone());
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        found.ok().flatten()
    }

    /// A receiver that changes whenever a new connection is made.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Connection>>> {
        self.rx.clone()
    }
}

fn with_defaults(url: &str) -> String {
    let mut url = url.to_owned();
    let sep = if url.contains('?') { '&' } else { '?' };
    if !url.contains("heartbeat=") {
        url.push_str(&format!("{sep}heartbeat={HEARTBEAT_SECS}"));
    }
    url
}

async fn supervise(
    url: String,
    tx: watch::Sender<Option<Arc<Connection>>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let healthy = tx.borrow().as_ref().is_some_and(|c| c.status().connected());
        if !healthy {
            let attempt = tokio::time::timeout(
                CONNECT_TIMEOUT,
                Connection::connect(
                    &url,
                    ConnectionProperties::default().with_connection_name("seckill".into()),
                ),
            );
            tokio::select! {
                _ = shutdown.cancelled() => break,
                result = attempt => match result {
                    Ok(Ok(conn)) => {
                        tracing::info!("connected to RabbitMQ");
                        tx.send_replace(Some(Arc::new(conn)));
                        backoff = Duration::from_millis(100);
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "RabbitMQ connection failed; retrying in {backoff:?}"),
                    Err(_) => tracing::warn!("RabbitMQ connection timed out; retrying in {backoff:?}"),
                },
            }
            if tx.borrow().is_none()
                || !tx.borrow().as_ref().is_some_and(|c| c.status().connected())
            {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    let current = tx.send_replace(None);
    if let Some(conn) = current {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), conn.close(200, "shutdown".into())).await;
    }
}
