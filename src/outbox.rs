//! Telling this process's outbox relay which products just got a winner (a leaf: the gate
//! raises it, the relay waits on it).
//!
//! On a single Redis the relay's blocking read wakes by itself when a winner is appended; on a
//! cluster, where one read cannot span the products' hash slots, the relay polls slowly and
//! this signal lets it relay this process's own winners at once.

use std::{collections::HashSet, sync::Mutex};

use tokio::sync::Notify;

use crate::domain::ProductId;

/// Products with winners the relay has not looked at yet, and a wake-up.
#[derive(Default)]
pub struct OutboxWake {
    products: Mutex<HashSet<ProductId>>,
    notify: Notify,
}

impl OutboxWake {
    /// A winner of `product` was appended to its outbox.
    pub fn won(&self, product: ProductId) {
        if let Ok(mut set) = self.products.lock() {
            set.insert(product);
        }
        self.notify.notify_one();
    }

    /// Waits until a winner was appended since the last [`Self::take`] (at once if one was).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// The products woken since the last call.
    pub fn take(&self) -> HashSet<ProductId> {
        self.products
            .lock()
            .map(|mut set| std::mem::take(&mut *set))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_win_before_the_wait_is_not_missed() {
        let wake = OutboxWake::default();
        let p = ProductId::try_from(5_i64).unwrap();
        wake.won(p);
        wake.won(p);
        tokio::time::timeout(Duration::from_secs(1), wake.notified())
            .await
            .unwrap();
        assert_eq!(wake.take(), HashSet::from([p]));
        assert!(wake.take().is_empty());
    }
}
