//! The Redis connection (single node, cluster, or a primary found through Sentinel) with
//! reconnects and command timeouts.

use std::time::Duration;

use anyhow::Context;
use fred::{
    cmd,
    prelude::*,
    types::{InfoKind, config::UnresponsiveConfig},
};

use crate::config::{ConfigError, RedisSettings};

/// Commands give up after this, so a dead Redis answers `503` instead of hanging a request.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The oldest Redis seckill runs on: the relay's `XAUTOCLAIM` drops deleted entries from 7.0 on.
pub const MIN_VERSION: (u32, u32) = (7, 0);

/// A URL that lists nodes: `scheme://[user:password@]host:port,host:port,...[/path]`.
struct NodeList<'a> {
    auth: Option<&'a str>,
    nodes: Vec<(String, u16)>,
    /// What follows the nodes after a `/` (a Sentinel URL's service name).
    path: &'a str,
}

/// Parses what follows the scheme of a node-list URL.
fn node_list(rest: &str) -> anyhow::Result<NodeList<'_>> {
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let (hosts, path) = hosts.split_once('/').unwrap_or((hosts, ""));
    let nodes = hosts
        .split(',')
        .filter(|hp| !hp.is_empty())
        .map(|hp| {
            let (h, p) = hp.rsplit_once(':').context("each node needs host:port")?;
            Ok((h.to_owned(), p.parse::<u16>().context("a node's port")?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!nodes.is_empty(), "no nodes in SECKILL_REDIS_URL");
    Ok(NodeList { auth, nodes, path })
}

/// Turns our URL forms into a fred config: `redis://h:p`, `redis-cluster://h:p,h:p,...`, and
/// `redis-sentinel://h:p,h:p,.../<service name>` (the sentinels' addresses; the primary is
/// asked of them at each connection, so a failover is followed), and the same with TLS as
/// `rediss://`, `rediss-cluster://`, `rediss-sentinel://` (rustls, the system's roots, which
/// `SSL_CERT_FILE` replaces). `user:password@` before the nodes is the Redis servers' login.
pub fn fred_config(settings: &RedisSettings) -> anyhow::Result<Config> {
    let url = settings.url.as_str();
    let listed = [
        ("redis-cluster://", false, false),
        ("rediss-cluster://", false, true),
        ("redis-sentinel://", true, false),
        ("rediss-sentinel://", true, true),
    ]
    .into_iter()
    .find_map(|(scheme, sentinel, tls)| url.strip_prefix(scheme).map(|r| (r, sentinel, tls)));
    if let Some((rest, sentinel, tls)) = listed {
        let list = node_list(rest)?;
        let server = if sentinel {
            let service = list.path.trim_end_matches('/');
            anyhow::ensure!(
                !service.is_empty(),
                "a redis-sentinel:// URL ends with /<service name>"
            );
            ServerConfig::new_sentinel(list.nodes, service)
        } else {
            ServerConfig::new_clustered(list.nodes)
        };
        let mut config = Config {
            server,
            ..Config::default()
        };
        if tls {
            config.tls = Some(
                fred::types::config::TlsConnector::default_rustls()
                    .context("loading the system's TLS roots for SECKILL_REDIS_URL")?
                    .into(),
            );
        }
        if let Some(auth) = list.auth {
            let (user, pass) = auth.split_once(':').unwrap_or(("", auth));
            config.username = (!user.is_empty()).then(|| user.to_owned());
            config.password = Some(pass.to_owned());
        }
        Ok(config)
    } else if settings.cluster {
        Config::from_url_clustered(url).context("parsing SECKILL_REDIS_URL")
    } else {
        Config::from_url_centralized(url).context("parsing SECKILL_REDIS_URL")
    }
}

fn builder(settings: &RedisSettings) -> anyhow::Result<Builder> {
    let mut builder = Builder::from_config(fred_config(settings)?);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
            c.max_redirections = 10;
            // Shed load rather than queue without bound while disconnected.
            c.max_command_buffer_len = 50_000;
            c.tcp.nodelay = Some(true);
            // A Redis that stops answering (packets dropped, not refused) is given up on and
            // reconnected to, instead of queueing behind a connection that may never answer.
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(COMMAND_TIMEOUT),
                interval: Duration::from_millis(500),
            };
        })
        .with_performance_config(|p| {
            p.default_command_timeout = COMMAND_TIMEOUT;
        })
        // Retry forever, 50 ms doubling to 2 s.
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    Ok(builder)
}

/// Waits until `connected()` holds. (fred's `wait_for_connect` checks the state and then
/// subscribes to the connect notification, so a connection made in between is missed and it
/// waits forever; polling the state has no such gap.)
async fn until_connected(
    connected: impl Fn() -> bool,
    settings: &RedisSettings,
    wait: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    while !connected() {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "Redis at {} did not answer within {wait:?}",
                settings.redacted_url()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Builds and connects a pool; fails if Redis does not answer within `wait`. With Sentinel,
/// the pool follows the primary ([`primary_changes`]).
pub async fn connect(
    settings: &RedisSettings,
    size: usize,
    wait: Duration,
) -> anyhow::Result<Pool> {
    let pool = builder(settings)?
        .build_pool(size)
        .context("building the Redis pool")?;
    pool.connect_pool();
    until_connected(
        || pool.clients().iter().all(|c| c.is_connected()),
        settings,
        wait,
    )
    .await?;
    if let Some(mut changes) = primary_changes(settings)? {
        let pool = pool.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                if let Err(e) = pool.force_reconnection().await {
                    tracing::warn!(error = %e, "could not reconnect to the new Redis primary; retrying as commands fail");
                }
            }
        });
    }
    Ok(pool)
}

/// How often each process asks the sentinels which node is the primary.
pub const PRIMARY_POLL: Duration = Duration::from_millis(250);

/// The processes' Sentinel followers, by `SECKILL_REDIS_URL`: each bumps its counter when the
/// sentinels name another primary.
static FOLLOWERS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
> = std::sync::LazyLock::new(Default::default);

/// With Sentinel: a receiver that changes each time the sentinels name another primary, so
/// that every client reconnects to it at once — not only when its own connection breaks.
/// Found by `scripts/chaos`: after a failover that a blackhole (not a crash) caused, the old
/// primary came back still taking writes from the connections that had never broken, until
/// the sentinels demoted it ~10 s later, and everything written there was lost (statuses,
/// returned units, a product's listing for the relay). Polled every [`PRIMARY_POLL`] from
/// one task per process and URL. `None` without Sentinel.
fn primary_changes(
    settings: &RedisSettings,
) -> anyhow::Result<Option<tokio::sync::watch::Receiver<u64>>> {
    let config = fred_config(settings)?;
    let ServerConfig::Sentinel {
        hosts,
        service_name,
        ..
    } = &config.server
    else {
        return Ok(None);
    };
    let mut followers = FOLLOWERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(tx) = followers.get(&settings.url) {
        return Ok(Some(tx.subscribe()));
    }
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    followers.insert(settings.url.clone(), tx.clone());
    let sentinels: Vec<Config> = hosts
        .iter()
        .map(|host| Config {
            server: ServerConfig::Centralized {
                server: host.clone(),
            },
            tls: config.tls.clone(),
            username: config.username.clone(),
            password: config.password.clone(),
            ..Config::default()
        })
        .collect();
    tokio::spawn(follow_sentinels(sentinels, service_name.clone(), tx));
    Ok(Some(rx))
}

/// Asks the sentinels (the first that answers) for the primary every [`PRIMARY_POLL`]; bumps
/// `tx` when it changes.
async fn follow_sentinels(
    sentinels: Vec<Config>,
    service: String,
    tx: tokio::sync::watch::Sender<u64>,
) {
    let mut clients = Vec::new();
    for config in sentinels {
        let Ok(client) = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(1);
                c.internal_command_timeout = Duration::from_secs(1);
            })
            .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(1))
            .set_policy(ReconnectPolicy::new_constant(0, 500))
            .build()
        else {
            continue;
        };
        client.connect();
        clients.push(client);
    }
    let mut known: Option<String> = None;
    loop {
        tokio::time::sleep(PRIMARY_POLL).await;
        let mut named = None;
        for client in clients.iter().filter(|c| c.is_connected()) {
            let reply: Result<Vec<String>, _> = client
                .custom(
                    cmd!("SENTINEL"),
                    vec!["get-master-addr-by-name", service.as_str()],
                )
                .await;
            if let Ok(addr) = reply
                && addr.len() == 2
            {
                named = Some(format!("{}:{}", addr[0], addr[1]));
                break;
            }
        }
        let Some(named) = named else { continue };
        if known.as_ref().is_some_and(|k| *k != named) {
            tracing::warn!(primary = %named, previous = ?known, "the sentinels name a new Redis primary: reconnecting every client to it");
            tx.send_modify(|n| *n += 1);
        }
        known = Some(named);
    }
}

/// Messages a subscriber buffers for its listener. fred's default (32) lags whenever one
/// script publishes a worker batch's statuses (200 at once) while the listener is busy, and a
/// lag costs a resync (every stream woken, the sold-out memory dropped).
const SUBSCRIBER_BUFFER: usize = 4_096;

/// Builds a pub/sub client (fred's `Pool` does not do pub/sub).
pub async fn subscriber(
    settings: &RedisSettings,
    wait: Duration,
) -> anyhow::Result<fred::clients::SubscriberClient> {
    let client = builder(settings)?
        .with_performance_config(|p| p.broadcast_channel_capacity = SUBSCRIBER_BUFFER)
        .build_subscriber_client()
        .context("building the Redis subscriber")?;
    client.connect();
    until_connected(|| client.is_connected(), settings, wait).await?;
    if let Some(mut changes) = primary_changes(settings)? {
        // A message published on the new primary would not reach a subscription left on the
        // old one; the reconnect also tells the listener to drop what it remembers.
        let client = client.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                if let Err(e) = client.force_reconnection().await {
                    tracing::warn!(error = %e, "could not resubscribe on the new Redis primary");
                }
            }
        });
    }
    Ok(client)
}

/// `PING` with a short bound, for readiness.
pub async fn ping(pool: &Pool) -> anyhow::Result<()> {
    let pong: String = tokio::time::timeout(Duration::from_secs(1), pool.next().ping(None))
        .await
        .context("Redis ping timed out")?
        .context("Redis ping failed")?;
    anyhow::ensure!(pong == "PONG", "unexpected ping answer");
    Ok(())
}

/// Where commands go: the one server, or each cluster primary.
pub fn primaries(client: &Client) -> Vec<(String, Options)> {
    match client.cached_cluster_state() {
        Some(state) => state
            .unique_primary_nodes()
            .into_iter()
            .map(|server| {
                let name = server.to_string();
                let options = Options {
                    cluster_node: Some(server),
                    ..Options::default()
                };
                (name, options)
            })
            .collect(),
        None => {
            let name = match &client.client_config().server {
                ServerConfig::Centralized { server } => server.to_string(),
                ServerConfig::Sentinel { service_name, .. } => {
                    format!("the primary of {service_name} (through its sentinels)")
                }
                _ => "the configured address".to_owned(),
            };
            vec![(name, Options::default())]
        }
    }
}

/// `redis_version` of an `INFO server` reply: the version as written, and its major and minor.
pub fn server_version(info: &str) -> Option<(&str, (u32, u32))> {
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = version.split('.').map(str::parse::<u32>);
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    Some((version, (major, minor)))
}

/// The error start-up fails with on a Redis older than [`MIN_VERSION`]: one line naming the
/// variable, the node and both versions.
pub fn too_old(node: &str, version: &str) -> ConfigError {
    let (major, minor) = MIN_VERSION;
    ConfigError::new(
        "SECKILL_REDIS_URL",
        format!(
            "the Redis at {node} is {version}; seckill needs Redis {major}.{minor} or newer (the \
             relay's XAUTOCLAIM drops deleted entries from 7.0 on)"
        ),
    )
}

/// Refuses to start against a Redis (any cluster primary) older than [`MIN_VERSION`]. A server
/// whose `INFO` cannot be read or names no version is let through with a warning.
pub async fn check_version(pool: &Pool) -> anyhow::Result<()> {
    let client = pool.next();
    for (node, options) in primaries(client) {
        let info: Result<String, _> = client
            .with_options(&options)
            .info(Some(InfoKind::Server))
            .await;
        match info.as_deref().map(server_version) {
            Ok(Some((version, found))) if found < MIN_VERSION => {
                return Err(too_old(&node, version).into());
            }
            Ok(Some(_)) => {}
            Ok(None) => tracing::warn!(%node, "INFO server names no redis_version; not checked"),
            Err(e) => tracing::warn!(%node, error = %e, "could not read the Redis version"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_info_server() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(server_version(info), Some(("7.0.15", (7, 0))));
        assert_eq!(
            server_version("redis_version:6.2.14\n").map(|(_, v)| v),
            Some((6, 2))
        );
        assert!(server_version("redis_version:6.2.14\n").unwrap().1 < MIN_VERSION);
        assert!(server_version("redis_version:10.1.0\n").unwrap().1 >= MIN_VERSION);
        assert_eq!(server_version("# Server\nprocess_id:1\n"), None);
        assert_eq!(server_version("redis_version:x.y\n"), None);
    }

    #[test]
    fn an_old_redis_is_refused_in_one_line_naming_the_variable() {
        let err = too_old("127.0.0.1:6379", "6.2.14");
        assert_eq!(err.var, "SECKILL_REDIS_URL");
        assert!(err.message.contains("6.2.14"), "{}", err.message);
        assert!(err.message.contains("7.0 or newer"), "{}", err.message);
        assert!(!err.message.contains('\n'));
    }

    fn settings(url: &str, cluster: bool) -> RedisSettings {
        RedisSettings {
            url: url.into(),
            cluster,
            prefix: "t".into(),
        }
    }

    #[test]
    fn cluster_urls_list_every_node() {
        let c = fred_config(&settings(
            "redis-cluster://127.0.0.1:7000,127.0.0.1:7001",
            true,
        ))
        .unwrap();
        match c.server {
            ServerConfig::Clustered { hosts, .. } => assert_eq!(hosts.len(), 2),
            other => panic!("not clustered: {other:?}"),
        }
        let c = fred_config(&settings("redis://127.0.0.1:6379", false)).unwrap();
        assert!(matches!(c.server, ServerConfig::Centralized { .. }));
    }

    #[test]
    fn sentinel_urls_list_the_sentinels_and_name_the_service() {
        let c = fred_config(&settings(
            "redis-sentinel://u:pw@127.0.0.1:26379,127.0.0.1:26380/seckill",
            false,
        ))
        .unwrap();
        match &c.server {
            ServerConfig::Sentinel {
                hosts,
                service_name,
                ..
            } => {
                assert_eq!(hosts.len(), 2);
                assert_eq!(hosts[1].port, 26380);
                assert_eq!(service_name, "seckill");
            }
            other => panic!("not sentinel: {other:?}"),
        }
        assert_eq!(c.username.as_deref(), Some("u"));
        assert_eq!(c.password.as_deref(), Some("pw"));
        assert!(c.tls.is_none());
        let tls = fred_config(&settings("rediss-sentinel://h:26379/s", false)).unwrap();
        assert!(tls.tls.is_some());
        for bad in [
            "redis-sentinel://127.0.0.1:26379",
            "redis-sentinel://127.0.0.1:26379/",
            "redis-sentinel:///seckill",
            "redis-sentinel://127.0.0.1/seckill",
        ] {
            assert!(fred_config(&settings(bad, false)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_rediss_schemes_turn_tls_on() {
        for (url, cluster) in [
            ("redis://127.0.0.1:6379", false),
            ("redis-cluster://127.0.0.1:7000,127.0.0.1:7001", true),
        ] {
            assert!(
                fred_config(&settings(url, cluster)).unwrap().tls.is_none(),
                "{url}"
            );
        }
        for (url, cluster) in [
            ("rediss://127.0.0.1:6379", false),
            ("rediss-cluster://127.0.0.1:7000,127.0.0.1:7001", true),
        ] {
            assert!(
                fred_config(&settings(url, cluster)).unwrap().tls.is_some(),
                "{url}"
            );
        }
    }

    #[tokio::test]
    async fn a_redis_that_does_not_answer_is_named_without_its_password() {
        let s = settings("redis://user:hunter2@10.9.9.9:6379", false);
        let err = until_connected(|| false, &s, Duration::ZERO)
            .await
            .err()
            .unwrap();
        let line = format!("{err:#}");
        assert!(!line.contains("hunter2"), "{line}");
        assert!(line.contains("redis://user:***@10.9.9.9:6379"), "{line}");
    }
}
