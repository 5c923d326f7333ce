//! The variables table: every environment variable the configuration reads, with its default,
//! bounds and meaning ([`VARS`]), and `seckill --help` made from it.

/// How a variable's default reads in `seckill --help` and docs/configuration.md's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarDefault {
    /// The value the parser reads when the variable is unset.
    Value(&'static str),
    /// Unset means something no value says (required, not checked, off), in words.
    Described(&'static str),
}

/// One environment variable this service reads: the one definition that the parser's defaults
/// and bounds, `seckill --help` and the check of docs/configuration.md's table all come from.
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

    /// The default as the help and docs/configuration.md write it.
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
        "Redis; redis-cluster://host:port,host:port,... selects cluster mode, redis-sentinel://host:port,host:port/<service name> a primary found through Sentinel",
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
        "when a win is durable before its 202: fsync, replicas:N, fsync+replicas:N (N from 1 to 1000; WAITAOF, Redis 7.2+ / Valkey) or none",
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
        "required unless SECKILL_DEV=1 or one of the next two is set",
        "HS256 key of shoppers' JWTs (at least 16 characters)",
    ),
    Var::described(
        "SECKILL_JWT_JWKS_URL",
        "unset",
        "the storefront login's JWKS (https://, or http:// on loopback): RS256/ES256/EdDSA keys by kid, fetched at start, every 5 min and on an unknown kid (at most every 10 s), kept up to 24 h while it fails",
    ),
    Var::described(
        "SECKILL_JWT_PUBLIC_KEYS",
        "unset",
        "comma-separated PEM files of shoppers' public keys (RSA: RS256, P-256: ES256, Ed25519: EdDSA), read at start",
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
        "SECKILL_SERVICE_TOKENS",
        "unset (no service access; SECKILL_DEV=1: a development token)",
        "comma-separated bearer tokens of the storefront's backend (each at least 32 characters): read orders, record payments",
    ),
    Var::described(
        "SECKILL_CHECKOUT_URL",
        "unset (the page says to pay at the shop)",
        "where the storefront page sends a winner to pay: an http(s) URL template with {order_id}",
    ),
    Var::new(
        "SECKILL_EVENTS_EXCHANGE",
        "seckill.events",
        "RabbitMQ topic exchange the order events go to (routing key: the event's type)",
    ),
    Var::described(
        "SECKILL_WEBHOOK_URL",
        "unset (no webhook)",
        "http(s) URL each order event is POSTed to, signed (Seckill-Signature), retried with backoff until a 2xx",
    ),
    Var::described(
        "SECKILL_WEBHOOK_SECRET",
        "required with SECKILL_WEBHOOK_URL",
        "HMAC-SHA256 key of the webhook's signatures (at least 32 characters)",
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
        "SECKILL_CURRENCY",
        "USD",
        "currency (ISO 4217 code) of a product created without one",
    ),
    Var::new(
        "SECKILL_ROOM_OPENS_SECS",
        "600",
        "a product's waiting room takes joins from this long before its start",
    )
    .range(0, 7 * 86_400),
    Var::new(
        "SECKILL_ROOM_FACTOR_PERCENT",
        "120",
        "a waiting room admits while its admitted-but-undecided shoppers are at most this percentage of the units left",
    )
    .range(100, 1_000),
    Var::new(
        "SECKILL_ROOM_ADMIT_RATE",
        "1000",
        "most shoppers one waiting room admits per second",
    )
    .range(1, 1_000_000),
    Var::new(
        "SECKILL_ROOM_ADMISSION_SECS",
        "60",
        "how long an admission (and its token) lasts; an unused one frees its slot",
    )
    .range(5, 3_600),
    Var::new(
        "SECKILL_POW_MIN_BITS",
        "16",
        "a waiting room's proof of work: leading zero bits of SHA-256 asked while joins are slow (16: about a second on a phone)",
    )
    .range(0, 32),
    Var::new(
        "SECKILL_POW_MAX_BITS",
        "24",
        "the most bits the proof of work asks, however fast shoppers join",
    )
    .range(0, 32),
    Var::new(
        "SECKILL_POW_JOIN_RATE",
        "100",
        "joins per second per room above which each doubling of the rate adds one bit of proof of work",
    )
    .range(1, 1_000_000),
    Var::new(
        "SECKILL_VIEW_MAX_AGE_SECS",
        "1",
        "how long a browser, proxy or CDN may keep a product's view (0: revalidate every time)",
    )
    .range(0, 60),
    Var::new(
        "SECKILL_VIEW_STALE_SECS",
        "2",
        "how long after that a cache may still answer with it while it asks again (stale-while-revalidate)",
    )
    .range(0, 60),
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
        "SECKILL_RESERVE_LANE_CALLS",
        "2",
        "most Redis calls of one product's purchases in flight at once in one process: what keeps a hot product from taking Redis from the others",
    )
    .range(1, 64),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

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

    /// The rows of docs/configuration.md's table: name and default, backticks removed.
    fn readme_rows() -> Vec<(String, String)> {
        let doc = include_str!("../../docs/configuration.md");
        let section = doc
            .split("\n## ")
            .next()
            .expect("docs/configuration.md has a table before its first section");
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
    fn the_configuration_page_lists_every_variable_with_its_default() {
        let rows = readme_rows();
        let names: BTreeSet<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, table_names(), "docs/configuration.md's table");
        for (name, default) in &rows {
            let want = var(name).unwrap().default_text();
            assert_eq!(default, want, "docs/configuration.md's default of {name}");
        }
    }
}
