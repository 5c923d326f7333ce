//! Server-Sent Events: the shoppers' open event streams in this process. How many one user and
//! the process may hold (exact counts, released by a guard when a stream is dropped, a client
//! disconnect included), and a wake-up per stream, routed by `(product, user)`, so a status
//! event wakes only the streams that show it. ("Stream" alone, elsewhere, means a Redis stream:
//! a product's outbox.)
//!
//! A stream registers before its first read, so no change between the two is missed. Wake-ups
//! coalesce (a [`Notify`] permit): a burst of events for one shopper costs one read. When the
//! pub/sub subscription may have lost messages, [`SseStreams::resync`] wakes every stream once,
//! spread over [`RESYNC_SPREAD`], never all at the same instant.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    config::SseLimits,
    domain::{ProductId, UserId},
    metrics::Metrics,
};

/// How long a resync takes to wake every open stream (in [`RESYNC_SLICES`] even steps).
pub const RESYNC_SPREAD: Duration = Duration::from_secs(2);
const RESYNC_SLICES: u32 = 20;

/// Why a stream could not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user already holds `SECKILL_SSE_PER_USER` streams.
    PerUser,
    /// The process already holds `SECKILL_SSE_MAX` streams.
    Process,
}

type Key = (ProductId, UserId);

#[derive(Default)]
struct Registry {
    total: usize,
    per_user: HashMap<UserId, usize>,
    /// The wake-ups of the streams of each `(product, user)`, by stream id.
    topics: HashMap<Key, Vec<(u64, Arc<Notify>)>>,
    next_id: u64,
}

/// The open streams of one process.
pub struct SseStreams {
    limits: SseLimits,
    registry: Mutex<Registry>,
    metrics: Arc<Metrics>,
}

impl SseStreams {
    pub fn new(limits: SseLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            limits,
            registry: Mutex::default(),
            metrics,
        }
    }

    pub fn limits(&self) -> SseLimits {
        self.limits
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // The registry is consistent after every statement that holds it: a panic elsewhere
        // while it was held leaves nothing half-done worth refusing streams over.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens a stream of `user` on `product`, within the caps; it is counted (and woken by
    /// the pair's status events) until the guard is dropped.
    pub fn open(self: &Arc<Self>, product: ProductId, user: UserId) -> Result<SseStream, Refused> {
        let mut r = self.registry();
        let held = r.per_user.get(&user).copied().unwrap_or(0);
        let refused = if held >= self.limits.per_user {
            Some((Refused::PerUser, "per_user"))
        } else if r.total >= self.limits.max {
            Some((Refused::Process, "process"))
        } else {
            None
        };
        if let Some((refused, label)) = refused {
            self.metrics.sse_refused.with_label_values(&[label]).inc();
            return Err(refused);
        }
        let id = r.next_id;
        r.next_id += 1;
        let wake = Arc::new(Notify::new());
        r.topics
            .entry((product, user))
            .or_default()
            .push((id, wake.clone()));
        r.per_user.insert(user, held + 1);
        r.total += 1;
        self.metrics.sse_open.set(gauge(r.total));
        Ok(SseStream {
            streams: self.clone(),
            key: (product, user),
            id,
            wake,
        })
    }

    fn close(&self, key: Key, id: u64) {
        let mut r = self.registry();
        if let Some(list) = r.topics.get_mut(&key) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                r.topics.remove(&key);
            }
        }
        let user = key.1;
        match r.per_user.get(&user).copied() {
            Some(n) if n > 1 => {
                r.per_user.insert(user, n - 1);
            }
            _ => {
                r.per_user.remove(&user);
            }
        }
        r.total = r.total.saturating_sub(1);
        self.metrics.sse_open.set(gauge(r.total));
    }

    /// Wakes the streams of `user` on `product` (if this process holds any); no other stream
    /// notices.
    pub fn wake(&self, product: ProductId, user: UserId) {
        let r = self.registry();
        if let Some(list) = r.topics.get(&(product, user)) {
            for (_, wake) in list {
                wake.notify_one();
            }
        }
    }

    /// SseStreams open now.
    pub fn open_count(&self) -> usize {
        self.registry().total
    }

    /// Wakes every open stream once, spread evenly over `spread` (the subscription lost
    /// messages, so any of them may have missed a change): a bounded read rate instead of every
    /// stream reading Redis at the same instant. Runs in a task of its own.
    pub fn resync(&self, spread: Duration) {
        let all: Vec<Arc<Notify>> = self
            .registry()
            .topics
            .values()
            .flatten()
            .map(|(_, wake)| wake.clone())
            .collect();
        self.metrics.sse_resyncs.inc();
        if all.is_empty() {
            return;
        }
        let step = spread / RESYNC_SLICES;
        let per_slice = all.len().div_ceil(RESYNC_SLICES as usize);
        tokio::spawn(async move {
            for (i, slice) in all.chunks(per_slice).enumerate() {
                if i > 0 {
                    tokio::time::sleep(step).await;
                }
                for wake in slice {
                    wake.notify_one();
                }
            }
        });
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One open stream: counted until dropped.
pub struct SseStream {
    streams: Arc<SseStreams>,
    key: Key,
    id: u64,
    wake: Arc<Notify>,
}

impl SseStream {
    /// Resolves when this stream's reservation may have changed (cancel-safe; wake-ups that
    /// came while nobody waited are kept, coalesced into one).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        self.streams.close(self.key, self.id);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn streams(per_user: usize, max: usize) -> Arc<SseStreams> {
        Arc::new(SseStreams::new(
            SseLimits {
                per_user,
                max,
                lifetime: Duration::from_secs(300),
                heartbeat: Duration::from_secs(15),
            },
            Arc::new(Metrics::new().unwrap()),
        ))
    }

    fn ids(p: i64, u: i64) -> (ProductId, UserId) {
        (
            ProductId::try_from(p).unwrap(),
            UserId::try_from(u).unwrap(),
        )
    }

    fn is_woken(s: &SseStream) -> bool {
        s.woken().now_or_never().is_some()
    }

    #[test]
    fn caps_count_per_user_and_per_process_and_free_on_drop() {
        let s = streams(2, 3);
        let (p, u1) = ids(1, 1);
        let (q, u2) = ids(2, 2);
        let a = s.open(p, u1).unwrap();
        let b = s.open(q, u1).unwrap();
        assert_eq!(s.open(p, u1).err(), Some(Refused::PerUser));
        let c = s.open(p, u2).unwrap();
        assert_eq!(s.open(q, u2).err(), Some(Refused::Process));
        assert_eq!(s.open_count(), 3);
        assert_eq!(s.metrics.sse_open.get(), 3);
        drop(a);
        assert_eq!(s.open_count(), 2);
        let a = s.open(p, u1).unwrap();
        drop((a, b, c));
        assert_eq!(s.open_count(), 0);
        assert_eq!(s.metrics.sse_open.get(), 0);
        let r = s.registry();
        assert!(
            r.per_user.is_empty() && r.topics.is_empty(),
            "memory bounded"
        );
    }

    #[test]
    fn a_wake_reaches_only_the_streams_of_its_product_and_user() {
        let s = streams(4, 100);
        let (p, u1) = ids(1, 1);
        let (q, u2) = ids(2, 2);
        let a1 = s.open(p, u1).unwrap();
        let a2 = s.open(p, u1).unwrap();
        let other_product = s.open(q, u1).unwrap();
        let other_user = s.open(p, u2).unwrap();
        for _ in 0..1_000 {
            s.wake(p, u1);
        }
        assert!(is_woken(&a1) && is_woken(&a2));
        // A burst is one wake-up.
        assert!(!is_woken(&a1) && !is_woken(&a2));
        assert!(!is_woken(&other_product) && !is_woken(&other_user));
        // Nobody listens to user 3: nothing happens, nothing is kept.
        s.wake(p, UserId::try_from(3_i64).unwrap());
        assert_eq!(s.registry().topics.len(), 3);
    }

    #[tokio::test]
    async fn a_resync_wakes_every_stream_once_spread_over_time() {
        let s = streams(4, 1_000);
        let all: Vec<SseStream> = (1..=200)
            .map(|u| {
                let (p, u) = ids(1, u);
                s.open(p, u).unwrap()
            })
            .collect();
        let spread = Duration::from_millis(400);
        s.resync(spread);
        tokio::task::yield_now().await;
        let first = all.iter().filter(|st| is_woken(st)).count();
        assert_eq!(first, 10, "one slice at once, not all");
        tokio::time::sleep(spread + Duration::from_millis(200)).await;
        let rest = all.iter().filter(|st| is_woken(st)).count();
        assert_eq!(first + rest, 200);
    }
}
