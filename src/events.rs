//! Cross-process notifications over Redis pub/sub (`<prefix>:events`): `stock:<id>` clears the
//! sold-out cache; `status:<product>:<user>` wakes that shopper's SSE streams.

use std::{sync::Arc, time::Duration};

use fred::{
    clients::SubscriberClient,
    prelude::*,
    types::{Message, config::Server},
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    config::RedisSettings,
    keys::Keys,
    soldout::{Recovering, SoldOutCache},
};

/// Fans pub/sub messages out inside this process.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<str>>,
}

impl Events {
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(4_096).0,
        }
    }

    /// Every message received from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

/// A live subscription, ready to be driven by [`Listener::run`].
pub struct Listener {
    client: SubscriberClient,
    messages: broadcast::Receiver<Message>,
    reconnects: broadcast::Receiver<Server>,
    errors: broadcast::Receiver<(fred::error::Error, Option<Server>)>,
    resubscribe: tokio::task::JoinHandle<()>,
    soldout: Arc<SoldOutCache>,
    recovering: Arc<Recovering>,
    events: Events,
}

/// Subscribes before returning, so the process starts with its sold-out cache live.
pub async fn listen(
    settings: &RedisSettings,
    keys: &Keys,
    soldout: Arc<SoldOutCache>,
    recovering: Arc<Recovering>,
    events: Events,
) -> anyhow::Result<Listener> {
    let client = crate::redis::subscriber(settings, Duration::from_secs(5)).await?;
    let messages = client.message_rx();
    let reconnects = client.reconnect_rx();
    let errors = client.error_rx();
    let resubscribe = client.manage_subscriptions();
    client.subscribe(keys.events()).await?;
    soldout.set_listening(true);
    Ok(Listener {
        client,
        messages,
        reconnects,
        errors,
        resubscribe,
        soldout,
        recovering,
        events,
    })
}

impl Listener {
    /// Dispatches until shutdown. The sold-out cache is trusted only while the subscription is
    /// up; after a reconnect (or a lagging receiver) it starts empty.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let soldout = &self.soldout;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = self.messages.recv() => match msg {
                    Ok(m) => {
                        if let Some(text) = m.value.as_str() {
                            soldout.on_event(&text);
                            self.recovering.on_event(&text);
                            let _ = self.events.tx.send(Arc::from(text.as_ref()));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        soldout.set_listening(false);
                        soldout.set_listening(true);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Ok(_) = self.errors.recv() => soldout.set_listening(false),
                Ok(_) = self.reconnects.recv() => {
                    // Anything published while we were away is lost: forget, then trust again.
                    soldout.set_listening(false);
                    soldout.set_listening(true);
                }
            }
        }
        soldout.set_listening(false);
        self.resubscribe.abort();
        self.client.quit().await.ok();
        Ok(())
    }
}
