//! Reading outbox entries: new ones for this relay (`XREADGROUP`, blocking on a connection of
//! its own when it may), and entries idle on a relay that died (`XAUTOCLAIM`).

use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;

use super::{
    BATCH, GROUP, ProductError, Relay, State,
    decode::{Entry, parse_autoclaim, parse_xread},
};

impl Relay {
    pub(super) async fn read_blocking(
        &self,
        st: &mut State,
        streams: Vec<String>,
        block: Duration,
    ) -> anyhow::Result<Vec<(String, Vec<Entry>)>> {
        if st.reader.is_none() {
            st.reader = Some(
                crate::redis::connect(&self.redis, 1, Duration::from_secs(2))
                    .await
                    .context("connecting the relay's blocking reader")?,
            );
        }
        let Some(reader) = st.reader.as_ref() else {
            anyhow::bail!("no blocking reader");
        };
        let read = self
            .read(&reader.next().clone(), streams, Some(block))
            .await;
        if let Err(e) = &read
            && !answered_by_redis(e)
        {
            // A connection whose blocked read went unanswered may never be unblocked: start
            // afresh next time (the outboxes are read again on the pool meanwhile).
            if let Some(reader) = st.reader.take() {
                tokio::spawn(close_reader(reader));
            }
        }
        read
    }

    /// `XREADGROUP … STREAMS s1 s2 … > > …` (blocking up to `block` when set).
    pub(super) async fn read(
        &self,
        client: &Client,
        streams: Vec<String>,
        block: Option<Duration>,
    ) -> anyhow::Result<Vec<(String, Vec<Entry>)>> {
        let ids = vec![">"; streams.len()];
        let block_ms = block.map(|b| u64::try_from(b.as_millis()).unwrap_or(u64::MAX));
        let options = Options {
            timeout: block.map(|b| b + crate::redis::COMMAND_TIMEOUT),
            ..Options::default()
        };
        let raw: Value = client
            .with_options(&options)
            .xreadgroup(
                GROUP,
                &self.consumer,
                Some(BATCH),
                block_ms,
                false,
                streams,
                ids,
            )
            .await
            .context("reading the outbox")?;
        parse_xread(raw)
    }

    pub(super) async fn claim(&self, stream: &str) -> Result<Vec<Entry>, ProductError> {
        let raw: Value = self
            .pool
            .next()
            .xautoclaim(
                stream,
                GROUP,
                &self.consumer,
                u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX),
                "0-0",
                Some(BATCH),
                false,
            )
            .await?;
        parse_autoclaim(raw)
    }
}

/// Whether Redis itself answered with this error (a reply such as `WRONGTYPE` or `NOGROUP`:
/// the connection is fine), rather than the connection failing or timing out.
fn answered_by_redis(error: &anyhow::Error) -> bool {
    use fred::error::ErrorKind;
    error.downcast_ref::<fred::error::Error>().is_some_and(|e| {
        !matches!(
            e.kind(),
            ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled | ErrorKind::Unknown
        )
    })
}

/// Closes the blocking reader's connection (a read it may still be blocked in ends within
/// `SECKILL_RELAY_POLL_MS`; this does not wait for it).
pub(super) async fn close_reader(reader: Pool) {
    let _ = tokio::time::timeout(Duration::from_millis(200), reader.quit()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_from_redis_is_told_from_a_failed_connection() {
        use fred::error::{Error, ErrorKind};
        let wrongtype = anyhow::Error::from(Error::new(ErrorKind::InvalidArgument, "WRONGTYPE"))
            .context("reading the outbox");
        assert!(answered_by_redis(&wrongtype));
        for kind in [ErrorKind::IO, ErrorKind::Timeout, ErrorKind::Canceled] {
            let e = anyhow::Error::from(Error::new(kind, "gone")).context("reading the outbox");
            assert!(!answered_by_redis(&e));
        }
        assert!(!answered_by_redis(&anyhow::anyhow!("other")));
    }
}
