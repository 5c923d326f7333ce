//! Reading one variable: its value, else its default from [`VARS`](super::VARS), parsed and
//! within its bounds, each read noted; and the development secrets.

use std::{
    cell::RefCell,
    collections::{BTreeSet, HashMap},
    fmt,
    net::SocketAddr,
    str::FromStr,
};

use secrecy::SecretString;

use super::{
    ConfigError,
    vars::{Var, VarDefault, var},
};

/// Development secrets used only with `SECKILL_DEV=1` (and loudly logged as such). They are
/// public, so outside development mode they are refused as values.
pub(super) const DEV_JWT_SECRET: &str = "seckill-dev-jwt-secret-do-not-use-in-production";
pub(super) const DEV_ADMIN_TOKEN: &str = "seckill-dev-admin-token";
pub(super) const DEV_TOKEN_SECRET: &str = "seckill-dev-purchase-token-secret";
pub(super) const DEV_SERVICE_TOKEN: &str = "seckill-dev-service-token-do-not-use-in-production";
pub(super) const DEV_SECRETS: &[&str] = &[
    DEV_JWT_SECRET,
    DEV_ADMIN_TOKEN,
    DEV_TOKEN_SECRET,
    DEV_SERVICE_TOKEN,
];

/// The variables being read. Every read goes through [`Env::get`], which notes the name (so a
/// test can check that the parser reads exactly the variables of [`VARS`]); defaults and bounds
/// come from [`VARS`].
pub(super) struct Env<'a> {
    pub(super) vars: &'a HashMap<String, String>,
    pub(super) read: RefCell<BTreeSet<&'static str>>,
}

impl<'a> Env<'a> {
    pub(super) fn new(vars: &'a HashMap<String, String>) -> Self {
        Self {
            vars,
            read: RefCell::default(),
        }
    }

    pub(super) fn get(&self, var: &'static str) -> Option<&'a String> {
        self.read.borrow_mut().insert(var);
        self.vars.get(var)
    }

    /// The variable's entry in [`VARS`]; one missing is a bug, reported like a bad setting.
    fn var(&self, name: &'static str) -> Result<&'static Var, ConfigError> {
        var(name).ok_or_else(|| ConfigError::new(name, "not in the configuration table (a bug)"))
    }

    /// The value, else the default of [`VARS`].
    pub(super) fn string(&self, var: &'static str) -> Result<String, ConfigError> {
        if let Some(value) = self.get(var) {
            return Ok(value.clone());
        }
        match self.var(var)?.default {
            VarDefault::Value(default) => Ok(default.to_owned()),
            VarDefault::Described(_) => Err(ConfigError::new(var, "has no default value (a bug)")),
        }
    }

    pub(super) fn parse<T: FromStr>(&self, var: &'static str) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let raw = self.string(var)?;
        raw.trim()
            .parse()
            .map_err(|e| ConfigError::new(var, format!("cannot parse {raw:?}: {e}")))
    }

    /// A whole number within the bounds of [`VARS`].
    pub(super) fn ranged(&self, var: &'static str) -> Result<u64, ConfigError> {
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
    pub(super) fn ranged_as<T: TryFrom<u64>>(&self, var: &'static str) -> Result<T, ConfigError> {
        let value = self.ranged(var)?;
        T::try_from(value).map_err(|_| ConfigError::new(var, format!("{value} is too large")))
    }

    /// An optional, non-empty string (unset is `None`).
    pub(super) fn optional(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        match self.get(var) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Err(ConfigError::new(
                var,
                "must not be empty (unset it to not check the claim)",
            )),
            Some(v) => Ok(Some(v.clone())),
        }
    }

    pub(super) fn flag(&self, var: &'static str) -> Result<bool, ConfigError> {
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
    pub(super) fn listener(&self, var: &'static str, dev: bool) -> Result<SocketAddr, ConfigError> {
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
    pub(super) fn secret(
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
            Some(v) if !dev && super::read::is_placeholder(v) => Err(ConfigError::new(
                var,
                "looks like a placeholder (the .env.example value?); generate one, e.g. openssl rand -hex 32",
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
