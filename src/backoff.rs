//! Retry delays for every loop that waits out a dependency: exponential, capped, with jitter
//! (so processes that lost the same dependency do not retry in lockstep), reset on success.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// An exponential backoff from `min` doubling to `max`, each delay plus up to 100% jitter.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// Sleeps `delay`, or less if `shutdown` fires first.
pub async fn sleep_or_stop(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = Backoff::new(min, max);
        let first: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in first.iter().enumerate() {
            let base = (min * 2u32.pow(i as u32)).min(max);
            assert!(
                *d >= base && *d <= base * 2,
                "attempt {i}: {d:?} vs {base:?}"
            );
        }
        b.reset();
        let again = b.next_delay();
        assert!(again >= min && again <= min * 2, "{again:?}");
    }
}
