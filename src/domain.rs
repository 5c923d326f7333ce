//! Newtypes built once at the boundary: a value of these types is valid by construction.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A shopper: a positive 64-bit integer (the JWT `sub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct UserId(i64);

/// A product: a positive 64-bit integer (`product.product_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct ProductId(i64);

/// Not a positive 64-bit integer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a positive 64-bit integer")]
pub struct NotAnId(pub String);

macro_rules! positive_id {
    ($t:ident) => {
        impl $t {
            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl TryFrom<i64> for $t {
            type Error = NotAnId;
            fn try_from(v: i64) -> Result<Self, NotAnId> {
                if v > 0 {
                    Ok(Self(v))
                } else {
                    Err(NotAnId(v.to_string()))
                }
            }
        }

        impl TryFrom<&str> for $t {
            type Error = NotAnId;
            /// Strict decimal: no sign, no leading zeros, no spaces.
            fn try_from(s: &str) -> Result<Self, NotAnId> {
                let ok = !s.is_empty()
                    && s.len() <= 19
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && !s.starts_with('0');
                ok.then(|| s.parse::<i64>().ok())
                    .flatten()
                    .map(Self)
                    .ok_or_else(|| NotAnId(s.chars().take(40).collect()))
            }
        }

        impl From<$t> for i64 {
            fn from(v: $t) -> i64 {
                v.0
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

positive_id!(UserId);
positive_id!(ProductId);

/// Whether `code` has the form of an ISO 4217 currency code (three capital letters, e.g. EUR).
pub fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_positive_decimal_integers() {
        assert_eq!(UserId::try_from("42").unwrap().get(), 42);
        assert_eq!(
            UserId::try_from("9223372036854775807").unwrap().get(),
            i64::MAX
        );
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "007",
            " 1",
            "1.0",
            "9223372036854775808",
            "abc",
            "1e3",
        ] {
            assert!(UserId::try_from(bad).is_err(), "{bad:?}");
        }
        assert!(ProductId::try_from(0_i64).is_err());
        assert!(ProductId::try_from(-5_i64).is_err());
    }
}
