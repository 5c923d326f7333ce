//! The value types of settings, each with the way it is written: rates, durations, trusted
//! proxies, durability, and where Redis is (its password redacted wherever it is shown).

use std::{fmt, net::IpAddr, num::NonZeroU16, str::FromStr, time::Duration};

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
    /// After every win, `WAITAOF 1 N` (Redis 7.2+, Valkey): the `202` waits until the primary
    /// and N replicas have fsynced the win to their AOF (or the wait times out). Needs
    /// `appendonly yes` on the primary and its replicas; refused at start by a server without
    /// `WAITAOF`.
    FsyncReplicas(NonZeroU16),
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::None => f.write_str("none"),
            Durability::Fsync => f.write_str("fsync"),
            Durability::Replicas(n) => write!(f, "replicas:{n}"),
            Durability::FsyncReplicas(n) => write!(f, "fsync+replicas:{n}"),
        }
    }
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "expected fsync, replicas:N, fsync+replicas:N (N from 1 to 1000) or none, got {s:?}"
            )
        };
        let count = |n: &str| {
            n.parse()
                .ok()
                .filter(|n: &NonZeroU16| n.get() <= 1_000)
                .ok_or_else(bad)
        };
        match s {
            "none" => Ok(Durability::None),
            "fsync" => Ok(Durability::Fsync),
            _ => {
                if let Some(n) = s.strip_prefix("fsync+replicas:") {
                    Ok(Durability::FsyncReplicas(count(n)?))
                } else if let Some(n) = s.strip_prefix("replicas:") {
                    Ok(Durability::Replicas(count(n)?))
                } else {
                    Err(bad())
                }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn proxies_match_addresses_and_blocks() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
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
    }
}
