//! Cross-process notifications over Redis pub/sub (`<prefix>:events`): `stock:<id>` clears the
//! sold-out cache; `status:<product>:<user>` wakes that shopper's SSE streams (and tells the
//! waiting rooms' copy to read that shopper again: a winner's admission is over).

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
    domain::{ProductId, UserId},
    keys::Keys,
    soldout::{Recovering, SoldOutCache},
    sse::{RESYNC_SPREAD, SseStreams},
};

/// The `(product, user)` a `status:<product>:<user>` message is about (`None` for any other
/// message, or one whose ids are not valid).
pub fn status_target(message: &str) -> Option<(ProductId, UserId)> {
    let (product, user) = message.strip_prefix("status:")?.split_once(':')?;
    Some((
        ProductId::try_from(product).ok()?,
        UserId::try_from(user).ok()?,
    ))
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
    sse: Arc<SseStreams>,
    rooms: Option<crate::room::Rooms>,
}

/// Subscribes before returning, so the process starts with its sold-out cache live.
pub async fn listen(
    settings: &RedisSettings,
    keys: &Keys,
    soldout: Arc<SoldOutCache>,
    recovering: Arc<Recovering>,
    sse: Arc<SseStreams>,
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
        sse,
        rooms: None,
    })
}

impl Listener {
    /// The waiting rooms whose copy of a shopper a status message makes stale.
    pub fn with_rooms(mut self, rooms: crate::room::Rooms) -> Self {
        self.rooms = Some(rooms);
        self
    }

    /// Dispatches until shutdown: `stock:` messages to the sold-out memory, each `status:`
    /// message to the streams of its product and user only. The sold-out cache is trusted only
    /// while the subscription is up; after a reconnect (or a lagging receiver, both of which may
    /// have lost messages) it starts empty and every stream is woken once, spread over time.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let soldout = &self.soldout;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = self.messages.recv() => match msg {
                    Ok(m) => {
                        if let Some(text) = m.value.as_str() {
                            if let Some((product, user)) = status_target(&text) {
                                self.sse.wake(product, user);
                                if let Some(rooms) = &self.rooms {
                                    rooms.decided(product, user);
                                }
                            } else {
                                soldout.on_event(&text);
                                self.recovering.on_event(&text);
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        soldout.set_listening(false);
                        soldout.set_listening(true);
                        self.sse.resync(RESYNC_SPREAD);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Ok(_) = self.errors.recv() => soldout.set_listening(false),
                Ok(_) = self.reconnects.recv() => {
                    // Anything published while we were away is lost: forget, then trust again.
                    soldout.set_listening(false);
                    soldout.set_listening(true);
                    self.sse.resync(RESYNC_SPREAD);
                }
            }
        }
        soldout.set_listening(false);
        self.resubscribe.abort();
        self.client.quit().await.ok();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_messages_name_their_product_and_user() {
        let p = ProductId::try_from(12_i64).unwrap();
        let u = UserId::try_from(34_i64).unwrap();
        assert_eq!(
            status_target(&crate::reservations::status_event(p, u)),
            Some((p, u))
        );
        for other in [
            "stock:12",
            "status:12",
            "status:12:",
            "status::34",
            "status:0:34",
            "status:12:-1",
            "status:x:34",
            "status:12:34:56",
            "",
        ] {
            assert_eq!(status_target(other), None, "{other:?}");
        }
    }
}
