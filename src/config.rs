//! Typed settings read once from the environment (the README's configuration table).
//!
//! Every variable has the documented default; a bad value fails start-up with one line that
//! names the variable. Secrets are wrapped in [`SecretString`] so they never reach a log.

use std::{
    cell::RefCell,
    collections::{BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    net::SocketAddr,
    num::NonZeroU16,
    str::FromStr,
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};

/// Development secrets used only with `SECKILL_DEV=1` (and loudly logged as such). They are
/// public, so outside development mode they are refused as values.
const DEV_JWT_SECRET: &str = "seckill-dev-jwt-secret-do-not-use-in-production";
const DEV_ADMIN_TOKEN: &str = "seckill-dev-admin-token";
const DEV_TOKEN_SECRET: &str = "seckill-dev-purchase-token-secret";
const DEV_SECRETS: &[&str] = &[DEV_JWT_SECRET, DEV_ADMIN_TOKEN, DEV_TOKEN_SECRET];

/// How a variable's default reads in `seckill --help` and the README's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarDefault {
    /// The value the parser reads when the variable is unset.
    Value(&'static str),
    /// Unset means something no value says (required, not checked, off), in words.
    Described(&'static str),
}

/// One environment variable this service reads: the one definition that the parser's defaults
/// and bounds, `seckill --help` and the check of the README's table all come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    pub default: VarDefault,
    /// Inclusive bounds of a whole-number setting.
    pub range: Option<(u64, u64)>,
    /// What it sets, in one line.
    pub meaning: &'static str,
}

impl Var {
    const fn new(name: &'static str, default: &'static str, meaning: &'static str) -> Self {
        Self {
            name,
            default: VarDefault::Value(default),
            range: None,
            meaning,
        }
    }

    const fn described(name: &'static str, unset: &'static str, meaning: &'static str) -> Self {
        Self {
            name,
            default: VarDefault::Described(unset),
            range: None,
            meaning,
        }
    }

    const fn range(self, min: u64, max: u64) -> Self {
        Self {
            range: Some((min, max)),
            ..self
        }
    }

    /// The default as the help and the README write it.
    pub fn default_text(&self) -> &'static str {
        match self.default {
            VarDefault::Value(v) | VarDefault::Described(v) => v,
        }
    }
}

/// Every variable this service reads, in the order `seckill --help` lists them. Any other
/// `SECKILL_*` variable is rejected as a typo.
pub const VARS: &[Var] = &[
    Var::new(
        "SECKILL_HTTP_ADDR",
        "127.0.0.1:8080",
        "the shoppers' listener",
    ),
    Var::new(
        "SECKILL_ADMIN_ADDR",
        "127.0.0.1:8081",
        "the operators' listener (/api/v1/admin/*, /metrics); `seckill all` serves everything here",
    ),
    Var::new(
        "SECKILL_WORKER_ADDR",
        "127.0.0.1:8082",
        "a `seckill worker`'s own listener: /metrics, /healthz, /readyz",
    ),
    Var::new(
        "SECKILL_REDIS_URL",
        "redis://127.0.0.1:6379",
        "Redis; redis-cluster://host:port,host:port,... selects cluster mode",
    ),
    Var::described(
        "SECKILL_REDIS_CLUSTER",
        "unset",
        "1 selects cluster mode for a redis:// URL",
    ),
    Var::new(
        "SECKILL_REDIS_PREFIX",
        "seckill",
        "every Redis key starts with it (no braces or spaces)",
    ),
    Var::new(
        "SECKILL_REDIS_DURABILITY",
        "fsync",
        "when a win is durable before its 202: fsync, replicas:N (1 to 1000) or none",
    ),
    Var::new(
        "SECKILL_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/seckill",
        "Postgres; the database is created if missing",
    ),
    Var::new(
        "SECKILL_MIGRATE",
        "1",
        "1: serve/worker create the database and apply migrations at start; 0: only check the schema is current",
    ),
    Var::new(
        "SECKILL_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "RabbitMQ; a 10 s heartbeat is added unless the URL sets one",
    ),
    Var::new(
        "SECKILL_AMQP_QUEUE",
        "seckill.orders",
        "the orders queue; its dead-letter queue is <queue>.dlq",
    ),
    Var::described(
        "SECKILL_JWT_SECRET",
        "required unless SECKILL_DEV=1",
        "HS256 key of shoppers' JWTs (at least 16 characters)",
    ),
    Var::described(
        "SECKILL_ADMIN_TOKEN",
        "required unless SECKILL_DEV=1",
        "operators' bearer token (at least 16 characters)",
    ),
    Var::described(
        "SECKILL_TOKEN_SECRET",
        "required unless SECKILL_DEV=1",
        "signs purchase tokens (at least 16 characters, not the JWT secret)",
    ),
    Var::described(
        "SECKILL_JWT_AUDIENCE",
        "unset (not checked)",
        "when set, shoppers' JWTs must carry this aud",
    ),
    Var::described(
        "SECKILL_JWT_ISSUER",
        "unset (not checked)",
        "when set, shoppers' JWTs must carry this iss",
    ),
    Var::new(
        "SECKILL_PAYMENT_TIMEOUT_SECS",
        "900",
        "an unpaid order expires and its unit returns to stock",
    )
    .range(1, 7 * 86_400),
    Var::new(
        "SECKILL_PURCHASE_TOKEN_TTL_SECS",
        "60",
        "lifetime of a purchase token",
    )
    .range(1, 3_600),
    Var::new(
        "SECKILL_USER_RATE",
        "1/1s",
        "purchase attempts one user may make on one product per window (COUNT/PERIOD)",
    ),
    Var::new(
        "SECKILL_PRODUCT_RATE",
        "20000/1s",
        "admission gate per product (token bucket); beyond it 429",
    ),
    Var::new(
        "SECKILL_RESERVE_BATCH_MAX",
        "64",
        "most purchase attempts on one product decided by one Redis call; 1: one call each",
    )
    .range(1, 1_000),
    Var::new(
        "SECKILL_RESERVE_BATCH_WINDOW_US",
        "1000",
        "the longest an attempt waits for its product's call in flight before it goes out beside it",
    )
    .range(0, 100_000),
    Var::new(
        "SECKILL_IP_RATE",
        "50/1s",
        "requests per client on the shoppers' listener, in process",
    ),
    Var::new(
        "SECKILL_ADMIN_IP_RATE",
        "100/1s",
        "requests per client on the operators' listener, in process",
    ),
    Var::described(
        "SECKILL_TRUSTED_PROXIES",
        "empty",
        "comma-separated IPs/CIDRs whose X-Forwarded-For is believed",
    ),
    Var::new(
        "SECKILL_BODY_TIMEOUT_MS",
        "2000",
        "a request body must arrive whole this long after its head, else 408",
    )
    .range(100, 60_000),
    Var::new(
        "SECKILL_MAX_CONNECTIONS_PER_IP",
        "256",
        "open connections one client may hold on the shoppers' listener",
    )
    .range(1, 1_000_000),
    Var::new(
        "SECKILL_MAX_CONNECTIONS",
        "10000",
        "open connections on the shoppers' listener, over all its workers",
    )
    .range(1, 1_000_000),
    Var::new(
        "SECKILL_WORKER_BATCH_SIZE",
        "200",
        "most orders persisted in one transaction",
    )
    .range(1, 5_000),
    Var::new(
        "SECKILL_WORKER_BATCH_WAIT_MS",
        "20",
        "how long a worker batch waits to fill",
    )
    .range(0, 10_000),
    Var::new(
        "SECKILL_WORKER_CONSUMERS",
        "4",
        "consumers per worker process, each persisting its own batches",
    )
    .range(1, 64),
    Var::new("SECKILL_SWEEP_INTERVAL_MS", "1000", "expiry sweeper period").range(10, 3_600_000),
    Var::new(
        "SECKILL_RELAY_CLAIM_IDLE_MS",
        "5000",
        "outbox entries pending this long on a relay (one that died) are taken over",
    )
    .range(100, 3_600_000),
    Var::new(
        "SECKILL_PG_POOL",
        "16",
        "most Postgres connections one process opens",
    )
    .range(1, 1_000),
    Var::new(
        "SECKILL_REDIS_POOL",
        "4",
        "Redis connections of one process",
    )
    .range(1, 256),
    Var::new(
        "SECKILL_SSE_PER_USER",
        "4",
        "event streams one shopper may hold open at once in one process",
    )
    .range(1, 1_000),
    Var::new(
        "SECKILL_SSE_MAX",
        "10000",
        "event streams one process holds open at once",
    )
    .range(1, 1_000_000),
    Var::new(
        "SECKILL_SSE_LIFETIME_SECS",
        "300",
        "an event stream ends after at most this long, with a retry: hint",
    )
    .range(1, 86_400),
    Var::new(
        "SECKILL_SSE_HEARTBEAT_SECS",
        "15",
        "an event stream gets a keep-alive comment this often",
    )
    .range(1, 3_600),
    Var::new(
        "SECKILL_RELAY_POLL_MS",
        "1000",
        "the longest an idle relay waits before it looks again",
    )
    .range(10, 10_000),
    Var::new(
        "SECKILL_KEY_GRACE_SECS",
        "86400",
        "how long a retired sale keeps its Redis keys before they expire",
    )
    .range(1, 30 * 86_400),
    Var::new(
        "SECKILL_DRAIN_GRACE_MS",
        "1000",
        "on SIGTERM, /readyz answers 503 draining this long while requests are still served",
    )
    .range(0, 60_000),
    Var::new(
        "SECKILL_DRAIN_TIMEOUT_SECS",
        "10",
        "the longest a shutdown takes, grace included; then the process exits anyway",
    )
    .range(1, 300),
    Var::described(
        "SECKILL_LOG_FORMAT",
        "json (pretty with SECKILL_DEV=1)",
        "log format: json or pretty",
    ),
    Var::described(
        "SECKILL_DEV",
        "unset",
        "1: fixed development secrets for any left unset; loopback listeners only",
    ),
    Var::new(
        "RUST_LOG",
        "info",
        "log filter (tracing's EnvFilter syntax)",
    ),
];

/// The variable of this name in [`VARS`].
pub fn var(name: &str) -> Option<&'static Var> {
    VARS.iter().find(|v| v.name == name)
}

/// The configuration as `seckill --help` lists it: every variable of [`VARS`], its default
/// (and bounds) and its meaning.
pub fn help() -> String {
    let mut out = String::from(
        "Configuration: environment variables, read once at start. A bad value stops start-up\n\
         with one line naming it (exit code 2); an unknown SECKILL_* variable is refused as a typo.\n",
    );
    for v in VARS {
        let default = match v.default {
            VarDefault::Value(value) => format!("default: {value}"),
            VarDefault::Described(text) => text.to_owned(),
        };
        let range = v
            .range
            .map(|(min, max)| format!("; {min} to {max}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "\n  {}  [{default}{range}]\n      {}",
            v.name, v.meaning
        ));
    }
    out
}

/// A configuration problem: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &str, message: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            message: message.into(),
        }
    }
}

/// `count` events per `period`, written `20000/1s` (units: ms, s, m, h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    pub fn period_ms(&self) -> u64 {
        u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}ms", self.count, self.period.as_millis())
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (count, period) = s
            .split_once('/')
            .ok_or_else(|| format!("expected COUNT/PERIOD like 20/1s, got {s:?}"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("count {count:?} is not a whole number"))?;
        if count == 0 {
            return Err("count must be at least 1".into());
        }
        let period = parse_duration(period.trim())?;
        if period.is_zero() {
            return Err("period must be longer than zero".into());
        }
        Ok(Rate { count, period })
    }
}

/// Parses `250ms`, `1s`, `2m`, `1h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("period {s:?} must start with a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("period {s:?} is too long"))
}

/// A trusted proxy: one address or a CIDR block (an [`ipnet::IpNet`]; a bare address is a
/// block of one, and an IPv4 block also matches the IPv4-mapped IPv6 form of its addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet(ipnet::IpNet);

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.0, ip) {
            (ipnet::IpNet::V4(_), IpAddr::V6(v6)) => {
                v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip)
            }
            _ => ip,
        };
        self.0.contains(&ip)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an IP address or CIDR block");
        if s.contains('/') {
            s.parse::<ipnet::IpNet>().map(IpNet).map_err(|_| bad())
        } else {
            s.parse::<IpAddr>()
                .map(|a| IpNet(ipnet::IpNet::from(a)))
                .map_err(|_| bad())
        }
    }
}

/// When a win is durable before its `202` (`SECKILL_REDIS_DURABILITY`; guarantee 3 of the
/// design). Written `fsync` (the default), `replicas:N` or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Nothing is awaited: a Redis crash loses every win since its last persistence point.
    None,
    /// Redis fsyncs a script's writes before it answers: it must run `appendonly yes` with
    /// `appendfsync always` (checked at start, where a mismatch refuses to start, and by
    /// `/readyz`).
    #[default]
    Fsync,
    /// After every win, `WAIT N` on the connection that ran the script: the `202` waits until
    /// N replicas hold the win (or the wait times out; see `reservations`).
    Replicas(NonZeroU16),
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::None => f.write_str("none"),
            Durability::Fsync => f.write_str("fsync"),
            Durability::Replicas(n) => write!(f, "replicas:{n}"),
        }
    }
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected fsync, replicas:N (N from 1 to 1000) or none, got {s:?}");
        match s {
            "none" => Ok(Durability::None),
            "fsync" => Ok(Durability::Fsync),
            _ => {
                let n: NonZeroU16 = s
                    .strip_prefix("replicas:")
                    .and_then(|n| n.parse().ok())
                    .filter(|n: &NonZeroU16| n.get() <= 1_000)
                    .ok_or_else(bad)?;
                Ok(Durability::Replicas(n))
            }
        }
    }
}

/// Where Redis is and how keys are named.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://host:port` or `redis-cluster://host:port,host:port,...`.
    pub url: String,
    /// Cluster mode (from the URL scheme or `SECKILL_REDIS_CLUSTER=1`).
    pub cluster: bool,
    /// Every key starts with this (tests isolate by it).
    pub prefix: String,
}

impl RedisSettings {
    /// The URL with its password replaced by `***`: the only form that may reach a log or an
    /// error message.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.redacted_url())
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// `scheme://user:secret@host...` → `scheme://user:***@host...`. Userinfo without a `:` may
/// be a bare password (see `redis::fred_config`), so it becomes `***` whole; the last `@` ends
/// the userinfo, as when the URL is parsed, so a password containing `@` is hidden whole too.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, hosts)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{hosts}"),
        None => format!("{scheme}://***@{hosts}"),
    }
}

/// Bounds on the shoppers' event streams (`SECKILL_SSE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseLimits {
    /// Streams one user may hold open at once in one process (beyond: `429 too_many_streams`).
    pub per_user: usize,
    /// Streams one process holds open at once (beyond: `503 streams_exhausted`).
    pub max: usize,
    /// A stream ends (with a `retry:` hint) after at most this long.
    pub lifetime: Duration,
    /// An idle stream gets a keep-alive comment this often.
    pub heartbeat: Duration,
}

/// How a process shuts down on SIGTERM (`SECKILL_DRAIN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// How long `/readyz` answers `503 draining` while everything else is still served, so a
    /// load balancer stops sending before the listeners stop accepting (roles serving shoppers).
    pub grace: Duration,
    /// The longest the whole shutdown takes, grace included; then the process exits anyway.
    pub timeout: Duration,
}

/// Secrets the HTTP API needs; present unless the variable was unset (checked per command).
#[derive(Clone)]
pub struct Secrets {
    pub jwt_secret: SecretString,
    pub admin_token: SecretString,
    pub token_secret: SecretString,
}

/// How attempts are gathered into one call (`SECKILL_RESERVE_BATCH_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most attempts per call; 1 decides each attempt with its own `reserve.lua` call.
    pub max: usize,
    /// The longest a queued attempt waits for the call in flight before it goes out beside it.
    pub window: Duration,
}

/// The whole configuration of one process.
#[derive(Clone)]
pub struct Settings {
    /// The shoppers' listener.
    pub http_addr: SocketAddr,
    /// The operators' listener (`/api/v1/admin/*`, `/metrics`).
    pub admin_addr: SocketAddr,
    /// A `worker` process's own listener (`/metrics`, `/healthz`, `/readyz`), on a port of its
    /// own so a `serve` and a `worker` on one host do not collide.
    pub worker_addr: SocketAddr,
    pub redis: RedisSettings,
    /// Postgres; the database is created if missing.
    pub database_url: String,
    /// `SECKILL_MIGRATE`: whether `serve`/`worker`/`all` apply migrations at start (else they
    /// only check that none is pending, for a runtime role without DDL rights).
    pub migrate: bool,
    pub amqp_url: String,
    /// Orders queue; its dead-letter queue is `<queue>.dlq`.
    pub amqp_queue: String,
    /// When a win is durable before its `202`.
    pub redis_durability: Durability,
    /// When set, shoppers' JWTs must carry this `aud` (unset: `aud` is not checked).
    pub jwt_audience: Option<String>,
    /// When set, shoppers' JWTs must carry this `iss` (unset: `iss` is not checked).
    pub jwt_issuer: Option<String>,
    /// `None` when unset (and not in development mode): `serve`/`all` refuse to start.
    secrets: Result<Secrets, ConfigError>,
    /// An unpaid order expires after this and its unit returns to stock.
    pub payment_timeout: Duration,
    /// How long a purchase token stays valid.
    pub purchase_token_ttl: Duration,
    /// Attempts one user may make on one product per window.
    pub user_rate: Rate,
    /// Admission gate per product (token bucket).
    pub product_rate: Rate,
    /// How purchase attempts on one product are gathered into one Redis call.
    pub reserve_batch: BatchSettings,
    /// Per client IP, in process.
    pub ip_rate: Rate,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Per client IP on the operators' listener, in process.
    pub admin_ip_rate: Rate,
    /// A request body must have arrived whole this long after its head (both listeners).
    pub body_timeout: Duration,
    /// Open connections one client address (an IPv6 /64) may hold on the shoppers' listener;
    /// trusted proxies are exempt.
    pub max_connections_per_ip: u32,
    /// Open connections on the shoppers' listener, over all its workers.
    pub max_connections: u32,
    /// Worker: most deliveries persisted in one transaction.
    pub worker_batch_size: usize,
    /// Worker: how long a batch waits to fill.
    pub worker_batch_wait: Duration,
    /// Worker: consumers per process, each persisting its own batches.
    pub worker_consumers: usize,
    /// Expiry sweeper period.
    pub sweep_interval: Duration,
    /// Outbox entries pending this long on a relay are taken over by another.
    pub relay_claim_idle: Duration,
    /// Most Postgres connections this process opens.
    pub pg_pool: u32,
    /// Redis connections of this process's pool (each pipelines every task's commands).
    pub redis_pool: usize,
    /// Event streams: how many one user may hold open at once, how many the process holds,
    /// how long one lives and how often an idle one gets a keep-alive comment.
    pub sse: SseLimits,
    /// The longest an idle relay waits before it looks again: the blocking read's timeout on a
    /// single Redis, the poll for other processes' winners on a cluster.
    pub relay_poll: Duration,
    /// How long a retired sale's keys stay in Redis (ended and drained) before they expire.
    pub key_grace: Duration,
    /// How a shutdown goes: not ready for a grace, then a drain, all within a timeout.
    pub drain: DrainSettings,
    /// Log format: JSON unless `pretty` (the default in development).
    pub log_pretty: bool,
    /// `SECKILL_DEV=1`: fixed development secrets, loopback listeners only.
    pub dev: bool,
    /// The secret variables development mode filled in because they were unset (each is
    /// logged at start).
    dev_filled: Vec<&'static str>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("http_addr", &self.http_addr)
            .field("admin_addr", &self.admin_addr)
            .field("worker_addr", &self.worker_addr)
            .field("redis", &self.redis)
            .field("redis_durability", &self.redis_durability)
            .field("amqp_queue", &self.amqp_queue)
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the given variables (tests pass their own).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        Self::read(&Env::new(&vars))
    }

    fn read(env: &Env<'_>) -> Result<Self, ConfigError> {
        let mut unknown: Vec<&String> = env
            .vars
            .keys()
            .filter(|k| k.starts_with("SECKILL_") && var(k).is_none())
            .collect();
        unknown.sort();
        if let Some(var) = unknown.first() {
            return Err(ConfigError::new(var, "unknown variable (typo?)"));
        }

        let dev = env.flag("SECKILL_DEV")?;
        let redis_url = env.string("SECKILL_REDIS_URL")?;
        if ![
            "redis://",
            "rediss://",
            "redis-cluster://",
            "rediss-cluster://",
        ]
        .iter()
        .any(|scheme| redis_url.starts_with(scheme))
        {
            return Err(ConfigError::new(
                "SECKILL_REDIS_URL",
                "must start with redis://, rediss:// (TLS), redis-cluster:// or rediss-cluster://",
            ));
        }
        let cluster = redis_url.starts_with("redis-cluster://")
            || redis_url.starts_with("rediss-cluster://")
            || env.flag("SECKILL_REDIS_CLUSTER")?;
        let prefix = env.string("SECKILL_REDIS_PREFIX")?;
        if prefix.is_empty() || prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError::new(
                "SECKILL_REDIS_PREFIX",
                "must be non-empty, without braces or spaces",
            ));
        }
        let database_url = env.string("SECKILL_DATABASE_URL")?;
        let migrate = match env.string("SECKILL_MIGRATE")?.as_str() {
            "1" => true,
            "0" => false,
            other => {
                return Err(ConfigError::new(
                    "SECKILL_MIGRATE",
                    format!("must be 1 or 0, got {other:?}"),
                ));
            }
        };
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "SECKILL_DATABASE_URL",
                "must be a postgres:// URL",
            ));
        }
        let amqp_url = env.string("SECKILL_AMQP_URL")?;
        if !amqp_url.starts_with("amqp://") {
            return Err(ConfigError::new(
                "SECKILL_AMQP_URL",
                "must be an amqp:// URL",
            ));
        }
        let amqp_queue = env.string("SECKILL_AMQP_QUEUE")?;
        if amqp_queue.is_empty() || amqp_queue.len() > 200 {
            return Err(ConfigError::new(
                "SECKILL_AMQP_QUEUE",
                "must be 1 to 200 characters",
            ));
        }

        let mut dev_filled = Vec::new();
        let secrets = (|| {
            let secrets = Secrets {
                jwt_secret: env.secret(
                    "SECKILL_JWT_SECRET",
                    dev,
                    DEV_JWT_SECRET,
                    &mut dev_filled,
                )?,
                admin_token: env.secret(
                    "SECKILL_ADMIN_TOKEN",
                    dev,
                    DEV_ADMIN_TOKEN,
                    &mut dev_filled,
                )?,
                token_secret: env.secret(
                    "SECKILL_TOKEN_SECRET",
                    dev,
                    DEV_TOKEN_SECRET,
                    &mut dev_filled,
                )?,
            };
            if secrets.token_secret.expose_secret() == secrets.jwt_secret.expose_secret() {
                return Err(ConfigError::new(
                    "SECKILL_TOKEN_SECRET",
                    "must differ from SECKILL_JWT_SECRET",
                ));
            }
            Ok(secrets)
        })();

        let trusted_proxies = match env.get("SECKILL_TRUSTED_PROXIES") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse()
                        .map_err(|e| ConfigError::new("SECKILL_TRUSTED_PROXIES", e))
                })
                .collect::<Result<_, _>>()?,
        };
        let log_pretty = match env.get("SECKILL_LOG_FORMAT").map(String::as_str) {
            None => dev,
            Some("json") => false,
            Some("pretty") => true,
            Some(_) => {
                return Err(ConfigError::new(
                    "SECKILL_LOG_FORMAT",
                    "must be json or pretty",
                ));
            }
        };

        let http_addr = env.listener("SECKILL_HTTP_ADDR", dev)?;
        let admin_addr = env.listener("SECKILL_ADMIN_ADDR", dev)?;
        let worker_addr = env.listener("SECKILL_WORKER_ADDR", dev)?;

        let drain = DrainSettings {
            grace: Duration::from_millis(env.ranged("SECKILL_DRAIN_GRACE_MS")?),
            timeout: Duration::from_secs(env.ranged("SECKILL_DRAIN_TIMEOUT_SECS")?),
        };
        if drain.grace >= drain.timeout {
            return Err(ConfigError::new(
                "SECKILL_DRAIN_GRACE_MS",
                format!(
                    "must be shorter than SECKILL_DRAIN_TIMEOUT_SECS ({} s), which includes the grace",
                    drain.timeout.as_secs()
                ),
            ));
        }

        Ok(Settings {
            http_addr,
            admin_addr,
            worker_addr,
            redis: RedisSettings {
                url: redis_url,
                cluster,
                prefix,
            },
            database_url,
            migrate,
            amqp_url,
            amqp_queue,
            redis_durability: env.parse("SECKILL_REDIS_DURABILITY")?,
            jwt_audience: env.optional("SECKILL_JWT_AUDIENCE")?,
            jwt_issuer: env.optional("SECKILL_JWT_ISSUER")?,
            secrets,
            payment_timeout: Duration::from_secs(env.ranged("SECKILL_PAYMENT_TIMEOUT_SECS")?),
            purchase_token_ttl: Duration::from_secs(env.ranged("SECKILL_PURCHASE_TOKEN_TTL_SECS")?),
            user_rate: env.parse("SECKILL_USER_RATE")?,
            product_rate: env.parse("SECKILL_PRODUCT_RATE")?,
            reserve_batch: BatchSettings {
                max: env.ranged_as("SECKILL_RESERVE_BATCH_MAX")?,
                window: Duration::from_micros(env.ranged("SECKILL_RESERVE_BATCH_WINDOW_US")?),
            },
            ip_rate: env.parse("SECKILL_IP_RATE")?,
            trusted_proxies,
            admin_ip_rate: env.parse("SECKILL_ADMIN_IP_RATE")?,
            body_timeout: Duration::from_millis(env.ranged("SECKILL_BODY_TIMEOUT_MS")?),
            max_connections_per_ip: env.ranged_as("SECKILL_MAX_CONNECTIONS_PER_IP")?,
            max_connections: env.ranged_as("SECKILL_MAX_CONNECTIONS")?,
            worker_batch_size: env.ranged_as("SECKILL_WORKER_BATCH_SIZE")?,
            worker_batch_wait: Duration::from_millis(env.ranged("SECKILL_WORKER_BATCH_WAIT_MS")?),
            sweep_interval: Duration::from_millis(env.ranged("SECKILL_SWEEP_INTERVAL_MS")?),
            worker_consumers: env.ranged_as("SECKILL_WORKER_CONSUMERS")?,
            relay_claim_idle: Duration::from_millis(env.ranged("SECKILL_RELAY_CLAIM_IDLE_MS")?),
            pg_pool: env.ranged_as("SECKILL_PG_POOL")?,
            redis_pool: env.ranged_as("SECKILL_REDIS_POOL")?,
            sse: SseLimits {
                per_user: env.ranged_as("SECKILL_SSE_PER_USER")?,
                max: env.ranged_as("SECKILL_SSE_MAX")?,
                lifetime: Duration::from_secs(env.ranged("SECKILL_SSE_LIFETIME_SECS")?),
                heartbeat: Duration::from_secs(env.ranged("SECKILL_SSE_HEARTBEAT_SECS")?),
            },
            relay_poll: Duration::from_millis(env.ranged("SECKILL_RELAY_POLL_MS")?),
            key_grace: Duration::from_secs(env.ranged("SECKILL_KEY_GRACE_SECS")?),
            drain,
            log_pretty,
            dev,
            dev_filled,
        })
    }

    /// The secret variables development mode filled in with its fixed values (to be logged).
    pub fn dev_secrets_filled(&self) -> &[&'static str] {
        &self.dev_filled
    }

    /// The secrets, or the error naming the first one missing.
    pub fn secrets(&self) -> Result<&Secrets, ConfigError> {
        self.secrets.as_ref().map_err(Clone::clone)
    }

    /// Replaces the secrets (tests and tools that mint their own).
    pub fn with_secrets(mut self, secrets: Secrets) -> Self {
        self.secrets = Ok(secrets);
        self
    }
}

/// The variables being read. Every read goes through [`Env::get`], which notes the name (so a
/// test can check that the parser reads exactly the variables of [`VARS`]); defaults and bounds
/// come from [`VARS`].
struct Env<'a> {
    vars: &'a HashMap<String, String>,
    read: RefCell<BTreeSet<&'static str>>,
}

impl<'a> Env<'a> {
    fn new(vars: &'a HashMap<String, String>) -> Self {
        Self {
            vars,
            read: RefCell::default(),
        }
    }

    fn get(&self, var: &'static str) -> Option<&'a String> {
        self.read.borrow_mut().insert(var);
        self.vars.get(var)
    }

    /// The variable's entry in [`VARS`]; one missing is a bug, reported like a bad setting.
    fn var(&self, name: &'static str) -> Result<&'static Var, ConfigError> {
        var(name).ok_or_else(|| ConfigError::new(name, "not in the configuration table (a bug)"))
    }

    /// The value, else the default of [`VARS`].
    fn string(&self, var: &'static str) -> Result<String, ConfigError> {
        if let Some(value) = self.get(var) {
            return Ok(value.clone());
        }
        match self.var(var)?.default {
            VarDefault::Value(default) => Ok(default.to_owned()),
            VarDefault::Described(_) => Err(ConfigError::new(var, "has no default value (a bug)")),
        }
    }

    fn parse<T: FromStr>(&self, var: &'static str) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let raw = self.string(var)?;
        raw.trim()
            .parse()
            .map_err(|e| ConfigError::new(var, format!("cannot parse {raw:?}: {e}")))
    }

    /// A whole number within the bounds of [`VARS`].
    fn ranged(&self, var: &'static str) -> Result<u64, ConfigError> {
        let value: u64 = self.parse(var)?;
        let Some((min, max)) = self.var(var)?.range else {
            return Err(ConfigError::new(var, "has no bounds (a bug)"));
        };
        if !(min..=max).contains(&value) {
            return Err(ConfigError::new(
                var,
                format!("must be between {min} and {max}"),
            ));
        }
        Ok(value)
    }

    /// [`Self::ranged`], as the integer type the setting is used as (its range fits the type).
    fn ranged_as<T: TryFrom<u64>>(&self, var: &'static str) -> Result<T, ConfigError> {
        let value = self.ranged(var)?;
        T::try_from(value).map_err(|_| ConfigError::new(var, format!("{value} is too large")))
    }

    /// An optional, non-empty string (unset is `None`).
    fn optional(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        match self.get(var) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Err(ConfigError::new(
                var,
                "must not be empty (unset it to not check the claim)",
            )),
            Some(v) => Ok(Some(v.clone())),
        }
    }

    fn flag(&self, var: &'static str) -> Result<bool, ConfigError> {
        match self.get(var).map(|s| s.trim()) {
            None | Some("") | Some("0") | Some("false") => Ok(false),
            Some("1") | Some("true") => Ok(true),
            Some(other) => Err(ConfigError::new(
                var,
                format!("must be 1 or 0, got {other:?}"),
            )),
        }
    }

    /// A listener address; in development mode it must be a loopback address.
    fn listener(&self, var: &'static str, dev: bool) -> Result<SocketAddr, ConfigError> {
        let addr: SocketAddr = self.parse(var)?;
        if dev && !addr.ip().is_loopback() {
            return Err(ConfigError::new(
                var,
                format!("{addr} is not a loopback address; SECKILL_DEV=1 listens on loopback only"),
            ));
        }
        Ok(addr)
    }

    /// A secret of at least 16 characters. Unset, development mode fills in `dev_value` and
    /// records `var` in `filled`; outside it, the public development values are refused.
    fn secret(
        &self,
        var: &'static str,
        dev: bool,
        dev_value: &str,
        filled: &mut Vec<&'static str>,
    ) -> Result<SecretString, ConfigError> {
        match self.get(var) {
            Some(v) if !dev && DEV_SECRETS.contains(&v.as_str()) => Err(ConfigError::new(
                var,
                "is a public development secret; set a secret of your own",
            )),
            Some(v) if v.len() >= 16 => Ok(SecretString::from(v.clone())),
            Some(_) => Err(ConfigError::new(var, "must be at least 16 characters")),
            None if dev => {
                filled.push(var);
                Ok(SecretString::from(dev_value.to_owned()))
            }
            None => Err(ConfigError::new(
                var,
                "required (set it, or SECKILL_DEV=1 for development secrets)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_design_table() {
        let s = Settings::from_vars(vars(&[("SECKILL_DEV", "1")])).unwrap();
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.admin_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(s.worker_addr.to_string(), "127.0.0.1:8082");
        assert_eq!(s.redis.url, "redis://127.0.0.1:6379");
        assert!(!s.redis.cluster);
        assert_eq!(s.redis.prefix, "seckill");
        assert_eq!(s.database_url, "postgres://postgres@127.0.0.1:5432/seckill");
        assert_eq!(s.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.amqp_queue, "seckill.orders");
        assert_eq!(s.redis_durability, Durability::Fsync);
        assert_eq!(s.payment_timeout, Duration::from_secs(900));
        assert_eq!(s.user_rate, "1/1s".parse().unwrap());
        assert_eq!(s.product_rate.count, 20_000);
        assert_eq!(s.ip_rate.count, 50);
        assert_eq!((s.pg_pool, s.redis_pool), (16, 4));
        assert_eq!(
            s.sse,
            SseLimits {
                per_user: 4,
                max: 10_000,
                lifetime: Duration::from_secs(300),
                heartbeat: Duration::from_secs(15),
            }
        );
        assert_eq!(s.admin_ip_rate, "100/1s".parse().unwrap());
        assert_eq!(s.body_timeout, Duration::from_secs(2));
        assert_eq!(s.max_connections_per_ip, 256);
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.relay_poll, Duration::from_secs(1));
        assert_eq!(s.key_grace, Duration::from_secs(86_400));
        assert_eq!(
            s.drain,
            DrainSettings {
                grace: Duration::from_secs(1),
                timeout: Duration::from_secs(10),
            }
        );
        assert!(s.secrets().is_ok());
    }

    #[test]
    fn a_serve_and_a_worker_on_one_host_listen_on_different_ports_by_default() {
        let s = Settings::from_vars(vars(&[("SECKILL_DEV", "1")])).unwrap();
        let ports = [
            s.http_addr.port(),
            s.admin_addr.port(),
            s.worker_addr.port(),
        ];
        assert_eq!(ports, [8080, 8081, 8082]);
    }

    #[test]
    fn the_drain_grace_is_part_of_the_drain_timeout() {
        let s = Settings::from_vars(vars(&[
            ("SECKILL_DRAIN_GRACE_MS", "0"),
            ("SECKILL_DRAIN_TIMEOUT_SECS", "1"),
        ]))
        .unwrap();
        assert_eq!(s.drain.grace, Duration::ZERO);
        let err = Settings::from_vars(vars(&[
            ("SECKILL_DRAIN_GRACE_MS", "2000"),
            ("SECKILL_DRAIN_TIMEOUT_SECS", "2"),
        ]))
        .err()
        .unwrap();
        assert_eq!(err.var, "SECKILL_DRAIN_GRACE_MS");
        assert!(err.message.contains("SECKILL_DRAIN_TIMEOUT_SECS"), "{err}");
    }

    /// The `SECKILL_*` (and `RUST_LOG`) names listed in a text, one per line starting `  NAME`.
    fn help_names(help: &str) -> BTreeSet<&str> {
        help.lines()
            .filter_map(|l| l.strip_prefix("  "))
            .filter(|l| l.starts_with("SECKILL_") || l.starts_with("RUST_LOG"))
            .filter_map(|l| l.split_whitespace().next())
            .collect()
    }

    fn table_names() -> BTreeSet<&'static str> {
        VARS.iter().map(|v| v.name).collect()
    }

    #[test]
    fn the_parser_reads_exactly_the_variables_of_the_table() {
        let set = [("SECKILL_DEV", "1")].map(|(k, v)| (k.to_owned(), v.to_owned()));
        let map: HashMap<String, String> = set.into_iter().collect();
        let env = Env::new(&map);
        Settings::read(&env).unwrap();
        let mut want = table_names();
        // Read by the log subscriber (`telemetry`), not by `Settings`.
        want.remove("RUST_LOG");
        assert_eq!(*env.read.borrow(), want);
        // Each accepted, none refused as unknown.
        for v in VARS {
            let value = match v.default {
                VarDefault::Value(value) => value,
                VarDefault::Described(_) => continue,
            };
            let s = Settings::from_vars(vars(&[("SECKILL_DEV", "1"), (v.name, value)]));
            assert!(s.is_ok(), "{}={value}: {:?}", v.name, s.err());
        }
    }

    #[test]
    fn every_default_lies_within_its_bounds() {
        for v in VARS.iter().filter(|v| v.range.is_some()) {
            let (min, max) = v.range.unwrap();
            let VarDefault::Value(default) = v.default else {
                panic!("{} has bounds but no default", v.name);
            };
            let default: u64 = default.parse().unwrap();
            assert!((min..=max).contains(&default), "{}", v.name);
        }
    }

    #[test]
    fn the_help_lists_every_variable_and_only_those() {
        let help = help();
        assert_eq!(help_names(&help), table_names());
        for v in VARS {
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{} ", v.name)))
                .unwrap();
            assert!(line.contains(v.default_text()), "{line}");
            assert!(help.contains(v.meaning), "{}", v.name);
        }
        assert!(help.contains("[default: 127.0.0.1:8082]"), "{help}");
        assert!(help.contains("[default: 16; 1 to 1000]"), "{help}");
    }

    /// The rows of the README's configuration table: name and default, backticks removed.
    fn readme_rows() -> Vec<(String, String)> {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("README.md has a Configuration section");
        section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<String> = l.split('|').map(|c| c.trim().replace('`', "")).collect();
                (cells[1].clone(), cells[2].clone())
            })
            .collect()
    }

    #[test]
    fn the_readme_table_lists_every_variable_with_its_default() {
        let rows = readme_rows();
        let names: BTreeSet<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, table_names(), "README.md's configuration table");
        for (name, default) in &rows {
            let want = var(name).unwrap().default_text();
            assert_eq!(default, want, "README.md's default of {name}");
        }
    }

    #[test]
    fn a_missing_secret_names_the_variable() {
        let s = Settings::from_vars(vars(&[])).unwrap();
        let err = s.secrets().err().unwrap();
        assert_eq!(err.var, "SECKILL_JWT_SECRET");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("SECKILL_HTTP_ADDR", "nowhere"),
            ("SECKILL_WORKER_ADDR", "127.0.0.1"),
            ("SECKILL_DRAIN_GRACE_MS", "60001"),
            ("SECKILL_DRAIN_TIMEOUT_SECS", "0"),
            ("SECKILL_DRAIN_TIMEOUT_SECS", "301"),
            ("SECKILL_USER_RATE", "0/1s"),
            ("SECKILL_PRODUCT_RATE", "10/1y"),
            ("SECKILL_PAYMENT_TIMEOUT_SECS", "-5"),
            ("SECKILL_REDIS_URL", "http://x"),
            ("SECKILL_TRUSTED_PROXIES", "10.0.0.0/99"),
            ("SECKILL_DEV", "yes"),
            ("SECKILL_ADMIN_IP_RATE", "lots"),
            ("SECKILL_BODY_TIMEOUT_MS", "10"),
            ("SECKILL_MAX_CONNECTIONS_PER_IP", "0"),
            ("SECKILL_MAX_CONNECTIONS", "-1"),
            ("SECKILL_REDIS_DURABILITY", "always"),
            ("SECKILL_SSE_PER_USER", "0"),
            ("SECKILL_SSE_MAX", "many"),
            ("SECKILL_SSE_LIFETIME_SECS", "0"),
            ("SECKILL_SSE_HEARTBEAT_SECS", "-1"),
            ("SECKILL_RELAY_POLL_MS", "5"),
            ("SECKILL_KEY_GRACE_SECS", "0"),
            ("SECKILL_JWT_SECRE", "typo"),
            ("SECKILL_PG_POOL", "0"),
            ("SECKILL_REDIS_POOL", "many"),
            ("SECKILL_REDIS_POOL", "257"),
        ] {
            let err = Settings::from_vars(vars(&[(var, value)])).err().unwrap();
            assert_eq!(err.var, var, "{value}");
        }
    }

    #[test]
    fn pool_sizes_are_settings() {
        let s = Settings::from_vars(vars(&[
            ("SECKILL_PG_POOL", "40"),
            ("SECKILL_REDIS_POOL", "8"),
        ]))
        .unwrap();
        assert_eq!((s.pg_pool, s.redis_pool), (40, 8));
    }

    #[test]
    fn cluster_mode_follows_the_scheme_or_the_flag() {
        let s =
            Settings::from_vars(vars(&[("SECKILL_REDIS_URL", "redis-cluster://a:1,b:2")])).unwrap();
        assert!(s.redis.cluster);
        let s = Settings::from_vars(vars(&[("SECKILL_REDIS_CLUSTER", "1")])).unwrap();
        assert!(s.redis.cluster);
        let s = Settings::from_vars(vars(&[("SECKILL_REDIS_URL", "rediss-cluster://a:1,b:2")]))
            .unwrap();
        assert!(s.redis.cluster);
        let s = Settings::from_vars(vars(&[("SECKILL_REDIS_URL", "rediss://a:1")])).unwrap();
        assert!(!s.redis.cluster);
        assert!(Settings::from_vars(vars(&[("SECKILL_REDIS_URL", "http://a:1")])).is_err());
    }

    #[test]
    fn rates_and_durations_parse() {
        assert_eq!(
            "50/250ms".parse::<Rate>().unwrap(),
            Rate {
                count: 50,
                period: Duration::from_millis(250)
            }
        );
        assert_eq!(
            "3/2m".parse::<Rate>().unwrap().period,
            Duration::from_secs(120)
        );
        assert!("x/1s".parse::<Rate>().is_err());
        assert!("5/0s".parse::<Rate>().is_err());
    }

    #[test]
    fn durability_is_fsync_replicas_or_none() {
        for (raw, want) in [
            ("fsync", Durability::Fsync),
            ("none", Durability::None),
            (
                " replicas:2 ",
                Durability::Replicas(NonZeroU16::new(2).unwrap()),
            ),
            (
                "replicas:1000",
                Durability::Replicas(NonZeroU16::new(1000).unwrap()),
            ),
        ] {
            let s = Settings::from_vars(vars(&[("SECKILL_REDIS_DURABILITY", raw)])).unwrap();
            assert_eq!(s.redis_durability, want, "{raw}");
            assert_eq!(want.to_string(), raw.trim());
        }
        for bad in [
            "",
            "FSYNC",
            "always",
            "replicas",
            "replicas:",
            "replicas:0",
            "replicas:-1",
            "replicas:1001",
            "replicas:two",
        ] {
            let err = Settings::from_vars(vars(&[("SECKILL_REDIS_DURABILITY", bad)]))
                .err()
                .unwrap();
            assert_eq!(err.var, "SECKILL_REDIS_DURABILITY", "{bad:?}");
            let line = err.to_string();
            assert!(
                line.contains("replicas:N") && !line.contains('\n'),
                "{line}"
            );
        }
    }

    #[test]
    fn proxies_match_addresses_and_blocks() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
    }

    const OWN: [(&str, &str); 3] = [
        ("SECKILL_JWT_SECRET", "own-jwt-secret-0123456789"),
        ("SECKILL_ADMIN_TOKEN", "own-admin-token-0123456789"),
        ("SECKILL_TOKEN_SECRET", "own-token-secret-0123456789"),
    ];

    #[test]
    fn development_mode_listens_on_loopback_only() {
        for var in [
            "SECKILL_HTTP_ADDR",
            "SECKILL_ADMIN_ADDR",
            "SECKILL_WORKER_ADDR",
        ] {
            for addr in ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080"] {
                let err = Settings::from_vars(vars(&[("SECKILL_DEV", "1"), (var, addr)]))
                    .err()
                    .unwrap();
                assert_eq!(err.var, var, "{addr}");
                assert!(err.to_string().contains("loopback"), "{err}");
                // Outside development mode the same address is fine.
                assert!(Settings::from_vars(vars(&[(var, addr)])).is_ok(), "{addr}");
            }
            for addr in ["127.0.0.1:0", "127.5.5.5:8080", "[::1]:8080"] {
                let s = Settings::from_vars(vars(&[("SECKILL_DEV", "1"), (var, addr)]));
                assert!(s.is_ok(), "{var}={addr}");
            }
        }
    }

    #[test]
    fn development_mode_fills_in_only_the_unset_secrets_and_says_which() {
        let s = Settings::from_vars(vars(&[("SECKILL_DEV", "1")])).unwrap();
        assert_eq!(
            s.dev_secrets_filled(),
            [
                "SECKILL_JWT_SECRET",
                "SECKILL_ADMIN_TOKEN",
                "SECKILL_TOKEN_SECRET"
            ]
        );
        let s = Settings::from_vars(vars(&[("SECKILL_DEV", "1"), OWN[1]])).unwrap();
        assert_eq!(
            s.dev_secrets_filled(),
            ["SECKILL_JWT_SECRET", "SECKILL_TOKEN_SECRET"]
        );
        let secrets = s.secrets().unwrap();
        assert_eq!(secrets.admin_token.expose_secret(), OWN[1].1);
        assert_eq!(secrets.jwt_secret.expose_secret(), DEV_JWT_SECRET);
        let mut all = OWN.to_vec();
        all.push(("SECKILL_DEV", "1"));
        let s = Settings::from_vars(vars(&all)).unwrap();
        assert!(s.dev_secrets_filled().is_empty());
        let s = Settings::from_vars(vars(&OWN)).unwrap();
        assert!(s.dev_secrets_filled().is_empty());
        assert!(s.secrets().is_ok());
    }

    #[test]
    fn development_secrets_are_refused_outside_development_mode() {
        for (i, (var, _)) in OWN.iter().enumerate() {
            for dev_value in DEV_SECRETS {
                let mut set = OWN.to_vec();
                set[i] = (var, dev_value);
                let s = Settings::from_vars(vars(&set)).unwrap();
                let err = s.secrets().err().unwrap();
                assert_eq!(err.var, *var, "{dev_value}");
                assert_eq!(
                    err.to_string(),
                    format!("{var}: is a public development secret; set a secret of your own")
                );
                set.push(("SECKILL_DEV", "1"));
                let s = Settings::from_vars(vars(&set)).unwrap();
                assert!(s.secrets().is_ok(), "{var}={dev_value} in development");
            }
        }
    }

    #[test]
    fn the_purchase_token_secret_must_differ_from_the_jwt_secret() {
        let same = "the-same-secret-0123456789";
        let s = Settings::from_vars(vars(&[
            ("SECKILL_JWT_SECRET", same),
            OWN[1],
            ("SECKILL_TOKEN_SECRET", same),
        ]))
        .unwrap();
        let err = s.secrets().err().unwrap();
        assert_eq!(
            err.to_string(),
            "SECKILL_TOKEN_SECRET: must differ from SECKILL_JWT_SECRET"
        );
    }

    #[test]
    fn jwt_audience_and_issuer_are_optional() {
        let s = Settings::from_vars(vars(&[])).unwrap();
        assert_eq!((s.jwt_audience, s.jwt_issuer), (None, None));
        let s = Settings::from_vars(vars(&[
            ("SECKILL_JWT_AUDIENCE", "seckill-shop"),
            ("SECKILL_JWT_ISSUER", "https://id.example"),
        ]))
        .unwrap();
        assert_eq!(s.jwt_audience.as_deref(), Some("seckill-shop"));
        assert_eq!(s.jwt_issuer.as_deref(), Some("https://id.example"));
        for var in ["SECKILL_JWT_AUDIENCE", "SECKILL_JWT_ISSUER"] {
            let err = Settings::from_vars(vars(&[(var, " ")])).err().unwrap();
            assert_eq!(err.var, var);
        }
    }

    #[test]
    fn redis_passwords_are_redacted() {
        for (url, want) in [
            (
                "redis://user:secret@host:6379",
                "redis://user:***@host:6379",
            ),
            ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
            ("redis://secret@host", "redis://***@host"),
            ("redis://u:p@ss:w@rd@host:1", "redis://u:***@host:1"),
            (
                "redis-cluster://admin:hunter2@a:7000,b:7001",
                "redis-cluster://admin:***@a:7000,b:7001",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
        let s = Settings::from_vars(vars(&[(
            "SECKILL_REDIS_URL",
            "redis://user:hunter2@127.0.0.1:6379",
        )]))
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
        assert!(format!("{:?}", s.redis).contains("redis://user:***@127.0.0.1:6379"));
    }
}
