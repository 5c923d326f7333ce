//! The shutdown phases of one process, as its listeners see them (a leaf: the application's
//! wiring moves it along, handlers only read it).
//!
//! **Serving** → on SIGTERM, **draining**: `/readyz` answers `503 draining` while every other
//! request is still served, so a load balancer takes the process out of rotation →
//! **closing**: the listeners stop accepting and every open event stream ends with a last
//! `close` event ([`close_frame`]) instead of being cut.

use tokio_util::sync::CancellationToken;

/// Where this process is in its shutdown.
#[derive(Debug, Default)]
pub struct Drain {
    draining: CancellationToken,
    closing: CancellationToken,
}

impl Drain {
    /// Not ready from now on (`/readyz` answers `503 draining`); everything else goes on.
    pub fn begin(&self) {
        self.draining.cancel();
    }

    /// Whether the process is shutting down (draining or closing).
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// The listeners are about to stop accepting: event streams end now.
    pub fn close(&self) {
        self.draining.cancel();
        self.closing.cancel();
    }

    /// Resolves once [`Drain::close`] was called (at once if it was already).
    pub async fn closing(&self) {
        self.closing.cancelled().await;
    }
}

/// What a shopper's `EventSource` is told when the process closes its stream.
const CLOSE_DATA: &str = r#"{"reason":"shutting_down","detail":"this server is shutting down; reconnect and you will reach another"}"#;

/// The range of the `retry:` hint of a closed stream, in milliseconds: spread, so the streams
/// of one process do not all come back in the same instant.
pub const CLOSE_RETRY_MS: std::ops::RangeInclusive<u64> = 1_000..=5_000;

/// The last frame of an event stream whose process is shutting down: a `close` event, then a
/// `retry:` hint (`retry_ms`, picked from [`CLOSE_RETRY_MS`]) for the reconnection.
pub fn close_frame(retry_ms: u64) -> String {
    format!("event: close\ndata: {CLOSE_DATA}\nretry: {retry_ms}\n\n")
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn draining_then_closing() {
        let drain = Drain::default();
        assert!(!drain.is_draining());
        assert!(drain.closing().now_or_never().is_none());
        drain.begin();
        assert!(drain.is_draining());
        assert!(drain.closing().now_or_never().is_none(), "still serving");
        drain.close();
        assert!(drain.closing().now_or_never().is_some());
    }

    #[test]
    fn closing_implies_not_ready() {
        let drain = Drain::default();
        drain.close();
        assert!(drain.is_draining());
    }

    #[test]
    fn the_close_frame_is_one_event_with_json_data_and_a_retry_hint() {
        let frame = close_frame(2_500);
        assert!(frame.ends_with("\n\n"));
        assert_eq!(frame.matches("\n\n").count(), 1, "one event");
        let lines: Vec<&str> = frame.trim_end().lines().collect();
        assert_eq!(lines[0], "event: close");
        let data: serde_json::Value =
            serde_json::from_str(lines[1].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["reason"], "shutting_down");
        assert_eq!(lines[2], "retry: 2500");
    }
}
