//! Reading [`Settings`] from the environment: [`Settings::read`] puts together the sections,
//! each read by a function of its own; a bad value is an error that names its variable.

use std::{collections::HashMap, time::Duration};

use secrecy::{ExposeSecret, SecretString};

use super::{
    BatchSettings, ConfigError, DrainSettings, IpNet, RedisSettings, Secrets, Settings, SseLimits,
    env::{DEV_ADMIN_TOKEN, DEV_JWT_SECRET, DEV_SECRETS, DEV_SERVICE_TOKEN, DEV_TOKEN_SECRET, Env},
    var,
};

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

    /// The sections in the order they are read, so that of several bad values the same one is
    /// reported first.
    fn read(env: &Env<'_>) -> Result<Self, ConfigError> {
        reject_unknown(env)?;
        let dev = env.flag("SECKILL_DEV")?;
        let redis = redis(env)?;
        let (database_url, migrate) = postgres(env)?;
        let (amqp_url, amqp_queue) = amqp(env)?;
        let mut dev_filled = Vec::new();
        let secrets = secrets(env, dev, &mut dev_filled);
        let trusted_proxies = trusted_proxies(env)?;
        let log_pretty = log_pretty(env, dev)?;

        let http_addr = env.listener("SECKILL_HTTP_ADDR", dev)?;
        let admin_addr = env.listener("SECKILL_ADMIN_ADDR", dev)?;
        let worker_addr = env.listener("SECKILL_WORKER_ADDR", dev)?;

        let drain = drain(env)?;

        Ok(Settings {
            http_addr,
            admin_addr,
            worker_addr,
            redis,
            database_url,
            migrate,
            amqp_url,
            amqp_queue,
            redis_durability: env.parse("SECKILL_REDIS_DURABILITY")?,
            jwt_audience: env.optional("SECKILL_JWT_AUDIENCE")?,
            jwt_issuer: env.optional("SECKILL_JWT_ISSUER")?,
            jwt_jwks_url: jwks_url(env)?,
            jwt_public_keys: public_keys(env)?,
            checkout_url: checkout_url(env)?,
            currency: currency(env)?,
            events_exchange: events_exchange(env)?,
            webhook: webhook(env, dev)?,
            secrets,
            view_cache_control: view_cache_control(env)?,
            room: super::RoomSettings {
                opens_before: Duration::from_secs(env.ranged("SECKILL_ROOM_OPENS_SECS")?),
                factor_percent: env.ranged("SECKILL_ROOM_FACTOR_PERCENT")?,
                rate: env.ranged("SECKILL_ROOM_ADMIT_RATE")?,
                admission: Duration::from_secs(env.ranged("SECKILL_ROOM_ADMISSION_SECS")?),
                pow: pow(env)?,
            },
            payment_timeout: Duration::from_secs(env.ranged("SECKILL_PAYMENT_TIMEOUT_SECS")?),
            purchase_token_ttl: Duration::from_secs(env.ranged("SECKILL_PURCHASE_TOKEN_TTL_SECS")?),
            user_rate: env.parse("SECKILL_USER_RATE")?,
            product_rate: env.parse("SECKILL_PRODUCT_RATE")?,
            reserve_batch: reserve_batch(env)?,
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
            sse: sse(env)?,
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

/// Refuses a `SECKILL_*` variable that is not in the table (the first by name): a typo.
fn reject_unknown(env: &Env<'_>) -> Result<(), ConfigError> {
    let mut unknown: Vec<&String> = env
        .vars
        .keys()
        .filter(|k| k.starts_with("SECKILL_") && var(k).is_none())
        .collect();
    unknown.sort();
    if let Some(var) = unknown.first() {
        return Err(ConfigError::new(var, "unknown variable (typo?)"));
    }
    Ok(())
}

/// Where Redis is (`SECKILL_REDIS_URL`), whether it is a cluster, and the key prefix.
fn redis(env: &Env<'_>) -> Result<RedisSettings, ConfigError> {
    let redis_url = env.string("SECKILL_REDIS_URL")?;
    if ![
        "redis://",
        "rediss://",
        "redis-cluster://",
        "rediss-cluster://",
        "redis-sentinel://",
        "rediss-sentinel://",
    ]
    .iter()
    .any(|scheme| redis_url.starts_with(scheme))
    {
        return Err(ConfigError::new(
            "SECKILL_REDIS_URL",
            "must start with redis://, rediss:// (TLS), redis-cluster://, rediss-cluster://, \
             redis-sentinel:// or rediss-sentinel://",
        ));
    }
    if redis_url.contains("-sentinel://") {
        let service = redis_url
            .split_once("://")
            .and_then(|(_, rest)| {
                rest.rsplit_once('@')
                    .map_or(rest, |(_, h)| h)
                    .split_once('/')
            })
            .map(|(_, service)| service.trim_end_matches('/'));
        if service.is_none_or(str::is_empty) {
            return Err(ConfigError::new(
                "SECKILL_REDIS_URL",
                "a redis-sentinel:// URL lists the sentinels and ends with the service name: \
                 redis-sentinel://host:port,host:port/<service name>",
            ));
        }
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
    Ok(RedisSettings {
        url: redis_url,
        cluster,
        prefix,
    })
}

/// The Postgres URL and whether migrations are applied at start (`SECKILL_MIGRATE`).
fn postgres(env: &Env<'_>) -> Result<(String, bool), ConfigError> {
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
    Ok((database_url, migrate))
}

/// The RabbitMQ URL and the orders queue.
fn amqp(env: &Env<'_>) -> Result<(String, String), ConfigError> {
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
    Ok((amqp_url, amqp_queue))
}

/// The secrets, or the error naming the first one missing or refused: kept, not returned, as
/// only the commands that serve the API need them. Development mode fills in the unset ones
/// and records their names in `dev_filled`.
fn secrets(
    env: &Env<'_>,
    dev: bool,
    dev_filled: &mut Vec<&'static str>,
) -> Result<Secrets, ConfigError> {
    // Any one source of shoppers' keys is enough; development mode fills in the secret only
    // when there is none.
    let public =
        env.get("SECKILL_JWT_JWKS_URL").is_some() || env.get("SECKILL_JWT_PUBLIC_KEYS").is_some();
    let jwt_secret = if public && env.get("SECKILL_JWT_SECRET").is_none() {
        None
    } else {
        Some(env.secret("SECKILL_JWT_SECRET", dev, DEV_JWT_SECRET, dev_filled).map_err(|e| {
            if e.var == "SECKILL_JWT_SECRET" && !dev && env.get("SECKILL_JWT_SECRET").is_none() {
                ConfigError::new(
                    "SECKILL_JWT_SECRET",
                    "required: the shoppers' JWT keys (set SECKILL_JWT_SECRET for HS256, SECKILL_JWT_JWKS_URL or SECKILL_JWT_PUBLIC_KEYS for the login's public keys, or SECKILL_DEV=1 for development secrets)",
                )
            } else {
                e
            }
        })?)
    };
    let mut secrets = Secrets {
        jwt_secret,
        admin_token: env.secret("SECKILL_ADMIN_TOKEN", dev, DEV_ADMIN_TOKEN, dev_filled)?,
        token_secret: env.secret("SECKILL_TOKEN_SECRET", dev, DEV_TOKEN_SECRET, dev_filled)?,
        service_tokens: Vec::new(),
    };
    // A secret that opens two doors is one door.
    let named = [
        ("SECKILL_JWT_SECRET", secrets.jwt_secret.as_ref()),
        ("SECKILL_ADMIN_TOKEN", Some(&secrets.admin_token)),
        ("SECKILL_TOKEN_SECRET", Some(&secrets.token_secret)),
    ];
    for (i, (later, b)) in named.iter().enumerate() {
        for (earlier, a) in &named[..i] {
            if let (Some(a), Some(b)) = (a, b)
                && a.expose_secret() == b.expose_secret()
            {
                return Err(ConfigError::new(
                    later,
                    format!("must differ from {earlier}"),
                ));
            }
        }
    }
    secrets.service_tokens = service_tokens(env, dev, dev_filled, &secrets)?;
    Ok(secrets)
}

/// The shortest service token: a server-to-server secret has no human to remember it.
const SERVICE_TOKEN_MIN: usize = 32;

/// `SECKILL_SERVICE_TOKENS`: comma-separated, each at least [`SERVICE_TOKEN_MIN`] characters,
/// none a public development secret (outside development mode) or a placeholder, none equal to
/// another secret (a token that opens two doors is one door). Unset: none, or in development
/// mode the development token.
fn service_tokens(
    env: &Env<'_>,
    dev: bool,
    dev_filled: &mut Vec<&'static str>,
    others: &Secrets,
) -> Result<Vec<SecretString>, ConfigError> {
    const VAR: &str = "SECKILL_SERVICE_TOKENS";
    let Some(list) = env.get(VAR) else {
        if dev {
            dev_filled.push(VAR);
            return Ok(vec![SecretString::from(DEV_SERVICE_TOKEN.to_owned())]);
        }
        return Ok(Vec::new());
    };
    let mut tokens: Vec<SecretString> = Vec::new();
    for (i, token) in list.split(',').map(str::trim).enumerate() {
        let which = i + 1;
        let refuse = |why: &str| Err(ConfigError::new(VAR, format!("token {which} {why}")));
        if token.is_empty() {
            return refuse("is empty (no empty entries between commas)");
        }
        if !dev && DEV_SECRETS.contains(&token) {
            return refuse("is a public development secret; set a secret of your own");
        }
        if token.len() < SERVICE_TOKEN_MIN {
            return refuse("must be at least 32 characters");
        }
        if is_placeholder(token) {
            return refuse("looks like a placeholder; generate one (e.g. openssl rand -hex 32)");
        }
        let clash = [
            ("SECKILL_ADMIN_TOKEN", Some(&others.admin_token)),
            ("SECKILL_JWT_SECRET", others.jwt_secret.as_ref()),
            ("SECKILL_TOKEN_SECRET", Some(&others.token_secret)),
        ]
        .into_iter()
        .find(|(_, s)| s.is_some_and(|s| s.expose_secret() == token));
        if let Some((name, _)) = clash {
            return refuse(&format!("must differ from {name}"));
        }
        if !tokens.iter().any(|t| t.expose_secret() == token) {
            tokens.push(SecretString::from(token.to_owned()));
        }
    }
    Ok(tokens)
}

/// Text a template or an example leaves in place of a secret: one repeated character, or a
/// word that says so.
pub(super) fn is_placeholder(token: &str) -> bool {
    let lower = token.to_ascii_lowercase();
    let mut chars = token.chars();
    let first = chars.next();
    chars.all(|c| Some(c) == first)
        || [
            "changeme",
            "change-me",
            "change_me",
            "replace",
            "placeholder",
            "example",
            "your-",
            "your_",
            "<",
            "xxxx",
        ]
        .iter()
        .any(|w| lower.contains(w))
}

/// `SECKILL_EVENTS_EXCHANGE`: an exchange name RabbitMQ takes (1 to 200 characters).
fn events_exchange(env: &Env<'_>) -> Result<String, ConfigError> {
    let name = env.string("SECKILL_EVENTS_EXCHANGE")?;
    if name.is_empty() || name.len() > 200 || name.starts_with("amq.") {
        return Err(ConfigError::new(
            "SECKILL_EVENTS_EXCHANGE",
            "must be 1 to 200 characters, not starting with amq. (reserved by RabbitMQ)",
        ));
    }
    Ok(name)
}

/// `SECKILL_WEBHOOK_URL` and `SECKILL_WEBHOOK_SECRET`: both or neither; the secret at least 32
/// characters and not a placeholder (nor, outside development mode, a public one).
fn webhook(env: &Env<'_>, dev: bool) -> Result<Option<super::WebhookSettings>, ConfigError> {
    let url = env.get("SECKILL_WEBHOOK_URL");
    let secret = env.get("SECKILL_WEBHOOK_SECRET");
    let (url, secret) = match (url, secret) {
        (None, None) => return Ok(None),
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "SECKILL_WEBHOOK_SECRET",
                "is set without SECKILL_WEBHOOK_URL",
            ));
        }
        (Some(_), None) => {
            return Err(ConfigError::new(
                "SECKILL_WEBHOOK_SECRET",
                "required with SECKILL_WEBHOOK_URL (it signs every delivery)",
            ));
        }
        (Some(url), Some(secret)) => (url, secret),
    };
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(ConfigError::new(
            "SECKILL_WEBHOOK_URL",
            "must be an http:// or https:// URL",
        ));
    }
    if secret.len() < SERVICE_TOKEN_MIN {
        return Err(ConfigError::new(
            "SECKILL_WEBHOOK_SECRET",
            "must be at least 32 characters",
        ));
    }
    if is_placeholder(secret) || (!dev && DEV_SECRETS.contains(&secret.as_str())) {
        return Err(ConfigError::new(
            "SECKILL_WEBHOOK_SECRET",
            "looks like a placeholder; generate one (e.g. openssl rand -hex 32)",
        ));
    }
    Ok(Some(super::WebhookSettings {
        url: url.clone(),
        secret: SecretString::from(secret.clone()),
    }))
}

/// `SECKILL_CHECKOUT_URL`: an http(s) URL template holding `{order_id}`.
fn checkout_url(env: &Env<'_>) -> Result<Option<String>, ConfigError> {
    const VAR: &str = "SECKILL_CHECKOUT_URL";
    let Some(url) = env.get(VAR) else {
        return Ok(None);
    };
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(ConfigError::new(VAR, "must be an http:// or https:// URL"));
    }
    if !url.contains("{order_id}") {
        return Err(ConfigError::new(
            VAR,
            "must contain {order_id}, where the order's id goes",
        ));
    }
    if url
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'')
    {
        return Err(ConfigError::new(VAR, "must not contain spaces or quotes"));
    }
    Ok(Some(url.clone()))
}

/// `SECKILL_CURRENCY`: an ISO 4217 code (three capital letters).
fn currency(env: &Env<'_>) -> Result<String, ConfigError> {
    let code = env.string("SECKILL_CURRENCY")?;
    if !crate::domain::is_currency_code(&code) {
        return Err(ConfigError::new(
            "SECKILL_CURRENCY",
            "must be an ISO 4217 code: three capital letters, e.g. EUR",
        ));
    }
    Ok(code)
}

/// `SECKILL_JWT_JWKS_URL`: an https:// URL (http:// only on a loopback host).
fn jwks_url(env: &Env<'_>) -> Result<Option<String>, ConfigError> {
    const VAR: &str = "SECKILL_JWT_JWKS_URL";
    let Some(raw) = env.get(VAR) else {
        return Ok(None);
    };
    let url = reqwest::Url::parse(raw.trim())
        .map_err(|e| ConfigError::new(VAR, format!("is not a URL ({e})")))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(ConfigError::new(
                VAR,
                "must be an https:// URL (http:// only on a loopback address): the keys that admit shoppers must not travel in the clear",
            ));
        }
        _ => return Err(ConfigError::new(VAR, "must be an https:// URL")),
    }
    Ok(Some(url.to_string()))
}

/// `SECKILL_JWT_PUBLIC_KEYS`: comma-separated paths of PEM files (read at start).
fn public_keys(env: &Env<'_>) -> Result<Vec<std::path::PathBuf>, ConfigError> {
    const VAR: &str = "SECKILL_JWT_PUBLIC_KEYS";
    let Some(list) = env.get(VAR) else {
        return Ok(Vec::new());
    };
    list.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, path)| {
            if path.is_empty() {
                Err(ConfigError::new(
                    VAR,
                    format!("path {} is empty (no empty entries between commas)", i + 1),
                ))
            } else {
                Ok(std::path::PathBuf::from(path))
            }
        })
        .collect()
}

/// `SECKILL_TRUSTED_PROXIES`: a comma-separated list of addresses and CIDR blocks.
fn trusted_proxies(env: &Env<'_>) -> Result<Vec<IpNet>, ConfigError> {
    Ok(match env.get("SECKILL_TRUSTED_PROXIES") {
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
    })
}

/// `SECKILL_LOG_FORMAT`: pretty logs, else JSON (unset: pretty in development mode).
fn log_pretty(env: &Env<'_>, dev: bool) -> Result<bool, ConfigError> {
    match env.get("SECKILL_LOG_FORMAT").map(String::as_str) {
        None => Ok(dev),
        Some("json") => Ok(false),
        Some("pretty") => Ok(true),
        Some(_) => Err(ConfigError::new(
            "SECKILL_LOG_FORMAT",
            "must be json or pretty",
        )),
    }
}

/// The shutdown's grace and timeout (`SECKILL_DRAIN_*`): the grace is part of the timeout.
fn drain(env: &Env<'_>) -> Result<DrainSettings, ConfigError> {
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
    Ok(drain)
}

/// The `Cache-Control` of a product's view (`SECKILL_VIEW_*`): public (nothing in it is
/// personal), briefly fresh, then served stale while a cache asks again.
fn view_cache_control(env: &Env<'_>) -> Result<String, ConfigError> {
    let max_age: u64 = env.ranged("SECKILL_VIEW_MAX_AGE_SECS")?;
    let stale: u64 = env.ranged("SECKILL_VIEW_STALE_SECS")?;
    Ok(match (max_age, stale) {
        (0, 0) => "public, no-cache".to_owned(),
        (_, 0) => format!("public, max-age={max_age}"),
        _ => format!("public, max-age={max_age}, stale-while-revalidate={stale}"),
    })
}

/// The waiting rooms' proof of work (`SECKILL_POW_*`): the bounds must be in order.
fn pow(env: &Env<'_>) -> Result<super::PowSettings, ConfigError> {
    let s = super::PowSettings {
        min_bits: env.ranged_as("SECKILL_POW_MIN_BITS")?,
        max_bits: env.ranged_as("SECKILL_POW_MAX_BITS")?,
        join_rate: env.ranged_as("SECKILL_POW_JOIN_RATE")?,
    };
    if s.max_bits < s.min_bits {
        return Err(ConfigError::new(
            "SECKILL_POW_MAX_BITS",
            format!("must be at least SECKILL_POW_MIN_BITS ({})", s.min_bits),
        ));
    }
    Ok(s)
}

/// How purchase attempts are gathered into one call (`SECKILL_RESERVE_BATCH_*`).
fn reserve_batch(env: &Env<'_>) -> Result<BatchSettings, ConfigError> {
    Ok(BatchSettings {
        max: env.ranged_as("SECKILL_RESERVE_BATCH_MAX")?,
        window: Duration::from_micros(env.ranged("SECKILL_RESERVE_BATCH_WINDOW_US")?),
        calls: env.ranged_as("SECKILL_RESERVE_LANE_CALLS")?,
    })
}

/// The bounds on the shoppers' event streams (`SECKILL_SSE_*`).
fn sse(env: &Env<'_>) -> Result<SseLimits, ConfigError> {
    Ok(SseLimits {
        per_user: env.ranged_as("SECKILL_SSE_PER_USER")?,
        max: env.ranged_as("SECKILL_SSE_MAX")?,
        lifetime: Duration::from_secs(env.ranged("SECKILL_SSE_LIFETIME_SECS")?),
        heartbeat: Duration::from_secs(env.ranged("SECKILL_SSE_HEARTBEAT_SECS")?),
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, num::NonZeroU16};

    use super::*;
    use crate::config::{Durability, VARS, VarDefault, env::DEV_SECRETS};

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
    fn every_secret_is_its_own_and_none_a_placeholder() {
        let base = [
            ("SECKILL_JWT_SECRET", "own-jwt-secret-0123456789"),
            ("SECKILL_ADMIN_TOKEN", "own-admin-token-0123456789"),
            ("SECKILL_TOKEN_SECRET", "own-token-secret-0123456789"),
        ];
        let with = |var: &'static str, value: &'static str| {
            let mut all: Vec<(&str, &str)> =
                base.iter().filter(|(k, _)| *k != var).copied().collect();
            all.push((var, value));
            Settings::from_vars(vars(&all)).unwrap().secrets().err()
        };
        assert!(Settings::from_vars(vars(&base)).unwrap().secrets().is_ok());
        let err = with("SECKILL_ADMIN_TOKEN", "own-jwt-secret-0123456789").unwrap();
        assert_eq!(
            err.to_string(),
            "SECKILL_ADMIN_TOKEN: must differ from SECKILL_JWT_SECRET"
        );
        let err = with("SECKILL_TOKEN_SECRET", "own-admin-token-0123456789").unwrap();
        assert_eq!(
            err.to_string(),
            "SECKILL_TOKEN_SECRET: must differ from SECKILL_ADMIN_TOKEN"
        );
        // The values .env.example ships with, and other obvious ones.
        for (var, value) in [
            (
                "SECKILL_JWT_SECRET",
                "replace-with-a-long-random-jwt-secret",
            ),
            (
                "SECKILL_ADMIN_TOKEN",
                "replace-with-a-long-random-admin-token",
            ),
            (
                "SECKILL_TOKEN_SECRET",
                "replace-with-another-long-random-secret",
            ),
            ("SECKILL_ADMIN_TOKEN", "aaaaaaaaaaaaaaaaaaaa"),
            ("SECKILL_JWT_SECRET", "changeme-changeme-changeme"),
        ] {
            let err = with(var, value).unwrap();
            assert_eq!(err.var, var, "{value}");
            assert!(err.message.contains("placeholder"), "{err}");
        }
    }

    #[test]
    fn a_login_s_public_keys_are_enough_without_a_jwt_secret() {
        let others = [
            ("SECKILL_ADMIN_TOKEN", "own-admin-token-0123456789"),
            ("SECKILL_TOKEN_SECRET", "own-token-secret-0123456789"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = others.to_vec();
            all.extend_from_slice(extra);
            Settings::from_vars(vars(&all))
        };
        let none = with(&[]).unwrap();
        let err = none.secrets().err().unwrap();
        assert_eq!(err.var, "SECKILL_JWT_SECRET");
        assert!(err.message.contains("SECKILL_JWT_JWKS_URL"), "{err}");
        let jwks = with(&[(
            "SECKILL_JWT_JWKS_URL",
            "https://id.example/.well-known/jwks.json",
        )])
        .unwrap();
        assert!(jwks.secrets().unwrap().jwt_secret.is_none());
        assert_eq!(
            jwks.jwt_jwks_url.as_deref(),
            Some("https://id.example/.well-known/jwks.json")
        );
        let pem = with(&[("SECKILL_JWT_PUBLIC_KEYS", "/etc/a.pem, /etc/b.pem")]).unwrap();
        assert!(pem.secrets().unwrap().jwt_secret.is_none());
        assert_eq!(pem.jwt_public_keys.len(), 2);
        // In the clear only on loopback; an empty path is a typo.
        for (var, value) in [
            ("SECKILL_JWT_JWKS_URL", "http://id.example/jwks.json"),
            ("SECKILL_JWT_JWKS_URL", "ftp://127.0.0.1/jwks.json"),
            ("SECKILL_JWT_JWKS_URL", "not a url"),
            ("SECKILL_JWT_PUBLIC_KEYS", "/etc/a.pem,,/etc/b.pem"),
        ] {
            let err = with(&[(var, value)]).err().unwrap();
            assert_eq!(err.var, var, "{value}");
        }
        for loopback in [
            "http://127.0.0.1:9/jwks",
            "http://[::1]:9/jwks",
            "http://localhost:9/jwks",
        ] {
            let s = Settings::from_vars(vars(&[
                ("SECKILL_DEV", "1"),
                ("SECKILL_JWT_JWKS_URL", loopback),
            ]));
            assert!(s.is_ok(), "{loopback}");
        }
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

    #[test]
    fn the_parser_reads_exactly_the_variables_of_the_table() {
        let set = [("SECKILL_DEV", "1")].map(|(k, v)| (k.to_owned(), v.to_owned()));
        let map: HashMap<String, String> = set.into_iter().collect();
        let env = Env::new(&map);
        Settings::read(&env).unwrap();
        let mut want: BTreeSet<&str> = VARS.iter().map(|v| v.name).collect();
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
            (
                "fsync+replicas:1",
                Durability::FsyncReplicas(NonZeroU16::new(1).unwrap()),
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
            "fsync+replicas:",
            "fsync+replicas:0",
            "fsync+replicas:1001",
            "fsync+",
            "replicas:1+fsync",
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
                "SECKILL_TOKEN_SECRET",
                "SECKILL_SERVICE_TOKENS",
            ]
        );
        let s = Settings::from_vars(vars(&[("SECKILL_DEV", "1"), OWN[1]])).unwrap();
        assert_eq!(
            s.dev_secrets_filled(),
            [
                "SECKILL_JWT_SECRET",
                "SECKILL_TOKEN_SECRET",
                "SECKILL_SERVICE_TOKENS"
            ]
        );
        let secrets = s.secrets().unwrap();
        assert_eq!(secrets.admin_token.expose_secret(), OWN[1].1);
        assert_eq!(
            secrets.jwt_secret.as_ref().unwrap().expose_secret(),
            DEV_JWT_SECRET
        );
        let mut all = OWN.to_vec();
        all.push(("SECKILL_DEV", "1"));
        let s = Settings::from_vars(vars(&all)).unwrap();
        assert_eq!(s.dev_secrets_filled(), ["SECKILL_SERVICE_TOKENS"]);
        all.push(("SECKILL_SERVICE_TOKENS", SERVICE_A));
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

    const SERVICE_A: &str = "svc-a-5f0c1e9d7b3a46e28c1d0f9e8a7b6c5d";
    const SERVICE_B: &str = "svc-b-0a9b8c7d6e5f40312a3b4c5d6e7f8091";

    /// The service tokens read with `value`, or the error's message.
    fn service_tokens_of(value: &str) -> Result<Vec<String>, String> {
        let mut set = OWN.to_vec();
        set.push(("SECKILL_SERVICE_TOKENS", value));
        let s = Settings::from_vars(vars(&set)).unwrap();
        s.secrets()
            .map(|x| {
                x.service_tokens
                    .iter()
                    .map(|t| t.expose_secret().to_owned())
                    .collect()
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn service_tokens_are_several_long_and_unlike_any_other_secret() {
        assert_eq!(
            service_tokens_of(&format!("{SERVICE_A}, {SERVICE_B},{SERVICE_A}")),
            Ok(vec![SERVICE_A.to_owned(), SERVICE_B.to_owned()])
        );
        // Unset outside development mode: no service access at all.
        let s = Settings::from_vars(vars(&OWN)).unwrap();
        assert!(s.secrets().unwrap().service_tokens.is_empty());
        for (value, why) in [
            (
                "short-token-0123456789",
                "token 1 must be at least 32 characters",
            ),
            (&format!("{SERVICE_A},,{SERVICE_B}"), "token 2 is empty"),
            (
                "changeme-changeme-changeme-changeme",
                "token 1 looks like a placeholder",
            ),
            (
                "your-service-token-goes-here-0123456789",
                "token 1 looks like a placeholder",
            ),
            (&"x".repeat(40), "token 1 looks like a placeholder"),
            (
                "seckill-dev-service-token-do-not-use-in-production",
                "token 1 is a public development secret",
            ),
        ] {
            let err = service_tokens_of(value).unwrap_err();
            assert!(
                err.starts_with(&format!("SECKILL_SERVICE_TOKENS: {why}")),
                "{value}: {err}"
            );
        }
        // A token that is also the operators' token would open both doors.
        let same = "the-same-long-secret-0123456789abcdef";
        let s = Settings::from_vars(vars(&[
            OWN[0],
            ("SECKILL_ADMIN_TOKEN", same),
            OWN[2],
            ("SECKILL_SERVICE_TOKENS", same),
        ]))
        .unwrap();
        assert_eq!(
            s.secrets().err().unwrap().to_string(),
            "SECKILL_SERVICE_TOKENS: token 1 must differ from SECKILL_ADMIN_TOKEN"
        );
    }

    #[test]
    fn the_checkout_url_is_an_http_template_with_the_order_id() {
        let read = |url: &str| {
            Settings::from_vars(vars(&[("SECKILL_DEV", "1"), ("SECKILL_CHECKOUT_URL", url)]))
                .map(|s| s.checkout_url)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            read("https://shop.example/checkout/{order_id}"),
            Ok(Some("https://shop.example/checkout/{order_id}".to_owned()))
        );
        for bad in [
            "https://shop.example/checkout",
            "javascript:alert(1)//{order_id}",
            "ftp://shop.example/{order_id}",
            "https://shop.example/\"{order_id}",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        let s = Settings::from_vars(vars(&[("SECKILL_DEV", "1")])).unwrap();
        assert_eq!(s.checkout_url, None);
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
    fn the_settings_never_show_the_redis_password() {
        let s = Settings::from_vars(vars(&[(
            "SECKILL_REDIS_URL",
            "redis://user:hunter2@127.0.0.1:6379",
        )]))
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
        assert!(format!("{:?}", s.redis).contains("redis://user:***@127.0.0.1:6379"));
    }
}
