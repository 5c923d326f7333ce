//! What `SECKILL_REDIS_DURABILITY` asks of Redis, checked against what Redis says it does.
//!
//! - `fsync`: every primary must run `appendonly yes` with `appendfsync always`. At start a
//!   mismatch refuses to start ([`check_at_start`]), and `/readyz` turns `503` naming redis
//!   once it no longer holds ([`ReadyCheck`], cached for a few seconds).
//! - `replicas:N`: after every win, `WAIT N` on the connection that ran the script
//!   ([`ReplicaWait`]). A wait that comes back short still answers `202` (the unit is taken
//!   and the win recorded on the primary), counted and logged; a wait that *fails* (the
//!   connection broke: the primary may be gone, and the win with it) answers `503
//!   unavailable`, and the shopper's `/me` tells whether the win survived. At start, a primary
//!   with fewer than N online replicas is only a warning (replicas may attach later).
//! - `fsync+replicas:N`: the same with `WAITAOF 1 N` (Redis 7.2+, Valkey): fsynced to the AOF
//!   of the primary *and* of N replicas before the `202`. Refused at start, in one line, by a
//!   server without `WAITAOF` or without `appendonly yes`.
//! - `none`: nothing to check.
//!
//! The replies are decoded by pure functions; the IO only fetches them.

use std::{
    num::NonZeroU16,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use fred::{
    cmd,
    prelude::*,
    types::{ClusterHash, InfoKind, Value},
};

use crate::{
    config::{ConfigError, Durability},
    redis::{COMMAND_TIMEOUT, primaries},
};

/// How long a win waits for its replicas (`replicas:N`): a quarter of the command timeout, so
/// a missing replica delays a `202` but never turns it into a `503`.
pub const REPLICA_WAIT: Duration = Duration::from_millis(500);
const _: () = assert!(REPLICA_WAIT.as_millis() * 4 <= COMMAND_TIMEOUT.as_millis());

/// After a wait came back short, wins skip the wait this long: the replicas are known to be
/// missing, and a `WAIT` blocks every request pipelined behind it on its connection.
pub const SKIP_AFTER_SHORT_WAIT: Duration = Duration::from_secs(1);

/// What `replicas:N` got for one win.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replication {
    /// Nothing asked: not a win, or the setting is `fsync` or `none`.
    #[default]
    NotAsked,
    /// N replicas acknowledged the win before its answer.
    Confirmed,
    /// The `WAIT` timed out (or failed) with fewer than N: only the primary holds the win yet.
    TimedOut,
    /// Not waited for: a wait came back short within [`SKIP_AFTER_SHORT_WAIT`], so the
    /// replicas are known to be missing. Only the primary holds the win yet.
    Skipped,
    /// The wait failed: the connection that ran the script broke, so the primary may be gone
    /// and the win with it. The attempt answers `503 unavailable`, never a `202`.
    Failed,
}

/// The `WAIT` after a win (`replicas:N`), with a short-circuit while replicas are missing.
#[derive(Debug, Clone)]
pub struct ReplicaWait {
    replicas: i64,
    /// `WAITAOF 1 N` (the primary's and N replicas' AOF fsynced) instead of `WAIT N`.
    aof: bool,
    /// Wins skip the wait until this many ms after `epoch` (0: never skipped yet).
    skip_until_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl ReplicaWait {
    /// The wait `durability` asks for, if any.
    pub fn for_setting(durability: Durability) -> Option<Self> {
        match durability {
            Durability::Replicas(n) => Some(Self::new(n)),
            Durability::FsyncReplicas(n) => Some(Self {
                aof: true,
                ..Self::new(n)
            }),
            Durability::Fsync | Durability::None => None,
        }
    }

    pub fn new(replicas: NonZeroU16) -> Self {
        Self {
            replicas: i64::from(replicas.get()),
            aof: false,
            skip_until_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Waits until N replicas hold the writes of `client`'s connection to the node owning
    /// `slot` — the connection that just ran the winning script, since `WAIT` covers only
    /// the writes of the connection it is sent on.
    pub async fn after_win(&self, client: &Client, slot: u16) -> Replication {
        if self.now_ms() < self.skip_until_ms.load(Ordering::Relaxed) {
            return Replication::Skipped;
        }
        let options = Options {
            cluster_hash: Some(ClusterHash::Custom(slot)),
            // A `WAIT` on a new connection sees none of the script's writes and answers at
            // once: never retry it after a reconnect, nor send it while reconnecting.
            max_attempts: Some(1),
            fail_fast: true,
            timeout: Some(REPLICA_WAIT * 2),
            ..Options::default()
        };
        let wait_ms = i64::try_from(REPLICA_WAIT.as_millis()).unwrap_or(500);
        let client = client.with_options(&options);
        let acked = if self.aof {
            // A replica reports how far it fsynced when the primary asks (a GETACK, sent in the
            // turn a WAIT or WAITAOF blocks) or once a second. Asked in the turn the win reached
            // it, it answers before its own fsync, and a lone WAITAOF then runs on to the next
            // once-a-second report (measured on Valkey 8.1: ~0.8 s). A WAIT first (its ask is
            // answered as soon as the replica holds the win) puts the WAITAOF's own ask in a
            // later turn, when the replica has fsynced it: measured 1.4 ms median for both.
            match client.wait::<i64>(self.replicas, wait_ms).await {
                Ok(n) if n >= self.replicas => client
                    .custom::<Vec<i64>, _>(
                        cmd!("WAITAOF", blocking: true),
                        vec![1, self.replicas, wait_ms],
                    )
                    .await
                    .map(|counts| waitaof_replicas(&counts)),
                other => other,
            }
        } else {
            client.wait::<i64>(self.replicas, wait_ms).await
        };
        let failed = acked.is_err();
        match acked {
            Ok(acked) if acked >= self.replicas => return Replication::Confirmed,
            Ok(acked) => tracing::warn!(
                acked,
                want = self.replicas,
                "a win's WAIT timed out: answered 202 with the win on the primary only (as \
                 durable as SECKILL_REDIS_DURABILITY=none until the replicas catch up)"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                want = self.replicas,
                "a win's WAIT failed (the connection broke): answered 503, the shopper's /me \
                 tells whether the win survived"
            ),
        }
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(SKIP_AFTER_SHORT_WAIT.as_millis()).unwrap_or(u64::MAX));
        self.skip_until_ms.fetch_max(until, Ordering::Relaxed);
        if failed {
            Replication::Failed
        } else {
            Replication::TimedOut
        }
    }
}

/// The replicas a `WAITAOF 1 N` reply `[numlocal, numreplicas]` counts as holding the win: none
/// unless the primary's own fsync is in it too.
pub fn waitaof_replicas(counts: &[i64]) -> i64 {
    match counts {
        [local, replicas] if *local >= 1 => *replicas,
        _ => -1,
    }
}

/// How long `/readyz` trusts its last look at the Redis configuration.
pub const READY_CACHE: Duration = Duration::from_secs(2);

/// Why a Redis configuration does not give `fsync`, from `CONFIG GET appendonly appendfsync`
/// (a flat `[name, value, ...]` reply); `None` when it does.
pub fn fsync_shortfall(reply: &[String]) -> Option<String> {
    let get = |name: &str| {
        reply
            .chunks_exact(2)
            .find(|pair| pair[0].eq_ignore_ascii_case(name))
            .map(|pair| pair[1].as_str())
    };
    let wrong: Vec<String> = [("appendonly", "yes"), ("appendfsync", "always")]
        .into_iter()
        .filter_map(|(name, want)| match get(name) {
            Some(v) if v.eq_ignore_ascii_case(want) => None,
            Some(v) => Some(format!("{name}={v}")),
            None => Some(format!("no {name}")),
        })
        .collect();
    (!wrong.is_empty()).then(|| wrong.join(", "))
}

/// Online replicas in an `INFO replication` reply (`slaveN:ip=..,port=..,state=online,..`).
pub fn online_replicas(info: &str) -> usize {
    info.lines()
        .filter_map(|line| line.trim().split_once(':'))
        .filter(|(name, _)| {
            name.strip_prefix("slave")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|(_, fields)| fields.split(',').any(|f| f == "state=online"))
        .count()
}

/// The error start-up fails with when `fsync` is not given: one line naming the variable, the
/// node and the fix.
pub fn fsync_refusal(node: &str, shortfall: &str) -> ConfigError {
    ConfigError::new(
        "SECKILL_REDIS_DURABILITY",
        format!(
            "fsync needs Redis with appendonly yes and appendfsync always; the Redis at {node} \
             has {shortfall} (set them, or choose replicas:N or none)"
        ),
    )
}

/// The first primary that does not give `fsync`, as `(node, shortfall)`.
async fn fsync_problem(pool: &Pool) -> anyhow::Result<Option<(String, String)>> {
    let client = pool.next();
    for (node, options) in primaries(client) {
        let reply: Vec<String> = client
            .with_options(&options)
            .custom(cmd!("CONFIG"), vec!["GET", "appendonly", "appendfsync"])
            .await
            .with_context(|| format!("reading appendonly/appendfsync of the Redis at {node}"))?;
        if let Some(shortfall) = fsync_shortfall(&reply) {
            return Ok(Some((node, shortfall)));
        }
    }
    Ok(None)
}

/// Primaries with fewer than `want` online replicas, as `(node, online)`.
async fn short_of_replicas(pool: &Pool, want: usize) -> anyhow::Result<Vec<(String, usize)>> {
    let client = pool.next();
    let mut short = Vec::new();
    for (node, options) in primaries(client) {
        let info: String = client
            .with_options(&options)
            .info(Some(InfoKind::Replication))
            .await
            .with_context(|| format!("reading INFO replication of the Redis at {node}"))?;
        let online = online_replicas(&info);
        if online < want {
            short.push((node, online));
        }
    }
    Ok(short)
}

/// Checks, before anything is served, that Redis gives what `durability` asks: refuses to
/// start when `fsync` is not given; warns when `replicas:N` lacks replicas.
pub async fn check_at_start(durability: Durability, pool: &Pool) -> anyhow::Result<()> {
    match durability {
        Durability::None => {
            tracing::warn!(
                "SECKILL_REDIS_DURABILITY=none: a Redis crash loses every win since its last \
                 persistence point (see the README's failure model)"
            );
        }
        Durability::Fsync => match fsync_problem(pool).await {
            Ok(None) => tracing::info!("Redis durability: fsync (appendfsync always)"),
            Ok(Some((node, shortfall))) => return Err(fsync_refusal(&node, &shortfall).into()),
            Err(e) => {
                return Err(ConfigError::new(
                    "SECKILL_REDIS_DURABILITY",
                    format!(
                        "fsync needs Redis with appendonly yes and appendfsync always, and its \
                         configuration could not be read ({e:#}); choose replicas:N or none if \
                         this Redis hides CONFIG"
                    ),
                )
                .into());
            }
        },
        Durability::FsyncReplicas(_) => match waitaof_problem(pool).await {
            Ok(None) => {}
            Ok(Some((node, shortfall))) => return Err(waitaof_refusal(&node, &shortfall).into()),
            Err(e) => {
                return Err(ConfigError::new(
                    "SECKILL_REDIS_DURABILITY",
                    format!(
                        "fsync+replicas:N needs WAITAOF and appendonly yes, and the Redis \
                         could not be asked ({e:#})"
                    ),
                )
                .into());
            }
        },
        Durability::Replicas(_) => {}
    }
    if let Durability::Replicas(n) | Durability::FsyncReplicas(n) = durability {
        {
            let want = usize::from(n.get());
            let short = short_of_replicas(pool, want).await.unwrap_or_else(|e| {
                tracing::warn!(error = %format!("{e:#}"), "could not count Redis replicas");
                Vec::new()
            });
            for (node, online) in short {
                tracing::warn!(
                    %node,
                    online,
                    want,
                    "SECKILL_REDIS_DURABILITY={durability}, but the Redis at {node} has \
                     {online} online replicas: until they attach, every win waits out its wait \
                     timeout and is only as durable as the primary alone"
                );
            }
        }
    }
    Ok(())
}

/// Why a Redis cannot give `fsync+replicas:N`, from `COMMAND INFO WAITAOF` (`[nil]` on a server
/// without it) and `CONFIG GET appendonly`; `None` when it can.
pub fn waitaof_shortfall(has_waitaof: bool, appendonly: &[String]) -> Option<String> {
    let aof = appendonly
        .chunks_exact(2)
        .find(|pair| pair[0].eq_ignore_ascii_case("appendonly"))
        .map(|pair| pair[1].as_str());
    let mut wrong = Vec::new();
    if !has_waitaof {
        wrong.push("no WAITAOF command (Redis 7.2+ or Valkey has it)".to_owned());
    }
    match aof {
        Some(v) if v.eq_ignore_ascii_case("yes") => {}
        Some(v) => wrong.push(format!("appendonly={v}")),
        None => wrong.push("no appendonly".to_owned()),
    }
    (!wrong.is_empty()).then(|| wrong.join(", "))
}

/// The first primary that cannot give `fsync+replicas:N`, as `(node, shortfall)`.
async fn waitaof_problem(pool: &Pool) -> anyhow::Result<Option<(String, String)>> {
    let client = pool.next();
    for (node, options) in primaries(client) {
        let c = client.with_options(&options);
        let info: Vec<Value> = c
            .custom(cmd!("COMMAND"), vec!["INFO", "WAITAOF"])
            .await
            .with_context(|| format!("asking the Redis at {node} for WAITAOF"))?;
        let has_waitaof = info.first().is_some_and(|v| !v.is_null());
        let aof: Vec<String> = c
            .custom(cmd!("CONFIG"), vec!["GET", "appendonly"])
            .await
            .with_context(|| format!("reading appendonly of the Redis at {node}"))?;
        if let Some(shortfall) = waitaof_shortfall(has_waitaof, &aof) {
            return Ok(Some((node, shortfall)));
        }
    }
    Ok(None)
}

/// The error start-up fails with when `fsync+replicas:N` cannot be given: one line naming the
/// variable, the node and what it lacks.
pub fn waitaof_refusal(node: &str, shortfall: &str) -> ConfigError {
    ConfigError::new(
        "SECKILL_REDIS_DURABILITY",
        format!(
            "fsync+replicas:N waits with WAITAOF on an AOF-enabled primary; the Redis at {node} \
             has {shortfall} (use Redis 7.2+ or Valkey with appendonly yes, or choose fsync or \
             replicas:N)"
        ),
    )
}

/// `/readyz`'s view of the durability setting: whether Redis still gives `fsync`, looked up
/// at most once per [`READY_CACHE`].
pub struct ReadyCheck {
    durability: Durability,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl ReadyCheck {
    pub fn new(durability: Durability) -> Self {
        Self {
            durability,
            last: Mutex::new(None),
        }
    }

    /// `Ok` when Redis gives what the setting asks (always, for `none` and `replicas:N`);
    /// otherwise why not, in a few words.
    pub async fn check(&self, pool: &Pool) -> Result<(), String> {
        if self.durability != Durability::Fsync {
            return Ok(());
        }
        let cached = |last: &Option<(Instant, Result<(), String>)>| {
            last.as_ref()
                .filter(|(at, _)| at.elapsed() < READY_CACHE)
                .map(|(_, result)| result.clone())
        };
        if let Some(result) = cached(&self.lock()) {
            return result;
        }
        let result = match tokio::time::timeout(Duration::from_secs(1), fsync_problem(pool)).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some((node, shortfall)))) => Err(format!(
                "not durable: SECKILL_REDIS_DURABILITY=fsync, but the Redis at {node} has \
                 {shortfall}"
            )),
            Ok(Err(e)) => Err(format!("durability unknown: {e:#}")),
            Err(_) => Err("durability unknown: CONFIG GET timed out".to_owned()),
        };
        *self.lock() = Some((Instant::now(), result.clone()));
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Result<(), String>)>> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(pairs: &[&str]) -> Vec<String> {
        pairs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fsync_needs_appendonly_and_appendfsync_always() {
        assert_eq!(
            fsync_shortfall(&reply(&["appendonly", "yes", "appendfsync", "always"])),
            None
        );
        assert_eq!(
            fsync_shortfall(&reply(&["appendfsync", "always", "appendonly", "yes"])),
            None
        );
        assert_eq!(
            fsync_shortfall(&reply(&["appendonly", "no", "appendfsync", "always"])).as_deref(),
            Some("appendonly=no")
        );
        assert_eq!(
            fsync_shortfall(&reply(&["appendonly", "yes", "appendfsync", "everysec"])).as_deref(),
            Some("appendfsync=everysec")
        );
        assert_eq!(
            fsync_shortfall(&reply(&["appendonly", "no", "appendfsync", "everysec"])).as_deref(),
            Some("appendonly=no, appendfsync=everysec")
        );
        assert_eq!(
            fsync_shortfall(&reply(&[])).as_deref(),
            Some("no appendonly, no appendfsync")
        );
    }

    #[test]
    fn the_refusal_is_one_line_naming_the_variable() {
        let refusal = fsync_refusal("127.0.0.1:6379", "appendonly=no");
        assert_eq!(refusal.var, "SECKILL_REDIS_DURABILITY");
        let line = refusal.to_string();
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("SECKILL_REDIS_DURABILITY: fsync needs"),
            "{line}"
        );
        assert!(line.contains("127.0.0.1:6379 has appendonly=no"), "{line}");
        assert!(line.contains("replicas:N or none"), "{line}");
    }

    #[test]
    fn fsync_replicas_needs_waitaof_and_the_aof() {
        let yes = reply(&["appendonly", "yes"]);
        assert_eq!(waitaof_shortfall(true, &yes), None);
        let missing = waitaof_shortfall(false, &yes).unwrap();
        assert!(missing.contains("no WAITAOF"), "{missing}");
        assert_eq!(
            waitaof_shortfall(true, &reply(&["appendonly", "no"])).as_deref(),
            Some("appendonly=no")
        );
        let line = waitaof_refusal("127.0.0.1:6379", &missing).to_string();
        assert!(
            line.starts_with("SECKILL_REDIS_DURABILITY: fsync+replicas:N"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_waitaof_reply_counts_replicas_only_with_the_primarys_own_fsync() {
        assert_eq!(waitaof_replicas(&[1, 2]), 2);
        assert_eq!(waitaof_replicas(&[0, 2]), -1);
        assert_eq!(waitaof_replicas(&[1]), -1);
        assert_eq!(waitaof_replicas(&[]), -1);
    }

    #[test]
    fn only_online_replicas_count() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
            slave0:ip=127.0.0.1,port=7001,state=online,offset=42,lag=0\r\n\
            slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n\
            slave2:ip=127.0.0.1,port=7003,state=online,offset=42,lag=1\r\n\
            master_failover_state:no-failover\r\nslave_read_only:1\r\n";
        assert_eq!(online_replicas(info), 2);
        assert_eq!(
            online_replicas("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n"),
            0
        );
    }
}
